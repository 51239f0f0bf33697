"""The `quantize` stage, one tensor per unit: per-channel uniform/ECSQ under one λ for every row
of every tensor, with the rate the *file* spends aimed at quantize.target_bits.

Reads the model through its source (pipeline/models/source.py) one tensor at a time and the
Hessian tensor by tensor, so no process holds more than one tensor and its Hessian.

1. **λ from sampled rows.** A Ray task per tensor returns one row in s of it (with its
   Hessian rows), stratified by a high-rate estimate of each row's bits (`sample_rows`), s
   chosen so the sample holds about 8 M weights; the driver searches λ on the
   sample so its all-in rate meets the aim (`solve_rows_global_rate`; each λ's evaluation a
   few Ray tasks over runs of the tensors' samples, `executor.BlockMap`), and predicts the bits the file will spend from the sample's coded size
   (one Huffman table per tensor and level count, as the encoder writes them).
2. **Every tensor at that λ,** a Ray task (a unit) each: it solves its rows in slabs, writes
   ``codes/<i>-<λ tag>.safetensors`` (frequency-ranked indices uint8/uint16 [R, C] and the
   per-row codebooks float32 [R, K]) and records the unit with the coded bits it measured.
3. **The exact-rate loop.** The coded bits of every tensor give the file's rate; outside
   [target − 0.015, target] the aim moves by the miss and steps 1–2 run again (at most three
   full passes; the pass closest below the target is kept, the others' codes removed).

A unit's name holds its tensor and its λ, so a rerun after a kill reuses the tensors already
quantized at the λ the (deterministic) search finds again.
"""

from __future__ import annotations

import hashlib
import math
import time
from typing import Any

import numpy as np
import torch

from pipeline.config import RunConfig
from pipeline.encode import rotation
from pipeline.executor import BlockMap, map_units, task_cpus, task_threads
from pipeline.graph import StageContext

__all__ = ["run_quantize_tensors", "CODES", "read_codes", "read_codes_masked", "sample_rows"]

# {"lambda", "codes": {tensor: rel}, "shapes": {tensor: [R, C]}, "rotations": {tensor: seed}}
CODES = "codes.json"
_SAMPLE_WEIGHTS = 8_000_000  # the λ search's sample: about this many weights
_SLAB_WEIGHTS = 1 << 20  # rows solved at once inside a tensor's task
_PASSES = 3


def _h_rows(h: np.ndarray, shape: tuple[int, int], rows) -> np.ndarray:
    """Hessian rows of a tensor: an activation [in] vector broadcast, or a full [out, in]."""
    R, C = shape
    if h.size == C:
        n = len(range(*rows.indices(R))) if isinstance(rows, slice) else len(rows)
        return np.broadcast_to(h.reshape(1, C), (n, C))
    return h.reshape(R, C)[rows]


def _floor_in_place(h: np.ndarray, rel: float) -> None:
    """h float32 raised to at least rel × its mean, in place: `rows.floor_hessian` and
    `rows_stage.embedding_floor` compute the same values into a new array, which for a full
    [V, d] embedding Hessian is one more copy of the largest array of the unit. The mean of an
    [in] vector is the mean of its broadcast [out, in], so the vector is floored as stored."""
    if h.size == 0 or rel <= 0:
        return
    m = float(h.mean(dtype=np.float64))
    if m > 0:
        np.maximum(h, np.float32(rel * m), out=h)


def _tensor_and_hessian(cfg: RunConfig, url: str, opts: dict | None, hess, name: str,
                        shape: tuple[int, int], embedding: bool = False):
    from pipeline.hessian.streamed_stage import read_tensor_hessian
    from pipeline.models.weights import WeightsFolder

    w = WeightsFolder(url, opts)
    info = w.info(name)
    if tuple(info.shape) != tuple(shape):
        raise ValueError(f"{name} is {list(info.shape)} in {url}, {list(shape)} when the run "
                         "was loaded: the model changed; rerun")
    t = w.read(name)
    h = np.require(read_tensor_hessian(hess, name, shape), np.float32, ["C", "W"])
    _floor_in_place(h, cfg.quantize.hessian_floor)  # as rows.floor_hessian
    if embedding:  # then as the resident quantize stage floors embeddings (rows_stage)
        _floor_in_place(h, cfg.quantize.embedding_floor)
    seed = rotation.tensor_seed(cfg.quantize.rotate, cfg.seed, shape[1], embedding)
    if seed is not None:  # quantize.rotate: the rows and their weights in the rotated basis
        from pipeline.hessian.second_moment import read_second_moment

        t = rotation.forward(t.to(torch.float32), seed)
        xtx = read_second_moment(hess, name, shape[1])
        h = rotation.hessian(h) if xtx is None else rotation.hessian_from_moment(h, xtx, seed)
    return t, h, info.dtype, w.bytes_read


def _sample_task(cfg: RunConfig, url: str, opts: dict | None, hess, name: str,
                 shape: tuple[int, int], every: int, row0: int, embedding: bool = False,
                 keep: float | None = None):
    """(the tensor's sampled rows as a RowBlock — their kept weights when pruned —, the bits
    the file spends on the tensor's mask: 0 when it is not pruned)."""
    from pipeline.quantize.rate import RowBlock

    task_threads()
    t, h, _, _ = _tensor_and_hessian(cfg, url, opts, hess, name, shape, embedding)
    rows = sample_rows(t, h, shape, every)
    W = t[torch.from_numpy(rows)].to(torch.float32).numpy()
    if not np.isfinite(W).all():
        raise ValueError(f"tensor {name} has NaN or inf weights")
    H = np.ascontiguousarray(_h_rows(h, shape, rows))
    pos_bits = 0.0
    if keep is not None:
        from pipeline.quantize.sparsity import compact, position_bits

        full = _tensor_mask(cfg, t, h, shape, keep)  # a row's mask depends on that row alone
        W, H = compact(W, full[rows]), compact(H, full[rows])
        pos_bits = position_bits(full, cfg.encode.coder)
    return RowBlock(np.ascontiguousarray(W), H, row0), pos_bits


def _slab_mask(cfg: RunConfig, W: np.ndarray, H: np.ndarray, keep: float) -> np.ndarray:
    """One-shot pruning mask (True = kept) of rows W [r, C] with Hessian rows H."""
    from pipeline.quantize.sparsity import parse_n_m, row_mask, saliency

    p = cfg.prune
    n_m = parse_n_m(p.n_m) if p.n_m else None
    return row_mask(saliency(W, H, p.criterion), keep=keep, n_m=n_m)


def _tensor_mask(cfg: RunConfig, t: torch.Tensor, h: np.ndarray, shape: tuple[int, int],
                 keep: float) -> np.ndarray:
    """The whole tensor's mask, slab by slab (a row's mask depends on that row alone)."""
    R, C = shape
    mask = np.empty((R, C), bool)
    step = max(1, _SLAB_WEIGHTS // max(C, 1))
    for a in range(0, R, step):
        b = min(R, a + step)
        mask[a:b] = _slab_mask(cfg, t[a:b].to(torch.float32).numpy(),
                               np.asarray(_h_rows(h, shape, slice(a, b))), keep)
    return mask


def sample_rows(t: torch.Tensor, h: np.ndarray, shape: tuple[int, int], every: int
                ) -> np.ndarray:
    """int64 [ceil(R / every)] ascending: the rows of a tensor that stand for all of it in the
    λ search, one from each of ceil(R / every) equal strata of its rows ordered by
    log(std(w_r) · sqrt(mean(h_r))). At high rate an ECSQ row at λ spends about that plus a
    constant in bits (its step is ∝ sqrt(λ / h̄_r)), so the strata spread the sample over the
    rows' rates; every s-th row in storage order predicted the file's rate 0.04 bit off on
    a 7B-shaped model (0.1–0.4 bit on rows of heavy-tailed Hessians), forcing a second full
    pass. Deterministic, so a rerun samples the same rows."""
    R, C = shape
    m = max(1, math.ceil(R / max(every, 1)))
    if m >= R:
        return np.arange(R)
    std = np.empty(R, np.float64)
    step = max(1, _SLAB_WEIGHTS // max(C, 1))
    for a in range(0, R, step):
        std[a : a + step] = t[a : a + step].to(torch.float32).std(dim=1).double().numpy()
    hbar = h.reshape(-1, C).mean(axis=1, dtype=np.float64)  # [1] (activation) or [R]
    with np.errstate(divide="ignore", invalid="ignore"):
        score = np.log(std) + 0.5 * np.log(np.broadcast_to(hbar, (R,)))
    score = np.nan_to_num(score, nan=-np.inf)
    order = np.argsort(score, kind="stable")
    return np.sort(order[((np.arange(m) + 0.5) * R / m).astype(np.int64)])


def _opts(cfg: RunConfig, threads: int = 1) -> dict[str, Any]:
    q = cfg.quantize
    o: dict[str, Any] = {"k_max": q.k_max}
    if q.method == "ecsq":
        o.update(iters=q.iters, seed=cfg.seed, bins=q.ecsq_bins)
    if threads > 1:
        o["threads"] = threads
    return o


def _tensor_task(cfg: RunConfig, out, url: str, opts: dict | None, hess, name: str, i: int,
                 shape: tuple[int, int], lam: float, row0: int, tag: str,
                 embedding: bool = False, keep: float | None = None) -> dict:
    """Unit `t<i>-<tag>`: every row of tensor `name` at λ → its codes file and coded bits.
    keep: the fraction one-shot pruning keeps of each row (None: not pruned); the kept
    weights of each row are quantized as a dense row and the mask goes in the codes file."""
    from safetensors.torch import save

    from pipeline.memory import process_peaks, release_memory
    from pipeline.quantize.rate import RowBlock, solve_rows_at
    from pipeline.quantize.rows import index_rate
    from pipeline.quantize.rows import rate as all_in_rate
    from pipeline.quantize.rows_stage import coded_bits
    from pipeline.store import canonical_safetensors
    from pipeline.units import Units

    threads = task_threads()
    q = cfg.quantize
    t, h, dtype, read = _tensor_and_hessian(cfg, url, opts, hess, name, shape, embedding)
    R, C = shape
    step = max(1, _SLAB_WEIGHTS // max(C, 1))
    parts = []
    mask = None if keep is None else np.empty((R, C), bool)
    cut = 0.0  # Σ h·w² of the pruned weights
    for a in range(0, R, step):
        b = min(R, a + step)
        W = t[a:b].to(torch.float32).numpy()
        if not np.isfinite(W).all():
            raise ValueError(f"tensor {name} has NaN or inf weights")
        H = np.ascontiguousarray(_h_rows(h, shape, slice(a, b)))
        if mask is not None:
            from pipeline.quantize.sparsity import compact

            m = mask[a:b] = _slab_mask(cfg, W, H, keep)
            cut += float(np.einsum("ij,ij->", np.where(m, 0.0, np.square(W, dtype=np.float64)),
                                   H))
            W, H = compact(W, m), compact(H, m)
        (res,) = solve_rows_at([RowBlock(W, H, row0 + a)], lam, q.method,
                               **_opts(cfg, threads))
        parts.append(res)
    fb = None
    if q.feedback == "ldl" and not embedding:  # error feedback (quantize/feedback_stage.py)
        from pipeline.quantize.feedback_stage import feedback_tensor

        parts, fb = feedback_tensor(cfg, hess, name, t, h, shape, parts, lam)
    del t, h
    bits = coded_bits(parts, cfg.encode.coder)
    cb, idx = _ranked_codes(parts, R, parts[0].n if parts else C)
    levels = np.concatenate([p.levels for p in parts])
    layer = {"rows": R, "cols": C, "mean_levels": float(levels.mean()),
             "max_levels": int(levels.max()), "index_entropy_bits": index_rate(parts),
             "all_in_bits": all_in_rate(parts), "one_level_rows": int((levels == 1).sum()),
             "weighted_distortion": float(np.concatenate([p.distortion for p in parts]).sum()
                                          / max(R * C, 1))}
    tensors = {}
    if mask is not None:
        from pipeline.quantize.sparsity import expand, position_bits

        bits["positions"] = position_bits(mask, cfg.encode.coder)
        idx = expand(idx, mask)
        layer["kept_fraction"] = float(np.count_nonzero(mask)) / max(R * C, 1)
        # the weighted distortion above is the kept weights' quantization error; this is
        # what cutting the others cost, in the same units (Σ h·w² per weight of the tensor)
        layer["pruned_distortion"] = cut / max(R * C, 1)
        tensors["mask"] = torch.from_numpy(mask.view(np.uint8))
    if fb is not None:
        layer["feedback"] = {**fb, "coded_bits": float(sum(bits.values()))}
    del parts
    idx_t = torch.from_numpy(idx)
    release_memory()
    rel = f"codes/{i:05d}-{tag}.safetensors"
    out.write_bytes(rel, canonical_safetensors(save(
        {"indices": idx_t, "codebooks": torch.from_numpy(cb.astype(np.float32)), **tensors},
        metadata={"tensor": name, "dtype": dtype, "lam": repr(lam)})))
    return Units(out).record(f"t{i:05d}-{tag}", [rel], name=name, bits=bits, layer=layer,
                             bytes_read=read, process=process_peaks())


def _ranked_codes(parts: list, R: int, C: int) -> tuple[np.ndarray, np.ndarray]:
    """(codebooks float32 [R, K], indices uint8 (K ≤ 256) or int16 [R, C]) of a tensor's
    consecutive row slabs, exactly `frequency_ranked(RowsResult.concat(parts))` with the
    indices cast, but ranked slab by slab into the final arrays: the whole-tensor ranking
    holds int64 copies of every index (16 bytes a weight beside the 1–2 stored), which for
    an embedding of 28 M weights is most of its unit's memory."""
    from pipeline.quantize.rows_stage import frequency_ranked

    K = max(p.codebooks.shape[1] for p in parts)
    idx = np.empty((R, C), np.uint8 if K <= 256 else np.int16)
    cb = np.empty((R, K), np.float32)
    a = 0
    for p in parts:
        c, i = frequency_ranked(p)
        b = a + p.rows
        idx[a:b] = i
        cb[a:b, : c.shape[1]] = c
        cb[a:b, c.shape[1] :] = c[:, :1]  # unused slots repeat the row's first level
        a = b
    if a != R:
        raise ValueError(f"the slabs hold {a} rows, the tensor {R}")
    return cb, idx


def read_codes(sd, rel: str, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(indices uint8/int16 [R, C], codebooks float32 [R, K]) of one tensor's codes file, read
    through the stage folder (its sha256 checked against the manifest) and bounded by shape."""

    idx, cb, _ = read_codes_masked(sd, rel, shape)
    return idx, cb


def read_codes_masked(sd, rel: str, shape: tuple[int, int]
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """`read_codes` and the tensor's one-shot pruning mask: bool [R, C] (True = kept), every
    row keeping the same count, or None when the tensor is not pruned."""
    from safetensors.numpy import load

    data = sd.read_bytes(rel)  # checked against the manifest's sha256
    try:
        t = load(data)
        idx, cb = t["indices"], t["codebooks"]
        mask = t.get("mask")
    except Exception as e:  # noqa: BLE001 - safetensors raises its own types on bad input
        raise sd._corrupt(rel, f"not a codes file ({type(e).__name__})") from None
    R, C = shape
    if (idx.shape != (R, C) or idx.dtype not in (np.uint8, np.int16) or cb.dtype != np.float32
            or cb.ndim != 2 or cb.shape[0] != R or not 1 <= cb.shape[1] <= 1 << 15
            or (idx.size and not 0 <= idx.min() <= idx.max() < cb.shape[1])
            or set(t) - {"indices", "codebooks", "mask"}):
        raise sd._corrupt(rel, f"not the codes of a {[R, C]} tensor")
    if mask is not None:
        if mask.shape != (R, C) or mask.dtype != np.uint8 or (mask.size and mask.max() > 1):
            raise sd._corrupt(rel, f"its mask is not a 0/1 mask of a {[R, C]} tensor")
        mask = mask.view(bool)
        kept = mask.sum(axis=1)
        if R and (kept != kept[0]).any():
            raise sd._corrupt(rel, "its mask's rows keep different counts")
    return idx, cb, mask


def _record_fields_wrong(fields: dict, name: str) -> str | None:
    """Why a tensor unit's recorded fields are not those `_tensor_task` writes for `name`
    (a record is read from the store, untrusted), else None."""
    if fields.get("name") != name:
        return f"it is the record of tensor {fields.get('name')!r}, not {name!r}"
    bits = fields.get("bits")
    if not isinstance(bits, dict) or set(bits) - {"positions"} != {
            "indices", "codebooks", "tables", "header"} \
            or not all(type(v) in (int, float) and math.isfinite(v) and v >= 0
                       for v in bits.values()):
        return "its bits are not four (five when pruned) finite counts"
    if not isinstance(fields.get("layer"), dict) or type(fields.get("bytes_read")) is not int:
        return "it has no layer figures or bytes read"
    return None


def _keeps(cfg: RunConfig, names: list[str], embeddings: set[str]) -> dict[str, float]:
    """{tensor: fraction of each row kept} under one-shot pruning; {} without it."""
    from pipeline.config_checks import one_shot
    from pipeline.quantize.sparsity import keeps_for

    return keeps_for(names, cfg.prune.keep, embeddings) if one_shot(cfg) else {}


def _tag(lam: float) -> str:
    return hashlib.sha256(repr(float(lam)).encode()).hexdigest()[:10]


def _predicted_bits(found, shapes: list[tuple[int, int]], sampled: list[int],
                    coder: str = "huffman") -> float:
    """Bits the file would spend at the sample's λ: each tensor's index and codebook bits
    scaled from its sampled rows to all its rows, its tables and header share once."""
    from pipeline.quantize.rows_stage import coded_bits

    total = 0.0
    for res, (R, _), n in zip(found.results, shapes, sampled, strict=True):
        b = coded_bits([res], coder)
        total += (b["indices"] + b["codebooks"]) * R / max(n, 1) + b["tables"] + b["header"]
    return total


def run_quantize_tensors(ctx: StageContext) -> dict[str, Any]:
    from pipeline.models.source import source_url, tensor_order
    from pipeline.quantize.rate import solve_rows_global_rate
    from pipeline.quantize.sparsity import warn_huffman_masks
    from pipeline.units import Units
    from pipeline.workload import MODEL_JSON

    cfg, out, q = ctx.cfg, ctx.out, ctx.cfg.quantize
    t0 = time.perf_counter()
    load, hess = ctx.inputs["load"], ctx.inputs["hessian"]
    meta = load.read_json(MODEL_JSON)
    names: list[str] = tensor_order(meta["quantizable"])
    shapes = {n: tuple(meta["shapes"][n]) for n in names}
    url, opts = source_url(cfg, load)
    weights = sum(R * C for R, C in shapes.values())
    row0, at = {}, 0
    for n in names:
        row0[n] = at
        at += shapes[n][0]
    every = max(1, math.ceil(weights / _SAMPLE_WEIGHTS))
    sample = [None] * len(names)
    embeddings = set(meta.get("embeddings", []))
    keeps = _keeps(cfg, names, embeddings)
    for n in names:  # a width the rotation cannot take fails before any task runs
        if rotation.tensor_seed(q.rotate, cfg.seed, shapes[n][1], n in embeddings) is not None:
            rotation.check_width(shapes[n][1], n)
    pos_bits = [0.0] * len(names)  # what each tensor's mask costs (one-shot pruning)
    for i, (block, pb) in map_units(
            _sample_task, [(cfg, url, opts, hess, n, shapes[n], every, row0[n],
                            n in embeddings, keeps.get(n)) for n in names],
            cpus=task_cpus(1), desc="quantize sample", unit="tensor"):
        sample[i], pos_bits[i] = block, pb
    sampled = [b.W.shape[0] for b in sample]
    phases = {"sample": time.perf_counter() - t0, "search": 0.0, "passes": 0.0}
    if keeps:
        ctx.log.info("quantize: one-shot pruning (%s, %s) of %d tensors; their masks take "
                     "%.4f bits/weight", cfg.prune.criterion, cfg.prune.n_m or "per row",
                     len(keeps), math.fsum(pos_bits) / weights)
        warn_huffman_masks(ctx.log, cfg.encode.coder)
    ctx.log.info("quantize: %s per channel, %d tensors, %d rows, %d weights; λ searched on "
                 "one row in %d, stratified (%d rows)", q.method, len(names), at, weights, every,
                 sum(sampled))
    mapper = BlockMap()
    units = Units(out)
    target = float(q.target_bits)
    aim, lam0, evals, passes, best, reused = target, None, 0, 0, None, 0
    per_kept = 1.0  # the sample's bits per weight over the file's, per bit of the file
    if keeps:  # the sample's rate is per kept weight: what the masks leave, spread over them
        per_kept = weights / max(sum(round(keeps.get(n, 1.0) * R * C)
                                     for n, (R, C) in shapes.items()), 1)
        aim = (target - math.fsum(pos_bits) / weights) * per_kept
    bias = 0.0  # what the full passes so far spent beyond the sample's prediction
    retried = 0  # Ray's retries of this run's tensor units (a worker killed mid-unit)
    while passes < _PASSES:
        # λ on the sample, aimed so the predicted file rate (corrected by the last full
        # pass's miss) is within the window
        t_search = time.perf_counter()
        for _ in range(6):
            found = solve_rows_global_rate(sample, aim, q.method, map_fn=mapper, lam0=lam0,
                                           tol=0.005, **_opts(cfg))
            evals += len(found.evaluations)
            lam0 = found.lam
            pred = (_predicted_bits(found, [shapes[n] for n in names], sampled,
                                    cfg.encode.coder) + math.fsum(pos_bits)) / weights + bias
            ctx.log.info("quantize: λ=%.4g on the sample: predicted %.4f bits/weight in the "
                         "file (aim %.4f, target %.4f)", found.lam, pred, aim, target)
            # the window's middle: the stratified sample's prediction has missed the full
            # pass by up to ~0.006 bit (7B shape), either way
            if target - 0.0105 <= pred <= target - 0.0045 or aim - (pred - target) <= 0:
                break
            aim = aim - (pred - target) * per_kept - 0.0075 * per_kept  # as is when unpruned
        lam = float(found.lam)
        tag = _tag(lam)
        passes += 1
        t_pass = time.perf_counter()
        phases["search"] += t_pass - t_search
        recs: dict[str, dict] = {}
        todo = []
        for i, n in enumerate(names):
            rec = units.done(f"t{i:05d}-{tag}", [f"codes/{i:05d}-{tag}.safetensors"],
                             lambda f, n=n: _record_fields_wrong(f, n))
            if rec is not None:
                recs[n] = rec
                reused += 1
            else:
                todo.append((cfg, out, url, opts, hess, n, i, shapes[n], lam, row0[n], tag,
                             n in embeddings, keeps.get(n)))
        for j, rec in map_units(_tensor_task, todo, cpus=task_cpus(1), gpus="task",
                                desc=f"quantize pass {passes}", unit="tensor"):
            recs[todo[j][5]] = rec
            retried += rec.get("attempt", 0)
        phases["passes"] += time.perf_counter() - t_pass
        coded = math.fsum(sum(recs[n]["fields"]["bits"].values()) for n in names) / weights
        ctx.log.info("quantize: pass %d at λ=%.4g: the file will spend %.4f bits/weight "
                     "(target %.4f; %d tensors reused)", passes, lam, coded, target,
                     len(names) - len(todo))
        if best is None or (coded <= target and (best[0] > target or coded > best[0])) \
                or (best[0] > target and coded < best[0]):
            if best is not None:
                _drop(out, best[3])
            best = (coded, lam, aim, recs)
        else:
            _drop(out, recs)
        if target - 0.015 <= coded <= target:
            break
        bias += coded - pred
    del sample, mapper
    coded, lam, aim, recs = best
    codes = {n: next(iter(recs[n]["outputs"])) for n in names}
    layers = {n: recs[n]["fields"]["layer"] for n in names}
    rotations = {n: s for n in names if (s := rotation.tensor_seed(
        q.rotate, cfg.seed, shapes[n][1], n in embeddings)) is not None}
    out.write_json(CODES, {"lambda": lam, "codes": codes,
                           "shapes": {n: list(shapes[n]) for n in names},
                           **({"rotations": rotations} if rotations else {})})
    out.write_json("layers.json", layers)
    w_levels = sum(layers[n]["mean_levels"] * shapes[n][0] for n in names)
    extra = {"feedback": feedback_summary(layers, names, weights)} if q.feedback != "none" \
        else {}
    if keeps:
        pruned = [n for n in names if "kept_fraction" in layers[n]]
        extra["prune"] = {
            "criterion": cfg.prune.criterion, "n_m": cfg.prune.n_m, "tensors": len(pruned),
            # over every quantized weight (embeddings and tensors not named included)
            "kept_fraction": math.fsum(layers[n].get("kept_fraction", 1.0) * shapes[n][0]
                                       * shapes[n][1] for n in names) / weights,
            "position_bits": math.fsum(recs[n]["fields"]["bits"].get("positions", 0.0)
                                       for n in names) / weights,
            "pruned_distortion": math.fsum(layers[n]["pruned_distortion"] * shapes[n][0]
                                           * shapes[n][1] for n in pruned) / weights}
    return {"quantize": {**extra,
        "method": q.method, "scope": q.scope, "target_bits": q.target_bits,
        "residency": cfg.model.residency, "rows": at, "weights": weights,
        "lambda": lam, "aimed_rate_bits": aim, "coded_rate_bits": coded,
        "index_entropy_bits": math.fsum(layers[n]["index_entropy_bits"] * shapes[n][0]
                                        * shapes[n][1] for n in names) / weights,
        "mean_levels": w_levels / max(at, 1),
        "lambda_evaluations": evals, "full_passes": passes, "sample_every": every,
        "units": {"total": len(names), "reused": reused, "retried": retried},
        "bytes_read": sum(recs[n]["fields"]["bytes_read"] for n in names),
        "weights_per_s": weights * passes / max(time.perf_counter() - t0, 1e-9),
        # where the time went: sampling every tensor's rows, the λ searches on the sample,
        # the full passes (every tensor solved and written)
        "phase_seconds": {k: round(v, 3) for k, v in phases.items()},
        "seconds": round(time.perf_counter() - t0, 3)}}


def feedback_summary(layers: dict[str, dict], names: list[str], weights: int) -> dict:
    """The error feedback over the kept pass's tensors: rows where it beat plain ECSQ, the
    summed objectives, the rate it moved (coded bits/weight, feedback minus plain at the same
    λ) and its seconds."""
    fb = [layers[n]["feedback"] for n in names if "feedback" in layers[n]]
    plain_bits = math.fsum(f["coded_bits_plain"] for f in fb)
    kept = math.fsum(f["coded_bits"] for f in fb)
    return {"tensors": len(fb), "rows": sum(f["rows"] for f in fb),
            "rows_feedback": sum(f["rows_feedback"] for f in fb),
            "tensors_improved": sum(f["rows_feedback"] > 0 for f in fb),
            "objective_plain": math.fsum(f["objective_plain"] for f in fb),
            "objective_final": math.fsum(f["objective_final"] for f in fb),
            "rate_change_bits": (kept - plain_bits) / max(weights, 1),
            "seconds": math.fsum(f["seconds"] for f in fb)}


def _drop(out, recs: dict[str, dict]) -> None:
    """Remove a rejected pass's codes files and unit records."""
    for rec in recs.values():
        for rel in rec["outputs"]:
            out.store.remove(out.rel(rel))
        out.store.remove(out.rel(f"units/{rec['unit']}.json"))
