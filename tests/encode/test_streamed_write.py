"""A .hwq written from lazily loaded tensors equals the in-memory one byte for byte; an
interrupted write leaves nothing that verifies, locally and on S3."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.encode.container import TensorEntry, read_hwq, storage, write_hwq


def _entries(big_raw: int = 17):
    rng = np.random.default_rng(4)
    out = []
    for i in range(5):
        w = rng.integers(0, 6, (40, 64))
        m = rng.random((40, 64)) < 0.4 if i % 2 else None
        codes = (w[m] if m is not None else w).reshape(-1)
        out.append(TensorEntry.quantized(f"t{i}", (40, 64), codes, f"cb{i % 3}", mask=m))
    out.append(TensorEntry.raw_tensor("raw", rng.standard_normal(big_raw).astype(np.float32)))
    cbs = {f"cb{j}": (rng.standard_normal((40, 6)) if j == 2 else rng.standard_normal(6))
           .astype(np.float32) for j in range(3)}
    return out, cbs


class _Lazy:
    """Entries loaded on demand, counting loads."""

    def __init__(self, entries, fail_at: int | None = None):
        self.entries, self.loads, self.fail_at = entries, 0, fail_at

    def items(self):
        return [lambda i=i: self.load(i) for i in range(len(self.entries))]

    def load(self, i):
        self.loads += 1
        if self.fail_at is not None and self.loads == self.fail_at:
            raise RuntimeError("the worker holding the codes died")
        return self.entries[i]


@pytest.mark.parametrize("kw", [{}, {"coder": "ans", "positions": "context"},
                                {"indices": "context", "code_sharing": "tensor"}])
def test_streamed_equals_in_memory(tmp_path, kw):
    entries, cbs = _entries()
    write_hwq(tmp_path / "mem.hwq", entries, cbs, **kw)
    lazy = _Lazy(entries)
    acct = write_hwq(tmp_path / "stream.hwq", lazy.items(), cbs, stream_symbols=3000,
                     spool_bytes=1000, spill_dir=str(tmp_path), chunk_symbols=700, **kw)
    ref = write_hwq(tmp_path / "mem2.hwq", entries, cbs, chunk_symbols=700, **kw)
    assert (tmp_path / "stream.hwq").read_bytes() == (tmp_path / "mem2.hwq").read_bytes()
    assert acct == ref
    assert lazy.loads == 2 * len(entries)  # validation pass + encoding pass, one at a time
    got = read_hwq(str(tmp_path / "stream.hwq"))
    assert set(got) == {e.name for e in entries}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mem.hwq", "mem2.hwq", "stream.hwq"]


def test_fp16_level_codebooks_take_a_third_pass(tmp_path):
    entries, cbs = _entries()
    cbs = {k: v.astype(np.float16).astype(np.float32) for k, v in cbs.items()}
    write_hwq(tmp_path / "mem.hwq", entries, cbs, codebook_dtype="float16")
    lazy = _Lazy(entries)
    write_hwq(tmp_path / "stream.hwq", lazy.items(), cbs, codebook_dtype="float16",
              stream_symbols=2000)
    assert (tmp_path / "stream.hwq").read_bytes() == (tmp_path / "mem.hwq").read_bytes()
    assert lazy.loads == 3 * len(entries)


def test_interrupted_local_write_leaves_nothing(tmp_path):
    entries, cbs = _entries()
    lazy = _Lazy(entries, fail_at=len(entries) + 3)  # dies in the encoding pass
    with pytest.raises(RuntimeError, match="died"):
        write_hwq(tmp_path / "x.hwq", lazy.items(), cbs, stream_symbols=1000,
                  spool_bytes=10, spill_dir=str(tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_s3_multipart_streamed_write_and_interruption(s3_bucket, monkeypatch):
    import s3fs

    url, opts = s3_bucket
    monkeypatch.setattr(storage, "S3_PART_BYTES", 5 << 20)
    entries, cbs = _entries(big_raw=3_000_000)  # 12 MB: three parts
    write_hwq(f"{url}/a.hwq", _Lazy(entries).items(), cbs, storage_options=opts,
              stream_symbols=5000, spool_bytes=1 << 20)
    fs = s3fs.S3FileSystem(**opts)
    got = read_hwq(f"{url}/a.hwq", storage_options=opts)
    np.testing.assert_array_equal(got["raw"], entries[-1].raw)

    calls = {"n": 0}
    real = storage._copy

    def dying_copy(src, write, bufsize=8 << 20):
        def w(b):
            calls["n"] += 1
            if calls["n"] == 2:
                raise ConnectionError("the node lost its network mid-upload")
            write(b)
        real(src, w, bufsize=1 << 20)

    monkeypatch.setattr(storage, "_copy", dying_copy)
    with pytest.raises(ConnectionError):
        write_hwq(f"{url}/b.hwq", entries, cbs, storage_options=opts)
    fs.invalidate_cache()
    assert not fs.exists(f"{url}/b.hwq")
    bucket = url[5:].split("/")[0]
    ups = fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", [])
    assert ups == []  # the multipart upload was aborted, no parts kept


def _one_level_rows_entry(rows: int = 30, cols: int = 64):
    """A per-row-codebook tensor whose even rows use one level (all codes 0)."""
    rng = np.random.default_rng(9)
    codes = rng.integers(0, 5, (rows, cols))
    codes[::2] = 0
    cb = rng.standard_normal((rows, 5)).astype(np.float16).astype(np.float32)
    return TensorEntry.quantized("w", (rows, cols), codes.reshape(-1), "cb"), {"cb": cb}, codes


@pytest.mark.parametrize("coder", ["huffman", "ans"])
def test_one_level_rows_spend_no_index_bits(tmp_path, coder):
    from pipeline.encode.container.reader import HwqReader

    entry, cbs, codes = _one_level_rows_entry()
    write_hwq(tmp_path / "a.hwq", [entry], cbs, codebook_dtype="float16", coder=coder)
    got = read_hwq(str(tmp_path / "a.hwq"))
    np.testing.assert_array_equal(got["w"], cbs["cb"][np.arange(30)[:, None], codes])
    info = next(e for e in HwqReader(str(tmp_path / "a.hwq")).inspect()
                if e["kind"] == "quantized")
    # only the 15 rows of several levels are coded: under 3 bits each for 5 levels
    assert info["index_bytes"] * 8 <= 15 * 64 * 3
    entry, cbs, _ = _one_level_rows_entry()
    entry_all_one = TensorEntry.quantized("w", (30, 64), np.zeros(30 * 64, np.int64), "cb")
    write_hwq(tmp_path / "b.hwq", [entry_all_one], cbs, codebook_dtype="float16", coder=coder)
    np.testing.assert_array_equal(read_hwq(str(tmp_path / "b.hwq"))["w"],
                                  np.repeat(cbs["cb"][:, :1], 64, axis=1))


def test_files_that_store_one_level_rows_still_read(tmp_path, monkeypatch):
    from pipeline.encode.container import writer

    def every_class(codes, levels):  # what writers before the one-level omission stored
        c2 = codes.reshape(levels.shape[0], -1)
        return [(int(L), np.ascontiguousarray(c2[levels == L]).reshape(-1))
                for L in np.unique(levels)]

    entry, cbs, codes = _one_level_rows_entry()
    monkeypatch.setattr(writer, "level_classes", every_class)
    write_hwq(tmp_path / "old.hwq", [entry], cbs, codebook_dtype="float16")
    monkeypatch.undo()
    write_hwq(tmp_path / "new.hwq", [entry], cbs, codebook_dtype="float16")
    assert (tmp_path / "new.hwq").stat().st_size < (tmp_path / "old.hwq").stat().st_size
    for f in ("old.hwq", "new.hwq"):
        np.testing.assert_array_equal(read_hwq(str(tmp_path / f))["w"],
                                      cbs["cb"][np.arange(30)[:, None], codes])
