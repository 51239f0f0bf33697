"""Model registry and checkpoint loading.

`build(name)` returns a freshly initialised module; `load_checkpoint(url, ...)` reads a
safetensors file from any fsspec URL (local path, s3://...) into a state dict.

Model adapters (`pipeline.models.base`): `make_adapter("hf_causal_lm", path=...)` and friends
say how to load a kind of model, which weights to quantize, its loss and its blocks; adapter
modules are imported on first use, so importing this package stays light.
"""

from __future__ import annotations

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


def load_checkpoint(
    url: str, model: nn.Module, storage_options: dict[str, Any] | None = None
) -> dict[str, torch.Tensor]:
    """Read a safetensors checkpoint from a path or fsspec URL, validated against `model`."""
    import fsspec

    try:
        with fsspec.open(url, "rb", **(storage_options or {})) as f:
            data = f.read()
    except FileNotFoundError:
        raise ValueError(f"model.checkpoint {url!r} does not exist") from None
    return state_from_safetensors(data, model, url)
