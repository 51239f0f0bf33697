"""The lookup-table kernels against numpy references on random packed matrices of awkward
shapes: the integer block sums of the fast path are exact, so the only tolerance is float32
summation of the scaled block sums, bounded from the absolute terms."""

import numpy as np
import pytest
import torch

from pipeline.runtime import kernels as K
from pipeline.runtime.transcode import pack_indices, transcode_codes

SHAPES = [(1, 1), (1, 576), (7, 1), (13, 33), (33, 576), (40, 95), (9, 64), (5, 1000)]
LEVELS = {4: 2, 8: 3, 16: 4}  # levels a row -> the packed width transcoding picks


def _packed(rows, cols, k=16, seed=0, groups=1):
    rng = np.random.default_rng(seed + rows * 1000 + cols)
    ntab = rows * groups
    cb = rng.normal(size=(ntab, k)).astype(np.float32)
    cb[:, 0] *= 8  # an outlier level: int8 tables are scaled by it
    codes = rng.integers(0, k, size=rows * cols).astype(np.uint8 if k <= 256 else np.uint16)
    codes[-1] = k - 1  # some table uses all k levels: the width is k's
    rc = {
        "codes": codes,
        "positions": None,
        "codebook": cb,
        "shape": (rows, cols),
        "dtype": "float32",
    }
    return transcode_codes(rc), codes.reshape(rows, cols), cb


def _dense(codes, cb, groups):
    rows, cols = codes.shape
    gs = cols // groups
    t = np.arange(rows)[:, None] * groups + np.arange(cols)[None, :] // gs
    return cb[t, codes.astype(np.int64)].astype(np.float64)


def _q8_reference(x, p):
    """(exact value of the fast path's formula in float64, bound on its float32 rounding)."""
    b, cols = x.shape
    nblk = -(-cols // 32)
    xp = np.zeros((b, nblk * 32), np.float32)
    xp[:, :cols] = x
    xb = xp.reshape(b, nblk, 32)
    d = np.abs(xb).max(axis=2) / np.float32(127.0)
    inv = np.divide(np.float32(1.0), d, out=np.zeros_like(d), where=d > 0)
    xq = np.rint(xb * inv[:, :, None]).astype(np.int64)
    gsb = nblk if p.groups == 1 else p.group_size // 32
    tq = p.tq.numpy().astype(np.int64)
    ts = p.ts.numpy()
    full = np.zeros((p.rows, nblk * 32), np.int64)
    full[:, :cols] = p.indices()
    tab = np.arange(p.rows)[:, None] * p.groups + np.arange(nblk)[None, :] // gsb
    w = tq[np.repeat(tab, 32, axis=1), full].reshape(p.rows, nblk, 32)
    isum = np.einsum("bkj,rkj->brk", xq, w)
    iabs = np.einsum("bkj,rkj->brk", np.abs(xq), np.abs(w))
    scale = (d[:, None, :] * ts[tab][None, :, :]).astype(np.float32).astype(np.float64)
    exact = (isum * scale).sum(axis=2)
    bound = (nblk + 8) * 2.0**-23 * (iabs * scale).sum(axis=2) + 1e-30
    return exact, bound


@pytest.mark.parametrize("k", LEVELS)
@pytest.mark.parametrize("b", [1, 5])
@pytest.mark.parametrize("rows,cols", SHAPES)
def test_reference_path_matches_numpy(rows, cols, b, k):
    p, codes, cb = _packed(rows, cols, k)
    assert p.bits == LEVELS[k]
    x = np.random.default_rng(1).normal(size=(b, cols)).astype(np.float32)
    w = _dense(codes, cb, 1)
    exact = x.astype(np.float64) @ w.T
    bound = (cols + 1) * 2.0**-23 * (np.abs(x) @ np.abs(w).T) + 1e-30
    y = K.lut_matmul(torch.from_numpy(x), p, path="ref").numpy()
    assert np.all(np.abs(y - exact) <= bound)


@pytest.mark.parametrize("k", LEVELS)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("b", [1, 5])
@pytest.mark.parametrize("rows,cols", SHAPES)
def test_fast_path_matches_its_definition(rows, cols, b, threads, k):
    p, codes, cb = _packed(rows, cols, k)
    assert p.bits == LEVELS[k] and p.q8_ok
    x = np.random.default_rng(2).normal(size=(b, cols)).astype(np.float32)
    x[:, ::7] *= 20  # activation outliers
    exact, bound = _q8_reference(x, p)
    for path in ("q8", "q8_scalar"):
        y = K.lut_matmul(torch.from_numpy(x), p, path=path, threads=threads).numpy()
        assert np.all(np.abs(y - exact) <= bound), path
    # and it is close to the exact product (int8 levels and activations)
    ref = x.astype(np.float64) @ _dense(codes, cb, 1).T
    scale = np.abs(x).max() * np.abs(cb).max() * np.sqrt(cols)
    assert np.abs(y - ref).max() <= 0.05 * scale


@pytest.mark.parametrize("k", LEVELS)
@pytest.mark.parametrize("groups,cols", [(2, 64), (3, 96), (3, 192), (4, 1024)])
@pytest.mark.parametrize("b", [1, 5])
def test_group_tables(groups, cols, b, k):
    rows = 11
    p, codes, cb = _packed(rows, cols, k, groups=groups)
    assert p.groups == groups and p.q8_ok and p.bits == LEVELS[k]
    x = np.random.default_rng(3).normal(size=(b, cols)).astype(np.float32)
    w = _dense(codes, cb, groups)
    y = K.lut_matmul(torch.from_numpy(x), p, path="ref").numpy()
    exact = x.astype(np.float64) @ w.T
    assert np.all(np.abs(y - exact) <= (cols + 1) * 2.0**-23 * (np.abs(x) @ np.abs(w).T))
    exact, bound = _q8_reference(x, p)
    for path in ("q8", "q8_scalar"):
        y = K.lut_matmul(torch.from_numpy(x), p, path=path).numpy()
        assert np.all(np.abs(y - exact) <= bound), path


@pytest.mark.parametrize("k", LEVELS)
def test_groups_not_on_block_boundaries_take_the_reference_path(k):
    p, codes, cb = _packed(6, 40, k, groups=2)  # 20-column groups
    assert not p.q8_ok and p.bits == LEVELS[k]
    x = np.random.default_rng(4).normal(size=(3, 40)).astype(np.float32)
    y = K.lut_matmul(torch.from_numpy(x), p, path="q8").numpy()
    np.testing.assert_allclose(y, x @ _dense(codes, cb, 2).T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows,cols", [(5, 33), (3, 576)])
def test_eight_bit_matrices(rows, cols):
    p, codes, cb = _packed(rows, cols, k=40)
    assert p.bits == 8 and not p.q8_ok
    x = np.random.default_rng(5).normal(size=(2, cols)).astype(np.float32)
    y = K.lut_matmul(torch.from_numpy(x), p, path="q8").numpy()
    np.testing.assert_allclose(y, x @ _dense(codes, cb, 1).T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", LEVELS)
@pytest.mark.parametrize("b", [1, 5])
def test_fp32_activation_path(k, b):
    p, codes, cb = _packed(20, 95, k)
    assert p.bits == LEVELS[k]
    x = np.random.default_rng(6).normal(size=(b, 95)).astype(np.float32)
    tq, ts = p.tq.numpy().astype(np.float64), p.ts.numpy().astype(np.float64)
    w = tq[np.arange(20)[:, None], p.indices().astype(np.int64)] * ts[:, None]
    y = K.lut_matmul(torch.from_numpy(x), p, path="f32a").numpy()
    np.testing.assert_allclose(y, x @ w.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", LEVELS)
def test_torch_fallback_is_the_reference(monkeypatch, k):
    p, codes, cb = _packed(9, 70, k)
    x = np.random.default_rng(7).normal(size=(3, 70)).astype(np.float32)
    monkeypatch.setattr(K, "kernels", lambda: None)
    y = K.lut_matmul(torch.from_numpy(x), p, path="q8").numpy()
    np.testing.assert_allclose(y, x @ _dense(codes, cb, 1).T, rtol=1e-5, atol=1e-5)


def test_no_compiler_is_one_warning_and_the_fallback(monkeypatch, caplog):
    monkeypatch.setattr(K, "_compiler", lambda: None)
    K.kernels.cache_clear()
    try:
        assert K.kernels() is None
        assert "torch fallback" in caplog.text
    finally:
        K.kernels.cache_clear()


def test_build_is_cached_and_atomic(tmp_path, monkeypatch):
    monkeypatch.setenv("HWQ_CACHE", str(tmp_path))
    path = K.build()
    assert path.parent == tmp_path / "runtime" and path.exists()
    mtime = path.stat().st_mtime_ns
    assert K.build() == path and path.stat().st_mtime_ns == mtime
    assert [f.name for f in path.parent.iterdir()] == [path.name]  # no temporary left


@pytest.mark.parametrize("use_kernels", [True, False])
def test_pack_layout(use_kernels):
    """The documented layouts (docs/RUNTIME.md §2), byte for byte, C and numpy packing."""
    full = np.arange(40, dtype=np.uint8)[None, :] % 16
    packed = pack_indices(full, 4, use_kernels=use_kernels)
    assert packed.shape == (1, 32)
    assert packed[0, 0] == (0 | (0 << 4)) and packed[0, 1] == (1 | (1 << 4))
    assert packed[0, 16] == 32 % 16 and packed[0, 16 + 8] == 0  # padding: index 0
    # 2 bits: byte j holds columns j, j + 8, j + 16, j + 24 in its bit pairs, lowest first
    two = np.zeros((1, 40), np.uint8)
    two[0, [1, 9, 18, 27, 33]] = [1, 2, 3, 1, 3]
    packed = pack_indices(two, 2, use_kernels=use_kernels)
    assert packed.shape == (1, 16)
    assert list(packed[0, :8]) == [0, 1 | (2 << 2), 3 << 4, (1 << 6), 0, 0, 0, 0]
    assert list(packed[0, 8:]) == [0, 3, 0, 0, 0, 0, 0, 0]  # column 33; padding 0
    # 3 bits: low bit pairs as 2 bits, then byte j (< 4) bit m = third bit of column j + 4m
    three = np.zeros((1, 33), np.uint8)
    three[0, [0, 5, 31, 32]] = [4, 7, 6, 5]
    packed = pack_indices(three, 3, use_kernels=use_kernels)
    assert packed.shape == (1, 24)
    assert list(packed[0, :8]) == [0, 0, 0, 0, 0, 3, 0, 2 << 6]
    assert list(packed[0, 8:12]) == [1, 1 << 1, 0, 1 << 7]
    assert list(packed[0, 12:]) == [1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]
