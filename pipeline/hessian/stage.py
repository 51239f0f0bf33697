"""The `hessian` stage: diagonal Hessian estimates, sharded over data × parameters on Ray.

The calibration set (a seeded subset of the training images) is split into P partitions and
the parameters into G groups balanced by element count. Each (partition, group) is one Ray task
(one GPU each when the cluster has GPUs): it reads the model once from the store, runs its
partition with gradients only for its group, and writes float64 partial sums to
`partials/p{p}-g{g}.parquet`, then records it as unit `p{p}-g{g}` (pipeline/units.py), so a
run killed in this stage reruns only the pairs not recorded. A tree of Ray tasks sums the
partitions of each group pairwise; a last task divides by the sample count and writes
`hessian.parquet` (float32; see `pipeline.hessian.table`). Once that table is written the unit
records are removed, then the partials (a kill between the two leaves partials no record
names: the rerun computes every pair again, as it does after a kill at any later point).

Output: hessian.parquet — what the quantizers read, shard by shard.
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa

from pipeline.config import RunConfig
from pipeline.config_checks import one_shot, per_tensor, second_moments
from pipeline.data import calibration_indices
from pipeline.executor import remote, task_threads
from pipeline.graph import Stage, StageContext
from pipeline.store import StageDir
from pipeline.units import UNITS_DIR, Units

__all__ = ["HESSIAN", "balance_groups", "read_hessian", "NONNEG_RULE"]

TABLE = "hessian.parquet"
# What the quantizers do with the stored values to get non-negative weights.
NONNEG_RULE = {"ggn": "none (non-negative)", "fisher": "none (non-negative)",
               "adam": "none (non-negative)", "hutchinson": "abs",
               "activation": "none (non-negative)"}
_SCALE = {
    "fisher_lm": "empirical Fisher of the mean next-token NLL per window (per-sequence "
                 "gradients); use for relative weighting",
    "activation": "E[x²] of each Linear input channel over all tokens, broadcast over the "
                  "rows (the diagonal of GPTQ's X·Xᵀ); use for relative weighting",
}


def balance_groups(sizes: dict[str, int], groups: int) -> list[list[str]]:
    """Split parameter names into at most `groups` groups of near-equal element count
    (largest first onto the lightest group). Names keep model order inside a group."""
    order = {n: i for i, n in enumerate(sizes)}
    g = max(1, min(groups, len(sizes)))
    bins: list[list[str]] = [[] for _ in range(g)]
    load = [0] * g
    for name in sorted(sizes, key=lambda n: -sizes[n]):
        i = load.index(min(load))
        bins[i].append(name)
        load[i] += sizes[name]
    return [sorted(b, key=order.__getitem__) for b in bins if b]


def _build_model(cfg: RunConfig, src: StageDir):
    import torch

    from pipeline.models import build
    from pipeline.train.stage import load_model_state

    model = build(cfg.model.name)
    model.load_state_dict(load_model_state(src))
    model.eval()
    if torch.cuda.is_available():
        model.cuda()
    return model


def _partition_batches(n: int, batch_size: int, n_parts: int, part: int) -> range:
    """Global batch numbers of partition `part`: contiguous, balanced, whole batches — so
    every batch (and its random draws) is the same whatever P is."""
    n_batches = -(-n // batch_size)
    lo = part * n_batches // n_parts
    hi = (part + 1) * n_batches // n_parts
    return range(lo, hi)


def _partial_task(cfg: RunConfig, out: StageDir, src: StageDir, part: int, n_parts: int,
                  group: list[str], g: int) -> tuple[str, int]:
    """One (partition, group) pair → partials/p{part}-g{g}.parquet of float64 sums."""
    from pipeline.data import load_split
    from pipeline.hessian.estimators import estimate_diag
    from pipeline.hessian.table import to_table

    name, units = f"partials/p{part}-g{g}.parquet", Units(out)
    if (rec := units.done(f"p{part}-g{g}")) is not None:  # a retry of a task that finished
        return name, rec["fields"].get("n")
    task_threads()
    h = cfg.hessian
    model = _build_model(cfg, src)
    train = load_split(cfg.data.root, "train")
    idx = calibration_indices(cfg, len(train))
    total = None
    for b in _partition_batches(len(idx), h.batch_size, n_parts, part):
        sel = idx[b * h.batch_size : (b + 1) * h.batch_size]
        # Seeded by the global batch number: Monte-Carlo labels do not depend on P.
        sums = estimate_diag(model, [(train.x[sel], train.y[sel])], h.estimator, params=group,
                             mode=h.mode, n_samples=h.n_samples,
                             seed=cfg.seed * 1_000_003 + b)
        total = sums if total is None else total.add(sums)
    out.write_table(name, to_table(total.sums, h.chunk_size, dtype=np.float64,
                                   metadata={"n": total.n}))
    units.record(f"p{part}-g{g}", [name], n=total.n)
    return name, total.n


def _generic_partial_task(cfg: RunConfig, out: StageDir, src: StageDir, part: int,
                          n_parts: int, group: list[str], g: int) -> tuple[str, int]:
    """A model loaded by the load stage: one (partition, group) pair of its calibration data.
    Text: per-window Fisher (`fisher_diag_lm`) or input-channel E[x²] (`activation_diag_lm`);
    other data: squared gradients of the adapter's loss per batch."""
    import torch

    from pipeline.hessian.estimators import HessianSums
    from pipeline.hessian.lm import activation_diag_lm, fisher_diag_lm
    from pipeline.hessian.table import to_table
    from pipeline.progress import bar
    from pipeline.workload import Workload

    name, units = f"partials/p{part}-g{g}.parquet", Units(out)
    if (rec := units.done(f"p{part}-g{g}")) is not None:  # a retry of a task that finished
        return name, rec["fields"].get("n")
    task_threads()
    h = cfg.hessian
    wl = Workload(cfg)
    model = wl.model_from(src)
    if torch.cuda.is_available():
        model.cuda()
    data = wl.calibration(src)
    n = len(data)
    lo, hi = part * n // n_parts, (part + 1) * n // n_parts
    pbar = bar(hi - lo, f"hessian p{part} g{g}", unit="window" if wl.is_text else "batch")
    if wl.is_text and h.estimator == "activation":
        sums = activation_diag_lm(model, data[lo:hi], group, batch_size=h.batch_size,
                                  progress=pbar.update)
    elif wl.is_text:
        sums = fisher_diag_lm(model, data[lo:hi], group, batch_size=1, progress=pbar.update)
    else:
        params = dict(model.named_parameters())
        for p in model.parameters():
            p.requires_grad_(False)
        for name in group:
            params[name].requires_grad_(True)
        acc = {name: torch.zeros(params[name].shape, dtype=torch.float64) for name in group}
        for batch in data[lo:hi]:
            model.zero_grad(set_to_none=True)
            wl.adapter.loss(model, batch).backward()
            for name in group:
                gr = params[name].grad
                if gr is not None:
                    acc[name] += gr.detach().double().cpu() ** 2
            pbar.update(1)
        sums = HessianSums(acc, hi - lo)
    pbar.close()
    out.write_table(name, to_table(sums.sums, h.chunk_size, dtype=np.float64,
                                   metadata={"n": sums.n}))
    units.record(f"p{part}-g{g}", [name], n=sums.n)
    return name, sums.n


def _sum_task(out: StageDir, a: str, b: str, dest: str) -> str:
    """Add two partial tables of the same group (same rows, same chunking) → dest."""
    from pipeline.hessian.table import table_metadata

    ta, tb = (out.read_table(x) for x in (a, b))
    if ta.column("tensor") != tb.column("tensor") or ta.column("offset") != tb.column("offset"):
        raise ValueError(f"partials {a} and {b} do not have the same layout")
    va = ta.column("values").combine_chunks()
    vb = tb.column("values").combine_chunks()
    summed = pa.ListArray.from_arrays(
        va.offsets, pa.array(va.values.to_numpy() + vb.values.to_numpy(), pa.float64()))
    n = int(table_metadata(ta)["n"]) + int(table_metadata(tb)["n"])
    t = pa.table({"tensor": ta.column("tensor"), "offset": ta.column("offset"),
                  "values": summed}).replace_schema_metadata({"n": str(n)})
    out.write_table(dest, t)
    return dest


def _final_task(cfg: RunConfig, out: StageDir, src: StageDir, group_files: list[str],
                param_order: list[str]) -> dict:
    """Divide by the sample count, cast to float32, write hessian.parquet in model order."""
    from pipeline.hessian.table import table_metadata

    tables, n = [], None
    for f in group_files:
        t = out.read_table(f)
        tn = int(table_metadata(t)["n"])
        if n is not None and tn != n:
            raise ValueError(f"groups saw different sample counts ({n} vs {tn})")
        n = tn
        v = t.column("values").combine_chunks()
        mean = pa.ListArray.from_arrays(v.offsets, pa.array(
            (v.values.to_numpy() / tn).astype(np.float32), pa.float32()))
        tables.append(pa.table({"tensor": t.column("tensor"), "offset": t.column("offset"),
                                "values": mean}))
    table = pa.concat_tables(tables)
    # Model order, so a reader streams tensors in the order the model lists them.
    rank = {name: i for i, name in enumerate(param_order)}
    keys = [(rank[nm], off) for nm, off in zip(table.column("tensor").to_pylist(),
                                                table.column("offset").to_pylist(), strict=True)]
    table = table.take(pa.array(sorted(range(len(keys)), key=keys.__getitem__)))
    return _write_final(cfg, out, src, table, n)


def _adam_task(cfg: RunConfig, out: StageDir, src: StageDir) -> dict:
    from pipeline.hessian.estimators import adam_diag
    from pipeline.hessian.table import to_table
    from pipeline.models import build
    from pipeline.train.stage import load_adam

    names = [n for n, _ in build(cfg.model.name).named_parameters()]
    v, step, beta2 = load_adam(src)
    diag = adam_diag(v, step, beta2, params=names)
    return _write_final(cfg, out, src, to_table(diag, cfg.hessian.chunk_size), None)


def _write_final(cfg: RunConfig, out: StageDir, src: StageDir, table: pa.Table,
                 n: int | None) -> dict:
    h = cfg.hessian
    meta = {
        "estimator": h.estimator,
        "mode": h.mode if h.estimator == "ggn" else "",
        "n_samples": str(n or 0),
        "draws_per_sample": str(h.n_samples),
        "model_sha256": src.outputs["model.safetensors"]["sha256"],
        "nonneg": NONNEG_RULE[h.estimator],
        # The absolute scale depends on how the loss is averaged (docs/METHOD.md §2): relative use only.
        "scale": ("diagonal for the mean per-sample cross-entropy; use for relative weighting"
                  if cfg.model.trained_here else
                  _SCALE["activation" if h.estimator == "activation" else "fisher_lm"]),
    }
    table = table.replace_schema_metadata(meta)
    out.write_table(TABLE, table)
    from pipeline.hessian.table import iter_rows

    per_layer: dict[str, float] = {}
    counts: dict[str, int] = {}
    for name, _, vals in iter_rows(table):  # numpy views, no Python lists of values
        per_layer[name] = per_layer.get(name, 0.0) + float(np.sum(vals, dtype=np.float64))
        counts[name] = counts.get(name, 0) + len(vals)
    return {"mean_h": {k: per_layer[k] / max(counts[k], 1) for k in per_layer},
            "rows": table.num_rows, "n": n}


def read_hessian(sd: StageDir, shapes: dict[str, tuple[int, ...]],
                 names: list[str] | None = None) -> dict[str, np.ndarray]:
    """Hessian diagonals as {name: float32 array of the parameter's shape}, made non-negative
    by the estimator's rule.

    names=None reads the whole table; a list of names returns only those tensors' rows. Either
    way the bytes are read once and checked against the manifest before they are parsed: a
    table swapped after the stage was verified is refused, not used. (Per-tensor reads of
    tables too big to read whole need per-row-group digests; not needed at this size.)"""
    import pyarrow.parquet as pq

    from pipeline.hessian.table import from_table, table_metadata

    if names is not None and not names:
        return {}  # (pyarrow types an empty "in" filter as null and refuses it)
    if names is None:
        table = sd.read_table(TABLE)
    else:
        data = sd.read_bytes(TABLE)  # verified against the manifest
        try:
            table = pq.read_table(pa.BufferReader(data), filters=[("tensor", "in", list(names))])
            meta = pq.read_schema(pa.BufferReader(data)).metadata
        except Exception as e:  # noqa: BLE001 - pyarrow raises many types on a bad file
            raise sd._corrupt(TABLE, f"unreadable as Parquet ({type(e).__name__}: {e})"
                              ) from None
        table = table.replace_schema_metadata(meta)
        shapes = {n: shapes[n] for n in names}
    try:
        out = from_table(table, shapes)
    except (KeyError, ValueError, TypeError) as e:
        raise sd._corrupt(TABLE, f"not a Hessian table of this model ({e})") from None
    if table_metadata(table).get("nonneg") == "abs":
        out = {k: np.abs(v) for k, v in out.items()}
    return out


def _run(ctx: StageContext) -> dict:
    import ray

    from pipeline.models import build
    from pipeline.train.stage import model_stage

    cfg, out = ctx.cfg, ctx.out
    if one_shot(cfg):  # prune.keep's names, checked before the Hessian's hour, not after
        from pipeline.quantize.sparsity import keeps_for
        from pipeline.workload import MODEL_JSON

        meta = ctx.inputs[model_stage(cfg)].read_json(MODEL_JSON)
        keeps_for(meta["quantizable"], cfg.prune.keep, set(meta.get("embeddings", [])))
    if per_tensor(cfg):
        from pipeline.hessian.streamed_stage import run_hessian_streamed

        return run_hessian_streamed(ctx)
    src = ctx.inputs[model_stage(cfg)]
    h = cfg.hessian
    t0 = time.perf_counter()
    generic = not cfg.model.trained_here
    if generic:  # only the tensors to quantize, grouped by decoder blocks
        from pipeline.workload import MODEL_JSON

        meta = src.read_json(MODEL_JSON)
        names = meta["quantizable"]
        sizes = {n: int(np.prod(meta["shapes"][n])) for n in names}
    else:
        model = build(cfg.model.name)
        sizes = {n: p.numel() for n, p in model.named_parameters()}
    if h.estimator == "adam":
        res = ray.get(remote(_adam_task).remote(cfg, out, src))
        groups, n_parts = [list(sizes)], 0
        unit_counts = {"total": 0, "reused": 0, "computed": 0}  # one task, no units
    else:
        from pipeline.executor import task_cpus

        gpus = "task"
        if generic:
            groups = _block_groups(names, h.groups)
            n_parts = min(h.partitions, _calibration_count(cfg, src))
            task = remote(_generic_partial_task, gpus=gpus, cpus=_task_cpus(h))
        else:
            groups = balance_groups(sizes, h.groups)
            # Whole batches per partition (see _partition_batches).
            n_parts = min(h.partitions, -(-min(h.calibration_samples, 60_000) // h.batch_size))
            task = remote(_partial_task, gpus=gpus, cpus=task_cpus(1))
        # A pair recorded by a killed earlier attempt (same key) is reused, not resubmitted.
        units = Units(out)
        partial: dict[tuple[int, int], str] = {}
        refs = {}
        for p in range(n_parts):
            for g, grp in enumerate(groups):
                rec = units.done(f"p{p}-g{g}")
                if rec is not None and f"partials/p{p}-g{g}.parquet" in rec["outputs"]:
                    partial[(p, g)] = f"partials/p{p}-g{g}.parquet"
                else:
                    refs[(p, g)] = task.remote(cfg, out, src, p, n_parts, grp, g)
        unit_counts = {"total": n_parts * len(groups), "reused": len(partial),
                       "computed": len(refs)}
        what = (f"{cfg.data.calibration_windows} windows of {cfg.data.seq_len} tokens"
                if cfg.data.name == "text" else
                f"{h.calibration_samples} samples" if cfg.model.trained_here else "calibration data")
        ctx.log.info("hessian: %s%s over %s: %d partitions × %d groups = %d Ray tasks%s",
                     h.estimator, f"/{h.mode}" if h.estimator == "ggn" else "",
                     what, n_parts, len(groups), len(refs),
                     f" ({len(partial)} more recorded by an earlier attempt)" if partial else "")
        from pipeline.progress import bar

        pbar = bar(len(refs), "hessian tasks", unit="task")
        pending = list(refs.values())
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            ray.get(done)  # surface a failed task at once
            pbar.update(len(done))
        pbar.close()
        # Tree reduce per group: pairs of partial files summed by Ray tasks, level by level.
        summer = remote(_sum_task)
        partial.update({pg: ray.get(ref)[0] for pg, ref in refs.items()})
        level = {g: [partial[(p, g)] for p in range(n_parts)] for g in range(len(groups))}
        depth = 0
        while any(len(files) > 1 for files in level.values()):
            depth += 1
            nxt: dict[int, list] = {}
            for g, files in level.items():
                nxt[g] = [
                    summer.remote(out, files[i], files[i + 1], f"partials/r{depth}-g{g}-{i}.parquet")
                    if i + 1 < len(files) else files[i]
                    for i in range(0, len(files), 2)
                ]
            level = {g: [f if isinstance(f, str) else ray.get(f) for f in files]
                     for g, files in nxt.items()}
        finals = [level[g][0] for g in range(len(groups))]
        res = ray.get(remote(_final_task).remote(cfg, out, src, finals, list(sizes)))
        # The table is written: records first (a record must never outlive its partial).
        ctx.store.remove(out.rel(UNITS_DIR))
        ctx.store.remove(out.rel("partials"))
    return {
        "hessian": {
            "estimator": h.estimator,
            "mode": h.mode if h.estimator == "ggn" else None,
            "samples": res["n"] or 0,
            "partitions": n_parts,
            "groups": len(groups),
            "seconds": round(time.perf_counter() - t0, 3),
            "mean_h": res["mean_h"],
            "units": unit_counts,
        }
    }


def _block_groups(names: list[str], groups: int) -> list[list[str]]:
    """Contiguous runs of decoder blocks (by the `.<i>.` in the names), balanced by count."""
    import re

    units: list[list[str]] = []
    last = None
    for n in names:
        m = re.search(r"\.(\d+)\.", n)
        key = m.group(0) if m else n
        if key != last:
            units.append([])
            last = key
        units[-1].append(n)
    g = max(1, min(groups, len(units)))
    return [sum(units[i * len(units) // g:(i + 1) * len(units) // g], []) for i in range(g)]


def _calibration_count(cfg: RunConfig, src: StageDir) -> int:
    from pipeline.workload import Workload

    if cfg.data.name == "text":
        return cfg.data.calibration_windows
    return max(1, len(Workload(cfg).calibration(src)))


def _task_cpus(h) -> int:
    """CPUs of one task: executor.cpus_per_task, else the cluster's CPUs shared by the P × G
    tasks (torch threads)."""
    from pipeline.executor import _cluster_cpus, task_cpus

    return task_cpus(max(1, _cluster_cpus() // max(1, h.partitions * h.groups)))


def _sections(cfg: RunConfig) -> dict:
    # The layout is part of the key: a per-tensor run (tables per block group) and a
    # whole-model run (one hessian.parquet) of the same settings write different files, and
    # with one key each would find the other's folder and recompute it.
    key = {"seed": cfg.seed, "hessian": cfg.hessian.model_dump(mode="json"),
           "layout": "tensors" if per_tensor(cfg) else "table"}
    if second_moments(cfg):  # the stage then also writes each Linear's X·Xᵀ
        key["second_moment"] = "ldl"  # (the name the first user gave the key)
    return key


def _inputs(cfg: RunConfig) -> tuple[str, ...]:
    from pipeline.train.stage import model_stage

    return (model_stage(cfg),)


HESSIAN = Stage(
    name="hessian",
    version=2,  # 2: per-tensor Hessian tables hold each chunk's float32 values as bytes
    inputs=_inputs,
    sections=_sections,
    run=_run,
    enabled=lambda cfg: cfg.hessian.enabled,
    headline=(),
    # a streamed model's values are in per-group tables listed by tensors.json
    outputs=lambda cfg: ("tensors.json",) if per_tensor(cfg) else (TABLE,),
)
