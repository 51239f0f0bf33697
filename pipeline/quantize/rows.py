"""Per-row quantizers under one global Lagrange multiplier (channel and group scope).

For language models hwq quantizes every output channel (row of a weight matrix) with its own
small codebook, or every group of g consecutive input columns of a row ("group scope", see
:func:`to_groups`). The paper's case for quantizing all layers together becomes, per row:
minimise ``Σ_r D_r + λ·Σ_r B_r`` over every row r of every tensor, with

* ``D_r = Σ_i h_i (w_i − c_{a(i)})²`` the Hessian-weighted distortion of the row (a *sum*
  over the row, not a mean), and
* ``B_r = n_r·H_r + b·L_r`` its bits: ``n_r`` weights at the entropy ``H_r`` (bits/weight) of
  the row's indices, plus ``b`` bits for each of its ``L_r`` levels (an fp16 codebook entry,
  16 bits, plus its share of a code table; ``b = 0`` gives the plain ECSQ objective).

At the optimum every row has the same slope −dD_r/dB_r = λ, so one λ shared by every row of
every tensor allocates the rate: sensitive rows get more levels, insensitive ones fewer, with
no per-layer bit allocation. Rows are independent given λ, so :func:`pipeline.quantize.rate.solve_rows_global_rate`
bisects λ over a *map* of per-block evaluations (builtin ``map``, or a Ray map) and reduces
only per-row rate figures, exactly (``math.fsum``), so the λ it finds — and every row's
result — does not depend on how the rows were split into blocks or in which order the blocks
were evaluated. That search lives in :mod:`pipeline.quantize.rate`, the numba kernels in
:mod:`pipeline.quantize.row_kernels`.

Representation (:class:`RowsResult`)
------------------------------------
``codebooks`` float32 [R, K]: row r's levels are ``codebooks[r, :levels[r]]``, ascending;
slots ``>= levels[r]`` repeat the row's last level (padding, never referenced, kept finite so
the array can be written as fp16 as is). ``indices`` [R, C] uint8 (K ≤ 256) or uint16.
K is the largest ``levels[r]`` of the block. Every level of a row is used (``counts > 0``).
After :func:`round_codebooks_fp16` (on by default: ``fp16=True``) every codebook value is
exactly representable in float16, and ``distortion`` is that of the rounded values.

Algorithms
----------
* :func:`ecsq_rows` — iterative ECSQ per row (Chou–Lookabaugh–Gray), one numba kernel over
  rows, from k_max levels; assignment ``argmin_j h_i (w_i − c_j)² − λ log2 p_j``, exact (the
  bound of ``kernels``' outward scan from the nearest centre), weighted-mean centres (rounded to float32, so the
  objective cannot increase), ``p_j = |C_j| / n``, empty levels dropped. With a level cost
  ``b > 0`` each iteration also removes the levels whose removal lowers the Lagrangian
  (members moved to their second-best level; a set of removals whose moves do not interact,
  so the decrease is exact). Never increases ``D_r + λ B_r`` (tested).
* :func:`uniform_rows` — entropy-coded uniform quantization per row: thresholds at
  ``(m ± ½)·Δ_r`` (0 is a bin centre), each level the Hessian-weighted mean of its bin. With
  λ, each row picks Δ_r from a fixed log grid relative to its weighted standard deviation
  (plus "one level"), minimising ``D_r(Δ) + λ B_r(Δ)``: exact over that finite set, so a
  row's rate never increases with λ.
* :func:`kmeans_rows` — a thin wrapper over ``channel.solve_channels`` (Hessian-weighted k-means
  per row, best of n_init starts per row) returning a :class:`RowsResult`.

Speed (synthetic Laplacian-mixture weights with lognormal h, one core of the shared 2-core
development machine, numba kernels compiled and cached): ECSQ at ~3.5–4 bits/weight on a
4096×4096 matrix (rows of 4096, k_max = 64, ~24 iterations) 2.5 M weights/s without a level
cost and 1.5 M/s with one (level_bits = 20); rows of 128 (group scope, k_max = 16–32)
5–8 M/s; uniform (57 candidate steps) 4–5 M/s on rows of 1536–4096, 3.5 M/s on rows of 128.
Row ranges on 2 threads scale ~2×. A whole :func:`solve_rows_global_rate` over 10.6 M
weights on 2 threads took 9–14 s (4–5 λ evaluations, plus the scale and final passes, at
~4.6 M weights/s), so ~106 M weights (SmolLM2-135M) take ~25 s per λ and a few minutes in all.
Each penalised ECSQ pass costs ~17 ns/weight: the nearest centre by a branch-free count, the
window of ±2 levels around it with selects, the rare exact continuation in a separate loop.
"""
from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .backend import DataSummary, code_dtype, read_only, run_ranges, subject_of
from .channel import hash_uniforms, solve_channels, sort_order
from .kernels import ch_init_kernel
from .row_kernels import bin_rows_kernel, ecsq_kernel, ecuq_kernel, entropy_kernel, sse_kernel

__all__ = [
    "DEFAULT_REL_STEPS",
    "RowsResult",
    "check_rows",
    "ecsq_rows",
    "floor_hessian",
    "from_groups",
    "index_rate",
    "kmeans_rows",
    "lagrangian",
    "rate",
    "round_codebooks_fp16",
    "to_groups",
    "uniform_rows",
]

# Candidate uniform steps, relative to a row's weighted standard deviation: quarter octaves
# from σ/1024 (≈ every weight its own bin on a 4096-row) to 16σ (one or two bins).
DEFAULT_REL_STEPS = 2.0 ** (np.arange(-40, 17) / 4.0)
# ecsq_rows(bins=b) bins the rows of at least this many times b weights (shorter rows save
# little and are solved exactly).
BINNED_FACTOR = 8
# ... over the row's mean ± this many standard deviations, the weights beyond one by one.
BIN_SPREAD = 6.0
# Largest finite float16.
_FP16_MAX = 65504.0


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass
class RowsResult:
    """One small codebook per row of a block W [R, C].

    codebooks: float32 [R, K]; row r's levels are codebooks[r, :levels[r]], ascending, every
    one used; slots >= levels[r] repeat the last level (padding, never referenced).
    indices: [R, C] uint8 (K ≤ 256) or uint16, values < levels[r].
    levels: int32 [R]. counts: int32 [R, K] members per level (0 in the padding).
    distortion: float64 [R], D_r = Σ_i h_i (w_i − ŵ_i)² (a sum over the row, with the reported
    codebook values, i.e. after fp16 rounding when ``info["fp16"]``).
    entropy: float64 [R], entropy of the row's indices in bits per weight.
    lam: the λ the block was solved at (NaN for k-means). row_offset: global index of row 0
    (seeds depend on it). method: "ecsq", "uniform", "hw_kmeans" or "kmeans".
    info: method details (iterations, uniform steps, timings, level_bits, fp16 ...).
    """

    codebooks: np.ndarray
    indices: np.ndarray
    levels: np.ndarray
    counts: np.ndarray
    distortion: np.ndarray
    entropy: np.ndarray
    lam: float = math.nan
    row_offset: int = 0
    method: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return int(self.indices.shape[0])

    @property
    def n(self) -> int:
        """Row length C (weights per row)."""
        return int(self.indices.shape[1])

    def dequantize(self) -> np.ndarray:
        """Ŵ [R, C] float32."""
        return np.take_along_axis(self.codebooks, self.indices.astype(np.int64), axis=1)

    def index_bits(self) -> np.ndarray:
        """Σ_i of each row's index bits at its entropy: float64 [R] (n·H_r)."""
        return self.entropy * float(self.n)

    @staticmethod
    def concat(parts: Sequence[RowsResult]) -> RowsResult:
        """Stack results of consecutive row ranges (padding widened to the largest K)."""
        if not parts:
            raise ValueError("nothing to concatenate")
        K = max(p.codebooks.shape[1] for p in parts)
        dt = code_dtype(K)
        cbs, cnts = [], []
        for p in parts:
            cb, ct = p.codebooks, p.counts
            if cb.shape[1] < K:
                cb = np.concatenate([cb, np.repeat(cb[:, -1:], K - cb.shape[1], axis=1)], axis=1)
                ct = np.concatenate([ct, np.zeros((ct.shape[0], K - ct.shape[1]), ct.dtype)],
                                    axis=1)
            cbs.append(cb)
            cnts.append(ct)
        cat = np.concatenate
        info = dict(parts[0].info)
        # Per-row arrays in info (iterations, uniform steps, ...) are stacked like the rest.
        for key in list(info):
            vals = [p.info.get(key) for p in parts]
            if all(isinstance(v, np.ndarray) and v.ndim >= 1 and v.shape[0] == p.rows
                   for v, p in zip(vals, parts, strict=True)):
                try:
                    info[key] = cat(vals)
                except ValueError:  # e.g. histories of different lengths
                    del info[key]
        info["parts"] = len(parts)
        return RowsResult(
            codebooks=cat(cbs), indices=cat([p.indices.astype(dt) for p in parts]),
            levels=cat([p.levels for p in parts]), counts=cat(cnts),
            distortion=cat([p.distortion for p in parts]),
            entropy=cat([p.entropy for p in parts]), lam=parts[0].lam,
            row_offset=parts[0].row_offset, method=parts[0].method, info=info)


def _trim(out_c, out_idx, out_L, out_cnt, dist, ent, *, lam, row_offset, method, info):
    """RowsResult with the codebook width cut to the largest level count used."""
    K = max(int(out_L.max()) if out_L.size else 1, 1)
    dt = code_dtype(K)
    idx = out_idx if out_idx.dtype == dt else out_idx.astype(dt)
    return RowsResult(np.ascontiguousarray(out_c[:, :K], dtype=np.float32), idx,
                      out_L.astype(np.int32), np.ascontiguousarray(out_cnt[:, :K],
                                                                   dtype=np.int32),
                      dist, ent, float(lam), int(row_offset), method, info)


# --------------------------------------------------------------------------------------------
# Validation and small helpers
# --------------------------------------------------------------------------------------------


def check_rows(W, H, name: str | None) -> tuple[np.ndarray, np.ndarray]:
    """(W, H) as C-contiguous float32 [R, C]; H None → ones. ValueError for a shape other than
    2-D, differing shapes, NaN/inf in W or H, negative H."""
    W = np.asarray(W)
    s = subject_of(name)
    if W.ndim != 2:
        raise ValueError(f"{s}: W must be 2-D [rows, cols], got shape {W.shape}")
    W = np.ascontiguousarray(W, dtype=np.float32)
    if H is None:
        H = np.ones_like(W)
    else:
        H = np.asarray(H)
        if H.shape != W.shape:
            raise ValueError(f"{s}: H shape {H.shape} differs from W shape {W.shape}")
        H = np.ascontiguousarray(H, dtype=np.float32)
    if W.size:
        summ = DataSummary.of(W.reshape(-1), H.reshape(-1))
        summ.check(name)
    return W, H


def _finalize(res: RowsResult, W: np.ndarray, H: np.ndarray, fp16: bool) -> RowsResult:
    """Round the codebooks to fp16 (or not) and measure D with the values kept; W, H checked."""
    cb = res.codebooks
    if fp16:
        big = np.abs(cb) > _FP16_MAX
        if np.any(big):
            r = int(np.argwhere(big)[0][0])
            raise ValueError(f"row {res.row_offset + r} has a level of magnitude > {_FP16_MAX} "
                             "that float16 cannot hold")
        cb = cb.astype(np.float16).astype(np.float32)
    d = np.zeros(res.rows)
    if res.rows:
        sse_kernel(read_only(W), read_only(H), read_only(cb), read_only(res.indices), d)
    return dataclasses.replace(res, codebooks=cb, distortion=d,
                               info={**res.info, "fp16": bool(fp16 or res.info.get("fp16"))})


def floor_hessian(H: np.ndarray, rel: float = 1e-12) -> np.ndarray:
    """H [..] float32 with zeros raised to rel × mean(H) (as the quantize stage does).

    Apply it per *tensor*, before splitting rows into blocks: the floor is then a property of
    the data, not of the sharding. A tensor whose H is all 0 is returned unchanged (the row
    solvers handle h = 0: such rows cost no distortion, so any λ > 0 gives them one level).
    """
    H = np.asarray(H, dtype=np.float32)
    if H.size == 0 or rel <= 0:
        return H
    m = float(H.mean(dtype=np.float64))
    return np.maximum(H, np.float32(rel * m)) if m > 0 else H


def round_codebooks_fp16(result: RowsResult, W: np.ndarray, H: np.ndarray | None) -> RowsResult:
    """A copy of result with every codebook value rounded to the nearest float16 (stored as
    float32, exactly representable in fp16) and ``distortion`` recomputed for the rounded
    values from the data W, H [R, C] (H None: h ≡ 1) — the per-row D needs the data, or
    per-level moments the result does not carry. Nothing is re-assigned: indices, counts,
    levels and entropy are unchanged. Rounding is monotone, so each row's levels stay
    ascending (two close levels may become equal; they stay distinct indices).
    ValueError if a value is outside float16's range. The solvers do this by default
    (``fp16=True``).
    """
    W, H = check_rows(W, H, None)
    if W.shape != result.indices.shape:
        raise ValueError(f"W shape {W.shape} differs from the result's {result.indices.shape}")
    return _finalize(result, W, H, True)


def lagrangian(result: RowsResult, lam: float, level_bits: float = 0.0) -> np.ndarray:
    """Per-row D_r + λ (n H_r + level_bits · L_r): float64 [R]."""
    return result.distortion + lam * (result.index_bits() + level_bits * result.levels)


def _as_list(results: RowsResult | Iterable[RowsResult]) -> list[RowsResult]:
    return [results] if isinstance(results, RowsResult) else list(results)


def index_rate(results: RowsResult | Iterable[RowsResult]) -> float:
    """Σ_r n_r H_r / Σ_r n_r over one result or several: the index entropy in bits/weight."""
    rs = _as_list(results)
    total = sum(r.rows * r.n for r in rs)
    if total == 0:
        return 0.0
    return math.fsum(np.concatenate([r.index_bits() for r in rs]).tolist()) / total


def rate(results: RowsResult | Iterable[RowsResult], codebook_bits: float = 16.0,
         table_bits: float = 4.0) -> float:
    """All-in bits per weight: (Σ_r n_r H_r + Σ_r L_r (codebook_bits + table_bits)) / Σ_r n_r.

    Indices at their entropy (per-row entropies are what per-row code tables achieve), each
    level's codebook entry (fp16: 16 bits) and its share of a per-row code table (default 4
    bits per level: a canonical Huffman code length per symbol, as the container stores it for
    codes up to 15 bits; pass 0 when tables are shared per tensor). The sum is exact
    (math.fsum), so it does not depend on how the rows are split into results.
    """
    rs = _as_list(results)
    total = sum(r.rows * r.n for r in rs)
    if total == 0:
        return 0.0
    levels = sum(int(r.levels.sum(dtype=np.int64)) for r in rs)
    ib = math.fsum(np.concatenate([r.index_bits() for r in rs]).tolist())
    return (ib + levels * (codebook_bits + table_bits)) / total


# --------------------------------------------------------------------------------------------
# The row solvers
# --------------------------------------------------------------------------------------------

_INITS = ("uniform", "quantile", "kmeans++")


def _ecsq_starts(W, H, k, init, seed, row_offset) -> tuple[np.ndarray, np.ndarray]:
    """Sorted starting centres float64 [R, k] and their count per row (int64 [R])."""
    R = W.shape[0]
    if init == "uniform":
        # Bin centres of k equal bins over [min, max]: no sort needed (the cheapest start).
        lo = W.min(axis=1).astype(np.float64)[:, None]
        hi = W.max(axis=1).astype(np.float64)[:, None]
        C0 = lo + (hi - lo) * ((np.arange(k) + 0.5) / k)[None, :]
        return np.ascontiguousarray(C0), np.full(R, k, dtype=np.int64)
    # The channel init kernel (kernels.ch_init_kernel): start 0 = weighted quantiles, start 2 =
    # weighted k-means++ (uniforms hashed from (seed, global row)), so a row's start never
    # depends on its block.
    n_init = 1 if init == "quantile" else 3
    rows = np.arange(R, dtype=np.int64) + int(row_offset)
    U = hash_uniforms(int(seed), rows, n_init, k)
    out = np.zeros((n_init, R, k))
    exact = np.zeros(R, dtype=bool)
    M = read_only(np.ones((1, 1), dtype=bool))
    row_h = np.ascontiguousarray((H > 0).any(axis=1))
    order = read_only(sort_order(W, M, False))
    ch_init_kernel(read_only(W), read_only(H), M, False, row_h, order, k, n_init, U, out, exact)
    C0 = np.sort(out[n_init - 1], axis=1)
    return np.ascontiguousarray(C0), np.full(R, k, dtype=np.int64)


def _ecsq_run(W, H, C0, L0, lam, level_bits, iters, tol, dt, return_history, threads, *,
              M=None, P0=None, prune=None):
    """One ecsq_kernel run over all rows (row ranges on threads): the list
    [out_c, out_idx, out_L, out_cnt, out_H, out_J, out_it, hist]. M: counts of the
    elements (bins); P0: penalties of C0's levels for a penalised first pass; prune: override
    the level removal (default: on with a level cost)."""
    R, C = W.shape
    k = C0.shape[1]
    out = [np.zeros((R, k)), np.zeros((R, C), dtype=dt), np.zeros(R, dtype=np.int64),
           np.zeros((R, k), dtype=np.int64), np.zeros(R), np.zeros(R),
           np.zeros(R, dtype=np.int64), np.zeros((R, iters + 1) if return_history else (1, 1))]
    out_c, out_idx, out_L, out_cnt, out_H, out_J, out_it, hist = out
    Wr, Hr = read_only(W), read_only(H)
    if prune is None:
        prune = level_bits > 0 and lam > 0
    none = read_only(np.zeros((1, 1)))
    Mr = none if M is None else read_only(M)
    Pr = none if P0 is None else read_only(P0)

    def run(a: int, b: int) -> None:
        ecsq_kernel(Wr[a:b], Hr[a:b], read_only(C0[a:b]), read_only(L0[a:b]), lam, level_bits,
                    iters, tol, prune, hist[a:b] if return_history else hist, return_history,
                    Mr if M is None else Mr[a:b], M is not None,
                    Pr if P0 is None else Pr[a:b], P0 is not None,
                    out_c[a:b], out_idx[a:b], out_L[a:b], out_cnt[a:b], out_H[a:b],
                    out_J[a:b], out_it[a:b])

    if R and C:
        run_ranges(run, R, int(threads))
    return out


def _ecsq_binned(W, H, C0, L0, lam, level_bits, iters, tol, dt, threads, bins):
    """ECSQ iterated on ≤ bins bins per row (bin_rows_kernel), then one exact penalised pass
    over every weight from the bins' levels and penalties: _ecsq_run's list, with the
    iterations of the binned solve."""
    R, C = W.shape
    width = bins + bins // 4  # up to bins/4 outliers kept one by one
    X = np.empty((R, width))
    Hb = np.empty((R, width))
    Mb = np.empty((R, width))
    Wr, Hr = read_only(W), read_only(H)

    def binning(a: int, b: int) -> None:
        bin_rows_kernel(Wr[a:b], Hr[a:b], bins, BIN_SPREAD, X[a:b], Hb[a:b], Mb[a:b])

    run_ranges(binning, R, int(threads))
    coarse = _ecsq_run(X, Hb, C0, L0, lam, level_bits, iters, tol, np.int32, False, threads,
                       M=Mb)
    c1, L1, cnt1 = coarse[0], coarse[2], coarse[3]
    with np.errstate(divide="ignore"):
        P = lam * (math.log2(C) - np.log2(np.maximum(cnt1, 1).astype(np.float64)))
    out = _ecsq_run(W, H, c1, L1, lam, level_bits, 0, tol, dt, False, threads, P0=P,
                    prune=False)
    out[6] = coarse[6]
    return out


def ecsq_rows(W: np.ndarray, H: np.ndarray | None, lam: float, *, k_max: int = 64,
              iters: int = 50, init: str | Sequence[str] = "uniform", seed: int = 0,
              row_offset: int = 0, level_bits: float = 0.0, tol: float = 1e-7,
              fp16: bool = True, threads: int = 1, return_history: bool = False,
              bins: int = 0, name: str | None = None) -> RowsResult:
    """Iterative ECSQ of every row of W at one λ.

    W: [R, C] float (converted to float32); H: [R, C] ≥ 0 (None: h ≡ 1; zeros allowed — a
    weight with h = 0 goes to the most probable level; floor them first with
    :func:`floor_hessian` to let them pull their level a little).
    Minimises, per row, D_r + λ (C·H_r + level_bits·L_r): assignment
    i → argmin_j h_i (w_i − c_j)² − λ log2 p_j, c_j = Σh·w/Σh over members, p_j = |C_j|/C,
    empty levels dropped; with level_bits > 0 also removes levels that do not pay for their
    bits (see the module docstring). Starts from k_max levels: ``init`` "uniform" (bin centres
    of k_max equal bins over the row's range), "quantile" (weighted quantiles) or "kmeans++"
    (weighted D² sampling seeded by (seed, row_offset + r)); a sequence of them keeps, per row,
    the start with the lowest final Lagrangian (ties: the first). Stops after ``iters``
    penalised iterations or when the Lagrangian improves by ≤ tol (relative).
    λ ≥ 0 (λ = 0: weighted k-means with the k_max starting levels).
    fp16: round the codebooks to float16 (distortion reported after rounding).
    threads: row ranges on threads (identical results). return_history: info["history"]
    float64 [R, iters + 1], the Lagrangian after each update (never increasing).
    bins > 0: rows of at least BINNED_FACTOR·bins weights are iterated on ``bins`` bins of
    equal width (each bin's members kept on one level; the bin stands for them exactly in
    D and in the counts), then every weight takes its best level under the bins' levels and
    penalties in one exact pass and the levels become its members' weighted means. Costs
    about one exact pass plus iters passes over the bins instead of iters exact passes, for
    a Lagrangian a few percent above the exact solver's (more at high rates, where levels
    are finer than bins: docs/METHOD.md §2). Ignored with return_history.
    Deterministic; each row depends only on its own data, λ, the options and seed/row index.
    """
    lam = float(lam)
    if not (lam >= 0 and math.isfinite(lam)):
        raise ValueError(f"lam must be finite and >= 0, got {lam}")
    if not 1 <= k_max <= 1 << 16:
        raise ValueError(f"k_max must be in [1, 65536], got {k_max}")
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    if not level_bits >= 0:
        raise ValueError(f"level_bits must be >= 0, got {level_bits}")
    if not 0 <= bins <= 1 << 16:
        raise ValueError(f"bins must be in [0, 65536], got {bins}")
    inits = (init,) if isinstance(init, str) else tuple(init)
    bad = [i for i in inits if i not in _INITS]
    if bad or not inits:
        raise ValueError(f"init must be one or more of {_INITS}, got {init!r}")
    t0 = time.perf_counter()
    W, H = check_rows(W, H, name)
    R, C = W.shape
    k = int(min(k_max, max(C, 1)))
    binned = bins > 0 and C >= BINNED_FACTOR * bins and not return_history
    best: list[np.ndarray] = []
    start = np.zeros(R, dtype=np.int32)
    for s, which in enumerate(inits):
        C0, L0 = _ecsq_starts(W, H, k, which, seed, row_offset)
        if binned:
            cur = _ecsq_binned(W, H, C0, L0, lam, float(level_bits), int(iters), float(tol),
                               code_dtype(k_max), threads, int(bins))
        else:
            cur = _ecsq_run(W, H, C0, L0, lam, float(level_bits), int(iters), float(tol),
                            code_dtype(k_max), return_history, threads)
        if not best:
            best = cur
            continue
        # Best start per row by its Lagrangian (out_J); ties keep the earlier start.
        better = cur[5] < best[5]
        for q in range(8 if return_history else 7):
            best[q][better] = cur[q][better]
        start[better] = s
    out_c, out_idx, out_L, out_cnt, out_H, out_J, out_it, hist = best
    if R == 0 or C == 0:
        out_L[:] = 1
    info: dict[str, Any] = {
        "k_max": k_max, "iters": out_it.astype(np.int32), "init": inits, "seed": seed,
        "level_bits": float(level_bits), "lagrangian_unrounded": out_J, "fp16": False,
        "bins": int(bins) if binned else 0,
        "timings": {"total": 0.0},
    }
    if len(inits) > 1:
        info["start"] = start
    if return_history:
        info["history"] = hist
    res = _trim(out_c, out_idx, out_L, out_cnt, np.zeros(R), out_H, lam=lam,
                row_offset=row_offset, method="ecsq", info=info)
    res = _finalize(res, W, H, fp16)
    res.info["timings"]["total"] = time.perf_counter() - t0
    return res


def uniform_rows(W: np.ndarray, H: np.ndarray | None, lam: float | None = None, *,
                 step: float | np.ndarray | None = None, k_max: int = 256,
                 rel_steps: np.ndarray | Sequence[float] | None = None,
                 level_bits: float = 0.0, fp16: bool = True, threads: int = 1,
                 row_offset: int = 0, name: str | None = None) -> RowsResult:
    """Entropy-coded uniform quantization of every row of W: thresholds (m ± ½)·Δ_r (0 is a
    bin centre), each level the h-weighted mean of its bin (plain mean if its h are all 0).

    W, H: [R, C] as in :func:`ecsq_rows`. Give exactly one of
    ``lam`` — each row picks Δ_r minimising D_r(Δ) + λ (C·H_r(Δ) + level_bits·L_r(Δ)) over the
    candidates σ_r·rel_steps (σ_r the row's h-weighted standard deviation; default
    :data:`DEFAULT_REL_STEPS`, quarter octaves from σ/1024 to 16σ) and "one level" (the
    row's weighted mean), among those with at most k_max levels. D in the search uses the
    exact bin means; the reported D the stored (float32, then fp16) values. The candidate set
    does not depend on λ, so each row's rate is non-increasing in λ and its D non-decreasing.
    ``step`` — a step Δ (scalar or float [R]; inf = one level); ValueError if a row would need
    more than k_max levels.
    info["step"]: float64 [R], the step of each row (inf for one level).
    """
    if (lam is None) == (step is None):
        raise ValueError("give exactly one of lam, step")
    if not 1 <= k_max <= 1 << 16:
        raise ValueError(f"k_max must be in [1, 65536], got {k_max}")
    t0 = time.perf_counter()
    W, H = check_rows(W, H, name)
    R, C = W.shape
    if lam is not None:
        lam = float(lam)
        if not (lam >= 0 and math.isfinite(lam)):
            raise ValueError(f"lam must be finite and >= 0, got {lam}")
        fixed = np.full(R, np.nan)
    else:
        fixed = np.broadcast_to(np.asarray(step, dtype=np.float64), (R,)).copy()
        if not np.all(fixed > 0):
            raise ValueError("step must be > 0 (inf for one level)")
        lam = 0.0
    rel = np.asarray(DEFAULT_REL_STEPS if rel_steps is None else rel_steps, dtype=np.float64)
    if rel.ndim != 1 or rel.size == 0 or not np.all(rel > 0) or not np.all(np.isfinite(rel)):
        raise ValueError("rel_steps must be a non-empty 1-D array of finite values > 0")
    rel = np.sort(rel)
    k = int(min(k_max, max(C, 1)))
    out_c = np.zeros((R, k))
    out_idx = np.zeros((R, C), dtype=code_dtype(k_max))
    out_L = np.ones(R, dtype=np.int64)
    out_cnt = np.zeros((R, k), dtype=np.int64)
    out_H = np.zeros(R)
    out_step = np.full(R, np.inf)
    Wr, Hr = read_only(W), read_only(H)

    def run(a, b):
        ecuq_kernel(Wr[a:b], Hr[a:b], lam, float(level_bits), read_only(fixed[a:b]),
                    read_only(rel), k, out_c[a:b], out_idx[a:b], out_L[a:b], out_cnt[a:b],
                    out_H[a:b], out_step[a:b])

    if R and C:
        run_ranges(run, R, int(threads))
    if np.any(out_L < 0):
        r = int(np.argmax(out_L < 0))
        raise ValueError(f"{subject_of(name)}: step {fixed[r]:.4g} needs more than k_max={k_max} "
                         f"levels on row {row_offset + r}; use a larger step or raise k_max")
    info = {"step": out_step, "k_max": k_max, "level_bits": float(level_bits), "fp16": False,
            "timings": {"total": 0.0}}
    res = _trim(out_c, out_idx, out_L, out_cnt, np.zeros(R), out_H, lam=lam,
                row_offset=row_offset, method="uniform", info=info)
    res = _finalize(res, W, H, fp16)
    res.info["timings"]["total"] = time.perf_counter() - t0
    return res


def kmeans_rows(W: np.ndarray, H: np.ndarray | None, k: int, *, n_init: int = 4,
                iters: int = 100, seed: int = 0, row_offset: int = 0, weighted: bool = True,
                init_iter: int = 5, tol: float = 1e-6, batch_rows: int = 256,
                fp16: bool = True, name: str | None = None) -> RowsResult:
    """Hessian-weighted (weighted=False: plain) k-means per row: ``channel.solve_channels``
    (best of n_init starts per row — weighted quantiles, uniform grid, k-means++ draws seeded
    by (seed, row_offset + r) — judged by the row's objective, then Lloyd to a fixed point,
    ``iters`` at most) with its result converted to a :class:`RowsResult`: levels that end
    empty are removed and the indices renumbered, so L_r ≤ k. Use
    ``sharded.solve_channels_sharded`` for Ray row sharding (bit-identical to solve_channels).
    """
    t0 = time.perf_counter()
    W, Hc = check_rows(W, H, name)
    ch = solve_channels(W, Hc if (weighted or H is not None) else None, k, weighted=weighted,
                        n_init=n_init, init_iter=init_iter, max_iter=iters, tol=tol, seed=seed,
                        batch_rows=batch_rows, row_offset=row_offset, name=name)
    used = ch.counts > 0
    levels = used.sum(axis=1).astype(np.int64)
    # Used slots first, in their (ascending) order; padding repeats the last used level.
    order = np.argsort(~used, axis=1, kind="stable")
    cb = np.take_along_axis(ch.centres, order, axis=1).astype(np.float64)
    cnt = np.take_along_axis(ch.counts, order, axis=1)
    R, C = W.shape
    K = max(int(levels.max()) if R else 1, 1)
    last = cb[np.arange(R), np.maximum(levels - 1, 0)] if R else np.zeros(0)
    pad = np.arange(cb.shape[1])[None, :] >= levels[:, None]
    cb = np.where(pad, last[:, None], cb)
    lut = np.cumsum(used, axis=1) - 1
    idx = np.take_along_axis(lut, ch.codes.astype(np.int64), axis=1).astype(code_dtype(K))
    ent = np.zeros(R)
    if R:
        entropy_kernel(read_only(cnt[:, :K].astype(np.int64)), C, ent)
    info = {"k": k, "n_init": n_init, "seed": seed, "iters": ch.n_iter, "fp16": False,
            "timings": {"total": 0.0}}
    res = _trim(cb, idx, levels, cnt, np.zeros(R), ent, lam=math.nan, row_offset=row_offset,
                method="hw_kmeans" if weighted else "kmeans", info=info)
    res = _finalize(res, W, Hc, fp16)
    res.info["timings"]["total"] = time.perf_counter() - t0
    return res


# --------------------------------------------------------------------------------------------
# Group scope
# --------------------------------------------------------------------------------------------


def to_groups(W: np.ndarray, H: np.ndarray | None, g: int, *,
              name: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Rows of g consecutive input columns: W [R, C] → [R·C/g, g] (and H alike, or None).

    Group q of row r becomes row r·(C/g) + q, so the row solvers serve group scope unchanged
    (pass row_offset = the tensor's first group index for seeds). Views when the input is
    contiguous. ValueError unless W is 2-D and C is a multiple of g.
    """
    W = np.asarray(W)
    s = subject_of(name)
    if W.ndim != 2:
        raise ValueError(f"{s}: W must be 2-D [rows, cols], got shape {W.shape}")
    if g < 1 or W.shape[1] % g:
        raise ValueError(f"{s} of shape {tuple(W.shape)}: {W.shape[1]} columns are not a "
                         f"multiple of the group size g={g}")
    Wg = W.reshape(-1, g)
    if H is None:
        return Wg, None
    H = np.asarray(H)
    if H.shape != W.shape:
        raise ValueError(f"{s}: H shape {H.shape} differs from W shape {W.shape}")
    return Wg, H.reshape(-1, g)


def from_groups(result: RowsResult, shape: tuple[int, int],
                g: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Back from group rows to the tensor: (indices [R, C], codebooks [R, C/g, K],
    levels [R, C/g]) for a result over ``to_groups`` rows of a tensor of this shape.
    Ŵ[r, c] = codebooks[r, c // g, indices[r, c]]."""
    R, C = (int(x) for x in shape)
    if g < 1 or C % g or result.n != g or result.rows != R * (C // g):
        raise ValueError(f"a result over {result.rows} rows of {result.n} does not come from "
                         f"groups of g={g} of a tensor of shape {(R, C)}")
    K = result.codebooks.shape[1]
    return (result.indices.reshape(R, C), result.codebooks.reshape(R, C // g, K),
            result.levels.reshape(R, C // g))
