"""Throughput of the diagonal-Hessian estimators on LeNet-5 / Fashion-MNIST.

For each estimator: samples per second, and the cost as a ratio to one plain batched
forward+backward of the mean loss over the same samples, measured in the same run and
interleaved (so machine load hits both alike). Then the whole sharded stage (P partitions ×
G groups of Ray tasks, tree reduce) with 1 and 2 Ray workers (CPUs of the embedded Ray).

Timings are CPU time of this process (`time.process_time`) for the in-process rows — robust
to other load on a shared machine — and wall time for the Ray rows.

    python benchmarks/hessian_throughput.py                 # 2,048 samples, batch 256
    python benchmarks/hessian_throughput.py --samples 512 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.data import batches, load_split  # noqa: E402
from pipeline.hessian.estimators import adam_diag, estimate_diag  # noqa: E402
from pipeline.models import build  # noqa: E402

CASES = [("fisher", "mc", 1), ("ggn", "mc", 1), ("ggn", "exact", 1), ("hutchinson", "mc", 1)]


def plain_pass(model, data):
    for x, y in data:
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()


def cpu_time(fn) -> float:
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def in_process(samples: int, batch: int, repeats: int, threads: int) -> list[dict]:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build("lenet5").eval()
    split = load_split(args.data, "train", limit=samples)
    data = list(batches(split, batch))
    plain, per = [], {c: [] for c in CASES}
    for _ in range(repeats):  # interleaved: load drifts hit every case alike
        plain.append(cpu_time(lambda: plain_pass(model, data)))
        for est, mode, ns in CASES:
            per[(est, mode, ns)].append(cpu_time(
                lambda e=est, m=mode, n=ns: estimate_diag(model, data, e, mode=m, n_samples=n)))
    base = statistics.median(plain)
    rows = [{"estimator": "plain fwd+bwd", "threads": threads, "seconds": base,
             "samples_per_s": samples / base, "ratio": 1.0}]
    for (est, mode, _ns), ts in per.items():
        t = statistics.median(ts)
        name = f"{est}{'/' + mode if est == 'ggn' else ''}"
        rows.append({"estimator": name, "threads": threads, "seconds": t,
                     "samples_per_s": samples / t, "ratio": t / base})
    # adam: no data pass at all (the paper's free alternative).
    v = {n: torch.rand_like(p) for n, p in model.named_parameters()}
    t = statistics.median(cpu_time(lambda: adam_diag(v, 1000, 0.999)) for _ in range(repeats))
    rows.append({"estimator": "adam sqrt(v)", "threads": threads, "seconds": t,
                 "samples_per_s": None, "ratio": t / base})
    return rows


def ray_stage(samples: int, batch: int, cpus: int) -> dict:
    """The sharded stage end to end on an embedded Ray with `cpus` CPUs (wall time)."""
    from pipeline.config import load_config
    from pipeline.executor import init_ray, shutdown_ray
    from pipeline.graph import StageContext
    from pipeline.hessian.stage import HESSIAN
    from pipeline.store import StageDir, Store

    init_ray(num_cpus=cpus)
    try:
        store = Store(tempfile.mkdtemp(prefix="hwq-hbench-"))
        src = StageDir(store, "train", "bench")
        torch.manual_seed(0)
        src.write_safetensors("model.safetensors", build("lenet5").state_dict())
        src.outputs = src.hash_outputs()
        cfg = load_config(str(ROOT / "configs/lenet5_fmnist.yaml"), [
            "prune.enabled=false", f"hessian.calibration_samples={samples}",
            f"hessian.batch_size={batch}", f"hessian.partitions={cpus}", "hessian.groups=1",
            f"data.root={args.data}"])
        t0 = time.perf_counter()
        HESSIAN.run(StageContext(cfg, store, StageDir(store, "hessian", f"b{cpus}"),
                                 {"train": src}))
        wall = time.perf_counter() - t0
    finally:
        shutdown_ray()
    return {"estimator": "ggn/mc stage on Ray", "workers": cpus, "seconds": wall,
            "samples_per_s": samples / wall}


def main() -> None:
    global args
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--ray-samples", type=int, default=10000,
                    help="calibration samples for the Ray stage rows (the default config's)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/hessian_throughput.json"))
    args = ap.parse_args()
    rows = in_process(args.samples, args.batch, args.repeats, 1)
    ray_rows = [ray_stage(args.ray_samples, args.batch, c) for c in (1, 2)]
    print(f"LeNet-5, {args.samples} Fashion-MNIST samples, batch {args.batch}, CPU time, "
          f"median of {args.repeats}")
    print(f"{'estimator':<22} {'samples/s':>10} {'× plain pass':>13}")
    for r in rows:
        sps = f"{r['samples_per_s']:.0f}" if r["samples_per_s"] else "–"
        print(f"{r['estimator']:<22} {sps:>10} {r['ratio']:>13.2f}")
    print(f"\n{'sharded stage (wall)':<22} {'workers':>8} {'seconds':>9} {'samples/s':>10}")
    for r in ray_rows:
        print(f"{r['estimator']:<22} {r['workers']:>8} {r['seconds']:>9.1f} "
              f"{r['samples_per_s']:>10.0f}")
    result = {"benchmark": "hessian_throughput", "samples": args.samples, "batch": args.batch,
              "machine": {"cpus": torch.get_num_threads(), "python": platform.python_version(),
                          "torch": torch.__version__},
              "in_process": rows, "ray_stage": ray_rows,
              "goal": "ggn mc (1 sample) and fisher <= 1.5x the plain pass"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
