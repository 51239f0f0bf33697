"""Entropy-constrained scalar quantization (ECSQ): Lloyd iterations on ``D + λH``, and the
search for the λ that hits a rate target.

Same setting as ``scalar`` (1-D float32 weights ``w`` [N], non-negative ``h`` [N], any
``backend.StatsBackend``) and the same Lloyd loop (``scalar.lloyd``) with a per-cluster penalty
``−λ log2 p_j``; the assignment is the exact outward scan of ``kernels``. The start is the
uniform quantizer of ``scalar`` at a slightly higher rate. Objective (``history``):
``Σ h (w − ĉ)² / N + λ·H``, H in bits per weight.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np

from .backend import StatsBackend, backend_of, entropy_bits, reduce_blocks, subject_of
from .scalar import (
    ENTROPY_TOL,
    MAX_BINS,
    QuantResult,
    finish,
    grid_entropy,
    lloyd,
    resolve_weighted,
    uniform_fit,
)

__all__ = ["JUMP_TOL_BITS", "ecsq"]


def _ecsq_on(backend: StatsBackend, *, target_bits, lam, weighted, init_bits, max_iter, tol,
             tol_bits, max_bins, name) -> QuantResult:
    t0 = time.perf_counter()
    summ = backend.summary()
    summ.check(name)
    if (target_bits is None) == (lam is None):
        raise ValueError("give exactly one of target_bits, lam")
    if lam is not None and not lam > 0:
        raise ValueError(f"lam must be > 0, got {lam}")
    weighted = resolve_weighted(weighted, summ, name) if weighted and summ.has_h else False
    n = backend.n
    # Start from many clusters: the uniform quantizer ~1 bit finer than the target.
    ib = init_bits if init_bits is not None else (
        target_bits + 1.0 if target_bits is not None else 8.0)
    H_fine = grid_entropy(backend, summ, (summ.w_max - summ.w_min) / (max_bins - 2), max_bins) \
        if summ.w_max > summ.w_min else 0.0
    ib = min(ib, H_fine)
    if target_bits is not None and target_bits > H_fine + tol_bits:
        raise ValueError(f"{subject_of(name)}: target_bits={target_bits} is unreachable: the "
                         f"finest uniform grid ({max_bins} bins) reaches {H_fine:.3f} bits "
                         "(too few distinct values, or raise max_bins)")
    # The init needs no precise rate: a looser tolerance saves bisection passes.
    u0, _, _, _ = uniform_fit(backend, summ, step=None, k=None if ib > 0 else 1,
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
        c, pen, hist, it = lloyd(backend, c_init, -lmb * np.log2(p_init), lam=lmb,
                                 assign_h=weighted, moment_h=weighted, max_iter=max_iter,
                                 tol=tol)
        iters += it
        S = reduce_blocks(backend.stats(c, pen, assign_h=weighted, moment_h=False))
        return c, pen, hist, entropy_bits(S[0])

    if lam is not None:
        c, pen, hist, _ = run(float(lam))
    else:
        c, pen, hist, lam = _search_lam(run, float(target_bits), D_init, ib, tol_bits,
                                        subject_of(name), u0["entropy_bits"])
    t2 = time.perf_counter()
    f = finish(backend, summ, c, pen, assign_h=weighted)
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

    Alternates i → argmin_j h_i (w_i − c_j)² − λ log2 p_j (exact; see ``kernels`` for
    the candidate scan and its cost) with c_j = weighted mean, p_j = |C_j| / N; clusters that
    empty vanish. Starts from the uniform quantizer at init_bits (default target_bits + 1, or 8
    bits with lam) — many clusters, with their own p. Give exactly one of lam, or target_bits:
    then λ is bracketed from the high-rate estimate 2 ln2 · D and bisected (geometrically)
    until the entropy is within tol_bits; ValueError if the target cannot be reached.
    history[-1] is D + λ·H of the returned codes. Deterministic (no random init).
    w: float32 [N]; h: [N] ≥ 0 or None (weighted=False or no h: plain squared error).
    """
    b = backend_of(w, h, name)
    return _ecsq_on(b, target_bits=target_bits, lam=lam, weighted=weighted, init_bits=init_bits,
                    max_iter=max_iter, tol=tol, tol_bits=tol_bits, max_bins=max_bins, name=name)
