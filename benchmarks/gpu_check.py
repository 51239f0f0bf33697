"""The CUDA paths in one command: the default LeNet-5 config and the SmolLM2-135M config with
`executor.gpus_per_task=1`, each stage's seconds and peak GPU memory.

    make gpu-check                       # = python benchmarks/gpu_check.py
    python benchmarks/gpu_check.py --budget-s 480 --only lenet5

Meant for a machine with a GPU (it stops with exit status 2 and one line where torch sees
none). Each config runs as its own `hwq run` in a fresh store under `.cache/gpu_check/`, with
the settings below chosen so that both fit in `--budget-s` (default 8 minutes) on one GPU:
LeNet-5 trains 2 epochs on 12,000 images and fine-tunes half an epoch; SmolLM2 calibrates on
16 windows and evaluates 4 windows per text. Fine-tuning uses as many Ray Train workers as the
machine has GPUs (each worker asks for one). Per stage, from the run's report: seconds, the
largest CUDA allocator peak over the stage's worker processes (`memory.workers[].gpu_peak`),
the nodes its tasks ran on. Before the runs, the runtime's Triton kernel
(pipeline/runtime/triton_lut.py) on the GPU: random 2-, 3-, 4- and 8-bit packed matrices at
batch 1 and 16 against the float64 product (the largest error over its float32 bound; ≤ 1
passes), and the time of a 4096×4096 4-bit product. Writes benchmarks/results/gpu_check.json
and prints a table; a config that fails or runs out of time is recorded with its error, not
dropped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "gpu_check.json"

RUNS = {
    "lenet5": ("configs/lenet5_fmnist.yaml", [
        "data.train_samples=12000", "train.epochs=2", "prune.steps=1",
        "prune.retrain_epochs=1", "hessian.calibration_samples=2048", "finetune.epochs=0.5"]),
    "smollm2": ("configs/smollm2_135m.yaml", [
        "data.calibration_windows=16", "data.eval_max_windows=4", "finetune.batch_size=4"]),
}


def _gpu() -> dict | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    p = torch.cuda.get_device_properties(0)
    return {"name": p.name, "count": torch.cuda.device_count(),
            "memory_bytes": int(p.total_memory), "torch": torch.__version__,
            "cuda": torch.version.cuda}


def _stage_rows(report: dict) -> list[dict]:
    rows = []
    for name, s in sorted(report["stages"].items(), key=lambda kv: kv[1].get("order", 0)):
        workers = (s.get("memory") or {}).get("workers") or []
        gpu = [w["gpu_peak"] for w in workers if w.get("gpu_peak") is not None]
        rows.append({"stage": name, "cached": s["cached"], "seconds": s["seconds"],
                     "gpu_peak_bytes": max(gpu) if gpu else None,
                     "workers": len(workers)})
    return rows


def triton_check() -> dict:
    """The Triton lookup-table kernel on cuda:0 against the float64 product of the decoded
    matrix, and its speed on a 7B-sized square matrix."""
    import numpy as np
    import torch

    from pipeline.runtime.transcode import transcode_codes
    from pipeline.runtime.triton_lut import lut_matmul_triton

    out: dict = {"cases": []}
    rng = np.random.default_rng(0)
    worst = 0.0
    for k in (4, 8, 16, 40):  # levels a row -> 2, 3, 4, 8 bits
        for rows, cols, groups in ((33, 576, 1), (4096, 4096, 1), (257, 1024, 8)):
            cb = rng.normal(size=(rows * groups, k)).astype(np.float32)
            codes = rng.integers(0, k, rows * cols).astype(np.uint8)
            p = transcode_codes({"codes": codes, "positions": None, "codebook": cb,
                                 "shape": (rows, cols), "dtype": "float32"})
            t = np.arange(rows)[:, None] * groups + np.arange(cols)[None, :] // (cols // groups)
            w = cb[t, codes.reshape(rows, cols).astype(np.int64)].astype(np.float64)
            gp = type(p)(p.rows, p.cols, p.bits, p.group_size, p.idx.cuda(), p.tables.cuda(),
                         None, None, p.levels)
            for b in (1, 16):
                x = rng.normal(size=(b, cols)).astype(np.float32)
                y = lut_matmul_triton(torch.from_numpy(x).cuda(), gp).cpu().numpy()
                bound = (cols + 1) * 2.0**-23 * (np.abs(x) @ np.abs(w).T) + 1e-30
                err = float((np.abs(y - x.astype(np.float64) @ w.T) / bound).max())
                worst = max(worst, err)
                out["cases"].append({"bits": p.bits, "shape": [rows, cols], "groups": groups,
                                     "batch": b, "error_over_bound": round(err, 4)})
                if (rows, cols, k, groups) == (4096, 4096, 16, 1):
                    xt = torch.from_numpy(x).cuda()
                    for _ in range(3):
                        lut_matmul_triton(xt, gp)
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    for _ in range(50):
                        lut_matmul_triton(xt, gp)
                    torch.cuda.synchronize()
                    ms = (time.perf_counter() - t0) / 50 * 1e3
                    out[f"ms_4096x4096_4bit_batch{b}"] = round(ms, 4)
    out["worst_error_over_bound"] = round(worst, 4)
    out["ok"] = worst <= 1.0
    return out


def run_one(name: str, timeout_s: float, gpus: int) -> dict:
    config, sets = RUNS[name]
    store = ROOT / ".cache" / "gpu_check" / name
    shutil.rmtree(store, ignore_errors=True)
    overrides = [*sets, "executor.gpus_per_task=1", f"finetune.workers={max(gpus, 1)}"]
    cmd = [sys.executable, "-m", "pipeline.cli", "run", config, "--store", str(store)]
    for o in overrides:
        cmd += ["--set", o]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s,
                           env=dict(os.environ, PYTHONUNBUFFERED="1"))
        error = None if p.returncode == 0 else (p.stderr.strip().splitlines() or ["?"])[-1]
    except subprocess.TimeoutExpired:
        error = f"did not finish in {timeout_s:.0f} s"
    wall = time.perf_counter() - t0
    out = {"config": config, "overrides": overrides, "wall_s": round(wall, 1), "error": error}
    report = store / "report.json"
    if report.exists():
        rep = json.loads(report.read_text())
        out["stages"] = _stage_rows(rep)
        out["metrics"] = {k: v for k, v in rep["metrics"].items()
                          if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget-s", type=float, default=480,
                    help="seconds for all runs together (default 480: the 8-minute check)")
    ap.add_argument("--only", choices=sorted(RUNS), action="append",
                    help="run only this config (repeatable)")
    args = ap.parse_args(argv)
    gpu = _gpu()
    if gpu is None:
        print("gpu-check: error: torch sees no CUDA device; run it on a machine with a GPU",
              file=sys.stderr)
        return 2
    names = args.only or list(RUNS)
    deadline = time.monotonic() + args.budget_s
    result = {"gpu": gpu, "host": platform.node(), "loadavg_start": os.getloadavg(),
              "runs": {}}
    try:
        result["triton"] = triton_check()
    except Exception as e:  # recorded, as a failed run is
        result["triton"] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    print(f"gpu-check: triton kernel {result['triton']}", flush=True)
    for i, name in enumerate(names):
        left = deadline - time.monotonic()
        share = left / (len(names) - i)  # what is left, split over the runs still to come
        print(f"gpu-check: {name} (at most {share:.0f} s)", flush=True)
        result["runs"][name] = run_one(name, share, gpu["count"])
    result["loadavg_end"] = os.getloadavg()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    tmp = OUT.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, OUT)
    print(f"\n{gpu['name']} ×{gpu['count']}, torch {gpu['torch']}, CUDA {gpu['cuda']}\n")
    print("| config | stage | seconds | peak GPU memory MiB | workers |\n|---|---|---:|---:|---:|")
    for name, r in result["runs"].items():
        for s in r.get("stages", []):
            mib = f"{s['gpu_peak_bytes'] / 2**20:,.0f}" if s["gpu_peak_bytes"] else "–"
            print(f"| {name} | {s['stage']} | {s['seconds']:.1f} | {mib} | {s['workers']} |")
        if r["error"]:
            print(f"| {name} | (failed) | {r['wall_s']:.0f} | {r['error']} | |")
    print(f"\nwrote {OUT.relative_to(ROOT)}")
    ok = all(r["error"] is None for r in result["runs"].values()) and result["triton"]["ok"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
