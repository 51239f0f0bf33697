"""The quantize stage on Ray actors reading their shards from the store."""

import pytest
import torch

from pipeline.config import load_config
from pipeline.graph import StageContext
from pipeline.hessian.table import to_table
from pipeline.models import build
from pipeline.quantize.artifacts import QuantizedModel
from pipeline.quantize.stage import QUANTIZE
from pipeline.store import StageDir, Store
from pipeline.train import magnitude_masks


def _done(sd):
    sd.outputs = sd.hash_outputs()
    return sd


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    store = Store(str(tmp_path_factory.mktemp("qstore")))
    torch.manual_seed(0)
    model = build("lenet5")
    state = model.state_dict()
    masks = magnitude_masks(state, {"conv2.weight": 0.3, "fc1.weight": 0.05})
    for n, m in masks.items():
        state[n] = state[n] * m
    prune = StageDir(store, "prune", "p0")
    prune.write_safetensors("model.safetensors", state)
    prune.write_safetensors("masks.safetensors", {k: m.to(torch.uint8) for k, m in masks.items()})
    hess = StageDir(store, "hessian", "h0")
    g = torch.Generator().manual_seed(1)
    h = {n: torch.rand(t.shape, generator=g) ** 4 for n, t in state.items()}
    hess.write_table("hessian.parquet", to_table(h, chunk=3000).replace_schema_metadata(
        {"nonneg": "none (non-negative)"}))
    return store, _done(prune), _done(hess), state, masks


def _run(inputs, key, *sets):
    store, prune, hess, _, _ = inputs
    cfg = load_config("configs/lenet5_fmnist.yaml", [*sets])
    out = StageDir(store, "quantize", key)
    metrics = QUANTIZE.run(StageContext(cfg, store, out, {"prune": prune, "hessian": hess}))
    return _done(out), metrics


def _check_artifact(out, state, masks):
    qm = QuantizedModel.read(out)
    dense = qm.dense_state(state, masks)
    for n in qm.assignment:
        if n in masks:
            assert torch.all(dense[n][~masks[n]] == 0), n
        cb = qm.codebooks[qm.assignment[n]]
        assert int(qm.indices[n].max()) < cb.shape[-1]
    assert set(qm.raw) == {n for n in state if n.endswith("bias")}
    return qm


def test_network_scope_sharded_over_3_actors_equals_1(ray_local, inputs):
    _, _, _, state, masks = inputs
    sets = ["quantize.method=hw_kmeans", "quantize.k=8", "quantize.n_init=1"]
    one, m1 = _run(inputs, "a1", *sets, "quantize.actors=1")
    three, m3 = _run(inputs, "a3", *sets, "quantize.actors=3")
    q1, q3 = _check_artifact(one, state, masks), _check_artifact(three, state, masks)
    assert torch.equal(q1.codebooks["network"], q3.codebooks["network"])
    assert all(torch.equal(q1.indices[n], q3.indices[n]) for n in q1.indices)
    assert m1["quantize"]["k"] == 8 and m1 == {**m1, "quantized_accuracy": m3["quantized_accuracy"]}
    layers = one.read_json("layers.json")
    assert layers["conv2.weight"]["kept"] == int(masks["conv2.weight"].sum())


def test_uniform_hits_target_bits_and_reports(ray_local, inputs):
    out, m = _run(inputs, "u", "quantize.method=uniform", "quantize.target_bits=2.5")
    assert abs(m["quantize"]["index_entropy_bits"] - 2.5) <= 0.02
    assert 0.0 <= m["quantized_accuracy"] <= 1.0


def test_layer_and_channel_scopes(ray_local, inputs):
    _, _, _, state, masks = inputs
    # (one k-means++ start each: the scopes' artifacts are checked here, not the restarts')
    out, m = _run(inputs, "l", "quantize.method=kmeans", "quantize.scope=layer", "quantize.k=4",
                  "quantize.layer_k={conv1.weight: 16}", "quantize.n_init=1")
    qm = _check_artifact(out, state, masks)
    assert qm.codebooks["conv1.weight"].numel() == 16 and qm.codebooks["fc1.weight"].numel() == 4
    out, m = _run(inputs, "c", "quantize.method=hw_kmeans", "quantize.scope=channel",
                  "quantize.k=4", "quantize.n_init=1")
    qm = _check_artifact(out, state, masks)
    assert tuple(qm.codebooks["fc1.weight"].shape) == (500, 4)


def test_nan_weights_are_rejected_with_the_tensor_name(tmp_path, inputs):
    store, prune, hess, state, masks = inputs
    bad = dict(state)
    bad["fc2.weight"] = bad["fc2.weight"].clone()
    bad["fc2.weight"][0, 0] = float("nan")
    p2 = StageDir(store, "prune", "nan")
    p2.write_safetensors("model.safetensors", bad)
    p2.write_safetensors("masks.safetensors", {k: m.to(torch.uint8) for k, m in masks.items()})
    _done(p2)
    cfg = load_config("configs/lenet5_fmnist.yaml")
    with pytest.raises(ValueError, match="fc2.weight has NaN"):
        QUANTIZE.run(StageContext(cfg, store, StageDir(store, "quantize", "x"),
                                  {"prune": p2, "hessian": hess}))
