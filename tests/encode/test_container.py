"""The .hwq container: exact round trips, accounting, range reads (local and S3), refusal of
malformed or hostile files."""

import json
import os
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.encode import (
    HwqFormatError,
    HwqReader,
    TensorEntry,
    format_inspect,
    hwq_accounting,
    inspect_hwq,
    read_hwq,
    write_hwq,
)
from pipeline.encode.container.reader import _f32_to_bf16_bits


def _model(seed=0, k=16):
    """A small mixed model: shared codebook, pruned and dense tensors, channel codebook,
    raw tensors, an empty and a fully pruned tensor. Returns (entries, codebooks, expected)."""
    rng = np.random.default_rng(seed)
    cbs = {
        "net": np.sort(rng.normal(size=k)).astype(np.float32),
        "chan": rng.normal(size=(6, 4)).astype(np.float32),
        "solo": np.array([0.5, -2.0, 3.0], np.float32),
    }
    ents, exp = [], {}
    p = rng.dirichlet(np.full(k, 0.3))

    def quant(name, shape, cb, density=1.0, dtype="float32"):
        numel = int(np.prod(shape))
        mask = rng.random(numel) < density if density < 1 else None
        kk = cbs[cb].shape[-1]
        n_kept = numel if mask is None else int(mask.sum())
        codes = rng.choice(kk, size=n_kept, p=p if kk == k else None)
        ents.append(TensorEntry.quantized(name, shape, codes, cb, mask=mask, dtype=dtype))
        dense = np.zeros(numel, np.float32)
        where = np.arange(numel) if mask is None else np.flatnonzero(mask)
        if cbs[cb].ndim == 2:
            dense[where] = cbs[cb][where // (numel // shape[0]), codes]
        else:
            dense[where] = cbs[cb][codes]
        dense = dense.reshape(shape)
        exp[name] = _f32_to_bf16_bits(dense) if dtype == "bfloat16" else dense.astype(dtype)

    quant("conv1.weight", (8, 3, 5, 5), "net", density=0.3)
    quant("fc1.weight", (120, 50), "net", density=0.05)
    quant("fc2.weight", (10, 40), "net")
    quant("half.weight", (7, 9), "net", dtype="float16")
    quant("bf.weight", (4, 4), "net", density=0.5, dtype="bfloat16")
    quant("wide.weight", (3, 5), "net", dtype="float64")
    quant("chan.weight", (6, 5, 2), "chan", density=0.7)
    quant("solo.weight", (11,), "solo")
    quant("empty.weight", (0, 4), "net")
    quant("dead.weight", (5, 5), "net", density=1e-9)  # fully pruned
    raws = {
        "r.f32": rng.normal(size=(3, 4)).astype(np.float32),
        "r.f16": rng.normal(size=5).astype(np.float16),
        "r.f64": rng.normal(size=(2, 2)),
        "r.i64": np.array([7, -3, 2**40], np.int64),
        "r.i32": np.arange(-3, 3, dtype=np.int32),
        "r.i16": np.array([-5, 5], np.int16),
        "r.i8": np.array([-128, 127], np.int8),
        "r.u8": np.arange(10, dtype=np.uint8),
        "r.bool": np.array([True, False, True]),
        "r.scalar": np.array(1.5, np.float32),
        "r.empty": np.zeros((0, 3), np.float32),
    }
    for name, a in raws.items():
        ents.append(TensorEntry.raw_tensor(name, a))
        exp[name] = a
    bf = _f32_to_bf16_bits(rng.normal(size=6).astype(np.float32))
    ents.append(TensorEntry.raw_tensor("r.bf16", bf, dtype="bfloat16"))
    exp["r.bf16"] = bf
    return ents, cbs, exp


def _assert_same(out, exp):
    assert set(out) == set(exp)
    for name, e in exp.items():
        assert out[name].dtype == e.dtype, name
        assert out[name].shape == e.shape, name
        assert out[name].tobytes() == e.tobytes(), name


@pytest.mark.parametrize("sharing", ["network", "tensor"])
@pytest.mark.parametrize("fixed", [False, True])
def test_round_trip_mixed_model(tmp_path, sharing, fixed):
    ents, cbs, exp = _model()
    path = tmp_path / "m.hwq"
    acc = write_hwq(
        path, ents, cbs, code_sharing=sharing, fixed_length=fixed, chunk_symbols=97,
        metadata={"run": "test", "k": 16},
    )  # fmt: skip
    _assert_same(read_hwq(path), exp)
    assert acc["file_bytes"] == os.path.getsize(path)
    assert sum(acc["bits"].values()) == 8 * acc["file_bytes"]
    assert hwq_accounting(path) == acc
    reader = HwqReader(path)
    assert reader.metadata == {"run": "test", "k": 16}
    assert reader.names == [e.name for e in ents]
    rows = inspect_hwq(path)
    assert sum(r["bytes"] for r in rows) == acc["file_bytes"]
    assert "fc1.weight" in format_inspect(rows)
    assert not [f for f in os.listdir(tmp_path) if f != "m.hwq"]  # no temporary left


@pytest.mark.parametrize("k", [2, 3, 256, 257, 4096, 65536])
def test_round_trip_codebook_sizes(tmp_path, k):
    rng = np.random.default_rng(k)
    shape = (100, 300)
    p = rng.dirichlet(np.full(k, 0.5 if k < 1000 else 0.05))
    mask = rng.random(shape) < 0.5
    codes = rng.choice(k, size=int(mask.sum()), p=p)
    codes[:2] = [0, k - 1]
    cb = {"c": rng.normal(size=k).astype(np.float32)}
    ents = [TensorEntry.quantized("w", shape, codes, "c", mask=mask)]
    acc = write_hwq(tmp_path / "k.hwq", ents, cb, chunk_symbols=5000)
    r = HwqReader(tmp_path / "k.hwq")
    got = r.read_codes("w")
    assert (got["codes"] == codes).all()
    assert (got["positions"] == np.flatnonzero(mask)).all()
    dense = np.zeros(shape, np.float32)
    dense[mask] = cb["c"][codes]
    assert (r.read()["w"] == dense).all()
    # Huffman indices cost at most entropy + 1 bit (+ chunk padding).
    assert acc["index_bits_per_weight"] < acc["index_entropy_bits"] + 1.01


def test_single_symbol_and_all_kept_mask(tmp_path):
    cb = {"c": np.array([1.25, 7.0], np.float32)}
    mask = np.ones((4, 5), bool)  # all kept: stored as dense, no positions
    ents = [
        TensorEntry("ones", (np.int64(1000),), codes=np.ones(1000, np.int64), codebook="c"),
        TensorEntry.quantized("full", (4, 5), np.zeros(20, np.uint8), "c", mask=mask),
    ]
    acc = write_hwq(tmp_path / "s.hwq", ents, cb)
    out = read_hwq(tmp_path / "s.hwq")
    assert (out["ones"] == 7.0).all() and (out["full"] == 1.25).all()
    assert acc["bits"]["positions"] == 0
    assert HwqReader(tmp_path / "s.hwq").header["tensors"][1]["positions"] is None


def test_accounting_matches_fixed_length_and_entropy(tmp_path):
    rng = np.random.default_rng(1)
    k = 32
    p = np.exp(-np.arange(k) / 3.0)
    p /= p.sum()
    codes = rng.choice(k, size=200_000, p=p)
    cb = {"c": np.linspace(-1, 1, k).astype(np.float32)}
    ents = [TensorEntry.quantized("w", (200_000,), codes, "c")]
    huff = write_hwq(tmp_path / "h.hwq", ents, cb)
    fixed = write_hwq(tmp_path / "f.hwq", ents, cb, fixed_length=True)
    assert fixed["bits"]["indices"] == 200_000 * 5  # 5 bits, 200,000 * 5 is byte aligned
    assert huff["fixed_length_index_bits"] == 200_000 * 5
    assert huff["ratio_fixed_length_bits"] == pytest.approx(5 / huff["index_bits_per_weight"])
    h = huff["index_entropy_bits"]
    assert h <= huff["index_bits_per_weight"] < h + 1
    assert huff["bits"]["code_tables"] > 0 and fixed["bits"]["code_tables"] == 0


def test_map_fn_is_used_for_chunks(tmp_path):
    ents, cbs, exp = _model(seed=2)
    calls = []

    def map_fn(fn, jobs):
        calls.append(len(jobs))
        return [fn(j) for j in jobs]

    write_hwq(tmp_path / "m.hwq", ents, cbs, chunk_symbols=50, map_fn=map_fn)
    assert calls and calls[0] > 10
    _assert_same(read_hwq(tmp_path / "m.hwq", map_fn=map_fn), exp)


def test_write_is_atomic_on_failure(tmp_path, monkeypatch):
    ents, cbs, _ = _model()
    path = tmp_path / "m.hwq"
    write_hwq(path, ents[:2], cbs)
    before = path.read_bytes()

    def boom(fd):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError):
        write_hwq(path, ents, cbs)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.hwq"]


def test_writer_validates_its_input(tmp_path):
    cb = {"c": np.zeros(4, np.float32)}
    bad = [
        [TensorEntry.quantized("a", (3,), [0, 1, 4], "c")],  # code out of range
        [TensorEntry.quantized("a", (3,), [0, 1], "c")],  # too few codes
        [TensorEntry.quantized("a", (3,), [0, 1, 2], "nope")],  # unknown codebook
        [TensorEntry.quantized("a", (2,), [0, 1], "c")] * 2,  # duplicate name
        [TensorEntry.quantized("a", (3,), [0], "c", mask=np.array([1, 0, 0]))],  # int mask
        [TensorEntry.raw_tensor("r", np.zeros(2, np.complex64))],  # unsupported dtype
    ]
    for ents in bad:
        with pytest.raises(ValueError):
            write_hwq(tmp_path / "x.hwq", ents, cb)
    assert not os.path.exists(tmp_path / "x.hwq")


def test_range_read_of_one_tensor_local(tmp_path):
    rng = np.random.default_rng(0)
    cb = {"c": np.linspace(-1, 1, 64).astype(np.float32)}
    ents = [
        TensorEntry.quantized("big", (1000, 1000), rng.integers(0, 64, 10**6), "c"),
        TensorEntry.quantized("small", (4, 4), rng.integers(0, 64, 16), "c"),
    ]
    write_hwq(tmp_path / "m.hwq", ents, cb, chunk_symbols=100_000)
    size = os.path.getsize(tmp_path / "m.hwq")
    r = HwqReader(tmp_path / "m.hwq")
    small = r.read("small")["small"]
    assert (small.ravel() == cb["c"][ents[1].codes]).all()
    assert r.bytes_read < 3000 < size // 100


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on a free port with one bucket; yields the s3fs storage options."""
    pytest.importorskip("moto.server")
    s3fs = pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(port=0, verbose=False)
    server.start()
    port = server._server.server_port
    opts = {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"},
        "skip_instance_cache": True,
    }
    s3fs.S3FileSystem(**opts).mkdir("hwq-test")
    yield opts
    server.stop()


def test_range_read_of_one_tensor_s3(s3):
    import s3fs

    ents, cbs, exp = _model(seed=4)
    rng = np.random.default_rng(4)
    ents.append(TensorEntry.quantized("huge", (600, 1000), rng.integers(0, 16, 600_000), "net"))
    exp["huge"] = cbs["net"][ents[-1].codes].reshape(600, 1000)
    url = "s3://hwq-test/model.hwq"
    acc = write_hwq(url, ents, cbs, storage_options=s3, chunk_symbols=50_000)
    fs = s3fs.S3FileSystem(**s3)
    assert fs.ls("hwq-test") == ["hwq-test/model.hwq"]  # no temporary objects
    assert fs.size(url) == acc["file_bytes"]
    r = HwqReader(url, storage_options=s3)
    one = r.read(["r.f32"])
    assert (one["r.f32"] == exp["r.f32"]).all()
    assert r.bytes_read < acc["file_bytes"] // 20
    _assert_same(read_hwq(url, storage_options=s3), exp)
    assert hwq_accounting(url, storage_options=s3) == acc


# ---------------------------------------------------------------------------------------------
# untrusted input


def _split(blob: bytes):
    magic, ver, flags, hlen, hcrc, res = struct.unpack_from("<4sHHQII", blob)
    start = -(-(24 + hlen) // 8) * 8
    raw = blob[24 : 24 + hlen]
    return json.loads(zlib.decompress(raw) if flags & 1 else raw), bytearray(blob[start:])


def _join(header: dict, payload: bytes, *, fix_payload_len=True) -> bytes:
    """Rebuild a file with consistent header checksum and padding (a 'hostile' writer)."""
    if fix_payload_len:
        header["payload_bytes"] = len(payload)
    hj = json.dumps(header, separators=(",", ":")).encode()
    prefix = struct.pack("<4sHHQII", b"HWQ1", 1, 0, len(hj), zlib.crc32(hj), 0)
    start = -(-(24 + len(hj)) // 8) * 8
    return prefix + hj + b"\0" * (start - 24 - len(hj)) + bytes(payload)


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    ents, cbs, exp = _model(seed=7)
    d = tmp_path_factory.mktemp("hostile")
    write_hwq(d / "ok.hwq", ents, cbs, chunk_symbols=200)
    return d, (d / "ok.hwq").read_bytes()


def _refused(d, blob: bytes, match: str | None = None, names=None):
    p = d / "bad.hwq"
    p.write_bytes(blob)
    with pytest.raises(HwqFormatError, match=match) as info:
        read_hwq(p, names)
    assert str(p) in str(info.value)  # the error names the file
    return info.value


def _tensor(h, name):
    return next(t for t in h["tensors"] if t["name"] == name)


def test_refuses_broken_prefix(sample):
    d, ok = sample
    _refused(d, b"NOPE" + ok[4:], "magic")
    _refused(d, ok[:4] + struct.pack("<H", 2) + ok[6:], "version")
    _refused(d, ok[:8] + struct.pack("<Q", 10**12) + ok[16:], "past the end")
    _refused(d, ok[:10], "too short")
    _refused(d, b"", "too short")
    _refused(d, ok[:-1])
    _refused(d, ok + b"\0")


def test_refuses_hostile_headers(sample):
    d, ok = sample
    h, payload = _split(ok)

    def mutate(fn, match=None, names=None, fix=True):
        hh = json.loads(json.dumps(h))
        fn(hh)
        return _refused(d, _join(hh, payload, fix_payload_len=fix), match, names)

    def set_chunk(hh, i, v):
        _tensor(hh, "conv1.weight")["indices"]["chunks"][0][i] = v

    mutate(lambda hh: set_chunk(hh, 0, len(payload) + 10))  # offset beyond the file
    mutate(lambda hh: set_chunk(hh, 1, 10**9))  # length beyond the file
    mutate(lambda hh: set_chunk(hh, 2, 10**12), "symbols")  # huge allocation
    mutate(lambda hh: set_chunk(hh, 2, True))  # a bool is not an int
    mutate(lambda hh: set_chunk(hh, 3, 12345), "checksum")
    mutate(lambda hh: hh.update(payload_bytes=len(payload) + 8), fix=False)
    mutate(lambda hh: _tensor(hh, "fc2.weight").update(shape=[10**6, 10**6]))
    mutate(
        lambda hh: _tensor(hh, "dead.weight").update(shape=[10**6, 10**6]), "cap", ["dead.weight"]
    )
    mutate(lambda hh: _tensor(hh, "dead.weight").update(shape=[10**9, 10**9]), "2\\^48")
    mutate(lambda hh: _tensor(hh, "r.f32").update(shape=[2**62, 4]))
    mutate(lambda hh: _tensor(hh, "r.f32").update(dtype="complex128"))
    mutate(lambda hh: _tensor(hh, "fc2.weight").update(codebook="missing"))
    mutate(lambda hh: _tensor(hh, "fc2.weight").update(n_kept=3))
    mutate(lambda hh: _tensor(hh, "fc2.weight").update(positions=None, n_kept=1))
    mutate(lambda hh: hh["code_tables"][0].update(alphabet=10**6))
    mutate(lambda hh: hh["code_tables"][0].update(width=9))
    mutate(lambda hh: hh["codebooks"][0].update(shape=[1, 1, 1]))
    mutate(lambda hh: hh["tensors"].append(hh["tensors"][0]), "duplicate")
    mutate(lambda hh: hh.update(tensors="nope"))
    mutate(lambda hh: hh.update(version=2))
    mutate(lambda hh: _tensor(hh, "fc1.weight")["positions"].update(max_gap=0))
    # Two sections overlapping, and a payload byte under no checksum.
    mutate(lambda hh: _tensor(hh, "r.u8").update(offset=_tensor(hh, "r.i8")["offset"]))
    for garbage in (b"[1,2", b"\xff\xfe", b"[" * 100_000 + b"]" * 100_000, b"NaN", b"{}"):
        prefix = struct.pack("<4sHHQII", b"HWQ1", 1, 0, len(garbage), zlib.crc32(garbage), 0)
        _refused(d, prefix + garbage + b"\0" * (-(24 + len(garbage)) % 8))
    # Compressed headers: not zlib, trailing bytes after the stream, an unknown flag bit.
    for stored in (b"not zlib at all", zlib.compress(json.dumps(h).encode()) + b"xx"):
        prefix = struct.pack("<4sHHQII", b"HWQ1", 1, 1, len(stored), zlib.crc32(stored), 0)
        _refused(d, prefix + stored + b"\0" * (-(24 + len(stored)) % 8) + bytes(payload))
    prefix = struct.pack("<4sHHQII", b"HWQ1", 1, 2, 2, zlib.crc32(b"{}"), 0)
    _refused(d, prefix + b"{}" + b"\0" * 6 + bytes(payload))  # an unknown flag bit


def test_refuses_invalid_code_tables_and_codes(sample, tmp_path):
    d, ok = sample

    def with_table(blob: bytes, length: int) -> bytes:
        """The file with every code length of table 0 set to ``length``."""
        hh, pl = _split(blob)
        t = hh["code_tables"][0]
        assert t["kind"] == "huffman" and length < 2 ** t["width"]
        n = t["alphabet"] * t["width"]
        bits = (format(length, f"0{t['width']}b") * t["alphabet"]).ljust(-(-n // 8) * 8, "0")
        data = int(bits, 2).to_bytes(len(bits) // 8, "big")
        pl[t["offset"] : t["offset"] + t["length"]] = data
        t["crc32"] = zlib.crc32(data)
        return _join(hh, pl)

    _refused(d, with_table(ok, 1), "Kraft")  # every length 1: Kraft sum alphabet / 2
    # Fibonacci counts need 24-bit codewords, so lengths are stored 5 bits wide.
    fib = [1, 1]
    while len(fib) < 26:  # 318k symbols; Huffman depth 25, limited to 24
        fib.append(fib[-1] + fib[-2])
    codes = np.repeat(np.arange(26), fib)
    cb = {"c": np.arange(26, dtype=np.float32)}
    write_hwq(tmp_path / "fib.hwq", [TensorEntry.quantized("w", codes.shape, codes, "c")], cb)
    fib_blob = (tmp_path / "fib.hwq").read_bytes()
    assert (read_hwq(tmp_path / "fib.hwq")["w"] == codes).all()
    assert _split(fib_blob)[0]["code_tables"][0]["width"] == 5
    _refused(d, with_table(fib_blob, 30), "24")

    # A fixed-length code for k=5 (3 bits) can spell codes 5..7: out of the codebook.
    cb = {"c": np.arange(5, dtype=np.float32)}
    write_hwq(tmp_path / "f.hwq", [TensorEntry.quantized("w", (8,), np.arange(8) % 5, "c")], cb,
              fixed_length=True)  # fmt: skip
    hf, pf = _split((tmp_path / "f.hwq").read_bytes())
    ch = hf["tensors"][0]["indices"]["chunks"][0]
    pf[ch[0] : ch[0] + ch[1]] = b"\xff\xff\xff"  # eight 7s
    ch[3] = zlib.crc32(b"\xff\xff\xff")
    _refused(d, _join(hf, pf), "invalid codeword|out of range")


@pytest.fixture(scope="module")
def small_file(tmp_path_factory):
    rng = np.random.default_rng(3)
    cbs = {"net": np.linspace(-1, 1, 8).astype(np.float32), "ch": np.ones((3, 2), np.float32)}
    mask = rng.random((6, 7)) < 0.4
    ents = [
        TensorEntry.quantized("a", (6, 7), rng.integers(0, 8, int(mask.sum())), "net", mask=mask),
        TensorEntry.quantized("b", (3, 4), rng.integers(0, 2, 12), "ch"),
        TensorEntry.quantized("c", (20,), rng.integers(0, 8, 20), "net", dtype="float16"),
        TensorEntry.raw_tensor("r", rng.normal(size=3).astype(np.float32)),
    ]
    d = tmp_path_factory.mktemp("mut")
    write_hwq(d / "ok.hwq", ents, cbs, chunk_symbols=8, code_sharing="tensor")
    return d, (d / "ok.hwq").read_bytes()


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    op=st.sampled_from(["flip", "truncate", "insert", "delete"]),
    where=st.floats(0, 1, exclude_max=True),
    value=st.integers(1, 255),
    n=st.integers(1, 4),
)
def test_every_mutation_is_refused(small_file, op, where, value, n):
    d, ok = small_file
    i = int(where * len(ok))
    if op == "flip":
        blob = bytearray(ok)
        for j in range(n):
            blob[(i + j) % len(ok)] ^= value
        blob = bytes(blob)
    elif op == "truncate":
        blob = ok[:i]
    elif op == "insert":
        blob = ok[:i] + bytes([value]) * n + ok[i:]
    else:
        blob = ok[:i] + ok[i + n :]
    p = d / f"m-{os.getpid()}.hwq"
    p.write_bytes(blob)
    with pytest.raises(HwqFormatError):
        read_hwq(p)
