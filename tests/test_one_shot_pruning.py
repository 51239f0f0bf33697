"""One-shot pruning of a causal LM inside the quantize stage (prune.method=one_shot).

Unit properties of the masks (row counts, N:M structure, saliency order, determinism), the
config's checks, and a run of the whole pipeline on a tiny Llama in both residencies:
block-wise fine-tune, the file's pruned weights exactly zero, its masks coded, the same file
from either residency, and the runtime serving it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import driver
from pipeline.config import ConfigError, RunConfig
from pipeline.quantize.sparsity import (
    compact,
    expand,
    keeps_for,
    position_bits,
    row_mask,
    saliency,
)
from testkit.lm_runs import decoded_model, lm_folder, lm_run_config, stage_dir

# -- masks ---------------------------------------------------------------------------------


def test_row_mask_keeps_the_same_count_in_every_row_by_saliency():
    rng = np.random.default_rng(0)
    W = rng.normal(size=(7, 40)).astype(np.float32)
    H = rng.gamma(1.0, size=(7, 40)).astype(np.float32)
    S = saliency(W, H, "obd")
    m = row_mask(S, keep=0.3)
    assert (m.sum(axis=1) == 12).all()
    # every kept weight is at least as salient as every pruned one of its row
    for r in range(7):
        assert S[r][m[r]].min() >= S[r][~m[r]].max()
    # obd is not magnitude when h varies
    assert not np.array_equal(m, row_mask(saliency(W, H, "magnitude"), keep=0.3))


def test_n_m_mask_keeps_n_of_every_m_consecutive_weights():
    rng = np.random.default_rng(1)
    S = rng.random((5, 32))
    m = row_mask(S, n_m=(2, 4))
    groups = m.reshape(5, 8, 4)
    assert (groups.sum(axis=2) == 2).all()
    g = S.reshape(5, 8, 4)
    assert (np.where(groups, g, np.inf).min(axis=2) >= np.where(groups, -np.inf, g).max(axis=2)
            ).all()
    with pytest.raises(ValueError, match="groups of 3"):
        row_mask(rng.random((2, 32)), n_m=(1, 3))


def test_ties_go_to_the_lower_column_and_masks_do_not_depend_on_the_split():
    S = np.ones((2, 8))
    assert row_mask(S, keep=0.25).tolist() == [[True, True] + [False] * 6] * 2
    rng = np.random.default_rng(2)
    S = rng.random((64, 16))
    whole = row_mask(S, keep=0.5)
    assert np.array_equal(np.concatenate([row_mask(S[:17], keep=0.5),
                                          row_mask(S[17:], keep=0.5)]), whole)


def test_compact_and_expand_round_trip_and_broadcast_rows():
    rng = np.random.default_rng(3)
    W = rng.normal(size=(4, 12)).astype(np.float32)
    m = row_mask(np.abs(W), keep=0.5)
    Wk = compact(W, m)
    assert Wk.shape == (4, 6) and np.array_equal(Wk, W.reshape(-1)[m.reshape(-1)].reshape(4, 6))
    h = rng.random((1, 12)).astype(np.float32)  # an activation Hessian: one row for all
    assert np.array_equal(compact(np.broadcast_to(h, (4, 12)), m),
                          np.broadcast_to(h, (4, 12))[m].reshape(4, 6))
    idx = np.arange(24, dtype=np.uint8).reshape(4, 6) + 1
    full = expand(idx, m)
    assert np.array_equal(full[m].reshape(4, 6), idx) and (full[~m] == 0).all()
    bad = m.copy()
    bad[0, np.flatnonzero(~m[0])[0]] = True
    with pytest.raises(ValueError, match="different counts"):
        compact(W, bad)


def test_keep_patterns_select_tensors_and_refuse_typos():
    names = ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight",
             "model.layers.0.self_attn.q_proj.weight", "lm_head.weight"]
    emb = {"model.embed_tokens.weight", "lm_head.weight"}
    assert keeps_for(names, {"*": 0.5}, emb) == {names[1]: 0.5, names[2]: 0.5}
    assert keeps_for(names, {"*mlp*": 0.25, "lm_head.weight": 0.5}, emb) == {
        names[1]: 0.25, "lm_head.weight": 0.5}
    with pytest.raises(ValueError, match="did you mean"):
        keeps_for(names, {"model.layers.0.mlp.up_prj.weight": 0.5}, emb)


def test_position_bits_price_structure():
    rng = np.random.default_rng(4)
    S = rng.random((64, 256))
    half = position_bits(row_mask(S, keep=0.5))
    nm = position_bits(row_mask(S, n_m=(2, 4)))
    # about a bit a weight for a random half, less for 2:4 (log2(6)/4 = 0.65 is its entropy)
    assert 0.9 < half / S.size < 1.1 and nm < half
    assert position_bits(np.ones((4, 4), bool)) == 0.0


# -- config --------------------------------------------------------------------------------

_LM = {"model": {"name": "hf_causal_lm", "path": "/nonexistent"},
       "data": {"name": "text", "calibration": ["/nonexistent.txt"]}}


def test_one_shot_is_the_default_for_a_causal_lm_and_fills_what_it_implies():
    cfg = RunConfig.model_validate({**_LM, "prune": {"enabled": True, "n_m": "2:4"}})
    assert cfg.prune.scope == "row" and cfg.prune.keep == {"*": 0.5}
    from pipeline.config_checks import one_shot
    from pipeline.train.stage import model_stage

    assert one_shot(cfg) and model_stage(cfg) == "load"


@pytest.mark.parametrize("prune, message", [
    ({"enabled": True}, "prune.keep: name the fraction"),
    ({"enabled": True, "keep": {"*": 0.5}, "scope": "layer"}, "prune.scope=row"),
    ({"enabled": True, "n_m": "2:4", "keep": {"*": 0.25}}, "every tensor keeps 2/4"),
    ({"enabled": True, "n_m": "4:2"}, "0 < N < M"),
    ({"enabled": True, "method": "retrain", "keep": {"*": 0.5}}, "prune.method=one_shot"),
])
def test_one_shot_settings_it_cannot_run_are_refused(prune, message):
    with pytest.raises((ConfigError, ValueError), match=message):
        RunConfig.model_validate({**_LM, "prune": prune})


def test_lenet_refuses_one_shot_settings():
    with pytest.raises((ConfigError, ValueError), match="retraining"):
        RunConfig.model_validate({"prune": {"n_m": "2:4"}})


# -- the pipeline --------------------------------------------------------------------------


_RUN = {"prune": {"enabled": True, "n_m": "2:4", "criterion": "obd"},
        "finetune": {"mode": "blockwise", "block_steps": 4, "block_batch": 2, "block_lr": 1e-4}}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return lm_folder(tmp_path_factory.mktemp("oneshot"))


def _cfg(folder: Path, store: Path, **over) -> RunConfig:
    return lm_run_config(folder, store, _RUN, **over)


_stage = stage_dir


@pytest.fixture(scope="module")
def pruned_run(folder, tmp_path_factory, ray_local):
    store = tmp_path_factory.mktemp("store")
    return store, driver.run(_cfg(folder, store))


def test_a_pruned_run_codes_masks_and_decodes_zeros(pruned_run):
    from safetensors.numpy import load_file

    from pipeline.encode.container import read_hwq

    store, report = pruned_run
    m = report["metrics"]
    p = m["quantize"]["prune"]
    assert p["tensors"] == 2 * 7 and p["n_m"] == "2:4"
    assert 0.0 < p["position_bits"] < 1.0 and p["pruned_distortion"] > 0
    # the rate target counts the masks: the file's quantized tensors spend at most the target
    assert m["quantize"]["coded_rate_bits"] <= 3.0
    assert m["encode"]["bits_per_weight"] <= 3.0 + 0.02
    q = _stage(store, "quantize")
    codes = json.loads((q / "codes.json").read_text())["codes"]
    dec = read_hwq(str(_stage(store, "encode") / "model.hwq"))
    pruned = 0
    for name, rel in codes.items():
        t = load_file(q / rel)
        got = torch.from_numpy(np.asarray(dec[name]).view(np.int16)).view(torch.bfloat16)
        if "mask" not in t:
            assert ".layers." not in name  # the embeddings are not selected by "*"
            continue
        pruned += 1
        mask = t["mask"].astype(bool)
        assert (mask.reshape(mask.shape[0], -1, 4).sum(axis=2) == 2).all()
        assert (got.float().numpy()[~mask] == 0).all()
    assert pruned == 14
    from pipeline.report import render_markdown

    assert "One-shot pruning (obd, 2:4 (N:M)) of 14 tensors: 50.0%" in render_markdown(report)
    assert np.isfinite(m["decoded_perplexity"])
    # the block-wise fine-tune ran on the pruned blocks and kept the zeros (checked above on
    # the decoded file, which uses its codebooks)
    assert m["finetune"]["mode"] == "blockwise"


def test_a_pruned_run_is_the_same_file_in_both_residencies(pruned_run, folder, tmp_path):
    store, _ = pruned_run
    res = driver.run(_cfg(folder, tmp_path / "store", model={"residency": "resident"}))
    assert res["metrics"]["quantize"]["residency"] == "resident"
    assert (_stage(tmp_path / "store", "encode") / "model.hwq").read_bytes() == \
        (_stage(store, "encode") / "model.hwq").read_bytes()


def test_the_runtime_serves_a_pruned_file(pruned_run):
    """The runtime packs a pruned row's zero as a level of its table: the file serves as
    LutLinears, and the reference mode computes the decoded model's logits."""

    from pipeline.runtime import load
    from pipeline.runtime.modules import LutLinear

    store, _ = pruned_run
    path = str(_stage(store, "encode") / "model.hwq")
    fast, _ = load(path, mode="fast", threads=1)
    assert sum(isinstance(m, LutLinear) for m in fast.modules()) == 14
    ref, _ = load(path, mode="reference", threads=1)
    dense, _ = decoded_model(_stage(store, "encode"))
    ids = torch.arange(1, 17)[None, :] % fast.config.vocab_size
    with torch.no_grad():
        want = dense(ids).logits.double()
        got, quick = ref(ids).logits.double(), fast(ids).logits.double()
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-3
    assert ((quick - want).abs().max() / want.abs().max()).item() < 0.05


def test_end_to_end_fine_tune_of_a_pruned_model_keeps_its_zeros(folder, tmp_path, ray_local):
    """The whole-model branch (resident, DeepSpeed fine-tune): the quantize stage writes its
    masks beside the codes, the fine-tune trains codebooks under them, and the file decodes
    to zeros at every pruned weight — unstructured per-row pruning by magnitude here."""
    from safetensors.torch import load_file

    from pipeline.encode.container import read_hwq

    cfg = _cfg(folder, tmp_path / "store", model={"residency": "resident"},
               prune={"n_m": None, "keep": {"*mlp*": 0.4}, "criterion": "magnitude"},
               finetune={"mode": "end_to_end", "workers": 1, "batch_size": 2, "epochs": 1,
                         "lr": 1e-4})
    report = driver.run(cfg)
    m = report["metrics"]
    assert m["quantize"]["prune"]["tensors"] == 2 * 3
    q = _stage(tmp_path / "store", "quantize")
    masks = load_file(q / "masks.safetensors")
    assert set(masks) == set(json.loads((q / "quantized.json").read_text())["masked"])
    dec = read_hwq(str(_stage(tmp_path / "store", "encode") / "model.hwq"))
    for name, mk in masks.items():
        assert ".mlp." in name
        kept = mk.bool()
        assert (kept.sum(dim=1) == round(0.4 * kept.shape[1])).all()
        got = torch.from_numpy(np.asarray(dec[name]).view(np.int16)).view(torch.bfloat16)
        assert (got[~kept] == 0).all() and (got[kept] != 0).float().mean() > 0.5
    assert "blocks" not in m["finetune"] and m["finetune"]["steps"] == 3  # DeepSpeed's
    assert m["decoded_perplexity"] == pytest.approx(m["finetuned_perplexity"], rel=1e-6)
