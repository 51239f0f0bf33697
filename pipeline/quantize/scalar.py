"""Scalar quantizers for network weights: k-means, Hessian-weighted k-means, uniform (and the
Lloyd loop that ECSQ in ``entropy_constrained`` shares).

Plain numpy functions over 1-D float32 weights ``w`` [N] and non-negative weights ``h`` [N]
(Hessian diagonal, Fisher, ``sqrt(v)``; pruned entries already excluded by the caller). Choi,
El-Khamy & Lee, "Towards the Limit of Network Quantization" (ICLR 2017); the method as used
here: docs/METHOD.md §1. The per-row ("channel") solver for 2-D matrices is in ``channel``.

Every quantizer runs its Lloyd loop (:func:`lloyd`) over a ``backend.StatsBackend``, so the same
code runs in-process (``LocalBackend``) or over Ray actors (``sharded.RayBackend``) with
bit-identical results; see ``backend`` for the block statistics and ``kernels`` for the cost of
a pass.

Objectives (``history``) are means per weight: ``Σ h (w − ĉ)² / N`` (k-means variants,
unweighted for ``kmeans``) and ``Σ h (w − ĉ)² / N + λ·H`` with H in bits per weight (ECSQ).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .backend import (
    DataSummary,
    StatsBackend,
    backend_of,
    code_dtype,
    entropy_bits,
    read_only,
    reduce_blocks,
    round_f32,
    subject_of,
)
from .channel import best_start

__all__ = [
    "ENTROPY_TOL",
    "MAX_BINS",
    "SAMPLE_SIZE",
    "QuantResult",
    "finish",
    "grid_entropy",
    "hw_kmeans",
    "kmeans",
    "lloyd",
    "resolve_weighted",
    "uniform",
    "uniform_fit",
]


# Inits run on at most this many points (a stratified sample chosen from the seed): a few Lloyd
# iterations per start on 1M points cost as much as ~1 full pass at 100M.
SAMPLE_SIZE = 1 << 20
# Rate searches stop when the entropy of the indices is this close to the target (bits/weight).
ENTROPY_TOL = 0.02
# The finest uniform grid a rate search may try; 16K bins reach ~13 bits on real weights.
MAX_BINS = 1 << 14


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


# --------------------------------------------------------------------------------------------
# The Lloyd loop (written once, over a backend)
# --------------------------------------------------------------------------------------------


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
    c_new = round_f32(c_new)
    if lam is None:
        return np.sort(c_new), None
    keep = S[0] > 0
    c_new = c_new[keep]
    pen = -lam * np.log2(S[0][keep] / n)
    order = np.argsort(c_new, kind="stable")
    return c_new[order], pen[order]


def lloyd(backend: StatsBackend, c: np.ndarray, pen: np.ndarray | None, *, lam: float | None,
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
        S = reduce_blocks(backend.stats(c, pen, assign_h=assign_h, moment_h=moment_h))
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


def finish(backend: StatsBackend, summ: DataSummary, c: np.ndarray, pen: np.ndarray | None, *,
           assign_h: bool, recon: np.ndarray | None = None, stats=None,
           want_codes: bool = True) -> dict[str, Any]:
    """Final assignment with (c, pen): moments, distortions, entropy, renumbered codes.

    recon: reconstruction value per assignment cluster (uniform: bin means); default c.
    stats: optional (plain, weighted) moments of this assignment already computed.
    """
    n = backend.n
    if stats is None:
        Sp = reduce_blocks(backend.stats(c, pen, assign_h=assign_h, moment_h=False))
        Sw = reduce_blocks(backend.stats(c, pen, assign_h=assign_h, moment_h=True)) if summ.has_h \
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


def resolve_weighted(weighted: bool, summ: DataSummary, name: str | None) -> bool:
    if not weighted:
        return False
    if not summ.has_h:
        raise ValueError(f"{subject_of(name)}: a weighted quantizer needs h")
    if summ.h_pos == 0:
        # Every weight has h = 0: the weighted objective is identically 0 and any centres are
        # optimal; plain k-means is the only useful answer.
        warnings.warn(f"{subject_of(name)}: every h is 0; falling back to unweighted "
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
# k-means and Hessian-weighted k-means
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
    weighted = resolve_weighted(weighted, summ, name)
    # Inits on a stratified sample (all points when N ≤ sample_size), as a 1-row channel problem.
    idx = _sample_index(backend.n, sample_size, seed)
    ws, hs = backend.sample(idx)
    ws = read_only(np.ascontiguousarray(ws, dtype=np.float32)[None, :])
    hs = ws if (hs is None or not weighted) else read_only(
        np.ascontiguousarray(hs, np.float32)[None])
    rh = np.array([weighted])
    c0, which = best_start(ws, hs, read_only(np.ones((1, 1), dtype=bool)), False, rh, k,
                           n_init=n_init, init_iter=init_iter, seed=seed,
                           rows=np.zeros(1, dtype=np.int64), nrow=np.array([ws.shape[1]]))
    c0 = c0[0]
    t1 = time.perf_counter()
    c, _, history, it = lloyd(backend, c0, None, lam=None, assign_h=weighted, moment_h=weighted,
                              max_iter=max_iter, tol=tol)
    t2 = time.perf_counter()
    f = finish(backend, summ, c, None, assign_h=weighted)
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
    b = backend_of(w, h, name)
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
    b = backend_of(w, h, name)
    return _kmeans_on(b, k, weighted=True, n_init=n_init, init_iter=init_iter, max_iter=max_iter,
                      tol=tol, seed=seed, sample_size=sample_size, name=name, method="hw_kmeans")


# --------------------------------------------------------------------------------------------
# Uniform quantization and its step search
# --------------------------------------------------------------------------------------------


def _grid(lo: float, hi: float, step: float, max_bins: int) -> np.ndarray | None:
    """Bin centres m·step (0 is one of them) covering [lo, hi]; None if more than max_bins."""
    m_lo = math.floor(lo / step + 0.5)
    m_hi = math.floor(hi / step + 0.5)
    if m_hi - m_lo + 1 > max_bins:
        return None
    return np.arange(m_lo, m_hi + 1, dtype=np.float64) * step


def grid_entropy(backend: StatsBackend, summ: DataSummary, step: float, max_bins: int) -> float:
    g = _grid(summ.w_min, summ.w_max, step, max_bins)
    if g is None:
        return math.inf
    S = reduce_blocks(backend.stats(g, None, moment_h=False))
    return entropy_bits(S[0])


def _search_step(backend: StatsBackend, summ: DataSummary, target: float, tol: float,
                 max_bins: int, name: str | None) -> float:
    """Step Δ whose uniform quantizer has entropy within tol of target (bisection on log Δ)."""
    s = subject_of(name)
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
    H_f = grid_entropy(backend, summ, fine, max_bins)
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
        H_m = grid_entropy(backend, summ, m, max_bins)
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


def uniform_fit(backend: StatsBackend, summ: DataSummary, *, step, k, target_bits, weighted,
                max_bins, tol_bits, name, want_codes=True):
    """Uniform quantizer on a checked backend; returns (finish dict, step, n_bins, weighted)."""
    if sum(x is not None for x in (step, k, target_bits)) != 1:
        raise ValueError("give exactly one of step, k, target_bits")
    weighted = resolve_weighted(weighted, summ, name) if weighted and summ.has_h else False
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
        raise ValueError(f"{subject_of(name)}: step {step:.4g} needs more than max_bins={max_bins} "
                         "bins over the range of w; use a larger step or raise max_bins")
    Sp = reduce_blocks(backend.stats(grid, None, moment_h=False))
    Sw = reduce_blocks(backend.stats(grid, None, moment_h=True)) if summ.has_h else Sp
    Sr = Sw if weighted else Sp
    pos = Sr[1] > 0
    # A bin whose members all have h = 0 gets its own centre m·Δ (any value is weighted-optimal).
    recon = round_f32(np.where(pos, Sr[2] / np.where(pos, Sr[1], 1.0), grid))
    f = finish(backend, summ, grid, None, assign_h=False, recon=recon, stats=(Sp, Sw),
               want_codes=want_codes)
    return f, step, int(grid.shape[0]), weighted


def _uniform_on(backend: StatsBackend, *, step, k, target_bits, weighted, max_bins, tol_bits,
                name) -> QuantResult:
    t0 = time.perf_counter()
    summ = backend.summary()
    summ.check(name)
    f, step, bins, weighted = uniform_fit(backend, summ, step=step, k=k,
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
    b = backend_of(w, h, name)
    return _uniform_on(b, step=step, k=k, target_bits=target_bits, weighted=weighted,
                       max_bins=max_bins, tol_bits=tol_bits, name=name)
