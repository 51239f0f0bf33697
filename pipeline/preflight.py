"""Checks made from the config and the file system before any stage runs or Ray starts.

A mistake a user can see from the config and the files (a wrong model path, a folder without
tokenizer files, a text shorter than one window, a metric without a direction, a target
pattern that matches nothing) must cost seconds, not the minutes of the stages before the one
that would find it. `check_before_work(cfg)` raises the first such mistake as a UserError
(one `hwq: error:` line); the stages keep their own checks (a remote model, a file changed
meanwhile), which name the same keys and files.

What is checked here (local sources only: a remote model folder is not downloaded for this):

- the built-in Fashion-MNIST data: its four IDX files under `data.root` (embedded Ray only);
- `model.path` of a causal LM: exists, is a model folder (config.json and safetensors
  weights) or a .gguf file, and holds tokenizer files (or is a GGUF, which carries one);
  `model.checkpoint`: exists;
- the metric: importable, with a `direction`;
- `quantize.targets` / `quantize.ignore`: each pattern matches the model (built on the meta
  device from config.json, so without reading its weights);
- text data: every text exists, is UTF-8 and not empty, and has at least one window of
  `data.seq_len` tokens (two for a calibration text that also gives the held-out eval tail),
  each counted with the model's tokenizer (a GGUF's texts only against their bytes: building
  its tokenizer takes ~20 s, and the load stage counts them anyway) and named by its key and
  file.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipeline.config import RunConfig
from pipeline.errors import UserError

__all__ = ["check_before_work", "PreflightError"]

log = logging.getLogger("hwq")

# Characters tokenized to see that a long text holds enough tokens: a window of 512 tokens
# is ~2 KB of prose; a text longer than this is counted on its first part only.
_PREFIX_CHARS_PER_TOKEN = 64


class PreflightError(UserError, ValueError):
    """A mistake found before any work started."""


def check_before_work(cfg: RunConfig) -> None:
    """Raise the first mistake `cfg` holds that the files show (see the module docstring)."""
    from pipeline.workload import Workload

    wl = Workload(cfg)
    _check_checkpoint(cfg)
    _check_fashion_mnist(cfg)
    wl.metric  # noqa: B018 - imports a user's metric and checks its direction
    if cfg.model.name != "hf_causal_lm":
        return
    adapter = wl.adapter
    if _is_remote(cfg.model.path or ""):
        return  # not downloaded here: the load stage fetches and checks it
    _, gguf = adapter.resolve()  # the folder or .gguf exists, with config.json and weights
    # A streamed GGUF is converted by the load stage: checked below as a resident GGUF is.
    if cfg.model.residency == "streamed" and gguf is None:
        _check_streamed(cfg)
        if cfg.data.name == "text":
            from pipeline.models.source import source_url
            from pipeline.stream_inputs import load_tokenizer

            url, opts = source_url(cfg, None)
            _check_texts(cfg, load_tokenizer(cfg.model.tokenizer or url, opts))
        return
    if cfg.quantize.targets is not None or cfg.quantize.ignore:
        _check_targets(wl)
    if cfg.data.name == "text":
        # A GGUF carries its tokenizer, but building it takes transformers ~20 s: its texts
        # are only checked against their bytes (a token is at least one byte).
        tok = adapter.tokenizer() if gguf is None else None  # tokenizer files, matching
        _check_texts(cfg, tok)


def _is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _check_checkpoint(cfg: RunConfig) -> None:
    ck = cfg.model.checkpoint
    if ck and not _is_remote(ck):
        p = Path(ck).expanduser()
        if not p.exists():
            raise PreflightError(f"model.checkpoint {ck!r} does not exist")
        if not p.is_file():
            raise PreflightError(f"model.checkpoint {ck!r} is not a regular file")


def _check_fashion_mnist(cfg: RunConfig) -> None:
    """The built-in dataset's IDX files under `data.root`, on an embedded Ray (whose workers
    share this file system; a cluster's nodes may hold the data where the driver does not)."""
    if cfg.data.name != "fashion_mnist" or cfg.executor.address is not None:
        return
    from pipeline.data import DatasetMissing, dataset_files

    try:
        dataset_files(cfg.data.root)
    except DatasetMissing as e:
        raise PreflightError(str(e)) from None


def _check_streamed(cfg: RunConfig) -> None:
    """A streamed model's targets against its tensor names (the shard headers only), and its
    window lengths against its positions (config.json)."""
    from pipeline.models.load_streamed import (
        embedding_tensors,
        quantizable_names,
        wants_embeddings,
    )
    from pipeline.models.source import source_url
    from pipeline.models.weights import WeightsFolder
    from pipeline.stream_inputs import check_lengths, model_config

    url, opts = source_url(cfg, None)
    w = WeightsFolder(url, opts)
    roles = embedding_tensors(url, opts)[0] if wants_embeddings(cfg) else {}
    quantizable_names(cfg, w.names, {n: tuple(t.shape) for n, t in w.tensors.items()}, roles)
    # The windows fit the model's positions (the load stage checks the same, after Ray starts).
    check_lengths(model_config(url, opts), url, {
        "data.seq_len": cfg.data.seq_len,
        "data.eval_seq_len": cfg.data.eval_seq_len or cfg.data.seq_len})


def _check_targets(wl) -> None:
    """quantize.targets/ignore against the model's parameter names, on a meta-device model
    built from its config (no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    folder, gguf = wl.adapter.resolve()
    kw: dict[str, Any] = {"local_files_only": True}
    if gguf is not None:
        kw["gguf_file"] = gguf
    try:
        conf = AutoConfig.from_pretrained(str(folder), trust_remote_code=False, **kw)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(conf, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:  # the load stage says it with more detail
        log.debug("preflight: the model's targets are checked by the load stage (%s)", e)
        return
    if not wl.quantizable(model):
        raise PreflightError("quantize.targets selects no tensor of the model")


def _check_texts(cfg: RunConfig, tokenizer: Any) -> None:
    from pipeline.data.text import read_text
    from pipeline.workload import _named, _sources

    d = cfg.data
    opts = cfg.store.storage_options()
    sources = [("data.calibration", d.calibration, 1 if d.eval else 2)]
    sources += [(f"data.eval.{k}", v, 1) for k, v in d.eval.items()]
    for key, src, windows in sources:
        text = read_text(_sources(src), opts)  # missing, empty, not UTF-8: names the file
        need = windows * d.seq_len
        if tokenizer is None:  # at most one token a byte (+1: a leading word marker)
            got, most = len(text.encode()) + 1, "at most "
        else:
            got, most = _tokens_at_least(tokenizer, text, need), ""
        if got < need:
            what = (
                "one window"
                if windows == 1
                else f"{windows} windows (with no data.eval, its tail is held out for evaluation)"
            )
            raise PreflightError(
                f"{key} {_named(src)}: the text has {most}{got} tokens, fewer than {what} of "
                f"data.seq_len={d.seq_len} tokens; give more text or a shorter data.seq_len"
            )


def _tokens_at_least(tokenizer: Any, text: str, need: int) -> int:
    """The number of tokens of `text`, or of a prefix of it if that already reaches `need`
    (a long text is not tokenized whole here; the load stage does that once)."""
    from pipeline.data.text import token_ids

    limit = need * _PREFIX_CHARS_PER_TOKEN
    if len(text) > limit:
        n = len(token_ids(tokenizer, text[:limit]))
        if n > need:  # one more: the cut may split the last token
            return n
    return len(token_ids(tokenizer, text))
