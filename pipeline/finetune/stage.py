"""The `finetune` stage: train only the shared values, data parallel, DeepSpeed inside Ray Train.

Inputs: the model stage (dense state + masks) and `quantize` (codebooks, indices).
Outputs (stage folder):

- `codebooks.safetensors` — the fine-tuned codebooks, same names, shapes and dtype (float32)
  as the quantize artifact's; read them with `QuantizedModel.read(quantize_dir,
  codebooks_from=finetune_dir)`.
- `finetune.json` — steps, loss log (mean over workers every `log_every` steps), the
  fine-tuned test accuracy, the step a resumed run started from, timings.

How it runs. A Ray Train `TorchTrainer` starts `finetune.workers` workers (gloo on CPU, NCCL
and one GPU each when the cluster has GPUs). Each builds `QuantizedTrainable` (codebooks the
only trainable parameters, see `pipeline.finetune.transform`) and a DeepSpeed engine from
`deepspeed_config` (global batch `batch_size`, micro-batch `batch_size / workers`, ZeRO stage,
bf16, torch's Adam). Step `s` uses the global batch `global_batch(N, B, s, seed)` — a slice of a
seeded per-epoch permutation of the N training samples (full batches only) — and worker r
takes every W-th sample of it (`[r::W]`), so over an epoch each worker trains on its own
DistributedSampler-style shard, and W workers with micro-batch B/W take exactly the steps one
worker with batch B takes (DeepSpeed averages the workers' gradients). `epochs` may be
fractional: steps = round(epochs · ⌊N / B⌋). Worker 0 writes the codebooks (the optimizer's
fp32 masters, `_master_fp32`, so bf16 training loses nothing at the end) and evaluates the
rebuilt dense model on the test split.

Resume. Every `checkpoint_every` steps all workers call `engine.save_checkpoint` (trainable
parameters and optimizer state, ZeRO partitions per rank) under tag `step<s>`; after a barrier
worker 0 writes `latest.json` ({"tag", "step"}) atomically and removes older tags, so a kill
during a save leaves the previous checkpoint in force. On start, if `latest.json` exists the
workers load that tag and continue from its step. Data order is a function of the step and the
optimizer state is restored, so a resumed fine-tune computes the same steps as an uninterrupted
one. `finetune.max_failures > 0` lets Ray Train restart a failed worker group itself; each
restart resumes the same way.

Where checkpoints live, and why: `<store root>/checkpoints/finetune-<key>/`, outside the stage
folder, because the driver deletes an incomplete stage's folder before rerunning it (and
every file in the stage folder would be hashed into its manifest). Keyed by the stage key, a
checkpoint can only be resumed by the same inputs and settings (worker count and ZeRO stage
included: ZeRO-1/2 optimizer partitions are per rank). On a local store DeepSpeed writes there
directly; on a remote store (s3://) each worker saves under its node's `cache_dir()` and uploads
what it wrote with the store; a resuming worker downloads the tag first. Ray Train's own storage
(`RunConfig.storage_path`) is `<that folder>/ray_train` on a local store, else
`cache_dir()/ray_train/finetune-<key>`, never ~/ray_results. Both are deleted once the stage
completes.

ZeRO stages. 0, 1 and 2 work with fp32 and bf16 on CPU (bf16: the codebooks written are the
optimizer's fp32 masters, see `_master_fp32`); the tests run ZeRO-0 (1 worker fp32, 2 workers
bf16) and ZeRO-2 (2 workers, interrupted and resumed). Stage 3 also ran (2 CPU
workers, LeNet-5, same centres as stage 0): a network-scope codebook is far below
`stage3_param_persistence_threshold`, so ZeRO-3 keeps it whole on every rank. With the
thresholds at 0 (codebook partitioned) one engine still trained, because DeepSpeed gathers a
partitioned parameter when it is read from a module outside that module's own forward (here
the `codebooks` ParameterDict) and registers it as an external parameter. Stage 3 is not
covered by the tests; its checkpoints are per-rank parameter partitions, so a resume needs the
same worker count (which the stage key guarantees).

Test hook: the environment variable `HWQ_FINETUNE_FAIL_AFTER_STEPS=n`, read in the driver
process and passed to the workers, makes every worker raise right after finishing step n (a
simulated crash, for the resume test; it fires in every attempt that reaches step n).
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.config import FinetuneConfig, RunConfig
from pipeline.driver import Stage, StageContext
from pipeline.store import ArtifactError, StageDir, Store
from pipeline.train.stage import model_stage

__all__ = [
    "FINETUNE",
    "FAIL_ENV",
    "deepspeed_config",
    "plan_steps",
    "global_batch",
    "finetune_worker",
]

FAIL_ENV = "HWQ_FINETUNE_FAIL_AFTER_STEPS"
CODEBOOKS = "codebooks.safetensors"
SUMMARY = "finetune.json"
LATEST = "latest.json"
# Not part of the stage key: resuming is exact whatever they are.
_UNKEYED = ("checkpoint_every", "max_failures")


# ---------------------------------------------------------------------------------------------
# Plain functions: the schedule and the DeepSpeed config
# ---------------------------------------------------------------------------------------------


def deepspeed_config(ft: FinetuneConfig, world: int) -> dict[str, Any]:
    """The DeepSpeed config of one engine out of `world` data-parallel ones.

    train_batch_size is the global batch; each worker's micro-batch is batch_size / world
    (one micro-step per step, no gradient accumulation).
    """
    if ft.batch_size % world:
        raise ValueError(f"finetune.batch_size={ft.batch_size} is not divisible by "
                         f"finetune.workers={world}: each worker takes an equal share")
    return {
        "train_batch_size": ft.batch_size,
        "train_micro_batch_size_per_gpu": ft.batch_size // world,
        "gradient_accumulation_steps": 1,
        "optimizer": {
            "type": "Adam",
            # torch's Adam on every device: no JIT build of DeepSpeed's fused/CPU Adam (which
            # needs a compiler, and nvcc on GPU); with foreach it is fast enough for codebooks.
            # adam_w_mode off: plain Adam, as the rest of the pipeline trains with.
            "params": {"lr": ft.lr, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0,
                       "torch_adam": True, "adam_w_mode": False},
        },
        "zero_optimization": {"stage": ft.zero_stage},
        "bf16": {"enabled": ft.bf16},
        "gradient_clipping": 0.0,
        # DeepSpeed's own per-step logging would flood the driver; we log every log_every steps.
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def plan_steps(n_train: int, batch_size: int, epochs: float) -> tuple[int, int]:
    """(total steps, full batches per epoch) for `epochs` (fractional allowed) over n_train."""
    per_epoch = n_train // batch_size
    if per_epoch < 1:
        raise ValueError(f"finetune.batch_size={batch_size} is larger than the training set "
                         f"({n_train} samples; data.train_samples)")
    return max(1, round(epochs * per_epoch)), per_epoch


def global_batch(n_train: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Sample indices (int64 [batch_size]) of global step `step`: batch step % E of a
    permutation of range(n_train) seeded by (seed, epoch = step // E), E full batches per
    epoch. A pure function of the step, so a resumed run sees the same data."""
    per_epoch = n_train // batch_size
    epoch, i = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + 7 * epoch + 1)
    perm = torch.randperm(n_train, generator=g)
    return perm[i * batch_size : (i + 1) * batch_size]


# ---------------------------------------------------------------------------------------------
# Checkpoints outside the stage folder
# ---------------------------------------------------------------------------------------------


@dataclass
class _Checkpoints:
    """DeepSpeed checkpoints of one stage key: `<store>/checkpoints/finetune-<key>/`.

    Picklable (a Store and strings); every method that touches DeepSpeed is collective.
    """

    store: Store
    key: str

    @property
    def rel(self) -> str:
        return f"checkpoints/finetune-{self.key}"

    def _local_dir(self, rank: int) -> str:
        """Where DeepSpeed reads/writes on this worker."""
        if self.store.is_local:
            return self.store.path(self.rel)
        from pipeline.executor import cache_dir

        return str(cache_dir() / "finetune-ckpt" / self.key / f"rank{rank}")

    def latest(self) -> dict[str, Any] | None:
        try:
            return self.store.read_json(f"{self.rel}/{LATEST}")
        except (ArtifactError, ValueError):
            return None

    def save(self, engine, step: int, rank: int) -> None:
        tag = f"step{step:09d}"
        local = self._local_dir(rank)
        # Frozen tensors come from the input artifacts: only the trainable state is saved.
        engine.save_checkpoint(local, tag=tag, client_state={"step": step}, save_latest=False,
                               exclude_frozen_parameters=True)
        if not self.store.is_local:
            # Each worker uploads the files it wrote (rank 0: model states; all: their ZeRO
            # partitions); one put per file, each visible whole or not at all.
            src = os.path.join(local, tag)
            for root, _, files in os.walk(src):
                for f in files:
                    p = os.path.join(root, f)
                    rel = posixpath.join(self.rel, tag, os.path.relpath(p, src))
                    self.store.fs.put_file(p, self.store.path(rel))
            shutil.rmtree(src, ignore_errors=True)
        _barrier()  # every rank's files are in place before `latest` points at them
        if rank == 0:
            self.store.write_json(f"{self.rel}/{LATEST}", {"tag": tag, "step": step})
            for d in self.store.list_dirs(self.rel):
                if d.startswith("step") and d != tag:
                    self.store.remove(f"{self.rel}/{d}")

    def load(self, engine, rank: int) -> int:
        """Load the latest complete checkpoint into `engine`; its step, or 0 if none."""
        info = self.latest()
        if info is None:
            return 0
        tag = info["tag"]
        local = self._local_dir(rank)
        if not self.store.is_local:
            dst = os.path.join(local, tag)
            shutil.rmtree(dst, ignore_errors=True)
            self.store.fs.get(self.store.path(f"{self.rel}/{tag}"), dst, recursive=True)
        where = self.store.full_url(f"{self.rel}/{tag}")
        try:
            path, client = engine.load_checkpoint(local, tag=tag, load_module_strict=False)
        except Exception as e:
            raise RuntimeError(f"cannot resume from the checkpoint {where} ({e}); delete "
                               f"{self.store.full_url(self.rel)} to fine-tune from step 0") from e
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint at {where}; delete "
                               f"{self.store.full_url(self.rel)} to fine-tune from step 0")
        if not self.store.is_local:
            shutil.rmtree(os.path.join(local, tag), ignore_errors=True)
        return int(client["step"])

    def ray_storage(self) -> str:
        if self.store.is_local:
            return self.store.path(f"{self.rel}/ray_train")
        from pipeline.executor import cache_dir

        return str(cache_dir() / "ray_train" / f"finetune-{self.key}")

    def remove(self) -> None:
        self.store.remove(self.rel)
        if self.store.is_local:
            with contextlib.suppress(OSError):  # only if no other stage's checkpoints are there
                os.rmdir(self.store.path("checkpoints"))
        else:
            from pipeline.executor import cache_dir

            shutil.rmtree(cache_dir() / "finetune-ckpt" / self.key, ignore_errors=True)
            shutil.rmtree(self.ray_storage(), ignore_errors=True)


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# ---------------------------------------------------------------------------------------------
# The worker
# ---------------------------------------------------------------------------------------------


def _load_comm_op() -> tuple[float, bool]:
    """Load (JIT-building on first use) DeepSpeed's shared-memory comm op that
    `deepspeed.initialize` needs on CPU; (seconds, whether it was already built).
    Done before `initialize` only to time the build apart from the rest."""
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None:
        return 0.0, True
    import deepspeed.ops

    if not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return 0.0, True
    from torch.utils.cpp_extension import _get_build_directory

    so = Path(_get_build_directory(builder.NAME, False)) / f"{builder.NAME}.so"
    cached = so.exists()
    t0 = time.perf_counter()
    builder.load()
    return time.perf_counter() - t0, cached


def _master_fp32(engine, param: torch.Tensor) -> torch.Tensor:
    """The fp32 master value of a trainable parameter, whole (collective under ZeRO 1–3).

    With bf16, the module holds bf16 copies and the optimizer the fp32 masters: ZeRO 1–3
    expose them through `safe_get_full_fp32_param`; ZeRO-0's bf16 wrappers keep them beside
    their `fp16_groups`, per parameter (`fp32_groups`: FP16_UnfusedOptimizer, which torch's
    Adam gets) or flat per group (`fp32_groups_flat`: FP16_Optimizer)."""
    from deepspeed.utils import safe_get_full_fp32_param

    full = safe_get_full_fp32_param(param)
    opt = engine.optimizer
    if full is None and hasattr(opt, "fp16_groups"):
        if hasattr(opt, "fp32_groups"):
            for group, masters in zip(opt.fp16_groups, opt.fp32_groups, strict=True):
                for p, master in zip(group, masters, strict=True):
                    if p is param:
                        full = master
        elif hasattr(opt, "fp32_groups_flat"):
            for group, flat in zip(opt.fp16_groups, opt.fp32_groups_flat, strict=True):
                offset = 0
                for p in group:
                    if p is param:
                        full = flat[offset : offset + p.numel()].view_as(p)
                    offset += p.numel()
    return (param if full is None else full).detach().float().cpu().clone()


def finetune_worker(conf: dict[str, Any]) -> None:
    """Ray Train worker loop (one DeepSpeed engine per worker); see the module docstring.

    conf: {"cfg": RunConfig, "out": StageDir, "model": StageDir, "quantize": StageDir,
    "ckpt": _Checkpoints, "fail_after": int | None, "threads": int}.
    """
    import deepspeed
    import ray.train
    import torch.distributed as dist

    from pipeline.data import load_split
    from pipeline.evaluate import accuracy
    from pipeline.finetune.transform import QuantizedTrainable
    from pipeline.models import build
    from pipeline.progress import bar
    from pipeline.quantize.artifacts import QuantizedModel
    from pipeline.train.stage import load_masks, load_model_state

    cfg: RunConfig = conf["cfg"]
    ft = cfg.finetune
    ckpt: _Checkpoints = conf["ckpt"]
    tctx = ray.train.get_context()
    rank, world = tctx.get_world_rank(), tctx.get_world_size()
    torch.set_num_threads(max(1, int(conf["threads"])))
    t_start = time.perf_counter()

    op_seconds, op_cached = _load_comm_op()
    quantized = QuantizedModel.read(conf["quantize"])
    masks = load_masks(conf["model"])
    model = build(cfg.model.name)
    model.load_state_dict(load_model_state(conf["model"]))
    net = QuantizedTrainable(model, quantized, masks, grad=ft.grad,
                             train_unquantized=ft.train_unquantized)
    trainable = [p for p in net.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=net, model_parameters=trainable,
                                      config=deepspeed_config(ft, world))
    dtype = torch.bfloat16 if ft.bf16 else torch.float32
    start = ckpt.load(engine, rank)

    train = load_split(cfg.data.root, "train", cfg.data.train_samples, cfg.seed)
    n = len(train)
    steps, per_epoch = plan_steps(n, ft.batch_size, ft.epochs)
    log_every = max(1, min(50, steps // 10))
    history: list[dict[str, Any]] = []
    if rank == 0:
        print(f"finetune: {world} workers, ZeRO-{ft.zero_stage}, {steps} steps of "
              f"{ft.batch_size} ({ft.epochs} epochs of {n}), "
              + (f"resuming at step {start}" if start else "from the quantized model"),
              flush=True)
        pbar = bar(steps - start, "finetune", unit="step")
    t0 = time.perf_counter()
    running, pending = 0.0, 0
    engine.train()
    for step in range(start, steps):
        idx = global_batch(n, ft.batch_size, step, cfg.seed)[rank::world]
        x = train.x[idx].to(engine.device, dtype)
        y = train.y[idx].to(engine.device)
        loss = torch.nn.functional.cross_entropy(engine(x).float(), y)
        engine.backward(loss)
        engine.step()
        running = running + loss.detach()  # no host sync per step; read at log steps only
        pending += 1
        done = step + 1
        if done % log_every == 0 or done == steps:
            # Mean over workers and steps since the last line: one tiny all-reduce per log,
            # on the engine's device (NCCL reduces only GPU tensors).
            t = torch.tensor([float(running), pending], dtype=torch.float64, device=engine.device)
            dist.all_reduce(t)
            mean = float(t[0] / t[1])
            if rank == 0:
                history.append({"step": done, "loss": mean,
                                "seconds": round(time.perf_counter() - t0, 3)})
                print(f"finetune: step {done}/{steps} loss {mean:.4f} "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
                pbar.update(pending)
            running, pending = 0.0, 0
        if done % ft.checkpoint_every == 0 and done < steps:
            ckpt.save(engine, done, rank)
        if conf.get("fail_after") is not None and done == conf["fail_after"]:
            raise RuntimeError(f"{FAIL_ENV}={conf['fail_after']}: simulated failure after "
                               f"step {done}")
    train_seconds = time.perf_counter() - t0

    codebooks = {name: _master_fp32(engine, engine.module.codebooks[f"c{i}"])
                 for i, name in enumerate(engine.module.codebook_names)}
    if rank == 0:
        pbar.close()
        out: StageDir = conf["out"]
        out.write_safetensors(CODEBOOKS, codebooks)
        quantized.codebooks = codebooks
        dense = quantized.dense_state(load_model_state(conf["model"]), masks)
        fresh = build(cfg.model.name)
        fresh.load_state_dict(dense)
        acc = accuracy(fresh, load_split(cfg.data.root, "test"))
        out.write_json(SUMMARY, {
            "finetuned_accuracy": acc, "steps": steps, "resumed_from_step": start,
            "steps_per_epoch": per_epoch, "train_samples": n, "log_every": log_every,
            "history": history, "worker_seconds": round(time.perf_counter() - t_start, 3),
            "train_seconds": round(train_seconds, 3),
            "deepspeed_op_seconds": round(op_seconds, 3), "deepspeed_op_cached": op_cached,
        })
        print(f"finetune: done, test accuracy {acc:.4f}", flush=True)
    dist.barrier()


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


def _resources(workers: int) -> tuple[bool, float]:
    """(use GPUs, CPUs per worker): the cluster's CPUs split evenly, at most a node's worth;
    a fraction of a CPU each when there are more workers than CPUs (rather than waiting
    forever for CPUs that do not exist)."""
    import ray

    from pipeline.executor import ray_has_gpus

    total = float(ray.cluster_resources().get("CPU", 1))
    node = max((float(n.get("Resources", {}).get("CPU", 0)) for n in ray.nodes()
                if n.get("Alive")), default=total)
    per = total / workers if total < workers else max(1, min(total // workers, node))
    return ray_has_gpus(), per


def _run(ctx: StageContext) -> dict[str, Any]:
    from ray.train import FailureConfig, ScalingConfig
    from ray.train import RunConfig as TrainRunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg, ft = ctx.cfg, ctx.cfg.finetune
    deepspeed_config(ft, ft.workers)  # a batch the workers cannot split fails here, not in them
    ckpt = _Checkpoints(ctx.store, ctx.out.key)
    use_gpu, cpus = _resources(ft.workers)
    fail = os.environ.get(FAIL_ENV)
    conf = {"cfg": cfg, "out": ctx.out, "model": ctx.inputs[model_stage(cfg)],
            "quantize": ctx.inputs["quantize"], "ckpt": ckpt,
            "fail_after": int(fail) if fail else None, "threads": max(1, int(cpus))}
    resumed = ckpt.latest()
    if resumed:
        ctx.log.info("finetune: resuming from checkpoint %s", ctx.store.full_url(
            f"{ckpt.rel}/{resumed['tag']}"))
    trainer = TorchTrainer(
        finetune_worker,
        train_loop_config=conf,
        scaling_config=ScalingConfig(num_workers=ft.workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus}),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=TrainRunConfig(name=f"finetune-{ctx.out.key}",
                                  storage_path=ckpt.ray_storage(),
                                  failure_config=FailureConfig(max_failures=ft.max_failures)),
    )
    t0 = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - t0
    summary = ctx.out.read_json(SUMMARY)
    ckpt.remove()  # the stage is complete: nothing left to resume
    return {
        "finetuned_accuracy": summary["finetuned_accuracy"],
        "finetune": {
            "workers": ft.workers, "zero_stage": ft.zero_stage, "bf16": ft.bf16,
            "epochs": ft.epochs, "steps": summary["steps"],
            "resumed_from_step": summary["resumed_from_step"],
            "seconds": round(seconds, 3), "train_seconds": summary["train_seconds"],
            "deepspeed_op_build_seconds": summary["deepspeed_op_seconds"],
            "deepspeed_op_cached": summary["deepspeed_op_cached"],
            "final_loss": summary["history"][-1]["loss"] if summary["history"] else None,
        },
    }


def _sections(cfg: RunConfig) -> dict[str, Any]:
    ft = {k: v for k, v in cfg.finetune.model_dump(mode="json").items() if k not in _UNKEYED}
    return {"seed": cfg.seed, "data": cfg.data.model_dump(mode="json"), "finetune": ft}


FINETUNE = Stage(
    name="finetune",
    version=1,
    inputs=lambda cfg: (model_stage(cfg), "quantize"),
    sections=_sections,
    run=_run,
    enabled=lambda cfg: cfg.finetune.enabled and cfg.quantize.enabled,
    headline=("finetuned_accuracy",),
)
