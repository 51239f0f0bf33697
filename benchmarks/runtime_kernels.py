"""The runtime's lookup-table kernels against torch matmuls, and transcoding speed.

    python benchmarks/runtime_kernels.py [--repeats 7] [--shapes 4096x4096,11008x4096]
        [--bits 2,3,4] [--batches 1,16]

For each weight shape [out, in] (7B Llama shapes: attention 4096x4096, MLP up/gate
11008x4096) and packed width (random codes of 2**bits levels and per-row codebooks): batch-1
GEMV (decode) and a 16-token GEMM (prefill) with the fast int8 path (q8), the int8-level
fp32-activation path (f32a), and torch fp32 and bf16 matmuls on the dense weight (the same
at every width: measured once), at 1 and 2 threads. GB/s is
bytes of packed weights (indices + tables) the kernel reads per call; "x bf16" is torch bf16's
time over the kernel's. Transcoding: read_codes output to packed indices and tables (GB/s of
packed output, one thread), dense and 30%-pruned. Best of --repeats wall times; the load
average is recorded because the machine may be shared. Prints a table and writes
benchmarks/results/runtime_kernels.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from pipeline.runtime import kernels as K
from pipeline.runtime.transcode import transcode_codes


def best_of(repeats: int, fn) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _codes(rows: int, cols: int, density: float = 1.0, seed: int = 0, bits: int = 4) -> dict:
    """read_codes-like output: codes of 2**bits levels (one fewer when pruned, for the zero
    level), per-row codebooks."""
    rng = np.random.default_rng(seed)
    n = rows * cols
    positions = None
    if density < 1:
        positions = np.flatnonzero(rng.random(n) < density).astype(np.int64)
    m = n if positions is None else positions.size
    k = (1 << bits) - 1 if positions is not None else 1 << bits
    return {"codes": rng.integers(0, k, m).astype(np.uint8), "positions": positions,
            "codebook": rng.normal(size=(rows, 1 << bits)).astype(np.float32) * 0.02,
            "shape": (rows, cols), "dtype": "bfloat16"}  # fmt: skip


def bench_shape(rows: int, cols: int, repeats: int, bits_list=(4,), batches=(1, 16)) -> list[dict]:
    packed = {bits: transcode_codes(_codes(rows, cols, bits=bits)) for bits in bits_list}
    w = next(iter(packed.values())).dense_rows(0, rows)
    wb = w.bfloat16()
    out = []
    for b in batches:
        x = torch.randn(b, cols)
        xb = x.bfloat16()
        for threads in (1, 2):
            torch.set_num_threads(threads)
            row = {"shape": f"{rows}x{cols}", "batch": b, "threads": threads}
            t_bf16 = best_of(repeats, partial(torch.matmul, xb, wb.T))
            runs = {("torch fp32", None): partial(torch.matmul, x, w.T), ("torch bf16", None): None}
            for bits, p in packed.items():
                assert p.bits == bits
                runs[("q8", bits)] = partial(K.lut_matmul, x, p, path="q8", threads=threads)
                runs[("f32a", bits)] = partial(K.lut_matmul, x, p, path="f32a", threads=threads)
            for (name, bits), fn in runs.items():
                t = t_bf16 if name == "torch bf16" else best_of(repeats, fn)
                nbytes = (
                    packed[bits].nbytes
                    if bits is not None
                    else w.numel() * (4 if name == "torch fp32" else 2)
                )
                out.append({**row, "kernel": name, "bits": bits, "ms": t * 1e3,
                            "gb_s": nbytes / t / 1e9, "tokens_s": b / t,
                            "x_bf16": t_bf16 / t})  # fmt: skip
    return out


def bench_transcode(rows: int, cols: int, repeats: int, bits_list=(4,)) -> list[dict]:
    out = []
    for bits in bits_list:
        for density in (1.0, 0.7):
            rc = _codes(rows, cols, density, bits=bits)
            p = transcode_codes(rc)
            assert p.bits == bits
            t = best_of(repeats, partial(transcode_codes, rc))
            c0 = time.process_time()
            transcode_codes(rc)
            cpu = time.process_time() - c0
            out.append({"shape": f"{rows}x{cols}", "bits": bits, "density": density,
                        "packed_bytes": p.idx.numel() + 4 * p.tables.numel(), "s": t,
                        "gb_s": (p.idx.numel() + 4 * p.tables.numel()) / t / 1e9,
                        "cpu_s": cpu})  # fmt: skip
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--shapes", default="4096x4096,11008x4096")
    ap.add_argument("--bits", default="2,3,4", help="packed widths to measure")
    ap.add_argument("--batches", default="1,16", help="tokens a product")
    ap.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "runtime_kernels.json")
    )
    args = ap.parse_args(argv)
    lib = K.kernels()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    load0 = os.getloadavg()[0]
    bits = tuple(int(b) for b in args.bits.split(","))
    batches = tuple(int(b) for b in args.batches.split(","))
    gemv = [r for s in shapes for r in bench_shape(*s, args.repeats, bits, batches)]
    trans = [r for s in shapes for r in bench_transcode(*s, args.repeats, bits)]
    load1 = os.getloadavg()[0]
    print(
        f"kernels: {lib.path if lib else 'torch fallback'} (avx2={lib.avx2 if lib else False});"
        f" load average {load0:.1f} -> {load1:.1f} on {os.cpu_count()} CPUs"
    )
    print(
        f"{'shape':>10} {'b':>3} {'thr':>3} {'kernel':>11} {'bits':>4} {'ms':>8} {'GB/s':>6} "
        f"{'tok/s':>8} {'x bf16':>6}"
    )
    for r in gemv:
        print(
            f"{r['shape']:>10} {r['batch']:>3} {r['threads']:>3} {r['kernel']:>11} "
            f"{r['bits'] or '-':>4} {r['ms']:8.3f} {r['gb_s']:6.2f} {r['tokens_s']:8.1f} "
            f"{r['x_bf16']:6.2f}"
        )
    print(
        f"\n{'transcode':>10} {'bits':>4} {'density':>7} {'MB out':>7} {'s':>7} {'GB/s':>6} "
        f"{'cpu s':>6}"
    )
    for r in trans:
        print(
            f"{r['shape']:>10} {r['bits']:>4} {r['density']:7.1f} {r['packed_bytes'] / 1e6:7.1f} "
            f"{r['s']:7.3f} {r['gb_s']:6.2f} {r['cpu_s']:6.3f}"
        )
    res = {"gemv": gemv, "transcode": trans, "load_average": [load0, load1],
           "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
           "avx2": bool(lib and lib.avx2), "repeats": args.repeats}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    return res


if __name__ == "__main__":
    main()
