"""Adaptive context-mixing range coding of masks and indices (pipeline/encode/context.py):
exact round trips, determinism, sizes against the order-0 entropies it must beat, and
hostile data (truncated, flipped, random, wrong sizes) refused with DecodeError, boundedly."""

from __future__ import annotations

import time

import numpy as np
import pytest

from pipeline.encode.bitio import DecodeError
from pipeline.encode.context import (
    DECISIONS_PER_BIT,
    MASK_MODELS,
    decode_indices,
    decode_mask,
    encode_indices,
    encode_mask,
    indices_cost_bits,
    mask_cost_bits,
    max_decisions,
)
from pipeline.encode.huffman import symbol_dtype


def magnitude_mask(rows, cols, keep, seed, spread=0.5):
    """Top-``keep`` of |r_i c_j N(0, 1)|: magnitude pruning's row/column structure."""
    rng = np.random.default_rng(seed)
    r = np.exp(spread * rng.standard_normal(rows))[:, None]
    c = np.exp(spread * rng.standard_normal(cols))[None, :]
    w = np.abs(r * c * rng.standard_normal((rows, cols))).ravel()
    n = max(1, round(keep * w.size))
    mask = np.zeros(w.size, bool)
    mask[np.argpartition(w, w.size - n)[w.size - n :]] = True
    return mask.reshape(rows, cols)


def gap_entropy_bits(mask) -> float:
    """Order-0 entropy of the gap stream (Han's positions) in bits."""
    gaps = np.diff(np.flatnonzero(mask.ravel()), prepend=-1)
    _, counts = np.unique(gaps, return_counts=True)
    return float(-(counts * np.log2(counts / counts.sum())).sum())


def order0_bits(codes) -> float:
    counts = np.bincount(np.asarray(codes, np.int64))
    counts = counts[counts > 0]
    return float(-(counts * np.log2(counts / counts.sum())).sum())


def laplace_codes(n_rows, per_row, k, spread, seed):
    rng = np.random.default_rng(seed)
    scale = 2.0 * np.exp(spread * rng.standard_normal(n_rows))
    rows = np.repeat(np.arange(n_rows), per_row)
    codes = np.clip(np.rint(rng.laplace(k // 2, scale[rows])), 0, k - 1)
    return codes.astype(symbol_dtype(k)), rows


def mask_round_trip(mask, group=1):
    data = encode_mask(mask, group)
    back = decode_mask(data, *mask.shape, group)
    assert back.dtype == bool and back.shape == mask.shape
    np.testing.assert_array_equal(back, mask)
    return data


# ---------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize(
    "shape", [(1, 1), (1, 37), (37, 1), (3, 5), (64, 64), (500, 800), (2, 4097)]
)
def test_constant_masks_round_trip(shape):
    for value in (False, True):
        data = mask_round_trip(np.full(shape, value))
        assert 8 * len(data) <= 48 + 0.01 * np.prod(shape)  # nearly free


def test_empty_masks():
    for shape in [(0, 5), (5, 0), (0, 0)]:
        assert encode_mask(np.zeros(shape, bool)) == b""
        assert decode_mask(b"", *shape).shape == shape
        with pytest.raises(DecodeError):
            decode_mask(b"\x01", *shape)


@pytest.mark.parametrize("density", [0.001, 0.01, 0.08, 0.3, 0.5, 0.7, 0.95, 0.999])
def test_random_masks_round_trip(density):
    rng = np.random.default_rng(int(density * 1000))
    for shape, group in [((40, 75), 25), ((17, 130), 1), ((1, 2000), 1), ((300, 1), 1)]:
        mask = rng.random(shape) < density
        data = mask_round_trip(mask, group)
        # Unstructured: within 2% (+ 64 bits of learning) of the ideal static code.
        p = mask.mean()
        h = 0.0 if p in (0, 1) else -(p * np.log2(p) + (1 - p) * np.log2(1 - p)) * mask.size
        assert 8 * len(data) <= 1.02 * h + 64, (shape, density)


@pytest.mark.parametrize("group", [1, 7, 25, 16])
def test_structured_masks_round_trip(group):
    mask = magnitude_mask(50, 400, 0.12, seed=group)
    mask[:, 25:50] = False  # a dead input channel
    mask[7] = False  # a dead output channel
    mask_round_trip(mask, group)


def test_large_structured_mask_beats_gap_entropy():
    """fc1-sized magnitude pruning: clearly below the order-0 entropy of its gaps, and the
    stream is within a few bytes of the model's ideal code length."""
    mask = magnitude_mask(500, 800, 0.08, seed=3)
    data = mask_round_trip(mask)
    gap_h = gap_entropy_bits(mask)
    assert 8 * len(data) < 0.85 * gap_h
    assert abs(8 * len(data) - mask_cost_bits(mask)) <= 40
    # the model the coder uses is the best of those measured on this mask
    costs = {m: mask_cost_bits(mask, model=m) for m in MASK_MODELS}
    assert costs["mix"] < min(costs["density"], costs["neighbours"], costs["counts"])


def test_block_and_n_m_structure_is_exploited():
    rng = np.random.default_rng(5)
    blocks = np.kron(rng.random((64, 128)) < 0.2, np.ones((4, 4), bool))
    two_four = np.zeros((64, 256), bool)
    for i in range(64):
        for j in range(0, 256, 4):
            two_four[i, j + rng.choice(4, 2, replace=False)] = True
    data = mask_round_trip(blocks)
    assert 8 * len(data) < 0.6 * gap_entropy_bits(blocks)
    data = mask_round_trip(two_four)
    assert 8 * len(data) < 1.15 * 64 * 64 * np.log2(6)  # the entropy of random 2:4 groups


def test_mask_inputs_and_determinism():
    mask = magnitude_mask(30, 60, 0.2, seed=9)
    data = encode_mask(mask, 4)
    assert encode_mask(mask, 4) == data
    assert encode_mask(mask.astype(np.uint8), 4) == data
    assert encode_mask(np.asfortranarray(mask), 4) == data
    for buf in (bytearray(data), memoryview(data), np.frombuffer(data, np.uint8).copy()):
        np.testing.assert_array_equal(decode_mask(buf, 30, 60, 4), mask)
    assert encode_mask(mask, 1) != data  # the context changes the code
    with pytest.raises(ValueError):
        encode_mask(np.zeros((2, 3, 4), bool))
    with pytest.raises(ValueError):
        encode_mask(mask, 0)
    with pytest.raises(ValueError):
        mask_cost_bits(mask, model="nope")


def test_all_zero_mask_reaches_but_respects_the_output_bound():
    """The densest stream there is: the decoder's size check must still admit it."""
    mask = np.zeros((2000, 2000), bool)
    data = mask_round_trip(mask)
    assert mask.size <= max_decisions(len(data))
    assert mask.size > max_decisions(len(data)) // 4  # the bound is not loose either
    assert max_decisions(0) == 8 * DECISIONS_PER_BIT


# ---------------------------------------------------------------------------------------------
# indices


def index_round_trip(codes, k, rows):
    data = encode_indices(codes, k, rows)
    back = decode_indices(data, len(codes), k, rows)
    assert back.dtype == symbol_dtype(k)
    np.testing.assert_array_equal(back, codes)
    return data


@pytest.mark.parametrize("k", [1, 2, 3, 16, 21, 256, 1000])
@pytest.mark.parametrize("spread", [0.0, 0.8])
def test_indices_round_trip(k, spread):
    codes, rows = laplace_codes(40, 50, k, spread, seed=k)
    data = index_round_trip(codes, k, rows)
    if k == 1:
        assert data == b""
    # uniform codes, every value, a single row, no rows
    rng = np.random.default_rng(k)
    index_round_trip(rng.integers(0, k, 999).astype(symbol_dtype(k)), k, np.zeros(999, int))
    index_round_trip(np.arange(k).astype(symbol_dtype(k)), k, np.arange(k) // 7)
    index_round_trip(np.zeros(0, np.uint8), k, np.zeros(0, int))
    assert decode_indices(b"", 0, k, np.zeros(0, int)).shape == (0,)


def test_indices_beat_order0_where_rows_differ():
    for k in (64, 256):
        codes, rows = laplace_codes(300, 100, k, 0.7, seed=k)
        data = index_round_trip(codes, k, rows)
        assert 8 * len(data) < 0.98 * order0_bits(codes)
        assert abs(8 * len(data) - indices_cost_bits(codes, k, rows)) <= 40
    codes, rows = laplace_codes(300, 100, 64, 0.0, seed=1)
    data = index_round_trip(codes, 64, rows)
    assert 8 * len(data) < 1.01 * order0_bits(codes)


def test_indices_inputs_and_determinism():
    codes, rows = laplace_codes(10, 30, 21, 0.5, seed=2)
    data = encode_indices(codes, 21, rows)
    assert encode_indices(codes.astype(np.int64), 21, rows.astype(np.int32)) == data
    # rows need not be sorted: a change of value starts a row
    shuffled = rows[::-1].copy()
    index_round_trip(codes, 21, shuffled)
    with pytest.raises(ValueError):
        encode_indices(codes, 20, rows)  # a code >= k
    with pytest.raises(ValueError):
        encode_indices(codes, 0, rows)
    with pytest.raises(ValueError):
        encode_indices(codes, 1 << 17, rows)
    with pytest.raises(ValueError):
        encode_indices(codes, 21, rows[:-1])


# ---------------------------------------------------------------------------------------------
# hostile data


def _refused_or_shaped(fn, shape):
    """fn() raises DecodeError or returns an array of the requested shape; nothing else."""
    t0 = time.perf_counter()
    try:
        out = fn()
    except DecodeError:
        out = None
    assert time.perf_counter() - t0 < 1.0
    if out is not None:
        assert out.shape == shape
    return out


@pytest.fixture(scope="module")
def streams():
    mask = magnitude_mask(40, 100, 0.15, seed=11)
    codes, rows = laplace_codes(20, 40, 21, 0.5, seed=11)
    return mask, encode_mask(mask, 4), codes, rows, encode_indices(codes, 21, rows)


def test_truncated_and_extended_data_is_refused(streams):
    mask, mdata, codes, rows, idata = streams
    for cut in range(len(mdata)):
        with pytest.raises(DecodeError):
            decode_mask(mdata[:cut], 40, 100, 4)
    for cut in range(len(idata)):
        with pytest.raises(DecodeError):
            decode_indices(idata[:cut], len(codes), 21, rows)
    for tail in (b"\x00", b"\x01", b"\xff\xff"):
        with pytest.raises(DecodeError):
            decode_mask(mdata + tail, 40, 100, 4)
        with pytest.raises(DecodeError):
            decode_indices(idata + tail, len(codes), 21, rows)


def test_flipped_bytes_are_detected(streams):
    mask, mdata, codes, rows, idata = streams
    rng = np.random.default_rng(0)
    undetected = 0
    for data, decode, shape in [
        (mdata, lambda d: decode_mask(d, 40, 100, 4), mask.shape),
        (idata, lambda d: decode_indices(d, len(codes), 21, rows), codes.shape),
    ]:
        for _ in range(300):
            bad = bytearray(data)
            i = int(rng.integers(len(bad)))
            bad[i] ^= 1 << int(rng.integers(8)) if rng.random() < 0.5 else int(rng.integers(1, 256))
            undetected += _refused_or_shaped(lambda b=bytes(bad), f=decode: f(b), shape) is not None
    assert undetected == 0  # 16 check bits and the exact ending: ~2**-16 get through


def test_random_bytes_and_wrong_sizes(streams):
    mask, mdata, codes, rows, idata = streams
    rng = np.random.default_rng(1)
    for n in [0, 1, 2, 3, 4, 5, 8, 50, 500]:
        for _ in range(20):
            junk = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
            _refused_or_shaped(lambda j=junk: decode_mask(j, 40, 100, 4), (40, 100))
            _refused_or_shaped(lambda j=junk: decode_mask(j, 3000, 3000), (3000, 3000))
            _refused_or_shaped(lambda j=junk: decode_indices(j, 800, 21, rows_800), (800,))
            _refused_or_shaped(lambda j=junk: decode_indices(j, 800, 256, rows_800), (800,))
    for r, c, g in [
        (40, 99, 4),
        (41, 100, 4),
        (39, 100, 4),
        (100, 40, 4),
        (40, 100, 5),
        (40, 100, 1),
    ]:
        _refused_or_shaped(lambda r=r, c=c, g=g: decode_mask(mdata, r, c, g), (r, c))
    n = len(codes)
    for nn, k in [(n - 1, 21), (n + 1, 21), (n, 22), (n, 20), (n, 2), (n, 256)]:
        rr = np.sort(np.resize(rows, nn))
        _refused_or_shaped(lambda nn=nn, k=k, rr=rr: decode_indices(idata, nn, k, rr), (nn,))
    _refused_or_shaped(lambda: decode_indices(idata, n, 21, rows[::-1].copy()), (n,))


rows_800 = np.repeat(np.arange(20), 40)


def test_bad_arguments_and_bombs_are_refused_before_decoding():
    for args in [(-1, 5, 1), (5, -1, 1), (5, 5, 0), (1 << 63, 0, 1), (0, 1 << 70, 1)]:
        with pytest.raises(DecodeError):
            decode_mask(b"\x00" * 8, *args)
    assert decode_mask(b"", 10**15, 0).shape == (10**15, 0)
    mask = magnitude_mask(5, 9, 0.3, seed=1)  # a group wider than a row allocates a row
    assert encode_mask(mask, 10**12) == encode_mask(mask, 9)
    np.testing.assert_array_equal(decode_mask(encode_mask(mask, 9), 5, 9, 10**12), mask)
    t0 = time.perf_counter()
    with pytest.raises(DecodeError, match="cannot be coded"):
        decode_mask(b"\x00" * 10, 1 << 20, 1 << 20)  # 2**40 bits from 10 bytes
    with pytest.raises(DecodeError):
        decode_indices(b"", 10**12, 21, np.zeros(0, int))
    assert time.perf_counter() - t0 < 0.5
    for n, k, rows in [(-1, 4, np.zeros(0, int)), (3, 0, np.zeros(3, int)),
                       (3, 1 << 17, np.zeros(3, int)), (3, 4, np.zeros(2, int)),
                       (3, 4, np.zeros(3))]:  # fmt: skip
        with pytest.raises(DecodeError):
            decode_indices(b"\x00" * 8, n, k, rows)
    with pytest.raises(DecodeError):
        decode_indices(b"\x01", 3, 1, np.zeros(3, int))  # k == 1 codes nothing
    with pytest.raises(DecodeError, match="cannot be coded"):
        decode_indices(b"\x00", max_decisions(1) + 1, 4, np.zeros(max_decisions(1) + 1, int))
