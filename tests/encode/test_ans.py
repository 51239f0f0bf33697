"""Static rANS (pipeline.encode.ans): exact round trips, size against the entropy and against
Huffman, optimal frequency normalization, table serialization, and hostile input."""

import heapq
import math
import pickle

import numpy as np
import pytest

from pipeline.encode.ans import MULTI_LANE_MIN, ans_decode, ans_encode
from pipeline.encode.ans_table import PROB_BITS_MAX, AnsTable, max_prob_bits, normalize_freqs
from pipeline.encode.bitio import DecodeError
from pipeline.encode.huffman import CodeTable, entropy_bits, symbol_dtype


def _laplace_probs(k: int, bits: float) -> np.ndarray:
    """Two-sided geometric law over k symbols (centred) with the given entropy (bisection)."""
    j = np.arange(k) - k // 2

    def probs(scale):
        p = np.exp(-np.abs(j) / scale)
        return p / p.sum()

    lo, hi = 1e-3, 1e5
    for _ in range(100):
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if entropy_bits(probs(mid)) < bits else (lo, mid)
    return probs((lo * hi) ** 0.5)


def _sample(rng, p: np.ndarray, n: int) -> np.ndarray:
    cdf = np.cumsum(p)
    cdf[-1] = 1.0
    x = np.searchsorted(cdf, rng.random(n), side="right")
    return x.astype(symbol_dtype(p.shape[0]))


def _decodes_canonically(data: bytes, n: int, table: AnsTable) -> bool:
    """False if the decoder refuses data; True if it accepts, after checking what it
    returned: n valid symbols that encode back to exactly these bytes."""
    try:
        y = ans_decode(data, n, table)
    except DecodeError:
        return False
    assert y.shape == (n,) and y.dtype == symbol_dtype(table.alphabet)
    assert ans_encode(y, table) == bytes(data)
    return True


# ---------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("k", [2, 3, 16, 256, 65536])
@pytest.mark.parametrize("n", [0, 1, 2, 3, 1000, 1_000_000])
def test_round_trip(k, n):
    rng = np.random.default_rng(1000 * k + n)
    p = _laplace_probs(k, min(3.0, 0.9 * math.log2(k)) if k < 65536 else 12.0)
    x = _sample(rng, p, n)
    if n >= 2:
        x[:2] = [0, k - 1]  # the extremes of the alphabet
    counts = np.bincount(x, minlength=k)
    t = AnsTable.from_counts(counts)
    data = ans_encode(x, t)
    y = ans_decode(data, n, t)
    assert y.dtype == symbol_dtype(k)
    assert np.array_equal(x, y)
    if t.max_symbols(len(data)) is not None:  # None: a one-symbol table, 0 bytes
        assert n <= t.max_symbols(len(data))
    # Any table whose support covers the symbols works, e.g. one from a bigger sample.
    wide = AnsTable.from_counts(np.bincount(_sample(rng, p, 5000), minlength=k) + 1)
    assert np.array_equal(ans_decode(ans_encode(x, wide), n, wide), x)


@pytest.mark.parametrize("extra", [-1, 0, 1, 2, 3, 5])
def test_round_trip_at_the_lane_switch(extra):
    rng = np.random.default_rng(extra + 10)
    n = MULTI_LANE_MIN + extra  # one lane below, four lanes (every tail length) from here
    x = _sample(rng, _laplace_probs(64, 4.0), n)
    t = AnsTable.from_counts(np.bincount(x, minlength=64), prob_bits=12)
    assert np.array_equal(ans_decode(ans_encode(x, t), n, t), x)


@pytest.mark.parametrize("prob_bits", [0, 1, 2, 5, 8, 11, 13, 16, 18, 20])
def test_round_trip_every_precision(prob_bits):
    rng = np.random.default_rng(prob_bits)
    k = min(1 << prob_bits, 300)
    p = rng.dirichlet(np.full(k, 0.3))
    for n in (1, 500, MULTI_LANE_MIN + 7):
        x = _sample(rng, p, n)
        t = AnsTable.from_counts(np.bincount(x, minlength=k), prob_bits=prob_bits)
        assert t.prob_bits == prob_bits
        data = ans_encode(x, t)
        assert np.array_equal(ans_decode(data, n, t), x)


def test_signed_and_wide_symbol_arrays():
    x = np.array([0, 3, 1, 3, 3, 2], np.int64)
    t = AnsTable.from_counts(np.bincount(x, minlength=4))
    data = ans_encode(x, t)
    for dt in (np.uint8, np.uint16, np.int32, np.uint64):
        assert ans_encode(x.astype(dt), t) == data
    y = ans_decode(memoryview(data), 6, t)
    assert np.array_equal(y, x) and y.dtype == np.uint8
    assert np.array_equal(ans_decode(np.frombuffer(data, np.uint8), 6, t), x)


def test_single_symbol_tables():
    t1 = AnsTable.from_counts(np.array([7]))
    assert t1.alphabet == 1 and t1.prob_bits == 0 and t1.freqs.tolist() == [1]
    assert ans_encode(np.zeros(1000, np.uint8), t1) == b""
    assert ans_decode(b"", 1000, t1).tolist() == [0] * 1000
    with pytest.raises(DecodeError):
        ans_decode(b"\x01", 1000, t1)
    assert t1.max_symbols(0) is None  # unbounded: the container bounds the count
    t = AnsTable.from_counts(np.array([0, 0, 0, 5, 0]))
    assert t.freqs.tolist() == [0, 0, 0, 1, 0]
    assert ans_encode(np.full(9, 3), t) == b""
    assert ans_decode(b"", 9, t).tolist() == [3] * 9
    with pytest.raises(ValueError, match="frequency 0"):
        ans_encode(np.array([3, 3, 1]), t)
    with pytest.raises(ValueError, match="not in"):
        ans_encode(np.array([3, 5]), t)
    # No counts at all: a valid table (symbol 0 takes the mass) for an empty stream.
    t0 = AnsTable.from_counts(np.zeros(4, np.int64))
    assert t0.freqs.tolist() == [1, 0, 0, 0] and ans_encode(np.zeros(0, np.uint8), t0) == b""


def test_deterministic():
    rng = np.random.default_rng(3)
    p = _laplace_probs(256, 3.0)
    for n in (5000, MULTI_LANE_MIN + 3):
        x = _sample(rng, p, n)
        c = np.bincount(x, minlength=256)
        t1, t2 = AnsTable.from_counts(c), AnsTable.from_counts(c.copy())
        assert t1.pack() == t2.pack()
        assert ans_encode(x, t1) == ans_encode(x.copy(), t2)


# ---------------------------------------------------------------------------------------------
# size


@pytest.mark.parametrize("bits", [2.0, 3.0])
def test_size_within_half_percent_of_entropy_and_below_huffman(bits):
    rng = np.random.default_rng(int(bits))
    n = 1_000_000
    x = _sample(rng, _laplace_probs(32, bits), n)
    counts = np.bincount(x, minlength=32)
    h = entropy_bits(counts) * n
    t = AnsTable.from_counts(counts)
    data = ans_encode(x, t)
    coded = 8 * len(data)
    assert coded <= 1.005 * h
    assert abs(coded - t.cost_bits(counts)) <= 8 * 16 + 1e-4 * h  # flushed states, rounding
    huff = CodeTable.from_counts(counts)
    assert coded < huff.cost_bits(counts)
    assert coded + 8 * t.table_bytes() < huff.cost_bits(counts) + 8 * huff.table_bytes()


@pytest.mark.parametrize(
    ("k", "bits"), [(2, 0.97), (16, 1.0), (16, 2.0), (16, 3.0)] + [(256, b) for b in range(1, 6)]
)
def test_size_of_short_streams(k, bits):
    rng = np.random.default_rng(7 + k)
    n = 10_000
    p = np.array([0.6, 0.4]) if k == 2 else _laplace_probs(k, bits)  # 0.97 bits for k = 2
    x = _sample(rng, p, n)
    counts = np.bincount(x, minlength=k)
    t = AnsTable.from_counts(counts)
    coded = 8 * len(ans_encode(x, t))
    assert coded <= 1.005 * entropy_bits(counts) * n  # the table is extra
    assert t.table_bytes() <= 4 * k + 1


# ---------------------------------------------------------------------------------------------
# frequency normalization


def _greedy_reference(counts, m):
    """Optimal frequencies by the textbook greedy: all ones, then each unit of the remaining
    mass to the symbol whose coded bits drop most (ties to the lowest index)."""
    used = [i for i, c in enumerate(counts) if c > 0]
    f = {i: 1 for i in used}
    heap = [(-counts[i] * math.log1p(1.0), i) for i in used]
    heapq.heapify(heap)
    for _ in range(m - len(used)):
        _, i = heapq.heappop(heap)
        f[i] += 1
        heapq.heappush(heap, (-counts[i] * math.log1p(1.0 / f[i]), i))
    out = np.zeros(len(counts), np.int64)
    for i, v in f.items():
        out[i] = v
    return out


def _cost(counts, f, pb):
    c = np.asarray(counts, np.float64)
    used = c > 0
    return float(np.dot(c[used], pb - np.log2(f[used])))


def test_normalization_is_optimal():
    rng = np.random.default_rng(11)
    for _ in range(200):
        k = int(rng.integers(1, 12))
        pb = int(rng.integers(max(0, (k - 1).bit_length()), 9))
        counts = rng.integers(0, 1000, k) * (rng.random(k) < 0.8)
        counts[rng.integers(k)] += 1 + int(rng.integers(0, 10**6) * (rng.random() < 0.3))
        f = normalize_freqs(counts, pb).astype(np.int64)
        assert f.sum() == 1 << pb
        assert ((f > 0) == (counts > 0)).all()
        ref = _greedy_reference(counts.tolist(), 1 << pb)
        assert _cost(counts, f, pb) <= _cost(counts, ref, pb) + 1e-9 * max(1.0, counts.sum())


def test_normalization_keeps_rare_symbols():
    counts = np.array([10**12, 1, 1, 0, 1], np.int64)
    f = normalize_freqs(counts, 2)
    assert f.tolist() == [1, 1, 1, 0, 1]
    with pytest.raises(ValueError):
        normalize_freqs(counts, 1)  # 4 used symbols, 2 slots
    with pytest.raises(ValueError):
        normalize_freqs(np.array([1, -1]), 4)
    with pytest.raises(ValueError):
        normalize_freqs(np.array([1, 2]), PROB_BITS_MAX + 1)


def test_from_counts_picks_the_cheapest_precision():
    rng = np.random.default_rng(12)
    for n in (200, 10_000, 1_000_000):
        counts = np.bincount(_sample(rng, _laplace_probs(64, 3.0), n), minlength=64)
        t = AnsTable.from_counts(counts)
        best = t.cost_bits(counts) + 8 * t.table_bytes()
        for pb in range(6, 17):
            other = AnsTable.from_counts(counts, prob_bits=pb)
            assert best <= other.cost_bits(counts) + 8 * other.table_bytes() + 1e-6
    assert AnsTable.from_counts(np.array([3, 1])).prob_bits <= 16
    with pytest.raises(ValueError):
        AnsTable.from_counts(np.ones(300), prob_bits=8)


def test_cost_bits():
    t = AnsTable(np.array([2, 1, 1, 0], np.uint32), 2)
    assert t.cost_bits(np.array([4, 2, 2, 0])) == pytest.approx(4 * 1 + 2 * 2 + 2 * 2)
    assert t.cost_bits(np.array([0, 0, 0, 1])) == math.inf
    with pytest.raises(ValueError):
        t.cost_bits(np.array([1, 2]))


# ---------------------------------------------------------------------------------------------
# table serialization


def test_pack_unpack_round_trip():
    rng = np.random.default_rng(13)
    tables = [
        AnsTable(np.array([1], np.uint32), 0),
        AnsTable(np.array([0, 0, 1 << 20, 0], np.uint32), 20),
        AnsTable.from_counts(np.bincount(_sample(rng, _laplace_probs(256, 3.0), 10**5))),
    ]
    sparse = np.zeros(65536, np.int64)
    sparse[rng.integers(0, 65536, 3000)] = rng.integers(1, 10**6, 3000)
    sparse[-1] = 5
    tables.append(AnsTable.from_counts(sparse))
    full = rng.integers(1, 10**4, 65536)
    tables.append(AnsTable.from_counts(full, prob_bits=20))
    for _ in range(60):
        k = int(rng.integers(1, 400))
        c = rng.integers(0, 50, k) * (rng.random(k) < rng.random())
        pb = int(rng.integers(max(0, (int((c > 0).sum()) - 1).bit_length()), 21))
        tables.append(AnsTable.from_counts(c, prob_bits=pb))
    for t in tables:
        data = t.pack()
        assert len(data) == t.table_bytes() <= 4 * t.alphabet + 1
        if t.prob_bits > max_prob_bits(t.alphabet):
            # More precision than the writer ever picks for the alphabet: refused on reading.
            with pytest.raises(DecodeError, match="the most a writer uses"):
                AnsTable.unpack(data, t.alphabet)
            continue
        u = AnsTable.unpack(data, t.alphabet)
        assert u.prob_bits == t.prob_bits and np.array_equal(u.freqs, t.freqs)
        assert u.pack() == data
        for bad in (t.alphabet - 1, t.alphabet + 1):
            if bad >= 1:
                try:  # another alphabet: refused, or (a zero tail) read consistently
                    v = AnsTable.unpack(data, bad)
                    assert v.pack() == data and v.freqs.sum() == 1 << t.prob_bits
                except DecodeError:
                    pass
    assert tables[3].table_bytes() < 3000 * 3  # sparse: zero runs cost a few bits
    assert pickle.loads(pickle.dumps(tables[2])).pack() == tables[2].pack()


def test_table_validation():
    with pytest.raises(DecodeError):
        AnsTable(np.array([1, 2], np.uint32), 2)  # sums to 3
    with pytest.raises(DecodeError):
        AnsTable(np.array([4], np.uint32), 21)
    with pytest.raises(DecodeError):
        AnsTable(np.array([[2, 2]], np.uint32), 2)
    with pytest.raises(DecodeError):
        AnsTable(np.array([5, -1]), 2)
    t = AnsTable.from_counts(np.array([5, 3, 1]))
    assert not t.freqs.flags.writeable
    good = t.pack()
    with pytest.raises(DecodeError):
        AnsTable.unpack(b"", 3)
    with pytest.raises(DecodeError):
        AnsTable.unpack(bytes([21]) + good[1:], 3)  # prob_bits out of range
    with pytest.raises(DecodeError):
        AnsTable.unpack(good + b"\0", 3)  # trailing byte
    with pytest.raises(DecodeError):
        AnsTable.unpack(good[:-1], 3)
    for alphabet in (0, -1, (1 << 20) + 1, 2.0, True):
        with pytest.raises(DecodeError):
            AnsTable.unpack(good, alphabet)


def test_writer_precision_never_exceeds_what_readers_accept():
    """from_counts picks at most max_prob_bits(alphabet) (the reader's rule), whatever the
    histogram: skewed, flat, sparse, every alphabet size up to the container's 2**16."""
    rng = np.random.default_rng(21)
    for k in (1, 2, 3, 5, 255, 256, 4096, 1 << 14, (1 << 14) + 1, 40_000, 1 << 16):
        skewed = np.r_[10**9, np.ones(k - 1, np.int64)]
        for c in (rng.integers(0, 1000, k), skewed, rng.integers(1, 3, k)):
            t = AnsTable.from_counts(c)
            assert t.prob_bits <= max_prob_bits(k), (k, t.prob_bits)
            assert AnsTable.unpack(t.pack(), k).prob_bits == t.prob_bits
    sizes = (1, 2, 1 << 14, (1 << 14) + 1, 1 << 16)
    assert [max_prob_bits(a) for a in sizes] == [16, 16, 16, 17, 18]


def test_tiny_table_at_high_precision_is_refused_before_its_decoder_exists():
    """A 2-symbol table at 20 bits is 8 bytes of file and would be a 9 MiB decoder."""
    t = AnsTable(np.array([(1 << 19) + 1, (1 << 19) - 1], np.uint32), 20)
    assert len(t.pack()) <= 8 and t.decoder_bytes() > 9 << 20
    with pytest.raises(DecodeError, match="prob_bits 20 > 16"):
        AnsTable.unpack(t.pack(), 2)
    ok = AnsTable(np.array([(1 << 15) + 1, (1 << 15) - 1], np.uint32), 16)
    assert AnsTable.unpack(ok.pack(), 2).decoder_bytes() < 400 << 10


def test_decoder_tables_are_built_without_wide_temporaries():
    """The 2**prob_bits-slot decoder costs decoder_bytes() plus one lut-sized temporary, not
    four int64 arrays of the slots (the old build peaked at ~48 MiB for 20 bits)."""
    import tracemalloc

    t = AnsTable.from_counts(np.random.default_rng(3).integers(1, 100, 300), prob_bits=20)
    tracemalloc.start()
    lut, syms, _ = t._decoder
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak <= t.decoder_bytes() + lut.nbytes + (1 << 20), peak
    f = t.freqs.astype(np.int64)
    s = np.repeat(np.arange(t.alphabet), f)
    cum = np.cumsum(f) - f
    want = ((f[s] - 1) << 20) | (np.arange(1 << 20) - cum[s])
    assert np.array_equal(lut.astype(np.int64), want) and np.array_equal(syms, s)


def test_unpack_hostile_bytes():
    rng = np.random.default_rng(14)
    good = [
        AnsTable.from_counts(rng.integers(0, 100, k) * (rng.random(k) < 0.7) + (np.arange(k) == 0))
        for k in (2, 5, 40, 300)
    ]
    accepted = 0
    for i in range(600):
        if i % 2:
            t = good[i % len(good)]
            b = bytearray(t.pack())
            j = int(rng.integers(len(b)))
            b[j] ^= int(rng.integers(1, 256))
            data, alphabet = bytes(b), t.alphabet
        else:
            data = rng.integers(0, 256, int(rng.integers(0, 24))).astype(np.uint8).tobytes()
            if data and rng.random() < 0.8:
                data = bytes([int(rng.integers(0, 21))]) + data[1:]
            alphabet = int(rng.integers(1, 70_000) if rng.random() < 0.2 else rng.integers(1, 9))
        try:
            u = AnsTable.unpack(data, alphabet)
        except DecodeError:
            continue
        accepted += 1
        assert u.alphabet == alphabet and int(u.freqs.sum()) == 1 << u.prob_bits
        assert u.pack() == data  # what was accepted is exactly what pack writes
    assert accepted < 100


# ---------------------------------------------------------------------------------------------
# hostile streams


def _stream(rng, k, bits, n):
    x = _sample(rng, _laplace_probs(k, bits), n)
    t = AnsTable.from_counts(np.bincount(x, minlength=k))
    return x, t, ans_encode(x, t)


@pytest.mark.parametrize("n", [3000, MULTI_LANE_MIN + 1])
def test_corrupt_streams_are_refused(n):
    rng = np.random.default_rng(15)
    x, t, data = _stream(rng, 32, 3.0, n)
    for bad, m in [
        (data[:-1], n),  # truncated
        (data[1:], n),
        (data[: len(data) // 2], n),
        (data + b"\0", n),  # trailing bytes
        (data + data[-3:], n),
        (data, n - 1),  # wrong symbol count
        (data, n + 1),
        (data, n // 2),
        (data, 2 * n),
        (b"\0" + data, n),  # a leading zero byte
        (b"", n),
    ]:
        with pytest.raises(DecodeError):
            ans_decode(bad, m, t)
    # A different table of the same alphabet.
    other = AnsTable.from_counts(np.bincount(x, minlength=32) + 50)
    with pytest.raises(DecodeError):
        ans_decode(data, n, other)
    with pytest.raises(DecodeError):
        ans_decode(data, -1, t)
    with pytest.raises(DecodeError):
        ans_decode(b"", 1, t)
    with pytest.raises(DecodeError):
        ans_decode(b"\x07", 0, t)


def test_flipped_bytes():
    """Every flip is refused or decodes to other symbols whose stream it exactly is (an rANS
    stream has almost no redundancy: a container's checksum is what detects corruption).
    With a 4-lane stream and a 3-bit source flips are in practice all caught."""
    rng = np.random.default_rng(16)
    for n, min_refused in ((2000, 0.9), (MULTI_LANE_MIN + 2, 1.0)):
        x, t, data = _stream(rng, 32, 3.0, n)
        refused = 0
        cases = 300 if n < MULTI_LANE_MIN else 40
        for _ in range(cases):
            b = bytearray(data)
            b[int(rng.integers(len(b)))] ^= int(rng.integers(1, 256))
            refused += not _decodes_canonically(bytes(b), n, t)
        assert refused >= min_refused * cases


def test_random_streams_never_crash():
    rng = np.random.default_rng(17)
    tables = []
    for k, bits in ((2, 0.5), (3, 1.2), (16, 2.0), (256, 3.0), (256, 6.0), (65536, 10.0)):
        x = _sample(rng, _laplace_probs(k, bits), 20_000)
        tables.append(AnsTable.from_counts(np.bincount(x, minlength=k)))
        tables.append(AnsTable.from_counts(np.bincount(x, minlength=k), prob_bits=20))
    accepted = 0
    for i in range(500):
        t = tables[i % len(tables)]
        size = int(rng.integers(0, 64 if i % 5 else 3000))
        data = rng.integers(0, 256, size).astype(np.uint8).tobytes()
        if i % 7 == 0:
            n = int(rng.integers(MULTI_LANE_MIN, 2 * MULTI_LANE_MIN))
        else:
            n = int(rng.integers(0, 40 * size + 2))
        accepted += _decodes_canonically(data, n, t)
    assert accepted <= 5


def test_decompression_bomb_refused_before_allocating():
    t = AnsTable.from_counts(np.array([9, 1]))
    with pytest.raises(DecodeError, match="cannot fit"):
        ans_decode(b"\x01\x02\x03", 10**15, t)
    assert t.max_symbols(3) < 1000


@pytest.mark.parametrize("p0", [0.5, 0.9, 0.999, 0.99999])
def test_max_symbols_bounds_real_streams(p0):
    """The bound holds for the most compressible streams: a very likely symbol, a long run."""
    rng = np.random.default_rng(18)
    for n in (1, 50, 10_000, MULTI_LANE_MIN + 1, 1_000_000):
        x = (rng.random(n) > p0).astype(np.uint8)
        for pb in (None, 4, 12, 20):
            c = np.maximum(np.bincount(x, minlength=2), 1)
            t = AnsTable.from_counts(c, prob_bits=pb)
            data = ans_encode(x, t)
            assert n <= t.max_symbols(len(data))
        run = np.zeros(n, np.uint8)  # every symbol the likely one
        data = ans_encode(run, t)
        assert n <= t.max_symbols(len(data))


def test_encode_refuses_bad_symbols():
    t = AnsTable.from_counts(np.array([4, 0, 3, 1]))
    with pytest.raises(ValueError, match="frequency 0"):
        ans_encode(np.array([0, 2, 1, 3]), t)
    with pytest.raises(ValueError, match="frequency 0"):
        ans_encode(np.full(MULTI_LANE_MIN + 5, 1), t)
    with pytest.raises(ValueError, match="not in"):
        ans_encode(np.array([0, 4]), t)
    with pytest.raises(ValueError, match="not in"):
        ans_encode(np.array([0, -1]), t)
    with pytest.raises(ValueError):
        ans_encode(np.zeros((2, 2), np.uint8), t)
    with pytest.raises(ValueError):
        ans_encode(np.array([0.0, 1.0]), t)


def test_short_streams_decode_by_search_exactly_as_by_lookup_table():
    """A stream of fewer than M / 16 symbols is decoded without building the 2**prob_bits
    lookup table (a header may give every chunk a table of its own); valid or corrupted, the
    result or refusal is the same as through the table."""
    rng = np.random.default_rng(22)
    searched = 0
    for trial in range(200):
        k = int(rng.integers(2, 300))
        c = rng.integers(0, 60, k) * (rng.random(k) < 0.7)
        c[0] += 1
        lo = (int((c > 0).sum()) - 1).bit_length()
        t = AnsTable.from_counts(c, prob_bits=int(rng.integers(max(lo, 8), max_prob_bits(k) + 1)))
        n = int(rng.integers(1, 3000))
        sym = rng.choice(k, n, p=c / c.sum())
        data = ans_encode(sym, t)
        fresh = AnsTable(t.freqs, t.prob_bits)
        assert np.array_equal(ans_decode(data, n, fresh), sym), trial
        searched += "_decoder" not in vars(fresh)
        for _ in range(3):
            bad = bytearray(data)
            bad[int(rng.integers(len(bad)))] ^= int(rng.integers(1, 256))
            m = max(0, n + int(rng.integers(-2, 3)))
            got = []
            for tt in (AnsTable(t.freqs, t.prob_bits), t):  # search, lookup table
                try:
                    got.append(ans_decode(bytes(bad), m, tt).tobytes())
                except DecodeError as exc:
                    got.append(str(exc))
            assert got[0] == got[1], trial
    assert searched > 30
