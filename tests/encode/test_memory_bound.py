"""The decoder's memory bound (docs/FORMAT.md, section 6, "Working memory"), checked under an
address-space limit: a child process warms up (numba kernels loaded), then caps its address
space at the warmed-up peak plus the bound :func:`pipeline.encode.limits.working_bound`
computes from the header, and reads the crafted file. A reader that allocates beyond the
bound dies with MemoryError; one within it decodes or refuses cleanly."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import hostile_files as hf
import numpy as np
import pytest

from pipeline.encode import HwqReader, TensorEntry, write_hwq
from pipeline.encode.limits import TABLE_CACHE_BYTES, TableCache, chunk_rows, working_bound

_CHILD = r"""
import json, resource, sys
from pathlib import Path
from pipeline.encode import HwqFormatError, read_hwq

path, warm, extra, kw = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
read_hwq(warm)  # kernels compiled or loaded, imports done
peak = next(int(l.split()[1]) * 1024 for l in Path("/proc/self/status").read_text().splitlines()
            if l.startswith("VmPeak:"))
resource.setrlimit(resource.RLIMIT_AS, (peak + extra, peak + extra))
try:
    out = read_hwq(path, **kw)
    print(json.dumps({"result": "ok", "values": sum(int(a.size) for a in out.values())}))
except HwqFormatError as exc:
    print(json.dumps({"result": "refused", "message": str(exc)}))
except MemoryError:
    print(json.dumps({"result": "MemoryError"}))
"""


def _read_capped(path, warm, **kw) -> dict:
    """Read ``path`` in a child whose address space may grow by the documented bound only."""
    r = HwqReader(path, max_output_bytes=kw.get("max_output_bytes"))
    bound = working_bound(r._h.tensors.values(), r.file_bytes, r.decoded_bytes())
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    p = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path), str(warm), str(bound), json.dumps(kw)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return dict(json.loads(p.stdout.splitlines()[-1]), bound=bound)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("membound")


def _warm(folder, name, **kw):
    p = folder / f"warm-{name}.hwq"
    if not p.exists():
        write_hwq(p, [TensorEntry.quantized("w", (4, 8), np.arange(32) % 2, "c",
                                            dtype="float16")],
                  {"c": np.array([0.0, 1.0], np.float32)}, **kw)  # fmt: skip
    return p


def test_context_indices_decode_within_the_bound(folder):
    """16 M context-coded indices from a 1 KB file (32 MiB of float16 output): the bound is
    ~320 MiB; int64 rows and codes per weight (the old reader) needed ~560 MiB."""
    p = folder / "ctx.hwq"
    p.write_bytes(hf.context_index_file(folder, rows=4096, cols=4096))
    assert p.stat().st_size < 4096
    got = _read_capped(p, _warm(folder, "ctx", indices="context", coder="ans"))
    assert got["result"] == "ok" and got["values"] == 4096 * 4096, got
    assert got["bound"] < 400 << 20


def test_per_chunk_rans_tables_decode_within_the_bound(folder):
    """1,024 chunks each with its own 16-bit rANS table (~110 KB of file, 2 KiB of output):
    the old reader kept every table's decoder (~330 MiB); the cache keeps 64 MiB."""
    p = folder / "lt16.hwq"
    p.write_bytes(hf.level_table_file(folder, prob_bits=16))
    warm = _warm(folder, "ans", coder="ans")
    got = _read_capped(p, warm)
    assert got["result"] == "ok" and got["values"] == 32 * 32, got
    r = HwqReader(p)
    r.read()
    # Each built when validated and (evicted meanwhile) when its chunk decodes: twice at most.
    assert 1024 <= r._tables.built <= 2048 and r._tables.peak <= TABLE_CACHE_BYTES


def test_tiny_tables_at_20_bits_are_refused_within_the_bound(folder):
    """The issue's file: 2-symbol tables at 20 bits, one per chunk (9.4 GB for the old
    reader's cached decoders); refused from the first table's byte."""
    p = folder / "lt20.hwq"
    p.write_bytes(hf.level_table_file(folder, prob_bits=20))
    got = _read_capped(p, _warm(folder, "ans", coder="ans"))
    assert got["result"] == "refused" and "prob_bits 20 > 16" in got["message"], got


def test_a_wide_ragged_codebook_is_refused_within_the_bound(folder):
    """A few hundred bytes declaring a [16, 2**22] ragged codebook: ~640 MiB to expand (the
    old reader tried); its decoded size is checked against the output cap first."""
    p = folder / "wide-cb.hwq"
    p.write_bytes(hf.wide_ragged_codebook_file(folder))
    got = _read_capped(p, _warm(folder, "ans", coder="ans"))
    assert got["result"] == "refused" and "codebooks would take" in got["message"], got


def test_identical_tables_are_built_once():
    cache = TableCache(budget=1 << 20)
    built = []
    for key in ["a", "b", "a", "a", "b"]:
        cache.get(key, lambda key=key: built.append(key) or hf_table(len(built)))
    assert built == ["a", "b"] and len(cache) == 2
    # Over the budget: least recently used out, the newest kept whatever its size.
    big = TableCache(budget=100)
    for key in "abc":
        big.get(key, lambda: hf_table(1))
    assert len(big) == 1 and big.built == 3


def hf_table(seed):
    from pipeline.encode.ans_table import AnsTable

    return AnsTable.from_counts(np.random.default_rng(seed).integers(1, 9, 5))


def test_chunk_rows_are_narrow_and_right():
    pos = np.array([5, 9, 10, 31, 40, 41, 99], np.int64)
    r = chunk_rows(pos, 2, 4, 10)
    assert r.dtype == np.uint32 and r.tolist() == [0, 2, 3, 3]
    d = chunk_rows(None, 25, 30, 10)
    assert d.dtype == np.uint32 and d.tolist() == [(25 + i) // 10 - 2 for i in range(30)]
    assert chunk_rows(None, 0, 0, 10).size == 0


def test_map_fn_batches_bound_symbols_and_tables():
    from pipeline.encode.limits import batches, table_bytes

    t1, t2 = hf_table(1), hf_table(2)
    jobs = [("table", b"", 40, t1), ("table", b"", 40, t1), ("table", b"", 40, t2),
            ("table", b"", 500, t2), ("table", b"", 1, t1)]  # fmt: skip
    groups = list(batches(jobs, lambda j: j[2], lambda j: [j[3]], max_symbols=100,
                          max_table_bytes=table_bytes(t1) + table_bytes(t2)))  # fmt: skip
    assert [len(g) for g in groups] == [2, 1, 1, 1]  # 120 > 100; one job always goes
    groups = list(batches(jobs, lambda j: j[2], lambda j: [j[3]], max_symbols=10**6,
                          max_table_bytes=table_bytes(t1)))  # fmt: skip
    assert [len(g) for g in groups] == [2, 2, 1]  # a second distinct table starts a group
