"""The `quantize` stage: one codebook for the network (or per layer / per output channel).

Network scope — the paper's default — is one 1-D problem over every kept weight of every
quantized tensor, concatenated in model order. Ray actors (`quantize.actors`) each own a
block-aligned shard of (w, h) that they read from the store themselves (`StoreShardLoader`:
the model's tensors, the masks, and only the Hessian rows of the tensors their range touches);
per Lloyd iteration the driver sends centres and gets per-block sufficient statistics back
(`pipeline.quantize.sharded.RayBackend`). The statistics block size depends only on N, so the
result is the same bits whatever the number of actors.
Layer scope solves each tensor as its own Ray task; channel scope gives row ranges of each
tensor to Ray tasks (`solve_channels_sharded`).

Faults: the actors are restartable (a killed one re-reads its shard and the lost calls are
retried, see `pipeline.quantize.sharded`), and the tasks are retried when their worker dies
(`max_retries`); every task reads its inputs from the store and computes a pure function of
them, so a run with a killed actor or task writes the same bits as an undisturbed one.

Outputs: the quantized-model artifact (`pipeline.quantize.artifacts`) and `layers.json`
(per-tensor weighted and unweighted distortion, index entropy).
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from pipeline.config import RunConfig
from pipeline.config_checks import one_shot, per_tensor
from pipeline.executor import call, remote, task_cpus, task_threads
from pipeline.graph import Stage, StageContext
from pipeline.quantize.artifacts import QuantizedModel
from pipeline.store import StageDir

__all__ = ["QUANTIZE", "StoreShardLoader", "quantized_tensor_names", "stats_block"]

# Ray's default for tasks, stated: retry a task whose worker process died (an exception raised
# by the task itself is not retried). Safe: every task here is a pure function of the store.
_TASK_RETRIES = 3


def quantized_tensor_names(cfg: RunConfig, state: dict[str, torch.Tensor]) -> list[str]:
    """Weights (≥ 2-D) in model order, plus biases when quantize.quantize_biases."""
    return [n for n, t in state.items() if t.dim() >= 2 or cfg.quantize.quantize_biases]


def _tensor_names(cfg: RunConfig, src: StageDir, state: dict[str, torch.Tensor]) -> list[str]:
    """The tensors to quantize: a trained model's weights (`quantized_tensor_names`), a loaded
    model's targets as its load stage listed them (in model order)."""
    if cfg.model.trained_here:
        return quantized_tensor_names(cfg, state)
    from pipeline.workload import MODEL_JSON

    targets = set(src.read_json(MODEL_JSON)["quantizable"])
    return [n for n in state if n in targets]


def stats_block(n: int) -> int:
    """Statistics block size: a function of N alone (so any actor count gives the same bits),
    small enough that a small network still spreads over several actors."""
    return int(min(1 << 20, max(1 << 12, 2 ** math.ceil(math.log2(max(n, 1) / 64)))))


def _flat_masks(names, state, masks) -> dict[str, np.ndarray]:
    return {n: (masks[n].reshape(-1).numpy() if n in masks
                else np.ones(state[n].numel(), dtype=bool)) for n in names}


def _floor(h: np.ndarray, rel: float) -> np.ndarray:
    """Weights whose Hessian is exactly zero (units dead on every calibration sample) get a
    tiny floor relative to the mean, so they still pull their centre a little."""
    if h.size == 0 or rel <= 0:
        return h
    m = float(h.mean(dtype=np.float64))
    return np.maximum(h, np.float32(rel * m)) if m > 0 else h


class StoreShardLoader:
    """Loads global kept-weight range [start, stop) of the network-scope concatenation.

    Picklable; runs inside a Ray actor, which reads the model, masks and the needed Hessian
    rows from the store itself (the driver ships no weights).
    """

    def __init__(self, cfg: RunConfig, src: StageDir, prune: StageDir | None,
                 hess: StageDir | None, names: list[str], start: int, stop: int):
        self.cfg, self.src, self.prune, self.hess = cfg, src, prune, hess
        self.names, self.start, self.stop = names, start, stop

    def __call__(self) -> tuple[np.ndarray, np.ndarray | None]:
        from pipeline.hessian.stage import read_hessian
        from pipeline.train.stage import load_masks, load_model_state

        state = load_model_state(self.src)
        flat = _flat_masks(self.names, state, load_masks(self.prune))
        counts = np.array([int(flat[n].sum()) for n in self.names], dtype=np.int64)
        ends = np.cumsum(counts)
        begins = ends - counts
        touched = [i for i in range(len(self.names))
                   if begins[i] < self.stop and ends[i] > self.start]
        shapes = {self.names[i]: tuple(state[self.names[i]].shape) for i in touched}
        h_all = (read_hessian(self.hess, shapes, names=list(shapes))
                 if self.hess is not None else None)
        ws, hs = [], []
        for i in touched:
            n = self.names[i]
            a = max(self.start, int(begins[i])) - int(begins[i])
            b = min(self.stop, int(ends[i])) - int(begins[i])
            m = flat[n]
            ws.append(state[n].reshape(-1).float().numpy()[m][a:b].astype(np.float32))
            if h_all is not None:
                hs.append(h_all[n].reshape(-1)[m][a:b].astype(np.float32))
        w = np.concatenate(ws) if ws else np.zeros(0, np.float32)
        h = None
        if h_all is not None:
            h = np.concatenate(hs) if hs else np.zeros(0, np.float32)
            h = _floor(h, self.cfg.quantize.hessian_floor)
        return w, h


def _solve_1d(cfg: RunConfig, data, k: int | None, name: str | None):
    """Run the configured method on a backend (or arrays (w, h)); returns a QuantResult."""
    from pipeline.quantize.entropy_constrained import ecsq
    from pipeline.quantize.scalar import hw_kmeans, kmeans, uniform

    q = cfg.quantize
    w, h = (data if isinstance(data, tuple) else (data, None))
    common = {"name": name}
    if q.method == "kmeans":
        return kmeans(w, k, h=h, n_init=q.n_init, max_iter=q.iters, tol=q.tol, seed=cfg.seed,
                      **common)
    if q.method == "hw_kmeans":
        return hw_kmeans(w, h, k, n_init=q.n_init, max_iter=q.iters, tol=q.tol, seed=cfg.seed,
                         **common)
    if q.method == "uniform":
        return uniform(w, h, k=k, target_bits=None if k else q.target_bits,
                       weighted=q.weighted_mean, **common)
    return ecsq(w, h, target_bits=q.target_bits, max_iter=q.iters, **common)


def _layer_task(cfg: RunConfig, loader: StoreShardLoader, k: int | None, name: str):
    task_threads()
    w, h = loader()
    return _solve_1d(cfg, (w, h), k, name)


def _channel_task(cfg, src, prune, hess, name):
    """Channel scope for one tensor: rows (output channels) spread over Ray tasks."""
    from pipeline.hessian.stage import read_hessian
    from pipeline.quantize.sharded import solve_channels_sharded
    from pipeline.train.stage import load_masks, load_model_state

    state = load_model_state(src)
    t = state[name]
    rows = t.shape[0]
    W = t.reshape(rows, -1).numpy().astype(np.float32)
    masks = load_masks(prune)
    M = masks[name].reshape(rows, -1).numpy() if name in masks else None
    H = None
    if hess is not None:
        H = read_hessian(hess, {name: tuple(t.shape)}, names=[name])[name].reshape(rows, -1)
        H = _floor(H, cfg.quantize.hessian_floor)
    q = cfg.quantize
    return solve_channels_sharded(
        W, H, q.k, mask=M, n_tasks=q.actors, weighted=q.method == "hw_kmeans",
        n_init=q.n_init, max_iter=q.iters, tol=q.tol, seed=cfg.seed, name=name)


def _evaluate_task(cfg: RunConfig, src: StageDir, prune: StageDir | None,
                   hess: StageDir | None, out: StageDir) -> dict:
    """Accuracy of the model rebuilt from codebook + indices + masks, and per-tensor
    distortion against the dense weights."""
    from pipeline.data import load_split
    from pipeline.evaluate import accuracy_of_state
    from pipeline.hessian.stage import read_hessian
    from pipeline.quantize.backend import entropy_bits
    from pipeline.train.stage import load_masks, load_model_state

    task_threads()
    base = load_model_state(src)
    masks = load_masks(prune)
    qm = QuantizedModel.read(out)
    state = qm.dense_state(base, masks)
    shapes = {n: tuple(base[n].shape) for n in qm.assignment}
    hs = read_hessian(hess, shapes, names=list(shapes)) if hess is not None else {}
    layers = {}
    for n in qm.assignment:
        m = masks[n].reshape(-1).numpy() if n in masks else np.ones(base[n].numel(), bool)
        d = (state[n].float() - base[n].float()).reshape(-1).numpy()[m].astype(np.float64) ** 2
        idx = qm.indices[n].reshape(-1).numpy()[m]
        row = {"kept": int(m.sum()), "distortion": float(d.mean()) if d.size else 0.0,
               "index_entropy_bits": entropy_bits(np.bincount(idx.astype(np.int64)))
               if idx.size else 0.0}
        if n in hs:
            row["weighted_distortion"] = (float((hs[n].reshape(-1)[m] * d).mean())
                                          if d.size else 0.0)
        layers[n] = row
    if not cfg.model.trained_here:
        from pipeline.workload import Workload

        return {"metric": Workload(cfg).evaluate_quantized(src, qm, masks), "layers": layers}
    acc = accuracy_of_state(cfg.model.name, state, load_split(cfg.data.root, "test"))
    return {"accuracy": acc, "layers": layers}


def _run(ctx: StageContext) -> dict:
    import ray

    from pipeline.quantize.sharded import RayBackend, shard_ranges
    from pipeline.train.stage import load_masks, load_model_state, model_stage

    cfg, out, q = ctx.cfg, ctx.out, ctx.cfg.quantize
    if per_tensor(cfg):  # a tensor per unit, read from the model source
        from pipeline.quantize.tensors_stage import run_quantize_tensors

        return run_quantize_tensors(ctx)
    if not cfg.model.trained_here and q.scope in ("channel", "group"):  # per-row solvers
        from pipeline.quantize.rows_stage import run_rows

        return run_rows(ctx)
    src = ctx.inputs[model_stage(cfg)]
    prune = ctx.inputs.get("prune")
    hess = ctx.inputs.get("hessian")
    t0 = time.perf_counter()
    state = load_model_state(src)
    names = _tensor_names(cfg, src, state)
    raw = [n for n in state if n not in names]
    masks = load_masks(prune)
    flat = _flat_masks(names, state, masks)
    for n in names:
        if not torch.isfinite(state[n]).all():
            raise ValueError(f"tensor {n} has NaN or inf weights; the model stage is broken")
    counts = [int(flat[n].sum()) for n in names]
    indices: dict[str, torch.Tensor] = {}
    codebooks: dict[str, torch.Tensor] = {}
    assignment: dict[str, str] = {}
    info: dict = {}

    def put(n: str, codes: np.ndarray, cb: str) -> None:
        full = np.zeros(state[n].numel(), dtype=np.int64)
        full[flat[n]] = codes
        indices[n] = torch.from_numpy(full).reshape(state[n].shape)
        assignment[n] = cb

    if q.scope == "network":
        total = sum(counts)
        block = stats_block(total)
        ranges = shard_ranges(total, q.actors, block)
        loaders = [StoreShardLoader(cfg, src, prune, hess, names, a, b) for a, b in ranges]
        ctx.log.info("quantize: %s over %d weights of %d tensors, %d actors (block %d)",
                     q.method, total, len(names), len(loaders), block)
        with RayBackend(loaders, [a for a, _ in ranges], block=block) as be:
            res = _solve_1d(cfg, be, q.k, "network")
        codebooks["network"] = torch.from_numpy(res.centres.astype(np.float32))
        splits = np.split(res.codes.astype(np.int64), np.cumsum(counts)[:-1])
        for n, c in zip(names, splits, strict=True):
            put(n, c, "network")
        info = {"k": res.k, "index_entropy_bits": res.entropy_bits,
                "weighted_distortion": res.weighted_distortion, "distortion": res.distortion,
                "iterations": len(res.history), **{k: v for k, v in res.info.items()
                                                   if isinstance(v, (int, float, str))}}
    elif q.scope == "layer":
        begins = np.concatenate([[0], np.cumsum(counts)[:-1]])
        task = remote(_layer_task, cpus=task_cpus(1), gpus="task", max_retries=_TASK_RETRIES)
        refs = {}
        for n, a, c in zip(names, begins, counts, strict=True):
            k = (q.layer_k or {}).get(n, q.k)
            if k is None and q.method in ("kmeans", "hw_kmeans"):
                raise ValueError(f"quantize.layer_k has no k for tensor {n} and quantize.k is "
                                 "unset: give every quantized tensor a k")
            refs[n] = task.remote(
                cfg, StoreShardLoader(cfg, src, prune, hess, names, int(a), int(a + c)), k, n)
        for n, ref in refs.items():
            res = ray.get(ref)
            codebooks[n] = torch.from_numpy(res.centres.astype(np.float32))
            put(n, res.codes.astype(np.int64), n)
        info = {"k": {n: int(codebooks[n].numel()) for n in names}}
    else:  # channel
        task = remote(_channel_task, cpus=task_cpus(1), gpus="task", max_retries=_TASK_RETRIES)
        refs = {n: task.remote(cfg, src, prune, hess, n) for n in names}
        for n, ref in refs.items():
            res = ray.get(ref)
            codebooks[n] = torch.from_numpy(res.centres.astype(np.float32))
            codes = res.codes.reshape(-1).astype(np.int64)
            indices[n] = torch.from_numpy(codes).reshape(state[n].shape)
            assignment[n] = n
        info = {"k": q.k}

    QuantizedModel(scope=q.scope, method=q.method, codebooks=codebooks, indices=indices,
                   assignment=assignment, raw=raw).write(out)
    ev = call(_evaluate_task, cfg, src, prune, hess, out, cpus="worker", gpus="task",
              max_retries=_TASK_RETRIES)
    if not cfg.model.trained_here:  # a loaded model: the run's metric (perplexity, its own)
        from pipeline.workload import Workload

        quality = Workload(cfg).metric_fields("quantized", ev["metric"])
    else:
        quality = {"quantized_accuracy": ev["accuracy"]}
    out.write_json("layers.json", ev["layers"])
    # Layer/channel scope: kept-weighted means over the per-tensor codebooks (network scope
    # has them from the one solve).
    if q.scope != "network":
        info["index_entropy_bits"] = (
            sum(ev["layers"][n]["index_entropy_bits"] * ev["layers"][n]["kept"] for n in names)
            / max(sum(counts), 1))
        wd = [ev["layers"][n].get("weighted_distortion") for n in names]
        if all(v is not None for v in wd):
            info["weighted_distortion"] = (
                sum(v * ev["layers"][n]["kept"] for v, n in zip(wd, names, strict=True))
                / max(sum(counts), 1))
    return {
        **quality,
        "quantize": {"method": q.method, "scope": q.scope,
                     "target_bits": q.target_bits, "seconds": round(time.perf_counter() - t0, 3),
                     **info},
    }


def _sections(cfg: RunConfig) -> dict:
    # `embeddings` decides which tensors the load stage lists (its key holds it); the floor
    # only matters where an embedding is quantized, so other configs keep their keys.
    q = cfg.quantize.model_dump(mode="json", exclude={"embeddings", "embedding_floor"})
    if q["serve_bits"] is None:  # unset: the keys of runs from before it existed stay
        del q["serve_bits"]
    if cfg.model.name == "hf_causal_lm" and cfg.quantize.embeddings != "keep":
        q["embedding_floor"] = cfg.quantize.embedding_floor
    # The per-row stages (channel and group scope) price the file's indices with the
    # encoder's coder (the rate loop and the coded bits they report); Huffman (the default)
    # keeps the keys of runs from before they knew of rANS, and the network and layer scopes
    # do not depend on it.
    if cfg.encode.coder != "huffman" and cfg.quantize.scope in ("channel", "group"):
        q["coder"] = cfg.encode.coder
    if one_shot(cfg):  # the quantize stage prunes: what it cuts is part of its result
        p = cfg.prune
        q["prune"] = {"keep": dict(p.keep), "n_m": p.n_m, "criterion": p.criterion}
    return {"seed": cfg.seed, "quantize": q}


def _inputs(cfg: RunConfig) -> tuple[str, ...]:
    from pipeline.train.stage import model_stage

    ins = [model_stage(cfg)]
    if cfg.hessian.enabled:
        ins.append("hessian")
    elif cfg.quantize.method in ("hw_kmeans", "ecsq") or (
            cfg.quantize.method == "uniform" and cfg.quantize.weighted_mean):
        raise ValueError(f"quantize.method={cfg.quantize.method} weights by the Hessian: set "
                         "hessian.enabled=true (or use kmeans / uniform with "
                         "quantize.weighted_mean=false)")
    return tuple(ins)


QUANTIZE = Stage(
    name="quantize",
    version=2,  # 2: loaded models' per-row codebooks are aimed at the file's coded rate
    inputs=_inputs,
    sections=_sections,
    run=_run,
    enabled=lambda cfg: cfg.quantize.enabled,
    headline=("quantized_accuracy", "quantized_perplexity"),
    outputs=lambda cfg: (("codes.json", "layers.json") if per_tensor(cfg)
                         else ("codebooks.safetensors", "indices.safetensors", "quantized.json",
                               "layers.json") + (("masks.safetensors",) if one_shot(cfg)
                                                 else ())),
)
