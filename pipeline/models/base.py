"""What the pipeline needs to know about a kind of model: the `ModelAdapter` interface.

An adapter is a small dataclass holding the options of one model source (a checkpoint, a
Hugging Face folder, ...) and answering, for the module it loads: which weights are
quantized by default, along which axis a weight's output channels lie, the scalar loss of a
batch (Fisher estimation, fine-tuning), the repeated blocks in order (block streaming), and a
one-line description for reports.

Adapters register themselves by name with `@register("name")`. Nothing here imports every
adapter: `get_adapter(name)` imports the built-in adapter's module on first use (see
`_BUILTIN`), and `get_adapter("package.module:Class")` imports one's own.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from pipeline.errors import UserError

__all__ = [
    "ADAPTERS",
    "AdapterError",
    "ModelAdapter",
    "ModelInfo",
    "register",
    "get_adapter",
    "make_adapter",
    "adapter_names",
    "top_level_blocks",
]


class AdapterError(UserError, ValueError):
    """An unknown adapter name or invalid adapter options."""


@dataclass(frozen=True)
class ModelInfo:
    """What a report says about a model."""

    name: str  # the adapter's label of the model (its name, path or URL)
    params: int  # parameters, a tied weight counted once
    dtype: str  # e.g. "float32"; "bfloat16+float32" if mixed
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. model_type, layers

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "params": self.params, "dtype": self.dtype, **self.extra}


class ModelAdapter(ABC):
    """One kind of model, as the stages see it. Subclasses are dataclasses of their options.

    Methods taking `model` work on the module `load()` returned; `output_axis` and `describe`
    may omit it and then use the module this adapter loaded last (held weakly).
    """

    name: ClassVar[str] = ""  # the registry name, set by @register

    @abstractmethod
    def _load(self) -> nn.Module:
        """Build the module and load its weights."""

    def load(self) -> nn.Module:
        """The model with its weights loaded, in eval mode."""
        model = self._load()
        model.eval()
        self._last = weakref.ref(model)
        return model

    # -- what is quantized ------------------------------------------------------------------

    def default_quantizable(self, model: nn.Module) -> list[str]:
        """Parameter names quantized when no targets are given. Default: every weight with
        two or more dimensions (the LeNet rule)."""
        return [n for n, p in model.named_parameters() if n.endswith("weight") and p.dim() >= 2]

    def quantizable(
        self,
        model: nn.Module,
        targets: Sequence[str] | None = None,
        ignore: Sequence[str] = (),
    ) -> list[str]:
        """Parameter names to quantize, in model order.

        targets: patterns (see `pipeline.models.targets`); None = `default_quantizable`.
        ignore: patterns removed from the selection (each must match something).
        """
        from pipeline.models.targets import match_named_parameters

        if targets is None:
            chosen = self.default_quantizable(model)
            if not ignore:
                return chosen
            dropped = set(self._ignored(model, ignore))
            return [n for n in chosen if n not in dropped]
        return match_named_parameters(model, targets, ignore)

    @staticmethod
    def _ignored(model: nn.Module, ignore: Sequence[str]) -> list[str]:
        from pipeline.models.targets import match_named_parameters

        return match_named_parameters(model, ignore, where="ignore")

    def output_axis(self, name: str, model: nn.Module | None = None) -> int:
        """The output-channel axis of weight `name`: 0 for Linear/Conv, 1 for GPT-2 `Conv1D`
        and ConvTranspose."""
        from pipeline.models.targets import output_axis

        return output_axis(self._model(model), name)

    # -- training signal and structure --------------------------------------------------------

    @abstractmethod
    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Scalar (0-dim float32) mean loss of `batch`, differentiable in the parameters."""

    def blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The repeated blocks in forward order, as (module name, module). Default: the
        top-level children."""
        return top_level_blocks(model)

    def describe(self, model: nn.Module | None = None) -> ModelInfo:
        """Name, parameter count and dtype of the model."""
        model = self._model(model)
        dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})
        return ModelInfo(self.label(), sum(p.numel() for p in model.parameters()),
                         "+".join(dtypes) or "none")

    def label(self) -> str:
        """How reports name the model."""
        return self.name

    def _model(self, model: nn.Module | None) -> nn.Module:
        if model is not None:
            return model
        ref = getattr(self, "_last", None)
        got = ref() if ref is not None else None
        if got is None:
            raise RuntimeError(f"{type(self).__name__}: pass the model (none loaded yet)")
        return got


def top_level_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's direct children with parameters, in registration order."""
    return [(n, m) for n, m in model.named_children() if any(True for _ in m.parameters())]


# -- the registry -----------------------------------------------------------------------------

ADAPTERS: dict[str, type[ModelAdapter]] = {}

# Built-in adapters and the module whose import registers them: imported on first use only,
# so `import pipeline.models` never imports transformers.
_BUILTIN = {
    "lenet5": "pipeline.models.factory",
    "factory": "pipeline.models.factory",
    "hf_causal_lm": "pipeline.models.hf_causal",
}

A = TypeVar("A", bound=type[ModelAdapter])


def register(name: str) -> Callable[[A], A]:
    """Class decorator: make the adapter available as `get_adapter(name)`."""

    def deco(cls: A) -> A:
        if not (isinstance(cls, type) and issubclass(cls, ModelAdapter)):
            raise TypeError(f"@register({name!r}) decorates a ModelAdapter subclass")
        old = ADAPTERS.get(name)
        if old is not None and old.__qualname__ != cls.__qualname__:
            raise ValueError(f"adapter name {name!r} is taken by {old.__module__}.{old.__qualname__}")
        cls.name = name
        ADAPTERS[name] = cls
        return cls

    return deco


def adapter_names() -> list[str]:
    """Every adapter name available without an import path."""
    return sorted(set(ADAPTERS) | set(_BUILTIN))


def get_adapter(name: str) -> type[ModelAdapter]:
    """The adapter class registered as `name`, or the class at "package.module:Class"."""
    if name in ADAPTERS:
        return ADAPTERS[name]
    if name in _BUILTIN:
        importlib.import_module(_BUILTIN[name])
        return ADAPTERS[name]
    if ":" in name:
        from pipeline.user_code import import_object

        cls = import_object(name, what="model adapter")
        if not (isinstance(cls, type) and issubclass(cls, ModelAdapter)):
            raise AdapterError(f"{name!r} is not a ModelAdapter subclass (got {cls!r})")
        return cls
    near = difflib.get_close_matches(name, adapter_names(), n=1)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    raise AdapterError(f"unknown model adapter {name!r}{hint} (known: {', '.join(adapter_names())}; "
                       "or give 'package.module:AdapterClass')")


def make_adapter(name: str, **options: Any) -> ModelAdapter:
    """An adapter instance from its name and options; unknown options are a clear error."""
    cls = get_adapter(name)
    if dataclasses.is_dataclass(cls):
        known = [f.name for f in dataclasses.fields(cls) if f.init]
        for key in options:
            if key not in known:
                near = difflib.get_close_matches(key, known, n=1)
                hint = f"; did you mean {near[0]!r}?" if near else ""
                raise AdapterError(f"model adapter {name!r} has no option {key!r}{hint} "
                                   f"(options: {', '.join(known)})")
    try:
        return cls(**options)
    except TypeError as e:
        raise AdapterError(f"model adapter {name!r}: {e}") from None
