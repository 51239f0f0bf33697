"""Per-row quantizers (pipeline.quantize.rows) under one global λ (pipeline.quantize.rate);
seeded, synthetic, small."""

import functools
import math
import pickle

import numpy as np
import pytest

from pipeline.quantize import entropy_bits, solve_channels
from pipeline.quantize.rate import RowBlock, solve_rows_global_rate
from pipeline.quantize.rows import (
    RowsResult,
    ecsq_rows,
    floor_hessian,
    from_groups,
    index_rate,
    kmeans_rows,
    lagrangian,
    rate,
    round_codebooks_fp16,
    to_groups,
    uniform_rows,
)


def laplace_rows(R, C, seed, h_scale=1.0):
    """W [R, C] Laplace(1) float32, H [R, C] lognormal(σ=1) × h_scale float32."""
    rng = np.random.default_rng(seed)
    W = rng.laplace(0.0, 1.0, (R, C)).astype(np.float32)
    H = (rng.lognormal(0.0, 1.0, (R, C)) * h_scale).astype(np.float32)
    return W, H


@pytest.fixture(scope="module")
def rows():
    return laplace_rows(40, 256, seed=1)


def check_invariants(res: RowsResult, W, H):
    """The representation the module documents, and figures that match the data."""
    R, C = W.shape
    assert res.indices.shape == (R, C)
    assert res.indices.dtype == (np.uint8 if res.codebooks.shape[1] <= 256 else np.uint16)
    assert res.codebooks.dtype == np.float32 and res.codebooks.shape[1] == res.levels.max()
    for r in range(R):
        L = int(res.levels[r])
        cb = res.codebooks[r]
        assert np.all(np.diff(cb[:L]) >= 0)
        assert np.all(cb[L:] == cb[L - 1])  # padding repeats the last level
        cnt = np.bincount(res.indices[r], minlength=L)
        assert cnt.shape[0] == L and np.all(cnt > 0)  # every level used, none beyond
        np.testing.assert_array_equal(res.counts[r, :L], cnt)
        assert res.entropy[r] == pytest.approx(entropy_bits(cnt), abs=1e-12)
    wq = res.dequantize().astype(np.float64)
    D = np.sum(H.astype(np.float64) * (W - wq) ** 2, axis=1)
    np.testing.assert_allclose(res.distortion, D, rtol=1e-9, atol=1e-12)


def test_ecsq_rows_never_increases_its_lagrangian(rows):
    W, H = rows
    for lam, lb, init in ((0.05, 0.0, "uniform"), (0.05, 20.0, "uniform"),
                          (0.5, 20.0, "quantile"), (0.01, 0.0, "kmeans++")):
        res = ecsq_rows(W, H, lam, level_bits=lb, init=init, return_history=True, tol=0.0)
        hist = res.info["history"]
        assert hist.shape == (W.shape[0], 51)
        # Moment sums in float64: allow rounding noise only.
        assert np.all(np.diff(hist, axis=1) <= 1e-12 * np.abs(hist[:, :1])), (lam, lb, init)
        assert np.all(hist[:, -1] < hist[:, 0])
        # The last entry is the Lagrangian of the returned (unrounded) result.
        plain = ecsq_rows(W, H, lam, level_bits=lb, init=init, tol=0.0, fp16=False)
        np.testing.assert_allclose(lagrangian(plain, lam, lb), hist[:, -1], rtol=1e-9)
        check_invariants(res, W, H)


def test_level_cost_lowers_the_all_in_lagrangian(rows):
    """With level_bits the solver minimises the Lagrangian of the all-in rate: fewer levels,
    and a lower D + λ·(index bits + 20·levels) than the plain ECSQ objective gives."""
    W, H = rows
    plain = ecsq_rows(W, H, 0.1)
    costed = ecsq_rows(W, H, 0.1, level_bits=20.0)
    assert costed.levels.sum() < plain.levels.sum()
    assert lagrangian(costed, 0.1, 20.0).sum() < lagrangian(plain, 0.1, 20.0).sum()


def test_rate_and_distortion_are_monotone_in_lambda():
    W, H = laplace_rows(60, 200, seed=2)
    lams = [0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0]
    for method in ("ecsq", "uniform"):
        rates, dists = [], []
        per_row = []
        for lam in lams:
            res = (ecsq_rows if method == "ecsq" else uniform_rows)(W, H, lam, level_bits=20.0)
            rates.append(rate(res))
            dists.append(res.distortion.sum())
            per_row.append(res)
        assert np.all(np.diff(rates) <= 0) and np.all(np.diff(dists) >= 0), (method, rates)
        assert rates[0] > rates[-1] + 1.0
        if method == "uniform":
            # A fixed candidate set: exact per row (D up to the float32/fp16 rounding of values).
            for a, b in zip(per_row, per_row[1:], strict=False):
                assert np.all(b.index_bits() + 20 * b.levels <= a.index_bits() + 20 * a.levels)
                assert np.all(b.distortion >= a.distortion * (1 - 1e-3))


def test_larger_hessian_rows_get_more_levels_and_rate():
    W, H = laplace_rows(16, 256, seed=3)
    W2 = np.concatenate([W, W])
    H2 = np.concatenate([H * 30.0, H])  # identical rows, the first half 30x more sensitive
    for res in (ecsq_rows(W2, H2, 0.2, level_bits=20.0), uniform_rows(W2, H2, 0.2)):
        assert np.all(res.levels[:16] > res.levels[16:])
        assert np.all(res.entropy[:16] > res.entropy[16:] + 1.0)


def _pickling_map(fn, items):
    """A map that ships fn and every item through pickle, as a Ray or process map does, and
    evaluates the items in reverse order (results returned in input order)."""
    fn = pickle.loads(pickle.dumps(fn))
    items = [pickle.loads(pickle.dumps(it)) for it in items]
    out = [fn(it) for it in reversed(items)]
    return out[::-1]


@pytest.mark.parametrize("method", ["ecsq", "uniform"])
def test_global_bisection_meets_target_and_is_sharding_invariant(method):
    A = laplace_rows(30, 192, seed=4, h_scale=10.0)
    B = laplace_rows(50, 192, seed=5)
    g = solve_rows_global_rate([A, B], 3.0, method, tol=0.01)
    assert abs(g.rate - 3.0) <= 0.01
    assert g.rate == pytest.approx(rate(g.results)) and g.index_rate == index_rate(g.results)
    assert g.side_rate == pytest.approx(20.0 * sum(r.levels.sum() for r in g.results) / g.weights)
    # The final pass reproduces the search's figures at that λ exactly.
    assert any(e["lam"] == g.lam and e["rate"] == g.rate for e in g.evaluations)
    solve = ecsq_rows if method == "ecsq" else uniform_rows
    # Equal to solving each block on its own at the λ found.
    for res, (W, H), off in zip(g.results, (A, B), (0, 30), strict=True):
        alone = solve(W, H, g.lam, level_bits=20.0, row_offset=off)
        np.testing.assert_array_equal(res.indices, alone.indices)
        np.testing.assert_array_equal(res.codebooks, alone.codebooks)
        np.testing.assert_array_equal(res.distortion, alone.distortion)
    # The same rows split otherwise, listed in another order, through a pickling map.
    W = np.concatenate([A[0], B[0]])
    H = np.concatenate([A[1], B[1]])
    cuts = [0, 7, 31, 32, 64, 80]
    blocks = [RowBlock(W[a:b], H[a:b], a) for a, b in zip(cuts, cuts[1:], strict=False)]
    g2 = solve_rows_global_rate(blocks[::-1], 3.0, method, tol=0.01, map_fn=_pickling_map)
    assert g2.lam == g.lam and g2.rate == g.rate and g2.distortion == g.distortion
    whole = RowsResult.concat(g.results)
    other = RowsResult.concat(g2.results[::-1])
    np.testing.assert_array_equal(whole.indices, other.indices)
    np.testing.assert_array_equal(whole.codebooks, other.codebooks)
    np.testing.assert_array_equal(whole.levels, other.levels)


def test_one_global_lambda_beats_a_per_tensor_rate_split():
    """The paper's argument, per channel: at equal total rate, one λ for all rows of both
    tensors gives far less total weighted distortion than giving each tensor the same rate."""
    A = laplace_rows(40, 256, seed=6, h_scale=100.0)  # a sensitive tensor
    B = laplace_rows(40, 256, seed=7)
    T = 3.0
    joint = solve_rows_global_rate([A, B], T, "ecsq")
    a = solve_rows_global_rate([A], T, "ecsq")
    b = solve_rows_global_rate([B], T, "ecsq")
    split_rate = (a.rate + b.rate) / 2  # equal sizes
    assert joint.rate <= split_rate + 0.02
    assert joint.distortion < 0.5 * (a.distortion + b.distortion)
    # The rate went to the sensitive tensor.
    assert rate(joint.results[0]) > rate(joint.results[1]) + 1.0


def test_global_target_errors():
    W, H = laplace_rows(8, 64, seed=8)
    with pytest.raises(ValueError, match="below the floor"):
        solve_rows_global_rate([(W, H)], 0.1, "ecsq")  # 20 bits / 64 weights = 0.31 floor
    with pytest.raises(ValueError, match="unreachable"):
        solve_rows_global_rate([(W, H)], 7.0, "ecsq", k_max=8)
    with pytest.raises(ValueError, match="method"):
        solve_rows_global_rate([(W, H)], 3.0, "kmeans")


def test_group_scope_round_trips_shapes():
    W, H = laplace_rows(6, 512, seed=9)
    Wg, Hg = to_groups(W, H, 128)
    assert Wg.shape == (24, 128) and np.shares_memory(Wg, W)
    np.testing.assert_array_equal(Wg[5], W[1, 128:256])  # group q of row r is row r·(C/g)+q
    res = ecsq_rows(Wg, Hg, 0.1, level_bits=20.0)
    idx, cb, lv = from_groups(res, W.shape, 128)
    assert idx.shape == (6, 512) and cb.shape == (6, 4, res.codebooks.shape[1])
    assert lv.shape == (6, 4)
    cols = np.arange(512)
    deq = cb[np.arange(6)[:, None], cols[None, :] // 128, idx.astype(np.int64)]
    np.testing.assert_array_equal(deq, res.dequantize().reshape(6, 512))
    with pytest.raises(ValueError, match=r"tensor blk\.0 of shape \(6, 512\).*g=100"):
        to_groups(W, H, 100, name="blk.0")
    with pytest.raises(ValueError, match="g=64"):
        from_groups(res, W.shape, 64)


def test_fp16_rounding_recomputes_distortion_and_reassigns_nothing(rows):
    W, H = rows
    raw = ecsq_rows(W, H, 0.05, fp16=False)
    rounded = round_codebooks_fp16(raw, W, H)
    assert rounded.info["fp16"] and not raw.info["fp16"]
    np.testing.assert_array_equal(rounded.codebooks,
                                  rounded.codebooks.astype(np.float16).astype(np.float32))
    assert not np.array_equal(rounded.codebooks, raw.codebooks)
    for f in ("indices", "levels", "counts", "entropy"):
        np.testing.assert_array_equal(getattr(rounded, f), getattr(raw, f))
    check_invariants(rounded, W, H)  # D of the rounded values
    assert not np.array_equal(rounded.distortion, raw.distortion)
    # The default solvers report D after rounding.
    default = ecsq_rows(W, H, 0.05)
    np.testing.assert_array_equal(default.codebooks, rounded.codebooks)
    np.testing.assert_array_equal(default.distortion, rounded.distortion)
    big = ecsq_rows(W * 1e5, H, 0.05, fp16=False)
    with pytest.raises(ValueError, match="float16"):
        round_codebooks_fp16(big, W * 1e5, H)


def test_edge_cases():
    rng = np.random.default_rng(10)
    W = rng.laplace(size=(4, 64)).astype(np.float32)
    H = rng.lognormal(size=(4, 64)).astype(np.float32)
    W[1] = 0.25  # constant row
    H[2] = 0.0  # all-zero Hessian row
    for solve in (functools.partial(ecsq_rows, lam=0.05, level_bits=20.0),
                  functools.partial(uniform_rows, lam=0.05, level_bits=20.0)):
        for Hx in (H, floor_hessian(H)):
            res = solve(W, Hx)
            check_invariants(res, W, Hx)
            assert res.levels[1] == 1 and res.codebooks[1, 0] == np.float32(0.25)
            assert res.distortion[1] == 0.0 and res.entropy[1] == 0.0
            # Insensitive row: one level at any λ > 0 (its distortion costs ~nothing).
            assert res.levels[2] == 1 and np.all(np.isfinite(res.codebooks[2]))
            assert res.levels[0] > 1
    assert floor_hessian(H)[2].min() > 0
    one = ecsq_rows(W[:, :1], H[:, :1], 0.05, fp16=False)  # rows of length 1
    assert one.indices.shape == (4, 1) and np.all(one.levels == 1)
    np.testing.assert_array_equal(one.codebooks[:, 0], W[:, 0])
    assert np.all(one.distortion == 0) and np.all(one.entropy == 0)
    one16 = ecsq_rows(W[:, :1], H[:, :1], 0.05)  # the fp16 level, and its error
    np.testing.assert_array_equal(one16.codebooks[:, 0], W[:, 0].astype(np.float16))
    assert one16.distortion[0] > 0
    assert np.all(uniform_rows(W[:, :1], H[:, :1], 0.05).levels == 1)
    with pytest.warns(RuntimeWarning, match="h = 0 everywhere"):  # core's fallback, row 2
        assert kmeans_rows(W[:, :1], H[:, :1], 4).levels.tolist() == [1] * 4
    bad = W.copy()
    bad[3, 5] = np.nan
    for fn in (lambda: ecsq_rows(bad, H, 0.1, name="mlp.up"), lambda: uniform_rows(bad, H, 0.1),
               lambda: kmeans_rows(bad, H, 4), lambda: to_groups(W, H[:, :8], 8)):
        with pytest.raises(ValueError):
            fn()
    with pytest.raises(ValueError, match=r"tensor mlp\.up has 1 NaN values in w"):
        ecsq_rows(bad, H, 0.1, name="mlp.up")
    with pytest.raises(ValueError, match="negative"):
        ecsq_rows(W, -H, 0.1)
    with pytest.raises(ValueError, match="2-D"):
        ecsq_rows(W[0], H[0], 0.1)
    empty = ecsq_rows(np.zeros((0, 8), np.float32), np.zeros((0, 8), np.float32), 0.1)
    assert empty.indices.shape == (0, 8)


def test_uniform_fixed_step_follows_the_thresholds(rows):
    W, H = rows
    res = uniform_rows(W, H, step=0.5, fp16=False)
    m = np.floor(W.astype(np.float64) * 2.0 + 0.5)  # bin (m ± ½)·Δ, Δ = 0.5
    for r in range(W.shape[0]):
        _, rank = np.unique(m[r], return_inverse=True)
        np.testing.assert_array_equal(res.indices[r], rank)
        # Each level is the h-weighted mean of its bin (rounded to float32).
        for j in (0, res.levels[r] // 2):
            sel = res.indices[r] == j
            mean = np.sum(H[r, sel] * W[r, sel], dtype=np.float64) / np.sum(H[r, sel],
                                                                         dtype=np.float64)
            assert res.codebooks[r, j] == pytest.approx(mean, rel=1e-6, abs=1e-7)
    assert np.all(res.info["step"] == 0.5)
    with pytest.raises(ValueError, match="k_max"):
        uniform_rows(W, H, step=1e-4, k_max=16)


def test_kmeans_rows_wraps_solve_channels(rows):
    W, H = rows
    res = kmeans_rows(W, H, 8, seed=3, row_offset=100, fp16=False)
    ch = solve_channels(W, H, 8, seed=3, row_offset=100)
    np.testing.assert_array_equal(res.dequantize(), ch.dequantize())
    assert res.method == "hw_kmeans" and math.isnan(res.lam)
    check_invariants(res, W, H)
    np.testing.assert_allclose(res.distortion / W.shape[1], ch.weighted_distortion, rtol=1e-6)


def test_row_results_depend_on_the_global_row_index_only():
    """kmeans++ starts are seeded by (seed, row_offset + r): a row gives the same result in
    any block, and a different one under another global index."""
    W, H = laplace_rows(12, 128, seed=11)
    full = ecsq_rows(W, H, 0.05, init="kmeans++", seed=5)
    part = ecsq_rows(W[4:9], H[4:9], 0.05, init="kmeans++", seed=5, row_offset=4)
    np.testing.assert_array_equal(full.indices[4:9], part.indices)
    np.testing.assert_array_equal(full.distortion[4:9], part.distortion)
    moved = ecsq_rows(W[4:9], H[4:9], 0.05, init="kmeans++", seed=5, row_offset=50)
    assert not np.array_equal(full.indices[4:9], moved.indices)
    both = ecsq_rows(W, H, 0.05, init=("uniform", "kmeans++"), seed=5, fp16=False)
    alone = [ecsq_rows(W, H, 0.05, init=i, seed=5, fp16=False) for i in ("uniform", "kmeans++")]
    best = np.minimum(lagrangian(alone[0], 0.05), lagrangian(alone[1], 0.05))
    np.testing.assert_allclose(lagrangian(both, 0.05), best, rtol=1e-6)
    threaded = ecsq_rows(W, H, 0.05, init="kmeans++", seed=5, threads=2)
    np.testing.assert_array_equal(threaded.indices, full.indices)


def reference_ecsq(w, h, k, lam, iters):
    """Plain-numpy ECSQ of one row, full argmin over every level (no search shortcuts), from
    the same "uniform" start and with the same updates as the kernel."""
    w = w.astype(np.float64)
    h = h.astype(np.float64)
    n = w.size
    lo, hi = w.min(), w.max()
    c = np.unique(lo + (hi - lo) * ((np.arange(k) + 0.5) / k))
    a = np.searchsorted(0.5 * (c[:-1] + c[1:]), w, side="right")  # nearest
    cnt = np.ones(c.size)
    for t in range(iters + 1):
        if t > 0:
            pen = lam * (np.log2(n) - np.log2(cnt))
            a = np.argmin(h[:, None] * (w[:, None] - c[None, :]) ** 2 + pen[None, :], axis=1)
        d = w - c[a]
        cnt = np.bincount(a, minlength=c.size).astype(np.float64)
        sh = np.bincount(a, weights=h, minlength=c.size)
        s1 = np.bincount(a, weights=h * d, minlength=c.size)
        keep = cnt > 0
        c_new = (c + s1 / np.where(sh > 0, sh, 1.0)).astype(np.float32).astype(np.float64)
        order = np.argsort(c_new[keep], kind="stable")
        lab = np.full(c.size, -1)
        lab[np.flatnonzero(keep)[order]] = np.arange(keep.sum())
        c, cnt, a = c_new[keep][order], cnt[keep][order], lab[a]
    return c, a


@pytest.mark.parametrize("k_max", [20, 100])  # linear and bisection nearest-centre search
def test_ecsq_kernel_equals_a_brute_force_reference(k_max):
    W, H = laplace_rows(6, 300, seed=12)
    lam = 0.02
    res = ecsq_rows(W, H, lam, k_max=k_max, iters=8, tol=-1.0, fp16=False)
    assert np.all(res.info["iters"] == 8)
    for r in range(W.shape[0]):
        c, a = reference_ecsq(W[r], H[r], k_max, lam, 8)
        L = res.levels[r]
        np.testing.assert_array_equal(res.codebooks[r, :L], c.astype(np.float32))
        np.testing.assert_array_equal(res.indices[r], a)


# --------------------------------------------------------------------------------------------
# Binned ECSQ (ecsq_rows(bins=...)): the counted kernel, the bins, the exact last pass
# --------------------------------------------------------------------------------------------


def test_counted_kernel_with_unit_counts_is_the_plain_kernel_bit_for_bit():
    from pipeline.quantize.rows import _ecsq_run, _ecsq_starts

    W, H = laplace_rows(12, 300, seed=21)
    C0, L0 = _ecsq_starts(W, H, 32, "uniform", 0, 0)
    plain = _ecsq_run(W, H, C0, L0, 0.05, 20.0, 20, 1e-7, np.uint8, False, 1)
    ones = _ecsq_run(W, H, C0, L0, 0.05, 20.0, 20, 1e-7, np.uint8, False, 1,
                     M=np.ones(W.shape))
    for a, b in zip(plain[:7], ones[:7], strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_counted_element_solves_like_its_copies():
    """An element with count m and mean h stands for m copies of (x, h): same levels, same
    assignment, same Lagrangian (up to summation order)."""
    from pipeline.quantize.rows import _ecsq_run, _ecsq_starts

    rng = np.random.default_rng(5)
    R, n = 4, 60
    X = rng.laplace(size=(R, n))
    Hm = rng.lognormal(size=(R, n))
    M = rng.integers(1, 6, size=(R, n)).astype(np.float64)
    C0, L0 = _ecsq_starts(X.astype(np.float32), Hm.astype(np.float32), 12, "uniform", 0, 0)
    counted = _ecsq_run(X, Hm, C0, L0, 0.3, 0.0, 15, 1e-9, np.uint8, False, 1, M=M)
    for r in range(R):
        rep = M[r].astype(int)
        Xe, He = np.repeat(X[r], rep)[None], np.repeat(Hm[r], rep)[None]
        full = _ecsq_run(Xe, He, C0[r:r + 1], L0[r:r + 1], 0.3, 0.0, 15, 1e-9, np.uint8, False,
                         1)
        L = counted[2][r]
        assert full[2][0] == L
        np.testing.assert_allclose(full[0][0, :L], counted[0][r, :L], rtol=1e-6)
        np.testing.assert_array_equal(full[1][0], np.repeat(counted[1][r], rep))
        np.testing.assert_allclose(full[5][0], counted[5][r], rtol=1e-9)


def test_bins_keep_every_weight_and_its_moments():
    from pipeline.quantize.row_kernels import bin_rows_kernel

    W, H = laplace_rows(5, 2000, seed=3)
    W[0, :3] = [40.0, -55.0, 60.0]  # outliers: kept one by one, the bins stay narrow
    H[1] = 0.0  # all h = 0: plain means
    B, E = 64, 16
    X, Hb, Mb = np.empty((5, B + E)), np.empty((5, B + E)), np.empty((5, B + E))
    bin_rows_kernel(W, H, B, 6.0, X, Hb, Mb)
    w64, h64 = W.astype(np.float64), H.astype(np.float64)
    np.testing.assert_array_equal(Mb.sum(axis=1), 2000)
    np.testing.assert_allclose((Mb * Hb).sum(axis=1), h64.sum(axis=1), rtol=1e-9)
    np.testing.assert_allclose((Mb * Hb * X).sum(axis=1), (h64 * w64).sum(axis=1), rtol=1e-9,
                               atol=1e-9)
    np.testing.assert_allclose((Mb * X)[1].sum(), w64[1].sum(), rtol=1e-9)
    assert {40.0, -55.0, 60.0} <= set(X[0][Mb[0] == 1].tolist())
    assert np.all(Mb[Mb > 0] == np.floor(Mb[Mb > 0]))


def test_binned_ecsq_is_a_valid_near_exact_solution():
    W, H = laplace_rows(24, 2048, seed=9)
    W[:, :2] *= 10
    lam = 0.5
    exact = ecsq_rows(W, H, lam, level_bits=20.0)
    binned = ecsq_rows(W, H, lam, level_bits=20.0, bins=256)
    assert binned.info["bins"] == 256 and exact.info["bins"] == 0
    for r in range(W.shape[0]):
        L = binned.levels[r]
        assert binned.indices[r].max() < L and np.all(binned.counts[r, :L] > 0)
        assert np.all(np.diff(binned.codebooks[r, :L]) > 0)
    np.testing.assert_allclose(binned.dequantize(), W, atol=np.abs(W).max())
    j_exact = lagrangian(exact, lam, 20.0).sum()
    j_binned = lagrangian(binned, lam, 20.0).sum()
    assert j_exact <= j_binned <= 1.06 * j_exact
    again = ecsq_rows(W, H, lam, level_bits=20.0, bins=256)
    np.testing.assert_array_equal(again.indices, binned.indices)
    # rows shorter than 8·bins are solved exactly
    short = ecsq_rows(W[:, :1024], H[:, :1024], lam, level_bits=20.0, bins=256)
    plain = ecsq_rows(W[:, :1024], H[:, :1024], lam, level_bits=20.0)
    assert short.info["bins"] == 0
    np.testing.assert_array_equal(short.indices, plain.indices)
