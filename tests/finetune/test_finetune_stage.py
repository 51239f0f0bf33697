"""The finetune stage on Ray Train + DeepSpeed: equals its single-process twin, and resumes.

Six Ray Train fits in all (each costs ~15-30 s of worker start-up on two busy cores):
1 worker (ZeRO-0); 2 workers in bf16; 2 workers (ZeRO-2) over a planted malicious checkpoint
(ignored: the run is the uninterrupted reference); 2 workers (ZeRO-2) with one worker killed
after step 3 and restarted by Ray Train; 2 workers (ZeRO-2) interrupted after step 3, and the
rerun resuming from the step-2 checkpoint. The fp32 runs must give the centres of a
plain-torch loop over the same global batches, and every ZeRO-2 run the same bits.
"""

import numpy as np
import pytest
import torch

from pipeline import hooks
from pipeline.config import load_config
from pipeline.driver import run as run_stages
from pipeline.finetune.stage import FINETUNE, deepspeed_config, global_batch, plan_steps
from pipeline.finetune.transform import QuantizedTrainable
from pipeline.graph import Stage, StageContext
from pipeline.models import build
from pipeline.quantize.artifacts import QuantizedModel
from pipeline.store import StageDir, Store
from pipeline.train import magnitude_masks
from testkit.faults import crash_finetune

KEEP = {"conv1.weight": 0.66, "conv2.weight": 0.12, "fc1.weight": 0.08, "fc2.weight": 0.19}
# 512 samples, batch 64: 8 steps per epoch; 0.5 epochs = 4 steps. lr 1e-3 so the centres move
# by ~4e-3, far above the comparison tolerance.
SETS = ["data.train_samples=512", "finetune.batch_size=64", "finetune.epochs=0.5",
        "finetune.lr=1e-3", "finetune.checkpoint_every=2"]
# 1 or 2 engines vs the twin: the same float32 operations, summed in a different order (the
# 2-worker gradient is the mean of two half-batch means); Adam's normalised steps keep the
# difference at rounding level.
ATOL = 1e-6


def _cfg(*sets):
    return load_config("configs/lenet5_fmnist.yaml", [*SETS, *sets])


def _write_prune(sd: StageDir) -> None:
    torch.manual_seed(0)
    state = build("lenet5").state_dict()
    masks = magnitude_masks(state, KEEP)
    sd.write_safetensors("model.safetensors", state)
    sd.write_safetensors("masks.safetensors", {n: m.to(torch.uint8) for n, m in masks.items()})


def _write_quantize(sd: StageDir, prune: StageDir) -> None:
    """A network-scope codebook of 16 quantiles of the kept weights; nearest-centre indices."""
    state = prune.read_safetensors("model.safetensors")
    masks = {k: v.bool() for k, v in prune.read_safetensors("masks.safetensors").items()}
    kept = torch.cat([state[n][masks[n]] for n in KEEP])
    cb = torch.quantile(kept, (torch.arange(16) + 0.5) / 16).float()
    edges = ((cb[1:] + cb[:-1]) / 2).numpy()
    idx = {n: torch.from_numpy(np.searchsorted(edges, state[n].numpy()).astype(np.uint8))
           * masks[n] for n in KEEP}
    QuantizedModel("network", "quantiles", {"network": cb}, idx, {n: "network" for n in KEEP},
                   raw=["conv1.bias", "conv2.bias", "fc1.bias", "fc2.bias"]).write(sd)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    store = Store(str(tmp_path_factory.mktemp("ftstore")))
    prune = StageDir(store, "prune", "p0")
    _write_prune(prune)
    prune.outputs = prune.hash_outputs()
    quant = StageDir(store, "quantize", "q0")
    _write_quantize(quant, prune)
    quant.outputs = quant.hash_outputs()
    return store, prune, quant


def _twin(cfg, prune: StageDir, quant: StageDir) -> dict[str, torch.Tensor]:
    """One process, no DeepSpeed: torch Adam over the stage's global batches of size B."""
    from pipeline.data import load_split

    ft = cfg.finetune
    model = build("lenet5")
    model.load_state_dict(prune.read_safetensors("model.safetensors"))
    masks = {k: v.bool() for k, v in prune.read_safetensors("masks.safetensors").items()}
    net = QuantizedTrainable(model, QuantizedModel.read(quant), masks, grad=ft.grad)
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=ft.lr,
                           betas=(0.9, 0.999), eps=1e-8)
    train = load_split(cfg.data.root, "train", cfg.data.train_samples, cfg.seed)
    steps, _ = plan_steps(len(train), ft.batch_size, ft.epochs)
    for s in range(steps):
        idx = global_batch(len(train), ft.batch_size, s, cfg.seed)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(train.x[idx]), train.y[idx]).backward()
        opt.step()
    return net.codebook_state()


@pytest.fixture(scope="module")
def twin(inputs):
    store, prune, quant = inputs
    return _twin(_cfg(), prune, quant)


# -- plain functions ------------------------------------------------------------------------


def test_schedule_shards_each_global_batch_across_workers():
    assert plan_steps(512, 64, 0.5) == (4, 8)
    assert plan_steps(60000, 128, 1.0) == (468, 468)  # full batches only
    assert plan_steps(100, 64, 0.01) == (1, 1)  # at least one step
    with pytest.raises(ValueError, match="larger than the training set"):
        plan_steps(10, 64, 1.0)
    b = global_batch(512, 64, 3, seed=0)
    assert torch.equal(b, global_batch(512, 64, 3, seed=0))  # a pure function of the step
    shards = [b[r::2] for r in range(2)]
    assert sorted(torch.cat(shards).tolist()) == sorted(b.tolist())
    # An epoch's batches are disjoint and cover its full batches; the next epoch reshuffles.
    epoch = torch.cat([global_batch(512, 64, s, 0) for s in range(8)])
    assert sorted(epoch.tolist()) == list(range(512))
    assert not torch.equal(global_batch(512, 64, 8, 0), global_batch(512, 64, 0, 0))


def test_deepspeed_config_splits_the_global_batch():
    ft = _cfg("finetune.zero_stage=2", "finetune.bf16=true").finetune
    ds = deepspeed_config(ft, 2)
    assert ds["train_batch_size"] == 64 and ds["train_micro_batch_size_per_gpu"] == 32
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"]["enabled"] is True
    assert ds["optimizer"]["params"]["torch_adam"] is True
    with pytest.raises(ValueError, match="not divisible"):
        deepspeed_config(ft, 3)


def test_stage_key_ignores_resume_settings():
    a = FINETUNE.sections(_cfg())
    assert a == FINETUNE.sections(_cfg("finetune.checkpoint_every=7", "finetune.max_failures=2"))
    assert a != FINETUNE.sections(_cfg("finetune.workers=1"))
    assert FINETUNE.inputs(_cfg()) == ("prune", "quantize")
    assert not FINETUNE.enabled(_cfg("quantize.enabled=false"))


# -- on Ray Train ---------------------------------------------------------------------------


def test_one_worker_equals_single_process_twin(ray_local, inputs, twin):
    store, prune, quant = inputs
    out = StageDir(store, "finetune", "w1")
    cfg = _cfg("finetune.workers=1", "finetune.zero_stage=0")
    metrics = FINETUNE.run(StageContext(cfg, store, out, {"prune": prune, "quantize": quant}))
    got = out.read_safetensors("codebooks.safetensors")
    start = quant.read_safetensors("codebooks.safetensors")
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in start.items()}
    assert got["network"].dtype == torch.float32
    assert float((got["network"] - start["network"]).abs().max()) > 100 * ATOL
    torch.testing.assert_close(got["network"], twin["network"], rtol=0, atol=ATOL)
    ft = metrics["finetune"]
    assert (ft["workers"], ft["zero_stage"], ft["steps"], ft["resumed_from_step"]) == (1, 0, 4, 0)
    assert 0.0 <= metrics["finetuned_accuracy"] <= 1.0
    assert "deepspeed_op_build_seconds" in ft and ft["seconds"] > 0
    # The fine-tuned artifact reads back through the quantize artifact.
    qm = QuantizedModel.read(quant, codebooks_from=out)
    assert torch.equal(qm.codebooks["network"], got["network"])
    assert not store.exists(f"checkpoints/finetune-{out.key}")


def test_bf16_engines_write_the_fp32_master_centres(ray_local, inputs, twin):
    store, prune, quant = inputs
    out = StageDir(store, "finetune", "bf16")
    cfg = _cfg("finetune.workers=2", "finetune.zero_stage=0", "finetune.bf16=true")
    FINETUNE.run(StageContext(cfg, store, out, {"prune": prune, "quantize": quant}))
    got = out.read_safetensors("codebooks.safetensors")["network"]
    assert got.dtype == torch.float32
    # The engines' modules hold bf16 centres; what is written is the optimizer's fp32 masters.
    assert not torch.equal(got.bfloat16().float(), got)
    # bf16 forward/backward vs the fp32 twin: close, not equal (the centres moved ~4e-3).
    torch.testing.assert_close(got, twin["network"], rtol=0, atol=1e-3)


ZERO2 = ("finetune.workers=2", "finetune.zero_stage=2")


@pytest.fixture(scope="module")
def zero2(ray_local, inputs, twin, tmp_path_factory):
    """2 workers, ZeRO-2, over a malicious checkpoint planted in the store: a pickle that
    would create a marker file, under every file name DeepSpeed loads, with a latest.json
    that lists their true hashes. None of it runs; the stage ignores the checkpoint (with a
    warning) and fine-tunes from step 0. Its codebooks are the uninterrupted reference."""
    from tests.finetune.test_finetune_checkpoint import plant, planted_files

    store, prune, quant = inputs
    marker = tmp_path_factory.mktemp("planted") / "pwned"
    out = StageDir(store, "finetune", "zero2")
    plant(store, f"checkpoints/finetune-{out.key}", planted_files(marker))
    metrics = FINETUNE.run(StageContext(_cfg(*ZERO2), store, out,
                                        {"prune": prune, "quantize": quant}))
    assert not marker.exists()
    assert metrics["finetune"]["resumed_from_step"] == 0
    assert not store.exists(f"checkpoints/finetune-{out.key}")  # the planted files went too
    got = out.read_safetensors("codebooks.safetensors")
    torch.testing.assert_close(got["network"], twin["network"], rtol=0, atol=ATOL)
    return got


def test_a_planted_checkpoint_never_runs(zero2):
    assert zero2["network"].dtype == torch.float32  # the checks are in the fixture


@pytest.mark.slow  # minutes: `make test-slow`, not `make test`
def test_a_killed_worker_is_restarted_and_resumes_bit_identically(ray_local, inputs, zero2,
                                                                   tmp_path, monkeypatch):
    """Default finetune.max_failures: one worker process dies (os._exit) after step 3; Ray
    Train restarts the group, which resumes from the step-2 checkpoint and finishes."""
    store, prune, quant = inputs
    monkeypatch.setenv(hooks.ENV, crash_finetune(3, tmp_path / "killed"))
    cfg = _cfg(*ZERO2)
    assert cfg.finetune.max_failures >= 1  # the default
    out = StageDir(store, "finetune", "killed")
    metrics = FINETUNE.run(StageContext(cfg, store, out, {"prune": prune, "quantize": quant}))
    assert (tmp_path / "killed").exists()  # the hook fired
    assert metrics["finetune"]["resumed_from_step"] == 2
    got = out.read_safetensors("codebooks.safetensors")
    assert torch.equal(got["network"], zero2["network"])


def _fake(name, inputs, write):
    return Stage(name=name, version=1, inputs=lambda cfg: inputs, sections=lambda cfg: {},
                 run=write)


@pytest.mark.slow  # minutes: `make test-slow`, not `make test`
def test_two_workers_resume_from_checkpoint_after_a_crash(ray_local, tmp_path, monkeypatch,
                                                          twin, zero2):
    """Through the driver: the crashed stage's folder is cleared, its checkpoint is not."""
    stages = [
        _fake("prune", (), lambda ctx: _write_prune(ctx.out)),
        _fake("quantize", ("prune",),
              lambda ctx: _write_quantize(ctx.out, ctx.inputs["prune"])),
        FINETUNE,
    ]
    # No restarts: the crash ends the run, and the next run resumes.
    cfg = _cfg("finetune.workers=2", "finetune.zero_stage=2", "finetune.max_failures=0",
               f"store.url={tmp_path}/run")
    store = Store(cfg.store.url)

    monkeypatch.setenv(hooks.ENV, crash_finetune(3))
    with pytest.raises(Exception, match="simulated failure after step 3"):
        run_stages(cfg, stages=stages, init_executor=False)
    ckpts = store.list_dirs("checkpoints")
    assert len(ckpts) == 1 and ckpts[0].startswith("finetune-")
    assert store.read_json(f"checkpoints/{ckpts[0]}/latest.json")["step"] == 2
    # Only the step-2 tag (the crash came before step 4's save); Ray Train's storage beside it.
    tags = [d for d in store.list_dirs(f"checkpoints/{ckpts[0]}") if d.startswith("step")]
    assert tags == ["step000000002"]

    monkeypatch.delenv(hooks.ENV)
    report = run_stages(cfg, stages=stages, init_executor=False)
    assert report["stages"]["prune"]["cached"] and report["stages"]["quantize"]["cached"]
    ft = report["metrics"]["finetune"]
    assert (ft["workers"], ft["zero_stage"], ft["steps"]) == (2, 2, 4)
    assert ft["resumed_from_step"] == 2  # not 0: steps 1-2 came from the checkpoint
    key = report["stages"]["finetune"]["key"]
    got = StageDir(store, "finetune", key).read_safetensors("codebooks.safetensors")
    # Had the optimizer state or the data position not been restored, steps 3-4 would differ
    # from the twin's by O(lr) = 1e-3, not by rounding.
    torch.testing.assert_close(got["network"], twin["network"], rtol=0, atol=ATOL)
    assert torch.equal(got["network"], zero2["network"])  # the uninterrupted run's bits
    assert not store.exists("checkpoints")  # removed once the stage completed
