"""Model registry and checkpoint loading.

`build(name)` returns a freshly initialised module; `load_checkpoint(url, ...)` reads a
safetensors file from any fsspec URL (local path, s3://...) into a state dict.

Model adapters (`pipeline.models.base`): `make_adapter("hf_causal_lm", path=...)` and friends
say how to load a kind of model, which weights to quantize, its loss and its blocks; adapter
modules are imported on first use, so importing this package stays light.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from pipeline.models.base import (
    ADAPTERS,
    ModelAdapter,
    ModelInfo,
    adapter_names,
    get_adapter,
    make_adapter,
    register,
)
from pipeline.models.lenet import LeNet5
from pipeline.models.targets import TargetError, match_named_parameters

__all__ = ["REGISTRY", "build", "num_params", "load_checkpoint", "state_from_safetensors",
           "checkpoint_limit", "read_checkpoint",
           "ADAPTERS", "ModelAdapter", "ModelInfo", "adapter_names", "get_adapter",
           "make_adapter", "register", "TargetError", "match_named_parameters"]

REGISTRY: dict[str, Callable[[], nn.Module]] = {
    "lenet5": LeNet5,
}


def build(name: str) -> nn.Module:
    try:
        return REGISTRY[name]()
    except KeyError:
        raise ValueError(
            f"model.name={name!r} is not a known model; choose one of {sorted(REGISTRY)}"
        ) from None


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def state_from_safetensors(data: bytes, model: nn.Module, source: str) -> dict[str, torch.Tensor]:
    """Parse safetensors bytes and check them against `model`'s parameters (names, shapes)."""
    from safetensors.torch import load

    try:
        state = load(data)
    except Exception as e:
        raise ValueError(f"{source}: not a readable safetensors file ({e})") from None
    expected = dict(model.state_dict())
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise ValueError(
            f"{source}: tensors do not match the model (missing {missing[:5]}, unexpected "
            f"{extra[:5]})"
        )
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise ValueError(
                f"{source}: {k} has shape {tuple(v.shape)}, the model wants "
                f"{tuple(expected[k].shape)}"
            )
        if not torch.isfinite(v.float()).all():
            raise ValueError(f"{source}: {k} contains NaN or inf values")
    return {k: v.float() for k, v in state.items()}


def checkpoint_limit(model: nn.Module) -> int:
    """Most bytes a safetensors checkpoint of `model` can honestly have: 8 bytes a value
    (float64) plus a header far above any real one."""
    return 8 * sum(t.numel() for t in model.state_dict().values()) + (16 << 20)


def read_checkpoint(url: str, storage_options: dict[str, Any] | None = None,
                    max_bytes: int | None = None) -> bytes:
    """The bytes of a checkpoint file (path or fsspec URL): a regular file of at most
    `max_bytes`, read once. A folder, FIFO or device, or a file too large for the model, is a
    ValueError naming it (never a hang or a MemoryError)."""
    import stat

    import fsspec

    what = f"model.checkpoint {url!r}"
    try:
        fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
        if fs.protocol in ("file", "local") or "file" in fs.protocol:
            st = os.stat(path)
            if not stat.S_ISREG(st.st_mode):
                raise ValueError(f"{what} is not a regular file")
        size = fs.size(path)
        if max_bytes is not None and size is not None and size > max_bytes:
            raise ValueError(f"{what} has {size:,} bytes, more than a checkpoint of this model "
                             f"can have ({max_bytes:,})")
        with fs.open(path, "rb") as f:
            data = f.read(-1 if max_bytes is None else max_bytes + 1)
    except FileNotFoundError:
        raise ValueError(f"{what} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"{what} is not a regular file") from None
    if max_bytes is not None and len(data) > max_bytes:
        raise ValueError(f"{what} is larger than a checkpoint of this model can be")
    return data


def load_checkpoint(
    url: str, model: nn.Module, storage_options: dict[str, Any] | None = None
) -> dict[str, torch.Tensor]:
    """Read a safetensors checkpoint from a path or fsspec URL, validated against `model`."""
    data = read_checkpoint(url, storage_options, checkpoint_limit(model))
    return state_from_safetensors(data, model, url)
