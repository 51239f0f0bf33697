"""The driver: plans the stage graph, skips what the store already holds, runs the rest.

A stage's key is a digest of (its name, format version, the config sections that decide its
output, its inputs' keys). Its files live under `<root>/stages/<name>-<key>/`, and its
`manifest.json` — written last — lists every file's sha256. So:

- a rerun whose stage key exists and verifies is a cache hit (nothing recomputed);
- a sweep over quantizer settings shares the train/prune/hessian folders;
- a run killed inside a stage left no manifest there, and resumes at that stage: in its
  folder, reusing the units the stage recorded as finished (pipeline/units.py);
- `--force NAME` reruns NAME and everything downstream of it, and so does a stage whose
  inputs were recomputed in this run.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import logging
import platform
import re
import time
from collections.abc import Iterable
from typing import Any

import yaml

from pipeline.config import RunConfig, digest
from pipeline.graph import Stage, StageContext, StagePlan, plan
from pipeline.manifest import (
    MANIFEST,
    MAX_MANIFEST_BYTES,
    Manifest,
    ManifestInvalid,
    parse_manifest,
)
from pipeline.memory import peak_rss
from pipeline.stages import default_stages
from pipeline.store import ArtifactError, StageDir, Store
from pipeline.units import keep_recorded

__all__ = ["run", "status", "run_state", "open_store", "check_against_model"]

log = logging.getLogger("hwq")

RUN_INDEX = "run.json"


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("hwq", "torch", "ray", "deepspeed", "numpy", "pyarrow"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def open_store(cfg: RunConfig) -> Store:
    return Store(cfg.store.url, cfg.store.storage_options())


def _read_manifest(store: Store, sd: StageDir, p: StagePlan, cfg: RunConfig
                   ) -> tuple[Manifest | None, str | None]:
    """The stage's manifest if it validates (else None), and why not when one exists."""
    rel = sd.rel(MANIFEST)
    if not store.exists(rel):
        return None, None
    try:
        data = store.read_bytes(rel, MAX_MANIFEST_BYTES)
    except ArtifactError as e:  # too large, or not a regular file
        return None, str(e)
    try:
        return parse_manifest(data, stage=p.stage.name, key=p.key, version=p.stage.version,
                              inputs=p.inputs, required=p.stage.outputs(cfg)), None
    except ManifestInvalid as e:
        return None, str(e)


def _downstream(stages: list[StagePlan], names: Iterable[str]) -> set[str]:
    closure = set(names)
    for p in stages:
        if closure & set(p.inputs):
            closure.add(p.stage.name)
    return closure


def run(
    cfg: RunConfig,
    *,
    force: Iterable[str] = (),
    stages: list[Stage] | None = None,
    report_prefix: str = "",
    init_executor: bool = True,
    until: str | None = None,
    out: str | None = None,
    hf_out: bool = False,
) -> dict[str, Any]:
    """Run every enabled stage not already complete in the store; write the report.

    force: stage names to recompute (with everything downstream).
    report_prefix: folder (relative to the store root) for config/report files, so several
        runs (a sweep) can share one store's stage cache.
    until: run the stages up to and including this one, and write no report.
    out, hf_out: copy the final .hwq (and the decoded model folder) there (pipeline/outputs.py).
    Returns the report (the content of report.json).
    """
    from pipeline.models.source import resolve_residency
    from pipeline.preflight import check_before_work

    cfg = resolve_residency(cfg)  # model.residency auto -> resident or streamed, keyed as such
    check_before_work(cfg)  # the mistakes the config and files show, before any work
    store = open_store(cfg)
    plans = plan(cfg, stages if stages is not None else default_stages())
    names = [p.stage.name for p in plans]
    unknown = [f for f in force if f not in names]
    if unknown:
        raise ValueError(f"--force {unknown[0]}: not a stage of this run (stages: {names})")
    forced = _downstream(plans, force)
    if until is not None:
        if until not in names:
            raise ValueError(f"until={until}: not a stage of this run (stages: {names})")
        plans = plans[: names.index(until) + 1]

    pre = f"{report_prefix.strip('/')}/" if report_prefix else ""
    from pipeline.outputs import check_publishable

    check_publishable(cfg, out, hf_out)
    store.check_access()
    check_against_model(cfg)
    store.write_text(f"{pre}config.yaml", yaml.safe_dump(cfg.redacted(), sort_keys=False))
    from pipeline.executor import configure

    configure(cfg.executor)
    executor = _Executor(cfg, store, init_executor)
    if cfg.executor.address is not None or not init_executor:
        # A cluster is joined (and checked) before any stage, cached or not; a Ray the caller
        # started (a batch, a sweep) costs nothing to use. Only an embedded Ray this run
        # would start waits for a stage that computes.
        executor.start()

    log.info("run %s: %d stages, %s model, store %s", cfg.name, len(plans),
             cfg.model.residency, store.url)
    index = {"config_digest": digest(cfg), "stages": [[p.stage.name, p.key] for p in plans]}
    if until is None:  # a partial run (a sweep's shared prefix) is no run of its own
        store.write_json(f"{pre}{RUN_INDEX}", {**index, "status": "running"})
    try:
        return _run_stages(cfg, store, plans, forced, executor, until, out, hf_out, pre, index)
    except BaseException as e:
        if until is None:
            _record_failure(store, f"{pre}{RUN_INDEX}", index, e)
        raise


def _record_failure(store: Store, rel: str, index: dict[str, Any], e: BaseException) -> None:
    """run.json of a run that failed: its stages, the one it failed in, the error line
    (`hwq status` shows them). Best effort: the error itself is what the caller must see."""
    from pipeline.error_lines import error_line

    state = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
    try:
        store.write_json(rel, {**index, "status": state,
                               "error": "interrupted" if state == "interrupted"
                               else error_line(e)})
    except Exception as w:  # noqa: BLE001 - e.g. the store itself is what failed
        log.warning("could not record the failed run in %s (%s)", rel, w)


class _Executor:
    """Ray for the stages that compute, started by the first of them: an embedded run whose
    stages are all cache hits (a scheduled rerun) never starts Ray (~10 s on 2 cores).
    `init`: start the embedded Ray (or join the config's cluster) here; otherwise the caller
    did."""

    def __init__(self, cfg: RunConfig, store: Store, init: bool):
        self.cfg, self.store, self.init = cfg, store, init
        self.started, self.ledger = False, None

    def start(self):
        """Start (or join) Ray once; the placement ledger (None without Ray)."""
        if not self.started:
            if self.init:
                from pipeline.executor import init_ray

                init_ray(self.cfg.executor.address, self.cfg.executor.num_cpus)
            check_store_reaches_every_node(self.cfg, self.store)
            self.ledger, self.started = _ledger(), True
        return self.ledger


def _run_stages(cfg: RunConfig, store: Store, plans: list[StagePlan], forced: set[str],
                executor: _Executor, until: str | None, out: str | None, hf_out: bool,
                pre: str, index: dict[str, Any]) -> dict[str, Any]:
    """The stage loop of `run`, then the report (see `run`)."""
    dirs: dict[str, StageDir] = {}
    records: dict[str, dict[str, Any]] = {}
    recomputed: set[str] = set()
    t_run = time.perf_counter()
    for i, p in enumerate(plans, 1):
        name = p.stage.name
        sd = StageDir(store, name, p.key)
        t0 = time.perf_counter()
        manifest, invalid = (None, None) if name in forced else _read_manifest(store, sd, p, cfg)
        if invalid:
            log.warning("[%d/%d] %s: %s; recomputing", i, len(plans), name, invalid)
        stale_inputs = recomputed & set(p.inputs)
        if manifest is not None and not stale_inputs:
            hit = _cache_hit(sd, manifest, p, i, len(plans), t0)
            if hit is not None:
                dirs[name], records[name] = sd, hit
                continue
        lease = _lease(cfg, store, sd)
        if name not in forced and not stale_inputs:
            # Another run may be computing this very stage: wait for it, or take over its
            # lease if it died. If it finished meanwhile, this is a cache hit after all.
            m = _lease_or_finished(lease, lambda sd=sd, p=p: _read_manifest(store, sd, p, cfg)[0])
            if m is not None:
                hit = _cache_hit(sd, m, p, i, len(plans), t0)
                if hit is not None:
                    dirs[name], records[name] = sd, hit
                    continue
                lease.acquire()  # finished, but its files do not verify: recompute
        else:
            lease.acquire()
        try:
            reason = ("forced" if name in forced else
                      "inputs recomputed" if stale_inputs else
                      "incomplete, resuming" if store.exists(sd.prefix) else "new")
            if reason == "incomplete, resuming":
                # A killed attempt's folder: its finished units (pipeline/units.py) are kept
                # for the stage to reuse; everything else it left (temporary files, a unit
                # cut short, an invalid manifest) goes.
                kept = keep_recorded(sd)
                if kept:
                    reason += f", {kept} unit{'s' if kept != 1 else ''} recorded"
            else:  # forced, or its inputs changed: no earlier file of it may be reused
                store.remove(sd.prefix)
            log.info("[%d/%d] %-9s running (key %s, %s)", i, len(plans), name, p.key, reason)
            sd.outputs = None  # being written: its own reads are of what it just wrote
            ctx = StageContext(cfg, store, sd, {n: dirs[n] for n in p.inputs}, sections=p.config)
            started = time.time()
            ledger = executor.start()
            if ledger is not None:
                ledger.begin(name)
            index["failed_stage"] = name  # what run.json says if this raises
            metrics = p.stage.run(ctx) or {}
            index.pop("failed_stage")
            seconds = time.perf_counter() - t0
            placement = ledger.take(name) if ledger is not None else {}
            workers = placement.pop("processes", [])
            sd.outputs = sd.hash_outputs()
            unwritten = [f for f in p.stage.outputs(cfg) if f not in sd.outputs]
            if unwritten:  # a bug in the stage, not the user's: no manifest, so no false hit
                raise RuntimeError(f"stage {name} finished without writing {', '.join(unwritten)}")
            manifest = {
                "stage": name,
                "key": p.key,
                "format_version": p.stage.version,
                "config": p.config,
                "config_digest": digest(cfg),
                "inputs": p.inputs,
                "outputs": sd.outputs,
                "metrics": metrics,
                "timings": {"started": started, "seconds": round(seconds, 3)},
                "versions": _versions(),
                "placement": placement,
                # Peak RSS of this driver process so far and of every worker process that
                # ran a task of the stage (a reused worker reports its lifetime peak).
                "memory": {"driver_peak_rss": peak_rss(),
                           "workers_peak_rss": max((w["peak_rss"] for w in workers), default=0),
                           "workers": workers},
            }
            lease.check()  # a run that lost its lease must not write over the new holder's
            store.write_json(sd.rel(MANIFEST), manifest)  # last: the stage is complete now
        finally:
            lease.release()
        dirs[name] = sd
        recomputed.add(name)
        records[name] = {"key": p.key, "cached": False, "seconds": round(seconds, 3),
                         "compute_seconds": round(seconds, 3), "metrics": metrics,
                         "memory": manifest["memory"]}
        head = ", ".join(f"{k}={_fmt(metrics.get(k))}" for k in p.stage.headline if k in metrics)
        log.info("[%d/%d] %-9s done in %.1f s %s", i, len(plans), name, seconds, head)

    if until is not None:  # a partial run (a sweep's shared prefix): no report
        return {"stages": records}
    from pipeline.report import build_report, render_markdown

    output = None
    if out is not None:
        from pipeline.outputs import publish

        output = publish(cfg, store, dirs["encode"], out=out, hf_out=hf_out)
        log.info("output: %s (%s)", output["url"], ", ".join(output["files"]))
    report = build_report(cfg, plans, records, time.perf_counter() - t_run)
    if output is not None:
        report["output"] = output
    store.write_json(f"{pre}report.json", report)
    store.write_text(f"{pre}report.md", render_markdown(report))
    index = {**index, "status": "complete"}
    if output is not None:
        index["output"] = output["url"]
    store.write_json(f"{pre}{RUN_INDEX}", index)
    log.info("report: %s", store.full_url(f"{pre}report.md"))
    return report


def _cache_hit(sd: StageDir, manifest: Manifest, p: StagePlan, i: int, n: int,
               t0: float) -> dict[str, Any] | None:
    """The stage's record if its folder verifies against `manifest`, else None (recompute).

    On S3 the folder is checked from one listing: each file's size and the ETag the server
    gave it when the stage was written (recorded in the manifest), so a cache hit downloads
    only the manifest. Every later read of a file still checks its sha256. Elsewhere (a local
    folder, a manifest without ETags) every file is hashed again."""
    name = p.stage.name
    sd.outputs = {f: o.model_dump(exclude_none=True) for f, o in manifest.outputs.items()}
    why = sd.verify_listing()
    how = "size+ETag listing"
    if why == "no etags":
        why, how = sd.verify(), "sha256"
    if why is not None:
        log.warning("[%d/%d] %s: cached artifacts fail verification (%s); recomputing",
                    i, n, name, why)
        return None
    log.info("[%d/%d] %-9s cached  (key %s, verified by %s)", i, n, name, p.key, how)
    return {"key": p.key, "cached": True, "verified": how,
            "seconds": round(time.perf_counter() - t0, 3),
            "compute_seconds": manifest.timings.seconds, "metrics": manifest.metrics,
            "memory": manifest.memory}


def _lease_or_finished(lease, read) -> Manifest | None:
    """Take `lease`, or return the manifest (`read()`) of the run that finished the stage while
    this one waited or just before it took the lease; the lease is then not held."""
    finished: list[Manifest] = []

    def done() -> bool:
        m = read()
        if m is not None:
            finished.append(m)
        return m is not None

    if not lease.acquire(done):
        return finished[-1]
    m = read()
    if m is not None:
        lease.release()
    return m


def _lease(cfg: RunConfig, store: Store, sd: StageDir):
    from pipeline.lease import StageLease

    return StageLease(store, sd.prefix, ttl=cfg.executor.lease_ttl_s,
                      wait=cfg.executor.lease_wait_s)


def _ledger():
    """The placement ledger of this Ray job, or None when Ray is not running (a plan-only
    call, a unit test of the driver without Ray)."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        from pipeline.placement import Ledger

        return Ledger()
    except Exception as e:  # noqa: BLE001 - placement is telemetry; the run goes on
        log.warning("task placement will not be recorded (%s)", e)
        return None


def check_store_reaches_every_node(cfg: RunConfig, store: Store) -> None:
    """A local store on a cluster of several nodes is a folder on each node, and each node's
    tasks would write their own: refuse it unless the config says every node mounts it."""
    if not store.is_local or cfg.store.shared or cfg.executor.address is None:
        return
    import ray

    alive = [n for n in ray.nodes() if n.get("Alive")]
    if len(alive) > 1:
        from pipeline.config import ConfigError

        raise ConfigError(
            f"store {store.url} is a local folder, and the Ray cluster has {len(alive)} nodes: "
            "each node would write its own copy. Use an object store (--store "
            "s3://bucket/prefix) or, if every node mounts that path, --set store.shared=true")


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _status_manifest(store: Store, sd: StageDir) -> Manifest | None:
    """The manifest of a listed stage, if it validates (status has no plan to check it by)."""
    try:
        data = store.read_bytes(sd.rel(MANIFEST), MAX_MANIFEST_BYTES)
        m = Manifest.model_validate_json(data)
    except (ArtifactError, ValueError):
        return None
    return m if m.stage == sd.name and m.key == sd.key else None


def check_against_model(cfg: RunConfig) -> None:
    """Names in the config that must be the model's (prune.keep, quantize.layer_k), checked
    before any stage runs: a typo must not surface after an hour of training."""
    named = {"prune.keep": cfg.prune.keep if cfg.prune.enabled else {},
             "quantize.layer_k": cfg.quantize.layer_k or {}}
    if not any(named.values()):
        return
    from pipeline.config import ConfigError
    from pipeline.models import build

    if cfg.model.name == "hf_causal_lm":
        return  # its names are checked by the load stage, against the model's folder
    try:
        if cfg.model.name == "factory":  # the user's module, built bare (no checkpoint)
            from pipeline.workload import Workload, _without_checkpoint

            model = _without_checkpoint(Workload(cfg).adapter).load()
        else:
            model = build(cfg.model.name)
        params = [n for n, _ in model.named_parameters()]
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for key, mapping in named.items():
        for tensor in mapping:
            if tensor not in params:
                near = difflib.get_close_matches(tensor, params, n=1)
                hint = f"did you mean {near[0]!r}? " if near else ""
                raise ConfigError(f"{key}: {tensor!r} is not a parameter of model "
                                  f"{cfg.model.name!r}; {hint}(parameters: {', '.join(params)})")


def published_output(store: Store, report_prefix: str = "") -> str | None:
    """Where the last run copied its outputs (`hwq run --out`), from its run.json."""
    pre = f"{report_prefix.strip('/')}/" if report_prefix else ""
    try:
        out = store.read_json(f"{pre}{RUN_INDEX}").get("output")
    except (ArtifactError, ValueError, AttributeError):
        return None
    return out if isinstance(out, str) else None


def run_state(store: Store, report_prefix: str = "") -> dict[str, Any]:
    """How the last run in `store` ended, from its run.json: {"status": "complete" | "running"
    | "failed" | "interrupted", "failed_stage": name or None, "error": line or None}. A run
    killed outright stays "running". {"status": None} without a readable run.json."""
    pre = f"{report_prefix.strip('/')}/" if report_prefix else ""
    try:
        index = store.read_json(f"{pre}{RUN_INDEX}")
    except (ArtifactError, ValueError):
        return {"status": None, "failed_stage": None, "error": None}
    index = index if isinstance(index, dict) else {}
    state = index.get("status", "complete")  # run.json of older versions: complete runs only
    out = {"status": state if state in ("complete", "running", "failed", "interrupted")
           else None}
    for k in ("failed_stage", "error"):
        v = index.get(k)
        out[k] = v[:2000] if isinstance(v, str) else None
    return out


def _listed_stages(store: Store) -> list[list[str]]:
    """[name, key] of every stage folder in the store (for a store without a run.json: a run
    of an older version that failed, or one killed before it wrote one), oldest first."""
    found = []
    for d in store.list_dirs("stages"):
        name, _, key = d.rpartition("-")
        if re.fullmatch(r"[a-z_]{1,32}", name) and re.fullmatch(r"[0-9a-f]{16}", key):
            m = _status_manifest(store, StageDir(store, name, key))
            found.append((m.timings.started if m else float("inf"), [name, key]))
    return [e for _, e in sorted(found, key=lambda t: t[0])]


def status(store: Store, report_prefix: str = "") -> list[dict[str, Any]]:
    """Each stage of the last run in `store`: key, complete?, cached?, seconds, headline,
    and `failed` (the stage a failed run died in; `run_state` has the error). A store without
    a run.json but with stage folders lists those."""
    pre = f"{report_prefix.strip('/')}/" if report_prefix else ""
    listed = [] if pre or store.exists(f"{pre}{RUN_INDEX}") else _listed_stages(store)
    try:
        index = {"stages": listed} if listed else store.read_json(f"{pre}{RUN_INDEX}")
    except ArtifactError:
        raise ArtifactError(f"{store.full_url(pre or '.')} holds no hwq run (no "
                            f"{RUN_INDEX}, no stages)") from None
    except ValueError:
        raise ArtifactError(f"{store.full_url(pre + RUN_INDEX)} is not valid JSON") from None
    stages = index.get("stages") if isinstance(index, dict) else None
    if not isinstance(stages, list) or not all(
            isinstance(e, list) and len(e) == 2 and all(isinstance(x, str) for x in e)
            and re.fullmatch(r"[a-z_]{1,32}", e[0]) and re.fullmatch(r"[0-9a-f]{16}", e[1])
            for e in stages):
        raise ArtifactError(f"{store.full_url(pre + RUN_INDEX)} is not an hwq run index "
                            "(rerun `hwq run` to rewrite it)")
    try:
        report = store.read_json(f"{pre}report.json")
    except (ArtifactError, ValueError):
        report = {}
    recorded = report.get("stages") if isinstance(report, dict) else None
    recorded = recorded if isinstance(recorded, dict) else {}
    failed = index.get("failed_stage") if index.get("status") in ("failed", "interrupted") \
        else None
    rows = []
    for name, key in stages:
        sd = StageDir(store, name, key)
        manifest = _status_manifest(store, sd)
        rec = recorded.get(name)
        rec = rec if isinstance(rec, dict) else {}
        rows.append({
            "stage": name,
            "key": key,
            "complete": manifest is not None,
            "cached": rec.get("cached"),
            "seconds": manifest.timings.seconds if manifest else None,
            "metrics": manifest.metrics if manifest else {},
            "failed": manifest is None and name == failed,
        })
    return rows
