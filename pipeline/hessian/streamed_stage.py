"""The `hessian` stage of a streamed model: P data partitions × G block groups as Ray tasks.

Units: the calibration windows are cut into P contiguous partitions and the decoder blocks
holding quantized tensors into G groups of consecutive blocks, balanced by their weights. Each
partition is a chain of Ray tasks over the groups (`pipeline.hessian.handover`): a group gets
its input activations **handed over** through the work folder by the group below (and, for the
Fisher, the cotangent from the group above after a forward sweep up), so every block runs
forward once and backward once per partition; partitions run side by side. The units of group
g write the float32 sums of its tensors over their partition's windows to
``partials/p{p}-g{g}.parquet`` (a row group per tensor, CRC per row).

The input embedding and the output head (``quantize.embeddings: quantize``) belong to no
block; each goes to the one group that already computes what it needs. Fisher: the embedding
(tied or not) to the group starting at block 0 — its gradient is the cotangent at block 0's
input scattered to the windows' token rows, and only that group back-propagates down there (a
tied weight also takes the head's gradient, which that group, like every Fisher task, has at
the top); an untied head to the last group. Activation: the head's statistics (and a tied
embedding's, the same weight) are the final norm's outputs over every token, so the last group,
its range extended to the top block, computes them (an untied input embedding has no activation
statistics; the load stage refuses it). The values are `pipeline.hessian.lm`'s definitions.

Then one reduce unit per group sums its partitions and divides by the sample count (windows
for the Fisher, tokens for the activation estimator) into ``hessian/g{g}.parquet``, and
removes that group's partials. ``tensors.json`` maps every tensor to its table and the sha256
of its float32 values, which the quantize stage checks on each read.

Every unit is recorded when its file is written (pipeline/units.py): a killed or lost task is
the only work a rerun repeats.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from pipeline.config import RunConfig
from pipeline.config_checks import second_moments
from pipeline.executor import UnitQueue, task_threads
from pipeline.graph import StageContext
from pipeline.hessian.handover import (
    HANDOVER,
    activation_unit,
    dx_rel,
    fisher_backward_unit,
    fisher_forward_unit,
    forward_outputs,
    partial_rel,
    plan_partition,
    segments,
)
from pipeline.hessian.shards import group_names  # re-exported: the plan of the stage's units

__all__ = ["run_hessian_streamed", "TENSORS", "embedding_placement", "group_names",
           "read_tensor_hessian"]

TENSORS = "tensors.json"  # {tensor: {"table": rel, "sha256": hex of its float32 values}}


def embedding_placement(estimator: str, roles: dict[str, str]) -> tuple[list[str], list[str]]:
    """(first, last) for `group_names` from model.json's ``embedding_roles`` ({tensor:
    "input" | "head" | "tied"}). The Fisher's embedding gradient needs the cotangent at block
    0's input, which only the group starting at block 0 back-propagates down to; the head's
    gradient is at the top, which every Fisher task reaches (the last group takes it). The
    activation statistics of the head (and of an embedding tied to it) are the final norm's
    outputs, which only the last group's forward reaches."""
    first, last = [], []
    for name, role in roles.items():
        if estimator == "fisher" and role in ("input", "tied"):
            first.append(name)
        else:
            last.append(name)
    return first, last


def _partition(n: int, parts: int, p: int) -> tuple[int, int]:
    return p * n // parts, (p + 1) * n // parts


def _reduce_task(out, g: int, names: list[str], parts: list[dict], total: int) -> dict:
    """Unit g: Σ_p partials / total into hessian/g{g}.parquet; then the partials go (a retry
    that finds the unit recorded only finishes that)."""
    from pipeline.hessian.table import TensorTable, TensorTableWriter
    from pipeline.units import Units

    task_threads()
    done = Units(out).done(f"g{g}")
    if done is not None:  # a retry of a worker killed after the record: only the cleanup left
        for pt in parts:
            if out.store.exists(out.rel(pt["table"])):
                out.store.remove(out.rel(pt["table"]))
        return done
    rel = f"hessian/g{g}.parquet"
    opts = out.store.storage_options or None
    tables = [TensorTable(out.url(pt["table"]), opts) for pt in parts]
    try:
        with TensorTableWriter(out.url(rel), opts, metadata={"n": total}) as w:
            for name in names:
                acc = None
                for t, pt in zip(tables, parts, strict=True):
                    v = t.read(name, sha256=pt["tensor_sha256"][name]).astype(np.float64)
                    acc = v if acc is None else acc + v
                w.add(name, acc / total)
            w.close()
    finally:
        for t in tables:
            t.close()
    rec = Units(out).record(f"g{g}", [rel], tensor_sha256=w.tensor_sha256)
    for pt in parts:
        out.store.remove(out.rel(pt["table"]))
    return rec


def read_tensor_hessian(hess, name: str, shape: tuple[int, int]) -> np.ndarray:
    """One tensor's Hessian values from a streamed hessian stage folder: an [in] vector
    (activation) or [out·in] values, bounded by the shape and checked against tensors.json."""
    from pipeline.hessian.table import TensorTable

    entry = hess.read_json(TENSORS)[name]
    R, C = shape
    t = TensorTable(hess.url(entry["table"]), hess.store.storage_options or None)
    try:
        return t.read(name, sizes=(C, R * C), sha256=entry["sha256"])
    finally:
        t.close()


def run_hessian_streamed(ctx: StageContext) -> dict[str, Any]:
    from pipeline.models.source import source_url, tensor_order
    from pipeline.units import UNITS_DIR, Units
    from pipeline.workload import MODEL_JSON, WINDOWS

    cfg, out, h = ctx.cfg, ctx.out, ctx.cfg.hessian
    t0 = time.perf_counter()
    load = ctx.inputs["load"]
    meta = load.read_json(MODEL_JSON)
    windows = load.read_safetensors(WINDOWS)["calibration"]
    url, opts = source_url(cfg, load)
    roles = {n: r for n, r in meta.get("embedding_roles", {}).items() if n in meta["quantizable"]}
    first, last = embedding_placement(h.estimator, roles)
    blocks = meta.get("info", {}).get("layers")
    if (last or h.estimator == "fisher") and (type(blocks) is not int or blocks < 1):
        # config.json without the count; the Fisher's last units run to the top
        from pipeline.hessian.shards import num_blocks
        from pipeline.models.weights import WeightsFolder

        blocks = num_blocks(WeightsFolder(url, opts))
    groups = group_names(tensor_order(meta["quantizable"]), meta["shapes"], h.groups, first=first, last=last,
                         blocks=blocks if type(blocks) is int else 0)
    P = max(1, min(h.partitions, int(windows.shape[0])))
    G = len(groups)
    fisher = h.estimator == "fisher"
    units = Units(out)
    total = int(windows.numel()) if h.estimator == "activation" else int(windows.shape[0])
    segs = segments(groups, top=blocks if fisher else None)
    # group 0's backward also reads the top's input: the head half of a tied embedding's grads
    top_below = fisher and G > 1 and any(r == "tied" and n in groups[0][1]
                                         for n, r in roles.items())

    finals: dict[int, dict] = {}  # reduced groups
    records: dict[str, dict] = {}  # unit records found or written by this run
    for g in range(G):
        done = units.done(f"g{g}", [f"hessian/g{g}.parquet"], _fields_check(groups[g][1]))
        if done is not None:
            finals[g] = done
    for p in range(P):
        for g in range(G):
            if g not in finals:
                rec = units.done(f"p{p}-g{g}", [partial_rel(p, g)], _fields_check(groups[g][1]))
                if rec is not None:
                    records[f"p{p}-g{g}"] = rec
    need = {(p, g): g not in finals and f"p{p}-g{g}" not in records
            for p in range(P) for g in range(G)}
    plans = {}
    for p in range(P):
        if not any(need[(p, g)] for g in range(G)):
            continue
        fwd_done, down_done = [], []
        for g in range(G):  # the handed-over files, only where a unit still has to run
            rec = (units.done(f"p{p}-g{g}-fwd", forward_outputs(p, segs[g], g == G - 1, fisher))
                   if fisher or g < G - 1 else None)
            fwd_done.append(rec is not None)
            if rec is not None:
                records[f"p{p}-g{g}-fwd"] = rec
            rec = (units.done(f"p{p}-g{g}-down", [dx_rel(p, segs[g].start)])
                   if fisher and g > 0 else None)
            down_done.append(rec is not None)
            if rec is not None:
                records[f"p{p}-g{g}-down"] = rec
        plans[p] = plan_partition([need[(p, g)] for g in range(G)], fwd_done, down_done,
                                  fisher=fisher, top_below=top_below)
    n_run = sum(sum(f) + sum(b) for f, b in plans.values())
    reused = len(records) + P * len(finals) + len(finals)
    left = {g: sum(need[(p, g)] for p in range(P)) for g in range(G) if g not in finals}
    ctx.log.info("hessian: %s over %d windows of %d tokens (streamed): %d partitions × %d "
                 "block groups %s, activations handed over between groups; %d units to run, "
                 "%d reused", h.estimator, windows.shape[0], windows.shape[1], P, G,
                 [f"{r.start}-{r.stop - 1}" for r, _ in groups], n_run + len(left), reused)

    def recorded(p: int) -> dict[str, dict]:
        """{file: its size and sha256} of partition p's handed-over files recorded so far."""
        pre = f"{HANDOVER}/p{p}/"
        return {rel: o for rec in records.values() for rel, o in rec["outputs"].items()
                if rel.startswith(pre)}

    def unit_args(key: tuple) -> tuple:
        kind, p, g = key
        lo, hi = _partition(int(windows.shape[0]), P, p)
        common = (cfg, out, url, opts, windows[lo:hi], p, g)
        rng, names = groups[g]
        if kind == "act":
            return activation_unit, common + (segs[g], rng, names, need[(p, g)], g == G - 1,
                                              recorded(p))
        if kind == "fwd":
            return fisher_forward_unit, common + (segs[g], g == G - 1, recorded(p))
        return fisher_backward_unit, common + (segs[g], rng, names, need[(p, g)], g == G - 1,
                                               recorded(p))

    # Each partition's units wait for those whose files they read; partitions run side by side.
    waiting: dict[tuple, set] = {}
    for p, (fwd, back) in plans.items():
        for g in range(G):
            if fisher:
                if fwd[g]:
                    waiting[("fwd", p, g)] = {("fwd", p, g - 1)} if g > 0 and fwd[g - 1] else set()
                if back[g]:
                    # its blocks' inputs (the first one the group below writes), the top's input
                    # for a tied embedding's group 0, and the cotangent from the group above
                    reads = {g - 1, g} | ({G - 1} if g == 0 and top_below else set())
                    deps = {("fwd", p, k) for k in reads if k >= 0 and fwd[k]}
                    if g + 1 < G and back[g + 1]:
                        deps.add(("back", p, g + 1))
                    waiting[("back", p, g)] = deps
            elif fwd[g]:
                waiting[("act", p, g)] = {("act", p, g - 1)} if g > 0 and fwd[g - 1] else set()
    bytes_read = 0
    retried = 0  # Ray's retries of this run's units (a worker killed mid-unit)
    # A group is reduced as soon as its partitions are written, in the next free slot: the
    # partials waiting for a reduce (4 bytes a weight each: 6.5 GB per partition and group of a
    # 7B model's Fisher) are then the running groups', not the whole model's P times over.
    cpus = _task_cpus(cfg, P)
    queue = UnitQueue(cpus_per_slot=cpus, desc="hessian units", total=n_run + len(left))

    def start_ready() -> None:
        for key in [k for k, deps in waiting.items() if not deps]:
            del waiting[key]
            fn, args = unit_args(key)
            queue.add(key, fn, args, cpus=cpus, gpus="task")

    def reduce_when_ready(g: int) -> None:
        if left[g]:
            return
        parts = []
        for p in range(P):
            rec = records.get(f"p{p}-g{g}")
            if rec is None:
                raise RuntimeError(f"hessian unit p{p}-g{g} finished without its record")
            parts.append({"table": next(iter(rec["outputs"])),
                          "tensor_sha256": rec["fields"]["tensor_sha256"]})
        queue.add(("reduce", g), _reduce_task, (out, g, groups[g][1], parts, total),
                  first=True)

    start_ready()
    for g in left:  # every partition reused from an earlier run's records
        reduce_when_ready(g)
    for key, r in queue:
        if key[0] == "reduce":
            finals[key[1]] = r
            retried += r.get("attempt", 0)
            continue
        bytes_read += r["bytes_read"]
        records.update(r["records"])
        retried += max((rec["attempt"] for rec in r["records"].values()), default=0)
        for deps in waiting.values():
            deps.discard(key)
        start_ready()
        p, g = key[1], key[2]
        if key[0] != "fwd" and f"p{p}-g{g}" in r["records"] and need[(p, g)]:
            left[g] -= 1
            reduce_when_ready(g)
    if waiting:
        raise RuntimeError(f"hessian units never started: {sorted(waiting)[:3]}")
    tensors = {}
    for g in range(len(groups)):
        rec = finals[g]
        table = next(iter(rec["outputs"]))
        for name, sha in rec["fields"]["tensor_sha256"].items():
            tensors[name] = {"table": table, "sha256": sha}
    missing = [n for n in meta["quantizable"] if n not in tensors]
    if missing:
        raise RuntimeError(f"the Hessian tables hold no values of {missing[0]}")
    out.write_json(TENSORS, tensors)
    for p in range(P):  # the handed-over files go: their records first
        for g in range(G):
            for rel in (f"{UNITS_DIR}/p{p}-g{g}-fwd.json", f"{UNITS_DIR}/p{p}-g{g}-down.json"):
                if out.store.exists(out.rel(rel)):
                    out.store.remove(out.rel(rel))
    for d in ("partials", HANDOVER):
        if out.store.exists(out.rel(d)):
            out.store.remove(out.rel(d))
    extra = {}
    if second_moments(cfg):  # feedback's and rotation's X·Xᵀ (hessian/second_moment.py)
        from pipeline.hessian.second_moment import run_second_moments

        extra["second_moment"] = run_second_moments(ctx, url, opts, windows,
                                                    tensor_order(meta["quantizable"]),
                                                    meta["shapes"], max(h.groups, 2))
    return {"hessian": {**extra, "estimator": h.estimator, "residency": cfg.model.residency,
                        "samples": int(windows.shape[0]), "normalizer": total,
                        "partitions": P, "groups": len(groups),
                        "block_groups": [[r.start, r.stop] for r, _ in groups],
                        "units": {"total": reused + n_run + len(left), "reused": reused,
                                  "computed": n_run + len(left), "retried": retried},
                        "bytes_read": bytes_read,
                        "seconds": round(time.perf_counter() - t0, 3)}}


def _fields_check(names: list[str]):
    """The check of a hessian unit record's fields (`Units.done`): its per-tensor digests
    name exactly the group's tensors (a record is read from the store, untrusted)."""
    import re

    def check(fields: dict) -> str | None:
        sha = fields.get("tensor_sha256")
        if not isinstance(sha, dict) or set(sha) != set(names):
            return "its tensors are not the group's"
        if not all(isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) for v in sha.values()):
            return "its tensor digests are not sha256 hex"
        return None

    return check


def _task_cpus(cfg: RunConfig, n_units: int) -> int:
    """executor.cpus_per_task, else the cluster's CPUs shared by the units (torch threads)."""
    from pipeline.executor import _cluster_cpus, task_cpus

    return task_cpus(max(1, _cluster_cpus() // max(1, n_units)))
