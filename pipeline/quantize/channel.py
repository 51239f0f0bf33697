"""Channel scope: Hessian-weighted (or plain) k-means with one codebook per row of a 2-D matrix.

:func:`solve_channels` quantizes every row of W [rows, cols] with its own k centres
(SqueezeLLM-style), all rows of a batch in one vectorized Lloyd loop over the per-row numba
kernels of ``kernels`` (no Python loop per row). Every row depends only on its own data, the
seed and its global row index (the k-means++ draws come from :func:`hash_uniforms`, a counter-based
hash), so any batching or sharding (``sharded.solve_channels_sharded``) gives bit-identical
results. :func:`best_start` (best of several starts per row) also seeds the 1-D quantizers of
``scalar``, run as a one-row channel problem on a sample; ``rows`` reuses the init kernel.
Objectives are means per kept weight of a row: ``Σ h (w − ĉ)² / n_r`` (h ≡ 1 unweighted).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .backend import DataSummary, code_dtype, read_only, round_f32, subject_of
from .kernels import ch_codes_kernel, ch_init_kernel, ch_stats_kernel

__all__ = [
    "ChannelResult",
    "best_start",
    "hash_uniforms",
    "solve_channels",
    "sort_order",
]


@dataclass
class ChannelResult:
    """One codebook per row of a [rows, cols] matrix.

    centres: float32 [rows, k], sorted per row; a row that uses fewer than k clusters (few
    distinct values, many masked entries) keeps the unused slots at valid, never-referenced
    values (counts == 0). codes: [rows, cols] code_dtype(k); masked entries get code 0.
    counts: int64 [rows, k] members per cluster. history: float64 [rows, max_iter + 1],
    per-row objective (mean over the row's kept entries) per iteration, repeated after the row
    converged. n_iter: int32 [rows]. weighted_distortion, distortion, entropy_bits: float64
    [rows], per row, mean over kept entries.
    """

    centres: np.ndarray
    codes: np.ndarray
    counts: np.ndarray
    history: np.ndarray
    n_iter: np.ndarray
    weighted_distortion: np.ndarray
    distortion: np.ndarray
    entropy_bits: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)

    def dequantize(self) -> np.ndarray:
        """Ŵ [rows, cols] float32 (masked entries get the row's centre 0)."""
        return np.take_along_axis(self.centres, self.codes.astype(np.int64), axis=1)

    @staticmethod
    def concat(parts: list[ChannelResult]) -> ChannelResult:
        """Stack results of consecutive row ranges."""
        cat = np.concatenate
        info = dict(parts[0].info) if parts else {}
        info["parts"] = len(parts)
        # Seconds summed over the parts (worker time, not wall time).
        info["timings"] = {key: sum(p.info.get("timings", {}).get(key, 0.0) for p in parts)
                           for key in ("init", "total")}
        return ChannelResult(*(cat([getattr(p, f) for p in parts], axis=0) for f in (
            "centres", "codes", "counts", "history", "n_iter", "weighted_distortion",
            "distortion", "entropy_bits")), info=info)


# --------------------------------------------------------------------------------------------
# Starting centres (seeded per global row)
# --------------------------------------------------------------------------------------------


def _splitmix(z: np.ndarray) -> np.ndarray:
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def hash_uniforms(seed: int, rows: np.ndarray, n_starts: int, k: int) -> np.ndarray:
    """Uniforms U [R, n_starts, k] in [0, 1) that depend only on (seed, global row, start, draw).

    Counter-based, so a row's k-means++ draws do not depend on which batch or Ray task holds it.
    """
    with np.errstate(over="ignore"):
        base = _splitmix(np.full(rows.shape, seed % (1 << 64), dtype=np.uint64))
        z = _splitmix(base ^ rows.astype(np.uint64))[:, None, None]
        s = np.arange(n_starts, dtype=np.uint64)[None, :, None]
        t = np.arange(k, dtype=np.uint64)[None, None, :]
        z = _splitmix(_splitmix(z ^ s) ^ t)
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


# --------------------------------------------------------------------------------------------
# The vectorized Lloyd loop over the rows of a batch
# --------------------------------------------------------------------------------------------


def _rowsum(X: np.ndarray) -> np.ndarray:
    """Σ over axis 1 of X [R, k], column after column: every row is summed in the same order
    whatever R is (np.sum may pick a different order for a batch of one row), so a row's
    result never depends on its batch."""
    out = X[:, 0].copy()
    for j in range(1, X.shape[1]):
        out += X[:, j]
    return out


def _ch_objective(S: np.ndarray, C: np.ndarray, nrow: np.ndarray) -> np.ndarray:
    sse = _rowsum(S[:, 3] - 2.0 * C * S[:, 2] + C * C * S[:, 1])
    return np.maximum(sse, 0.0) / np.maximum(nrow, 1)


def _ch_update(S: np.ndarray, C: np.ndarray) -> np.ndarray:
    pos = S[:, 1] > 0
    return np.sort(round_f32(np.where(pos, S[:, 2] / np.where(pos, S[:, 1], 1.0), C)), axis=1)


def _ch_lloyd(W, H, M, use_m, row_h, C, nrow, *, max_iter, tol, active=None):
    """Vectorized Lloyd over rows; each row stops on its own, so a row's result never depends
    on the other rows in its batch. Returns (C, history [R, max_iter], n_iter [R], last J [R]).
    """
    R, k = C.shape
    C = C.copy()
    act = np.ones(R, dtype=bool) if active is None else active.copy()
    hist = np.full((R, max_iter), np.nan)
    n_iter = np.zeros(R, dtype=np.int32)
    prev = np.full(R, np.inf)
    S = np.zeros((R, 4, k))
    J = np.zeros(R)
    for t in range(max_iter):
        if not act.any():
            break
        ch_stats_kernel(W, H, M, use_m, row_h, C, act, S)
        Jt = _ch_objective(S, C, nrow)
        Cn = _ch_update(S, C)
        fixed = np.all(Cn == C, axis=1)
        with np.errstate(invalid="ignore"):
            stalled = np.isfinite(prev) & (prev - Jt <= tol * prev)
        hist[act, t] = Jt[act]
        J[act] = Jt[act]
        C[act] = Cn[act]
        prev[act] = Jt[act]
        n_iter[act] += 1
        act &= ~(fixed | stalled)
    return C, hist, n_iter, J


def sort_order(W: np.ndarray, M: np.ndarray, use_m: bool) -> np.ndarray:
    """Per row of W [R, cols] float32, column indices sorted by value, masked entries last:
    uint32 [R, cols].

    One np.sort of uint64 keys (order-preserving float bits << 32 | column) instead of a
    per-row argsort: several times faster, and ties come out by column, like a stable sort.
    """
    bits = np.ascontiguousarray(W).view(np.uint32).astype(np.uint64)
    neg = (bits >> np.uint64(31)).astype(bool)
    key = np.where(neg, ~bits & np.uint64(0xFFFFFFFF), bits | np.uint64(0x80000000))
    if use_m:
        key[~M] = np.uint64(0xFFFFFFFF)
    key = (key << np.uint64(32)) | np.arange(W.shape[1], dtype=np.uint64)
    key.sort(axis=1)
    return (key & np.uint64(0xFFFFFFFF)).astype(np.uint32)


def best_start(W, H, M, use_m, row_h, k, *, n_init, init_iter, seed, rows, nrow):
    """Centres [R, k] float64: per row the best of n_init starts after init_iter iterations."""
    R = W.shape[0]
    U = hash_uniforms(seed, rows, n_init, k)
    starts = np.zeros((n_init, R, k))
    exact = np.zeros(R, dtype=bool)
    order = read_only(sort_order(W, M, use_m))
    ch_init_kernel(W, H, M, use_m, row_h, order, k, n_init, U, starts, exact)
    starts = round_f32(starts)
    best = starts[0].copy()
    best_J = np.full(R, np.inf)
    which = np.zeros(R, dtype=np.int32)
    S = np.zeros((R, 4, k))
    for s in range(n_init):
        C = starts[s]
        if init_iter > 1:
            C, _, _, _ = _ch_lloyd(W, H, M, use_m, row_h, C, nrow, max_iter=init_iter - 1, tol=0.0,
                                   active=~exact)
        # Judge every start by the objective of the centres it would hand over.
        ch_stats_kernel(W, H, M, use_m, row_h, C, np.ones(R, dtype=bool), S)
        J = _ch_objective(S, C, nrow)
        better = J < best_J
        best[better] = C[better]
        best_J[better] = J[better]
        which[better] = s
        if exact.all():
            break
    return best, which


def _ch_validate(W, H, mask, name):
    W = np.asarray(W)
    if W.ndim != 2:
        raise ValueError(f"W must be 2-D [rows, cols], got shape {W.shape}")
    W = np.ascontiguousarray(W, dtype=np.float32)
    if H is not None:
        H = np.ascontiguousarray(np.asarray(H), dtype=np.float32)
        if H.shape != W.shape:
            raise ValueError(f"H shape {H.shape} differs from W shape {W.shape}")
    if mask is not None:
        mask = np.ascontiguousarray(np.asarray(mask), dtype=bool)
        if mask.shape != W.shape:
            raise ValueError(f"mask shape {mask.shape} differs from W shape {W.shape}")
    kept_w = W if mask is None else W[mask]
    kept_h = None if H is None else (H if mask is None else H[mask])
    s = DataSummary.of(kept_w.ravel(), None if kept_h is None else kept_h.ravel())
    s = DataSummary(max(s.n, 1), s.has_h, s.w_min, s.w_max, s.w_nan, s.w_inf, s.h_nan, s.h_inf,
                    s.h_neg, s.h_pos)
    s.check(name)
    return W, H, mask


def solve_channels(W: np.ndarray, H: np.ndarray | None, k: int, *, mask: np.ndarray | None = None,
                   weighted: bool = True, n_init: int = 4, init_iter: int = 5,
                   max_iter: int = 100, tol: float = 1e-6, seed: int = 0, batch_rows: int = 256,
                   row_offset: int = 0, name: str | None = None) -> ChannelResult:
    """Hessian-weighted (or plain) k-means with one codebook per row (SqueezeLLM-style).

    W: [rows, cols] float (converted to float32). H: [rows, cols] non-negative or None.
    mask: bool [rows, cols], True = kept (pruned entries excluded from every statistic).
    weighted=False runs plain k-means (H then only serves weighted_distortion).
    Rows are solved in batches of batch_rows, each batch in one vectorized Lloyd loop (numba
    kernels over rows, no Python loop per row). Every row depends only on its own data, the
    seed and its global index row_offset + r, so any batching or sharding (see
    ``sharded.solve_channels_sharded``) returns bit-identical results. A row whose h is all 0
    falls back to unweighted (with one warning for all such rows).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if n_init < 1 or max_iter < 1 or init_iter < 1:
        raise ValueError("n_init, init_iter and max_iter must be >= 1")
    W, H, mask = (None if a is None else read_only(a) for a in _ch_validate(W, H, mask, name))
    if weighted and H is None:
        raise ValueError(f"{subject_of(name)}: weighted=True needs H")
    R, cols = W.shape
    use_m = mask is not None
    Mk = mask if use_m else read_only(np.ones((1, 1), dtype=bool))
    Hk = H if H is not None else W
    nrow = (mask.sum(axis=1) if use_m else np.full(R, cols)).astype(np.int64)
    if H is not None:
        hpos = ((H > 0) & mask).any(axis=1) if use_m else (H > 0).any(axis=1)
    else:
        hpos = np.zeros(R, dtype=bool)
    run_h = hpos if weighted else np.zeros(R, dtype=bool)
    if weighted and not hpos[nrow > 0].all():
        warnings.warn(f"{subject_of(name)}: {int((~hpos & (nrow > 0)).sum())} rows have h = 0 "
                      "everywhere; those rows fall back to unweighted k-means", RuntimeWarning,
                      stacklevel=2)
    dt = code_dtype(k)
    centres = np.zeros((R, k), dtype=np.float32)
    codes = np.zeros((R, cols), dtype=dt)
    counts = np.zeros((R, k), dtype=np.int64)
    history = np.zeros((R, max_iter + 1))
    n_iter = np.zeros(R, dtype=np.int32)
    wd = np.zeros(R)
    dist = np.zeros(R)
    ent = np.zeros(R)
    t0 = time.perf_counter()
    t_init = 0.0
    for a in range(0, R, batch_rows):
        b = min(a + batch_rows, R)
        sl = slice(a, b)
        Wb = W[sl]
        Hb = Hk[sl] if H is not None else Wb
        Mb = Mk[sl] if use_m else Mk
        rh = np.ascontiguousarray(run_h[sl])
        nb = nrow[sl]
        ti = time.perf_counter()
        C0, _ = best_start(Wb, Hb, Mb, use_m, rh, k, n_init=n_init, init_iter=init_iter,
                           seed=seed, rows=np.arange(a, b) + row_offset, nrow=nb)
        t_init += time.perf_counter() - ti
        C, hist, it, _ = _ch_lloyd(Wb, Hb, Mb, use_m, rh, C0, nb, max_iter=max_iter, tol=tol)
        # Final assignment: run moments (history), plain moments, weighted moments, codes.
        allr = np.ones(b - a, dtype=bool)
        S = np.zeros((b - a, 4, k))
        ch_stats_kernel(Wb, Hb, Mb, use_m, rh, C, allr, S)
        Jf = _ch_objective(S, C, nb)
        Sp = np.zeros_like(S)
        ch_stats_kernel(Wb, Hb, Mb, use_m, np.zeros(b - a, dtype=bool), C, allr, Sp)
        if H is not None:
            Sw = np.zeros_like(S)
            ch_stats_kernel(Wb, Hb, Mb, use_m, np.ones(b - a, dtype=bool), C, allr, Sw)
        else:
            Sw = Sp
        ch_codes_kernel(Wb, Mb, use_m, C, codes[sl])
        hb = np.concatenate([hist, np.full((b - a, 1), np.nan)], axis=1)
        hb[np.arange(b - a), it] = Jf
        for col in range(1, max_iter + 1):
            rep = col > it
            hb[rep, col] = hb[rep, col - 1]
        history[sl] = hb
        n_iter[sl] = it
        centres[sl] = C.astype(np.float32)
        counts[sl] = Sp[:, 0].astype(np.int64)
        dist[sl] = _ch_objective(Sp, C, nb)
        wd[sl] = _ch_objective(Sw, C, nb)
        p = Sp[:, 0] / np.maximum(nb, 1)[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            ent[sl] = np.maximum(-_rowsum(np.where(p > 0, p * np.log2(np.where(p > 0, p, 1.0)),
                                                   0.0)), 0.0)
    info = {"method": "hw_kmeans" if weighted else "kmeans", "k": k, "n_init": n_init,
            "seed": seed, "timings": {"init": t_init, "total": time.perf_counter() - t0}}
    return ChannelResult(centres, codes, counts, history, n_iter, wd, dist, ent, info)
