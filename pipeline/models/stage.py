"""The `load` stage: a model hwq does not train (a Hugging Face causal LM, one's own module),
loaded once through its adapter and written to the store, with its baseline score.

load → model.safetensors (every weight in its source dtype; tied weights once),
       model.json (adapter, tied aliases, dtype, the quantized tensors, model info),
       hf/… (causal LMs: config.json, generation_config.json, tokenizer files — what
       `hwq decode --hf-out` puts beside the decoded weights),
       windows.safetensors (text: the calibration windows and every eval text's windows,
       tokenized once here so that every later stage sees the same tokens),
       config.json (causal LMs: hf/config.json again, beside model.safetensors, so that this
       folder is the model source the per-tensor stages read, see pipeline/models/source.py).

Runs as one Ray task. The stage key holds the model and data settings and a sha256 of the
local source files (model and texts), so a changed file is a new key; remote sources are
keyed by URL (and fetched into a folder keyed by their ETags, see pipeline.models.hf_causal).
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import Any

import torch

from pipeline.config import RunConfig
from pipeline.digests import hash_files
from pipeline.executor import call, task_threads
from pipeline.graph import Stage, StageContext
from pipeline.workload import HF_DIR, MODEL_JSON, WINDOWS, Workload, expand_path, unique_state

__all__ = ["LOAD", "source_digest"]


def source_digest(cfg: RunConfig) -> dict[str, Any]:
    """sha256 of the local files the load stage reads (model, checkpoint, texts)."""
    out: dict[str, Any] = {}
    m = cfg.model
    if m.residency == "streamed":  # never read whole: keyed by its headers and shard sizes
        from pipeline.models.load_streamed import source_identity

        out["model"] = source_identity(cfg)
        if cfg.data.name == "text":
            out["texts"] = text_digests(cfg)
        return out
    if m.path and "://" not in m.path:
        p = Path(expand_path(m.path)).expanduser()
        if p.is_file():
            out["model"] = hash_files([p])
        elif p.is_dir():
            files = [f for f in p.iterdir() if f.is_file()]
            if m.gguf_file:
                files = [f for f in files if f.suffix.lower() != ".gguf" or f.name == m.gguf_file]
            out["model"] = hash_files(files)
    if m.checkpoint and "://" not in m.checkpoint and Path(m.checkpoint).is_file():
        out["checkpoint"] = hash_files([Path(m.checkpoint)])
    if cfg.data.name == "text":
        out["texts"] = text_digests(cfg)
    return out


def text_digests(cfg: RunConfig) -> dict[str, str]:
    """sha256 of the calibration text and of each eval text, as read."""
    from pipeline.data.text import read_text
    from pipeline.workload import _sources

    opts = cfg.store.storage_options()
    texts = {"calibration": cfg.data.calibration, **{f"eval/{k}": v
                                                       for k, v in cfg.data.eval.items()}}
    return {k: hashlib.sha256(read_text(_sources(v), opts).encode()).hexdigest()
            for k, v in texts.items()}


def _load_task(cfg: RunConfig, out, expect: dict[str, Any]) -> dict:
    from pipeline.models.hf_causal import save_folder_files

    task_threads()
    torch.manual_seed(cfg.seed)
    wl = Workload(cfg)
    adapter = wl.adapter
    model = adapter.load()
    names = wl.quantizable(model)  # an unknown target pattern fails here, before any work
    if not names:
        raise ValueError("quantize.targets selects no tensor of the model")
    state, tied = unique_state(model)
    for n, t in state.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"{adapter.label()}: weight {n} has NaN or inf values")
    info = adapter.describe(model)
    dtypes = sorted({str(state[n].dtype).removeprefix("torch.") for n in names})
    if cfg.data.name == "text":
        tok = adapter.tokenizer() if hasattr(adapter, "tokenizer") else None
        if tok is None:
            raise ValueError(f"model {cfg.model.name!r} has no tokenizer for data.name=text")
        if text_digests(cfg) != expect.get("texts"):
            raise ValueError("a text changed while the run was planned; rerun to use it")
        out.write_safetensors(WINDOWS, wl.tokenize(tok))
        if cfg.model.name == "hf_causal_lm":
            with tempfile.TemporaryDirectory(prefix="hwq-hf-") as tmp:
                for f in save_folder_files(model, tok, tmp):
                    out.write_bytes(f"{HF_DIR}/{f.name}", f.read_bytes())
                    if f.name == "config.json":  # beside model.safetensors: this folder is
                        # the model source of the per-tensor stages (models/source.py)
                        out.write_bytes("config.json", f.read_bytes())
    out.write_safetensors("model.safetensors", state, metadata={"model": adapter.label()})
    quantized_params = sum(state[n].numel() for n in names)
    embeddings = [n for n in wl.embedding_names(model) if n in set(names)]
    roles: dict[str, str] = {}
    if embeddings and cfg.model.name == "hf_causal_lm" and cfg.data.name == "text":
        # what the per-tensor Hessian needs to place the embedding and head (the streamed
        # load records the same, load_streamed.py), read from the folder just written
        from pipeline.models.load_streamed import embedding_tensors

        found, _ = embedding_tensors(out.url(""), out.store.storage_options or None)
        roles = {n: found[n] for n in embeddings if n in found}
    out.write_json(MODEL_JSON, {
        "adapter": cfg.model.name, "tied": tied,
        "dtype": dtypes[0] if len(dtypes) == 1 else None,
        "quantizable": names, "shapes": {n: list(state[n].shape) for n in names},
        "embeddings": embeddings, "embedding_roles": roles,
        "info": info.to_dict(),
    })
    ev = wl.evaluate(model, out)
    print(f"load: {adapter.label()}: {info.params:,} parameters, {len(names)} tensors "
          f"({quantized_params:,} weights) to quantize; baseline {wl.metric.name} "
          f"{ev['value']:.4f}", flush=True)
    return {**wl.metric_fields("baseline", ev), "params": info.params,
            "quantized_params": quantized_params,
            "load": {"model": info.to_dict(), "tensors": len(names), "dtype": "+".join(dtypes)}}


def _run(ctx: StageContext) -> dict:
    if ctx.cfg.model.residency == "streamed":
        from pipeline.models.load_streamed import run_load_streamed

        return run_load_streamed(ctx)

    return call(_load_task, ctx.cfg, ctx.out, ctx.sections.get("sources", {}), cpus="worker",
                gpus="task")


def _targets(cfg: RunConfig) -> dict[str, Any]:
    q = cfg.quantize
    out: dict[str, Any] = {"targets": q.targets, "ignore": q.ignore}
    # Quantized embeddings change the selection; `keep` is the earlier selection and key.
    if cfg.model.name == "hf_causal_lm" and q.targets is None and q.embeddings != "keep":
        out["embeddings"] = q.embeddings
    return out


def _sections(cfg: RunConfig) -> dict[str, Any]:
    return {"seed": cfg.seed, "model": cfg.model.model_dump(mode="json"),
            "data": cfg.data.model_dump(mode="json"),
            "evaluate": cfg.evaluate.model_dump(mode="json"),
            "targets": _targets(cfg),
            "sources": source_digest(cfg)}


def _outputs(cfg: RunConfig) -> tuple[str, ...]:
    outs = [MODEL_JSON] if cfg.model.residency == "streamed" else ["model.safetensors",
                                                                     MODEL_JSON]
    if cfg.data.name in ("text", "random_tokens"):
        outs.append(WINDOWS)
    if cfg.model.name == "hf_causal_lm":
        outs.append(f"{HF_DIR}/config.json")
        if cfg.model.residency != "streamed" and cfg.data.name == "text":
            outs.append("config.json")
    return tuple(outs)


LOAD = Stage(
    name="load",
    version=1,
    inputs=lambda cfg: (),
    sections=_sections,
    run=_run,
    enabled=lambda cfg: not cfg.model.trained_here,
    headline=("baseline_perplexity", "baseline_accuracy"),
    outputs=_outputs,
)
