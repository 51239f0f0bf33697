"""The sharded Hessian stage on Ray: (P=3, G=2) equals (P=1, G=1); the table covers the model."""

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.config import load_config
from pipeline.graph import StageContext
from pipeline.hessian.stage import HESSIAN, balance_groups, read_hessian
from pipeline.hessian.table import from_table, to_table
from pipeline.models import build
from pipeline.store import StageDir, Store


@pytest.fixture(scope="module")
def model_stage(tmp_path_factory):
    store = Store(str(tmp_path_factory.mktemp("hstore")))
    torch.manual_seed(0)
    model = build("lenet5")
    sd = StageDir(store, "train", "m0")
    sd.write_safetensors("model.safetensors", model.state_dict())
    sd.outputs = sd.hash_outputs()
    return store, sd, {n: tuple(p.shape) for n, p in model.named_parameters()}


def _run(store, src, key, *sets):
    cfg = load_config("configs/lenet5_fmnist.yaml",
                      ["prune.enabled=false", "hessian.calibration_samples=300",
                       "hessian.batch_size=64", *sets])
    out = StageDir(store, "hessian", key)
    metrics = HESSIAN.run(StageContext(cfg, store, out, {"train": src}))
    out.outputs = out.hash_outputs()
    return out, metrics


@pytest.mark.parametrize("estimator,mode", [("ggn", "mc"), ("ggn", "exact"), ("fisher", "mc")])
def test_sharded_equals_single_task(ray_local, model_stage, estimator, mode):
    store, src, shapes = model_stage
    est = [f"hessian.estimator={estimator}", f"hessian.mode={mode}"]
    one, _ = _run(store, src, f"{estimator}{mode}-1", *est, "hessian.partitions=1",
                  "hessian.groups=1")
    many, m = _run(store, src, f"{estimator}{mode}-6", *est,
                   "hessian.partitions=3", "hessian.groups=2", "hessian.chunk_size=5000")
    assert m["hessian"]["partitions"] == 3 and m["hessian"]["groups"] == 2
    assert m["hessian"]["samples"] == 300
    a, b = read_hessian(one, shapes), read_hessian(many, shapes)
    assert set(a) == set(shapes)
    for k in shapes:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-6, atol=1e-12 * float(a[k].max()))
    # Partials are reduced away; the table reads with plain pyarrow.
    assert many.files() == ["hessian.parquet"]
    t = pq.read_table(store.path(many.rel("hessian.parquet")))
    meta = t.schema.metadata
    assert meta[b"estimator"] == estimator.encode() and meta[b"n_samples"] == b"300"


def test_every_parameter_has_exactly_one_entry(model_stage):
    store, src, shapes = model_stage
    t = to_table({n: torch.rand(s) for n, s in shapes.items()}, chunk=1000)
    back = from_table(t, shapes)
    assert set(back) == set(shapes)
    rows = t.column("tensor").to_pylist()
    assert rows.count("fc1.weight") == 400  # 400,000 values in chunks of 1,000
    dup = t.slice(0, 1)
    import pyarrow as pa

    with pytest.raises(ValueError, match="gap or overlap"):
        from_table(pa.concat_tables([t, dup]), shapes)


def test_tensor_larger_than_chunk_roundtrips():
    x = torch.randn(3, 1001, dtype=torch.float32)
    back = from_table(to_table({"w": x}, chunk=100), {"w": (3, 1001)})
    assert np.array_equal(back["w"], x.numpy())


def test_groups_are_balanced_by_elements():
    sizes = {"a": 100, "b": 90, "c": 10, "d": 5}
    groups = balance_groups(sizes, 2)
    loads = sorted(sum(sizes[n] for n in g) for g in groups)
    assert loads == [100, 105]
    assert balance_groups(sizes, 10) == [["a"], ["b"], ["c"], ["d"]]
