"""Models built by one's own code: `model.factory: "package.module:function"`.

`import_object("pkg.mod:attr")` resolves such paths (also for `data` and `evaluate` hooks),
with one-line errors saying whether the module or the attribute is missing. The `factory`
adapter calls the function, checks it returned an `nn.Module`, and loads an optional
safetensors checkpoint (never a pickle). `lenet5` is the same adapter with the built-in LeNet-5.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pipeline.models.base import ModelAdapter, register
from pipeline.user_code import (
    ImportPathError,
    UserCodeError,
    call_user,
    import_callable,
    import_object,
    user_code_error,
)

__all__ = ["ImportPathError", "import_object", "import_callable", "FactoryAdapter",
           "LeNet5Adapter"]


def _cross_entropy(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x).float(), y)


def _next_token(model: nn.Module, batch: Any) -> torch.Tensor:
    from pipeline.models.lm_loss import next_token_nll

    ids = batch["input_ids"] if isinstance(batch, dict) else batch
    return next_token_nll(model, ids).sum() / (ids.shape[0] * (ids.shape[1] - 1))


_LOSSES: dict[str, Callable[[nn.Module, Any], torch.Tensor]] = {
    "cross_entropy": _cross_entropy,  # batch = (x float, y int64 [B]); mean over B
    "next_token": _next_token,  # batch = int64 [B, L]; mean over B·(L−1) predicted tokens
}


@register("factory")
@dataclass
class FactoryAdapter(ModelAdapter):
    """A module from `factory()` (plus `kwargs`), optionally with a safetensors checkpoint.

    loss: "cross_entropy" (batch = (x, y)), "next_token" (batch = int64 [B, L]) or
    "package.module:function" taking (model, batch) and returning a scalar tensor.
    """

    factory: str
    checkpoint: str | None = None  # safetensors file: path or fsspec URL
    kwargs: dict[str, Any] = field(default_factory=dict)
    loss_fn: str = "cross_entropy"
    storage_options: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.loss_fn not in _LOSSES and ":" not in self.loss_fn:
            raise ImportPathError(f"model.loss_fn {self.loss_fn!r}: one of {sorted(_LOSSES)} or "
                                  "'package.module:function'")

    def _load(self) -> nn.Module:
        fn = import_callable(self.factory, "model.factory")
        try:
            model = fn(**self.kwargs)
        except TypeError as e:
            raise ImportPathError(f"model.factory {self.factory!r}: {e}") from None
        except Exception as e:  # noqa: BLE001 - the user's code failed: say where, once
            err = user_code_error(f"model.factory {self.factory!r}", e)
            if err is None:
                raise
            raise err from e
        if not isinstance(model, nn.Module):
            raise ImportPathError(f"model.factory {self.factory!r} returned a "
                                  f"{type(model).__name__}, not a torch.nn.Module")
        if self.checkpoint:
            from pipeline.models import load_checkpoint

            state = load_checkpoint(self.checkpoint, model, self.storage_options)
            model.load_state_dict(state, strict=True)
        return model

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The scalar loss of `model` on `batch`. An error of the user's loss function, or of
        the user's model inside a built-in loss, is a UserCodeError naming the setting."""
        fn = _LOSSES.get(self.loss_fn)
        if fn is None:
            fn, what = import_callable(self.loss_fn, "model.loss_fn"), \
                f"model.loss_fn {self.loss_fn!r}"
        elif self.factory.startswith("pipeline."):  # hwq's own model and loss: a bug is ours
            return fn(model, batch)
        else:
            what = f"model.loss_fn {self.loss_fn!r} on the model of model.factory {self.factory!r}"
        loss = call_user(what, fn, model, batch)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            got = (f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor)
                   else f"a {type(loss).__name__}")
            raise UserCodeError(f"{what} returned {got}, not a scalar tensor")
        return loss

    def label(self) -> str:
        return self.factory


@register("lenet5")
@dataclass
class LeNet5Adapter(FactoryAdapter):
    """The built-in Caffe LeNet-5; batches are (x [B, 1, 28, 28] float32, y [B] int64)."""

    factory: str = "pipeline.models.lenet:LeNet5"

    def label(self) -> str:
        return "lenet5"
