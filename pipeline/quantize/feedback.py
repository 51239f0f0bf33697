"""Entropy-constrained error feedback (``quantize.feedback: ldl``): GPTQ's column-ordered
update with ECSQ's decision rule, per Linear, under the run's λ.

Plain per-row ECSQ (:mod:`pipeline.quantize.rows`) rounds every weight on its own and weighs
its error by the *diagonal* h of the layer's Hessian. The layer's true second-order loss is
``tr((W − Q) H (W − Q)ᵀ)`` with ``H = X·Xᵀ / n`` the inputs' second moment (the activation
estimator's h is exactly ``diag(H)``, the same normalisation: sums over tokens / tokens).
:func:`ecsq_feedback` quantizes the input columns in order and, after each, moves the
rounding error onto the columns not yet quantized through the upper Cholesky factor U of
``H⁻¹`` (GPTQ/OPTQ, lazy block updates of ``block`` columns). The decision for weight
(r, j), w' its value after the feedback so far, is ECSQ's with the factor's weight::

    argmin_c  s_r (w' − c)² / U_jj²  +  λ ℓ_r(c),     ℓ_r(c) = −log2 p_r(c)

with the row's codebook and code lengths from the plain ECSQ pass at the same λ, so the
rate target holds (the stage measures the coded bits of the result and corrects λ the way
it corrects any miss). ``(w' − c)² / U_jj²`` is the exact increase of the layer loss when
column j is fixed and the later columns re-optimised, so it replaces ECSQ's ``h_j (w − c)²``;
for a diagonal H, ``1 / U_jj² = h_j`` and the rule *is* plain ECSQ's (tested).

Units of λ (why the profile and ``s_r``): λ was found against ECSQ's distortion
``Σ_j h_rj (w − c)²``, h the run's Hessian (floored). Rows may have their own h (the Fisher,
an [out, in] Hessian) while X·Xᵀ is one per layer. So the layer's H keeps X·Xᵀ's
*correlations* and takes its diagonal from h: ``H = B^½ Ĉ B^½`` with Ĉ the correlation
matrix of X·Xᵀ and ``b_j = mean_r h_rj`` (h's column profile), and each row's loss is scaled
by ``s_r = Σ_j h_rj / Σ_j b_j``: row r's weights are then ``s_r b_j`` on the diagonal, the
rank-one fit of its ECSQ weights, with the same trace. For the activation estimator
``h_rj = (X·Xᵀ/n)_jj``, so H is X·Xᵀ/n itself and s_r = 1. (Measured on SmolLM2 with the
Fisher at 3.25 bits, docs/LANGUAGE_MODELS.md: neither this nor X·Xᵀ's own diagonal beat
plain ECSQ's perplexity, though both lower the layer objective by ~10 %.)
The error feedback itself does not depend on s_r (a per-row factor of H leaves ``U_jk / U_jj``
unchanged). H's diagonal is raised to ``quantize.hessian_floor × mean(diag H)`` first (the
floor ECSQ's h gets, in H's own units: h may be the Fisher, of another scale), then
``damp × mean(diag H)`` is added to the diagonal (GPTQ's damping, for the Cholesky of a
rank-deficient H).

Codebook re-fit (``refit=True``, the default): with the indices fixed, each row's levels
are the least-squares minimiser of ``(w − E c) H (w − E c)ᵀ`` (E the row's one-hot
assignment): ``(Eᵀ H E) c = Eᵀ H w``, a K × K system per row, rounded to float16. Bits do not
change (the indices do not), so it is kept per row only where it lowers the loss. On random
correlated layers it lowers the objective by a further 0.3–0.5 % at ~3 bits/weight and
decides more at low rates (where the plain pass's levels fit the fed-back weights worst: on
a 64 × 128 layer at ~1.5 bits feedback won 14 of 64 rows without it, most with it); its
Eᵀ H E costs R·C² scattered adds per layer, 1–3× the pass.

Cost per layer (R × C): two Choleskys and an inverse (C³), the column sweep (a numba kernel:
R·K per column plus the rank-1 updates inside a block of ``block`` columns, then one BLAS
product per block: R·C² in all) and the two objectives (R·C² each). A 576 × 1536 layer
takes ~1.1 s on one core without the re-fit, ~3.8 s with it; 1536 × 576, 0.15 s / 0.95 s.

Guarantee: :func:`ecsq_feedback` computes each row's objective
``s_r (w − q) H (w − q)ᵀ + λ (n H_r + b L_r)`` (undamped H, b the level cost the ECSQ pass
used) for both the plain ECSQ rows and the feedback rows and keeps the better, per row, so
the result is never worse than plain ECSQ on that objective; ``stats["rows_feedback"]``
counts the rows where feedback won.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
from numba import njit

__all__ = ["ecsq_feedback", "layer_objective", "prepare_hessian"]

_FP16_MAX = 65504.0


def prepare_hessian(XtX: np.ndarray, floor: float = 1e-12) -> torch.Tensor:
    """float64 [C, C]: XtX symmetrised, its diagonal raised to at least floor × its mean (the
    relative floor ECSQ's h gets, `quantize.hessian_floor`, in X·Xᵀ's own units) and to
    1e-30 (a column no token ever reaches)."""
    H = torch.as_tensor(np.asarray(XtX), dtype=torch.float64).clone()
    H = 0.5 * (H + H.T)
    d = torch.diagonal(H)
    m = float(d.mean()) if d.numel() else 0.0
    d.clamp_(min=max(m * floor, 1e-30))
    return H


def layer_objective(
    W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor, scale: torch.Tensor, rows_at_once: int = 1024
) -> torch.Tensor:
    """float64 [R]: s_r (w_r − q_r) H (w_r − q_r)ᵀ of each row (W, Q [R, C], H [C, C])."""
    out = torch.empty(W.shape[0], dtype=torch.float64)
    for a in range(0, W.shape[0], rows_at_once):
        E = (W[a : a + rows_at_once] - Q[a : a + rows_at_once]).to(torch.float64)
        out[a : a + rows_at_once] = ((E @ H) * E).sum(1)
    return out * scale


def _entropy_bits(idx: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(counts int64 [R, K], Σ_i −log2 p(a_i) float64 [R]) of indices [R, C]."""
    R, C = idx.shape
    counts = torch.zeros(R, K, dtype=torch.int64)
    counts.scatter_add_(1, idx, torch.ones_like(idx))
    p = counts.to(torch.float64) / max(C, 1)
    bits = -(counts.to(torch.float64) * torch.where(counts > 0, torch.log2(p), 0.0)).sum(1)
    return counts, bits


@njit(cache=True, nogil=True)
def _block_kernel(W1, U1, cb, pen, s, idx, E1):  # pragma: no cover - numba
    """Columns of one lazy block in order, transposed layout: W1 float64 [b, R] (updated in
    place), U1 [b, b] the factor's block, cb/pen [R, K], s [R]; idx int64 [b, R], E1 [b, R]
    the scaled errors (w − q) / U_jj. The cost is ((s (w − c)²) / U_jj²) + λℓ, first
    minimum on ties (as argmin)."""
    b, R = W1.shape
    K = cb.shape[1]
    for j in range(b):
        d = U1[j, j]
        inv = 1.0 / (d * d)
        for r in range(R):
            w = W1[j, r]
            best = np.inf
            ba = 0
            for k in range(K):
                diff = w - cb[r, k]
                c = s[r] * (diff * diff) * inv + pen[r, k]
                if c < best:
                    best = c
                    ba = k
            idx[j, r] = ba
            E1[j, r] = (w - cb[r, ba]) / d
        for jj in range(j + 1, b):
            u = U1[j, jj]
            for r in range(R):
                W1[jj, r] -= u * E1[j, r]


def _pass(
    W: torch.Tensor,
    U: torch.Tensor,
    cb: torch.Tensor,
    ell: torch.Tensor,
    scale: torch.Tensor,
    lam: float,
    block: int,
) -> torch.Tensor:
    """One GPTQ sweep with the ECSQ rule: indices int64 [R, C]. W float64 [R, C] (copied),
    U the upper Cholesky factor of H⁻¹, cb [R, K] levels, ell [R, K] code lengths (inf for
    slots not to use), scale [R]. A numba kernel runs the columns of each lazy block; the
    update of the later columns by a block's errors is one BLAS product."""
    R, C = W.shape
    WT = W.T.contiguous()  # [C, R]: a column's weights contiguous
    idx = np.empty((C, R), np.int64)
    pen = (lam * ell).contiguous().numpy()
    cbn = cb.contiguous().numpy()
    sn = scale.contiguous().numpy()
    Un = U.contiguous().numpy()
    for i1 in range(0, C, block):
        i2 = min(i1 + block, C)
        W1 = WT[i1:i2].clone()
        E1 = torch.empty(i2 - i1, R, dtype=torch.float64)
        _block_kernel(
            W1.numpy(), np.ascontiguousarray(Un[i1:i2, i1:i2]), cbn, pen, sn, idx[i1:i2], E1.numpy()
        )
        if i2 < C:
            WT[i2:].addmm_(U[i1:i2, i2:].T, E1, alpha=-1)
    return torch.from_numpy(np.ascontiguousarray(idx.T))


def _refit(
    W: torch.Tensor, H: torch.Tensor, idx: torch.Tensor, K: int, counts: torch.Tensor
) -> torch.Tensor:
    """float64 [R, K]: each row's levels minimising (w − E c) H (w − E c)ᵀ for its fixed
    assignment (unused slots 0; a singular system keeps NaN rows for the caller to reject)."""
    R, C = W.shape
    out = torch.full((R, K), math.nan, dtype=torch.float64)
    step = max(1, (1 << 23) // max(C * C, 1))
    eye = torch.eye(K, dtype=torch.float64)
    for a in range(0, R, step):
        ix = idx[a : a + step]
        r = ix.shape[0]
        # H E per row: the columns of H summed by level, [r, C, K]
        HE = torch.zeros(r, C, K, dtype=torch.float64)
        HE.scatter_add_(2, ix[:, None, :].expand(r, C, C), H[None].expand(r, C, C))
        M = torch.zeros(r, K, K, dtype=torch.float64)
        M.scatter_add_(1, ix[:, :, None].expand(r, C, K), HE)  # Eᵀ H E
        b = torch.einsum("rck,rc->rk", HE, W[a : a + step])  # Eᵀ H w
        unused = counts[a : a + step] == 0
        M = M + eye * unused[:, None, :]  # an unused level: c = 0, decoupled
        sol, info = torch.linalg.solve_ex(M, b)
        sol[info != 0] = math.nan
        out[a : a + step] = sol
    return out


def ecsq_feedback(
    W: np.ndarray,
    XtX: np.ndarray,
    codebooks: np.ndarray,
    levels: np.ndarray,
    counts: np.ndarray,
    lam: float,
    *,
    h: np.ndarray | None = None,
    indices: np.ndarray | None = None,
    damp: float = 0.01,
    block: int = 128,
    level_bits: float = 20.0,
    refit: bool = True,
    passes: int = 1,
    floor: float = 1e-12,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Error-feedback ECSQ of one layer: (indices int64 [R, C], codebooks float32 [R, K],
    stats).

    W float32 [R, C]; XtX [C, C] the inputs' second moment (H, normalised as the activation
    Hessian: its diagonal is h); codebooks float32 [R, K], levels int [R], counts int [R, K]:
    the plain ECSQ result at λ = `lam` (code lengths −log2(counts / C)); `indices` [R, C] its
    assignment (for the per-row comparison; None: recomputed from nothing, plain rows not
    compared). h: the floored Hessian the ECSQ pass used, [C] or [R, C] (None: diag(XtX)),
    for the rows' scales s_r only; floor: XtX's diagonal floor relative to its mean.
    Returns per row the better of plain and feedback on s_r·tr-loss + λ·bits (see module
    docstring); stats: rows_feedback (rows where feedback won), objective_plain,
    objective_final (sums), bits_plain, bits_final (index bits at entropy + level bits),
    seconds."""
    t0 = time.perf_counter()
    R, C = W.shape
    K = codebooks.shape[1]
    if XtX.shape != (C, C) or codebooks.shape[0] != R or counts.shape != (R, K):
        raise ValueError(
            f"shapes: W {W.shape}, XtX {XtX.shape}, codebooks {codebooks.shape}, "
            f"counts {counts.shape}"
        )
    H = prepare_hessian(XtX, floor)
    if h is None:
        scale = torch.ones(R, dtype=torch.float64)
    else:
        hh = np.asarray(h, dtype=np.float64).reshape(-1, C)
        prof = np.maximum(hh.mean(0), 1e-300)  # h's column profile [C]
        # X·Xᵀ's correlations with the diagonal estimator's column profile on the diagonal
        d = torch.as_tensor(np.sqrt(prof), dtype=torch.float64) / torch.diagonal(H).sqrt()
        H = H * d[:, None] * d[None, :]
        H.diagonal().copy_(torch.as_tensor(prof))
        scale = torch.as_tensor(
            np.broadcast_to(hh.sum(1), (R,)) / max(float(prof.sum()), 1e-300),
            dtype=torch.float64,
        ).clone()
    diag_sum = float(torch.diagonal(H).sum())
    Hd = H.clone()
    Hd.diagonal().add_(damp * diag_sum / max(C, 1))
    L = torch.linalg.cholesky(Hd)
    U = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    del L, Hd
    Wt = torch.as_tensor(np.asarray(W), dtype=torch.float64)
    cb = torch.as_tensor(np.asarray(codebooks), dtype=torch.float64)
    cnt = torch.as_tensor(np.asarray(counts), dtype=torch.int64)
    slot = torch.arange(K)[None, :] < torch.as_tensor(np.asarray(levels))[:, None]
    for _ in range(max(1, passes)):
        use = slot & (cnt > 0)
        p = cnt.to(torch.float64) / cnt.sum(1, keepdim=True).clamp(min=1)
        ell = torch.where(use, -torch.log2(p.clamp(min=1e-300)), math.inf)
        idx = _pass(Wt, U, cb, ell, scale, float(lam), block)
        cnt, ibits = _entropy_bits(idx, K)
    fcb = cb
    Q = torch.gather(fcb, 1, idx)
    obj = layer_objective(Wt, Q, H, scale)
    if refit:
        new = _refit(Wt, H, idx, K, cnt)
        ok = torch.isfinite(new).all(1) & (new.abs() <= _FP16_MAX).all(1)
        new = torch.where(ok[:, None], new, cb).to(torch.float16).to(torch.float64)
        new = torch.where(cnt > 0, new, cb)  # unused slots keep a finite old value
        Q2 = torch.gather(new, 1, idx)
        obj2 = layer_objective(Wt, Q2, H, scale)
        better = obj2 < obj
        fcb = torch.where(better[:, None], new, cb)
        obj = torch.where(better, obj2, obj)
    used = (cnt > 0).sum(1)
    f_total = obj + lam * (ibits + level_bits * used)
    stats: dict[str, Any] = {}
    if indices is not None:
        pidx = torch.as_tensor(np.asarray(indices).astype(np.int64))
        p_obj = layer_objective(Wt, torch.gather(cb, 1, pidx), H, scale)
        pcnt, pbits = _entropy_bits(pidx, K)
        p_total = p_obj + lam * (pbits + level_bits * (pcnt > 0).sum(1))
        win = f_total < p_total
        idx = torch.where(win[:, None], idx, pidx)
        fcb = torch.where(win[:, None], fcb, cb)
        stats.update(
            objective_plain=float(p_total.sum()),
            rows_feedback=int(win.sum()),
            bits_plain=float((pbits + level_bits * (pcnt > 0).sum(1)).sum()),
        )
        f_total = torch.where(win, f_total, p_total)
        cnt = torch.where(win[:, None], cnt, pcnt)
        ibits = torch.where(win, ibits, pbits)
    stats.update(
        rows=R,
        objective_final=float(f_total.sum()),
        bits_final=float((ibits + level_bits * (cnt > 0).sum(1)).sum()),
        seconds=time.perf_counter() - t0,
    )
    return idx.numpy(), fcb.to(torch.float32).numpy(), stats


def compact(
    idx: np.ndarray, cb: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(codebooks float32 [R, K'], indices [R, C] (code_dtype), levels int32 [R], counts int32
    [R, K'], entropy float64 [R]) of an assignment: each row's used levels only, ascending,
    padding repeating the row's last level — the `RowsResult` layout."""
    from .backend import code_dtype

    idx = np.asarray(idx, dtype=np.int64)
    R, C = idx.shape
    K = cb.shape[1]
    counts = np.zeros((R, K), np.int64)
    np.add.at(counts, (np.repeat(np.arange(R), C), idx.ravel()), 1)
    key = np.where(counts > 0, cb.astype(np.float64), np.inf)
    order = np.argsort(key, axis=1, kind="stable")  # used levels first, ascending
    rank = np.argsort(order, axis=1)
    levels = (counts > 0).sum(1).astype(np.int32)
    Kn = max(int(levels.max()) if R else 1, 1)
    new_cb = np.take_along_axis(cb, order, axis=1)[:, :Kn].astype(np.float32)
    new_cnt = np.take_along_axis(counts, order, axis=1)[:, :Kn].astype(np.int32)
    last = np.take_along_axis(new_cb, np.maximum(levels - 1, 0)[:, None].astype(np.int64), 1)
    new_cb = np.where(np.arange(Kn)[None, :] < levels[:, None], new_cb, last)
    new_idx = np.take_along_axis(rank, idx, axis=1).astype(code_dtype(Kn))
    p = new_cnt / max(C, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.where(new_cnt > 0, p * np.log2(p), 0.0).sum(1)
    return new_cb, new_idx, levels, new_cnt, ent
