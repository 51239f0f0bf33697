"""Throughput of Hessian-weighted k-means: network scope (in-process and Ray actors) and
channel scope (one codebook per row).

Prints a table and writes benchmarks/results/kmeans_throughput.json. Network rows run
hw_kmeans with k clusters for exactly --iters Lloyd iterations (tol=0) on synthetic weights
(testkit.synthetic.synthetic_weights: Laplacian mixture, lognormal h) that every actor
generates for its own shard; "weights/s" counts N × iterations over the Lloyd loop only, the
init (best of n_init starts on a ≤1M-point sample) is reported separately. Memory is peak RSS (ru_maxrss) of the
driver (a high-water mark over the whole script, so later rows inherit earlier peaks) and of
the largest actor process. Channel rows run to each row's exact fixed point (≤ --iters);
for Ray tasks their time includes the init and the transfer of the matrix.

    python benchmarks/kmeans_throughput.py                       # 10M and 100M, 1 and 2 actors
    python benchmarks/kmeans_throughput.py --sizes 10e6 --actors 1 --channel 1024x1024
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _gib(b: float) -> float:
    return b / 2**30


def run_local(n: int, k: int, iters: int, n_init: int, seed: int, threads: int) -> dict:
    from pipeline.quantize import LocalBackend, hw_kmeans
    from testkit.synthetic import synthetic_weights

    w, h = synthetic_weights(0, n, seed)
    be = LocalBackend(w, h, threads=threads)
    res = hw_kmeans(be, None, k, n_init=n_init, max_iter=iters, tol=0.0, seed=seed)
    t = res.info["timings"]
    out = {"scope": "network", "where": f"local threads={threads}", "workers": threads, "n": n,
           "k": k, "iters": res.info["n_iter"], "init_s": t["init"], "lloyd_s": t["lloyd"],
           "final_s": t["final"], "weighted_distortion": res.weighted_distortion,
           "peak_rss_driver": _peak_rss(), "peak_rss_workers": []}
    del w, h, be, res
    return out


def run_ray(n: int, k: int, iters: int, n_init: int, seed: int, actors: int) -> dict:
    from pipeline.quantize import BLOCK, RayBackend, hw_kmeans, shard_ranges
    from testkit.synthetic import SyntheticLoader

    ranges = shard_ranges(n, actors, BLOCK)
    t0 = time.perf_counter()
    with RayBackend([SyntheticLoader(a, b, seed) for a, b in ranges], [a for a, _ in ranges],
                    actor_options={"num_cpus": 1}) as be:
        t_load = time.perf_counter() - t0
        res = hw_kmeans(be, None, k, n_init=n_init, max_iter=iters, tol=0.0, seed=seed)
        rss = be.peak_rss_bytes()
    t = res.info["timings"]
    return {"scope": "network", "where": f"ray actors={actors}", "workers": actors, "n": n,
            "k": k, "iters": res.info["n_iter"], "load_s": t_load, "init_s": t["init"],
            "lloyd_s": t["lloyd"], "final_s": t["final"],
            "weighted_distortion": res.weighted_distortion, "peak_rss_driver": _peak_rss(),
            "peak_rss_workers": rss}


def run_channel(rows: int, cols: int, k: int, iters: int, n_init: int, seed: int,
                tasks: int) -> dict:
    from pipeline.quantize import solve_channels
    from testkit.synthetic import synthetic_weights

    w, h = synthetic_weights(0, rows * cols, seed)
    W, H = w.reshape(rows, cols), h.reshape(rows, cols)
    t0 = time.perf_counter()
    if tasks == 0:
        res = solve_channels(W, H, k, n_init=n_init, max_iter=iters, tol=0.0, seed=seed)
        where, workers = "local", 1
    else:
        from pipeline.quantize import solve_channels_sharded

        res = solve_channels_sharded(W, H, k, n_tasks=tasks, n_init=n_init, max_iter=iters,
                                     tol=0.0, seed=seed)
        where, workers = f"ray tasks={tasks}", tasks
    total = time.perf_counter() - t0
    it = float(res.n_iter.mean())
    init = res.info["timings"]["init"] if tasks == 0 else float("nan")
    return {"scope": "channel", "where": where, "workers": workers, "n": rows * cols, "k": k,
            "iters": it, "init_s": init, "lloyd_s": total - (0 if tasks else init),
            "final_s": 0.0, "weighted_distortion": float(res.weighted_distortion.mean()),
            "peak_rss_driver": _peak_rss(), "peak_rss_workers": [], "note":
            "lloyd_s includes init for Ray tasks" if tasks else ""}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10e6,100e6", help="network-scope sizes, comma separated")
    ap.add_argument("--actors", default="1,2", help="Ray actor counts, comma separated")
    ap.add_argument("--local-threads", default="1", help="in-process rows ('' to skip)")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--n-init", type=int, default=4)
    ap.add_argument("--channel", default="4096x4096", help="rows x cols ('' to skip)")
    ap.add_argument("--channel-k", type=int, default=16)
    ap.add_argument("--channel-tasks", default="0,2", help="0 = in-process; n = Ray tasks")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" /
                                          "kmeans_throughput.json"))
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    def ints(s):
        return [int(float(x)) for x in s.split(",") if x.strip()]

    rows = []
    sizes, actors, threads = ints(args.sizes), ints(args.actors), ints(args.local_threads)
    need_ray = bool(actors and sizes) or any(t > 0 for t in ints(args.channel_tasks))
    if need_ray:
        from pipeline.executor import init_ray

        init_ray(num_cpus=max(actors + ints(args.channel_tasks) + [1]))
    for n in sizes:
        for t in threads:
            rows.append(run_local(n, args.k, args.iters, args.n_init, args.seed, t))
            _print_row(rows[-1])
        for a in actors:
            rows.append(run_ray(n, args.k, args.iters, args.n_init, args.seed, a))
            _print_row(rows[-1])
    if args.channel:
        r, c = (int(x) for x in args.channel.lower().split("x"))
        for t in ints(args.channel_tasks):
            rows.append(run_channel(r, c, args.channel_k, args.iters, args.n_init, args.seed, t))
            _print_row(rows[-1])
    for row in rows:
        row["weights_per_s"] = row["n"] * row["iters"] / row["lloyd_s"]
        row["weights_per_s_per_worker"] = row["weights_per_s"] / row["workers"]
    _print_table(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": "kmeans_throughput", "argv": sys.argv[1:], "cpus": os.cpu_count(),
           "machine": platform.platform(), "python": platform.python_version(),
           "loadavg": os.getloadavg(), "rows": rows}
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    tmp.replace(out)  # atomic: never a half-written result
    print(f"wrote {out}")
    return 0


def _print_row(r: dict) -> None:
    print(f"  done: {r['scope']} {r['where']} n={r['n']:,} in {r['lloyd_s']:.2f}s", flush=True)


def _print_table(rows: list[dict]) -> None:
    hdr = (f"{'scope':8} {'where':18} {'N':>12} {'k':>3} {'iters':>5} {'init s':>7} "
           f"{'lloyd s':>8} {'Mw/s':>8} {'Mw/s/wkr':>9} {'drv GiB':>8} {'wkr GiB':>8}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        wk = max(r["peak_rss_workers"], default=0)
        print(f"{r['scope']:8} {r['where']:18} {r['n']:>12,} {r['k']:>3} {r['iters']:>5.0f} "
              f"{r['init_s']:>7.2f} {r['lloyd_s']:>8.2f} {r['weights_per_s'] / 1e6:>8.1f} "
              f"{r['weights_per_s_per_worker'] / 1e6:>9.1f} {_gib(r['peak_rss_driver']):>8.2f} "
              f"{_gib(wk):>8.2f}")


if __name__ == "__main__":
    sys.exit(main())
