"""Where a model's weights live while the stages run: the run's residency and its source.

Every stage after `load` reads the model through its *source*: a safetensors folder read one
tensor at a time (`WeightsFolder`, local or ``s3://``) and, for a causal LM, one decoder block
at a time (`StreamedLM`). The residency decides which folder that is and what may hold the
model whole:

``resident``  the load stage loads the model through its adapter (a Hugging Face folder or
              GGUF file, one's own module, LeNet-5) and stores its weights in its own folder
              (``model.safetensors``); whole-model steps (fine-tuning, in-memory evaluation)
              are allowed.
``streamed``  the model is a safetensors folder read in place; no process reads it whole, and
              the load stage stores only what the model is (tensor list, config, tokenizer
              files, calibration windows). Peak memory is a block or a tensor, not the model.
              A GGUF file is first converted, one tensor at a time, into a float32
              safetensors folder inside the load stage's own folder (``weights/``,
              pipeline.models.gguf_stream); the stages read that folder.
``auto``      streamed when the folder's weights (a GGUF: its tensors as float32, from its
              header) take more bytes than ``executor.memory_budget`` (default: half of
              this machine's memory), else resident. Resolved once, before planning: the stored config and every stage key
              hold the concrete value.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from typing import Any

from pipeline.config import ConfigError, RunConfig
from pipeline.models.gguf_stream import WEIGHTS_DIR, gguf_float32_bytes, gguf_path

__all__ = ["resolve_residency", "is_streamed", "memory_budget", "model_bytes", "source_url",
           "tensor_order"]

log = logging.getLogger("hwq")


def is_streamed(cfg: RunConfig) -> bool:
    return cfg.model.residency == "streamed"


def memory_budget(cfg: RunConfig) -> int:
    """executor.memory_budget in bytes, else half of this machine's physical memory."""
    if cfg.executor.memory_budget is not None:
        return int(cfg.executor.memory_budget)
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 16 << 30
    return total // 2


def _streamable_path(cfg: RunConfig) -> str | None:
    """The model's safetensors folder when the model can be streamed at all, else None."""
    m = cfg.model
    if m.name != "hf_causal_lm" or not m.path or m.gguf_file:
        return None
    from pipeline.workload import expand_path

    path = expand_path(m.path)
    if path.lower().endswith(".gguf"):
        return None
    return path


def model_bytes(url: str, storage_options: dict | None = None) -> int:
    """Bytes of the weights in a safetensors folder (from the shard headers; nothing else is
    read)."""
    from pipeline.models.weights import WeightsFolder

    w = WeightsFolder(url, storage_options)
    return sum(t.nbytes for t in w.tensors.values())


def resolve_residency(cfg: RunConfig) -> RunConfig:
    """`cfg` with model.residency resolved to resident or streamed (a copy if it changes)."""
    res = cfg.model.residency
    if res == "auto":
        path = _streamable_path(cfg)
        res = "resident"
        gguf = gguf_path(cfg)
        size, what = None, "the model's weights"
        try:
            if gguf is not None:
                size, what = gguf_float32_bytes(gguf), "the GGUF's weights as float32"
            elif path is not None:
                size = model_bytes(path, cfg.store.storage_options(path) or None)
        except Exception as e:  # noqa: BLE001 - not a model hwq reads: the load stage says why
            log.debug("residency auto: %s is not a GGUF or safetensors folder (%s)",
                      gguf or path, e)
        budget = memory_budget(cfg)
        if size is not None and size > budget:
            res = "streamed"
            log.info("residency: streamed (%s, %.2f GiB, exceed executor.memory_budget "
                     "%.2f GiB)", what, size / 2**30, budget / 2**30)
        if res == "streamed":
            try:
                cfg = cfg.model_copy(deep=True)
                cfg.model.residency = "streamed"
                cfg._check_streamed()
            except ValueError as e:
                raise ConfigError(f"the model is larger than executor.memory_budget, so it "
                                  f"would be streamed, but {e}") from None
            return cfg
        cfg = cfg.model_copy(deep=True)
        cfg.model.residency = "resident"
    if cfg.model.residency == "resident" and cfg.data.name == "random_tokens":
        raise ConfigError("data.name=random_tokens is for model.residency=streamed (a synthetic "
                          "checkpoint); give data.name=text with a calibration text instead")
    return cfg


def source_url(cfg: RunConfig, load: Any) -> tuple[str, dict | None]:
    """(URL, fsspec options) of the folder the stages read the model's tensors from: the
    load stage's own folder (resident), the model's folder itself (streamed), or the folder
    the load stage converted a GGUF into (streamed GGUF: ``weights/`` in its folder)."""
    if is_streamed(cfg) and gguf_path(cfg) is not None:
        if load is None:
            raise RuntimeError("a streamed GGUF is read from the load stage's weights/ folder; "
                               "it exists once the load stage ran")
        return load.url(WEIGHTS_DIR), load.store.storage_options or None
    if is_streamed(cfg):
        path = _streamable_path(cfg)
        assert path is not None  # the config refuses anything else for streamed
        return path, cfg.store.storage_options(path) or None
    return load.url(""), load.store.storage_options or None


def tensor_order(names: Iterable[str]) -> list[str]:
    """Tensor names in the order the per-tensor stages number and write them: by name with
    numbers compared as numbers (layers.2 before layers.10). It depends on the names only,
    not on how a folder's shards or a state dict happen to list them, so both residencies
    write the same file."""
    return sorted(names, key=lambda n: [int(p) if p.isdigit() else p
                                        for p in re.split(r"(\d+)", n)])
