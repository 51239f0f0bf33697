"""One pipeline, two residencies: `hwq run` on a safetensors folder read in place
(model.residency=streamed) through the same driver — manifests, units, report — and
model.residency=auto choosing by executor.memory_budget. The run fine-tunes block-wise
(finetune.mode=blockwise, a Ray task per decoder block). Resume inside a stage: a run
interrupted after some units reuses them, and its file is the uninterrupted run's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import driver
from pipeline.config import ConfigError, RunConfig
from pipeline.models.source import resolve_residency
from testkit.models import tiny_sharded_bf16_folder, write_corpus


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("residency")
    path = tiny_sharded_bf16_folder(root / "model", layers=4)
    write_corpus(root / "corpus.txt", lines=400)
    return path


def _cfg(folder: Path, store: Path, **over) -> RunConfig:
    d = {"name": "t", "model": {"name": "hf_causal_lm", "path": str(folder),
                                "residency": "streamed"},
         "data": {"name": "text", "calibration": [str(folder.parent / "corpus.txt")],
                  "calibration_windows": 6, "seq_len": 16},
         "hessian": {"estimator": "fisher", "partitions": 2, "groups": 2},
         "quantize": {"method": "ecsq", "target_bits": 3.0, "embeddings": "keep"},
         "finetune": {"mode": "blockwise", "block_steps": 6, "block_batch": 2,
                      "block_lr": 1e-4},
         "store": {"url": str(store)}}
    for k, v in over.items():
        d[k] = {**d.get(k, {}), **v}
    return RunConfig.model_validate(d)


def _stage(store: Path, name: str) -> Path:
    (d,) = (store / "stages").glob(f"{name}-*")
    return d


@pytest.fixture(scope="module")
def streamed_run(folder, tmp_path_factory, ray_local):
    store = tmp_path_factory.mktemp("store")
    return store, driver.run(_cfg(folder, store))


def test_streamed_run_through_the_driver(streamed_run, folder):
    store, report = streamed_run
    m = report["metrics"]
    # load read headers and tokenizer only: no weights copied into the store
    load = _stage(store, "load")
    assert not (load / "model.safetensors").exists()
    meta = json.loads((load / "model.json").read_text())
    assert meta["residency"] == "streamed" and meta["source"] == str(folder)
    assert len(meta["quantizable"]) == 4 * 7
    # the Fisher: P × G forward units up, P × G backward units down, a reduce per group
    assert m["hessian"]["units"] == {"total": 10, "reused": 0, "computed": 10, "retried": 0}
    assert m["hessian"]["block_groups"] == [[0, 2], [2, 4]]
    # the λ loop aims the coded rate below the target; every tensor was a unit
    q = m["quantize"]
    assert q["coded_rate_bits"] <= 3.0 and q["units"]["total"] == 28
    codes = json.loads((_stage(store, "quantize") / "codes.json").read_text())
    assert set(codes["codes"]) == set(meta["quantizable"])
    # the encode stage decoded every tensor and checked it bit for bit
    enc = m["encode"]
    assert enc["decode_check"]["tensors"] == len(json.loads(
        (folder / "model.safetensors.index.json").read_text())["weight_map"])
    assert np.isfinite(m["decoded_perplexity"]) and np.isfinite(m["baseline_perplexity"])
    # a Ray task per decoder block, each a unit; training lowered every block's error
    ft = m["finetune"]
    assert ft["mode"] == "blockwise" and len(ft["blocks"]) == 4
    assert ft["units"] == {"total": 4, "reused": 0, "computed": 4, "retried": 0}
    for b in ft["blocks"]:
        assert b["steps"] == 6 and b["tensors"] == 7
        assert b["errors"]["train_after"] < b["errors"]["train_before"]
    assert set(ft["validation_perplexity"]) == {"unquantized", "quantized", "finetuned"}
    assert all(np.isfinite(v) for v in ft["validation_perplexity"].values())
    for name in ("load", "hessian", "quantize", "finetune", "encode"):
        man = json.loads((_stage(store, name) / "manifest.json").read_text())
        assert man["memory"]["workers"], name  # every stage ran as Ray tasks
    assert "streamed" in (store / "config.yaml").read_text()


def test_resident_run_writes_the_streamed_runs_file_byte_for_byte(streamed_run, folder,
                                                                   tmp_path):
    """One pipeline: the resident residency loads the model whole (its baseline in memory, its
    weights copied into the load stage's folder), then runs the same per-tensor stages on
    that copy; the file is the streamed run's, byte for byte."""
    store, report = streamed_run
    res = driver.run(_cfg(folder, tmp_path / "store", model={"residency": "resident"}))
    load = _stage(tmp_path / "store", "load")
    assert (load / "model.safetensors").exists()  # resident: the weights were loaded whole
    assert json.loads((load / "model.json").read_text())["tied"] == json.loads(
        (_stage(store, "load") / "model.json").read_text())["tied"]
    assert res["metrics"]["quantize"]["residency"] == "resident"
    assert res["metrics"]["finetune"]["residency"] == "resident"  # block-wise, same codebooks
    assert res["metrics"]["hessian"]["units"]["total"] == report["metrics"]["hessian"][
        "units"]["total"]
    assert (_stage(tmp_path / "store", "encode") / "model.hwq").read_bytes() == \
        (_stage(store, "encode") / "model.hwq").read_bytes()


def test_decoded_file_is_the_fine_tuned_codebooks_at_the_codes(streamed_run):
    """The .hwq decodes to each row's codebook at its codes, in the tensor's dtype: the
    block-wise fine-tune's codebooks (fp16-exact, the quantize stage's shapes) at the quantize
    stage's indices; the embedding, outside the blocks, keeps the quantize stage's."""
    from safetensors.numpy import load_file

    from pipeline.encode.container import read_hwq

    store, report = streamed_run
    q, f = _stage(store, "quantize"), _stage(store, "finetune")
    codes = json.loads((q / "codes.json").read_text())["codes"]
    tuned = json.loads((f / "codebooks.json").read_text())["codebooks"]
    assert set(tuned) == {n for n in codes if ".layers." in n}
    dec = read_hwq(str(_stage(store, "encode") / "model.hwq"))
    changed = 0
    for name, rel in codes.items():
        t = load_file(q / rel)
        cb = load_file(f / tuned[name])[name] if name in tuned else t["codebooks"]
        assert cb.shape == t["codebooks"].shape
        assert np.array_equal(cb.astype(np.float16).astype(np.float32), cb)
        changed += not np.array_equal(cb, t["codebooks"])
        want = torch.from_numpy(np.take_along_axis(cb, t["indices"].astype(np.int64),
                                                   axis=1)).to(torch.bfloat16)
        got = torch.from_numpy(np.asarray(dec[name]).view(np.int16)).view(torch.bfloat16)
        assert torch.equal(got, want), name
    blocks = report["metrics"]["finetune"]["blocks"]
    assert changed == 7 * sum(not b["reverted"] for b in blocks) > 0


def test_rerun_is_all_cache_hits(streamed_run, folder):
    store, _ = streamed_run
    report = driver.run(_cfg(folder, store))
    assert all(s["cached"] for s in report["stages"].values())


def _interrupt_after(monkeypatch, bar: str, n: int) -> None:
    """The progress bar `bar` (of a stage's units, in the driver) raises KeyboardInterrupt at its n-th update: a
    run killed after n units of the stage finished (units still running may finish and record
    too)."""
    import pipeline.progress as progress

    real = progress.bar

    class Bar:
        def __init__(self, total, desc, *a, **k):
            self.inner, self.seen, self.mine = real(total, desc, *a, **k), 0, \
                desc.startswith(bar)

        def update(self, k=1):
            self.seen += k
            if self.mine and self.seen >= n:
                raise KeyboardInterrupt
            self.inner.update(k)

        def close(self):
            self.inner.close()

    monkeypatch.setattr(progress, "bar", Bar)


@pytest.mark.parametrize("stage, bar, output, done", [
    ("hessian", "hessian units", "tensors.json", 2),
    ("quantize", "quantize pass", "codes.json", 10),
    ("finetune", "finetune blocks", "codebooks/b00003.safetensors", 2)])
def test_a_killed_stage_resumes_from_its_units(streamed_run, folder, monkeypatch, stage, bar,
                                               output, done):
    store, _ = streamed_run
    want = (_stage(store, stage) / output).read_bytes()
    cfg = _cfg(folder, store)
    with monkeypatch.context() as mp:
        _interrupt_after(mp, bar, done)
        with pytest.raises(KeyboardInterrupt):
            driver.run(cfg, force=[stage], until=stage)
    assert not (_stage(store, stage) / "manifest.json").exists()
    report = driver.run(cfg, until=stage)
    u = report["stages"][stage]["metrics"][stage]["units"]
    assert u["reused"] >= done - 1, u  # the finished units were not recomputed
    if stage == "finetune":  # blocks run in order: exactly the finished ones are reused, and
        assert u["reused"] == done, u  # their replay hands the next block the same inputs
    # the resumed stage's output is the uninterrupted run's, byte for byte
    assert (_stage(store, stage) / output).read_bytes() == want


def _unit_whose_worker_dies_once(sd) -> dict:
    """A unit task whose first attempt dies as a kill -9 would (no cleanup, no result)."""
    import os

    from pipeline.executor import task_attempt
    from pipeline.units import Units

    if task_attempt() == 0:
        os._exit(1)
    sd.write_bytes("partials/u.bin", b"sums")
    return Units(sd).record("u", ["partials/u.bin"])


def test_a_unit_retried_by_ray_records_its_attempt(ray_local, tmp_path):
    """The record of a unit whose worker died once says attempt 1 (what the streamed stages
    sum as `units.retried`)."""
    from pipeline.executor import call
    from pipeline.store import StageDir, Store

    rec = call(_unit_whose_worker_dies_once, StageDir(Store(str(tmp_path)), "hessian", "k"))
    assert rec["attempt"] == 1


def test_auto_residency_follows_the_memory_budget(folder, tmp_path):
    auto = {"model": {"residency": "auto"}}
    small = resolve_residency(_cfg(folder, tmp_path, **auto,
                                   executor={"memory_budget": "1KB"}))
    assert small.model.residency == "streamed"
    big = resolve_residency(_cfg(folder, tmp_path, **auto, executor={"memory_budget": "1GiB"}))
    assert big.model.residency == "resident"
    # a model that must be streamed with a setting streaming cannot honour: one clear error
    with pytest.raises(ConfigError, match="larger than executor.memory_budget.*finetune"):
        resolve_residency(_cfg(folder, tmp_path, **auto, executor={"memory_budget": 1000},
                               finetune={"enabled": True, "mode": "end_to_end",
                                         "batch_size": 6}))
    # finetune.mode=auto fine-tunes a model that must be streamed block by block
    ft = resolve_residency(_cfg(folder, tmp_path, **auto, executor={"memory_budget": 1000},
                                finetune={"enabled": True, "mode": "auto"}))
    assert ft.model.residency == "streamed"


@pytest.mark.parametrize("over, message", [
    ({"finetune": {"enabled": True, "mode": "end_to_end", "batch_size": 6}},
     "finetune.mode=blockwise or finetune.enabled=false"),
    ({"quantize": {"method": "kmeans", "k": 4, "target_bits": None}}, "scope=channel"),
    ({"executor": {"memory_budget": "12 parsecs"}}, "not a size"),
])
def test_streamed_settings_it_cannot_run_are_refused(folder, tmp_path, over, message):
    with pytest.raises(ValueError, match=message):
        _cfg(folder, tmp_path, **over)


def _slow_unit(sd, i: int) -> int:
    import time

    time.sleep(0.2 if i == 0 else 3)
    sd.write_bytes(f"late/{i}.bin", b"x")  # a cancelled unit never gets here
    return i


def test_a_stopped_map_cancels_its_running_units(ray_local, tmp_path):
    """Units a stopped stage started do not finish later and write into its folder."""
    import time

    from pipeline.executor import map_units
    from pipeline.store import StageDir, Store

    sd = StageDir(Store(str(tmp_path)), "hessian", "k")
    it = map_units(_slow_unit, [(sd, 0), (sd, 1), (sd, 2)], desc="slow")
    assert next(it) == (0, 0)
    it.close()  # what an error or Ctrl-C in the driver does
    time.sleep(4)  # long enough for a unit left running to have written
    assert sorted(p.name for p in (tmp_path / "stages").rglob("*.bin")) == ["0.bin"]
