"""Pruning criteria: magnitude and Optimal Brain Damage, per layer and global."""

import pytest
import torch

from pipeline.config import RunConfig, load_config
from pipeline.train import magnitude_masks, obd_saliency, saliency_masks


def _state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(20, 30, generator=g), "b": torch.randn(50, generator=g) * 3}


def test_layer_scope_keeps_exactly_each_fraction():
    st = _state()
    m = magnitude_masks(st, {"a": 0.1, "b": 0.5})
    assert int(m["a"].sum()) == 60 and int(m["b"].sum()) == 25
    # The kept ones are the largest magnitudes.
    assert st["a"].abs()[m["a"]].min() >= st["a"].abs()[~m["a"]].max()


def test_global_scope_keeps_the_same_total_ranked_across_tensors():
    st = _state()
    keep = {"a": 0.1, "b": 0.5}
    m = magnitude_masks(st, keep, scope="global")
    assert int(m["a"].sum()) + int(m["b"].sum()) == 60 + 25
    kept = torch.cat([st["a"].abs()[m["a"]], st["b"].abs()[m["b"]]])
    cut = torch.cat([st["a"].abs()[~m["a"]], st["b"].abs()[~m["b"]]])
    assert kept.min() >= cut.max()
    # b's weights are 3x larger: global ranking gives it more than its per-layer share.
    assert int(m["b"].sum()) > 25


def test_global_scope_never_empties_a_tensor():
    st = {"big": torch.full((100,), 10.0), "small": torch.full((10,), 0.01)}
    m = magnitude_masks(st, {"big": 0.5, "small": 0.5}, scope="global")
    assert int(m["small"].sum()) >= 1
    assert int(m["big"].sum()) + int(m["small"].sum()) == 55


def test_obd_saliency_is_half_h_w_squared_and_changes_the_choice():
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    h = torch.tensor([[100.0, 10.0, 1.0, 0.01]])
    s = obd_saliency({"w": w}, {"w": h}, ["w"])["w"]
    assert torch.allclose(s, (0.5 * h * w * w).double(), rtol=0, atol=1e-9)
    obd = saliency_masks({"w": s}, {"w": 0.5})["w"]
    mag = magnitude_masks({"w": w}, {"w": 0.5})["w"]
    assert obd.tolist() == [[True, True, False, False]]
    assert mag.tolist() == [[False, False, True, True]]
    # The loss increase of the diagonal quadratic model: OBD's cut costs less.
    cost = lambda m: float((0.5 * h * w * w)[~m].sum())  # noqa: E731
    assert cost(obd) < cost(mag)


def test_obd_takes_a_negative_diagonal_by_magnitude():
    w = torch.ones(1, 4)
    h = torch.tensor([[-5.0, 1.0, 2.0, 3.0]])
    s = obd_saliency({"w": w}, {"w": h}, ["w"])["w"]
    assert float(s[0, 0]) == 2.5


def test_unknown_tensor_and_bad_scope_are_clear_errors():
    with pytest.raises(ValueError, match="does not have"):
        magnitude_masks(_state(), {"c": 0.5})
    with pytest.raises(ValueError, match="scope"):
        saliency_masks(_state(), {"a": 0.5}, scope="row")


def test_obd_needs_an_estimator_it_can_rerun():
    with pytest.raises(ValueError, match="obd"):
        RunConfig.model_validate({"prune": {"criterion": "obd"},
                                  "hessian": {"estimator": "adam"}})
    cfg = RunConfig.model_validate({"prune": {"criterion": "obd"}})
    assert cfg.hessian.estimator == "ggn"


def test_prune_key_defaults_hash_as_before_and_obd_adds_the_hessian():
    from pipeline.graph import plan
    from pipeline.stages import default_stages

    cfg = load_config("configs/lenet5_fmnist.yaml")
    sections = {p.stage.name: p.config for p in plan(cfg, default_stages())}["prune"]
    assert set(sections["prune"]) == {"enabled", "keep", "steps", "retrain_epochs", "lr",
                                      "batch_size"}
    assert "hessian" not in sections
    obd = load_config("configs/lenet5_fmnist.yaml", ["prune.criterion=obd"])
    p_obd = {p.stage.name: p for p in plan(obd, default_stages())}
    p_mag = {p.stage.name: p for p in plan(cfg, default_stages())}
    assert p_obd["prune"].config["hessian"]["estimator"] == "ggn"
    assert p_obd["prune"].key != p_mag["prune"].key
    assert p_obd["train"].key == p_mag["train"].key
    # A changed estimator re-prunes under OBD, not under magnitude.
    obd2 = load_config("configs/lenet5_fmnist.yaml",
                       ["prune.criterion=obd", "hessian.estimator=fisher"])
    mag2 = load_config("configs/lenet5_fmnist.yaml", ["hessian.estimator=fisher"])
    assert {p.stage.name: p for p in plan(obd2, default_stages())}["prune"].key != p_obd["prune"].key
    assert {p.stage.name: p for p in plan(mag2, default_stages())}["prune"].key == p_mag["prune"].key
    # Disabling the Hessian stage or resharding it does not re-prune.
    obd3 = load_config("configs/lenet5_fmnist.yaml",
                       ["prune.criterion=obd", "hessian.enabled=false", "hessian.partitions=4",
                        "quantize.enabled=false", "finetune.enabled=false",
                        "encode.enabled=false"])
    assert {p.stage.name: p for p in plan(obd3, default_stages())}["prune"].key == p_obd["prune"].key
