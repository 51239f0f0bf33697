"""Training and pruning: plain functions over a module and in-memory data.

`train_adam` trains with Adam and returns the optimiser's second moments (the paper's
zero-cost Hessian alternative needs them). `magnitude_masks` and `prune_and_retrain` do
Han et al.'s magnitude pruning with masked retraining.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
from torch import nn

from pipeline.data import Split, batches

__all__ = ["AdamState", "train_adam", "magnitude_masks", "apply_masks", "kept_fraction"]

log = logging.getLogger(__name__)


class AdamState(dict):
    """exp_avg_sq per parameter name ([shape] float32) plus the step count and beta2."""

    step: int = 0
    beta2: float = 0.999


def train_adam(
    model: nn.Module,
    data: Split,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    beta2: float = 0.999,
    weight_decay: float = 0.0,
    lr_decay: float = 1.0,
    seed: int = 0,
    masks: dict[str, torch.Tensor] | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
    on_batch: Callable[[], None] | None = None,
) -> AdamState:
    """Train `model` in place with Adam on cross-entropy; returns the final Adam state.

    masks: {param name: bool tensor}; masked-out weights get no gradient and stay exactly 0.
    on_epoch(epoch, mean_loss) is called after each epoch (for progress and logs).
    """
    params = dict(model.named_parameters())
    device = next(model.parameters()).device  # a GPU when the task was given one
    masks = {k: m.to(device) for k, m in (masks or {}).items()}
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, beta2),
                           weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=lr_decay)
    apply_masks(model, masks)
    model.train()
    for epoch in range(epochs):
        t0 = time.perf_counter()
        total, n = 0.0, 0
        for x, y in batches(data, batch_size, shuffle=True, seed=seed * 1000 + epoch):
            x, y = x.to(device), y.to(device)
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            for name, m in masks.items():
                params[name].grad.mul_(m)
            opt.step()
            # Adam's update moves zero-gradient weights by its momentum: re-zero them.
            apply_masks(model, masks)
            total += loss.item() * len(y)
            n += len(y)
            if on_batch:
                on_batch()
        sched.step()
        if on_epoch:
            on_epoch(epoch, total / max(n, 1))
        log.debug("epoch %d: loss %.4f (%.1f s)", epoch, total / max(n, 1),
                  time.perf_counter() - t0)
    state = AdamState()
    step = 0
    for name, p in params.items():
        st = opt.state.get(p, {})
        if "exp_avg_sq" in st:
            state[name] = st["exp_avg_sq"].detach().cpu().clone()
            step = int(st["step"])
    state.step, state.beta2 = step, beta2
    return state


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for name, m in masks.items():
        params[name].mul_(m)


def magnitude_masks(
    state: dict[str, torch.Tensor], keep: dict[str, float]
) -> dict[str, torch.Tensor]:
    """Keep the largest-|w| fraction `keep[name]` of each named tensor (ties broken by index).

    Returns {name: bool tensor of the tensor's shape}; exactly round(keep·n) entries are True.
    """
    masks = {}
    for name, ratio in keep.items():
        if name not in state:
            raise ValueError(
                f"prune.keep names {name!r}, which the model does not have; its tensors are "
                f"{sorted(state)}"
            )
        w = state[name].detach().flatten().abs()
        n_keep = max(1, int(round(ratio * w.numel())))
        idx = torch.topk(w, n_keep, sorted=False).indices
        m = torch.zeros(w.numel(), dtype=torch.bool)
        m[idx] = True
        masks[name] = m.view_as(state[name])
    return masks


def kept_fraction(model: nn.Module, masks: dict[str, torch.Tensor]) -> float:
    """Fraction of ALL parameters (biases and unpruned tensors count as kept) that are kept."""
    total = sum(p.numel() for p in model.parameters())
    pruned = sum(int((~m).sum()) for m in masks.values())
    return (total - pruned) / total
