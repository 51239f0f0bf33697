"""Diagonal-Hessian estimators for language models larger than memory, block by block.

Same quantities as `pipeline.hessian.lm` (and the same scale conventions), computed with one
decoder block resident at a time through `StreamedLM`:

``activation_streamed``
    Forward only. Block i is read, the hidden states of every window pass through it with a
    hook on each target Linear summing ``x_j²`` over tokens per input channel, the sums of
    block i's tensors are handed to ``emit`` and block i is freed. The result per tensor is the
    ``[in]`` vector (the ``[out, in]`` Hessian is that row broadcast over the outputs; storing
    the vector is ``out`` times smaller).
``fisher_streamed``
    Per-window squared gradients with recomputation: a forward sweep keeps only each block's
    input (in an `ActivationCache`, spilled to files past a budget); at the top the final norm
    and head give every window's loss ``ℓ_s = NLL_s / (L − 1)`` and its cotangent at the last
    block's output; a backward sweep reloads block i, recomputes its forward from the kept
    input one window at a time, back-propagates that window's cotangent, squares the window's
    parameter gradients into float64 sums, and passes the input's cotangent down. Windows do
    not interact (causal attention, no padding, eval mode), so row s of the batch cotangent is
    window s's own: the sums equal the in-memory ``fisher_diag_lm`` up to float rounding.

Peak memory: one block's weights (and, for the Fisher, its sums and gradients), the hidden
states of the windows, and the cache's budget; never the model.

Sharding (``blocks=range(lo, hi)``, planned by `pipeline.hessian.shards`): a task computes and
emits only the tensors of blocks lo … hi−1, for the windows it is given, still with one block
resident at a time. Its inputs are recomputed, not handed over: blocks 0 … lo−1 run forward
from the embeddings (no hooks, each freed after use). The cost, in block passes over the
task's windows (B blocks; a forward ≈ 1 unit, a backward with recomputation ≈ 3, one that
back-propagates only the input's cotangent ≈ 2):

* activation: hi forwards (lo of them recomputation); blocks ≥ hi are never read. G equal
  groups cost Σ hi_g ≈ (G + 1)/2 × B forwards instead of B: 2.5× for G = 4.
* Fisher: the loss needs the whole stack, so every group runs all B forwards (inputs kept
  only for blocks ≥ lo) and the head, then a backward from the top down to lo — blocks ≥ hi
  back-propagate the input's cotangent only (no parameter gradients), block lo no input
  cotangent, nothing below lo runs backward. G equal groups cost G·B + 3B + (G − 1)·B =
  (2G + 2)·B units instead of 4B, i.e. (G + 1)/2 × (2.5× for G = 4), plus G − 1 more passes
  through the head (large for a small model with a large vocabulary).

Partitions: the sums are float64 and the counts are returned with them, so the sums of P
partitions of the windows add up to the single task's (`pipeline.hessian.shards.
reduce_partials`). Each window's numbers are the same whichever task computes them as long
as the forward's window batches are the same (windows are run ``batch`` at a time from the
start of the task's windows): choose partition sizes that are multiples of ``batch`` (or
batch=1) for bit-identical per-window terms; otherwise a matmul over a different batch may
round differently in the compute dtype.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.hessian.shards import _check_range
from pipeline.models.stream import ActivationCache, StreamedLM

__all__ = ["activation_streamed", "fisher_streamed"]

Emit = Callable[[str, np.ndarray, int], None]


def _targets_by_block(lm: StreamedLM, names: Sequence[str]) -> dict[int, list[str]]:
    by: dict[int, list[str]] = {}
    left = set(names)
    for i in range(len(lm.layers)):
        own = [n for n in lm.block_params(i) if n in left]
        if own:
            by[i] = own
            left -= set(own)
    if left:
        raise ValueError(
            f"{len(left)} tensors are not parameters of a decoder block and cannot "
            f"be streamed (first: {sorted(left)[0]!r}); quantize block weights only"
        )
    return by


def _forward(lm: StreamedLM, i: int, hidden: Tensor, call: tuple, batch: int) -> Tensor:
    """Block i's output for `hidden`, the block read and freed around it."""
    block = lm.block(i)
    try:
        return lm.run_block(i, hidden, call, batch=batch)
    finally:
        lm.unload(block)


def activation_streamed(
    lm: StreamedLM,
    windows: Tensor,
    names: Sequence[str],
    emit: Emit,
    *,
    blocks: range | None = None,
    batch: int = 8,
    progress: Callable[[int], object] | None = None,
) -> int:
    """E[x²] sums per input channel of every named Linear weight; returns tokens seen.

    emit(name, sums float64 [in], n_tokens) is called once per tensor, block by block.
    blocks: only the named tensors of these blocks are computed and emitted (the others are
    ignored); blocks before them run forward without statistics, blocks after are not read."""
    span = _check_range(blocks, len(lm.layers))
    by = _targets_by_block(lm, names)
    hidden, calls = lm.block_inputs(windows)
    n_tokens = int(windows.numel())
    for i in range(span.start):  # recompute this group's input
        hidden = _forward(lm, i, hidden, calls[i], batch)
        if progress:
            progress(i)
    for i in span:
        want = by.get(i, [])
        block = lm.block(i)
        prefix = lm.block_prefix(i)
        sums: dict[str, Tensor] = {}
        handles = []
        for mname, mod in block.named_modules():
            full = prefix + mname + ".weight"
            if full in want:
                if not isinstance(mod, nn.Linear):
                    raise ValueError(
                        f"{full}: the activation Hessian covers nn.Linear weights "
                        f"only, this is a {type(mod).__name__}"
                    )
                sums[full] = torch.zeros(mod.in_features, dtype=torch.float64)

                def hook(module, inputs, acc=sums[full]):
                    x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
                    acc += (x * x).sum(0)

                handles.append(mod.register_forward_pre_hook(hook))
        try:
            if want or i + 1 < span.stop:  # the last block's output is not needed
                hidden = lm.run_block(i, hidden, calls[i], batch=batch)
        finally:
            for h in handles:
                h.remove()
            lm.unload(block)
        for full in want:
            emit(full, sums[full].numpy(), n_tokens)
        if progress:
            progress(i)
    return n_tokens


def fisher_streamed(
    lm: StreamedLM,
    windows: Tensor,
    names: Sequence[str],
    emit: Emit,
    *,
    blocks: range | None = None,
    cache_bytes: int = 1 << 30,
    spill_dir: str | None = None,
    chunk_tokens: int = 128,
    batch: int = 8,
    progress: Callable[[int], object] | None = None,
) -> int:
    """Σ_s (∂ℓ_s/∂θ)² for every named block parameter, one block resident at a time;
    returns the number of windows.

    emit(name, sums float64 shaped like the parameter, n_windows) per tensor, from the top
    block down. blocks: only the named tensors of these blocks are computed and emitted (the
    others are ignored); the forward still runs every block (the loss is at the top), the
    backward stops at the range's first block."""
    span = _check_range(blocks, len(lm.layers))
    lo, hi = span.start, span.stop
    by = _targets_by_block(lm, names)
    n, L = windows.shape
    hidden, calls = lm.block_inputs(windows)
    with ActivationCache(cache_bytes, spill_dir or tempfile.gettempdir()) as cache:
        for i in range(len(lm.layers)):
            if i >= lo:  # the backward reaches no block below lo
                cache.put(i, hidden)
            hidden = _forward(lm, i, hidden, calls[i], batch)
            if progress:
                progress(i)
        # The top: every window's mean NLL and its cotangent at the last block's output.
        cot = torch.empty_like(hidden)
        for s in range(n):  # one window at a time: its logits chunks are all that exist
            h = hidden[s : s + 1].detach().requires_grad_(True)
            loss = (lm.window_nll(h, windows[s : s + 1], chunk_tokens) / (L - 1)).sum()
            (cot[s : s + 1],) = torch.autograd.grad(loss, h)
        lm.release_head()
        del hidden
        for i in reversed(range(lo, len(lm.layers))):
            block = lm.block(i)
            prefix = lm.block_prefix(i)
            # Above the range only the cotangent passes through; at lo it stops.
            want = set(by.get(i, [])) if i < hi else set()
            tracked = [
                (prefix + pn, p) for pn, p in block.named_parameters() if prefix + pn in want
            ]
            for _, p in tracked:
                p.requires_grad_(True)
            sums = {full: torch.zeros(p.shape, dtype=torch.float64) for full, p in tracked}
            x_all = cache.get(i)
            pass_down = i > lo
            down = torch.empty_like(x_all) if pass_down else None
            inputs_wanted = pass_down or bool(tracked)
            for s in range(n if inputs_wanted else 0):
                x = x_all[s : s + 1].detach().requires_grad_(pass_down)
                out = lm.call_block(block, x, *calls[i])
                inputs = ([x] if pass_down else []) + [p for _, p in tracked]
                grads = torch.autograd.grad(
                    out, inputs, grad_outputs=cot[s : s + 1], allow_unused=True
                )
                if pass_down:
                    down[s : s + 1] = grads[0]
                    grads = grads[1:]
                for (full, _), g in zip(tracked, grads, strict=True):
                    if g is not None:
                        sums[full] += g.double() ** 2
            lm.unload(block)
            cache.drop(i)
            for full in by.get(i, []) if i < hi else []:
                emit(full, sums[full].numpy(), int(n))
            del sums
            if down is not None:
                cot = down
            if progress:
                progress(i)
    return int(n)
