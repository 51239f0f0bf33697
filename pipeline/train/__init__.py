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

__all__ = [
    "AdamState",
    "apply_masks",
    "kept_fraction",
    "magnitude_masks",
    "obd_saliency",
    "saliency_masks",
    "train_adam",
]

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
    state: dict[str, torch.Tensor], keep: dict[str, float], scope: str = "layer"
) -> dict[str, torch.Tensor]:
    """Keep the largest-|w| fraction `keep[name]` of each named tensor (ties broken by index).

    Returns {name: bool tensor of the tensor's shape}; see :func:`saliency_masks` for scope.
    """
    _check_names(state, keep)
    return saliency_masks({n: state[n].detach().abs() for n in keep}, keep, scope)


def obd_saliency(
    state: dict[str, torch.Tensor], hdiag: dict[str, torch.Tensor], names
) -> dict[str, torch.Tensor]:
    """Optimal Brain Damage saliency ½·h·w² of each weight (LeCun et al. 1990): the loss
    increase the diagonal quadratic model predicts when that weight alone is set to zero.

    hdiag: {name: the Hessian diagonal, same shape}; estimators whose diagonal can be
    negative (Hutchinson) are taken by magnitude, as the quantizers do.
    """
    _check_names(state, dict.fromkeys(names))
    out = {}
    for n in names:
        w = state[n].detach().double()
        h = hdiag[n].to(w.device, torch.float64).abs()
        if h.shape != w.shape:
            raise ValueError(f"Hessian of {n!r} has shape {tuple(h.shape)}, weights "
                             f"{tuple(w.shape)}")
        out[n] = 0.5 * h * w * w
    return out


def saliency_masks(
    scores: dict[str, torch.Tensor], keep: dict[str, float], scope: str = "layer"
) -> dict[str, torch.Tensor]:
    """Keep the highest-scoring weights: per tensor (`scope="layer"`: exactly
    max(1, round(keep·n)) of each) or across tensors (`"global"`: the same total,
    Σ round(keep·n), ranked together — every tensor keeps at least its best weight).
    Ties are broken by index. Returns {name: bool tensor of the score's shape}.
    """
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    flat = {n: scores[n].detach().flatten().double().cpu() for n in keep}
    n_keep = {n: max(1, int(round(r * flat[n].numel()))) for n, r in keep.items()}
    masks = {}
    if scope == "layer":
        for n, v in flat.items():
            m = torch.zeros(v.numel(), dtype=torch.bool)
            m[torch.topk(v, n_keep[n], sorted=False).indices] = True
            masks[n] = m
    else:
        names = list(flat)
        allv = torch.cat([flat[n] for n in names])
        # Each tensor's best weight first (so no layer is cut off), then the rest by score.
        sizes = [flat[n].numel() for n in names]
        starts = torch.tensor([0] + sizes[:-1]).cumsum(0)
        forced = torch.stack([flat[n].argmax() for n in names]) + starts
        boosted = allv.clone()
        boosted[forced] = float("inf")
        total = min(sum(n_keep.values()), allv.numel())
        m = torch.zeros(allv.numel(), dtype=torch.bool)
        m[torch.topk(boosted, total, sorted=False).indices] = True
        for n, part in zip(names, torch.split(m, sizes), strict=True):
            masks[n] = part
    return {n: m.view_as(scores[n]) for n, m in masks.items()}


def _check_names(state: dict[str, torch.Tensor], keep: dict) -> None:
    for name in keep:
        if name not in state:
            raise ValueError(
                f"prune.keep names {name!r}, which the model does not have; its tensors are "
                f"{sorted(state)}"
            )


def kept_fraction(model: nn.Module, masks: dict[str, torch.Tensor]) -> float:
    """Fraction of ALL parameters (biases and unpruned tensors count as kept) that are kept."""
    total = sum(p.numel() for p in model.parameters())
    pruned = sum(int((~m).sum()) for m in masks.values())
    return (total - pruned) / total
