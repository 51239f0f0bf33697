"""Train only the shared values: a module whose quantized weights are codebook look-ups.

`QuantizedTrainable(model, quantized, masks)` wraps a model so that, in every forward, each
quantized weight is rebuilt as `where(mask, gather_weights(codebook, index), 0)` and handed to
the model with `torch.func.functional_call`. The codebooks are the only trainable parameters
(an `nn.ParameterDict`); indices, masks and member counts are non-persistent buffers that no
optimizer sees, so indices and masks never change and pruned weights are exactly zero
(`where`, not a product, so not even a non-finite centre can leak into a pruned position).
The quantized tensors are removed from the wrapped model's parameters, so neither an
optimizer nor DeepSpeed holds a dense copy of them.

Gradient of a centre (paper, section "fine-tuning the shared values"):

- ``grad="sum"``: the sum of its members' gradients — exactly what the backward of indexing
  gives, since a centre is read once per member;
- ``grad="mean"``: that sum divided by the number of *kept* members of the centre (over every
  tensor that shares the codebook) — a per-centre learning-rate scale. It is applied by an
  identity autograd function whose backward scales, so the forward values are bit-for-bit those
  of ``sum``.

DeepSpeed: the wrapper is an ordinary module whose trainable parameters are plain leaf
tensors used directly in forward, so DeepSpeed's ZeRO stages 0–2 (which flatten and partition
the optimizer's parameters and its state, not the module structure) work unchanged, with fp32
or bf16 (`module.bfloat16()` casts the codebooks; integer/bool buffers stay as they are).
ZeRO-3 partitions module parameters and gathers a module's *own* parameters in that module's
forward hooks; see `pipeline.finetune.stage` for what was found with stage 3.

Plain torch, no Ray: testable in-process.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
from torch import nn
from torch.func import functional_call

from pipeline.quantize.artifacts import QuantizedModel, gather_weights

__all__ = ["QuantizedTrainable", "member_counts"]


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by `scale` (same shape as x)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:  # noqa: D102
        ctx.save_for_backward(scale)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        (scale,) = ctx.saved_tensors
        return grad * scale.to(grad.dtype), None


def member_counts(
    quantized: QuantizedModel, masks: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Kept members of every centre: {codebook name: int64 tensor of the codebook's shape}.

    Codebook [k]: counts[j] = number of kept elements, over all tensors assigned to it, whose
    index is j. Codebook [rows, k] (channel scope): counts[r, j] over row r of its tensor.
    A tensor with no mask counts every element as kept.
    """
    out: dict[str, torch.Tensor] = {}
    for name, cb_name in quantized.assignment.items():
        cb = quantized.codebooks[cb_name]
        counts = out.setdefault(cb_name, torch.zeros(cb.shape, dtype=torch.int64))
        idx = quantized.indices[name].long()
        kept = masks[name].bool() if name in masks else torch.ones_like(idx, dtype=torch.bool)
        if cb.dim() == 1:
            counts += torch.bincount(idx[kept], minlength=cb.shape[0])[: cb.shape[0]]
        else:
            rows = cb.shape[0]
            counts.scatter_add_(1, idx.reshape(rows, -1), kept.reshape(rows, -1).long())
    return out


class QuantizedTrainable(nn.Module):
    """`model` with its quantized weights rebuilt from trainable codebooks in every forward.

    model: the dense model, its state already loaded (unquantized tensors are taken from it;
        the quantized ones are removed from its parameters — the model is modified in place).
    quantized: codebooks {name: float [k] or [rows, k]}, indices {tensor: int [param shape]},
        assignment {tensor: codebook name} (see `pipeline.quantize.artifacts`).
    masks: {tensor name: bool [param shape]}, True = kept; tensors not named are unpruned.
    grad: "sum" (paper) or "mean" (divide by each centre's kept-member count).
    train_unquantized: leave the model's other parameters (biases, raw tensors) trainable;
        by default they are frozen (requires_grad False), so only the codebooks train.

    Trainable parameters: `codebooks.c{i}` (float32 as given), the i-th of `codebook_names`.
    """

    def __init__(
        self,
        model: nn.Module,
        quantized: QuantizedModel,
        masks: Mapping[str, torch.Tensor] | None = None,
        *,
        grad: Literal["sum", "mean"] = "sum",
        train_unquantized: bool = False,
    ):
        super().__init__()
        if grad not in ("sum", "mean"):
            raise ValueError(f"grad must be 'sum' or 'mean', got {grad!r}")
        masks = dict(masks or {})
        params = dict(model.named_parameters())
        for name, cb_name in quantized.assignment.items():
            if name not in params:
                raise ValueError(f"quantized tensor {name!r} is not a parameter of the model")
            shape = tuple(params[name].shape)
            if tuple(quantized.indices[name].shape) != shape:
                raise ValueError(f"indices of {name!r} have shape "
                                 f"{tuple(quantized.indices[name].shape)}, the weight {shape}")
            cb = quantized.codebooks[cb_name]
            numel = int(torch.tensor(shape).prod()) if shape else 1
            if cb.dim() == 2 and (cb.shape[0] % max(shape[0], 1) or numel % cb.shape[0]):
                raise ValueError(f"codebook {cb_name!r} has {cb.shape[0]} rows, "
                                 f"tensor {name!r} has {shape[0]} (channel) and {numel} "
                                 "elements (group rows must divide them)")
            if name in masks and tuple(masks[name].shape) != shape:
                raise ValueError(f"mask of {name!r} has shape {tuple(masks[name].shape)}")

        self.model = model
        self.grad = grad
        # ParameterDict keys may not contain "." (layer/channel codebooks are named after their
        # tensor, e.g. "fc1.weight"): use positional keys and keep the real names in order.
        self.codebook_names: list[str] = list(dict.fromkeys(quantized.assignment.values()))
        self.codebooks = nn.ParameterDict({
            f"c{i}": nn.Parameter(quantized.codebooks[n].detach().float().clone())
            for i, n in enumerate(self.codebook_names)
        })
        self._cb_index = {n: i for i, n in enumerate(self.codebook_names)}
        self.tensor_names: list[str] = list(quantized.assignment)
        self._assignment = dict(quantized.assignment)
        # Non-persistent: they come from the quantize artifact, never change, and need not be
        # in a (DeepSpeed) checkpoint of the trainable state.
        for j, name in enumerate(self.tensor_names):
            self.register_buffer(f"index{j}", quantized.indices[name].clone(), persistent=False)
            m = masks.get(name)
            self.register_buffer(f"mask{j}", None if m is None else m.bool().clone(),
                                 persistent=False)
        if grad == "mean":
            counts = member_counts(quantized, masks)
            for i, n in enumerate(self.codebook_names):
                # int64, so a bf16 cast of the module leaves the divisor exact.
                self.register_buffer(f"count{i}", counts[n], persistent=False)

        # Tied weights (an LM's embedding and head): every other place the same parameter is
        # registered reads the rebuilt weight too, so it is removed there as well.
        self._aliases: dict[str, list[str]] = {n: [] for n in self.tensor_names}
        for mod_name, mod in model.named_modules(remove_duplicate=False):
            for leaf, p in mod.named_parameters(recurse=False):
                full = f"{mod_name}.{leaf}" if mod_name else leaf
                for name in self.tensor_names:
                    if p is params[name] and full != name:
                        self._aliases[name].append(full)
        for name in self.tensor_names:
            for full in [name, *self._aliases[name]]:
                owner, leaf = _split(model, full)
                # rebuilt in forward; no dense copy to train or store
                owner._parameters.pop(leaf, None)
        for p in model.parameters():
            p.requires_grad_(train_unquantized)

    # -- forward ------------------------------------------------------------------------------
    def _codebook(self, i: int) -> torch.Tensor:
        cb = self.codebooks[f"c{i}"]
        if self.grad == "mean":
            count = getattr(self, f"count{i}")
            cb = _ScaleGrad.apply(cb, 1.0 / count.clamp(min=1).to(torch.float32))
        return cb

    def quantized_weights(self) -> dict[str, torch.Tensor]:
        """{tensor name: weight [param shape]} rebuilt from the codebooks (codebook dtype),
        differentiable in the codebooks; pruned positions are exactly 0."""
        cbs = [self._codebook(i) for i in range(len(self.codebook_names))]
        out = {}
        for j, name in enumerate(self.tensor_names):
            w = gather_weights(cbs[self._cb_index[self._assignment[name]]],
                               getattr(self, f"index{j}"))
            mask = getattr(self, f"mask{j}")
            if mask is not None:
                w = torch.where(mask, w, torch.zeros((), dtype=w.dtype, device=w.device))
            out[name] = w
        return out

    def forward(self, *args, loss_fn=None, **kwargs):
        """The model's forward with the quantized weights; with `loss_fn`, the scalar
        `loss_fn(model, *args)` computed with them instead (a model adapter's loss, which may
        call the model's parts rather than its forward)."""
        weights = self.quantized_weights()
        # The model's own dtype (a bf16 checkpoint stays bf16 while the codebooks train in
        # fp32): a Linear whose weight and input differ in dtype fails in the matmul.
        ref = next((p.dtype for p in self.model.parameters() if p.is_floating_point()), None)
        if ref is not None:
            weights = {n: w if w.dtype == ref else w.to(ref) for n, w in weights.items()}
        for name, aliases in self._aliases.items():
            for a in aliases:
                weights[a] = weights[name]
        if loss_fn is None:
            return functional_call(self.model, weights, args, kwargs, strict=False)
        wrapper = _WithLoss(self.model, loss_fn)
        return functional_call(wrapper, {f"model.{k}": v for k, v in weights.items()}, args,
                               kwargs, strict=False)

    # -- state ----------------------------------------------------------------------------------
    @torch.no_grad()
    def codebook_state(self) -> dict[str, torch.Tensor]:
        """{codebook name: float32 tensor [k] or [rows, k]} (detached copies, on CPU)."""
        return {n: self.codebooks[f"c{i}"].detach().float().cpu().clone()
                for i, n in enumerate(self.codebook_names)}

    @torch.no_grad()
    def load_codebooks(self, codebooks: Mapping[str, torch.Tensor]) -> None:
        """Overwrite the codebooks in place (same names and shapes as `codebook_state`)."""
        for i, n in enumerate(self.codebook_names):
            self.codebooks[f"c{i}"].copy_(codebooks[n])

    @torch.no_grad()
    def dense_state(self) -> dict[str, torch.Tensor]:
        """The full state dict of the wrapped model (float32, CPU) with the quantized weights
        rebuilt: loadable into a fresh instance of the model."""
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        for k, v in self.quantized_weights().items():
            state[k] = v.detach().float().cpu()
        return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


class _WithLoss(nn.Module):
    """`loss_fn(model, batch)` as a module's forward, so functional_call can substitute the
    model's weights for it."""

    def __init__(self, model: nn.Module, loss_fn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, *args, **kwargs):
        return self.loss_fn(self.model, *args, **kwargs)


def _split(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    prefix, _, leaf = name.rpartition(".")
    return (model.get_submodule(prefix) if prefix else model), leaf
