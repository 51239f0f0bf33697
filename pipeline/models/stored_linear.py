"""Decoder Linears that keep the checkpoint's 16-bit weights while the block computes in float32.

The streamed Fisher runs a block in float32 (its gradients are squared and summed in
float32), but a 16-bit checkpoint's weights widen exactly to float32: holding them as stored
and widening one matrix at a time inside the Linear's call gives the same products as a block
widened as a whole, with half the block's weight memory (a 7B block: 0.4 GB instead of 0.8).

`StoredLinear` is an ``nn.Linear`` whose ``weight`` may be bfloat16 or float16 while its
input is float32. With ``sums`` set and autograd recording, the call is
`_SquaredWeightGrad`: its backward forms the weight's gradient of this call in float32,
adds its square into ``sums`` and keeps nothing; the weight itself never takes a gradient
(a 16-bit gradient would round the Fisher). Autograd reaches that backward through
``anchor``, an empty tensor that requires a gradient, so a block whose input takes no
gradient (the first block of a range) still runs it.

Each call's gradient is squared on its own, which is the window's gradient only when the
Linear is called once per forward (every decoder block hwq knows); `uses` counts the calls
so the estimator can refuse a block that calls one twice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["StoredLinear", "use_stored_linears"]


class _SquaredWeightGrad(torch.autograd.Function):
    """y = x·Wᵀ + b with W widened to x's dtype; backward adds (∂/∂W)² into ``sums``."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, anchor: Tensor,
                sums: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.sums = sums
        return F.linear(x, weight.to(x.dtype), bias)

    @staticmethod
    def backward(ctx, g: Tensor):
        x, weight = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])
        gw = g2.t().mm(x.reshape(-1, x.shape[-1]))  # [out, in] in the compute dtype
        ctx.sums.addcmul_(gw, gw)
        del gw
        gx = g.matmul(weight.to(g.dtype)) if ctx.needs_input_grad[0] else None
        gb = g2.sum(0) if ctx.needs_input_grad[2] else None
        return gx, None, gb, None, None


class StoredLinear(nn.Linear):
    """An nn.Linear whose weight may stay in a 16-bit dtype (widened per call), optionally
    squaring its weight's gradient into ``sums`` (see the module docstring)."""

    sums: Tensor | None = None
    anchor: Tensor | None = None
    uses: int = 0

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if self.sums is not None and torch.is_grad_enabled():
            self.uses += 1
            return _SquaredWeightGrad.apply(x, w, self.bias, self.anchor, self.sums)
        return F.linear(x, w.to(x.dtype), self.bias)  # (no copy when the dtypes agree)


def use_stored_linears(root: nn.Module) -> list[str]:
    """Make every plain nn.Linear under `root` a StoredLinear (same parameters, same
    behaviour until its weight is given a 16-bit dtype); returns their weights' names
    relative to `root`."""
    names = []
    for name, m in root.named_modules():
        if type(m) is nn.Linear:
            m.__class__ = StoredLinear
            names.append(f"{name}.weight" if name else "weight")
    return names
