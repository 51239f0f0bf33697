"""The real `hessian` stage resumed inside itself: a run killed after its (partition, group)
tasks recorded their partials reruns only the pairs whose records do not verify, and writes
the same table, byte for byte, as an uninterrupted run."""

import logging

import pytest
import torch

import pipeline.progress
from pipeline.config import load_config
from pipeline.driver import run
from pipeline.graph import Stage, plan
from pipeline.hessian.stage import HESSIAN
from pipeline.models import build
from pipeline.store import Store


def _train(ctx):
    torch.manual_seed(0)
    ctx.out.write_safetensors("model.safetensors", build("lenet5").state_dict())
    return {}


# A stand-in for training: a seeded LeNet-5, so the test spends its time in the Hessian.
STAGES = [
    Stage(
        name="train",
        version=1,
        inputs=lambda cfg: (),
        sections=lambda cfg: {"s": 0},
        run=_train,
        outputs=lambda cfg: ("model.safetensors",),
    ),
    HESSIAN,
]


def _cfg(store):
    # 256 samples in batches of 64: P=2 partitions × G=2 groups = 4 units.
    return load_config(
        "configs/lenet5_fmnist.yaml",
        [
            f"store.url={store}",
            "prune.enabled=false",
            "hessian.calibration_samples=256",
            "hessian.batch_size=64",
            "hessian.partitions=2",
            "hessian.groups=2",
            "executor.cpus_per_task=1",
        ],
    )


def _manifest(store: Store, cfg) -> dict:
    key = plan(cfg, STAGES)[1].key
    return store.read_json(f"stages/hessian-{key}/manifest.json")


class _KilledAfterTasks:
    """The stage's progress bar: the run is interrupted once every task was waited for,
    before the reduce, i.e. with every unit recorded and no table written."""

    def __init__(self, total, desc, unit="it"):
        self.desc = desc

    def update(self, n=1):
        pass

    def close(self):
        if self.desc == "hessian tasks":
            raise KeyboardInterrupt


def test_killed_hessian_reruns_only_its_missing_units(ray_local, tmp_path, monkeypatch, caplog):
    whole = Store(str(tmp_path / "whole"))
    run(_cfg(tmp_path / "whole"), stages=STAGES, init_executor=False, until="hessian")
    ref = _manifest(whole, _cfg(tmp_path / "whole"))
    assert ref["metrics"]["hessian"]["units"] == {"total": 4, "reused": 0, "computed": 4}
    assert set(ref["outputs"]) == {"hessian.parquet"}  # partials and records removed

    cfg = _cfg(tmp_path / "killed")
    store = Store(cfg.store.url)
    with monkeypatch.context() as m:
        m.setattr(pipeline.progress, "bar", _KilledAfterTasks)
        with pytest.raises(KeyboardInterrupt):
            run(cfg, stages=STAGES, init_executor=False, until="hessian")
    folder = f"stages/hessian-{plan(cfg, STAGES)[1].key}"
    assert sorted(store.list(f"{folder}/units")) == [
        "p0-g0.json",
        "p0-g1.json",
        "p1-g0.json",
        "p1-g1.json",
    ]
    assert not store.exists(f"{folder}/manifest.json")
    # What a kill at different moments leaves: p1-g0 wrote its partial but not its record,
    # p0-g1's partial was damaged after its record, and a write was cut short.
    store.remove(f"{folder}/units/p1-g0.json")
    data = bytearray(store.read_bytes(f"{folder}/partials/p0-g1.parquet"))
    data[100] ^= 1
    store.write_bytes(f"{folder}/partials/p0-g1.parquet", bytes(data))
    store.write_bytes(f"{folder}/partials/p1-g1.parquet.tmp-deadbeef", b"cut short")

    with caplog.at_level(logging.WARNING, logger="hwq"):
        run(cfg, stages=STAGES, init_executor=False, until="hessian")
    assert any(
        "p0-g1" in r.getMessage() and "does not match" in r.getMessage() for r in caplog.records
    )
    got = _manifest(store, cfg)
    assert got["metrics"]["hessian"]["units"] == {"total": 4, "reused": 2, "computed": 2}
    assert set(got["outputs"]) == {"hessian.parquet"}
    assert got["outputs"]["hessian.parquet"] == ref["outputs"]["hessian.parquet"]
    assert store.read_bytes(f"{folder}/hessian.parquet") == whole.read_bytes(
        f"{folder}/hessian.parquet"
    )
    assert store.list(folder) == ["hessian.parquet", "manifest.json"]
