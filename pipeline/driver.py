"""The driver: plans the stage graph, skips what the store already holds, runs the rest.

A stage's key is a digest of (its name, format version, the config sections that decide its
output, its inputs' keys). Its files live under `<root>/stages/<name>-<key>/`, and its
`manifest.json` — written last — lists every file's sha256. So:

- a rerun whose stage key exists and verifies is a cache hit (nothing recomputed);
- a sweep over quantizer settings shares the train/prune/hessian folders;
- a run killed inside a stage left no manifest there, and resumes at that stage;
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
from pipeline.store import ArtifactError, StageDir, Store

__all__ = ["run", "status", "open_store", "check_against_model"]

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
) -> dict[str, Any]:
    """Run every enabled stage not already complete in the store; write the report.

    force: stage names to recompute (with everything downstream).
    report_prefix: folder (relative to the store root) for config/report files, so several
        runs (a sweep) can share one store's stage cache.
    until: run the stages up to and including this one, and write no report.
    Returns the report (the content of report.json).
    """
    store = open_store(cfg)
    plans = plan(cfg, stages)
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
    store.check_access()
    check_against_model(cfg)
    store.write_text(f"{pre}config.yaml", yaml.safe_dump(cfg.redacted(), sort_keys=False))
    if init_executor:
        from pipeline.executor import init_ray

        init_ray(cfg.executor.address, cfg.executor.num_cpus)

    log.info("run %s: %d stages, store %s", cfg.name, len(plans), store.url)
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
            sd.outputs = {f: o.model_dump() for f, o in manifest.outputs.items()}
            why = sd.verify()
            if why is None:
                dirs[name] = sd
                records[name] = {
                    "key": p.key,
                    "cached": True,
                    "seconds": round(time.perf_counter() - t0, 3),
                    "compute_seconds": manifest.timings.seconds,
                    "metrics": manifest.metrics,
                }
                log.info("[%d/%d] %-9s cached  (key %s)", i, len(plans), name, p.key)
                continue
            log.warning("[%d/%d] %s: cached artifacts fail verification (%s); recomputing",
                        i, len(plans), name, why)
        reason = ("forced" if name in forced else
                  "inputs recomputed" if stale_inputs else
                  "incomplete, resuming" if store.exists(sd.prefix) else "new")
        log.info("[%d/%d] %-9s running (key %s, %s)", i, len(plans), name, p.key, reason)
        store.remove(sd.prefix)  # a killed earlier attempt may have left partial files
        sd.outputs = None  # being written: its own reads are of what it just wrote
        ctx = StageContext(cfg, store, sd, {n: dirs[n] for n in p.inputs}, sections=p.config)
        started = time.time()
        metrics = p.stage.run(ctx) or {}
        seconds = time.perf_counter() - t0
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
        }
        store.write_json(sd.rel(MANIFEST), manifest)  # last: the stage is complete now
        dirs[name] = sd
        recomputed.add(name)
        records[name] = {"key": p.key, "cached": False, "seconds": round(seconds, 3),
                         "compute_seconds": round(seconds, 3), "metrics": metrics}
        head = ", ".join(f"{k}={_fmt(metrics.get(k))}" for k in p.stage.headline if k in metrics)
        log.info("[%d/%d] %-9s done in %.1f s %s", i, len(plans), name, seconds, head)

    if until is not None:  # a partial run (a sweep's shared prefix): no report
        return {"stages": records}
    from pipeline.report import build_report, render_markdown

    report = build_report(cfg, plans, records, time.perf_counter() - t_run)
    store.write_json(f"{pre}report.json", report)
    store.write_text(f"{pre}report.md", render_markdown(report))
    store.write_json(f"{pre}{RUN_INDEX}", {"config_digest": report["config_digest"],
                                           "stages": [[n, records[n]["key"]] for n in names]})
    log.info("report: %s", store.full_url(f"{pre}report.md"))
    return report


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

    try:
        params = [n for n, _ in build(cfg.model.name).named_parameters()]
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for key, mapping in named.items():
        for tensor in mapping:
            if tensor not in params:
                near = difflib.get_close_matches(tensor, params, n=1)
                hint = f"did you mean {near[0]!r}? " if near else ""
                raise ConfigError(f"{key}: {tensor!r} is not a parameter of model "
                                  f"{cfg.model.name!r}; {hint}(parameters: {', '.join(params)})")


def status(store: Store, report_prefix: str = "") -> list[dict[str, Any]]:
    """Each stage of the last run in `store`: key, complete?, cached?, seconds, headline."""
    pre = f"{report_prefix.strip('/')}/" if report_prefix else ""
    try:
        index = store.read_json(f"{pre}{RUN_INDEX}")
    except ArtifactError:
        raise ArtifactError(f"{store.full_url(pre or '.')} holds no hwq run (no {RUN_INDEX})") from None
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
        })
    return rows
