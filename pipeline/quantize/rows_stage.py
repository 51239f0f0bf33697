"""The `quantize` stage for models loaded by the load stage: one codebook per output channel.

Every row (output channel) of every quantized tensor gets its own small codebook:

- `hw_kmeans` / `kmeans`: k levels per row (best of `n_init` starts per row, then Lloyd);
- `uniform` / `ecsq`: one Lagrange multiplier λ for every row of every tensor, found by
  bisection so that the all-in rate (index entropy + 16-bit codebook entries + a 4-bit code
  length per level) meets `quantize.target_bits` (`pipeline.quantize.rate`). Rows where bits buy
  the most distortion get more levels; there is no per-layer bit allocation.

The driver reads the model and the Hessian once, cuts the rows into blocks of about a million
weights and puts each block in Ray's object store once; every λ tried is one Ray task per
block returning only per-row figures (so λ and every row's result are independent of the
split). Codebook values are rounded to fp16 (what `.hwq` stores), so the quantized model
evaluated here is exactly the one the file decodes to.

Each row's levels are stored most-frequent first: index 0 is the row's most used level, so the
rows of a tensor with the same number of levels share one Huffman table (the encoder groups
them) with little loss against per-row codes.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import numpy as np
import torch

from pipeline.executor import BlockMap, call, task_threads
from pipeline.graph import StageContext
from pipeline.quantize.artifacts import QuantizedModel
from pipeline.quantize.rows import RowsResult

__all__ = ["run_rows", "frequency_ranked"]

_BLOCK_WEIGHTS = 1 << 20  # weights per Ray task
_SAMPLE = 8  # the λ search runs on every 8th row (when there are at least 512 rows)


def frequency_ranked(res: RowsResult) -> tuple[np.ndarray, np.ndarray]:
    """(codebooks [R, K] float32, indices [R, C]) with each row's levels reordered by use,
    most used first (ties by value order); unused slots repeat the row's first level."""
    order = np.argsort(-res.counts, axis=1, kind="stable")
    cb = np.take_along_axis(res.codebooks, order, axis=1).astype(np.float32)
    inverse = np.argsort(order, axis=1)
    idx = np.take_along_axis(inverse, res.indices.astype(np.int64), axis=1)
    used = np.take_along_axis(res.counts, order, axis=1) > 0
    cb = np.where(used, cb, cb[:, :1])
    return cb, idx


def _kmeans_block(block, *, k: int, weighted: bool, n_init: int, iters: int, tol: float,
                  seed: int) -> RowsResult:
    from pipeline.quantize.rows import kmeans_rows

    W, H, off = block
    return kmeans_rows(W, H, k, n_init=n_init, iters=iters, seed=seed, row_offset=off,
                       weighted=weighted, tol=tol)


def coded_bits(parts: list[RowsResult], coder: str = "huffman") -> dict[str, float]:
    """Bits the .hwq file spends on the rows of one tensor (`parts`: its row blocks): the
    frequency-ranked indices of the rows with L levels share one static code (one table per
    level count, as the encoder writes them: Huffman, or rANS with `coder` "ans", which
    spends within a few hundredths of a percent of the entropy where Huffman cannot go below
    a bit a symbol), fp16 codebook entries of the levels each row uses, a level count a row,
    and the tables' bytes."""
    from pipeline.encode.coders import make_table

    K = max(p.counts.shape[1] for p in parts)
    hists: dict[int, np.ndarray] = {}
    levels = rows = 0
    for p in parts:
        ranked = -np.sort(-p.counts, axis=1)
        for L in np.unique(p.levels):
            h = ranked[p.levels == L, :L].sum(axis=0).astype(np.int64)
            hists[int(L)] = hists.get(int(L), np.zeros(int(L), np.int64)) + h
        levels += int(p.levels.sum())
        rows += p.rows
    index = tables = 0.0
    for h in hists.values():
        if h.size > 1:
            t = make_table(h, coder)
            index += t.cost_bits(h)
            tables += 8.0 * t.table_bytes()
    # The header's share: ~28 bytes a (level count) stream once compressed, measured on
    # SmolLM2's file, plus the tensor's own entry.
    return {"indices": index, "codebooks": 16.0 * levels + (8 if K <= 255 else 16) * rows,
            "tables": tables, "header": 8.0 * (28 * len(hists) + 60)}


def embedding_floor(H: np.ndarray, rel: float, name: str = "", log: Any = None) -> np.ndarray:
    """H [V, C] of an embedding (or head) with every value raised to at least `rel` × its
    mean. The Fisher of a token's row comes from the windows it occurs in (and, for a head,
    from its predicted probability): rows of tokens the calibration text never shows are ~0,
    would get one level each, and such a token would read and score as a constant vector."""
    m = float(H.mean(dtype=np.float64))
    if rel <= 0 or m <= 0:
        return H
    low = H.mean(axis=1) < rel * m
    if log is not None:
        log.info("quantize: %s: %d of %d rows below the embedding floor (%.3g × the mean)",
                 name, int(low.sum()), H.shape[0], rel)
    return np.maximum(H, np.float32(rel * m))


def _divisor_near(n: int, g: int) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - g), -d))


def _as_rows(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().reshape(t.shape[0], -1).numpy()


def _evaluate_task(cfg, src, out) -> dict:
    from pipeline.workload import Workload

    task_threads()
    return Workload(cfg).evaluate_quantized(src, QuantizedModel.read(out))


def _coded_rate(results, owner, names, weights, coder: str = "huffman") -> float:
    total = 0.0
    for n in names:
        total += sum(coded_bits([r for r, o in zip(results, owner, strict=True) if o == n],
                                coder).values())
    return total / max(weights, 1)


def run_rows(ctx: StageContext) -> dict:
    from pipeline.config_checks import one_shot, parse_n_m
    from pipeline.hessian.stage import read_hessian
    from pipeline.quantize.rate import RowBlock, solve_rows_at, solve_rows_global_rate
    from pipeline.quantize.rows import floor_hessian, index_rate, to_groups
    from pipeline.quantize.rows import rate as all_in_rate
    from pipeline.quantize.sparsity import (
        compact,
        expand,
        keeps_for,
        position_bits,
        row_mask,
        saliency,
        warn_huffman_masks,
    )
    from pipeline.train.stage import model_stage
    from pipeline.workload import MODEL_JSON, Workload

    cfg, q, out = ctx.cfg, ctx.cfg.quantize, ctx.out
    t0 = time.perf_counter()
    src = ctx.inputs[model_stage(cfg)]
    hess = ctx.inputs.get("hessian")
    meta = src.read_json(MODEL_JSON)
    names: list[str] = meta["quantizable"]
    state = src.read_safetensors("model.safetensors")
    shapes = {n: tuple(state[n].shape) for n in names}
    H_all = read_hessian(hess, shapes, names=names) if hess is not None else None
    embeddings = set(meta.get("embeddings", []))

    blocks: list[RowBlock] = []
    owner: list[str] = []
    row0 = 0
    group = q.scope == "group"
    keeps = keeps_for(names, cfg.prune.keep, embeddings) if one_shot(cfg) else {}
    masks: dict[str, np.ndarray] = {}
    pos_bits = cut = 0.0  # the masks' bits; Σ h·w² of the pruned weights
    for n in names:
        W = _as_rows(state[n])
        if not np.isfinite(W).all():
            raise ValueError(f"tensor {n} has NaN or inf weights; the model stage is broken")
        H = None
        if H_all is not None:
            H = floor_hessian(H_all[n].reshape(W.shape), q.hessian_floor)
            if n in embeddings:
                H = embedding_floor(H, q.embedding_floor, n, ctx.log)
        if n in keeps:  # one-shot pruning: each row's kept weights, quantized as a row
            p = cfg.prune
            m = masks[n] = row_mask(saliency(W, H, p.criterion), keep=keeps[n],
                                    n_m=parse_n_m(p.n_m) if p.n_m else None)
            pos_bits += position_bits(m, cfg.encode.coder)
            if H is not None:
                cut += float(np.dot(np.square(W[~m], dtype=np.float64), H[~m]))
            W, H = compact(W, m), None if H is None else compact(H, m)
        if group:  # rows of group_size consecutive input columns
            if W.shape[1] % q.group_size:
                raise ValueError(f"quantize.group_size={q.group_size} does not divide the "
                                 f"{W.shape[1]} columns of {n}; choose a divisor (e.g. "
                                 f"{_divisor_near(W.shape[1], q.group_size)})")
            W, H = to_groups(W, H, q.group_size, name=n)
        step = max(1, _BLOCK_WEIGHTS // max(W.shape[1], 1))
        for a in range(0, W.shape[0], step):
            b = min(W.shape[0], a + step)
            blocks.append(RowBlock(np.ascontiguousarray(W[a:b]),
                                   None if H is None else np.ascontiguousarray(H[a:b]),
                                   row0 + a))
            owner.append(n)
        row0 += W.shape[0]
    del H_all
    weights = sum(int(np.prod(shapes[n])) for n in names)
    if keeps:
        warn_huffman_masks(ctx.log, cfg.encode.coder)
    ctx.log.info("quantize: %s per %s, %d tensors, %d rows, %d weights in %d Ray blocks",
                 q.method, f"group of {q.group_size}" if group else "channel", len(names),
                 row0, weights, len(blocks))
    mapper = BlockMap()
    info: dict[str, Any] = {}
    if q.method in ("uniform", "ecsq"):
        opts: dict[str, Any] = {"k_max": q.k_max}
        if q.method == "ecsq":
            opts.update(iters=q.iters, seed=cfg.seed, bins=q.ecsq_bins)
        # The search meets a rate model (per-row entropy + 20 bits a level); the file codes
        # the indices with one Huffman table per tensor and level count. Aim lower by the
        # measured difference until the bits the file will spend are within 0.015 below the
        # target (one or two corrections).
        # λ is searched on a sample of the rows (every SAMPLE-th row of every block: the rate
        # is a mean over rows), then every row is solved once at the λ found.
        sample = [RowBlock(b.W[::_SAMPLE], None if b.H is None else b.H[::_SAMPLE],
                           b.row_offset) for b in blocks] if row0 >= 64 * _SAMPLE else blocks
        # the masks' bits (one-shot pruning) are known and do not depend on λ: aimed below
        # the masks' bits (one-shot pruning) are known and do not depend on λ; the blocks'
        # rate is per kept weight: aim at what the masks leave, spread over the kept weights
        target, lam0, evals = float(q.target_bits), None, []
        per_kept = weights / max(sum(b.W.size for b in blocks), 1)  # 1 when none is pruned
        aim = target if not masks else (target - pos_bits / max(weights, 1)) * per_kept
        passes, best = 0, None
        while passes < 3:
            passes += 1
            found = solve_rows_global_rate(sample, aim, q.method, map_fn=mapper, lam0=lam0,
                                           tol=0.005, **opts)
            evals += found.evaluations
            results = (found.results if sample is blocks else
                       solve_rows_at(blocks, found.lam, q.method, map_fn=mapper, **opts))
            coded = _coded_rate(results, owner, names, weights, cfg.encode.coder) + \
                pos_bits / max(weights, 1)
            ctx.log.info("quantize: λ=%.4g: planned %.4f, coded %.4f bits/weight (target %.4f)",
                         found.lam, all_in_rate(results), coded, target)
            # Keep the pass closest to the target from below (or the lowest, if none is).
            if best is None or (coded <= target and (best[0] > target or coded > best[0])) \
                    or (best[0] > target and coded < best[0]):
                best = (coded, found.lam, aim, results)
            # Within 0.015 bit below the target, never above it.
            if target - 0.015 <= coded <= target or aim - (coded - target) <= 0:
                break
            aim, lam0 = aim - (coded - target) * per_kept - 0.005 * per_kept, found.lam
        coded, lam, aim, results = best
        best = found = None  # the rows kept are `results`
        info = {"lambda": lam, "planned_rate_bits": all_in_rate(results),
                "aimed_rate_bits": aim, "coded_rate_bits": coded,
                "lambda_evaluations": len(evals), "full_passes": passes,
                "sample_rows": 1 if sample is blocks else _SAMPLE, "evaluations": evals}
    else:
        fn = functools.partial(_kmeans_block, k=int(q.k), weighted=q.method == "hw_kmeans",
                               n_init=q.n_init, iters=q.iters, tol=q.tol, seed=cfg.seed)
        results = mapper(fn, blocks)
    del mapper, blocks  # the Ray object store's copies go with the last references
    if q.method in ("uniform", "ecsq"):
        del sample

    codebooks: dict[str, torch.Tensor] = {}
    indices: dict[str, torch.Tensor] = {}
    layers: dict[str, Any] = {}
    for n in names:
        parts = [r for r, o in zip(results, owner, strict=True) if o == n]
        r = RowsResult.concat(parts)
        cb, idx = frequency_ranked(r)
        if n in masks:
            idx = expand(idx, masks[n])
        codebooks[n] = torch.from_numpy(cb)
        indices[n] = torch.from_numpy(idx).reshape(shapes[n])
        layers[n] = {"rows": r.rows, "cols": r.n,
                     "mean_levels": float(r.levels.mean()), "max_levels": int(r.levels.max()),
                     "index_entropy_bits": index_rate(r),
                     "all_in_bits": all_in_rate(r),
                     "one_level_rows": int((r.levels == 1).sum()),
                     "weighted_distortion": float(r.distortion.sum() / max(r.rows * r.n, 1))}
        if n in masks:
            layers[n]["cols"] = int(masks[n].shape[1])
            layers[n]["kept_fraction"] = float(masks[n].mean())
    raw = [n for n in state if n not in set(names)]
    overall = {"index_entropy_bits": index_rate(results), "all_in_bits": all_in_rate(results)}
    del state, results
    QuantizedModel(scope=q.scope, method=q.method, codebooks=codebooks, indices=indices,
                   assignment={n: n for n in names}, raw=raw,
                   masks={n: torch.from_numpy(m).reshape(shapes[n]) for n, m in masks.items()}
                   ).write(out)
    if keeps:
        info["prune"] = {
            "criterion": cfg.prune.criterion, "n_m": cfg.prune.n_m, "tensors": len(masks),
            "kept_fraction": (weights - sum(int((~m).sum()) for m in masks.values()))
            / max(weights, 1),
            "position_bits": pos_bits / max(weights, 1),
            "pruned_distortion": cut / max(weights, 1)}
    out.write_json("layers.json", layers)
    ev = call(_evaluate_task, cfg, src, out, cpus="worker", gpus="task")
    wl = Workload(cfg)
    return {
        **wl.metric_fields("quantized", ev),
        "quantize": {"method": q.method, "scope": q.scope, "target_bits": q.target_bits,
                     "group_size": q.group_size if group else None,
                     "k": q.k, "rows": row0, "weights": weights,
                     **overall,
                     "seconds": round(time.perf_counter() - t0, 3), **info},
    }
