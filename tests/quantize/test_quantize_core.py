"""Properties of the numpy quantizers (pipeline.quantize: scalar, entropy_constrained, channel,
backend); seeded, synthetic, small."""

import warnings

import numpy as np
import pytest

from pipeline.quantize import (
    LocalBackend,
    block_codes,
    block_stats,
    code_dtype,
    ecsq,
    entropy_bits,
    hw_kmeans,
    kmeans,
    solve_channels,
    uniform,
)
from testkit.synthetic import synthetic_weights

N = 100_000


@pytest.fixture(scope="module")
def data():
    """Mixture of Laplacians w [N] float32 with lognormal h [N] float32."""
    return synthetic_weights(0, N, seed=1)


@pytest.fixture(scope="module")
def small():
    return synthetic_weights(0, 30_000, seed=2)


def assert_nonincreasing(hist):
    h = np.asarray(hist, dtype=np.float64)
    assert h.size >= 2
    # Objectives come from float64 moment sums: allow rounding noise only.
    assert np.all(np.diff(h) <= 1e-9 * abs(h[0])), np.diff(h).max()


def _same(a, b):
    np.testing.assert_array_equal(a.centres, b.centres)
    np.testing.assert_array_equal(a.codes, b.codes)
    assert a.history == b.history


def test_kmeans_variants_objective_never_increases(data):
    w, h = data
    for res in (hw_kmeans(w, h, 16, seed=3), kmeans(w, 16, h=h, seed=3)):
        assert_nonincreasing(res.history)
        assert res.codes.dtype == np.uint8 and res.codes.shape == (N,)
        assert res.centres.dtype == np.float32 and np.all(np.diff(res.centres) >= 0)
        assert np.array_equal(np.unique(res.codes), np.arange(res.k))  # all used, renumbered
        # The reported figures are those of the returned codes.
        wq = res.dequantize().astype(np.float64)
        assert res.distortion == pytest.approx(np.mean((w - wq) ** 2), rel=1e-6)
        assert res.weighted_distortion == pytest.approx(np.mean(h * (w - wq) ** 2), rel=1e-6)
        assert res.entropy_bits == pytest.approx(entropy_bits(np.bincount(res.codes)))


def test_hw_kmeans_beats_kmeans_on_weighted_distortion(data):
    w, h = data
    # tol=0: run to the exact fixed point.
    hw = hw_kmeans(w, h, 8, seed=0, tol=0.0, max_iter=1000)
    km = kmeans(w, 8, h=h, seed=0)
    assert hw.info["n_iter"] < 1000
    assert hw.weighted_distortion < 0.95 * km.weighted_distortion
    # At the fixed point the centres are the h-weighted means of their members.
    c = np.bincount(hw.codes, h * w.astype(np.float64)) / np.bincount(hw.codes, h)
    np.testing.assert_allclose(hw.centres, c, rtol=1e-6)


@pytest.mark.parametrize("const", [1.0, 4.0])
def test_hw_kmeans_with_constant_h_equals_kmeans(small, const):
    w, _ = small
    a = hw_kmeans(w, np.full_like(w, const), 12, seed=5)
    b = kmeans(w, 12, seed=5)
    np.testing.assert_array_equal(a.centres, b.centres)
    np.testing.assert_array_equal(a.codes, b.codes)


def test_deterministic_for_a_seed_also_with_subsampled_inits(data):
    w, h = data
    a = hw_kmeans(w, h, 8, seed=11, sample_size=20_000)
    b = hw_kmeans(w, h, 8, seed=11, sample_size=20_000)
    _same(a, b)
    assert a.info["sample"] == 20_000
    assert_nonincreasing(a.history)


def test_uniform_hits_target_and_has_zero_centred_bins(data):
    w, h = data
    res = uniform(w, h, target_bits=3.0)
    assert abs(res.entropy_bits - 3.0) <= 0.02
    step = res.info["step"]
    bins = np.floor(w.astype(np.float64) / step + 0.5).astype(np.int64)
    # Codes are the non-empty bins, in order: one bin per code and one code per bin.
    _, first = np.unique(res.codes, return_index=True)
    np.testing.assert_array_equal(np.searchsorted(np.unique(bins), bins), res.codes)
    assert first.size == res.k
    c = np.bincount(res.codes, h * w.astype(np.float64)) / np.bincount(res.codes, h)
    np.testing.assert_allclose(res.centres, c, rtol=1e-6)
    plain = uniform(w, h, step=step, weighted=False)
    np.testing.assert_array_equal(plain.codes, res.codes)
    c0 = np.bincount(plain.codes, w.astype(np.float64)) / np.bincount(plain.codes)
    np.testing.assert_allclose(plain.centres, c0, rtol=1e-6)
    assert plain.distortion <= res.distortion
    assert res.weighted_distortion <= plain.weighted_distortion


def test_uniform_with_k_uses_at_most_k_levels(small):
    w, h = small
    res = uniform(w, h, k=7)
    assert res.k <= 7


def test_ecsq_hits_target_and_never_increases(small):
    w, h = small
    res = ecsq(w, h, target_bits=2.5)
    assert abs(res.entropy_bits - 2.5) <= 0.02
    assert_nonincreasing(res.history)
    assert res.entropy_bits == pytest.approx(entropy_bits(np.bincount(res.codes)))
    # A fixed λ gives the same answer as the search that found it.
    again = ecsq(w, h, lam=res.info["lam"], init_bits=3.5)
    _same(res, again)
    # At the same rate ECSQ beats uniform quantization on its own objective.
    uni = uniform(w, h, target_bits=2.5)
    assert res.weighted_distortion < uni.weighted_distortion


def test_assignment_kernels_match_brute_force():
    rng = np.random.default_rng(0)
    w = rng.laplace(0, 1, 4000).astype(np.float32)
    h = rng.lognormal(0, 2, 4000).astype(np.float32)
    h[::7] = 0.0  # dead units: the penalty alone decides
    c = np.sort(rng.normal(0, 1.5, 40))
    pen = rng.uniform(0, 3, 40)
    x = w.astype(np.float64)[:, None]
    near = np.abs(x - c).argmin(1)
    np.testing.assert_array_equal(block_codes(w, h, c), near)
    cost = h.astype(np.float64)[:, None] * (x - c) ** 2 + pen
    got = block_codes(w, h, c, pen, block=1000)
    # Ties (h = 0 with equal penalties) are impossible here: penalties are distinct floats.
    np.testing.assert_array_equal(got, cost.argmin(1))
    S = block_stats(w, h, c, pen, block=1000).sum(axis=0)
    np.testing.assert_allclose(S[0], np.bincount(got, minlength=40))
    np.testing.assert_allclose(S[2], np.bincount(got, h * x[:, 0], minlength=40), rtol=1e-9,
                               atol=1e-9)
    # Threads own whole blocks, so they do not change a bit.
    a = LocalBackend(w, h, block=500).stats(c, pen)
    b = LocalBackend(w, h, block=500, threads=3).stats(c, pen)
    np.testing.assert_array_equal(a, b)


def test_k1_and_k_at_least_distinct():
    rng = np.random.default_rng(1)
    w = rng.normal(size=5000).astype(np.float32)
    h = rng.uniform(0.5, 2, 5000).astype(np.float32)
    one = hw_kmeans(w, h, 1)
    assert one.k == 1 and not one.codes.any()
    assert one.centres[0] == pytest.approx(np.sum(h * w.astype(np.float64)) / np.sum(h), rel=1e-6)
    levels = np.float32([-0.5, -0.1, 0.0, 0.2, 0.25, 0.7, 1.5, 3.0, -2.0, 0.01])
    v = rng.choice(levels, 5000)
    for k in (10, 13):
        res = hw_kmeans(v, h, k)
        assert res.k == 10 and res.distortion == 0.0 and res.weighted_distortion == 0.0
        np.testing.assert_array_equal(res.centres, np.sort(levels))
        np.testing.assert_array_equal(res.dequantize(), v)


def test_all_zero_h_falls_back_to_unweighted(small):
    w, _ = small
    with pytest.warns(RuntimeWarning, match="every h is 0"):
        a = hw_kmeans(w, np.zeros_like(w), 6, seed=2)
    b = kmeans(w, 6, seed=2)
    np.testing.assert_array_equal(a.centres, b.centres)


def test_zero_h_somewhere_is_fine():
    rng = np.random.default_rng(3)
    w = rng.normal(size=3000).astype(np.float32)
    h = rng.uniform(0, 1, 3000).astype(np.float32)
    h[w > 1.0] = 0.0  # a whole tail with h = 0: those clusters keep their centres
    res = hw_kmeans(w, h, 8)
    assert np.all(np.isfinite(res.centres))
    assert_nonincreasing(res.history)


def test_invalid_inputs_raise_clear_errors():
    w = np.linspace(-1, 1, 100, dtype=np.float32)
    h = np.ones_like(w)
    bad = w.copy()
    bad[[3, 50, 70]] = np.nan
    with pytest.raises(ValueError, match="tensor fc1.weight has 3 NaN values in w"):
        hw_kmeans(bad, h, 4, name="fc1.weight")
    hinf = h.copy()
    hinf[5] = np.inf
    with pytest.raises(ValueError, match="1 infinite values in h"):
        uniform(w, hinf, step=0.1)
    hneg = h.copy()
    hneg[:2] = -1.0
    with pytest.raises(ValueError, match="abs"):
        ecsq(w, hneg, lam=1e-3)
    with pytest.raises(ValueError, match="empty"):
        kmeans(np.zeros(0, np.float32), 4)
    with pytest.raises(ValueError, match="k must be"):
        kmeans(w, 0)
    with pytest.raises(ValueError, match="exactly one"):
        uniform(w, h, step=0.1, k=4)


def test_unreachable_targets_raise():
    v = np.random.default_rng(4).choice(np.float32([-1, -0.5, 0, 0.25, 1, 2, 3, 4]), 2000)
    h = np.ones_like(v)
    with pytest.raises(ValueError, match="unreachable"):
        uniform(v, h, target_bits=5.0)
    with pytest.raises(ValueError, match="unreachable"):
        ecsq(v, h, target_bits=4.0)
    with pytest.raises(ValueError, match="unreachable"):
        uniform(np.zeros(10, np.float32), None, target_bits=1.0)


def test_code_dtype():
    assert code_dtype(256) == np.uint8
    assert code_dtype(257) == np.uint16
    assert code_dtype(1 << 16) == np.uint16
    assert code_dtype((1 << 16) + 1) == np.uint32


@pytest.fixture(scope="module")
def matrix():
    w, h = synthetic_weights(0, 48 * 1024, seed=3)
    W, H = w.reshape(48, 1024), h.reshape(48, 1024)
    mask = np.random.default_rng(0).random(W.shape) < 0.7
    return W, H, mask


def test_channel_scope_monotone_masked_and_batch_invariant(matrix):
    W, H, mask = matrix
    res = solve_channels(W, H, 8, mask=mask, seed=1, batch_rows=16)
    assert res.centres.shape == (48, 8) and res.codes.shape == W.shape
    assert res.codes.dtype == np.uint8
    assert np.all(np.diff(res.history, axis=1) <= 1e-9 * res.history[:, :1])
    assert not res.codes[~mask].any()
    np.testing.assert_array_equal(res.counts.sum(axis=1), mask.sum(axis=1))
    assert np.all(np.diff(res.centres, axis=1) >= 0)
    # The reported distortion is that of the codes.
    Wq = res.dequantize().astype(np.float64)
    d = np.where(mask, H * (W - Wq) ** 2, 0).sum(axis=1) / mask.sum(axis=1)
    np.testing.assert_allclose(res.weighted_distortion, d, rtol=1e-6)
    # Pruned entries play no part, whatever they hold.
    W2 = W.copy()
    W2[~mask] = np.nan
    other = solve_channels(W2, H, 8, mask=mask, seed=1, batch_rows=1)
    for f in ("centres", "codes", "history", "n_iter"):
        np.testing.assert_array_equal(getattr(res, f), getattr(other, f))
    plain = solve_channels(W, H, 8, mask=mask, seed=1, weighted=False)
    assert res.weighted_distortion.mean() < plain.weighted_distortion.mean()
    assert np.all(np.diff(plain.history, axis=1) <= 1e-9 * plain.history[:, :1])


def test_channel_rows_with_few_values_or_zero_h_are_handled():
    rng = np.random.default_rng(5)
    W = rng.normal(size=(4, 300)).astype(np.float32)
    W[1] = rng.choice(np.float32([0.5, -1.0, 2.0]), 300)
    H = rng.uniform(0.1, 1, size=W.shape).astype(np.float32)
    H[2] = 0.0
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        res = solve_channels(W, H, 4, seed=0)
    assert any("h = 0 everywhere" in str(r.message) for r in rec)
    assert res.distortion[1] == 0.0
    assert res.counts[1].astype(bool).sum() == 3
    assert np.all(np.isfinite(res.centres))
