"""The quantized-model artifact: what `quantize` writes and `finetune`/`encode` read.

Files in a quantize (or finetune) stage folder:

- `codebooks.safetensors` — {codebook name: float32 [k] (network/layer scope) or [rows, k]
  (channel scope: row r of the tensor uses codebook row r)}. Network scope has one codebook,
  "network"; layer and channel scopes name each codebook after its tensor.
- `indices.safetensors` — {tensor name: integer tensor of the parameter's full shape} (uint8
  when k ≤ 256, else int32, as safetensors has no uint16): the cluster index of every
  element. Pruned positions hold 0 and are ignored (the mask says which are kept).
- `quantized.json` — {"scope", "method", "tensors": {name: {"codebook": str}}, "raw": [names
  kept in fp32, e.g. biases], "masked": [names one-shot pruning cut]}.
- `masks.safetensors` — only when "masked" names tensors: {name: uint8 of the parameter's
  shape, 1 = kept}, the masks one-shot pruning chose in this stage (a retrained model's
  masks are the prune stage's).

The dense weight of a quantized tensor is `codebook[index] * mask` (channel scope: `codebook[r,
index[r, c]]`); everything else comes from the model stage's dense state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pipeline.store import StageDir

__all__ = ["QuantizedModel", "gather_weights"]


class _Gather(torch.autograd.Function):
    """codebook[index] that keeps only the (uint8) index for backward: torch.gather would
    save an int64 copy, 8 bytes a weight (850 MB for a 106M-weight language model)."""

    @staticmethod
    def forward(ctx, codebook: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.cb_shape = codebook.shape
        return _lookup(codebook, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        idx = index.long()
        out = torch.zeros(ctx.cb_shape, dtype=grad.dtype, device=grad.device)
        if len(ctx.cb_shape) == 1:
            out.index_add_(0, idx.reshape(-1), grad.reshape(-1))
        else:
            rows = ctx.cb_shape[0]
            out.scatter_add_(1, idx.reshape(rows, -1), grad.reshape(rows, -1))
        return out, None


def _lookup(codebook: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    idx = index.long()
    if codebook.dim() == 1:
        return codebook[idx]
    rows = codebook.shape[0]
    return torch.gather(codebook, 1, idx.reshape(rows, -1)).reshape(index.shape)


def gather_weights(codebook: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Shared values of `index` (any shape): codebook [k] → codebook[index]; codebook [rows, k]
    → row r of index [rows, ...] looks up codebook[r] (codebook rows that split each tensor
    row into groups: consecutive groups). Differentiable in `codebook` (the gradient of a
    centre is the sum of its members' gradients)."""
    if codebook.requires_grad and torch.is_grad_enabled():
        return _Gather.apply(codebook, index)
    return _lookup(codebook, index)


@dataclass
class QuantizedModel:
    scope: str
    method: str
    codebooks: dict[str, torch.Tensor]  # float32
    indices: dict[str, torch.Tensor]  # integer, full parameter shape
    assignment: dict[str, str]  # tensor name -> codebook name
    raw: list[str] = field(default_factory=list)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # bool, one-shot pruning's

    def all_masks(self, masks: dict[str, torch.Tensor] | None = None
                  ) -> dict[str, torch.Tensor]:
        """The prune stage's `masks` with this stage's one-shot masks added."""
        return {**(masks or {}), **self.masks}

    def dense_state(
        self, base: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """A full state dict: quantized tensors rebuilt, the rest taken from `base`."""
        masks = self.all_masks(masks)
        state = {k: v.clone() for k, v in base.items()}
        for name, cb in self.assignment.items():
            w = gather_weights(self.codebooks[cb], self.indices[name]).to(base[name].dtype)
            if name in masks:
                w = w * masks[name].to(w.dtype)
            state[name] = w
        return state

    def write(self, sd: StageDir) -> None:
        def compact(v: torch.Tensor) -> torch.Tensor:
            top = int(v.max()) if v.numel() else 0
            return v.to(torch.uint8) if top < 256 else v.to(torch.int32)

        idx = {k: compact(v) for k, v in self.indices.items()}
        sd.write_safetensors("codebooks.safetensors",
                             {k: v.float() for k, v in self.codebooks.items()})
        sd.write_safetensors("indices.safetensors", idx)
        sd.write_json("quantized.json", {
            "scope": self.scope, "method": self.method,
            "tensors": {k: {"codebook": v} for k, v in self.assignment.items()},
            "raw": sorted(self.raw),
            **({"masked": sorted(self.masks)} if self.masks else {}),
        })
        if self.masks:
            sd.write_safetensors("masks.safetensors",
                                 {k: v.to(torch.uint8) for k, v in self.masks.items()})

    @classmethod
    def read(cls, sd: StageDir, codebooks_from: StageDir | None = None) -> QuantizedModel:
        """Read from a quantize folder; `codebooks_from` (a finetune folder) replaces the
        codebooks with fine-tuned ones."""
        meta = sd.read_json("quantized.json")
        try:
            scope, method = str(meta["scope"]), str(meta["method"])
            assignment = {str(k): str(v["codebook"]) for k, v in meta["tensors"].items()}
            raw = [str(r) for r in meta.get("raw", [])]
            masked = [str(r) for r in meta.get("masked", [])]
        except (KeyError, TypeError, AttributeError) as e:
            raise sd._corrupt("quantized.json", f"not a quantized-model description ({e!r})"
                              ) from None
        cbs = (codebooks_from or sd).read_safetensors("codebooks.safetensors")
        idx = sd.read_safetensors("indices.safetensors")
        for name, cb in assignment.items():
            if name not in idx or cb not in cbs:
                raise sd._corrupt("quantized.json", f"names {name!r} / codebook {cb!r}, which "
                                  "the safetensors files do not hold")
        masks = {}
        if masked:
            m = sd.read_safetensors("masks.safetensors")
            for name in masked:
                if name not in assignment or name not in m or m[name].dtype != torch.uint8 \
                        or tuple(m[name].shape) != tuple(idx[name].shape) \
                        or bool((m[name] > 1).any()):
                    raise sd._corrupt("masks.safetensors", f"has no 0/1 mask of the shape of "
                                      f"{name!r}")
                masks[name] = m[name].bool()
        return cls(scope=scope, method=method, codebooks=cbs, indices=idx,
                   assignment=assignment, raw=raw, masks=masks)
