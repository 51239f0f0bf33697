"""The `train` and `prune` stages: a baseline model, then pruning with retraining.

Pruning cuts by magnitude (Han et al.) or by Optimal Brain Damage saliency ½·h·w² (LeCun et
al.), per tensor or globally, in `prune.steps` geometric steps with masked retraining after
each. OBD needs the diagonal Hessian of the model *as it is at that step* (dense at step 1,
masked and retrained after), so the prune task estimates it itself with the Hessian stage's
estimator, calibration draw and settings; those settings (estimator, mode, draws, samples,
batch) are then part of the prune stage's key (a changed estimator re-prunes). The Hessian stage proper still runs after
pruning, on the pruned model the quantizers see.

train  → model.safetensors (fp32 weights), adam.safetensors (Adam's exp_avg_sq; metadata step,
         beta2 — for the `adam` Hessian estimator), history.json
prune  → model.safetensors (pruned, retrained), masks.safetensors (uint8 1 = kept),
         adam.safetensors, history.json
Each runs as one Ray task (training one small model is not worth splitting).

A model of your own (model.name=factory) is pruned the same way from its load stage, retrained
on its data's "train" split (`pipeline.train.user_model`); the prune folder then also holds
the load stage's model.json, so the later stages read it as they read a load stage.
"""

from __future__ import annotations

import time

import torch

from pipeline.config import RunConfig
from pipeline.config_checks import prune_method
from pipeline.executor import call, task_device, task_threads
from pipeline.graph import Stage, StageContext
from pipeline.store import StageDir

__all__ = ["TRAIN", "PRUNE", "load_model_state", "load_masks", "load_adam"]


def _checkpoint_digest(cfg: RunConfig) -> str | None:
    """sha256 of the given checkpoint, so a changed file is a new train key. The train task
    hashes the bytes it loads again and refuses others (a file swapped between planning and
    loading must not be cached under the first file's key)."""
    if not cfg.model.checkpoint:
        return None
    from pipeline.models import build, checkpoint_limit, read_checkpoint
    from pipeline.store import sha256_bytes

    data = read_checkpoint(cfg.model.checkpoint, cfg.store.storage_options(),
                           checkpoint_limit(build(cfg.model.name)))
    return sha256_bytes(data)


def _write_adam(out: StageDir, adam) -> None:
    out.write_safetensors(
        "adam.safetensors", dict(adam), metadata={"step": str(adam.step), "beta2": str(adam.beta2)}
    )


def _progress(tag: str, epochs: int, n_samples: int, batch_size: int, history: list):
    """Callbacks for train_adam: a batch-level bar plus one log line per epoch."""
    from pipeline.progress import bar

    t0 = time.perf_counter()
    per_epoch = -(-n_samples // batch_size)
    pbar = bar(epochs * per_epoch, tag, unit="batch")
    pending = [0]

    def on_batch() -> None:
        pending[0] += 1
        if pending[0] >= 20:  # a bar update is a message to the driver: batch them
            pbar.update(pending[0])
            pending[0] = 0

    def on_epoch(epoch: int, loss: float) -> None:
        pbar.update(pending[0])
        pending[0] = 0
        # No clock readings in an artifact: its bytes must depend on config and inputs only.
        history.append({"stage": tag, "epoch": epoch, "loss": loss})
        print(f"{tag}: epoch {epoch + 1}/{epochs} loss {loss:.4f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)

    return {"on_batch": on_batch, "on_epoch": on_epoch}, pbar


def _train_task(cfg: RunConfig, out: StageDir, expect_sha256: str | None = None) -> dict:
    from pipeline.data import load_split
    from pipeline.evaluate import accuracy
    from pipeline.models import (
        build,
        checkpoint_limit,
        num_params,
        read_checkpoint,
        state_from_safetensors,
    )
    from pipeline.store import sha256_bytes
    from pipeline.train import train_adam

    task_threads()
    torch.manual_seed(cfg.seed)
    model = build(cfg.model.name)
    test = load_split(cfg.data.root, "test")
    history: list = []
    if cfg.model.checkpoint:
        data = read_checkpoint(cfg.model.checkpoint, cfg.store.storage_options(),
                               checkpoint_limit(model))
        if expect_sha256 is not None and sha256_bytes(data) != expect_sha256:
            raise ValueError(f"model.checkpoint {cfg.model.checkpoint!r} changed while the run "
                             "was planned; rerun to use the new file")
        model.load_state_dict(state_from_safetensors(data, model, cfg.model.checkpoint))
    else:
        train = load_split(cfg.data.root, "train", cfg.data.train_samples, cfg.seed)
        t = cfg.train
        cbs, pbar = _progress("train", t.epochs, len(train), t.batch_size, history)
        model.to(task_device())  # the GPU Ray assigned (executor.gpus_per_task), else CPU
        adam = train_adam(model, train, epochs=t.epochs, batch_size=t.batch_size, lr=t.lr,
                          beta2=t.beta2, weight_decay=t.weight_decay, lr_decay=t.lr_decay,
                          seed=cfg.seed, **cbs)
        model.cpu()
        pbar.close()
        _write_adam(out, adam)
    acc = accuracy(model, test)
    out.write_safetensors("model.safetensors", model.state_dict(),
                          metadata={"model": cfg.model.name})
    out.write_json("history.json", history)
    return {"baseline_accuracy": acc, "params": num_params(model),
            "source": cfg.model.checkpoint or "trained"}


def _prune_task(cfg: RunConfig, out: StageDir, src: StageDir) -> dict:
    from pipeline.data import load_split
    from pipeline.evaluate import accuracy
    from pipeline.models import build
    from pipeline.train import (
        kept_fraction,
        magnitude_masks,
        obd_saliency,
        saliency_masks,
        train_adam,
    )

    task_threads()
    torch.manual_seed(cfg.seed)
    p = cfg.prune
    if not cfg.model.trained_here:  # a model of your own: its load stage, its data
        from pipeline.train.user_model import prune_inputs

        model, train, score = prune_inputs(cfg, src, out)
    else:
        model = build(cfg.model.name)
        model.load_state_dict(load_model_state(src))
        train = load_split(cfg.data.root, "train", cfg.data.train_samples, cfg.seed)
        test = load_split(cfg.data.root, "test")

        def score(m) -> dict:
            return {"pruned_accuracy": accuracy(m, test)}
    history: list = []
    masks: dict[str, torch.Tensor] = {}
    adam = None
    full_train = load_split(cfg.data.root, "train") if p.criterion == "obd" else None
    for step in range(1, p.steps + 1):
        # Geometric schedule: each step removes the same fraction of what is left.
        ratios = {k: r ** (step / p.steps) for k, r in p.keep.items()}
        tag = f"prune {step}/{p.steps}"
        if p.criterion == "obd":
            t0 = time.perf_counter()
            hdiag = obd_hessian(cfg, model, full_train, list(p.keep), step)
            scores = obd_saliency(model.state_dict(), hdiag, list(p.keep))
            masks = saliency_masks(scores, ratios, p.scope)
            print(f"{tag}: OBD saliency from a {cfg.hessian.estimator} Hessian "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
        else:
            masks = magnitude_masks(model.state_dict(), ratios, p.scope)
        cbs, pbar = _progress(tag, p.retrain_epochs, len(train), p.batch_size, history)
        model.to(task_device())
        adam = train_adam(model, train, epochs=p.retrain_epochs, batch_size=p.batch_size,
                          lr=p.lr, seed=cfg.seed + step, masks=masks, **cbs)
        model.cpu()
        pbar.close()
        print(f"{tag}: keep {kept_fraction(model, masks):.4f}, "
              + ", ".join(f"{k} {v:.4f}" for k, v in score(model).items()
                          if isinstance(v, float)), flush=True)
    scores = score(model)
    out.write_safetensors("model.safetensors", model.state_dict(),
                          metadata={"model": cfg.model.name})
    out.write_safetensors("masks.safetensors", {k: m.to(torch.uint8) for k, m in masks.items()})
    if adam is not None and p.retrain_epochs > 0:
        _write_adam(out, adam)
    out.write_json("history.json", history)
    per_layer = {k: float(m.float().mean()) for k, m in masks.items()}
    return {**scores, "kept_fraction": kept_fraction(model, masks),
            "keep": per_layer, "criterion": p.criterion, "scope": p.scope}


def obd_hessian(cfg: RunConfig, model, train, names: list[str], step: int) -> dict:
    """The diagonal Hessian of the model as it is now, for OBD: hessian.estimator over the
    Hessian stage's calibration samples (the same draw, batches and settings), {name: mean}.
    Step s draws its Monte-Carlo labels from its own seed."""
    from pipeline.data import calibration_indices
    from pipeline.hessian.estimators import estimate_diag

    h = cfg.hessian
    idx = calibration_indices(cfg, len(train))
    device = task_device()
    model.to(device).eval()
    batches = ((train.x[sel], train.y[sel]) for sel in idx.split(h.batch_size))
    sums = estimate_diag(model, batches, h.estimator, params=names, mode=h.mode,
                         n_samples=h.n_samples, seed=cfg.seed * 1_000_003 + 7_777 * step)
    model.cpu()
    return {n: (v / max(sums.n, 1)).float() for n, v in sums.sums.items()}


def load_model_state(sd: StageDir) -> dict[str, torch.Tensor]:
    """The dense fp32 state dict a model stage (train/prune) wrote."""
    return sd.read_safetensors("model.safetensors")


def load_masks(sd: StageDir | None) -> dict[str, torch.Tensor]:
    """{name: bool mask} from a prune stage; {} for an unpruned model."""
    if sd is None or sd.name != "prune":
        return {}
    return {k: v.bool() for k, v in sd.read_safetensors("masks.safetensors").items()}


def load_adam(sd: StageDir) -> tuple[dict[str, torch.Tensor], int, float]:
    """(exp_avg_sq by name, step, beta2) of the model stage; a clear error if it has none."""
    if sd.outputs is not None and "adam.safetensors" not in sd.outputs:
        raise ValueError(
            f"stage {sd.name} has no Adam state (the model was loaded from a checkpoint, or "
            "pruned without retraining): the `adam` Hessian estimator needs it; use "
            "hessian.estimator=ggn or fisher"
        )
    meta = sd.read_safetensors_metadata("adam.safetensors")
    return sd.read_safetensors("adam.safetensors"), int(meta["step"]), float(meta["beta2"])


def _run_train(ctx: StageContext) -> dict:
    return call(_train_task, ctx.cfg, ctx.out, ctx.sections.get("checkpoint_sha256"),
                cpus="worker", gpus="task")


def _run_prune(ctx: StageContext) -> dict:
    src = ctx.inputs["train" if ctx.cfg.model.trained_here else "load"]
    return call(_prune_task, ctx.cfg, ctx.out, src, cpus="worker", gpus="task")


def _train_sections(cfg: RunConfig) -> dict:
    return {
        "seed": cfg.seed,
        "model": cfg.model.model_dump(mode="json"),
        "checkpoint_sha256": _checkpoint_digest(cfg),
        "data": cfg.data.model_dump(mode="json"),
        "train": None if cfg.model.checkpoint else cfg.train.model_dump(mode="json"),
    }


def _prune_sections(cfg: RunConfig) -> dict:
    p = cfg.prune.model_dump(mode="json")
    # The defaults (magnitude, per layer) hash as before they were settings: stores made
    # earlier keep their cache hits.
    for k, default in (("criterion", "magnitude"), ("scope", "layer"), ("method", "auto"),
                       ("method", "retrain"), ("n_m", None)):
        if k in p and p[k] == default:
            del p[k]
    out = {"seed": cfg.seed, "prune": p}
    if cfg.prune.criterion == "obd":
        # What decides the OBD saliencies: the estimator and its calibration (not whether
        # the Hessian stage runs, nor how it shards and stores its table).
        h = cfg.hessian.model_dump(mode="json")
        out["hessian"] = {k: h[k] for k in OBD_HESSIAN_KEYS}
    return out


OBD_HESSIAN_KEYS = ("estimator", "mode", "n_samples", "calibration_samples", "batch_size")


TRAIN = Stage(
    name="train",
    version=2,  # 2: history.json holds no timings (artifacts are deterministic)
    inputs=lambda cfg: (),
    sections=_train_sections,
    run=_run_train,
    enabled=lambda cfg: cfg.model.trained_here,
    headline=("baseline_accuracy",),
    outputs=lambda cfg: ("model.safetensors", "history.json"),
)

PRUNE = Stage(
    name="prune",
    version=2,  # 2: history.json holds no timings
    inputs=lambda cfg: ("train",) if cfg.model.trained_here else ("load",),
    sections=_prune_sections,
    run=_run_prune,
    # one-shot pruning (a causal LM) happens inside the quantize stage
    enabled=lambda cfg: cfg.prune.enabled and prune_method(cfg) == "retrain",
    headline=("pruned_accuracy", "kept_fraction"),
    outputs=lambda cfg: ("model.safetensors", "masks.safetensors", "history.json"),
)


def model_stage(cfg: RunConfig) -> str:
    """The stage whose model the later stages start from: prune if enabled, else train (a
    model hwq trains) or load (any other model)."""
    if cfg.prune.enabled and prune_method(cfg) == "retrain":
        return "prune"
    return "train" if cfg.model.trained_here else "load"
