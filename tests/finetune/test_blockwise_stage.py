"""Block-wise fine-tuning through the driver: a Ray task per decoder block in the streamed
residency, a unit record per block, the file carrying the trained codebooks at the quantize
stage's indices (checked bit for bit by encode), the resident residency writing the same
file, and a run killed after some blocks resuming with them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import driver
from pipeline.config import RunConfig
from testkit.models import tiny_sharded_bf16_folder, write_corpus


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("blockwise")
    path = tiny_sharded_bf16_folder(root / "model", layers=3)
    write_corpus(root / "corpus.txt", lines=400)
    return path


def _cfg(folder: Path, store: Path, residency: str = "streamed", mode: str = "auto"
         ) -> RunConfig:
    return RunConfig.model_validate({
        "name": "bw", "model": {"name": "hf_causal_lm", "path": str(folder),
                                "residency": residency},
        "data": {"name": "text", "calibration": [str(folder.parent / "corpus.txt")],
                 "calibration_windows": 8, "seq_len": 16},
        "hessian": {"estimator": "fisher", "partitions": 1, "groups": 1},
        "quantize": {"method": "ecsq", "target_bits": 3.0, "embeddings": "keep"},
        # auto: a streamed model fine-tunes block-wise (a resident one end to end)
        "finetune": {"mode": mode, "block_steps": 15, "block_lr": 1e-4},
        "store": {"url": str(store)}})


def _stage(store: Path, name: str) -> Path:
    (d,) = (store / "stages").glob(f"{name}-*")
    return d


@pytest.fixture(scope="module")
def run(folder, tmp_path_factory, ray_local):
    store = tmp_path_factory.mktemp("store")
    return store, driver.run(_cfg(folder, store))


def test_every_block_is_a_unit_and_the_file_holds_its_codebooks(run):
    from safetensors.numpy import load_file

    from pipeline.encode.container import read_hwq

    store, report = run
    ft = report["metrics"]["finetune"]
    assert ft["mode"] == "blockwise" and len(ft["blocks"]) == 3
    assert ft["units"] == {"total": 3, "reused": 0, "computed": 3, "retried": 0}
    for b in ft["blocks"]:
        assert b["steps"] == 15 and b["tensors"] == 7
        e = b["errors"]
        assert e["train_after"] < e["train_before"]  # training lowered the block's error
    vp = ft["validation_perplexity"]
    assert set(vp) == {"unquantized", "quantized", "finetuned"}
    assert all(np.isfinite(v) for v in vp.values())
    fdir, qdir = _stage(store, "finetune"), _stage(store, "quantize")
    files = json.loads((fdir / "codebooks.json").read_text())["codebooks"]
    codes = json.loads((qdir / "codes.json").read_text())["codes"]
    assert set(files) == {n for n in codes if ".layers." in n} and len(files) == 21
    dec = read_hwq(str(_stage(store, "encode") / "model.hwq"))
    changed = 0
    for name, rel in files.items():
        q = load_file(qdir / codes[name])
        tuned = load_file(fdir / rel)[name]
        assert tuned.shape == q["codebooks"].shape
        changed += not np.array_equal(tuned, q["codebooks"])
        want = torch.from_numpy(np.take_along_axis(tuned, q["indices"].astype(np.int64),
                                                   axis=1)).to(torch.bfloat16)
        got = torch.from_numpy(np.asarray(dec[name]).view(np.int16)).view(torch.bfloat16)
        assert torch.equal(got, want), name
    assert changed == sum(7 for b in ft["blocks"] if not b["reverted"]) > 0
    # the rate is the quantize stage's: fine-tuning moves values, not codes
    assert report["metrics"]["encode"]["bits_per_weight"] <= 3.0


def test_the_resident_residency_writes_the_same_file(run, folder, tmp_path):
    store, _ = run
    res = driver.run(_cfg(folder, tmp_path / "store", residency="resident", mode="blockwise"))
    assert res["metrics"]["finetune"]["residency"] == "resident"
    assert (_stage(tmp_path / "store", "encode") / "model.hwq").read_bytes() == \
        (_stage(store, "encode") / "model.hwq").read_bytes()


def test_a_killed_fine_tune_resumes_with_its_finished_blocks(run, folder, monkeypatch):
    from tests.test_residency import _interrupt_after

    store, _ = run
    fdir = _stage(store, "finetune")
    want = {p.name: p.read_bytes() for p in (fdir / "codebooks").iterdir()}
    cfg = _cfg(folder, store)
    with monkeypatch.context() as mp:
        _interrupt_after(mp, "finetune blocks", 2)
        with pytest.raises(KeyboardInterrupt):
            driver.run(cfg, force=["finetune"], until="finetune")
    assert not (fdir / "manifest.json").exists()
    report = driver.run(cfg, until="finetune")
    u = report["stages"]["finetune"]["metrics"]["finetune"]["units"]
    assert u["reused"] == 2 and u["computed"] == 1, u
    got = {p.name: p.read_bytes() for p in (_stage(store, "finetune") / "codebooks").iterdir()}
    assert got == want  # the replayed blocks hand the last one the same inputs


def test_blockwise_is_refused_for_a_model_without_decoder_blocks(tmp_path):
    with pytest.raises(ValueError, match="finetune.mode=blockwise"):
        RunConfig.model_validate({"name": "x", "finetune": {"mode": "blockwise"},
                                  "store": {"url": str(tmp_path)}})


def test_hwq_stream_maps_finetune_steps_onto_blockwise(tmp_path):
    from pipeline.cli import build_parser
    from pipeline.stream_cli import stream_config

    args = build_parser().parse_args(["stream", str(tmp_path / "m"), str(tmp_path / "w"),
                                      "--finetune-steps", "5"])
    assert stream_config(args)["finetune"] == {"enabled": True, "mode": "blockwise",
                                               "block_steps": 5}
    off = build_parser().parse_args(["stream", str(tmp_path / "m"), str(tmp_path / "w")])
    assert stream_config(off)["finetune"] == {"enabled": False}
