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
