"""Scalar quantizers for network weights: k-means, Hessian-weighted k-means, uniform, ECSQ.

Plain numpy functions over 1-D float32 weights ``w`` [N] and non-negative weights ``h`` [N]
(Hessian diagonal, Fisher, ``sqrt(v)``; pruned entries already excluded by the caller), plus a
per-row ("channel") solver for 2-D matrices. Choi, El-Khamy & Lee, "Towards the Limit of
Network Quantization" (ICLR 2017); the method as used here: docs/METHOD.md §1.

One Lloyd loop, many places to run it
-------------------------------------
The 1-D quantizers are written once over :class:`StatsBackend`: per iteration the driver sends
the sorted centres (and, for ECSQ, a per-cluster penalty) and gets back per-*block* sufficient
statistics ``[n_blocks, 4, k]`` float64 = (count, Σh, Σh·w, Σh·w²). Blocks are fixed-size
slices of the *global* index (``BLOCK`` = 2**20 elements by default) and the driver reduces the
block array in order with one ``np.sum(axis=0)``, so any split of the data into block-aligned
shards (``pipeline.quantize.sharded.RayBackend``) gives bit-identical centres and codes to the
in-process :class:`LocalBackend`.

Cost
----
Centres of a 1-D problem are sorted, so nearest-centre assignment is a search over the
midpoints fused with the accumulation of the four moments in one numba pass: no N×k distance
matrix, no temporaries of size N. ECSQ's assignment
``argmin_j h_i (w_i − c_j)² − λ log2 p_j`` is not a midpoint search when h_i varies, so the
kernel starts at the nearest centre j0 and walks outwards in both directions, stopping as soon
as the lower bound ``h_i (w_i − c_j)² + min(pen of the clusters further out)`` is no better
than the best cost so far. This is exact, and costs O(1 + m_i) where m_i is the number of
clusters within ``sqrt(d0² + (pen_j0 − pen_min)/h_i)`` of w_i: a handful for ordinary weights,
up to k for weights whose h_i is ~0 (for those the penalty alone decides). Measured on the
synthetic Laplacian mixture with lognormal h at 3 bits (~150 clusters): ~6 candidates per
weight, a pass ~5–10× the cost of a nearest-centre pass (data-dependent branches).

Nearest-centre search uses a bucket table over the midpoints' range (O(1) expected; exact,
see ``_lookup``); the channel kernels count midpoints linearly for k ≤ 64 (SIMD-friendly).
Per 1-D pass: ~100–150M weights/s per core on 2-core CI-class machines (k = 32).

Objectives (``history``) are means per weight: ``Σ h (w − ĉ)² / N`` (k-means variants,
unweighted for ``kmeans``) and ``Σ h (w − ĉ)² / N + λ·H`` with H in bits per weight (ECSQ).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any, Protocol, runtime_checkable

import numpy as np
from numba import njit

__all__ = [
    "BLOCK",
    "ChannelResult",
    "DataSummary",
    "LocalBackend",
    "QuantResult",
    "StatsBackend",
    "block_codes",
    "block_stats",
    "code_dtype",
    "ecsq",
    "entropy_bits",
    "hw_kmeans",
    "kmeans",
    "solve_channels",
    "synthetic_weights",
    "uniform",
]

# Statistics are reduced per block of the global index; 2**20 keeps a block's [4, k] float64
# accumulator in L1 and the per-iteration payload tiny (100M weights → 96 blocks).
BLOCK = 1 << 20
# Inits run on at most this many points (a stratified sample chosen from the seed): a few Lloyd
# iterations per start on 1M points cost as much as ~1 full pass at 100M.
SAMPLE_SIZE = 1 << 20
# Rate searches stop when the entropy of the indices is this close to the target (bits/weight).
ENTROPY_TOL = 0.02
# The finest uniform grid a rate search may try; 16K bins reach ~13 bits on real weights.
MAX_BINS = 1 << 14


# --------------------------------------------------------------------------------------------
# Numba kernels. All take float32 data and float64 centres; all are single-threaded and
# release the GIL, so callers may run disjoint block ranges on threads.
# --------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True, inline="always")
def _search(x, mids, p):
    """Index of the nearest centre = number of midpoints <= x (mids padded to p-1 with +inf)."""
    j = 0
    step = p >> 1
    while step > 0:
        # Arithmetic instead of a branch: the comparison outcome is unpredictable.
        j += step * (x >= mids[j + step - 1])
        step >>= 1
    return j


@njit(cache=True, nogil=True, inline="always")
def _count_le(x, mids, m):
    """Number of mids[:m] <= x by a linear count: branch-free and SIMD-friendly, faster than a
    binary search up to a few dozen midpoints (channel scope, where k is small)."""
    j = 0
    for i in range(m):
        j += x >= mids[i]
    return j


# Up to this many clusters the channel kernels count midpoints linearly instead of bisecting.
_LINEAR_K = 64


@njit(cache=True, nogil=True, inline="always")
def _lookup(x, mids, lo, inv, table):
    """Number of midpoints <= x, through a bucket table over the midpoints' range.

    mids: float64 [k] (k-1 midpoints then +inf). table[b] = number of midpoints <= the left edge
    of bucket b. The table only gives a starting point; the two walks make the answer exact
    whatever the rounding of the bucket index, and with ≥ 8 buckets per midpoint they are
    usually zero or one step.
    """
    t = (x - lo) * inv
    b = 0
    if t > 0.0:
        b = min(np.int64(t), table.shape[0] - 1)
    j = table[b]
    while j > 0 and mids[j - 1] > x:
        j -= 1
    while mids[j] <= x:
        j += 1
    return j


@njit(cache=True, nogil=True, inline="always")
def _assign_pen(x, hx, c, j0, pen, right_min, left_min):
    """argmin_j hx (x − c_j)² + pen_j, scanning outwards from the nearest centre j0 (exact).

    right_min[j] = min(pen[j:]), left_min[j] = min(pen[:j+1]): once hx·d² plus the smallest
    penalty further out cannot beat the best cost so far, nothing further out can.
    """
    k = c.shape[0]
    d = x - c[j0]
    best = hx * d * d + pen[j0]
    bj = j0
    j = j0 + 1
    while j < k:
        d = c[j] - x
        q = hx * d * d
        if q + right_min[j] >= best:
            break
        t = q + pen[j]
        if t < best:
            best = t
            bj = j
        j += 1
    j = j0 - 1
    while j >= 0:
        d = x - c[j]
        q = hx * d * d
        if q + left_min[j] >= best:
            break
        t = q + pen[j]
        if t < best:
            best = t
            bj = j
        j -= 1
    return bj


@njit(cache=True, nogil=True)
def _stats_kernel(w, h, assign_h, moment_h, c, mids, lo, inv, table, pen, right_min, left_min,
                  use_pen, block, b0, b1, out):
    """Per-block moments for blocks [b0, b1) of this array into out[b, 4, k]."""
    n = w.shape[0]
    k = c.shape[0]
    # [k, 4] keeps the four sums of one cluster in one cache line.
    acc = np.zeros((k, 4))
    for b in range(b0, b1):
        acc[:, :] = 0.0
        s = b * block
        e = min(s + block, n)
        for i in range(s, e):
            x = np.float64(w[i])
            hi = np.float64(h[i]) if moment_h else 1.0
            j = _lookup(x, mids, lo, inv, table)
            if use_pen:
                ha = np.float64(h[i]) if assign_h else 1.0
                j = _assign_pen(x, ha, c, j, pen, right_min, left_min)
            hx = hi * x
            acc[j, 0] += 1.0
            acc[j, 1] += hi
            acc[j, 2] += hx
            acc[j, 3] += hx * x
        for j in range(k):
            for q in range(4):
                out[b, q, j] = acc[j, q]


@njit(cache=True, nogil=True)
def _codes_kernel(w, h, assign_h, c, mids, lo, inv, table, pen, right_min, left_min, use_pen,
                  block, b0, b1, out):
    """Cluster index of every element of blocks [b0, b1) into out (uint8/16/32)."""
    n = w.shape[0]
    for i in range(b0 * block, min(b1 * block, n)):
        x = np.float64(w[i])
        j = _lookup(x, mids, lo, inv, table)
        if use_pen:
            ha = np.float64(h[i]) if assign_h else 1.0
            j = _assign_pen(x, ha, c, j, pen, right_min, left_min)
        out[i] = j


@njit(cache=True, nogil=True)
def _summary_kernel(w, h, has_h):
    """(w_nan, w_inf, w_min, w_max, h_nan, h_inf, h_neg, h_pos) in one pass."""
    w_nan = 0
    w_inf = 0
    lo = np.inf
    hi = -np.inf
    h_nan = 0
    h_inf = 0
    h_neg = 0
    h_pos = 0
    for i in range(w.shape[0]):
        x = w[i]
        if np.isnan(x):
            w_nan += 1
        elif np.isinf(x):
            w_inf += 1
        else:
            lo = min(lo, np.float64(x))
            hi = max(hi, np.float64(x))
        if has_h:
            y = h[i]
            if np.isnan(y):
                h_nan += 1
            elif np.isinf(y):
                h_inf += 1
            elif y < 0:
                h_neg += 1
            elif y > 0:
                h_pos += 1
    return w_nan, w_inf, lo, hi, h_nan, h_inf, h_neg, h_pos


@njit(cache=True, nogil=True)
def _fill_mids(c, mids):
    k = c.shape[0]
    for j in range(mids.shape[0]):
        mids[j] = 0.5 * (c[j] + c[j + 1]) if j < k - 1 else np.inf


@njit(cache=True, nogil=True)
def _ch_stats_kernel(W, H, M, use_m, row_h, C, active, out):
    """Per-row moments out[r, 4, k] for the active rows of W [R, cols] (masked entries skipped)."""
    R, cols = W.shape
    k = C.shape[1]
    p = 1
    while p < k:
        p *= 2
    mids = np.empty(p - 1)
    acc = np.zeros((k, 4))
    for r in range(R):
        if not active[r]:
            continue
        _fill_mids(C[r], mids)
        acc[:, :] = 0.0
        wh = row_h[r]
        for i in range(cols):
            if use_m and not M[r, i]:
                continue
            x = np.float64(W[r, i])
            hi = np.float64(H[r, i]) if wh else 1.0
            j = _count_le(x, mids, k - 1) if k <= _LINEAR_K else _search(x, mids, p)
            hx = hi * x
            acc[j, 0] += 1.0
            acc[j, 1] += hi
            acc[j, 2] += hx
            acc[j, 3] += hx * x
        for j in range(k):
            for q in range(4):
                out[r, q, j] = acc[j, q]


@njit(cache=True, nogil=True)
def _ch_codes_kernel(W, M, use_m, C, out):
    R, cols = W.shape
    k = C.shape[1]
    p = 1
    while p < k:
        p *= 2
    mids = np.empty(p - 1)
    for r in range(R):
        _fill_mids(C[r], mids)
        for i in range(cols):
            if use_m and not M[r, i]:
                out[r, i] = 0
            else:
                x = np.float64(W[r, i])
                out[r, i] = _count_le(x, mids, k - 1) if k <= _LINEAR_K else _search(x, mids, p)


@njit(cache=True, nogil=True)
def _pick(cum, n, u):
    """First i with cum[i] > u (cum non-decreasing); the last index if rounding leaves none."""
    lo = 0
    hi = n - 1
    while lo < hi:
        mid = (lo + hi) >> 1
        if cum[mid] > u:
            hi = mid
        else:
            lo = mid + 1
    return lo


@njit(cache=True, nogil=True)
def _ch_init_kernel(W, H, M, use_m, row_h, order, k, n_init, U, out, exact):
    """Starting centres out[s, r, :] (sorted) for every row r and start s.

    order [R, cols]: per row, the column indices of the kept entries in ascending order of W,
    then the masked ones (see _sort_order).

    s = 0: weighted quantiles (j + ½)/k; s = 1: uniform grid over [min, max]; s ≥ 2: weighted
    k-means++ (D² sampling ∝ h·D²) driven by the uniforms U[r, s, :]. A row with at most k
    distinct values gets those values in every start and exact[r] = True (zero distortion).
    """
    R, cols = W.shape
    x = np.empty(cols)
    hw = np.empty(cols)
    cum = np.empty(cols)
    d2 = np.empty(cols)
    for r in range(R):
        n = cols
        if use_m:
            n = 0
            for i in range(cols):
                n += M[r, i]
        if n == 0:
            out[:, r, :] = 0.0
            exact[r] = True
            continue
        for i in range(n):
            o = order[r, i]
            x[i] = W[r, o]
            hw[i] = H[r, o] if row_h[r] else 1.0
        nd = 1
        for i in range(1, n):
            if x[i] != x[i - 1]:
                nd += 1
        if nd <= k:
            j = 0
            out[0, r, 0] = x[0]
            for i in range(1, n):
                if x[i] != x[i - 1]:
                    j += 1
                    out[0, r, j] = x[i]
            for j2 in range(nd, k):
                out[0, r, j2] = x[n - 1]
            for s in range(1, n_init):
                out[s, r, :] = out[0, r, :]
            exact[r] = True
            continue
        exact[r] = False
        # Start 0: weighted quantiles (counts if every h of the row is 0).
        tot = 0.0
        for i in range(n):
            tot += hw[i]
            cum[i] = tot
        if tot <= 0.0:
            for i in range(n):
                cum[i] = i + 1.0
            tot = float(n)
        for j in range(k):
            out[0, r, j] = x[_pick(cum, n, (j + 0.5) / k * tot)]
        # Start 1: evenly spaced over the row's range.
        if n_init > 1:
            for j in range(k):
                out[1, r, j] = x[0] + (x[n - 1] - x[0]) * ((j + 0.5) / k)
        # Starts 2..: weighted k-means++.
        for s in range(2, n_init):
            c = out[s, r]
            i0 = _pick(cum, n, U[r, s, 0] * tot)
            c[0] = x[i0]
            # One pass per draw: update D² to the newest centre and build its prefix sums.
            acc = 0.0
            for i in range(n):
                d = x[i] - c[0]
                d2[i] = d * d
                acc += hw[i] * d2[i]
                cum[i] = acc
            for t in range(1, k):
                if acc <= 0.0:
                    # Every weighted point already sits on a centre: repeat the last one.
                    for t2 in range(t, k):
                        c[t2] = c[t - 1]
                    break
                c[t] = x[_pick(cum, n, U[r, s, t] * acc)]
                acc = 0.0
                for i in range(n):
                    d = x[i] - c[t]
                    d2[i] = min(d2[i], d * d)
                    acc += hw[i] * d2[i]
                    cum[i] = acc
            c[:] = np.sort(c)
            # cum was overwritten by the D² sums: rebuild the h prefix for the next start.
            tot = 0.0
            for i in range(n):
                tot += hw[i]
                cum[i] = tot
            if tot <= 0.0:
                for i in range(n):
                    cum[i] = i + 1.0
                tot = float(n)


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def code_dtype(k: int) -> np.dtype:
    """Smallest unsigned dtype holding indices 0..k-1: uint8 (k ≤ 256), uint16, else uint32."""
    if k <= 1 << 8:
        return np.dtype(np.uint8)
    if k <= 1 << 16:
        return np.dtype(np.uint16)
    return np.dtype(np.uint32)


def entropy_bits(counts: np.ndarray) -> float:
    """Entropy (bits per symbol) of the empirical distribution with these counts [k]."""
    c = np.asarray(counts, dtype=np.float64)
    c = c[c > 0]
    if c.size <= 1:
        return 0.0
    p = c / c.sum()
    return float(max(-(p * np.log2(p)).sum(), 0.0))


def _f32(x: np.ndarray) -> np.ndarray:
    """Round to the nearest float32 but keep float64 storage.

    Centres are rounded at every update: the nearest float32 to the new mean is never further
    from it than the previous (float32) centre, so the objective still cannot increase, the loop
    reaches an exact fixed point, and the returned float32 centres are the ones the objective
    was measured with.
    """
    return np.asarray(x, dtype=np.float32).astype(np.float64)


def _splitmix(z: np.ndarray) -> np.ndarray:
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _hash_uniforms(seed: int, rows: np.ndarray, n_starts: int, k: int) -> np.ndarray:
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


def _ro(a: np.ndarray) -> np.ndarray:
    """A read-only view. Numba compiles read-only and writable arrays separately, and arrays
    that arrive through Ray's object store are read-only: handing the kernels read-only views
    everywhere keeps one (cached) compilation for drivers and workers alike."""
    v = a.view()
    v.flags.writeable = False
    return v


def _subject(name: str | None) -> str:
    return f"tensor {name}" if name else "input"


# --------------------------------------------------------------------------------------------
# Data summary (validation) and the backend protocol
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataSummary:
    """What the driver needs to know about (w, h) before quantizing; one pass over the data."""

    n: int
    has_h: bool
    w_min: float
    w_max: float
    w_nan: int = 0
    w_inf: int = 0
    h_nan: int = 0
    h_inf: int = 0
    h_neg: int = 0
    h_pos: int = 0  # number of strictly positive h (0 → all-zero h)

    @staticmethod
    def of(w: np.ndarray, h: np.ndarray | None) -> DataSummary:
        """Summary of one array pair: w float32 [n], h float32 [n] or None."""
        w = _ro(w)
        r = _summary_kernel(w, w if h is None else _ro(h), h is not None)
        return DataSummary(w.shape[0], h is not None, float(r[2]), float(r[3]), *map(int, r[:2]),
                           *map(int, r[4:]))

    @staticmethod
    def combine(parts: list[DataSummary]) -> DataSummary:
        """Summary of the concatenation of shards (min/max and counts are order-free)."""
        return DataSummary(
            n=sum(p.n for p in parts),
            has_h=all(p.has_h for p in parts),
            w_min=min((p.w_min for p in parts), default=math.inf),
            w_max=max((p.w_max for p in parts), default=-math.inf),
            w_nan=sum(p.w_nan for p in parts),
            w_inf=sum(p.w_inf for p in parts),
            h_nan=sum(p.h_nan for p in parts),
            h_inf=sum(p.h_inf for p in parts),
            h_neg=sum(p.h_neg for p in parts),
            h_pos=sum(p.h_pos for p in parts),
        )

    def check(self, name: str | None = None) -> None:
        """Raise ValueError for empty input, NaN/inf in w or h, or negative h."""
        s = _subject(name)
        if self.n == 0:
            raise ValueError(f"{s} is empty: nothing to quantize")
        for count, what in ((self.w_nan, "NaN values in w"), (self.w_inf, "infinite values in w"),
                            (self.h_nan, "NaN values in h"), (self.h_inf, "infinite values in h")):
            if count:
                raise ValueError(f"{s} has {count} {what}")
        if self.h_neg:
            raise ValueError(
                f"{s} has {self.h_neg} negative values in h: quantization weights must be >= 0; "
                "take abs(h) or clamp at 0 (e.g. np.maximum(h, 0)) before quantizing"
            )


@runtime_checkable
class StatsBackend(Protocol):
    """Where the weights live. The Lloyd loops only talk to this.

    n: total number of weights. Block b covers global indices [b·block, (b+1)·block).
    """

    n: int

    def summary(self) -> DataSummary:
        """Validation counts and the range of w (one pass, cached)."""
        ...

    def stats(self, centres: np.ndarray, penalty: np.ndarray | None = None, *,
              assign_h: bool = True, moment_h: bool = True) -> np.ndarray:
        """Per-block statistics [n_blocks, 4, k] float64: (count, Σh, Σh·w, Σh·w²).

        centres: float64 [k] sorted. penalty: float64 [k] or None; with a penalty the
        assignment is argmin_j h_i (w_i − c_j)² + penalty_j (h_i ≡ 1 when assign_h is False),
        without it the nearest centre. moment_h=False accumulates with h ≡ 1.
        """
        ...

    def sample(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(w[idx] float32, h[idx] float32 or None when the backend holds no h); idx int64 sorted."""
        ...

    def codes(self, centres: np.ndarray, penalty: np.ndarray | None = None, *,
              assign_h: bool = True) -> np.ndarray:
        """Cluster index per weight [n], dtype code_dtype(k), same assignment rule as stats()."""
        ...


def _prep_centres(centres, penalty):
    """Kernel arguments for sorted centres [k] and an optional penalty [k] (see _lookup)."""
    c = np.ascontiguousarray(centres, dtype=np.float64)
    k = c.shape[0]
    mids = np.full(k, np.inf)
    mids[: k - 1] = 0.5 * (c[:-1] + c[1:])
    # ≥ 8 buckets per midpoint, at least 4096 (16 KB, stays in L1), at most 2**20.
    nb = int(min(1 << 20, max(4096, 8 * k)))
    lo = float(mids[0]) if k > 1 else 0.0
    span = float(mids[k - 2] - mids[0]) if k > 2 else 0.0
    inv = nb / span if span > 0 else 0.0
    edges = lo + np.arange(nb) * (span / nb) if span > 0 else np.full(1, lo)
    table = np.searchsorted(mids[: k - 1], edges, side="right").astype(np.int64)
    use_pen = penalty is not None
    if use_pen:
        pen = np.ascontiguousarray(penalty, dtype=np.float64)
        right_min = np.minimum.accumulate(pen[::-1])[::-1].copy()
        left_min = np.minimum.accumulate(pen)
    else:
        pen = right_min = left_min = c
    return c, mids, lo, inv, table, pen, right_min, left_min, use_pen


def _block_ranges(n_blocks: int, threads: int) -> list[tuple[int, int]]:
    t = max(1, min(threads, n_blocks))
    cuts = [round(i * n_blocks / t) for i in range(t + 1)]
    return [(a, b) for a, b in pairwise(cuts) if b > a]


def _run_ranges(fn: Callable[[int, int], None], n_blocks: int, threads: int) -> None:
    ranges = _block_ranges(n_blocks, threads)
    if len(ranges) <= 1:
        for a, b in ranges:
            fn(a, b)
        return
    # The kernels release the GIL; each thread owns whole blocks, so results do not depend on
    # the number of threads.
    with ThreadPoolExecutor(len(ranges)) as ex:
        list(ex.map(lambda ab: fn(*ab), ranges))


def block_stats(w: np.ndarray, h: np.ndarray | None, centres: np.ndarray,
                penalty: np.ndarray | None = None, *, assign_h: bool = True,
                moment_h: bool = True, block: int = BLOCK, threads: int = 1) -> np.ndarray:
    """Per-block statistics of one block-aligned array: [ceil(n/block), 4, k] float64.

    w float32 [n], h float32 [n] or None (then h ≡ 1); see StatsBackend.stats for the rest.
    Shared by LocalBackend and the Ray shard actors, so both compute identical blocks.
    """
    args = _prep_centres(centres, penalty)
    n_blocks = -(-w.shape[0] // block)
    out = np.zeros((n_blocks, 4, args[0].shape[0]))
    w = _ro(w)
    hh = w if h is None else _ro(h)
    ah, mh = bool(assign_h and h is not None), bool(moment_h and h is not None)
    _run_ranges(lambda a, b: _stats_kernel(w, hh, ah, mh, *args, block, a, b, out), n_blocks,
                threads)
    return out


def block_codes(w: np.ndarray, h: np.ndarray | None, centres: np.ndarray,
                penalty: np.ndarray | None = None, *, assign_h: bool = True,
                block: int = BLOCK, threads: int = 1) -> np.ndarray:
    """Assignment of every element [n], dtype code_dtype(k); see StatsBackend.codes."""
    args = _prep_centres(centres, penalty)
    out = np.empty(w.shape[0], dtype=code_dtype(args[0].shape[0]))
    n_blocks = -(-w.shape[0] // block)
    w = _ro(w)
    hh = w if h is None else _ro(h)
    ah = bool(assign_h and h is not None)
    _run_ranges(lambda a, b: _codes_kernel(w, hh, ah, *args, block, a, b, out), n_blocks, threads)
    return out


def _as_f32_1d(x, what: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{what} must be 1-D, got shape {a.shape}")
    return np.ascontiguousarray(a, dtype=np.float32)


class LocalBackend:
    """In-process backend over arrays w float32 [n] and h float32 [n] (or None: h ≡ 1).

    block: statistics block size (results are bit-identical to a RayBackend with the same
    block). threads: blocks are spread over this many threads (results do not depend on it).
    Inputs of another dtype are converted to float32 (a copy).
    """

    def __init__(self, w: np.ndarray, h: np.ndarray | None = None, *, block: int = BLOCK,
                 threads: int = 1):
        self.w = _as_f32_1d(w, "w")
        self.h = None if h is None else _as_f32_1d(h, "h")
        if self.h is not None and self.h.shape != self.w.shape:
            raise ValueError(f"w and h differ in length: {self.w.shape[0]} vs {self.h.shape[0]}")
        if block <= 0:
            raise ValueError("block must be positive")
        self.n = int(self.w.shape[0])
        self.block = int(block)
        self.threads = int(threads)
        self._summary: DataSummary | None = None

    def summary(self) -> DataSummary:
        if self._summary is None:
            self._summary = DataSummary.of(self.w, self.h)
        return self._summary

    def stats(self, centres, penalty=None, *, assign_h=True, moment_h=True) -> np.ndarray:
        return block_stats(self.w, self.h, centres, penalty, assign_h=assign_h,
                           moment_h=moment_h, block=self.block, threads=self.threads)

    def sample(self, idx):
        return self.w[idx], (None if self.h is None else self.h[idx])

    def codes(self, centres, penalty=None, *, assign_h=True) -> np.ndarray:
        return block_codes(self.w, self.h, centres, penalty, assign_h=assign_h, block=self.block,
                           threads=self.threads)


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass
class QuantResult:
    """A 1-D quantization.

    centres: float32 [k] sorted, every one used. codes: [N] uint8 (k ≤ 256) / uint16 / uint32.
    history: objective per Lloyd iteration (mean per weight; see the module docstring), the
    last entry measured on the returned codes; uniform quantization has one entry.
    entropy_bits: entropy of the codes (bits per weight). weighted_distortion: Σ h (w − ŵ)² / N
    with the backend's h (equals distortion when there is no h). distortion: Σ (w − ŵ)² / N.
    info: method, parameters found (step, lam), iterations, timings in seconds.
    """

    centres: np.ndarray
    codes: np.ndarray
    history: list[float]
    entropy_bits: float
    weighted_distortion: float
    distortion: float
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def k(self) -> int:
        return int(self.centres.shape[0])

    def dequantize(self) -> np.ndarray:
        """ŵ = centres[codes], float32 [N]."""
        return self.centres[self.codes]


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
# The Lloyd loop (written once, over a backend)
# --------------------------------------------------------------------------------------------


def _reduce(blocks: np.ndarray) -> np.ndarray:
    # One ordered reduction over the concatenated block array: the same bits whatever the shards.
    return np.sum(blocks, axis=0)


def _sse(S: np.ndarray, r: np.ndarray) -> float:
    """Σ_j Σ_{i∈C_j} h_i (w_i − r_j)² from moments S [4, k] and reconstruction values r [k]."""
    return max(float(np.sum(S[3] - 2.0 * r * S[2] + r * r * S[1])), 0.0)


def _objective(S: np.ndarray, c: np.ndarray, pen: np.ndarray | None, n: int) -> float:
    J = _sse(S, c) / n
    if pen is not None:
        J += float(np.sum(S[0] * pen)) / n
    return J


def _update(S, c, lam, n):
    """Weighted means (rounded to float32); ECSQ also drops empty clusters and renews p."""
    c_new = np.where(S[1] > 0, S[2] / np.where(S[1] > 0, S[1], 1.0), c)
    c_new = _f32(c_new)
    if lam is None:
        return np.sort(c_new), None
    keep = S[0] > 0
    c_new = c_new[keep]
    pen = -lam * np.log2(S[0][keep] / n)
    order = np.argsort(c_new, kind="stable")
    return c_new[order], pen[order]


def _lloyd(backend: StatsBackend, c: np.ndarray, pen: np.ndarray | None, *, lam: float | None,
           assign_h: bool, moment_h: bool, max_iter: int, tol: float):
    """Alternate assignment and update; returns (centres, penalty, history, iterations).

    lam None: k-means (nearest centre, empty clusters kept in place, they may be re-won).
    lam > 0: ECSQ (penalty −λ log2 p_j, empty clusters vanish). Stops after max_iter passes,
    at an exact fixed point, or when the relative improvement falls to tol or below.
    """
    n = backend.n
    history: list[float] = []
    prev = math.inf
    it = 0
    while it < max_iter:
        it += 1
        S = _reduce(backend.stats(c, pen, assign_h=assign_h, moment_h=moment_h))
        J = _objective(S, c, pen, n)
        history.append(J)
        c_new, pen_new = _update(S, c, lam, n)
        fixed = c_new.shape == c.shape and np.array_equal(c_new, c) and (
            pen is None or np.array_equal(pen_new, pen))
        stalled = math.isfinite(prev) and prev - J <= tol * prev
        c, pen, prev = c_new, pen_new, J
        if fixed or stalled:
            break
    return c, pen, history, it


def _finish(backend: StatsBackend, summ: DataSummary, c: np.ndarray, pen: np.ndarray | None, *,
            assign_h: bool, recon: np.ndarray | None = None, stats=None,
            want_codes: bool = True) -> dict[str, Any]:
    """Final assignment with (c, pen): moments, distortions, entropy, renumbered codes.

    recon: reconstruction value per assignment cluster (uniform: bin means); default c.
    stats: optional (plain, weighted) moments of this assignment already computed.
    """
    n = backend.n
    if stats is None:
        Sp = _reduce(backend.stats(c, pen, assign_h=assign_h, moment_h=False))
        Sw = _reduce(backend.stats(c, pen, assign_h=assign_h, moment_h=True)) if summ.has_h \
            else Sp
    else:
        Sp, Sw = stats
    r = c if recon is None else recon
    counts = Sp[0]
    used = counts > 0
    raw = backend.codes(c, pen, assign_h=assign_h) if want_codes else None
    dtype = code_dtype(int(used.sum()))
    if raw is None or (used.all() and raw.dtype == dtype):
        codes = raw
    else:
        lut = np.zeros(c.shape[0], dtype=dtype)
        lut[used] = np.arange(int(used.sum()))
        codes = np.take(lut, raw)
    return dict(
        centres=r[used].astype(np.float32),
        codes=codes,
        counts=counts[used],
        entropy_bits=entropy_bits(counts[used]),
        distortion=_sse(Sp, r) / n,
        weighted_distortion=_sse(Sw, r) / n,
        pen_term=0.0 if pen is None else float(np.sum(counts * pen)) / n,
    )


def _backend_of(w, h, name) -> StatsBackend:
    if isinstance(w, StatsBackend) and not isinstance(w, np.ndarray):
        if h is not None:
            raise ValueError("pass h inside the backend, not beside it")
        return w
    return LocalBackend(w, h)


def _resolve_weighted(weighted: bool, summ: DataSummary, name: str | None) -> bool:
    if not weighted:
        return False
    if not summ.has_h:
        raise ValueError(f"{_subject(name)}: a weighted quantizer needs h")
    if summ.h_pos == 0:
        # Every weight has h = 0: the weighted objective is identically 0 and any centres are
        # optimal; plain k-means is the only useful answer.
        warnings.warn(f"{_subject(name)}: every h is 0; falling back to unweighted "
                      "quantization (h ≡ 1)", RuntimeWarning, stacklevel=3)
        return False
    return True


def _sample_index(n: int, m: int, seed: int) -> np.ndarray:
    """Stratified sample of min(n, m) sorted global indices, a function of (n, m, seed) only."""
    if n <= m:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng([seed, n, m])
    pos = (np.arange(m) + rng.random(m)) * (n / m)
    return np.minimum(pos.astype(np.int64), n - 1)


# --------------------------------------------------------------------------------------------
# Channel scope (one codebook per row, all rows of a batch in one vectorized loop)
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
    return np.sort(_f32(np.where(pos, S[:, 2] / np.where(pos, S[:, 1], 1.0), C)), axis=1)


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
        _ch_stats_kernel(W, H, M, use_m, row_h, C, act, S)
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


def _sort_order(W: np.ndarray, M: np.ndarray, use_m: bool) -> np.ndarray:
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


def _ch_best_start(W, H, M, use_m, row_h, k, *, n_init, init_iter, seed, rows, nrow):
    """Centres [R, k] float64: per row the best of n_init starts after init_iter iterations."""
    R = W.shape[0]
    U = _hash_uniforms(seed, rows, n_init, k)
    starts = np.zeros((n_init, R, k))
    exact = np.zeros(R, dtype=bool)
    order = _ro(_sort_order(W, M, use_m))
    _ch_init_kernel(W, H, M, use_m, row_h, order, k, n_init, U, starts, exact)
    starts = _f32(starts)
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
        _ch_stats_kernel(W, H, M, use_m, row_h, C, np.ones(R, dtype=bool), S)
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
    W, H, mask = (None if a is None else _ro(a) for a in _ch_validate(W, H, mask, name))
    if weighted and H is None:
        raise ValueError(f"{_subject(name)}: weighted=True needs H")
    R, cols = W.shape
    use_m = mask is not None
    Mk = mask if use_m else _ro(np.ones((1, 1), dtype=bool))
    Hk = H if H is not None else W
    nrow = (mask.sum(axis=1) if use_m else np.full(R, cols)).astype(np.int64)
    if H is not None:
        hpos = ((H > 0) & mask).any(axis=1) if use_m else (H > 0).any(axis=1)
    else:
        hpos = np.zeros(R, dtype=bool)
    run_h = hpos if weighted else np.zeros(R, dtype=bool)
    if weighted and not hpos[nrow > 0].all():
        warnings.warn(f"{_subject(name)}: {int((~hpos & (nrow > 0)).sum())} rows have h = 0 "
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
        C0, _ = _ch_best_start(Wb, Hb, Mb, use_m, rh, k, n_init=n_init, init_iter=init_iter,
                               seed=seed, rows=np.arange(a, b) + row_offset, nrow=nb)
        t_init += time.perf_counter() - ti
        C, hist, it, _ = _ch_lloyd(Wb, Hb, Mb, use_m, rh, C0, nb, max_iter=max_iter, tol=tol)
        # Final assignment: run moments (history), plain moments, weighted moments, codes.
        allr = np.ones(b - a, dtype=bool)
        S = np.zeros((b - a, 4, k))
        _ch_stats_kernel(Wb, Hb, Mb, use_m, rh, C, allr, S)
        Jf = _ch_objective(S, C, nb)
        Sp = np.zeros_like(S)
        _ch_stats_kernel(Wb, Hb, Mb, use_m, np.zeros(b - a, dtype=bool), C, allr, Sp)
        if H is not None:
            Sw = np.zeros_like(S)
            _ch_stats_kernel(Wb, Hb, Mb, use_m, np.ones(b - a, dtype=bool), C, allr, Sw)
        else:
            Sw = Sp
        _ch_codes_kernel(Wb, Mb, use_m, C, codes[sl])
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


# --------------------------------------------------------------------------------------------
# 1-D quantizers
# --------------------------------------------------------------------------------------------


def _kmeans_on(backend: StatsBackend, k: int, *, weighted: bool, n_init: int, init_iter: int,
               max_iter: int, tol: float, seed: int, sample_size: int, name: str | None,
               method: str) -> QuantResult:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if n_init < 1 or max_iter < 1 or init_iter < 1:
        raise ValueError("n_init, init_iter and max_iter must be >= 1")
    t0 = time.perf_counter()
    summ = backend.summary()
    summ.check(name)
    weighted = _resolve_weighted(weighted, summ, name)
    # Inits on a stratified sample (all points when N ≤ sample_size), as a 1-row channel problem.
    idx = _sample_index(backend.n, sample_size, seed)
    ws, hs = backend.sample(idx)
    ws = _ro(np.ascontiguousarray(ws, dtype=np.float32)[None, :])
    hs = ws if (hs is None or not weighted) else _ro(np.ascontiguousarray(hs, np.float32)[None])
    rh = np.array([weighted])
    c0, which = _ch_best_start(ws, hs, _ro(np.ones((1, 1), dtype=bool)), False, rh, k,
                               n_init=n_init, init_iter=init_iter, seed=seed,
                               rows=np.zeros(1, dtype=np.int64), nrow=np.array([ws.shape[1]]))
    c0 = c0[0]
    t1 = time.perf_counter()
    c, _, history, it = _lloyd(backend, c0, None, lam=None, assign_h=weighted, moment_h=weighted,
                               max_iter=max_iter, tol=tol)
    t2 = time.perf_counter()
    f = _finish(backend, summ, c, None, assign_h=weighted)
    history.append(f["weighted_distortion"] if weighted else f["distortion"])
    t3 = time.perf_counter()
    starts = ["quantile", "uniform"] + ["kmeans++"] * max(n_init - 2, 0)
    info = {"method": method, "k_requested": k, "n_iter": it, "seed": seed,
            "init": starts[int(which[0])], "sample": int(idx.shape[0]),
            "timings": {"init": t1 - t0, "lloyd": t2 - t1, "final": t3 - t2}}
    return QuantResult(f["centres"], f["codes"], history, f["entropy_bits"],
                       f["weighted_distortion"], f["distortion"], info)


def kmeans(w: np.ndarray | StatsBackend, k: int, *, h: np.ndarray | None = None,
           n_init: int = 4, init_iter: int = 5, max_iter: int = 100, tol: float = 1e-6,
           seed: int = 0, sample_size: int = SAMPLE_SIZE, name: str | None = None) -> QuantResult:
    """Unweighted k-means (Deep Compression's baseline): minimise Σ (w − c_a)².

    w: float32 [N] (or a StatsBackend holding the data). h: optional [N], used only to report
    weighted_distortion. k: number of clusters (fewer come back if some stay empty; k ≥ the
    number of distinct values gives exactly those values, zero distortion, whenever the init
    sample holds every distinct value — always when N ≤ sample_size).
    Init: best of n_init starts (weighted quantiles, uniform grid, then k-means++ draws), each
    run init_iter Lloyd iterations on a stratified sample of ≤ sample_size points chosen from
    the seed; the best by the objective continues on all data for ≤ max_iter iterations, until
    the relative improvement is ≤ tol or a fixed point. Deterministic for a seed.
    """
    b = _backend_of(w, h, name)
    return _kmeans_on(b, k, weighted=False, n_init=n_init, init_iter=init_iter,
                      max_iter=max_iter, tol=tol, seed=seed, sample_size=sample_size, name=name,
                      method="kmeans")


def hw_kmeans(w: np.ndarray | StatsBackend, h: np.ndarray | None, k: int, *, n_init: int = 4,
              init_iter: int = 5, max_iter: int = 100, tol: float = 1e-6, seed: int = 0,
              sample_size: int = SAMPLE_SIZE, name: str | None = None) -> QuantResult:
    """Hessian-weighted k-means: minimise Σ h (w − c_a)²; c_j = Σh·w / Σh.

    w: float32 [N]; h: float32 [N], ≥ 0 (or w a StatsBackend holding both, h None).
    Same options as ``kmeans``. A cluster whose members all have h = 0 keeps its centre. If
    every h is 0, warns (RuntimeWarning) and runs unweighted k-means instead.
    """
    b = _backend_of(w, h, name)
    return _kmeans_on(b, k, weighted=True, n_init=n_init, init_iter=init_iter, max_iter=max_iter,
                      tol=tol, seed=seed, sample_size=sample_size, name=name, method="hw_kmeans")


def _grid(lo: float, hi: float, step: float, max_bins: int) -> np.ndarray | None:
    """Bin centres m·step (0 is one of them) covering [lo, hi]; None if more than max_bins."""
    m_lo = math.floor(lo / step + 0.5)
    m_hi = math.floor(hi / step + 0.5)
    if m_hi - m_lo + 1 > max_bins:
        return None
    return np.arange(m_lo, m_hi + 1, dtype=np.float64) * step


def _grid_entropy(backend: StatsBackend, summ: DataSummary, step: float, max_bins: int) -> float:
    g = _grid(summ.w_min, summ.w_max, step, max_bins)
    if g is None:
        return math.inf
    S = _reduce(backend.stats(g, None, moment_h=False))
    return entropy_bits(S[0])


def _search_step(backend: StatsBackend, summ: DataSummary, target: float, tol: float,
                 max_bins: int, name: str | None) -> float:
    """Step Δ whose uniform quantizer has entropy within tol of target (bisection on log Δ)."""
    s = _subject(name)
    if not target >= 0:
        raise ValueError(f"target_bits must be >= 0, got {target}")
    if target > math.log2(max(summ.n, 1)) + tol:
        raise ValueError(f"{s}: target_bits={target} is unreachable: {summ.n} weights carry at "
                         f"most log2(N) = {math.log2(max(summ.n, 1)):.3f} bits")
    amax = max(abs(summ.w_min), abs(summ.w_max))
    span = summ.w_max - summ.w_min
    if span == 0:
        if target <= tol:
            return max(amax, 1.0)
        raise ValueError(f"{s}: target_bits={target} is unreachable: all weights are equal "
                         "(entropy 0)")
    coarse = 4.0 * amax  # a single bin around 0 holds everything: entropy 0
    fine = span / (max_bins - 2)
    H_f = _grid_entropy(backend, summ, fine, max_bins)
    if abs(H_f - target) <= tol:
        return fine
    if H_f < target:
        raise ValueError(
            f"{s}: target_bits={target} is unreachable: the finest uniform grid ({max_bins} bins, "
            f"step {fine:.3g}) reaches {H_f:.3f} bits (too few distinct values, or raise "
            "max_bins)")
    if target <= tol:
        return coarse
    a, b = fine, coarse
    H_a, H_b = H_f, 0.0
    for _ in range(200):
        m = math.sqrt(a * b)
        H_m = _grid_entropy(backend, summ, m, max_bins)
        if abs(H_m - target) <= tol:
            return m
        if H_m > target:
            a, H_a = m, H_m
        else:
            b, H_b = m, H_m
        if b / a < 1 + 1e-12:
            break
    raise RuntimeError(f"{s}: uniform quantization cannot hit target_bits={target} within {tol}: "
                       f"the entropy jumps from {H_a:.4f} to {H_b:.4f} bits at step ≈ {a:.6g} "
                       "(too few weights or distinct values near this rate)")


def _step_for_k(lo: float, hi: float, k: int) -> float:
    """Smallest step whose 0-centred grid spans at most k bins over [lo, hi] (bisection)."""
    def spanned(d):
        return math.floor(hi / d + 0.5) - math.floor(lo / d + 0.5) + 1
    amax = max(abs(lo), abs(hi), 1e-30)
    a, b = (hi - lo) / (k + 1) if hi > lo else amax, 4.0 * amax
    if spanned(a) <= k:
        return a
    for _ in range(200):
        m = math.sqrt(a * b)
        if spanned(m) <= k:
            b = m
        else:
            a = m
        if b / a < 1 + 1e-12:
            break
    return b


def _uniform_fit(backend: StatsBackend, summ: DataSummary, *, step, k, target_bits, weighted,
                 max_bins, tol_bits, name, want_codes=True):
    """Uniform quantizer on a checked backend; returns (_finish dict, step, n_bins, weighted)."""
    if sum(x is not None for x in (step, k, target_bits)) != 1:
        raise ValueError("give exactly one of step, k, target_bits")
    weighted = _resolve_weighted(weighted, summ, name) if weighted and summ.has_h else False
    if step is not None:
        if not step > 0:
            raise ValueError(f"step must be > 0, got {step}")
        step = float(step)
    elif k is not None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        step = _step_for_k(summ.w_min, summ.w_max, int(k))
    else:
        step = _search_step(backend, summ, float(target_bits), tol_bits, max_bins, name)
    grid = _grid(summ.w_min, summ.w_max, step, max(max_bins, k or 0))
    if grid is None:
        raise ValueError(f"{_subject(name)}: step {step:.4g} needs more than max_bins={max_bins} "
                         "bins over the range of w; use a larger step or raise max_bins")
    Sp = _reduce(backend.stats(grid, None, moment_h=False))
    Sw = _reduce(backend.stats(grid, None, moment_h=True)) if summ.has_h else Sp
    Sr = Sw if weighted else Sp
    pos = Sr[1] > 0
    # A bin whose members all have h = 0 gets its own centre m·Δ (any value is weighted-optimal).
    recon = _f32(np.where(pos, Sr[2] / np.where(pos, Sr[1], 1.0), grid))
    f = _finish(backend, summ, grid, None, assign_h=False, recon=recon, stats=(Sp, Sw),
                want_codes=want_codes)
    return f, step, int(grid.shape[0]), weighted


def _uniform_on(backend: StatsBackend, *, step, k, target_bits, weighted, max_bins, tol_bits,
                name) -> QuantResult:
    t0 = time.perf_counter()
    summ = backend.summary()
    summ.check(name)
    f, step, bins, weighted = _uniform_fit(backend, summ, step=step, k=k,
                                           target_bits=target_bits, weighted=weighted,
                                           max_bins=max_bins, tol_bits=tol_bits, name=name)
    info = {"method": "uniform", "step": step, "weighted": weighted, "bins": bins,
            "timings": {"total": time.perf_counter() - t0}}
    J = f["weighted_distortion"] if weighted else f["distortion"]
    return QuantResult(f["centres"], f["codes"], [J], f["entropy_bits"], f["weighted_distortion"],
                       f["distortion"], info)


def uniform(w: np.ndarray | StatsBackend, h: np.ndarray | None = None, *,
            step: float | None = None, k: int | None = None, target_bits: float | None = None,
            weighted: bool = True, max_bins: int = MAX_BINS, tol_bits: float = ENTROPY_TOL,
            name: str | None = None) -> QuantResult:
    """Uniform quantization: thresholds at (m ± ½)·Δ, so 0 is a bin centre; empty bins vanish.

    w: float32 [N]; h: [N] ≥ 0 or None (or w a StatsBackend, h None). Exactly one of:
    step Δ; k (the smallest Δ whose grid spans at most k bins over [min w, max w]);
    target_bits (bisection on log Δ until the code entropy is within tol_bits of the target;
    ValueError if even a max_bins grid cannot reach it). Each shared value is the h-weighted
    mean of its bin's members (weighted=False, or no h: the plain mean). Codes follow the
    thresholds, not the nearest shared value.
    """
    b = _backend_of(w, h, name)
    return _uniform_on(b, step=step, k=k, target_bits=target_bits, weighted=weighted,
                       max_bins=max_bins, tol_bits=tol_bits, name=name)


def _ecsq_on(backend: StatsBackend, *, target_bits, lam, weighted, init_bits, max_iter, tol,
             tol_bits, max_bins, name) -> QuantResult:
    t0 = time.perf_counter()
    summ = backend.summary()
    summ.check(name)
    if (target_bits is None) == (lam is None):
        raise ValueError("give exactly one of target_bits, lam")
    if lam is not None and not lam > 0:
        raise ValueError(f"lam must be > 0, got {lam}")
    weighted = _resolve_weighted(weighted, summ, name) if weighted and summ.has_h else False
    n = backend.n
    # Start from many clusters: the uniform quantizer ~1 bit finer than the target.
    ib = init_bits if init_bits is not None else (
        target_bits + 1.0 if target_bits is not None else 8.0)
    H_fine = _grid_entropy(backend, summ, (summ.w_max - summ.w_min) / (max_bins - 2), max_bins) \
        if summ.w_max > summ.w_min else 0.0
    ib = min(ib, H_fine)
    if target_bits is not None and target_bits > H_fine + tol_bits:
        raise ValueError(f"{_subject(name)}: target_bits={target_bits} is unreachable: the "
                         f"finest uniform grid ({max_bins} bins) reaches {H_fine:.3f} bits "
                         "(too few distinct values, or raise max_bins)")
    # The init needs no precise rate: a looser tolerance saves bisection passes.
    u0, _, _, _ = _uniform_fit(backend, summ, step=None, k=None if ib > 0 else 1,
                               target_bits=ib if ib > 0 else None, weighted=weighted,
                               max_bins=max_bins, tol_bits=max(tol_bits, 0.05), name=name,
                               want_codes=False)
    c_init = u0["centres"].astype(np.float64)
    p_init = u0["counts"] / n
    D_init = u0["weighted_distortion"] if weighted else u0["distortion"]
    t1 = time.perf_counter()
    runs = 0
    iters = 0

    def run(lmb):
        nonlocal runs, iters
        runs += 1
        c, pen, hist, it = _lloyd(backend, c_init, -lmb * np.log2(p_init), lam=lmb,
                                  assign_h=weighted, moment_h=weighted, max_iter=max_iter,
                                  tol=tol)
        iters += it
        S = _reduce(backend.stats(c, pen, assign_h=weighted, moment_h=False))
        return c, pen, hist, entropy_bits(S[0])

    if lam is not None:
        c, pen, hist, _ = run(float(lam))
    else:
        c, pen, hist, lam = _search_lam(run, float(target_bits), D_init, ib, tol_bits,
                                        _subject(name), u0["entropy_bits"])
    t2 = time.perf_counter()
    f = _finish(backend, summ, c, pen, assign_h=weighted)
    D = f["weighted_distortion"] if weighted else f["distortion"]
    hist = list(hist) + [D + f["pen_term"]]
    info = {"method": "ecsq", "lam": float(lam), "weighted": weighted, "runs": runs,
            "iterations": iters, "init_bits": u0["entropy_bits"],
            "init_clusters": int(u0["centres"].shape[0]),
            "objective": D + lam * f["entropy_bits"],
            "timings": {"init": t1 - t0, "search": t2 - t1, "final": time.perf_counter() - t2}}
    return QuantResult(f["centres"], f["codes"], hist, f["entropy_bits"],
                       f["weighted_distortion"], f["distortion"], info)


JUMP_TOL_BITS = 0.1
"""Largest miss of an ECSQ rate target accepted when the entropy jumps across the target as λ
varies (the Lloyd fixed point gains or loses a cluster): the closer side is used, with a
warning; a larger miss is an error."""


def _search_lam(run, T: float, D_init: float, init_bits: float, tol_bits: float, subject: str,
                H_init: float):
    """λ whose ECSQ result has entropy within tol_bits of T; returns (c, pen, history, λ).

    Secant steps on (ln λ, H) inside a bracket, since at high rate H ≈ const − ½ log2 λ; the
    first guess is the high-rate estimate λ ≈ 2 ln2 · D(T) with D(T) ≈ 4^(init_bits − T) · D_init.
    Falls back to bisection when the secant would land near an end of the bracket.
    """
    lam0 = 2 * math.log(2) * max(D_init, 1e-300) * 4.0 ** (init_bits - T)
    lo = hi = None  # (ln λ, H): lo has H > T, hi has H < T
    best = None
    x = math.log(lam0)
    prev = None
    for _ in range(60):
        c, pen, hist, H = run(math.exp(x))
        if best is None or abs(H - T) < best[0]:
            best = (abs(H - T), math.exp(x), c, pen, hist)
        if best[0] <= tol_bits:
            break
        if H > T:
            lo = (x, H) if lo is None or x > lo[0] else lo
        else:
            hi = (x, H) if hi is None or x < hi[0] else hi
        if lo is not None and hi is not None:
            width = hi[0] - lo[0]
            if width < 1e-9:
                break
            x_new = lo[0] + (lo[1] - T) / (lo[1] - hi[1]) * width if lo[1] > hi[1] else math.nan
            if not (lo[0] + 0.1 * width <= x_new <= hi[0] - 0.1 * width):
                x_new = lo[0] + 0.5 * width
        else:
            # Outside a bracket: follow the measured slope (or the high-rate −2 ln2 per bit),
            # at most a factor e^3 per step.
            slope = -0.5 / math.log(2)
            if prev is not None and x != prev[0] and (H - prev[1]) / (x - prev[0]) < 0:
                slope = (H - prev[1]) / (x - prev[0])
            x_new = x + max(-3.0, min(3.0, (T - H) / slope))
            if H <= T and H >= H_init - tol_bits:
                raise ValueError(f"{subject}: ECSQ cannot reach target_bits={T}: even a tiny λ "
                                 f"keeps the init's {H_init:.3f} bits")
            if x_new < x - 200 or x_new > x + 200:
                break
        prev = (x, H)
        x = x_new
    if best[0] > tol_bits:
        jump = (f"the entropy jumps between {lo and lo[1]} and {hi and hi[1]} bits near "
                f"λ ≈ {math.exp(x):.4g}")
        if lo is None or hi is None or best[0] > JUMP_TOL_BITS:
            raise RuntimeError(f"{subject}: ECSQ cannot hit target_bits={T} within {tol_bits}: "
                               f"{jump} (too few weights or distinct values)")
        # A bracketed discontinuity of the Lloyd fixed point (a cluster appears or vanishes):
        # no λ gives the target; the closer side is the honest answer, said out loud.
        logging.getLogger("hwq").warning(
            "%s: ECSQ target_bits=%s is inside a jump of the entropy (%s); using the closer "
            "side, %.4f bits off", subject, T, jump, best[0])
    _, lam, c, pen, hist = best
    return c, pen, hist, lam


def ecsq(w: np.ndarray | StatsBackend, h: np.ndarray | None = None, *,
         target_bits: float | None = None, lam: float | None = None, weighted: bool = True,
         init_bits: float | None = None, max_iter: int = 100, tol: float = 1e-5,
         tol_bits: float = ENTROPY_TOL, max_bins: int = MAX_BINS,
         name: str | None = None) -> QuantResult:
    """Iterative entropy-constrained scalar quantization (Chou–Lookabaugh–Gray), minimising
    D + λH with D = Σ h (w − c_a)² / N and H the entropy of the codes in bits per weight.

    Alternates i → argmin_j h_i (w_i − c_j)² − λ log2 p_j (exact; see the module docstring for
    the candidate scan and its cost) with c_j = weighted mean, p_j = |C_j| / N; clusters that
    empty vanish. Starts from the uniform quantizer at init_bits (default target_bits + 1, or 8
    bits with lam) — many clusters, with their own p. Give exactly one of lam, or target_bits:
    then λ is bracketed from the high-rate estimate 2 ln2 · D and bisected (geometrically)
    until the entropy is within tol_bits; ValueError if the target cannot be reached.
    history[-1] is D + λ·H of the returned codes. Deterministic (no random init).
    w: float32 [N]; h: [N] ≥ 0 or None (weighted=False or no h: plain squared error).
    """
    b = _backend_of(w, h, name)
    return _ecsq_on(b, target_bits=target_bits, lam=lam, weighted=weighted, init_bits=init_bits,
                    max_iter=max_iter, tol=tol, tol_bits=tol_bits, max_bins=max_bins, name=name)


# --------------------------------------------------------------------------------------------
# Synthetic data for tests and benchmarks
# --------------------------------------------------------------------------------------------

_SYN_CHUNK = 1 << 16


def synthetic_weights(start: int, stop: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Elements [start, stop) of a deterministic synthetic (w, h) stream, float32 each.

    w: a mixture of Laplacians (scale 0.02 around 0, 10% wider around ±0.05) like trained
    weights; h: lognormal (σ = 1.5), heavy-tailed like a Fisher diagonal, larger for larger
    |w|. Generated per chunk of 2**16 global indices from (seed, chunk), so any range equals
    the same slice of the full stream: shards can make their own data.
    """
    if stop < start:
        raise ValueError("stop < start")
    w = np.empty(stop - start, dtype=np.float32)
    h = np.empty(stop - start, dtype=np.float32)
    c0 = start // _SYN_CHUNK
    for c in range(c0, -(-stop // _SYN_CHUNK)):
        rng = np.random.default_rng([seed, c])
        m = _SYN_CHUNK
        comp = rng.random(m) < 0.1
        loc = np.where(comp, np.where(rng.random(m) < 0.5, -0.05, 0.05), 0.0)
        scale = np.where(comp, 0.04, 0.02)
        ww = (loc + rng.laplace(0.0, 1.0, m) * scale).astype(np.float32)
        hh = (rng.lognormal(0.0, 1.5, m) * (1.0 + 20.0 * np.abs(ww))).astype(np.float32)
        a = max(start, c * _SYN_CHUNK)
        b = min(stop, (c + 1) * _SYN_CHUNK)
        w[a - start:b - start] = ww[a - c * _SYN_CHUNK:b - c * _SYN_CHUNK]
        h[a - start:b - start] = hh[a - c * _SYN_CHUNK:b - c * _SYN_CHUNK]
    return w, h
