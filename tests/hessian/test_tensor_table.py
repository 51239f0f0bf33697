"""Per-tensor Hessian tables: written tensor by tensor, read one tensor's row group."""

import numpy as np
import pytest

from pipeline.hessian.table import TensorTable, TensorTableWriter


def test_round_trip_reads_one_tensor(tmp_path):
    rng = np.random.default_rng(0)
    vals = {f"t{i}": rng.random(1000 + 37 * i).astype(np.float32) for i in range(5)}
    with TensorTableWriter(str(tmp_path / "h.parquet"), metadata={"estimator": "activation"},
                           chunk=256) as w:
        for k, v in vals.items():
            w.add(k, v)
        w.close()
    t = TensorTable(str(tmp_path / "h.parquet"))
    assert t.names == list(vals) and t.metadata["estimator"] == "activation"
    for k, v in vals.items():
        np.testing.assert_array_equal(t.read(k), v)
    with pytest.raises(KeyError, match="nope"):
        t.read("nope")


def test_interrupted_table_is_not_published(tmp_path):
    with pytest.raises(RuntimeError), TensorTableWriter(str(tmp_path / "h.parquet")) as w:
        w.add("a", np.ones(10))
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_nan_values_are_refused(tmp_path):
    with pytest.raises(ValueError, match="NaN"), TensorTableWriter(str(tmp_path / "h.parquet")) as w:
        w.add("a", np.array([1.0, np.nan]))


def _crafted(path, values: np.ndarray, name: str = "a", **kw) -> None:
    """One tensor's row group holding `values` in one row, with a correct crc32."""
    import zlib

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.hessian.table import _TENSOR_SCHEMA

    v = values.astype(np.float32)
    t = pa.table({"tensor": [name], "offset": pa.array([0], pa.int64()),
                  "values": pa.array([v.tobytes()], pa.large_binary()),
                  "crc32": pa.array([zlib.crc32(v.tobytes())], pa.int64())},
                 schema=_TENSOR_SCHEMA)
    pq.write_table(t, str(path), **kw)


def test_row_groups_larger_than_the_tensor_are_refused_before_decoding(tmp_path, monkeypatch):
    """A small compressed file whose row group inflates far beyond the tensor's size (the
    issue's 19 KB → 3.56 GB): refused from the footer, naming the file, decoding nothing."""
    from pipeline.hessian.table import TableError

    path = tmp_path / "h.parquet"
    _crafted(path, np.ones(1 << 21), compression="zstd")
    assert path.stat().st_size < 64 << 10  # 8 MiB of values in a few KB
    t = TensorTable(str(path))

    def boom(*a, **k):
        raise AssertionError("decoded a row group the metadata already ruled out")

    monkeypatch.setattr(t._pf, "read_row_groups", boom)
    with pytest.raises(TableError, match=r"h\.parquet.*a hold 1 rows and 8,3\d\d,\d\d\d bytes"):
        t.read("a", sizes=(64, 64 * 32))


def test_a_table_with_other_columns_or_sizes_is_refused_with_its_name(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.hessian.table import TableError

    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"tensor": ["a"], "values": [[1.0, 2.0]]}), str(other))
    with pytest.raises(TableError, match="other.parquet.*schema"):
        TensorTable(str(other))
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"PAR1" + b"\x00" * 100)
    with pytest.raises(TableError, match="junk.parquet"):
        TensorTable(str(junk))
    small = tmp_path / "small.parquet"
    _crafted(small, np.ones(10))
    with pytest.raises(TableError, match="small.parquet: a has 10 Hessian values, expected 8"):
        TensorTable(str(small)).read("a", sizes=(8, 64))


def test_values_that_differ_from_their_recorded_digest_are_refused(tmp_path):
    from pipeline.hessian.table import TableError

    path = str(tmp_path / "h.parquet")
    with TensorTableWriter(path) as w:
        w.add("a", np.arange(8.0))
        w.close()
    digest = w.tensor_sha256["a"]
    assert TensorTable(path).read("a", sizes=(8,), sha256=digest)[3] == 3
    with TensorTableWriter(path) as w:  # another, well-formed table in its place
        w.add("a", np.arange(8.0) + 1)
        w.close()
    with pytest.raises(TableError, match="differ from the digest"):
        TensorTable(path).read("a", sizes=(8,), sha256=digest)


def test_a_full_fisher_tensor_of_distinct_values_reads_back(tmp_path):
    """Hessian values of a [576, 1536] tensor, none repeated (a Fisher's squared gradients):
    the row group must stay within what the reader accepts for that shape (a dictionary page
    over such values inflated it to 5.7 MB for 3.5 MB of floats, and the read was refused)."""
    v = np.random.default_rng(0).random(576 * 1536).astype(np.float32)
    with TensorTableWriter(str(tmp_path / "h.parquet")) as w:
        w.add("t", v)
        w.close()
    t = TensorTable(str(tmp_path / "h.parquet"))
    assert np.array_equal(t.read("t", sizes=(1536, 576 * 1536), sha256=w.tensor_sha256["t"]), v)
