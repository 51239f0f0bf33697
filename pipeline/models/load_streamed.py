"""The `load` stage of a streamed model: what the model is, without reading its weights.

The model is a safetensors folder (local or ``s3://``) that stays where it is; the later stages
read it tensor by tensor and block by block (pipeline/models/source.py). This stage writes

- ``model.json``: the source folder, the tensors to quantize and their shapes, the model's
  size and dtype (the same schema as a resident load, with ``residency: streamed``);
- ``windows.safetensors``: the calibration windows (and each eval text's windows), tokenized
  once here, or seeded random tokens (``data.name: random_tokens``);
- ``hf/…``: config.json, generation_config.json and the tokenizer files (what the decoded
  folder needs beside its weights);
- for a GGUF model only, ``weights/…``: the GGUF converted one tensor at a time into a float32
  safetensors folder (pipeline.models.gguf_stream), which the later stages read instead.

With eval texts it also scores the original model (perplexity, streamed block by block): the
baseline of the report.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Any

import torch

from pipeline.config import ConfigError, RunConfig
from pipeline.executor import call, task_threads
from pipeline.graph import StageContext
from pipeline.hessian.shards import block_of
from pipeline.workload import HF_DIR, MODEL_JSON, WINDOWS, Workload

__all__ = ["run_load_streamed", "source_identity", "block_targets", "random_windows",
           "streamed_perplexity", "quantizable_names", "block_of", "embedding_tensors",
           "wants_embeddings"]

def block_targets(names: list[str], shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """The 2-D ``.weight`` tensors inside decoder blocks (``…layers.<i>.…``), in file order."""
    return [n for n in names if n.endswith(".weight") and len(shapes[n]) == 2
            and block_of(n) is not None]


def random_windows(vocab: int, n: int, seq_len: int, seed: int) -> torch.Tensor:
    """Seeded uniform token windows int64 [n, seq_len] (a synthetic model has no tokenizer)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seq_len), generator=g)


def source_identity(cfg: RunConfig) -> dict[str, Any]:
    """What keys a streamed model without reading its weights: each tensor's sha256 where the
    index records one, else its dtype, shape and byte range; and each shard's size (and, for a
    local folder, its modification time), so a rewritten shard is a new key. A GGUF: its
    size, modification time and header digest (`gguf_stream.gguf_identity`)."""
    from pipeline.models.gguf_stream import gguf_identity, gguf_path
    from pipeline.models.source import source_url
    from pipeline.models.weights import WeightsFolder

    if gguf_path(cfg) is not None:
        return gguf_identity(cfg)
    url, opts = source_url(cfg, None)
    w = WeightsFolder(url, opts)
    tensors = {n: (t.sha256 or [t.dtype, list(t.shape), t.file, t.start, t.end])
               for n, t in w.tensors.items()}
    shards = {}
    for f in sorted({t.file for t in w.tensors.values()}):
        shards[f] = [w._files.size(f)]
        if "://" not in url:
            shards[f].append(os.stat(w._files.path(f)).st_mtime_ns)
    blob = json.dumps({"tensors": tensors, "shards": shards}, sort_keys=True).encode()
    return {"url": url, "identity": hashlib.sha256(blob).hexdigest()}


def embedding_tensors(url: str, opts: dict | None) -> tuple[dict[str, str], dict[str, str]]:
    """({tensor: role}, {tied head: embedding}) of the model's input embedding and output head
    weights, in model order: ``{embedding: "tied"}`` when the head is tied to it (one tensor,
    under the embedding's name, as `hf_causal.embedding_names` names it), else ``{embedding:
    "input", head: "head"}``. Reads config.json and the shard headers only (a skeleton on the
    meta device)."""
    from pipeline.models.stream import StreamedLM

    lm = StreamedLM(url, opts)
    emb, head = lm.embedding_name, lm.head_name
    if lm.tied and head is not None:
        return {emb: "tied"}, {head: emb}
    if head is None:
        return {emb: "input"}, {}
    return {emb: "input", head: "head"}, {}


def wants_embeddings(cfg: RunConfig) -> bool:
    """Whether the selection can hold an embedding (and so needs `embedding_tensors`)."""
    return cfg.quantize.targets is not None or cfg.quantize.embeddings in ("quantize", "head")


def quantizable_names(cfg: RunConfig, names: list[str], shapes: dict[str, tuple[int, ...]],
                      embeddings: dict[str, str] | None = None) -> list[str]:
    """The tensors a streamed run quantizes, in model order: `quantize.targets` minus `ignore`,
    else the decoder blocks' 2-D weights minus `ignore` plus, with `quantize.embeddings:
    quantize`, the input embedding (first) and an untied output head (last) (`head`: the head
    only), as the resident selection (`Workload.quantizable`). embeddings: `embedding_tensors` of the model."""
    from pipeline.models.targets import match_names

    q = cfg.quantize
    roles = {n: r for n, r in (embeddings or {}).items() if n in shapes}
    if q.targets is not None:
        chosen = match_names(names, q.targets, q.ignore, where="quantize.targets")
    else:
        ignored = set(match_names(names, q.ignore, where="quantize.ignore")) if q.ignore else set()
        chosen = [n for n in block_targets(names, shapes) if n not in ignored]
        if q.embeddings in ("quantize", "head"):
            # head: the output head's weight (a tied pair's one tensor), not an untied input
            extra = [n for n in roles if n not in ignored
                     and (q.embeddings == "quantize" or roles[n] != "input")]
            chosen = ([n for n in extra if roles[n] != "head"] + chosen
                      + [n for n in extra if roles[n] == "head"])
    if not chosen:
        raise ConfigError("quantize.targets selects no tensor of the model")
    for n in chosen:
        if len(shapes[n]) != 2:
            raise ConfigError(f"quantize.targets: {n} has shape {list(shapes[n])}; a streamed "
                              "model quantizes 2-D weights per row")
        if block_of(n) is None and n not in roles:
            raise ConfigError(f"quantize.targets: {n} is not inside a decoder block "
                              "(…layers.<i>.…) nor the input embedding or output head; the "
                              "streamed Hessian covers those only")
        if roles.get(n) == "input" and cfg.hessian.estimator == "activation":
            raise ConfigError(f"hessian.estimator=activation has no statistics for {n} (an "
                              "input embedding not tied to the head): use hessian.estimator="
                              "fisher, or quantize.embeddings=head (the head only) or keep")
    return chosen


def streamed_perplexity(url: str, opts: dict | None, sets: dict[str, torch.Tensor],
                        batch: int) -> dict[str, Any]:
    """{"value": pooled perplexity over every set's predicted tokens, "by_set": {name: ppl}},
    the model at `url` streamed one decoder block at a time in float32."""
    from pipeline.models.stream import StreamedLM

    by, nll, tokens = {}, 0.0, 0
    for name, win in sets.items():
        lm = StreamedLM(url, opts, dtype=torch.float32, stored_linears=True)
        ppl = lm.perplexity(win, batch=batch)
        by[name] = ppl
        n = int(win.shape[0]) * (int(win.shape[1]) - 1)
        nll += math.log(ppl) * n
        tokens += n
    return {"value": math.exp(nll / max(tokens, 1)), "by_set": by}


def _load_task(cfg: RunConfig, out) -> dict:
    from pipeline.models.gguf_stream import convert_gguf, gguf_path
    from pipeline.models.source import source_url
    from pipeline.models.weights import WeightsFolder
    from pipeline.stream_inputs import check_lengths, hf_files, load_tokenizer, model_config

    task_threads()
    label = gguf_path(cfg)
    if label is not None:
        url, opts = convert_gguf(cfg, out, tokenizer=cfg.data.name == "text"
                                 and not cfg.model.tokenizer)
    else:
        url, opts = source_url(cfg, None)
    label = label or url
    w = WeightsFolder(url, opts)
    conf = model_config(url, opts)
    check_lengths(conf, url, {"data.seq_len": cfg.data.seq_len,
                              "data.eval_seq_len": cfg.data.eval_seq_len or cfg.data.seq_len})
    names = w.names
    shapes = {n: tuple(w.info(n).shape) for n in names}
    # The tie is recorded whatever is quantized: a tied head is an alias stored once, as a
    # resident load records it (`unique_state`), so both residencies write the same file.
    roles, tied = embedding_tensors(url, opts)
    if not wants_embeddings(cfg):
        roles = {}
    chosen = quantizable_names(cfg, names, shapes, roles)
    emb = [n for n in chosen if n in roles]
    if cfg.data.name == "random_tokens":
        vocab = conf.get("vocab_size")
        if type(vocab) is not int or vocab < 1:
            raise ConfigError(f"{url}/config.json has no vocab_size: data.name=random_tokens "
                              "draws tokens from it")
        windows = {"calibration": random_windows(vocab, cfg.data.calibration_windows,
                                                 cfg.data.seq_len, cfg.seed)}
    else:
        windows = Workload(cfg).tokenize(load_tokenizer(cfg.model.tokenizer or url, opts))
    out.write_safetensors(WINDOWS, windows)
    for name, data in sorted(hf_files(url, opts, cfg.model.tokenizer).items()):
        out.write_bytes(f"{HF_DIR}/{name}", data)
    dtypes = sorted({w.info(n).dtype for n in chosen})
    params = sum(t.numel for t in w.tensors.values())
    quantized = sum(w.info(n).numel for n in chosen)
    info = {"name": label, "params": params, "dtype": "+".join(sorted({t.dtype for t in
                                                                      w.tensors.values()})),
            "model_type": conf.get("model_type"), "layers": conf.get("num_hidden_layers"),
            "bytes": sum(t.nbytes for t in w.tensors.values())}
    out.write_json(MODEL_JSON, {
        "adapter": "hf_causal_lm", "residency": "streamed", "source": url, "tied": tied,
        "dtype": dtypes[0] if len(dtypes) == 1 else None, "quantizable": chosen,
        "shapes": {n: list(shapes[n]) for n in chosen}, "embeddings": emb,
        # which of them is the input embedding, the head, or both (tied): where the streamed
        # Hessian computes each (pipeline/hessian/streamed_stage.py)
        "embedding_roles": {n: roles[n] for n in emb}, "info": info})
    metrics: dict[str, Any] = {"params": params, "quantized_params": quantized,
                               "load": {"model": info, "tensors": len(chosen),
                                        "dtype": "+".join(dtypes), "residency": "streamed",
                                        "bytes_read": w.bytes_read}}
    sets = {k.removeprefix("eval/"): v for k, v in windows.items() if k.startswith("eval/")}
    wl = Workload(cfg)
    if sets:
        ev = streamed_perplexity(url, opts, sets, cfg.evaluate.batch_size)
        metrics.update(wl.metric_fields("baseline", ev))
        base = f"baseline {wl.metric.name} {ev['value']:.4f}"
    else:
        base = "no eval text"
    print(f"load: {label} (streamed): {params:,} parameters, {len(chosen)} tensors "
          f"({quantized:,} weights) to quantize; {base}", flush=True)
    return metrics


def run_load_streamed(ctx: StageContext) -> dict:
    return call(_load_task, ctx.cfg, ctx.out, cpus="worker")
