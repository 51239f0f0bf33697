"""The `finetune` stage: train only the shared values, data parallel, DeepSpeed inside Ray Train.

Inputs: the model stage (dense state + masks) and `quantize` (codebooks, indices).
Outputs (stage folder):

- `codebooks.safetensors` — the fine-tuned codebooks, same names, shapes and dtype (float32)
  as the quantize artifact's; read them with `QuantizedModel.read(quantize_dir,
  codebooks_from=finetune_dir)`.
- `finetune.json` — steps, steps per epoch, training samples and the fine-tuned test
  accuracy: only what the config and inputs decide, so a resumed run writes the same bytes.
  The loss log (mean over workers every `log_every` steps), the step a resumed run started
  from and the timings are the stage's metrics (manifest and report), carried from worker 0
  through `attempt.json` beside the checkpoints.

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
worker 0 writes `latest.json` ({"tag", "step", "files": the sha256 and size of every file of the
tag}) atomically and removes older tags, so a kill during a save leaves the previous checkpoint
in force. On start, if `latest.json` exists the workers check it and load that tag (see
`pipeline.finetune.checkpoint`: nothing from the store is unpickled except weights-only, and a
checkpoint that fails a check is ignored with a warning: the fine-tune starts from step 0), and
continue from its step. Data order is a function of the step and the optimizer state is
restored, so a resumed fine-tune computes the same steps as an uninterrupted one. Ray Train
restarts a failed worker group (a killed worker, a lost node) up to `finetune.max_failures`
times (default 3) itself; each restart resumes the same way.

Where checkpoints live, and why: `<store root>/checkpoints/finetune-<key>/`, outside the stage
folder, because the driver deletes an incomplete stage's folder before rerunning it (and
every file in the stage folder would be hashed into its manifest). Keyed by the stage key, a
checkpoint can only be resumed by the same inputs and settings (worker count and ZeRO stage
included: ZeRO-1/2 optimizer partitions are per rank). On a local store DeepSpeed writes there
directly; on a remote store (s3://) each worker saves under its node's `cache_dir()` and uploads
what it wrote with the store; a resuming worker downloads the tag's listed files first. Ray
Train's own storage (`RunConfig.storage_path`) is `<that folder>/ray_train` on a local store,
else `cache_dir()/ray_train/finetune-<key>`, never ~/ray_results; it is emptied before each fit
(hwq never resumes from Ray Train's run state). Both are deleted once the stage completes.

ZeRO stages. 0, 1 and 2 work with fp32 and bf16 on CPU (bf16: the codebooks written are the
optimizer's fp32 masters, see `_master_fp32`); the tests run ZeRO-0 (1 worker fp32, 2 workers
bf16) and ZeRO-2 (2 workers: over a planted checkpoint, which is ignored; one worker killed
and the group restarted; interrupted and resumed by the next run; all three the same bits).
Stage 3 also ran (2 CPU workers, LeNet-5, same centres as stage 0): a network-scope
codebook is far below `stage3_param_persistence_threshold`, so ZeRO-3 keeps it whole on every
rank. With the thresholds at 0 (codebook partitioned) one engine still trained, because
DeepSpeed gathers a partitioned parameter when it is read from a module outside that module's
own forward (here the `codebooks` ParameterDict) and registers it as an external parameter.
Stage 3 is not covered by the tests; its checkpoints are per-rank parameter partitions, so a
resume needs the same worker count (which the stage key guarantees).

Hooks: after each step (and its checkpoint) every worker fires the `pipeline.hooks` event
`finetune.step`; the resume tests crash or kill a worker there. The driver reads HWQ_HOOK and
passes it to the workers in their config.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from pipeline import hooks
from pipeline.config import FinetuneConfig, RunConfig
from pipeline.config_checks import finetune_mode, per_tensor
from pipeline.errors import UserError
from pipeline.finetune.checkpoint import Checkpoints
from pipeline.graph import Stage, StageContext
from pipeline.store import StageDir
from pipeline.train.stage import model_stage

__all__ = [
    "FINETUNE",
    "deepspeed_config",
    "plan_steps",
    "global_batch",
    "finetune_worker",
    "recording_user_errors",
    "data_source",
]

CODEBOOKS = "codebooks.safetensors"
SUMMARY = "finetune.json"
FACTS = "attempt.json"  # beside the checkpoints: this attempt's resume point and timings
# In the stage folder: a user error a worker met, raised by the driver after fit() (the
# folder is emptied before every attempt of the stage, so it never outlives its run).
USER_ERROR = "user_error"  # user_error-<rank>.json
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


def plan_steps(n_train: int, batch_size: int, epochs: float,
               source: str = "data.train_samples") -> tuple[int, int]:
    """(total steps, full batches per epoch) for `epochs` (fractional allowed) over n_train.
    source: the setting that decides n_train, named in the error (`data_source`)."""
    per_epoch = n_train // batch_size
    if per_epoch < 1:
        raise FinetuneUserError(f"finetune.batch_size={batch_size} is larger than the training "
                                f"set ({n_train} samples; {source})")
    return max(1, round(epochs * per_epoch)), per_epoch


def data_source(cfg: RunConfig) -> str:
    """The setting that decides how many samples a fine-tune draws its batches from."""
    if cfg.data.name == "text":
        return "data.calibration_windows"
    if cfg.data.name == "custom":
        return "the calibration batches of data.factory"
    if not cfg.model.trained_here:  # a loaded model: the Hessian's calibration images
        return "hessian.calibration_samples, at most data.train_samples"
    return "data.train_samples"


class FinetuneUserError(UserError, ValueError):
    """A mistake in the config or data that fine-tuning found (caught in the workers and
    raised once by the driver, never retried by Ray Train)."""


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
    "ckpt": Checkpoints, "hook": str | None (pipeline.hooks), "threads": int}.

    A mistake for the user to fix (`is_users`: a UserError, such as what the user's own loss,
    metric, factory or data function raised, see `pipeline.user_code`; a ValueError) does not
    fail the worker: Ray Train would restart the group `max_failures` times, meet it again
    each time and end with a traceback. The worker writes it to USER_ERROR and returns; the
    driver raises it, once. No worker may then be left waiting in a collective for one that
    returned: a mistake met before training (config, data, model) is met by every worker at
    the same point (they read the same files); one met in a step (the user's loss on this
    worker's shard of the batch) is held until the next all-reduce every worker makes anyway
    (`_in_step`), and rank 0's own evaluation shares its outcome the same way
    (`_rank0_then_barrier`). A killed worker or a bug still fails the worker: Ray Train
    restarts the group as before.
    """
    import ray.train

    recording_user_errors(_worker, conf, lambda: ray.train.get_context().get_world_rank())


class _PeerFailed(Exception):
    """This worker stops because another one met a user error (which that one records)."""


def recording_user_errors(body: Any, conf: dict[str, Any], rank: Any) -> None:
    """body(conf); a user's mistake it raises (`is_users`) is written to conf["out"] as
    `user_error-<rank()>.json` instead of failing the worker (see finetune_worker)."""
    import traceback

    from pipeline.error_lines import is_users, unwrap

    try:
        body(conf)
    except _PeerFailed:
        return
    except Exception as e:
        if isinstance(e, _Unheld) or not is_users(e):
            raise
        shown = unwrap(e)
        out: StageDir = conf["out"]
        out.write_json(f"{USER_ERROR}-{rank()}.json", {
            "error": str(shown), "type": type(shown).__name__,
            # For `hwq -v` (the driver logs it at debug level): where in the code it began.
            "traceback": "".join(traceback.format_exception(e))[-20000:]})


def _worker(conf: dict[str, Any]) -> None:
    import deepspeed
    import ray.train
    import torch.distributed as dist

    from pipeline.placement import note

    note("finetune_worker")
    from pipeline.data import load_split
    from pipeline.error_lines import is_users
    from pipeline.evaluate import accuracy
    from pipeline.finetune.transform import QuantizedTrainable
    from pipeline.models import build
    from pipeline.progress import bar
    from pipeline.quantize.artifacts import QuantizedModel
    from pipeline.train.stage import load_masks, load_model_state

    cfg: RunConfig = conf["cfg"]
    ft = cfg.finetune
    ckpt: Checkpoints = conf["ckpt"]
    tctx = ray.train.get_context()
    rank, world = tctx.get_world_rank(), tctx.get_world_size()
    torch.set_num_threads(max(1, int(conf["threads"])))
    t_start = time.perf_counter()

    op_seconds, op_cached = _load_comm_op()
    quantized = QuantizedModel.read(conf["quantize"])
    if conf.get("blockwise"):  # finetune.mode: both: from the block-wise phase's codebooks
        from pipeline.quantize.codes import tuned_codebooks

        shapes = {n: (int(i.shape[0]), int(i[0].numel()) if i.shape[0] else 0)
                  for n, i in quantized.indices.items()}
        for n, cb in tuned_codebooks(conf["out"], shapes).items():
            quantized.codebooks[quantized.assignment[n]] = torch.from_numpy(cb)
    generic = not cfg.model.trained_here
    if generic:  # a loaded model: its adapter's loss on the calibration data
        from pipeline.workload import Workload

        wl = Workload(cfg)
        masks = load_masks(conf["model"])  # a model of your own, pruned: {} otherwise
        model = wl.model_from(conf["model"])
        data = _as_dataset(wl.calibration(conf["model"]))
        loss_fn = wl.adapter.loss
    else:
        masks = load_masks(conf["model"])
        model = build(cfg.model.name)
        model.load_state_dict(load_model_state(conf["model"]))
    masks = quantized.all_masks(masks)  # and those one-shot pruning chose when quantizing
    net = QuantizedTrainable(model, quantized, masks, grad=ft.grad,
                             train_unquantized=ft.train_unquantized)
    trainable = [p for p in net.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=net, model_parameters=trainable,
                                      config=deepspeed_config(ft, world))
    dtype = torch.bfloat16 if ft.bf16 else torch.float32

    if generic:
        n = _dataset_len(data)
    else:
        train = load_split(cfg.data.root, "train", cfg.data.train_samples, cfg.seed)
        n = len(train)
    steps, per_epoch = plan_steps(n, ft.batch_size, ft.epochs, data_source(cfg))
    start = ckpt.load(engine, rank, before=steps)
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

    def forward(idx: torch.Tensor) -> torch.Tensor:  # the loss of this worker's samples idx
        if generic:
            return engine(_take(data, idx, engine.device, dtype), loss_fn=loss_fn).float()
        x = train.x[idx].to(engine.device, dtype)
        y = train.y[idx].to(engine.device)
        return torch.nn.functional.cross_entropy(engine(x).float(), y)

    failed: BaseException | None = None  # a user error of this worker, held (finetune_worker)
    for step in range(start, steps):
        idx = global_batch(n, ft.batch_size, step, cfg.seed)[rank::world]
        loss, failed = _in_step(forward, idx, failed, trainable, world, ft.zero_stage)
        engine.backward(loss)
        engine.step()
        running = running + loss.detach()  # no host sync per step; read at log steps only
        pending += 1
        done = step + 1
        logs = done % log_every == 0 or done == steps
        saves = done % ft.checkpoint_every == 0 and done < steps
        if logs or saves:
            # Mean over workers and steps since the last line, and whether any worker met a
            # user error: one tiny all-reduce per log (and before a checkpoint, which must
            # not hold a failed step), on the engine's device (NCCL reduces only GPU tensors).
            t = torch.tensor([float(running), pending, float(failed is not None)],
                             dtype=torch.float64, device=engine.device)
            dist.all_reduce(t)
            if t[2] > 0:
                raise failed if failed is not None else _PeerFailed()
        if logs:
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
        hooks.fire(conf.get("hook"), "finetune.step", step=done, rank=rank)
    train_seconds = time.perf_counter() - t0

    codebooks = {name: _master_fp32(engine, engine.module.codebooks[f"c{i}"])
                 for i, name in enumerate(engine.module.codebook_names)}

    def finish() -> None:  # rank 0: write the codebooks, score the fine-tuned model
        nonlocal codebooks
        pbar.close()
        out: StageDir = conf["out"]
        if generic:
            # .hwq stores per-channel codebooks in fp16: keep exactly what the file will hold.
            codebooks = {k: v.half().float() for k, v in codebooks.items()}
        out.write_safetensors(CODEBOOKS, codebooks)
        quantized.codebooks = codebooks
        if generic:
            ev = wl.evaluate_quantized(conf["model"], quantized, masks)
            scores = wl.metric_fields("finetuned", ev)
            acc = ev["value"]
        else:
            dense = quantized.dense_state(load_model_state(conf["model"]), masks)
            fresh = build(cfg.model.name)
            fresh.load_state_dict(dense)
            acc = accuracy(fresh, load_split(cfg.data.root, "test"))
            scores = {"finetuned_accuracy": acc}
        # The artifact holds what the config and inputs decide; how this attempt went
        # (resume point, loss log since then, timings) goes beside the checkpoints and from
        # there into the manifest's metrics, so a resumed run writes the same bytes.
        out.write_json(SUMMARY, {
            **scores, "steps": steps, "steps_per_epoch": per_epoch,
            "train_samples": n,
        })
        ckpt.store.write_json(f"{ckpt.rel}/{FACTS}", {
            "resumed_from_step": start, "log_every": log_every, "history": history,
            "worker_seconds": round(time.perf_counter() - t_start, 3),
            "train_seconds": round(train_seconds, 3),
            "deepspeed_op_seconds": round(op_seconds, 3), "deepspeed_op_cached": op_cached,
        })
        print(f"finetune: done, {next(iter(scores))} {acc:.4f}", flush=True)

    failure = None
    if rank == 0:
        try:
            finish()
        except Exception as e:  # e.g. a metric of the user's that fails on this model
            if not is_users(e):
                raise
            failure = e
    # The barrier before the workers part, carrying whether rank 0 failed: every rank
    # returns normally either way (see finetune_worker), none waits for a rank that left.
    flag = torch.tensor([0.0 if failure is None else 1.0], device=engine.device)
    dist.all_reduce(flag)
    if failure is not None:
        raise failure
    from pipeline.placement import note_memory

    note_memory("finetune_worker")


def _in_step(forward: Any, idx: torch.Tensor, failed: BaseException | None,
             trainable: list[torch.Tensor], world: int, zero_stage: int
             ) -> tuple[torch.Tensor, BaseException | None]:
    """(forward(idx): the loss of this step, the user error held so far). With several workers,
    a user error in this worker's forward (the user's loss or model on its shard) is held, not
    raised: the worker goes on with a zero loss through the same gradient collectives as its
    peers until the next all-reduce, where every worker learns of it and stops
    (finetune_worker). One worker raises at once. Under ZeRO-3 the forward itself gathers
    parameters (collectives a worker that skips it would not join): the error fails this
    worker (`_Unheld`), Ray Train stops the group and restarts it as for any failure, and the
    driver shows the user's error inside as one line."""
    if failed is None:
        from pipeline.error_lines import is_users

        try:
            return forward(idx), None
        except Exception as e:
            if not is_users(e) or world == 1:
                raise
            if zero_stage >= 3:
                raise _Unheld(e) from e
            failed = e
    # Zero gradients for every trainable parameter: DeepSpeed reduces them as usual.
    return sum((p.sum() * 0.0).float() for p in trainable), failed


class _Unheld(RuntimeError):
    """A user error that must fail its worker (not be recorded): see `_in_step`. Carries the
    error as `user_error`, which `pipeline.error_lines.unwrap` shows."""

    def __init__(self, user_error: BaseException):
        super().__init__(str(user_error))
        self.user_error = user_error

    def __reduce__(self):
        return (type(self), (self.user_error,))


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


def _as_dataset(data: Any) -> Any:
    """Calibration data as one indexable dataset: a tensor of samples (token windows), or a
    tuple of tensors (a list of (x, y) batches concatenated)."""
    if isinstance(data, torch.Tensor):
        return data
    batches = list(data)
    if batches and all(isinstance(b, torch.Tensor) for b in batches):
        return torch.cat(batches)
    if batches and all(isinstance(b, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in b)
                       for b in batches):
        return tuple(torch.cat(parts) for parts in zip(*batches, strict=True))
    raise FinetuneUserError("fine-tuning needs calibration batches that are tensors or tuples "
                            "of tensors (concatenated along dimension 0); check data.factory")


def _dataset_len(data: Any) -> int:
    return len(data) if isinstance(data, torch.Tensor) else len(data[0])


def _take(data: Any, idx: torch.Tensor, device: Any, dtype: torch.dtype) -> Any:
    def one(t: torch.Tensor) -> torch.Tensor:
        t = t[idx].to(device)
        return t.to(dtype) if t.is_floating_point() else t

    return one(data) if isinstance(data, torch.Tensor) else tuple(one(t) for t in data)


def _resources(workers: int) -> tuple[float, float]:
    """(GPUs per worker, CPUs per worker).

    GPUs: executor.gpus_per_task, else one each if the cluster shows a GPU now.
    CPUs: executor.cpus_per_worker, else the cluster's CPUs split evenly, at most the smallest
    live node's worth (a worker must fit on any node: asking for the largest node's count
    strands it when the GPU nodes are smaller); a fraction of a CPU each when there are more
    workers than CPUs (rather than waiting forever for CPUs that do not exist)."""
    import ray

    from pipeline.executor import _RESOURCES, task_gpus

    gpus = task_gpus()
    if _RESOURCES.cpus_per_worker is not None:
        return gpus, float(_RESOURCES.cpus_per_worker)
    total = float(ray.cluster_resources().get("CPU", 1))
    node = min((float(n.get("Resources", {}).get("CPU", 0)) for n in ray.nodes()
                if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0), default=total)
    per = total / workers if total < workers else max(1, min(total // workers, node))
    return gpus, per


def _run(ctx: StageContext) -> dict[str, Any]:
    if per_tensor(ctx.cfg):  # block-wise: a Ray task per decoder block, either residency
        from pipeline.finetune.blocks_stage import run_finetune_blockwise

        return run_finetune_blockwise(ctx)
    if finetune_mode(ctx.cfg) == "both":  # block-wise first, then end to end from there
        from pipeline.finetune.blocks_stage import run_finetune_blockwise
        from pipeline.quantize.codes import ModelCodes

        bw = run_finetune_blockwise(ctx, ModelCodes(ctx.inputs["quantize"], ctx.inputs["load"]))
        e2e = _run_end_to_end(ctx, blockwise=True)
        e2e["finetune"] = {**e2e["finetune"], "mode": "both", "blockwise": bw["finetune"]}
        if "finetuned_validation_perplexity" in bw:
            e2e["blockwise_validation_perplexity"] = bw["finetuned_validation_perplexity"]
        return e2e
    return _run_end_to_end(ctx)


def _run_end_to_end(ctx: StageContext, blockwise: bool = False) -> dict[str, Any]:
    """DeepSpeed inside Ray Train; blockwise: start from the codebooks the block-wise phase
    of this stage wrote (finetune.mode: both)."""
    from ray.train import FailureConfig, ScalingConfig
    from ray.train import RunConfig as TrainRunConfig
    from ray.train.torch import TorchConfig

    cfg, ft = ctx.cfg, ctx.cfg.finetune
    deepspeed_config(ft, ft.workers)  # a batch the workers cannot split fails here, not in them
    ckpt = Checkpoints(ctx.store, ctx.out.key)
    gpus, cpus = _resources(ft.workers)
    use_gpu = gpus > 0
    conf = {"cfg": cfg, "out": ctx.out, "model": ctx.inputs[model_stage(cfg)],
            "quantize": ctx.inputs["quantize"], "ckpt": ckpt, "hook": hooks.from_env(),
            "blockwise": blockwise,
            "threads": max(1, int(cpus))}
    ckpt.clear_ray_storage()
    # What the workers will find (they check again, and unpickle weights-only, themselves).
    resumed, why = ckpt.inspect()
    if resumed:
        ctx.log.info("finetune: resuming from checkpoint %s", ctx.store.full_url(
            f"{ckpt.rel}/{resumed['tag']}"))
    elif why:
        ctx.log.warning("finetune: ignoring the checkpoint in %s (%s); fine-tuning from step 0",
                        ctx.store.full_url(ckpt.rel), why)
    trainer = _trainer_class()(
        finetune_worker,
        train_loop_config=conf,
        scaling_config=ScalingConfig(num_workers=ft.workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus,
                                                           **({"GPU": gpus} if use_gpu else {})}),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=TrainRunConfig(name=f"finetune-{ctx.out.key}",
                                  storage_path=ckpt.ray_storage(),
                                  failure_config=FailureConfig(max_failures=ft.max_failures)),
    )
    t0 = time.perf_counter()
    try:
        trainer.fit()
    except Exception:
        _raise_user_error(ctx.out)  # what a worker recorded explains the failure best
        raise
    _raise_user_error(ctx.out)
    seconds = time.perf_counter() - t0
    summary = ctx.out.read_json(SUMMARY)
    facts = ckpt.store.read_json(f"{ckpt.rel}/{FACTS}")  # written by worker 0 just now
    ckpt.remove()  # the stage is complete: nothing left to resume
    return {
        **{k: v for k, v in summary.items() if k.startswith("finetuned_")},
        "finetune": {
            "workers": ft.workers, "zero_stage": ft.zero_stage, "bf16": ft.bf16,
            "epochs": ft.epochs, "steps": summary["steps"],
            "resumed_from_step": facts["resumed_from_step"],
            "seconds": round(seconds, 3), "train_seconds": facts["train_seconds"],
            "deepspeed_op_build_seconds": facts["deepspeed_op_seconds"],
            "deepspeed_op_cached": facts["deepspeed_op_cached"],
            "final_loss": facts["history"][-1]["loss"] if facts["history"] else None,
            "log_every": facts["log_every"], "history": facts["history"],
        },
    }


def _trainer_class():
    """Ray Train's TorchTrainer without its PlacementGroupCleaner.

    That detached actor asks Ray's state API every second whether the Train controller still
    lives, through an address it finds for itself: with another Ray instance on the machine
    it finds several and its thread dies with a ConnectionError traceback on every fine-tune;
    with a `ray start` cluster's address in /tmp/ray it asks that cluster, which does not know
    our controller, and would remove the placement group of a live fine-tune. The controller
    removes its placement group itself when it finishes (the tidy shutdown), and one it leaves
    behind by dying goes with this driver's job; hwq needs no cleaner. (Ray Train v1 has no
    such callback: the override is then never called.)"""
    from ray.train.torch import TorchTrainer

    class HwqTorchTrainer(TorchTrainer):
        def _create_default_callbacks(self):
            return [c for c in super()._create_default_callbacks()
                    if type(c).__name__ != "PlacementGroupCleanerCallback"]

    return HwqTorchTrainer


def _raise_user_error(out: StageDir) -> None:
    """Raise the user error a worker recorded (finetune_worker), if any, as one error."""
    import logging

    for name in sorted(f for f in out.files() if f.startswith(USER_ERROR + "-")):
        rec = out.read_json(name)
        msg = rec.get("error") if isinstance(rec, dict) else None
        if isinstance(rec, dict) and isinstance(rec.get("traceback"), str):
            logging.getLogger(__name__).debug("finetune: %s: the worker's traceback:\n%s",
                                              name, rec["traceback"])
        raise FinetuneUserError(f"finetune: {msg}" if isinstance(msg, str) else
                                f"finetune: a worker failed on the config or data ({name})")


def _sections(cfg: RunConfig) -> dict[str, Any]:
    ft = {k: v for k, v in cfg.finetune.model_dump(mode="json").items() if k not in _UNKEYED}
    return {"seed": cfg.seed, "data": cfg.data.model_dump(mode="json"), "finetune": ft}


FINETUNE = Stage(
    name="finetune",
    version=2,  # 2: finetune.json holds no timings, resume point or loss log (metrics do)
    inputs=lambda cfg: (model_stage(cfg), "quantize"),
    sections=_sections,
    run=_run,
    enabled=lambda cfg: cfg.finetune.enabled and cfg.quantize.enabled,
    headline=("finetuned_accuracy", "finetuned_perplexity"),
    outputs=lambda cfg: ("codebooks.json",) if per_tensor(cfg) else (CODEBOOKS, SUMMARY) + (
        ("codebooks.json",) if finetune_mode(cfg) == "both" else ()),
)
