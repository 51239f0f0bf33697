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


def _even_masked_entry(rows: int = 24, cols: int = 32, keep: int = 16):
    """A per-row-codebook tensor pruned one shot: every row keeps `keep` weights."""
    rng = np.random.default_rng(11)
    mask = np.zeros((rows, cols), bool)
    for r in range(rows):
        mask[r, rng.permutation(cols)[:keep]] = True
    levels = rng.integers(1, 7, rows)  # some rows one level
    codes = (rng.integers(0, 1 << 20, (rows, keep)) % levels[:, None])
    cb = rng.standard_normal((rows, 8)).astype(np.float16).astype(np.float32)
    entry = TensorEntry.quantized("w", (rows, cols), codes.reshape(-1), "cb", mask=mask)
    dense = np.zeros((rows, cols), np.float32)
    dense[mask] = np.take_along_axis(cb, codes, axis=1).reshape(-1)
    return entry, {"cb": cb}, dense, levels


@pytest.mark.parametrize("kw", [{}, {"coder": "ans"}, {"positions": "context"}])
def test_rows_that_keep_the_same_count_store_ragged_levels(tmp_path, kw):
    """One-shot pruning keeps the same count in every row: such a tensor's codebook is
    stored ragged and its kept codes in level order (one table per level count, one-level
    rows uncoded), as a dense tensor's; it decodes to zeros at the pruned weights."""
    from hostile_files import split, tensor

    entry, cbs, dense, _ = _even_masked_entry()
    write_hwq(tmp_path / "a.hwq", [entry], cbs, codebook_dtype="float16", **kw)
    np.testing.assert_array_equal(read_hwq(str(tmp_path / "a.hwq"))["w"], dense)
    h, _ = split((tmp_path / "a.hwq").read_bytes())
    assert tensor(h, "w")["indices"]["order"] == "levels"
    assert h["codebooks"][0].get("ragged")
    # rows that keep different counts keep every level of every row, in row order
    uneven = entry.mask.copy()
    uneven[0, np.flatnonzero(~uneven[0])[0]] = True  # row 0 keeps one more
    codes = np.concatenate([np.zeros(1, np.int64), entry.codes])
    e2 = TensorEntry.quantized("w", (24, 32), codes, "cb", mask=uneven)
    write_hwq(tmp_path / "b.hwq", [e2], cbs, codebook_dtype="float16", **kw)
    h2, _ = split((tmp_path / "b.hwq").read_bytes())
    assert tensor(h2, "w")["indices"].get("order", "rows") == "rows"
    assert (tmp_path / "a.hwq").stat().st_size < (tmp_path / "b.hwq").stat().st_size


def test_a_level_ordered_pruned_tensor_with_uneven_positions_is_refused(tmp_path):
    """Tampering: positions that do not keep n_kept / rows in every row would put the
    level-ordered codes in the wrong rows; the reader refuses the file."""
    import zlib

    from hostile_files import join, split, tensor

    from pipeline.encode.container.reader import HwqReader
    from pipeline.encode.context import encode_mask

    entry, cbs, _, _ = _even_masked_entry()
    write_hwq(tmp_path / "a.hwq", [entry], cbs, codebook_dtype="float16",
              positions="context")
    h, payload = split((tmp_path / "a.hwq").read_bytes())
    assert tensor(h, "w")["indices"]["order"] == "levels"
    # a mask whose first row keeps one more and second one fewer: same n_kept, same streams
    m = entry.mask.copy()
    m[0, np.flatnonzero(~m[0])[0]] = True
    m[1, np.flatnonzero(m[1])[0]] = False
    data = encode_mask(m, 1)
    pos = tensor(h, "w")["positions"]
    (o, n, *_), = pos["chunks"]
    assert o + n == len(payload)  # the last section: replaced in place
    pos["chunks"][0][1] = len(data)
    pos["chunks"][0][3] = zlib.crc32(data)
    (tmp_path / "b.hwq").write_bytes(join(h, bytes(payload[:o]) + data))
    with pytest.raises(ValueError, match="do not keep"):
        HwqReader(str(tmp_path / "b.hwq")).read(["w"])
