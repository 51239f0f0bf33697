"""Binned ECSQ against the exact solver: speed and the Lagrangian it gives up.

`quantize.ecsq_bins: N` iterates each row of at least 8·N weights on N bins of values (the
weights beyond mean ± 6σ one by one), then gives every weight its best level in one exact pass.
This script solves the same rows both ways at a few λ (synthetic Laplace weights with a few
outlier columns and a log-normal Hessian shared by the rows, as an activation estimator
gives) and prints ns/weight on one thread, the speed-up, the rate and the relative excess of
the Lagrangian Σ D + λ·bits over the exact solver's. Writes benchmarks/results/ecsq_bins.json.

    python benchmarks/ecsq_bins.py [--rows 256] [--cols 4096 11008] [--bins 128 256 512]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from pipeline.quantize.rows import ecsq_rows, lagrangian

ROOT = Path(__file__).resolve().parents[1]
LEVEL_BITS = 20.0


def rows(R: int, C: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    W = (rng.laplace(size=(R, C)) * 0.02).astype(np.float32)
    W[:, :4] *= 8  # a few outlier input channels, as language models have
    h = np.exp(rng.standard_normal((1, C))).astype(np.float32)
    return W, np.ascontiguousarray(np.broadcast_to(h, (R, C)))


def timed(W, H, lam, bins):
    t0 = time.perf_counter()
    r = ecsq_rows(W, H, lam, level_bits=LEVEL_BITS, bins=bins)
    return r, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--cols", type=int, nargs="+", default=[4096, 11008])
    ap.add_argument("--bins", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--lams", type=float, nargs="+", default=[1e-6, 1e-5, 1e-4])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ecsq_bins.json"))
    a = ap.parse_args()
    W, H = rows(8, 8192)
    for b in (0, a.bins[0]):  # compile the kernels
        ecsq_rows(W, H, 1e-5, level_bits=LEVEL_BITS, bins=b)
    out = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
           "load_start": os.getloadavg()[0], "settings": vars(a), "results": []}
    print("| cols | λ | solver | ns/weight | speed-up | index bits/weight | levels/row | "
          "Lagrangian vs exact |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|")
    for C in a.cols:
        W, H = rows(a.rows, C)
        for lam in a.lams:
            exact, te = timed(W, H, lam, 0)
            J0 = float(lagrangian(exact, lam, LEVEL_BITS).sum())
            for bins in [0, *a.bins]:
                r, t = (exact, te) if bins == 0 else timed(W, H, lam, bins)
                J = float(lagrangian(r, lam, LEVEL_BITS).sum())
                row = {"cols": C, "lam": lam, "bins": bins, "ns_per_weight": t / W.size * 1e9,
                       "speedup": te / t, "index_bits": float(r.entropy.mean()),
                       "levels": float(r.levels.mean()), "lagrangian_excess": J / J0 - 1}
                out["results"].append(row)
                print(f"| {C} | {lam:g} | {'exact' if bins == 0 else f'{bins} bins'} | "
                      f"{row['ns_per_weight']:.0f} | {row['speedup']:.1f} | "
                      f"{row['index_bits']:.3f} | {row['levels']:.1f} | "
                      f"{100 * row['lagrangian_excess']:+.2f} % |", flush=True)
    out["load_end"] = os.getloadavg()[0]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"load average {out['load_start']:.1f} → {out['load_end']:.1f}; wrote {a.out}")


if __name__ == "__main__":
    main()
