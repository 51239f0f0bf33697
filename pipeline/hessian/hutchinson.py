"""Hutchinson's estimator of the Hessian diagonal, ``E[z ⊙ H z]`` with Rademacher probes ``z``.

Unbiased for the true Hessian diagonal (which can be negative; the sums are returned raw), one
Hessian-vector product per probe through a double backward of the batch's summed loss. The entry
point is ``estimators.estimate_diag(..., "hutchinson")``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.hessian.persample import check_logits

__all__ = ["hutchinson_batch"]


def hutchinson_batch(
    model: nn.Module,
    named: list[tuple[str, Tensor]],
    x: Tensor,
    y: Tensor,
    n_samples: int,
    gen: torch.Generator,
) -> dict[str, Tensor]:
    """``(1/R) Σ_r z_r ⊙ H z_r`` for the Hessian of this batch's summed loss (group block)."""
    with torch.enable_grad():
        logits = check_logits(model(x), x.shape[0])
        if y.shape != logits.shape[:-1]:
            raise ValueError(
                f"labels must be class indices shaped {tuple(logits.shape[:-1])}, "
                f"got {tuple(y.shape)}"
            )
        # Summed, not mean, loss: batches then add up to the Hessian of the total loss.
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), y.reshape(-1).long(), reduction="sum"
        )
        tensors = [p for _, p in named]
        grads = torch.autograd.grad(loss, tensors, create_graph=True, allow_unused=True)
    # A gradient that does not depend on the parameters (or a param the loss never touches)
    # has a zero Hessian row.
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    out = [torch.zeros_like(p) for p in tensors]
    for r in range(n_samples):
        # Draw a probe for every group param (also dead ones) so the stream stays aligned.
        zs = [_rademacher(p, gen) for p in tensors]
        if live:
            hz = torch.autograd.grad(
                [grads[i] for i in live],
                [tensors[i] for i in live],
                grad_outputs=[zs[i] for i in live],
                retain_graph=r + 1 < n_samples,
                allow_unused=True,
            )
            for i, h in zip(live, hz, strict=True):
                if h is not None:
                    out[i] += zs[i] * h
    return {name: o / n_samples for (name, _), o in zip(named, out, strict=True)}


def _rademacher(like: Tensor, gen: torch.Generator) -> Tensor:
    bits = torch.randint(0, 2, like.shape, generator=gen, device=like.device, dtype=torch.int8)
    return (bits * 2 - 1).to(like.dtype)
