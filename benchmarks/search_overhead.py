"""What one λ evaluation of the quantize stage's search costs in Ray: a task per block against
`executor.BlockMap`'s few tasks over size-balanced runs of the blocks.

    python benchmarks/search_overhead.py [--blocks 224] [--rows 5] [--cols 7200]

The blocks stand for the λ search's sample of a 7B-shaped model (224 tensors, about 8 M
weights together): random weights and Hessians, ECSQ with 256 bins as `make bench-scale` runs
it. Each way is timed three times on an embedded local Ray (the first call includes starting
the workers), beside the same evaluation in this process on one thread. Prints a table and
writes benchmarks/results/search_overhead.{json,md} with the load average.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, default=224)
    ap.add_argument("--rows", type=int, default=5)
    ap.add_argument("--cols", type=int, default=7200)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "search_overhead"))
    a = ap.parse_args()

    import numpy as np

    from pipeline import executor
    from pipeline.quantize.rate import RowBlock, _eval_block

    load0 = os.getloadavg()[0]
    rng = np.random.default_rng(0)
    blocks = [RowBlock(rng.standard_normal((a.rows, a.cols)).astype(np.float32) * 0.02,
                       rng.gamma(2.0, 1.0, (a.rows, a.cols)).astype(np.float32) * 1e-4, a.rows * i)
              for i in range(a.blocks)]
    fn = functools.partial(_eval_block, lam=1e-9, method="ecsq", full=False,
                           opts={"k_max": 64, "iters": 50, "seed": 0, "bins": 256,
                                 "level_bits": 20.0})
    t0 = time.perf_counter()
    for b in blocks:
        fn(b)
    local = time.perf_counter() - t0

    import ray

    executor.init_ray()  # the embedded local Ray hwq runs on (its private temp folder)
    try:
        per_block = executor.remote(executor._apply_blocks, cpus=1)
        refs = [ray.put(b) for b in blocks]
        old = []
        for _ in range(3):
            t0 = time.perf_counter()
            ray.get([per_block.remote(fn, r) for r in refs])
            old.append(time.perf_counter() - t0)
        bm = executor.BlockMap()
        new = []
        for _ in range(3):
            t0 = time.perf_counter()
            bm(fn, blocks)
            new.append(time.perf_counter() - t0)
    finally:
        ray.shutdown()
    weights = a.blocks * a.rows * a.cols
    res = {"blocks": a.blocks, "rows": a.rows, "cols": a.cols, "weights": weights,
           "cpus": os.cpu_count(), "in_process_one_thread_s": local,
           "task_per_block_s": old, "blockmap_s": new,
           "loadavg_start": load0, "loadavg_end": os.getloadavg()[0]}
    md = "\n".join([
        f"# One λ evaluation: {a.blocks} blocks of {a.rows} × {a.cols} ({weights / 1e6:.1f} M "
        f"weights), ECSQ with 256 bins, {os.cpu_count()} CPUs",
        "",
        "| way | seconds (3 calls) |",
        "|---|---|",
        f"| in this process, one thread | {local:.2f} |",
        f"| a Ray task per block | {', '.join(f'{t:.2f}' for t in old)} |",
        f"| BlockMap (runs of blocks) | {', '.join(f'{t:.2f}' for t in new)} |",
        "",
        f"Load average {load0:.2f} at the start, {res['loadavg_end']:.2f} at the end. The first "
        "call of each way includes starting its workers.",
        "",
    ])
    print(md)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    out.with_suffix(".md").write_text(md)


if __name__ == "__main__":
    main()
