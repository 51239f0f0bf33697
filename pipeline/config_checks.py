"""Checks of a run config that need more than one section, kept out of config.py: sizes
with units, and what the streamed residency can run."""

from __future__ import annotations

import re

__all__ = ["parse_bytes", "streamed_gap"]

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_bytes(v: int | str, key: str) -> int:
    """A size as bytes: an integer, or a number with a unit ("24GiB", "500 MB", "1.5gb")."""
    if isinstance(v, bool):
        raise ValueError(f"{key} is a size such as 24GiB, not {v!r}")
    if isinstance(v, int):
        n = v
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(v))
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"{key}={v!r} is not a size: write e.g. 24GiB, 500MB or 1000000")
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n < 1:
        raise ValueError(f"{key} must be a positive size, got {v!r}")
    return n


def streamed_gap(cfg) -> str | None:
    """What the streamed residency runs today: a causal LM's decoder-block Linears, one
    λ per channel (uniform or ECSQ), Fisher or activation Hessian, no fine-tuning. A
    safetensors folder or a GGUF file (the load stage converts it one tensor at a time)."""
    why = None
    if cfg.model.name != "hf_causal_lm":
        why = "model.name=hf_causal_lm (a safetensors folder)"
    elif cfg.finetune.enabled and cfg.quantize.enabled:
        why = "finetune.enabled=false (fine-tuning holds the whole model)"
    elif cfg.quantize.scope != "channel" or cfg.quantize.method not in ("uniform",
                                                                            "ecsq"):
        why = "quantize.scope=channel with quantize.method uniform or ecsq"
    elif cfg.quantize.targets is None and cfg.quantize.embeddings == "quantize":
        why = ("quantize.embeddings=keep (the streamed Hessian covers the decoder "
               "blocks; the embedding and head are stored as they are)")
    elif cfg.encode.positions != "gaps" or cfg.encode.indices != "static" or \
            cfg.encode.fixed_length:
        why = "encode.indices=static and encode.positions=gaps"
    return why
