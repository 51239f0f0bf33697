"""finetune.mode: both — block-wise codebook fine-tuning, then the end-to-end DeepSpeed
fine-tune starting from its codebooks, in one finetune stage of the whole-model branch (a
resident causal LM). With one-shot pruning on, so the masks go through both phases."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import driver
from pipeline.config import ConfigError, RunConfig
from testkit.lm_runs import lm_folder, lm_run_config, stage_dir

_RUN = {"model": {"residency": "resident"},
        "prune": {"enabled": True, "keep": {"*": 0.75}, "criterion": "obd"},
        "finetune": {"mode": "both", "block_steps": 4, "block_batch": 2, "block_lr": 1e-3,
                     "workers": 1, "batch_size": 2, "epochs": 1, "lr": 1e-4}}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return lm_folder(tmp_path_factory.mktemp("both"))


def _cfg(folder: Path, store: Path, **over) -> RunConfig:
    return lm_run_config(folder, store, _RUN, **over)


_stage = stage_dir


def test_both_runs_block_wise_then_end_to_end_from_its_codebooks(folder, tmp_path, ray_local):
    from safetensors.numpy import load_file

    from pipeline.encode.container import read_hwq

    store = tmp_path / "store"
    report = driver.run(_cfg(folder, store))
    m = report["metrics"]
    ft = m["finetune"]
    assert ft["mode"] == "both" and ft["steps"] == 3
    bw = ft["blockwise"]
    assert bw["mode"] == "blockwise" and len(bw["blocks"]) == 2
    f = _stage(store, "finetune")
    tuned = json.loads((f / "codebooks.json").read_text())["codebooks"]
    assert len(tuned) == 14  # the block-wise phase's files, beside the end-to-end result
    final = load_file(f / "codebooks.safetensors")
    quant = load_file(_stage(store, "quantize") / "codebooks.safetensors")
    # the end-to-end phase started from the block-wise codebooks: a block that kept its
    # trained values differs from the quantize stage's before the end-to-end steps too
    moved = [n for n in tuned if not np.array_equal(load_file(f / tuned[n])[n], quant[n])]
    assert moved or all(b["reverted"] for b in bw["blocks"])
    assert set(final) == set(quant)
    # the file decodes to the end-to-end codebooks at the codes, zeros where pruned
    masks = load_file(_stage(store, "quantize") / "masks.safetensors")
    idx = load_file(_stage(store, "quantize") / "indices.safetensors")
    dec = read_hwq(str(_stage(store, "encode") / "model.hwq"))
    for n, mk in masks.items():
        cb = final[n].astype(np.float16).astype(np.float32)
        want = np.where(mk.astype(bool), np.take_along_axis(
            cb, idx[n].reshape(cb.shape[0], -1).astype(np.int64), axis=1), 0)
        got = torch.from_numpy(np.asarray(dec[n]).view(np.int16)).view(torch.bfloat16)
        assert torch.equal(got, torch.from_numpy(want.astype(np.float32)).to(torch.bfloat16))
    assert m["decoded_perplexity"] == pytest.approx(m["finetuned_perplexity"], rel=1e-6)
    from pipeline.report import render_markdown

    text = render_markdown(report)
    assert "two phases (finetune.mode=both)" in text and "Block-wise fine-tuning: 2 blocks" in text


def test_both_is_refused_where_it_cannot_run(folder, tmp_path):
    with pytest.raises((ConfigError, ValueError), match="finetune.mode=blockwise or"):
        _cfg(folder, tmp_path, model={"residency": "streamed"})
    with pytest.raises((ConfigError, ValueError), match="decoder blocks"):
        RunConfig.model_validate({"finetune": {"mode": "both"}})
