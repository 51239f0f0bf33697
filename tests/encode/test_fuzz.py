"""Fuzzing the .hwq reader: every mutated or crafted file either decodes or is refused with
HwqFormatError — never another exception, never MemoryError, never slowly.

Valid files from the writer (tests/encode/hostile_files.py) are mutated byte-wise
(truncations, bit flips, overwrites and splices: all must be refused), rewritten with a
modified header and right checksums (random JSON edits, payload sections replaced with their
CRC fixed: decode or refuse), and replaced by hand-made bombs (refused in under a second)
and the memory bombs of the decoder's bound (per-chunk rANS tables, context-coded indices:
decoded or refused within the address-space limit, and edited).
The loop runs in child processes under an address-space limit (1.5 GiB above the warmed-up
baseline), each case timed: two children at once, each taking every other base file (and the
first the bombs), so the two cores share it. Seeded per base file, so a failure reproduces with
its label whatever the split.
"""

from __future__ import annotations

import copy
import json
import os
import resource
import subprocess
import sys
import time
import traceback
import zlib
from pathlib import Path

import numpy as np
import pytest

SEED = 20240611
# Cases a base file per mutation kind, times HWQ_FUZZ_SCALE (default 1: ~8,000 cases in all,
# ~40 s on 2 cores; HWQ_FUZZ_SCALE=4 for a longer hunt).
SCALE = float(os.environ.get("HWQ_FUZZ_SCALE", "1"))


def _n(base: int) -> int:
    return max(1, round(base * SCALE))

CASE_SECONDS = 2.0  # any case
BOMB_SECONDS = 1.0  # a refusal from the header alone
HEADROOM = 1536 << 20  # address space above the warmed-up baseline


# ---------------------------------------------------------------------------------------------
# the child process


def _vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _map(fn, jobs):
    """A map_fn like a distributed one: decodes every chunk before the reader sees any."""
    return [fn(j) for j in jobs]


def _attempt(path: Path, blob: bytes, rng, *, accounting: bool, partial: bool) -> str:
    """Open, inspect and read a file; 'ok' or 'refused' (other exceptions propagate).
    ``partial``: read one tensor (a range read), through a map_fn."""
    from pipeline.encode import HwqFormatError, HwqReader

    path.write_bytes(blob)
    try:
        r = HwqReader(path)
        r.inspect()
        names = None
        if partial and r.names:
            names = [r.names[int(rng.integers(len(r.names)))]]
        out = r.read(names, map_fn=_map if partial else None)
        for n, a in out.items():
            t = r._h.tensors[n]
            assert a.shape == t.shape, (n, a.shape, t.shape)
        if accounting:
            r.accounting()
        return "ok"
    except HwqFormatError:
        return "refused"


def _leaves(obj, path=()):
    """Every (path, value) in a JSON tree, containers included."""
    yield path, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _leaves(v, (*path, i))


_ODD = [0, 1, -1, 2, 7, 8, 255, 256, 65535, 65536, 1 << 24, (1 << 24) + 1, (1 << 31) - 1,
        1 << 32, 1 << 48, (1 << 48) + 1, 1 << 62, 1 << 63, 1 << 64, 10**30, -(1 << 63), 0.5,
        1.0, float("inf"), float("nan"), True, False, None, "", "x", "float32", "bool",
        "huffman", "fixed", "raw", "quantized", "channel", "net", [], {}, [0], [1 << 40],
        [[0, 1, 1, 0]], [1 << 29], {"code_table": 0, "chunks": []}]


def _edit_json(h: dict, rng) -> dict:
    """One to three random edits of a header: odd values, deletions, duplications, swaps."""
    h = copy.deepcopy(h)
    for _ in range(int(rng.integers(1, 4))):
        paths = [p for p, _ in _leaves(h) if p]
        path = paths[int(rng.integers(len(paths)))]
        parent = h
        for k in path[:-1]:
            parent = parent[k]
        key, old = path[-1], parent[path[-1]]
        op = rng.integers(6)
        if op == 0:
            parent[key] = _ODD[int(rng.integers(len(_ODD)))]
        elif op == 1 and isinstance(old, int) and not isinstance(old, bool):
            parent[key] = old + int(rng.choice([-8, -1, 1, 8, old, -old]))
        elif op == 2:
            if isinstance(parent, dict):
                del parent[key]
            else:
                parent.pop(key)
        elif op == 3 and isinstance(parent, list):
            parent.insert(key, copy.deepcopy(old))  # a duplicated entry
        elif op == 4:
            # Another value of the same key elsewhere (an offset, a name, a shape...).
            same = [p for p, _ in _leaves(h) if p and p[-1] == key and p != path]
            if same:
                src = h
                for k in same[int(rng.integers(len(same)))]:
                    src = src[k]
                parent[key] = copy.deepcopy(src)
        else:
            parent[key] = _ODD[int(rng.integers(len(_ODD)))]
    return h


def _sections(h: dict) -> list[tuple[str, list | dict]]:
    """Every section of a header: ("chunk", [off, len, n, crc]) or (kind, dict)."""
    out: list = [("codebook", c) for c in h["codebooks"]]
    out += [("table", t) for t in h["code_tables"] if t["length"]]
    for t in h["tensors"]:
        if t["kind"] == "raw":
            out.append(("raw", t))
            continue
        for st in (t["indices"], t["positions"]):
            if st:
                out += [("chunk", c) for c in st["chunks"]]
    return out


def _edit_payload(h: dict, payload: bytearray, rng) -> tuple[dict, bytearray]:
    """A section's bytes replaced (random, bits flipped, zeros, ones) with its CRC fixed; for
    chunks sometimes the symbol count changed: the checks past the checksum see it all."""
    h, payload = copy.deepcopy(h), bytearray(payload)
    secs = [(k, s) for k, s in _sections(h) if (s[1] if k == "chunk" else s["length"])]
    kind, s = secs[int(rng.integers(len(secs)))]
    off, n = (s[0], s[1]) if kind == "chunk" else (s["offset"], s["length"])
    data = bytearray(payload[off : off + n])
    op = rng.integers(5)
    if op == 0:
        data = bytearray(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
    elif op == 1:
        for _ in range(int(rng.integers(1, 4))):
            i = int(rng.integers(n * 8))
            data[i // 8] ^= 0x80 >> (i % 8)
    elif op == 2:
        data = bytearray(n)
    elif op == 3:
        data = bytearray(b"\xff" * n)
    elif kind == "chunk":
        s[2] = int(rng.choice([s[2] - 1, s[2] + 1, 8 * n, 1, max(1, 8 * n - 1)]))
    payload[off : off + n] = data
    crc = zlib.crc32(bytes(data))
    if kind == "chunk":
        s[3] = crc
    else:
        s["crc32"] = crc
    return h, payload


def fuzz(folder: Path, shard: int = 0, shards: int = 1) -> dict:
    """Run this shard's cases: the base files at positions shard, shard + shards, ... and,
    in shard 0, the bombs. Returns counts, failures and timings."""
    import hostile_files as hf

    from pipeline.encode import HwqFormatError, read_hwq

    rng = np.random.default_rng(SEED)
    bases = hf.base_files(folder, SEED)
    target = folder / "case.hwq"
    # Warm up (numba's decoder loads or compiles), then cap the address space.
    for blob in bases.values():
        assert _attempt(target, blob, rng, accounting=True, partial=False) == "ok"
    baseline = _vm_kib("VmPeak") * 1024
    limit = baseline + HEADROOM
    if baseline:  # Linux: /proc tells the baseline (and RLIMIT_AS is enforced)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    counts: dict[str, dict[str, int]] = {}
    failures: list[str] = []
    slowest = (0.0, "")

    def case(category: str, label: str, blob: bytes, *, must_refuse: bool,
             seconds: float = CASE_SECONDS, accounting: bool = False, partial: bool = False,
             call=None):
        nonlocal slowest
        c = counts.setdefault(category, {"tried": 0, "refused": 0, "decoded": 0})
        c["tried"] += 1
        print(label, file=sys.stderr, flush=True)  # the last line names a hang
        t0 = time.perf_counter()
        try:
            if call is not None:
                target.write_bytes(blob)
                try:
                    call(target)
                    result = "ok"
                except HwqFormatError:
                    result = "refused"
            else:
                result = _attempt(target, blob, rng, accounting=accounting, partial=partial)
        except BaseException as exc:  # noqa: BLE001 - anything else is the finding
            failures.append(f"{label}: {type(exc).__name__}: {exc}"[:500] + "\n"
                            + traceback.format_exc(limit=-3)[-1500:])
            return
        dt = time.perf_counter() - t0
        slowest = max(slowest, (dt, label))
        c["refused" if result == "refused" else "decoded"] += 1
        if must_refuse and result != "refused":
            failures.append(f"{label}: decoded, should have been refused")
        if dt > seconds:
            failures.append(f"{label}: took {dt:.2f} s (limit {seconds} s)")

    for b, (bname, ok) in enumerate(bases.items()):
        if b % shards != shard:
            continue
        rng = np.random.default_rng([SEED, b])  # a base file's cases, whatever the split
        n = len(ok)
        h, payload = hf.split(ok)
        pstart = n - len(payload)
        cuts = {0, 1, 4, 8, 16, 23, 24, 25, pstart - 1, pstart, pstart + 1, n - 1}
        for _, s in _sections(h):
            off = s[0] if isinstance(s, list) else s["offset"]
            cuts |= {pstart + off, pstart + off + 1}
        cuts |= {int(x) for x in rng.integers(0, n, _n(20))}
        for cut in sorted(c for c in cuts if 0 <= c < n):
            case("truncations", f"{bname} truncate@{cut}", ok[:cut], must_refuse=True)

        for i in range(_n(200)):
            blob = bytearray(ok)
            for _ in range(int(rng.integers(1, 4))):
                bit = int(rng.integers(8 * n))
                blob[bit // 8] ^= 0x80 >> (bit % 8)
            case("bit flips", f"{bname} flip#{i}", bytes(blob), must_refuse=bytes(blob) != ok)

        for i in range(_n(100)):
            blob = bytearray(ok)
            at, width = int(rng.integers(n)), int(rng.integers(1, 65))
            op = rng.integers(5)
            if op == 0:
                blob[at : at + width] = rng.integers(0, 256, width, dtype=np.uint8).tobytes()
            elif op == 1:
                blob[at : at + width] = bytes(width)
            elif op == 2:
                blob[at : at + width] = b"\xff" * width
            elif op == 3:
                blob[at:at] = rng.integers(0, 256, width, dtype=np.uint8).tobytes()  # insert
            else:
                del blob[at : at + width]
            blob = bytes(blob)
            case("overwrites", f"{bname} overwrite#{i} op{op}@{at}+{width}", blob,
                 must_refuse=blob != ok)

        for i in range(_n(400)):
            hh = _edit_json(h, rng)
            try:
                blob = hf.join(hh, payload, fix_payload_len=False,
                               compressed=bool(rng.integers(2)))
            except (ValueError, TypeError):
                continue  # not serializable (a dict key collision); nothing to test
            case("crafted headers", f"{bname} json#{i}", blob, must_refuse=False,
                 accounting=i % 4 == 0, partial=i % 3 == 0)

        if _sections(h):
            for i in range(_n(150)):
                hh, pl = _edit_payload(h, payload, rng)
                case("crafted payloads", f"{bname} section#{i}", hf.join(hh, pl),
                     must_refuse=False, accounting=i % 4 == 0, partial=i % 3 == 0)

    rng = np.random.default_rng([SEED, len(bases)])
    for name, (blob, kw) in (hf.bombs(bases["mixed-network"]) if shard == 0 else {}).items():
        case("bombs", f"bomb {name}", blob, must_refuse=True, seconds=BOMB_SECONDS,
             call=lambda p, kw=kw: read_hwq(p, **kw))
    if shard == 0:
        # Honest large ones stay readable: the escape-coded sparse file decodes to 1.2 MB.
        case("bombs", "honest sparse-escapes", bases["sparse-escapes"], must_refuse=False)

    # The decoder's memory bound (docs/FORMAT.md, section 6): per-chunk rANS tables (at 20
    # bits, refused; at 16 and 17 bits, different for every chunk), 1 M context-coded
    # indices from a few hundred bytes, a [16, 2^22] ragged codebook (refused); then seeded
    # header and section edits of the table files.
    mem = hf.memory_bombs(folder) if shard == 0 else {}
    for name, (blob, must) in mem.items():
        case("memory bombs", f"memory {name}", blob, must_refuse=must, accounting=True)
        case("memory bombs", f"memory {name} partial", blob, must_refuse=must, partial=True)
    for name in ("level-tables-pb20", "level-tables-pb16") if shard == 0 else ():
        h, payload = hf.split(mem[name][0])
        for i in range(15):
            hh = _edit_json(h, rng)
            try:
                blob = hf.join(hh, payload, fix_payload_len=False)
            except (ValueError, TypeError):
                continue
            case("memory bombs", f"memory {name} json#{i}", blob, must_refuse=False)
            hh, pl = _edit_payload(h, payload, rng)
            case("memory bombs", f"memory {name} section#{i}", hf.join(hh, pl),
                 must_refuse=False)

    total = {k: sum(c[k] for c in counts.values()) for k in ("tried", "refused", "decoded")}
    return {
        "seed": SEED, "counts": counts, "total": total, "failures": failures,
        "slowest": {"seconds": round(slowest[0], 3), "case": slowest[1]},
        "address_space_limit_mib": limit >> 20, "baseline_mib": baseline >> 20,
    }


# ---------------------------------------------------------------------------------------------
# the test


# No wall-clock assertion (a loaded machine is slower, not wrong); a hang still ends at the
# child's timeout, which is a failure.
SHARDS = 2  # children at once (the machine's two cores)


@pytest.mark.timeout(480)
def test_fuzz_reader_refuses_cleanly(tmp_path):
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1",
               OPENBLAS_NUM_THREADS="1", PYTHONHASHSEED="0")
    t0 = time.perf_counter()
    children, dirs = [], [tmp_path / str(i) for i in range(SHARDS)]
    for i, d in enumerate(dirs):
        d.mkdir()
        # Files, not pipes: a child must never wait on a full pipe while the other is read.
        with open(d / "out.txt", "w") as out, open(d / "err.txt", "w") as err:
            children.append(subprocess.Popen([sys.executable, __file__, str(d), str(i),
                                              str(SHARDS)], env=env, stdout=out, stderr=err))
    try:
        for c in children:
            c.wait(timeout=max(1.0, 420 - (time.perf_counter() - t0)))
    finally:
        for c in children:
            c.kill()
    elapsed = time.perf_counter() - t0
    summaries = []
    for i, (c, d) in enumerate(zip(children, dirs, strict=True)):
        tail = "\n".join((d / "err.txt").read_text().splitlines()[-20:])
        assert c.returncode == 0, f"fuzz child {i} exited {c.returncode}; last cases:\n{tail}"
        summaries.append(json.loads((d / "out.txt").read_text().splitlines()[-1]))
    counts: dict[str, dict[str, int]] = {}
    for sm in summaries:
        for cat, c in sm["counts"].items():
            into = counts.setdefault(cat, {"tried": 0, "refused": 0, "decoded": 0})
            for k, v in c.items():
                into[k] += v
    failures = [f for sm in summaries for f in sm["failures"]]
    print(f"\nfuzz ({elapsed:.1f} s):", json.dumps({"counts": counts, "shards": summaries},
                                                  indent=1))
    assert not failures, "\n\n".join(failures[:10])
    assert counts["truncations"]["tried"] >= 300 and counts["bit flips"]["tried"] >= 1500
    assert counts["crafted headers"]["refused"] > 1000 and counts["bombs"]["refused"] >= 15
    assert counts["memory bombs"]["tried"] >= 60 and counts["memory bombs"]["decoded"] >= 6
    # The crafted files reach the checks past the checksums, and some decode.
    assert counts["crafted payloads"]["decoded"] > 0 and counts["crafted headers"]["decoded"] > 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    print(json.dumps(fuzz(Path(sys.argv[1]), *map(int, sys.argv[2:4]))))
