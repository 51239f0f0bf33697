"""Entropy-constrained error feedback (pipeline/quantize/feedback.py): never worse than plain
ECSQ on the layer's weighted objective, at about its bits, and plain ECSQ's decisions exactly
when X·Xᵀ is diagonal (the λ units match)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.quantize.feedback import compact, ecsq_feedback, layer_objective, prepare_hessian
from pipeline.quantize.rows import ecsq_rows


def _layer(seed: int, R: int = 48, C: int = 96, n: int = 1024):
    """Weights [R, C] and the second moment of correlated inputs [C, C] (X = Z·A, A mixing
    the channels, per-channel scales lognormal)."""
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((C, C)) / np.sqrt(C) * rng.uniform(0.3, 1.5) + np.eye(C)
    X = rng.standard_normal((n, C)) @ A * np.exp(rng.standard_normal(C) * 0.7)
    XtX = (X.T @ X / n).astype(np.float32)
    W = (rng.standard_normal((R, C)) * rng.uniform(0.01, 0.1)).astype(np.float32)
    return W, XtX


def _entropy_bits(idx: np.ndarray) -> float:
    total = 0.0
    for row in idx:
        _, c = np.unique(row, return_counts=True)
        p = c / row.size
        total += float(-(c * np.log2(p)).sum())
    return total


@pytest.mark.parametrize("seed", range(6))
def test_feedback_never_worse_and_keeps_the_rate(seed):
    W, XtX = _layer(seed)
    R, C = W.shape
    h = np.diag(XtX).copy()
    lam = float(np.mean(h) * np.var(W) * 10.0 ** np.random.default_rng(seed).uniform(-1, 1))
    res = ecsq_rows(W, np.broadcast_to(h, (R, C)), lam, k_max=32, level_bits=20.0)
    idx, cb, st = ecsq_feedback(
        W,
        XtX,
        res.codebooks,
        res.levels,
        res.counts,
        lam,
        h=h,
        indices=res.indices,
        level_bits=20.0,
        block=32,
    )
    H = prepare_hessian(XtX)
    one = torch.ones(R, dtype=torch.float64)
    Wt = torch.from_numpy(W).double()

    def total(i, c):
        d = layer_objective(
            Wt,
            torch.gather(torch.from_numpy(c).double(), 1, torch.from_numpy(i.astype(np.int64))),
            H,
            one,
        )
        used = sum(len(np.unique(r)) for r in i)
        return float(d.sum()) + lam * (_entropy_bits(i) + 20.0 * used)

    plain, fed = total(res.indices, res.codebooks), total(idx, cb)
    assert fed <= plain * (1 + 1e-9)
    assert st["objective_final"] == pytest.approx(fed, rel=1e-6)
    assert st["objective_plain"] == pytest.approx(plain, rel=1e-6)
    # the rate: the same λ and code lengths keep the bits near the plain pass's
    assert abs(st["bits_final"] - st["bits_plain"]) <= 0.1 * W.size
    # codebook values are float16-exact
    assert np.array_equal(cb, cb.astype(np.float16).astype(np.float32))


def test_correlated_inputs_feedback_wins_rows():
    W, XtX = _layer(11, R=64, C=128)
    h = np.diag(XtX).copy()
    lam = float(np.mean(h) * np.var(W))
    res = ecsq_rows(W, np.broadcast_to(h, W.shape), lam, k_max=32, level_bits=20.0)
    _, _, st = ecsq_feedback(
        W, XtX, res.codebooks, res.levels, res.counts, lam, h=h, indices=res.indices
    )
    assert st["rows_feedback"] > W.shape[0] // 2
    assert st["objective_final"] < st["objective_plain"]


@pytest.mark.parametrize("seed", range(3))
def test_diagonal_second_moment_reproduces_ecsq_decisions(seed):
    """With X·Xᵀ = diag(h) and no damping, 1/U_jj² = h_j and there is no feedback: every
    decision is ECSQ's argmin_c h (w − c)² − λ log2 p(c) with the ECSQ pass's codebook."""
    rng = np.random.default_rng(100 + seed)
    R, C = 40, 64
    W = (rng.standard_normal((R, C)) * 0.05).astype(np.float32)
    h = np.exp(rng.standard_normal(C)).astype(np.float32)
    lam = float(np.mean(h) * 0.05**2 * 0.3)
    res = ecsq_rows(W, np.broadcast_to(h, (R, C)), lam, k_max=16, level_bits=20.0)
    idx, _, st = ecsq_feedback(
        W,
        np.diag(h),
        res.codebooks,
        res.levels,
        res.counts,
        lam,
        h=h,
        damp=0.0,
        refit=False,
        block=16,
    )
    K = res.codebooks.shape[1]
    p = res.counts / C
    ell = np.where(
        (np.arange(K)[None] < res.levels[:, None]) & (res.counts > 0),
        -np.log2(np.maximum(p, 1e-300)),
        np.inf,
    )
    cost = (
        h[None, :, None].astype(np.float64)
        * (W[:, :, None].astype(np.float64) - res.codebooks[:, None, :]) ** 2
        + lam * ell[:, None, :]
    )
    assert np.array_equal(idx, cost.argmin(2))
    assert st["seconds"] >= 0


def test_compact_drops_unused_levels_and_sorts():
    idx = np.array([[2, 0, 2, 2], [1, 1, 1, 1]])
    cb = np.array([[0.5, 9.0, -1.0], [3.0, 2.0, 7.0]], np.float32)
    c, i, L, n, ent = compact(idx, cb)
    assert L.tolist() == [2, 1]
    assert c.tolist() == [[-1.0, 0.5], [2.0, 2.0]]
    assert np.array_equal(
        np.take_along_axis(c, i.astype(np.int64), 1), np.take_along_axis(cb, idx, 1)
    )
    assert n.tolist() == [[3, 1], [4, 0]]
    assert ent[1] == 0.0 and ent[0] == pytest.approx(0.8112781, abs=1e-6)


def test_a_per_weight_hessian_of_rank_one_keeps_ecsq_decisions():
    """h_rj = a_r b_j (a Fisher-like [R, C] Hessian) with X·Xᵀ of another scale and a flat
    diagonal: H takes h's column profile b and each row the scale a_r·mean(b)/mean(b), so with
    no correlations every decision is ECSQ's under h."""
    rng = np.random.default_rng(7)
    R, C = 24, 48
    W = (rng.standard_normal((R, C)) * 0.05).astype(np.float32)
    a = np.exp(rng.standard_normal(R))
    b = np.exp(rng.standard_normal(C))
    h = (a[:, None] * b[None, :]).astype(np.float32)
    lam = float(np.mean(h) * 0.05**2 * 0.3)
    res = ecsq_rows(W, h, lam, k_max=16, level_bits=20.0)
    idx, _, _ = ecsq_feedback(
        W,
        np.eye(C) * 1e3,
        res.codebooks,
        res.levels,
        res.counts,
        lam,
        h=h,
        damp=0.0,
        refit=False,
        block=8,
    )
    K = res.codebooks.shape[1]
    p = res.counts / C
    ell = np.where(
        (np.arange(K)[None] < res.levels[:, None]) & (res.counts > 0),
        -np.log2(np.maximum(p, 1e-300)),
        np.inf,
    )
    cost = (
        h[:, :, None].astype(np.float64)
        * (W[:, :, None].astype(np.float64) - res.codebooks[:, None, :]) ** 2
        + lam * ell[:, None, :]
    )
    assert (idx == cost.argmin(2)).mean() > 0.995  # float32 h: rounding may flip a near-tie
