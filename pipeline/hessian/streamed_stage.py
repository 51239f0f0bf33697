"""The `hessian` stage of a streamed model: P data partitions × G block groups as Ray tasks.

Units: the calibration windows are cut into P contiguous partitions and the decoder blocks
holding quantized tensors into G groups of consecutive blocks, balanced by their weights. Unit
(p, g) is one Ray task: it streams the model one block at a time and writes the float64 sums of
its group's tensors over its partition's windows to ``partials/p{p}-g{g}.parquet`` (a row
group per tensor, CRC per row). How a group gets its input activations: **recomputed** — the
task runs the blocks below its group forward itself (one block resident at a time) rather than
waiting for another task's hidden states; the Fisher also runs the blocks above its group (the
loss is at the top) and back-propagates down to its group. The cost is measured by
benchmarks/hessian_groups.py.

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
import torch

from pipeline.config import RunConfig
from pipeline.config_checks import second_moments
from pipeline.executor import UnitQueue, task_threads
from pipeline.graph import StageContext
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


def _partial_task(cfg: RunConfig, out, url: str, opts: dict | None, windows: torch.Tensor,
                  p: int, g: int, blocks: range, names: list[str]) -> dict:
    """Unit (p, g): float64 sums of group g's tensors over partition p's windows."""
    from pipeline.executor import private_subdir
    from pipeline.hessian.stream import activation_streamed, fisher_streamed
    from pipeline.hessian.table import TensorTableWriter
    from pipeline.memory import process_peaks
    from pipeline.models.stream import StreamedLM
    from pipeline.units import Units

    task_threads()
    h = cfg.hessian
    # Forward-only statistics run in the checkpoint's dtype (sums in float64); the Fisher's
    # gradients in float32, from a block whose Linears keep their 16-bit weights.
    lm = (StreamedLM(url, opts, dtype="stored") if h.estimator == "activation"
          else StreamedLM(url, opts, dtype=torch.float32, stored_linears=True))
    n = int(windows.numel()) if h.estimator == "activation" else int(windows.shape[0])
    rel = f"partials/p{p}-g{g}.parquet"
    with TensorTableWriter(out.url(rel), out.store.storage_options or None,
                           metadata={"estimator": h.estimator, "n": n}) as table:
        def emit(name: str, sums: np.ndarray, count: int) -> None:
            table.add(name, sums)

        if h.estimator == "activation":
            activation_streamed(lm, windows, names, emit, blocks=blocks)
        else:
            fisher_streamed(lm, windows, names, emit, blocks=blocks,
                            spill_dir=str(private_subdir("spill")))
        table.close()
    Units(out).record(f"p{p}-g{g}", [rel], n=n, tensor_sha256=table.tensor_sha256)
    return {"unit": f"p{p}-g{g}", "bytes_read": lm.weights.bytes_read,
            "process": process_peaks()}


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
    from pipeline.units import Units
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
    if last and (type(blocks) is not int or blocks < 1):  # config.json without the count
        from pipeline.hessian.shards import num_blocks
        from pipeline.models.weights import WeightsFolder

        blocks = num_blocks(WeightsFolder(url, opts))
    groups = group_names(tensor_order(meta["quantizable"]), meta["shapes"], h.groups, first=first, last=last,
                         blocks=blocks if type(blocks) is int else 0)
    P = max(1, min(h.partitions, int(windows.shape[0])))
    units = Units(out)
    total = int(windows.numel()) if h.estimator == "activation" else int(windows.shape[0])

    finals: dict[int, dict] = {}
    todo: list[tuple[int, int]] = []
    records: dict[tuple[int, int], dict] = {}
    for g in range(len(groups)):
        own = _fields_check(groups[g][1])
        done = units.done(f"g{g}", [f"hessian/g{g}.parquet"], own)
        if done is not None:
            finals[g] = done
            continue
        for p in range(P):
            rec = units.done(f"p{p}-g{g}", [f"partials/p{p}-g{g}.parquet"], own)
            if rec is None:
                todo.append((p, g))
            else:
                records[(p, g)] = rec
    ctx.log.info("hessian: %s over %d windows of %d tokens (streamed): %d partitions × %d "
                 "block groups %s; %d units to run, %d reused", h.estimator,
                 windows.shape[0], windows.shape[1], P, len(groups),
                 [f"{r.start}-{r.stop - 1}" for r, _ in groups], len(todo),
                 len(records) + (P + 1) * len(finals))
    reused = len(records) + (P + 1) * len(finals)
    calls = []
    for p, g in todo:
        lo, hi = _partition(int(windows.shape[0]), P, p)
        rng, names = groups[g]
        calls.append((cfg, out, url, opts, windows[lo:hi], p, g, rng, names))
    bytes_read = 0
    retried = 0  # Ray's retries of this run's units (a worker killed mid-unit)
    # A group is reduced as soon as its partitions are written, in the next free slot: the
    # partials waiting for a reduce (4 bytes a weight each: 6.5 GB per partition and group of a
    # 7B model's Fisher) are then the running groups', not the whole model's P times over.
    cpus = _task_cpus(cfg, P * len(groups))
    left = {g: sum(1 for _, gg in todo if gg == g) for g in range(len(groups)) if g not in finals}
    queue = UnitQueue(cpus_per_slot=cpus, desc="hessian units", total=len(todo) + len(left))

    def reduce_when_ready(g: int) -> None:
        nonlocal retried
        if left[g]:
            return
        parts = []
        for p in range(P):
            rec = records.get((p, g))
            if rec is None:
                rec = units.done(f"p{p}-g{g}", [f"partials/p{p}-g{g}.parquet"],
                                 _fields_check(groups[g][1]))
                retried += rec["attempt"] if rec is not None else 0
            if rec is None:
                raise RuntimeError(f"hessian unit p{p}-g{g} finished without its record")
            parts.append({"table": next(iter(rec["outputs"])),
                          "tensor_sha256": rec["fields"]["tensor_sha256"]})
        queue.add(("reduce", g), _reduce_task, (out, g, groups[g][1], parts, total),
                  first=True)

    for (p, g), c in zip(todo, calls, strict=True):
        queue.add(("partial", p, g), _partial_task, c, cpus=cpus, gpus="task")
    for g in left:  # every partition reused from an earlier run's records
        reduce_when_ready(g)
    for key, r in queue:
        if key[0] == "partial":
            bytes_read += r["bytes_read"]
            left[key[2]] -= 1
            reduce_when_ready(key[2])
        else:
            finals[key[1]] = r
            retried += r.get("attempt", 0)
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
    if out.store.exists(out.rel("partials")):
        out.store.remove(out.rel("partials"))
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
                        "units": {"total": (P + 1) * len(groups), "reused": reused,
                                  "computed": (P + 1) * len(groups) - reused,
                                  "retried": retried},
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
