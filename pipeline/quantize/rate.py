"""One Lagrange multiplier for every row of every tensor: the global rate search.

:func:`solve_rows_global_rate` bisects λ (secant and bisection steps in ln λ) so that the
all-in rate of all rows — index entropy plus codebook and code-table side bits, see
:func:`pipeline.quantize.rows.rate` — meets a target. Each λ is one ``map_fn`` over blocks of
rows (builtin ``map`` or a Ray map) that returns only per-row figures, reduced exactly with
``math.fsum``: the λ found, and every row's result, do not depend on how the rows were split
or in which order the blocks ran.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from .rows import (
    RowsResult,
    check_rows,
    ecsq_rows,
    index_rate,
    rate,
    uniform_rows,
)

__all__ = ["GlobalRowsResult", "RowBlock", "solve_rows_global_rate", "solve_rows_at"]


class RowBlock(NamedTuple):
    """A block of rows: W [R, C], H [R, C] or None, and the global index of its first row
    (seeds depend on it; rows of different tensors should get distinct indices)."""

    W: np.ndarray
    H: np.ndarray | None
    row_offset: int = 0


class _Summary(NamedTuple):
    """What one block sends back per λ during the search: per-row figures, so the driver can
    reduce them exactly whatever the split."""

    index_bits: np.ndarray  # float64 [R], n·H_r
    distortion: np.ndarray  # float64 [R]
    levels: int
    weights: int
    rows: int


@dataclass
class GlobalRowsResult:
    """The outcome of :func:`solve_rows_global_rate`.

    lam: the λ found. results: one RowsResult per block, in the order of ``blocks``.
    rate: all-in bits/weight (see :func:`rate`); index_rate: index entropy only; side_rate:
    codebooks + tables. distortion: Σ_r D_r (exact sum). weights, rows: totals.
    evaluations: one dict per λ tried (lam, rate, index_rate, distortion), in order.
    """

    lam: float
    results: list[RowsResult]
    rate: float
    index_rate: float
    side_rate: float
    distortion: float
    weights: int
    rows: int
    evaluations: list[dict[str, float]]
    info: dict[str, Any] = field(default_factory=dict)


def _normalize_blocks(blocks) -> list[RowBlock]:
    out: list[RowBlock] = []
    nxt = 0
    for b in blocks:
        if isinstance(b, RowBlock):
            rb = b
        else:
            t = tuple(b)
            if len(t) not in (2, 3):
                raise ValueError("a block is (W, H) or (W, H, row_offset)")
            rb = RowBlock(t[0], t[1], int(t[2]) if len(t) == 3 else nxt)
        out.append(rb)
        nxt = rb.row_offset + int(np.shape(rb.W)[0])
    return out


def _solve_block(block: RowBlock, lam: float, method: str, opts: dict[str, Any]) -> RowsResult:
    W, H, off = block
    if method == "ecsq":
        return ecsq_rows(W, H, lam, row_offset=off, **opts)
    if method == "uniform":
        return uniform_rows(W, H, lam, row_offset=off, **opts)
    raise ValueError(f"method must be 'ecsq' or 'uniform', got {method!r}")


def _eval_block(block: RowBlock, *, lam: float, method: str, opts: dict[str, Any],
                full: bool) -> RowsResult | _Summary:
    """One block at one λ: its full result, or only the per-row figures the search needs.
    A module-level function (picklable with functools.partial), for any map_fn."""
    res = _solve_block(block, lam, method, opts)
    if full:
        return res
    return _Summary(res.index_bits(), res.distortion, int(res.levels.sum(dtype=np.int64)),
                    res.rows * res.n, res.rows)


def _scale_block(block: RowBlock) -> _Summary:
    """Per-row distortion of one level (the weighted mean): the rate-0 end of every curve."""
    W, H = check_rows(block.W, block.H, None)
    Sh = H.sum(axis=1, dtype=np.float64)
    mu = np.where(Sh > 0, (H * W).sum(axis=1, dtype=np.float64) / np.where(Sh > 0, Sh, 1.0),
                  W.mean(axis=1, dtype=np.float64) if W.shape[1] else 0.0)
    D = (H * (W - mu[:, None]) ** 2).sum(axis=1, dtype=np.float64)
    return _Summary(np.zeros(W.shape[0]), D, W.shape[0], W.size, W.shape[0])


def _reduce(parts: Sequence[_Summary], side_bits: float) -> dict[str, float]:
    weights = sum(p.weights for p in parts)
    rows = sum(p.rows for p in parts)
    levels = sum(p.levels for p in parts)
    ib = math.fsum(np.concatenate([p.index_bits for p in parts]).tolist()) if parts else 0.0
    D = math.fsum(np.concatenate([p.distortion for p in parts]).tolist()) if parts else 0.0
    w = max(weights, 1)
    return {"rate": (ib + side_bits * levels) / w, "index_rate": ib / w,
            "side_rate": side_bits * levels / w, "distortion": D, "weights": weights,
            "rows": rows, "levels": levels}


def solve_rows_global_rate(blocks: Sequence[RowBlock | tuple], target_bits: float,
                           method: str = "ecsq", *, tol: float = 0.01,
                           codebook_bits: float = 16.0, table_bits: float = 4.0,
                           level_cost: bool = True,
                           map_fn: Callable[[Callable, Sequence], Iterable] = map,
                           max_evals: int = 40, lam0: float | None = None,
                           **opts: Any) -> GlobalRowsResult:
    """One λ for every row of every block, found so the all-in rate is target_bits ± tol.

    blocks: RowBlock(W [R, C], H [R, C] or None, row_offset) or (W, H[, row_offset]) tuples
    (without offsets, rows are numbered consecutively in list order); all rows of all tensors,
    any split (row ranges of a tensor, whole tensors, group rows from :func:`to_groups`).
    The rate met is the all-in :func:`rate` (index entropy + (codebook_bits + table_bits)
    per level per row) over all blocks; ``index_rate`` reports the entropy alone. With
    level_cost (default) the per-row solvers also charge λ·(codebook_bits + table_bits) per
    level, so the Lagrangian they minimise is the one of the rate being met.
    method: "ecsq" (:func:`ecsq_rows`) or "uniform" (:func:`uniform_rows`); opts go to it.

    Search: a first map pass measures every row's one-level distortion D⁰; the first λ is the
    high-rate guess 2 ln2 · (ΣD⁰/N) · 4^(−target); then secant steps on (ln λ, rate) inside a
    bracket (falling back to bisection in ln λ), at most e³ per step outside one. Each λ is
    one ``map_fn(fn, blocks)`` with fn a picklable ``functools.partial`` that returns only
    per-row figures; after the search one more map returns the full results at the λ found.
    map_fn(fn, items) must return fn(item) for each item, in order (builtin map, a process
    pool's map, a Ray map). Per-row figures are summed exactly (math.fsum), so λ and every
    row's result are the same whatever the split of the rows into blocks and the order of
    evaluation. ValueError if the target is below the one-level floor or above what λ = 0
    reaches; RuntimeError if the rate jumps over target ± tol (too few rows).
    lam0: the first λ to try instead of the high-rate guess (e.g. a previous solve's λ).
    """
    t0 = time.perf_counter()
    T = float(target_bits)
    if not (math.isfinite(T) and T >= 0):
        raise ValueError(f"target_bits must be finite and >= 0, got {target_bits}")
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    if method not in ("ecsq", "uniform"):
        raise ValueError(f"method must be 'ecsq' or 'uniform', got {method!r}")
    bl = _normalize_blocks(blocks)
    if not bl:
        raise ValueError("no blocks to quantize")
    side_bits = float(codebook_bits) + float(table_bits)
    opts = dict(opts)
    if level_cost:
        opts.setdefault("level_bits", side_bits)
    scale = _reduce(list(map_fn(_scale_block, bl)), side_bits)
    N = scale["weights"]
    if N == 0:
        raise ValueError("the blocks hold no weights")
    floor = side_bits * scale["rows"] / N
    if T < floor - tol:
        raise ValueError(f"target_bits={T} is below the floor of {floor:.4f} bits/weight: every "
                         f"row keeps at least one level ({scale['rows']} rows × {side_bits:g} "
                         f"bits over {N} weights)")
    evals: list[dict[str, float]] = []

    def measure(lam: float) -> float:
        fn = functools.partial(_eval_block, lam=lam, method=method, opts=opts, full=False)
        red = _reduce(list(map_fn(fn, bl)), side_bits)
        evals.append({"lam": lam, **{k: red[k] for k in ("rate", "index_rate", "distortion")}})
        return red["rate"]

    D0 = max(scale["distortion"] / N, 1e-300)
    x = (math.log(lam0) if lam0 is not None and lam0 > 0 else
         math.log(2 * math.log(2) * D0 * 4.0 ** (-max(T - floor, 0.0))))
    lo = hi = None  # (ln λ, rate): lo has rate > T, hi rate < T
    best: tuple[float, float] | None = None  # (|rate − T|, λ)
    prev = None
    tried_zero = False
    for _ in range(max_evals):
        lam = math.exp(x)
        rt = measure(lam)
        if best is None or abs(rt - T) < best[0]:
            best = (abs(rt - T), lam)
        if best[0] <= tol:
            break
        if rt > T:
            lo = (x, rt) if lo is None or x > lo[0] else lo
        else:
            hi = (x, rt) if hi is None or x < hi[0] else hi
        if lo is not None and hi is not None:
            width = hi[0] - lo[0]
            if width < 1e-9:
                break
            x_new = lo[0] + (lo[1] - T) / (lo[1] - hi[1]) * width if lo[1] > hi[1] else math.nan
            if not (lo[0] + 0.1 * width <= x_new <= hi[0] - 0.1 * width):
                x_new = lo[0] + 0.5 * width
        else:
            if rt < T and not tried_zero:
                # Below the target with no bracket yet: is the target reachable at all?
                tried_zero = True
                r0 = measure(0.0)
                if r0 < T - tol:
                    raise ValueError(f"target_bits={T} is unreachable: λ = 0 gives "
                                     f"{r0:.4f} bits/weight (raise k_max, or quantize.serve_bits "
                                     "where it caps k_max)")
                if abs(r0 - T) <= tol:
                    best = (abs(r0 - T), 0.0)
                    break
            # High-rate slope: the rate falls by ½ bit per doubling of λ; measured if possible.
            slope = -0.5 / math.log(2)
            if prev is not None and x != prev[0] and (rt - prev[1]) / (x - prev[0]) < 0:
                slope = (rt - prev[1]) / (x - prev[0])
            x_new = x + max(-3.0, min(3.0, (T - rt) / slope))
        prev = (x, rt)
        x = x_new
    assert best is not None
    if best[0] > tol:
        raise RuntimeError(f"no λ gives an all-in rate within {tol} of {T}: the rate jumps "
                           f"between {lo and lo[1]} and {hi and hi[1]} bits near "
                           f"λ ≈ {math.exp(x):.4g} (too few rows, or raise max_evals)")
    lam = best[1]
    fn = functools.partial(_eval_block, lam=lam, method=method, opts=opts, full=True)
    results = list(map_fn(fn, bl))
    rt = rate(results, codebook_bits, table_bits)
    ir = index_rate(results)
    D = math.fsum(np.concatenate([r.distortion for r in results]).tolist())
    return GlobalRowsResult(
        lam=lam, results=results, rate=rt, index_rate=ir, side_rate=rt - ir, distortion=D,
        weights=N, rows=scale["rows"], evaluations=evals,
        info={"method": method, "target_bits": T, "tol": tol, "codebook_bits": codebook_bits,
              "table_bits": table_bits, "level_cost": level_cost, "floor_bits": floor,
              "seconds": time.perf_counter() - t0})


def solve_rows_at(blocks: Sequence[RowBlock | tuple], lam: float, method: str = "ecsq", *,
                  codebook_bits: float = 16.0, table_bits: float = 4.0,
                  level_cost: bool = True,
                  map_fn: Callable[[Callable, Sequence], Iterable] = map,
                  **opts: Any) -> list[RowsResult]:
    """Every row of every block solved at one given λ (the last pass of
    :func:`solve_rows_global_rate`, e.g. at a λ found on a sample of the rows)."""
    if method not in ("ecsq", "uniform"):
        raise ValueError(f"method must be 'ecsq' or 'uniform', got {method!r}")
    opts = dict(opts)
    if level_cost:
        opts.setdefault("level_bits", float(codebook_bits) + float(table_bits))
    fn = functools.partial(_eval_block, lam=lam, method=method, opts=opts, full=True)
    return list(map_fn(fn, _normalize_blocks(blocks)))
