"""The quantize stage survives a killed actor and writes the bits of an undisturbed run."""

import os
import signal

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

SETS = ["quantize.method=hw_kmeans", "quantize.k=8", "quantize.n_init=2", "quantize.iters=10",
        "quantize.actors=2"]


def _done(sd):
    sd.outputs = sd.hash_outputs()
    return sd


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    store = Store(str(tmp_path_factory.mktemp("qfaults")))
    torch.manual_seed(0)
    state = build("lenet5").state_dict()
    masks = magnitude_masks(state, {"conv2.weight": 0.3, "fc1.weight": 0.05})
    prune = StageDir(store, "prune", "p0")
    prune.write_safetensors("model.safetensors", state)
    prune.write_safetensors("masks.safetensors", {k: m.to(torch.uint8) for k, m in masks.items()})
    hess = StageDir(store, "hessian", "h0")
    g = torch.Generator().manual_seed(1)
    h = {n: torch.rand(t.shape, generator=g) ** 4 for n, t in state.items()}
    hess.write_table("hessian.parquet", to_table(h, chunk=3000).replace_schema_metadata(
        {"nonneg": "none (non-negative)"}))
    return store, _done(prune), _done(hess)


def _run(inputs, key):
    store, prune, hess = inputs
    cfg = load_config("configs/lenet5_fmnist.yaml", SETS)
    out = StageDir(store, "quantize", key)
    metrics = QUANTIZE.run(StageContext(cfg, store, out, {"prune": prune, "hessian": hess}))
    return QuantizedModel.read(_done(out)), metrics


# The backend-level twin (tests/quantize/test_quantize_sharded.py) kills an actor in the
# middle of a network-scope k-means in 20 s; this one runs the whole stage twice: slow.
@pytest.mark.slow
def test_a_killed_quantize_actor_gives_the_undisturbed_result(ray_local, inputs, monkeypatch):
    import ray

    import pipeline.quantize.sharded as sharded

    calm, m_calm = _run(inputs, "calm")

    killed = []

    class KillingRayBackend(sharded.RayBackend):
        """SIGKILLs the second actor's process right before the 3rd statistics call."""

        calls = 0

        def stats(self, *args, **kwargs):
            self.calls += 1
            if self.calls == 3:
                pid = ray.get(self._actors[1].pid.remote())
                os.kill(pid, signal.SIGKILL)
                killed.append((self, pid))
            return super().stats(*args, **kwargs)

        def close(self):
            if killed and killed[0][0] is self:  # the actor really came back, in a new process
                killed.append(ray.get(self._actors[1].pid.remote()))
            super().close()

    monkeypatch.setattr(sharded, "RayBackend", KillingRayBackend)  # the stage imports it late
    hit, m_hit = _run(inputs, "killed")
    assert len(killed) == 2 and killed[1] != killed[0][1]
    assert torch.equal(hit.codebooks["network"], calm.codebooks["network"])
    assert all(torch.equal(hit.indices[n], calm.indices[n]) for n in calm.indices)
    strip = ("seconds",)
    assert ({k: v for k, v in m_hit["quantize"].items() if k not in strip}
            == {k: v for k, v in m_calm["quantize"].items() if k not in strip})
    assert m_hit["quantized_accuracy"] == m_calm["quantized_accuracy"]
