"""Huffman code construction, chunked bitstreams and gap coding: exactness and optimality."""

import heapq

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.encode.bitio import DecodeError, pack_codewords
from pipeline.encode.huffman import (
    CodeTable,
    canonical_codewords,
    decode_chunk,
    decode_stream,
    encode_chunk,
    encode_stream,
    entropy_bits,
    fixed_lengths,
    huffman_lengths,
    kraft_ok,
    pack_lengths,
    unpack_lengths,
)
from pipeline.encode.positions import (
    choose_max_gap,
    gap_histogram,
    gap_symbol_counts,
    gaps_from_mask,
    gaps_to_symbols,
    symbols_to_positions,
)


def _huffman_cost_reference(counts) -> int:
    """Optimal (unlimited) prefix-code cost: sum of the merged weights, via a heap."""
    heap = [int(c) for c in counts if c > 0]
    if len(heap) == 1:
        return heap[0]
    heapq.heapify(heap)
    cost = 0
    while len(heap) > 1:
        a, b = heapq.heappop(heap), heapq.heappop(heap)
        cost += a + b
        heapq.heappush(heap, a + b)
    return cost


def _kraft(lengths) -> float:
    ln = np.asarray(lengths, np.int64)
    return float(np.sum(2.0 ** -ln[ln > 0]))


@pytest.mark.parametrize("k", [2, 3, 5, 17, 256, 1000])
def test_lengths_are_optimal_and_complete(k):
    rng = np.random.default_rng(k)
    for _ in range(5):
        counts = rng.integers(1, 10_000, k) * (rng.random(k) < 0.8)
        if (counts > 0).sum() < 2:
            counts[:2] = 1
        ln = huffman_lengths(counts)
        assert ln.dtype == np.uint8
        assert (ln[counts == 0] == 0).all() and (ln[counts > 0] > 0).all()
        assert _kraft(ln) == 1.0
        assert int(np.dot(counts, ln.astype(np.int64))) == _huffman_cost_reference(counts)


@pytest.mark.parametrize("k", [2, 4, 16, 64, 256, 4096])
def test_average_length_within_one_bit_of_entropy(k):
    rng = np.random.default_rng(100 + k)
    for alpha in (0.1, 1.0, 10.0):
        p = rng.dirichlet(np.full(k, alpha))
        counts = np.maximum(np.round(p * 1e6), 0).astype(np.int64)
        counts[0] += 1  # at least one used symbol
        h = entropy_bits(counts)
        avg = np.dot(counts, huffman_lengths(counts)) / counts.sum()
        assert h - 1e-9 <= avg < h + 1


def test_length_limit_keeps_a_valid_prefix_code():
    fib = [1, 1]
    while len(fib) < 40:
        fib.append(fib[-1] + fib[-2])
    counts = np.array(fib, np.int64)  # unlimited Huffman depth would be 39
    unlimited = _huffman_cost_reference(counts)
    prev_cost = unlimited
    for max_len in (24, 12, 8, 6):
        ln = huffman_lengths(counts, max_len=max_len)
        assert ln.max() <= max_len
        assert kraft_ok(ln) and _kraft(ln) == 1.0
        cost = int(np.dot(counts, ln.astype(np.int64)))
        assert cost >= prev_cost  # a tighter limit can only cost more
        prev_cost = cost
    with pytest.raises(ValueError):
        huffman_lengths(np.ones(100), max_len=6)  # 100 symbols do not fit in 6 bits


def test_degenerate_alphabets():
    assert huffman_lengths(np.array([0, 0, 7])).tolist() == [0, 0, 1]
    assert huffman_lengths(np.zeros(4)).tolist() == [0, 0, 0, 0]
    assert huffman_lengths(np.zeros(0)).size == 0
    assert fixed_lengths(1).tolist() == [1]
    assert fixed_lengths(5).tolist() == [3] * 5
    t = CodeTable.from_counts(np.array([0, 9, 0]))
    x = np.ones(1001, np.uint8)
    ch = encode_chunk(x, t)
    assert len(ch.data) == 126  # one bit per symbol
    assert (decode_chunk(ch.data, 1001, t) == x).all()
    empty = encode_chunk(np.zeros(0, np.uint8), t)
    assert empty.data == b"" and decode_chunk(b"", 0, t).size == 0


def test_canonical_codewords_are_prefix_free():
    rng = np.random.default_rng(3)
    counts = rng.integers(0, 50, 60)
    ln = huffman_lengths(counts)
    cw = canonical_codewords(ln)
    words = sorted(format(int(c), f"0{int(n)}b") for c, n in zip(cw, ln, strict=True) if n > 0)
    for a, b in zip(words, words[1:], strict=False):
        assert not b.startswith(a)


@pytest.mark.parametrize("k", [2, 3, 255, 256, 257, 4096, 65535, 65536])
@pytest.mark.parametrize("fixed", [False, True])
def test_stream_round_trip(k, fixed):
    rng = np.random.default_rng(k)
    n = 60_000
    p = rng.dirichlet(np.full(k, 0.5 if k < 1000 else 0.05))
    x = rng.choice(k, size=n, p=p)
    x[:2] = [0, k - 1]  # the extremes of the alphabet
    counts = np.bincount(x, minlength=k)
    t = CodeTable.from_counts(counts, fixed=fixed)
    chunks = encode_stream(x, t, chunk_symbols=7_001)
    assert len(chunks) == -(-n // 7_001)
    y = decode_stream(chunks, t)
    assert (y == x).all()
    coded_bits = sum(c.n_bits for c in chunks)
    assert coded_bits == t.cost_bits(counts)
    assert sum(len(c.data) for c in chunks) == sum(-(-c.n_bits // 8) for c in chunks)


def test_matches_a_bit_by_bit_reference():
    rng = np.random.default_rng(5)
    counts = rng.integers(1, 100, 300)
    counts[:3] = [10**6, 1, 1]  # long codewords cross 64-bit word boundaries
    t = CodeTable.from_counts(counts)
    x = rng.choice(300, size=5000, p=counts / counts.sum())
    data, n_bits = pack_codewords(x, t.codewords, t.lengths)
    bits = "".join(format(int(t.codewords[s]), f"0{int(t.lengths[s])}b") for s in x)
    assert n_bits == len(bits)
    ref = np.packbits(np.frombuffer(bits.encode(), np.uint8) - ord("0"))
    assert data.tobytes() == ref.tobytes()


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    k=st.integers(1, 600),
    n=st.integers(0, 3000),
    chunk=st.integers(1, 1000),
    skew=st.floats(0.02, 5.0),
)
def test_round_trip_property(data, k, n, chunk, skew):
    seed = data.draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    x = rng.choice(k, size=n, p=rng.dirichlet(np.full(k, skew)))
    t = CodeTable.from_counts(np.bincount(x, minlength=k))
    assert (decode_stream(encode_stream(x, t, chunk), t) == x).all()


def test_decoder_refuses_corrupt_chunks():
    counts = np.array([5, 3, 1, 1])
    t = CodeTable.from_counts(counts)
    x = np.array([0, 1, 2, 3, 0, 0, 1, 2, 3, 3, 1])
    ch = encode_chunk(x, t)
    with pytest.raises(DecodeError):
        decode_chunk(ch.data, 8 * len(ch.data) + 1, t)  # more symbols than bits
    with pytest.raises(DecodeError):
        decode_chunk(ch.data[:-1], len(x), t)  # truncated
    with pytest.raises(DecodeError):
        decode_chunk(ch.data + b"\0", len(x), t)  # trailing byte
    with pytest.raises(DecodeError):
        decode_chunk(ch.data, len(x) - 1, t)  # symbols end early
    # An incomplete code (one symbol, codeword "0"): a 1 bit matches nothing.
    t1 = CodeTable.from_counts(np.array([4]))
    with pytest.raises(DecodeError, match="invalid codeword"):
        decode_chunk(b"\x80", 1, t1)
    with pytest.raises(DecodeError, match="padding"):
        decode_chunk(b"\x01", 1, t1)


def test_code_table_validation_and_serialization():
    with pytest.raises(DecodeError):
        CodeTable(np.array([1, 1, 1], np.uint8))  # Kraft sum 3/2
    with pytest.raises(DecodeError):
        CodeTable(np.array([25, 1], np.uint8))  # longer than 24 bits
    rng = np.random.default_rng(9)
    for k in (1, 7, 300):
        ln = huffman_lengths(rng.integers(0, 1000, k))
        data, width = pack_lengths(ln)
        assert len(data) == -(-k * width // 8)
        assert (unpack_lengths(data, k, width) == ln).all()
    with pytest.raises(DecodeError):
        unpack_lengths(b"\x00", 3, 4)  # wrong size


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 5000),
    density=st.floats(0.0, 1.0),
    max_gap=st.integers(1, 300),
    seed=st.integers(0, 2**32 - 1),
)
def test_gap_symbols_round_trip(n, density, max_gap, seed):
    rng = np.random.default_rng(seed)
    mask = rng.random(n) < density**3  # sparse masks too: long gaps and escapes
    gaps = gaps_from_mask(mask)
    assert (gaps >= 1).all()
    sym = gaps_to_symbols(gaps, max_gap)
    assert sym.max(initial=0) <= max_gap
    assert (symbols_to_positions(sym, max_gap) == np.flatnonzero(mask)).all()
    vals, cnts = gap_histogram(gaps)
    assert (gap_symbol_counts(vals, cnts, max_gap) == np.bincount(sym, minlength=max_gap + 1)).all()


def test_max_gap_choice_beats_the_extremes():
    rng = np.random.default_rng(11)
    mask = rng.random(200_000) < 0.08
    mask[50_000:60_000] = False  # one very long gap
    vals, cnts = gap_histogram(gaps_from_mask(mask))
    m, table = choose_max_gap(vals, cnts)
    assert table.alphabet == m + 1

    def cost(m_, t_):
        return t_.cost_bits(gap_symbol_counts(vals, cnts, m_)) + 8 * t_.table_bytes()

    chosen = cost(m, table)
    for other in (1, 3, 15, int(vals.max())):
        t2 = CodeTable.from_counts(gap_symbol_counts(vals, cnts, other))
        assert chosen <= cost(other, t2) + 8  # within table-byte rounding
    mf, tf = choose_max_gap(vals, cnts, fixed=True)
    assert tf.fixed and (mf + 1) & mf == 0  # 2**b - 1
