"""Next-token negative log-likelihood of a causal language model, with bounded memory.

The logits of a batch are batch × tokens × vocabulary floats: 64 sequences of 512 tokens over
SmolLM2's 49,152-word vocabulary are 6.4 GB in float32, and autograd would keep them for the
backward pass. `next_token_nll` runs the decoder once, then the output head and the
cross-entropy over chunks of positions, each chunk under activation checkpointing, so at most
one chunk's logits exist at a time, forward and backward. The numbers equal the plain
`model(ids).logits` computation (up to float summation order).

Works with any Hugging Face causal LM whose logits are `lm_head(final hidden state)`
(Llama, Mistral, Qwen, SmolLM, GPT-2, ...); models that transform the logits afterwards
(Gemma-2's soft-capping, Cohere's logit scale) take the plain path through `model(ids)`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["next_token_nll", "chunked_head_supported"]

# Config attributes that mean "the logits are not just lm_head(h)".
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")


def chunked_head_supported(model: nn.Module) -> bool:
    """True if the model's logits are its output embedding applied to the decoder's output."""
    cfg = getattr(model, "config", None)
    if cfg is None or model.get_output_embeddings() is None:
        return False
    if any(getattr(cfg, a, None) not in (None, 1, 1.0) for a in _LOGIT_TRANSFORMS):
        return False
    return hasattr(model, "base_model") or hasattr(model, "model")


def _decoder(model: nn.Module) -> nn.Module:
    # Hugging Face: `model.model` (Llama family) or `model.transformer` (GPT-2) via base_model.
    return model.base_model if hasattr(model, "base_model") else model.model


def _chunk_nll(head: nn.Module, h: torch.Tensor, targets: torch.Tensor,
               weight: torch.Tensor | None = None, bias: torch.Tensor | None = None
               ) -> torch.Tensor:
    """Sum over positions of -log p(target) for one chunk: h [B, C, H], targets [B, C] → [B].
    With `weight` (an nn.Linear head's, read in the forward), the logits are h·weightᵀ + bias:
    the backward's recomputation then uses the tensors of the forward, also where the head's
    weight was substituted only for the forward (a tied, quantized head under
    `torch.func.functional_call`)."""
    logits = (head(h) if weight is None else nn.functional.linear(h, weight, bias)).float()
    nll = nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return nll.sum(dim=1)


def next_token_nll(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    chunk_tokens: int = 128,
) -> torch.Tensor:
    """Per-sequence sum of −log p(x[t+1] | x[≤t]) over t = 0..L−2.

    input_ids: int64 [B, L] (L ≥ 2). Returns float32 [B], differentiable in the model's
    parameters. chunk_tokens: positions whose logits are materialised at once (memory is
    B × chunk_tokens × vocabulary floats, forward and backward).
    Divide by L − 1 for the mean per token; sum over sequences and divide by B·(L − 1) for
    the perplexity's exponent.
    """
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must be [batch, tokens ≥ 2], got {tuple(input_ids.shape)}")
    targets = input_ids[:, 1:]
    if not chunked_head_supported(model):
        logits = model(input_ids=input_ids, use_cache=False).logits[:, :-1].float()
        return nn.functional.cross_entropy(logits.transpose(1, 2), targets,
                                           reduction="none").sum(dim=1)
    # No KV cache: nothing is generated, and it would only hold memory.
    hidden = _decoder(model)(input_ids=input_ids, use_cache=False).last_hidden_state[:, :-1]
    head = model.get_output_embeddings()
    linear = type(head) is nn.Linear and not head._forward_hooks and not head._forward_pre_hooks
    wb = (head.weight, head.bias) if linear else (None, None)
    total = hidden.new_zeros(input_ids.shape[0], dtype=torch.float32)
    grad = torch.is_grad_enabled()
    for s in range(0, hidden.shape[1], chunk_tokens):
        h, t = hidden[:, s : s + chunk_tokens], targets[:, s : s + chunk_tokens]
        if grad:
            # Recompute this chunk's logits in the backward pass instead of keeping them.
            total = total + checkpoint(_chunk_nll, head, h, t, *wb, use_reentrant=False)
        else:
            total = total + _chunk_nll(head, h, t)
    return total
