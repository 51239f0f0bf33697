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
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

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
        raise ValueError(f"{len(left)} tensors are not parameters of a decoder block and cannot "
                         f"be streamed (first: {sorted(left)[0]!r}); quantize block weights only")
    return by


def activation_streamed(lm: StreamedLM, windows: Tensor, names: Sequence[str], emit: Emit, *,
                        batch: int = 8, progress: Callable[[int], object] | None = None) -> int:
    """E[x²] sums per input channel of every named Linear weight; returns tokens seen.

    emit(name, sums float64 [in], n_tokens) is called once per tensor, block by block."""
    by = _targets_by_block(lm, names)
    hidden, calls = lm.block_inputs(windows)
    n_tokens = int(windows.numel())
    for i in range(len(lm.layers)):
        want = by.get(i, [])
        block = lm.block(i)
        prefix = lm.block_prefix(i)
        sums: dict[str, Tensor] = {}
        handles = []
        for mname, mod in block.named_modules():
            full = prefix + mname + ".weight"
            if full in want:
                if not isinstance(mod, nn.Linear):
                    raise ValueError(f"{full}: the activation Hessian covers nn.Linear weights "
                                     f"only, this is a {type(mod).__name__}")
                sums[full] = torch.zeros(mod.in_features, dtype=torch.float64)

                def hook(module, inputs, acc=sums[full]):
                    x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
                    acc += (x * x).sum(0)

                handles.append(mod.register_forward_pre_hook(hook))
        try:
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


def fisher_streamed(lm: StreamedLM, windows: Tensor, names: Sequence[str], emit: Emit, *,
                    cache_bytes: int = 1 << 30, spill_dir: str | None = None,
                    chunk_tokens: int = 128, batch: int = 8,
                    progress: Callable[[int], object] | None = None) -> int:
    """Σ_s (∂ℓ_s/∂θ)² for every named block parameter, one block resident at a time;
    returns the number of windows.

    emit(name, sums float64 shaped like the parameter, n_windows) per tensor, from the top
    block down."""
    by = _targets_by_block(lm, names)
    n, L = windows.shape
    hidden, calls = lm.block_inputs(windows)
    with ActivationCache(cache_bytes, spill_dir or tempfile.gettempdir()) as cache:
        for i in range(len(lm.layers)):
            cache.put(i, hidden)
            lm.block(i)
            hidden = lm.run_block(i, hidden, calls[i], batch=batch)
            lm.unload(lm.layers[i])
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
        for i in reversed(range(len(lm.layers))):
            block = lm.block(i)
            prefix = lm.block_prefix(i)
            want = set(by.get(i, []))
            params = [(prefix + pn, p) for pn, p in block.named_parameters()]
            for _, p in params:
                p.requires_grad_(True)
            tracked = [(full, p) for full, p in params if full in want]
            sums = {full: torch.zeros(p.shape, dtype=torch.float64) for full, p in tracked}
            x_all = cache.get(i)
            down = torch.empty_like(x_all) if i > 0 else None
            for s in range(n):
                x = x_all[s : s + 1].detach().requires_grad_(i > 0)
                out = lm.call_block(block, x, *calls[i])
                inputs = ([x] if i > 0 else []) + [p for _, p in tracked]
                grads = torch.autograd.grad(out, inputs, grad_outputs=cot[s : s + 1],
                                            allow_unused=True)
                if i > 0:
                    down[s : s + 1] = grads[0]
                    grads = grads[1:]
                for (full, _), g in zip(tracked, grads, strict=True):
                    if g is not None:
                        sums[full] += g.double() ** 2
            lm.unload(block)
            cache.drop(i)
            for full in by.get(i, []):
                emit(full, sums[full].numpy(), int(n))
            del sums
            if down is not None:
                cot = down
            if progress:
                progress(i)
    return int(n)
