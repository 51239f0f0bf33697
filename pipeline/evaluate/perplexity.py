"""Perplexity of a causal language model on token windows.

Each window of L tokens predicts its last L − 1 tokens from the ones before (no context
carried across windows, no BOS added: the windows are what `eval_windows` cut).
ppl = exp(Σ NLL / Σ predicted tokens) over all windows, NLL in nats, summed in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["perplexity"]


@torch.no_grad()
def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int = 8,
    chunk_tokens: int = 128,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Perplexity of `model` on int64 [m, L] windows (L ≥ 2).

    Returns {"ppl", "nll" (total, nats), "nll_per_token", "tokens" (= m·(L−1)), "windows"}.
    Runs in eval mode without gradients and restores the model's training flag.
    progress(windows_done, windows_total) is called after each batch.
    """
    from pipeline.models.lm_loss import next_token_nll

    if windows.dim() != 2 or windows.shape[1] < 2 or windows.shape[0] < 1:
        raise ValueError(f"windows must be [m ≥ 1, L ≥ 2] token ids, got {tuple(windows.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    m, length = windows.shape
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        for s in range(0, m, batch_size):
            ids = windows[s : s + batch_size].to(device=device, dtype=torch.long)
            total += float(next_token_nll(model, ids, chunk_tokens=chunk_tokens)
                           .double().sum())
            if progress is not None:
                progress(min(s + batch_size, m), m)
    finally:
        model.train(was_training)
    tokens = m * (length - 1)
    mean = total / tokens
    return {"ppl": math.exp(mean), "nll": total, "nll_per_token": mean, "tokens": tokens,
            "windows": m}
