"""Mean next-token KL divergence of a quantized model from the unquantized one (llama.cpp's
``--kl-divergence`` measure), beside perplexity, with both models streamed.

For every predicted position t of every evaluation window (the positions perplexity counts),
``KL_t = Σ_v P(v) (log P(v) − log Q(v))`` with P the unquantized model's next-token
distribution and Q the quantized one's; the metric is the mean over positions, in nats.

Exact KL needs both full distributions at every position, and the unquantized logits of an
evaluation set are far too large to keep (positions × vocabulary floats). So the reference is
recomputed: :func:`streamed_perplexity_kl` runs both models block by block side by side (one
block of each resident at a time, the hidden states of both for the set's windows), then the
final norm and head of each over ``batch`` windows and ``chunk_tokens`` positions at a time,
so at most one chunk's logits of each model exist. The quantized model's perplexity comes out
of the same pass. Cost: one more streamed forward of the unquantized model per evaluation.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = ["chunk_kl", "streamed_perplexity_kl"]


def chunk_kl(ref_logits: Tensor, logits: Tensor) -> Tensor:
    """Σ over the positions of KL(P_ref ‖ P) per sequence: logits [B, T, V] → float64 [B]."""
    lp = torch.log_softmax(ref_logits.float(), dim=-1)
    lq = torch.log_softmax(logits.float(), dim=-1)
    return (lp.exp() * (lp - lq)).sum(-1).double().sum(-1)


@torch.no_grad()
def _set_nll_kl(lm, ref, windows: Tensor, batch: int, chunk_tokens: int) -> tuple[float, float]:
    """(Σ NLL, Σ KL) over every predicted position of `windows` [m, L], nats."""
    hidden, calls = lm.block_inputs(windows)
    rhidden, rcalls = ref.block_inputs(windows)
    for i in range(len(lm.layers)):
        lm.block(i)
        hidden = lm.run_block(i, hidden, calls[i], batch=batch)
        lm.unload(lm.layers[i])
        ref.block(i)
        rhidden = ref.run_block(i, rhidden, rcalls[i], batch=batch)
        ref.unload(ref.layers[i])
    norm, head = lm.head_modules()
    rnorm, rhead = ref.head_modules()
    nll = kl = 0.0
    targets = windows[:, 1:]
    for s in range(0, windows.shape[0], batch):
        h = norm(hidden[s : s + batch])[:, :-1]
        rh = rnorm(rhidden[s : s + batch])[:, :-1]
        for c in range(0, h.shape[1], chunk_tokens):
            logits = head(h[:, c : c + chunk_tokens]).float()
            rlogits = rhead(rh[:, c : c + chunk_tokens]).float()
            t = targets[s : s + batch, c : c + chunk_tokens]
            nll += float(
                torch.nn.functional.cross_entropy(logits.transpose(1, 2), t, reduction="none")
                .double()
                .sum()
            )
            kl += float(chunk_kl(rlogits, logits).sum())
    lm.release_head()
    ref.release_head()
    return nll, kl


def streamed_perplexity_kl(
    url: str,
    opts: dict | None,
    ref_url: str,
    ref_opts: dict | None,
    sets: dict[str, Tensor],
    batch: int,
    chunk_tokens: int = 128,
) -> dict[str, Any]:
    """{"value": pooled perplexity, "by_set": {name: ppl}, "kl": mean KL per predicted token
    over every set, "kl_by_set": {name: mean KL}} of the model at `url` against the
    unquantized one at `ref_url`, both streamed one decoder block at a time in float32 (the
    Linears widened from their stored 16-bit weights per call: a float32 block's products)."""
    from pipeline.models.stream import StreamedLM

    by, kl_by, nll_all, kl_all, tokens = {}, {}, 0.0, 0.0, 0
    for name, win in sets.items():
        lm = StreamedLM(url, opts, dtype=torch.float32, stored_linears=True)
        ref = StreamedLM(ref_url, ref_opts, dtype=torch.float32, stored_linears=True)
        if not (lm.plain_head and ref.plain_head):
            from pipeline.models.weights import WeightsError

            raise WeightsError(
                "this model transforms its logits after the output head "
                "(soft-capping or a logit scale); its loss is not streamed"
            )
        nll, kl = _set_nll_kl(lm, ref, win, batch, chunk_tokens)
        n = int(win.shape[0]) * (int(win.shape[1]) - 1)
        by[name] = math.exp(nll / n)
        kl_by[name] = kl / n
        nll_all += nll
        kl_all += kl
        tokens += n
    return {
        "value": math.exp(nll_all / max(tokens, 1)),
        "by_set": by,
        "kl": kl_all / max(tokens, 1),
        "kl_by_set": kl_by,
    }
