"""`hwq sweep`: many runs over one store, sharing every stage they have in common.

The runs are planned together. Stage by stage, each distinct stage key is computed once — as a
Ray task that drives that run up to that stage — and the distinct keys of one stage run in
parallel; runs that share a key (the same trained, pruned model and Hessian under a sweep of
quantizer settings) find it complete and reuse it. Then every run's report is written under
`<store>/sweeps/<name>/<run>/`, and the sweep's `sweep.json`, `sweep.md` and plots beside
them.
"""

from __future__ import annotations

import itertools
import logging
import re
import time
from typing import Any

from pipeline.config import ConfigError, RunConfig, load_config
from pipeline.stages import default_stages

__all__ = ["parse_grid", "expand", "sweep", "add_commands"]

log = logging.getLogger("hwq.sweep")


def _split_values(raw: str) -> list[str]:
    """Split on commas outside brackets/braces, so YAML maps and lists stay whole."""
    out, depth, cur = [], 0, []
    for ch in raw:
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        if ch == "," and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return [v.strip() for v in out if v.strip()]


def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
    """['quantize.k=4,8', ...] → [('quantize.k', ['4', '8']), ...]."""
    grid = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--grid {item!r}: expected key=v1,v2,... e.g. quantize.k=4,8,16")
        key, raw = item.split("=", 1)
        values = _split_values(raw)
        if not values:
            raise ConfigError(f"--grid {item!r}: no values")
        grid.append((key.strip(), values))
    return grid


def expand(grid: list[tuple[str, list[str]]]) -> list[list[str]]:
    """Cartesian product as lists of `key=value` overrides."""
    keys = [k for k, _ in grid]
    return [[f"{k}={v}" for k, v in zip(keys, combo, strict=True)]
            for combo in itertools.product(*(vals for _, vals in grid))]


def run_id(i: int, point: list[str]) -> str:
    parts = [re.sub(r"[^A-Za-z0-9.=_-]+", "", p.split(".", 1)[-1]) for p in point]
    return f"{i:03d}-" + "_".join(parts)[:80] if parts else f"{i:03d}"


def _stage_task(cfg: RunConfig, until: str, stages=None) -> dict:
    from pipeline import driver

    return driver.run(cfg, until=until, init_executor=False, stages=stages)["stages"][until]


def _concurrency(stage: str, cfgs: list[RunConfig]) -> int:
    """How many runs of `stage` may go at once. Fine-tunes gang-schedule a worker group each
    (Ray Train waits for all its CPUs at once): more groups than fit would starve each other,
    so they go in waves. Other stages queue their Ray tasks without such deadlines."""
    import ray

    if stage != "finetune" or not cfgs:
        return max(1, len(cfgs))
    cpus = int(ray.cluster_resources().get("CPU", 1))
    return max(1, cpus // max(c.finetune.workers for c in cfgs))


def _bounded(task, cfgs: list[RunConfig], stage: str, limit: int, stages=None) -> None:
    """Run `task(cfg, stage)` for every cfg, at most `limit` at a time; fail on the first
    error (the runs already finished keep their complete stages in the store)."""
    import ray

    pending, queue = [], list(cfgs)
    while queue or pending:
        while queue and len(pending) < limit:
            pending.append(task.remote(queue.pop(0), stage, stages))
        done, pending = ray.wait(pending, num_returns=1)
        ray.get(done)


def sweep(config: str | None, points: list[list[str]], *, name: str = "sweep",
          base: list[str] | None = None, skip_invalid: bool = False,
          parallel: bool = True, stages=None) -> dict[str, Any]:
    """Run every point (a list of overrides on top of `config` + `base`) into one store.

    Returns {"name", "seconds", "stage_counts", "runs": [{"run", "settings", "metrics",
    "stages"}]} — also written as `<store>/sweeps/<name>/sweep.json`.
    stages: the stage graph (default: the pipeline's); parallel=False runs in this process.
    """

    from pipeline import driver
    from pipeline.executor import init_ray, remote
    from pipeline.graph import plan

    base = list(base or [])
    cfgs, kept = [], []
    for p in points:
        try:
            cfgs.append(load_config(config, base + p))
            kept.append(p)
        except ConfigError as e:
            if not skip_invalid:
                raise ConfigError(f"sweep point {p}: {e}") from None
            log.warning("skipping invalid point %s: %s", p, str(e).splitlines()[-1].strip())
    if not cfgs:
        raise ConfigError("the sweep has no valid point")
    urls = {c.store.url for c in cfgs}
    if len(urls) != 1:
        raise ConfigError(f"a sweep shares one store; the points name several: {sorted(urls)}")
    t0 = time.perf_counter()
    init_ray(cfgs[0].executor.address, cfgs[0].executor.num_cpus)
    store = driver.open_store(cfgs[0])
    plans = [plan(c, stages if stages is not None else default_stages()) for c in cfgs]
    order: list[str] = []
    for pl in plans:
        for p in pl:
            if p.stage.name not in order:
                order.append(p.stage.name)
    counts = {}
    task = remote(_stage_task, cpus=0)  # a coordinator: its stages' own tasks take the CPUs
    for stage in order:
        first: dict[str, int] = {}
        for i, pl in enumerate(plans):
            for p in pl:
                if p.stage.name == stage:
                    first.setdefault(p.key, i)
        done = {k for k in first
                if store.exists(f"stages/{stage}-{k}/{driver.MANIFEST}")}
        users = sum(1 for pl in plans if any(p.stage.name == stage for p in pl))
        counts[stage] = {"runs": users, "distinct": len(first), "cached": len(done)}
        log.info("sweep %s: stage %-9s %d runs share %d distinct keys (%d already in the store, "
                 "%d cache hits)", name, stage, users, len(first), len(done),
                 users - len(first) + len(done))
        todo = [cfgs[i] for k, i in first.items() if k not in done]
        if parallel:
            _bounded(task, todo, stage, _concurrency(stage, todo), stages)
        else:
            for c in todo:
                driver.run(c, until=stage, init_executor=False, stages=stages)
    runs = []
    for i, (c, p) in enumerate(zip(cfgs, kept, strict=True)):
        rid = run_id(i, p)
        report = driver.run(c, report_prefix=f"sweeps/{name}/{rid}", init_executor=False,
                            stages=stages)
        runs.append({"run": rid, "settings": dict(x.split("=", 1) for x in p),
                     "metric": report.get("metric", {"name": "accuracy", "direction": "higher"}),
                     "metrics": report["metrics"], "stages": report["stages"]})
    result = {"name": name, "seconds": round(time.perf_counter() - t0, 3),
              "stage_counts": counts, "runs": runs}
    store.write_json(f"sweeps/{name}/sweep.json", result)
    from pipeline.plots import sweep_markdown

    store.write_text(f"sweeps/{name}/sweep.md", sweep_markdown(result, store, f"sweeps/{name}"))
    log.info("sweep %s: %d runs in %.1f s → %s", name, len(runs), result["seconds"],
             store.full_url(f"sweeps/{name}/sweep.md"))
    return result


def _cmd_sweep(args) -> int:
    from pipeline.executor import shutdown_ray

    sets = list(args.set or [])
    if args.store:
        sets.append(f"store.url={args.store}")
    points = expand(parse_grid(args.grid))
    try:
        res = sweep(args.config, points, name=args.name, base=sets,
                    skip_invalid=args.skip_invalid)
    finally:
        shutdown_ray()
    print(f"{len(res['runs'])} runs in {res['seconds']:.1f} s")
    for stage, c in res["stage_counts"].items():
        print(f"  {stage:<9} {c['runs']:>3} runs, {c['distinct']:>3} computed or found, "
              f"{c['runs'] - c['distinct'] + c['cached']:>3} cache hits")
    return 0


def add_commands(sub) -> None:
    s = sub.add_parser(
        "sweep", help="run the cartesian product of settings over one shared store",
        description="Run every combination of --grid values as a run in one store. Stages "
        "the runs share (train, prune, hessian under a quantizer sweep) are computed once; "
        "distinct stage keys run in parallel on Ray. Writes sweeps/NAME/sweep.json, sweep.md "
        "and plots under the store.")
    s.add_argument("config", help="base YAML run config")
    s.add_argument("--grid", action="append", required=True, metavar="KEY=V1,V2,...",
                   help="a swept setting (repeatable; the sweep is their cartesian product)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a fixed override for every run")
    s.add_argument("--store", metavar="URL", help="the shared run root")
    s.add_argument("--name", default="sweep", help="folder under <store>/sweeps/")
    s.add_argument("--skip-invalid", action="store_true",
                   help="skip combinations the config rejects instead of failing")
    s.set_defaults(func=_cmd_sweep)
