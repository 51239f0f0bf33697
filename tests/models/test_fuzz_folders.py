"""Fuzzing model folders and GGUF files: every mutated input either loads or is refused with a
UserError — never another exception, never a MemoryError (issue 21).

A tiny valid folder (a random Llama, hwq-written shards with per-tensor digests, a single-file
copy, a byte-level BPE tokenizer, a GGUF of the same model) is mutated in a fixed number of
seeded ways per category: safetensors headers (JSON edits with the length prefix fixed, bit
flips, truncations), the shard index, config.json, tokenizer.json / tokenizer_config.json, and
GGUF bytes (bit flips, truncations, counts overwritten). Each case runs what hwq runs on such a
folder: WeightsFolder and every tensor read, StreamedLM's skeleton, the resident loader (for a
share of cases), the tokenizer on a short text, the GGUF check and load. The loop runs in a
child process under an address-space limit (1.5 GiB above the warmed-up baseline); seeded, so
a failure reproduces with its label.
"""

from __future__ import annotations

import copy
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import pytest

SEED = 20261206
HEADROOM = 1536 << 20
VOCAB = 300
# cases per category (the test's runtime is about proportional), times HWQ_FUZZ_SCALE
# (default 1: ~700 cases; HWQ_FUZZ_SCALE=4 for a longer hunt)
_SCALE = float(os.environ.get("HWQ_FUZZ_SCALE", "1"))
N_HEADER_JSON, N_HEADER_BYTES, N_INDEX, N_CONFIG, N_TOKENIZER, N_GGUF = (
    max(1, round(n * _SCALE)) for n in (120, 60, 90, 150, 100, 150))

_ODD = [0, 1, -1, 2, 3, 7, 16, 64, 255, 1 << 20, (1 << 31) - 1, 1 << 32, 1 << 40, 1 << 62,
        1 << 63, 1 << 64, 10**30, -(1 << 63), 0.5, 1.0, 1e308, float("inf"), float("nan"), True,
        False, None, "", "x", "F32", "BF16", "I8", "PICKLE", "llama", "gpt2", "../x",
        "model.safetensors", "pytorch_model.bin", "a\0b", [], {}, [0], [1 << 40], [[1]],
        {"a": 1}, "0" * 64]


def _leaves(obj, path=()):
    yield path, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _leaves(v, (*path, i))


def _edit_json(h, rng, shallow: float = 0.0):
    """One to three random edits: odd values, deletions, duplications, numbers nudged, values
    copied from another key of the same name. ``shallow``: the share of edits that pick a
    path at most two levels deep (tokenizer.json's structure, not its vocabulary)."""
    h = copy.deepcopy(h)
    for _ in range(int(rng.integers(1, 4))):
        paths = [p for p, _ in _leaves(h) if p]
        if shallow and rng.random() < shallow:
            paths = [p for p in paths if len(p) <= 2] or paths
        if not paths:
            break
        path = paths[int(rng.integers(len(paths)))]
        parent = h
        for k in path[:-1]:
            parent = parent[k]
        key, old = path[-1], parent[path[-1]]
        op = rng.integers(5)
        if op == 1 and isinstance(old, int) and not isinstance(old, bool):
            parent[key] = old + int(rng.choice([-8, -1, 1, 8, old, -old, 1000 * old]))
        elif op == 2:
            del parent[key]
        elif op == 3:
            same = [p for p, _ in _leaves(h) if p and p[-1] == key and p != path]
            if same:
                src = h
                for k in same[int(rng.integers(len(same)))]:
                    src = src[k]
                parent[key] = copy.deepcopy(src)
        else:
            parent[key] = copy.deepcopy(_ODD[int(rng.integers(len(_ODD)))])
    return h


# ---------------------------------------------------------------------------------------------
# the child process


def _vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _bases(root: Path) -> dict[str, Path]:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_adapters import write_llama_gguf

    from pipeline.models.weights import write_folder
    from testkit.models import tiny_llama, tiny_tokenizer

    model = tiny_llama(VOCAB, hidden=16, tie_word_embeddings=False)
    tok = tiny_tokenizer(VOCAB)
    single = root / "single"
    model.save_pretrained(single)
    tok.save_pretrained(single)
    sharded = root / "sharded"
    sd = {n: t.contiguous() for n, t in model.state_dict().items()}
    write_folder(sharded, sd, [(n, t.dtype, tuple(t.shape)) for n, t in sd.items()],
                 max_shard_bytes=8000)
    model.config.save_pretrained(sharded)
    tok.save_pretrained(sharded)
    g = root / "gguf"
    g.mkdir()
    write_llama_gguf(model, g / "m.gguf", tokens=[tok.convert_ids_to_tokens(i)
                                                   for i in range(VOCAB)])
    torch.set_num_threads(1)
    return {"single": single, "sharded": sharded, "gguf": g / "m.gguf"}


def _split(st: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", st[:8])
    return json.loads(st[8 : 8 + n]), st[8 + n :]


def _join(h: dict, data: bytes) -> bytes:
    raw = json.dumps(h, allow_nan=True).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _use_folder(d: Path, full: bool) -> str:
    """What hwq does with a model folder; 'ok' or 'refused' (other exceptions propagate)."""
    import torch

    from pipeline.data.text import load_tokenizer, token_ids
    from pipeline.errors import UserError
    from pipeline.models import make_adapter
    from pipeline.models.stream import StreamedLM
    from pipeline.models.weights import WeightsFolder

    try:
        w = WeightsFolder(d)
        for n in w.names:
            w.read(n)
        lm = StreamedLM(str(d))
        lm.load(lm.model.get_input_embeddings())
        if full:
            model = make_adapter("hf_causal_lm", path=str(d)).load()
            with torch.no_grad():
                model(torch.zeros(1, 4, dtype=torch.int64))
            tok = load_tokenizer(d)
            token_ids(tok, "the quick brown fox jumps.")
        return "ok"
    except UserError:
        return "refused"


def _use_tokenizer(d: Path) -> str:
    from pipeline.data.text import load_tokenizer, token_ids
    from pipeline.errors import UserError

    try:
        token_ids(load_tokenizer(d), "the quick brown fox jumps over a lazy dog.")
        return "ok"
    except UserError:
        return "refused"


def _use_gguf(p: Path, full: bool) -> str:
    import torch

    from pipeline.errors import UserError
    from pipeline.models import make_adapter
    from pipeline.models.gguf_check import check_gguf

    try:
        check_gguf(p)
        if full:
            model = make_adapter("hf_causal_lm", path=str(p)).load()
            with torch.no_grad():
                model(torch.zeros(1, 4, dtype=torch.int64))
        return "ok"
    except UserError:
        return "refused"


def _gguf_counts(blob: bytes) -> list[tuple[int, int]]:
    """(offset, width) of every count field of a GGUF: tensor and key counts, string lengths,
    array lengths, tensor dimensions and offsets (the fields a crafted file lies in)."""
    out = [(8, 8), (16, 8)]
    at = 24
    _, _, n_tensors, n_keys = struct.unpack_from("<IIQQ", blob, 0)
    fixed = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

    def string():
        nonlocal at
        out.append((at, 8))
        (n,) = struct.unpack_from("<Q", blob, at)
        at += 8 + n

    for _ in range(n_keys):
        string()
        (vt,) = struct.unpack_from("<I", blob, at)
        at += 4
        if vt == 8:
            string()
        elif vt == 9:
            (it,) = struct.unpack_from("<I", blob, at)
            out.append((at + 4, 8))
            (n,) = struct.unpack_from("<Q", blob, at + 4)
            at += 12
            for _ in range(n):
                if it == 8:
                    string()
                else:
                    at += fixed[it]
        else:
            at += fixed[vt]
    for _ in range(n_tensors):
        string()
        (nd,) = struct.unpack_from("<I", blob, at)
        at += 4
        out += [(at + 8 * i, 8) for i in range(nd)]
        at += 8 * nd + 4
        out.append((at, 8))
        at += 8
    return out


def fuzz(work: Path) -> dict:
    from pipeline.errors import UserError  # noqa: F401 - imported before the limit

    rng = np.random.default_rng(SEED)
    bases = _bases(work / "bases")
    case_dir = work / "case"
    # Warm up (imports, first loads), then cap the address space.
    assert _use_folder(bases["single"], True) == "ok"
    assert _use_folder(bases["sharded"], True) == "ok"
    assert _use_gguf(bases["gguf"], True) == "ok"
    baseline = _vm_kib("VmPeak") * 1024
    limit = baseline + HEADROOM
    if baseline:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    counts: dict[str, dict[str, int]] = {}
    failures: list[str] = []
    slowest = (0.0, "")

    def case(category: str, label: str, base: str, files: dict[str, bytes | None], use):
        """Copy base folder `base`, replace `files` (None: delete), run `use(folder)`."""
        nonlocal slowest
        c = counts.setdefault(category, {"tried": 0, "refused": 0, "loaded": 0})
        c["tried"] += 1
        print(label, file=sys.stderr, flush=True)  # the last line names a hang
        shutil.rmtree(case_dir, ignore_errors=True)
        src = bases[base]
        if src.is_dir():
            shutil.copytree(src, case_dir)
        else:
            case_dir.mkdir()
            shutil.copy(src, case_dir / src.name)
        for name, blob in files.items():
            if blob is None:
                (case_dir / name).unlink()
            else:
                (case_dir / name).write_bytes(blob)
        t0 = time.perf_counter()
        try:
            result = use(case_dir)
        except BaseException as exc:  # noqa: BLE001 - anything else is the finding
            failures.append(f"{label}: {type(exc).__name__}: {exc}"[:500] + "\n"
                            + traceback.format_exc(limit=-4)[-1500:])
            return
        dt = time.perf_counter() - t0
        slowest = max(slowest, (dt, label))
        c["refused" if result == "refused" else "loaded"] += 1

    # -- safetensors headers
    shards = {"single": ["model.safetensors"],
              "sharded": sorted(p.name for p in bases["sharded"].glob("model-*.safetensors"))}
    for i in range(N_HEADER_JSON):
        base = ["single", "sharded"][i % 2]
        name = shards[base][int(rng.integers(len(shards[base])))]
        h, data = _split((bases[base] / name).read_bytes())
        blob = _join(_edit_json(h, rng), data)
        case("safetensors headers", f"{base}/{name} json#{i}", base, {name: blob},
             lambda d, i=i: _use_folder(d, full=i % 8 == 0))
    for i in range(N_HEADER_BYTES):
        base = ["single", "sharded"][i % 2]
        name = shards[base][int(rng.integers(len(shards[base])))]
        st = bytearray((bases[base] / name).read_bytes())
        (n,) = struct.unpack("<Q", st[:8])
        if i % 4 == 3:
            blob = bytes(st[: int(rng.integers(0, n + 16))])  # truncated in or near the header
        else:
            for _ in range(int(rng.integers(1, 4))):
                bit = int(rng.integers(8 * (8 + n)))
                st[bit // 8] ^= 0x80 >> (bit % 8)
            blob = bytes(st)
        case("safetensors headers", f"{base}/{name} bytes#{i}", base, {name: blob},
             lambda d: _use_folder(d, full=False))

    # -- the shard index
    from pipeline.models.weights import INDEX

    index = json.loads((bases["sharded"] / INDEX).read_text())
    for i in range(N_INDEX):
        blob = json.dumps(_edit_json(index, rng, shallow=0.5)).encode()
        case("indexes", f"index#{i}", "sharded", {INDEX: blob},
             lambda d, i=i: _use_folder(d, full=i % 6 == 0))

    # -- config.json
    cfg = json.loads((bases["single"] / "config.json").read_text())
    for i in range(N_CONFIG):
        blob = json.dumps(_edit_json(cfg, rng)).encode()
        base = ["single", "sharded"][i % 2]
        case("config.json", f"{base} config#{i}", base, {"config.json": blob},
             lambda d, i=i: _use_folder(d, full=i % 5 == 0))

    # -- tokenizer files
    tj = json.loads((bases["single"] / "tokenizer.json").read_text())
    tc = json.loads((bases["single"] / "tokenizer_config.json").read_text())
    for i in range(N_TOKENIZER):
        if i % 5 == 4:
            name, blob = "tokenizer_config.json", json.dumps(_edit_json(tc, rng)).encode()
        else:
            name, blob = "tokenizer.json", json.dumps(_edit_json(tj, rng, shallow=0.8)).encode()
        case("tokenizer files", f"{name}#{i}", "single", {name: blob}, _use_tokenizer)

    # -- GGUF
    g = bases["gguf"].read_bytes()
    fields = _gguf_counts(g)
    meta_end = max(o + w for o, w in fields) + 64
    for i in range(N_GGUF):
        blob = bytearray(g)
        kind = i % 4
        if kind == 0:  # a count field overwritten
            at, width = fields[int(rng.integers(len(fields)))]
            odd = [0, 1, 2, 255, 1 << 20, 1 << 31, 1 << 32, 1 << 40, 1 << 62, (1 << 64) - 1,
                   10**18]
            v = odd[int(rng.integers(len(odd)))]
            blob[at : at + width] = v.to_bytes(8, "little")[:width]
        elif kind == 1:  # a truncation
            blob = blob[: int(rng.integers(0, len(g)))]
        else:  # bit flips in the header, metadata and tensor table
            for _ in range(int(rng.integers(1, 4))):
                bit = int(rng.integers(8 * meta_end))
                blob[bit // 8] ^= 0x80 >> (bit % 8)
        case("GGUF", f"gguf#{i} kind{kind}", "gguf", {"m.gguf": bytes(blob)},
             lambda d, i=i: _use_gguf(d / "m.gguf", full=i % 8 == 2))

    # -- crafted: the inputs issue 21 reported, and their neighbours
    for label, base, files, use in _crafted(bases, g, cfg, index):
        case("crafted", label, base, files, use)

    total = {k: sum(c[k] for c in counts.values()) for k in ("tried", "refused", "loaded")}
    return {"seed": SEED, "counts": counts, "total": total, "failures": failures,
            "slowest": {"seconds": round(slowest[0], 3), "case": slowest[1]},
            "address_space_limit_mib": limit >> 20, "baseline_mib": baseline >> 20}


def _gguf_with_array(g: bytes, itype: int, count: int, payload: bytes) -> bytes:
    """`g` with one more metadata key: an array of `count` items of type `itype`."""
    n_keys = struct.unpack_from("<Q", g, 16)[0]
    key = b"tokenizer.ggml.extra"
    kv = struct.pack("<Q", len(key)) + key + struct.pack("<IIQ", 9, itype, count) + payload
    return g[:16] + struct.pack("<Q", n_keys + 1) + g[24:24] + kv + g[24:]


def _crafted(bases, g, cfg, index):
    from pipeline.models.weights import INDEX

    def folder(d):
        return _use_folder(d, full=True)

    def gguf(d):
        return _use_gguf(d / "m.gguf", full=True)

    deep = b"[" * 100_000 + b"]" * 100_000
    yield "gguf 3M-item uint8 array", "gguf", {"m.gguf": _gguf_with_array(
        g, 0, 3 << 20, bytes(3 << 20))}, gguf
    yield "gguf array count 2^62", "gguf", {"m.gguf": _gguf_with_array(g, 0, 1 << 62, b"")}, gguf
    yield "gguf string array count 2^40", "gguf", {"m.gguf": _gguf_with_array(
        g, 8, 1 << 40, b"\0" * 64)}, gguf
    yield "gguf nested arrays", "gguf", {"m.gguf": _gguf_with_array(
        g, 9, 4, struct.pack("<IQ", 9, 1) * 4)}, gguf
    yield "gguf key count 2^63", "gguf", {"m.gguf": g[:16] + struct.pack("<Q", 1 << 63)
                                          + g[24:]}, gguf
    for n in (10_000, 10**6, 10**12):
        yield f"config layers {n}", "single", {"config.json": json.dumps(
            {**cfg, "num_hidden_layers": n}).encode()}, folder
    for name in ("config.json", INDEX, "tokenizer_config.json", "tokenizer.json",
                 "special_tokens_map.json"):
        base = "sharded" if name == INDEX else "single"
        yield f"deep {name}", base, {name: deep}, folder
    yield "index to pytorch_model.bin", "sharded", {INDEX: json.dumps(
        {"metadata": {}, "weight_map": {k: "pytorch_model.bin" for k in index["weight_map"]}}
    ).encode(), "pytorch_model.bin": b"\x80\x04K\x01."}, folder
    yield "index shard with NUL", "sharded", {INDEX: json.dumps(
        {"metadata": {}, "weight_map": {k: "a\0.safetensors" for k in index["weight_map"]}}
    ).encode()}, folder
    yield "index digests lie", "sharded", {INDEX: json.dumps(
        {**index, "metadata": {**index["metadata"], "hwq_tensor_sha256": {
            k: "0" * 64 for k in index["weight_map"]}}}).encode()}, folder


# ---------------------------------------------------------------------------------------------
# the test


@pytest.mark.timeout(300)
def test_fuzz_model_folders_refuse_cleanly(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", PYTHONHASHSEED="0",
               RUST_BACKTRACE="0", TOKENIZERS_PARALLELISM="false")
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, __file__, str(tmp_path)], env=env, capture_output=True,
                       text=True, timeout=280)
    elapsed = time.perf_counter() - t0
    tail = "\n".join(p.stderr.splitlines()[-20:])
    assert p.returncode == 0, f"fuzz child exited {p.returncode}; last cases:\n{tail}"
    summary = json.loads(p.stdout.splitlines()[-1])
    print(f"\nfuzz ({elapsed:.1f} s):", json.dumps(summary, indent=1))
    assert not summary["failures"], "\n\n".join(summary["failures"][:10])
    counts = summary["counts"]
    planned = N_HEADER_JSON + N_HEADER_BYTES + N_INDEX + N_CONFIG + N_TOKENIZER + N_GGUF
    assert summary["total"]["tried"] >= planned
    # Each category reaches past the first check: some mutations load, many are refused.
    for cat in ("safetensors headers", "indexes", "config.json", "tokenizer files", "GGUF"):
        assert counts[cat]["refused"] > 0 and counts[cat]["loaded"] > 0, (cat, counts[cat])
    assert counts["crafted"]["refused"] == counts["crafted"]["tried"]


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    print(json.dumps(fuzz(Path(sys.argv[1]))))
