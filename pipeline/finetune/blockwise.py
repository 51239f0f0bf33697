"""Block-wise fine-tuning of the shared values: plain torch, one decoder block at a time.

The paper fine-tunes the shared values (the codebooks) on the network's loss, which needs the
whole model in memory. Block-wise, each decoder block's codebooks are trained so that the
quantized block reproduces the unquantized model's hidden states at its output:

    min over codebooks c of  Σ_windows ‖ block_q(c)(x_q) − y ‖² / Σ ‖y‖²

where x_q is the input the quantized model hands the block (the output of the blocks before
it, quantized *and already fine-tuned*), y the unquantized model's output of the same block on
its own (unquantized) input, and block_q(c) the block whose quantized weights are
``W[r, j] = c[r, idx[r, j]]`` (indices fixed, the frequency-ranked per-row codes of the
quantize stage). Targets from the unquantized chain, not from the unquantized block applied to
x_q, so that a block also corrects the error the blocks before it left: the objective is the
model's hidden state, not the block's own error.

The gradient of a codebook value is the sum of its members' gradients (the paper's rule): the
backward of `gather_codebooks` scatters the weight gradient onto the codebook. Indices are
held as stored (uint8 / int16), widened only inside the gather, so a block's codes cost one
byte per weight, not the eight of an int64 index.

A held-out part of the windows decides: if the trained codebooks do not lower the validation
error, the block keeps the quantize stage's values (`BlockResult.reverted`). Trained values are
rounded to float16 (the file stores fp16 codebooks); each row's unused padding slots keep the
quantize stage's values.

Memory: one block's weights (its Linears in the checkpoint's 16-bit dtype when the block
comes from `StreamedLM(stored_linears=True)`), its quantized weights rebuilt in float32 in each
forward, the codes, and the hidden states of the windows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

from pipeline.encode import rotation
from pipeline.models.stored_linear import StoredLinear

__all__ = ["BlockResult", "gather_codebooks", "finish_codebooks", "quantized_forward",
           "relative_error", "run_quantized", "train_block", "split_windows"]

_FP16_MAX = 65504.0


class _Gather(torch.autograd.Function):
    """W = cb.gather(1, idx) with idx kept in its stored width for the backward."""

    @staticmethod
    def forward(ctx, cb: Tensor, idx: Tensor) -> Tensor:  # noqa: D102
        ctx.save_for_backward(idx)
        ctx.k = cb.shape[1]
        out = cb.new_empty(idx.shape)
        for a, b in _slabs(idx):  # torch indexes with int64: a slab's worth at a time
            torch.gather(cb[a:b], 1, idx[a:b].long(), out=out[a:b])
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: D102
        (idx,) = ctx.saved_tensors
        g = grad.new_zeros(grad.shape[0], ctx.k)
        for a, b in _slabs(idx):
            g[a:b].scatter_add_(1, idx[a:b].long(), grad[a:b])
        return g, None


_SLAB = 1 << 20  # indices widened to int64 at once (8 MB)


def _slabs(idx: Tensor) -> list[tuple[int, int]]:
    """Row ranges of about _SLAB indices: the int64 copy torch's gather and scatter need is
    a slab's, not the tensor's (8 bytes a weight: 360 MB for a 7B down_proj)."""
    R, C = idx.shape
    step = max(1, _SLAB // max(1, C))
    return [(a, min(R, a + step)) for a in range(0, R, step)]


def gather_codebooks(cb: Tensor, idx: Tensor) -> Tensor:
    """The weights [R, C] of codebooks cb float [R, K] at indices idx uint8/int16 [R, C];
    differentiable in cb (a level's gradient is the sum of its members')."""
    return _Gather.apply(cb, idx)


def finish_codebooks(cb: np.ndarray, given: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Trained codebooks cb as the quantize stage writes them: float32 [R, K] values exactly
    representable in float16 (clipped to its range); each row's slots past its last used
    level (never referenced) as they were given."""
    out = np.clip(cb.astype(np.float32), -_FP16_MAX, _FP16_MAX).astype(np.float16)
    out = out.astype(np.float32)
    if idx.size:
        used = idx.max(axis=1).astype(np.int64) + 1  # every level of a row is used
        unused = np.arange(out.shape[1])[None, :] >= used[:, None]
        out[unused] = given[unused]
    return np.ascontiguousarray(out, dtype=np.float32)


def _weights(block: nn.Module, books: Mapping[str, Tensor], idx: Mapping[str, Tensor],
             masks: Mapping[str, Tensor] | None = None,
             rotations: Mapping[str, int] | None = None) -> dict[str, Tensor]:
    """The block's quantized weights from codebooks and indices, in the block's dtype; a
    tensor with a one-shot pruning mask is exactly 0 where it is pruned (`where`, so no
    trained value reaches a pruned weight); a rotated one (`quantize.rotate`) is rotated
    back in float32 (a linear map: the codebooks' gradient goes through it)."""
    dtype = compute_dtype(block)
    out = {}
    for n in books:
        w = gather_codebooks(books[n], idx[n])
        if rotations and n in rotations:
            w = rotation.inverse(w, rotations[n])
        w = w.to(dtype)
        if masks and n in masks:
            w = torch.where(masks[n], w, torch.zeros((), dtype=w.dtype))
        out[n] = w
    return out


def compute_dtype(block: nn.Module) -> torch.dtype:
    """The dtype `block` computes in: its parameters', except the 16-bit weights that
    `StoredLinear`s keep below a float32 block (`StreamedLM(stored_linears=True)`)."""
    for m in block.modules():
        for p in m.parameters(recurse=False):
            if not (isinstance(m, StoredLinear) and p is m.weight):
                return p.dtype
    return torch.float32


def _split(codes: Mapping[str, tuple]) -> tuple[dict, dict, dict, dict]:
    """(indices, codebooks, masks, rotations) as tensors (seeds) from {name: (indices,
    codebooks[, mask[, rotation seed]])}."""
    idx, cbs, masks, rots = {}, {}, {}, {}
    for n, (i, c, *rest) in codes.items():
        idx[n] = torch.from_numpy(np.ascontiguousarray(i))
        cbs[n] = torch.from_numpy(np.ascontiguousarray(c, dtype=np.float32))
        if rest and rest[0] is not None:
            masks[n] = torch.from_numpy(np.ascontiguousarray(rest[0], dtype=bool))
        if len(rest) > 1 and rest[1] is not None:
            rots[n] = int(rest[1])
    return idx, cbs, masks, rots


def quantized_forward(block: nn.Module, call: tuple[tuple, dict], hidden: Tensor,
                      weights: Mapping[str, Tensor]) -> Tensor:
    """block(hidden, *args, **kwargs) with its parameters named in `weights` (names relative
    to the block) replaced by those tensors."""
    args, kwargs = call
    out = functional_call(block, dict(weights), (hidden, *args), kwargs, strict=False)
    return out[0] if isinstance(out, tuple | list) else out


def relative_error(out: Tensor, target: Tensor) -> tuple[float, float]:
    """(Σ ‖out − target‖², Σ ‖target‖²) in float64: summed over windows, divided at the end."""
    d = (out.float() - target.float()).double()
    return float((d * d).sum()), float(target.double().pow(2).sum())


@dataclass
class BlockResult:
    """What training one block gave.

    codebooks: tensor name (relative to the block) -> float32 [R, K], finished
        (`finish_codebooks`), the trained values or, when `reverted`, the quantize stage's.
    reverted: the trained values did not lower the validation error; the block keeps its
        input codebooks.
    errors: relative output errors ‖out − y‖² / ‖y‖² on the train and validation windows,
        before and after ("train_before", "train_after", "val_before", "val_after").
    """

    codebooks: dict[str, np.ndarray]
    reverted: bool
    steps: int
    errors: dict[str, float] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)


def split_windows(n: int, validation: float) -> tuple[int, int]:
    """(train, validation) counts of n windows: the last ⌈validation·n⌉ held out (at least
    one when n > 1 and validation > 0, and at least one window left to train on)."""
    if n <= 1 or validation <= 0:
        return n, 0
    v = min(n - 1, max(1, math.ceil(validation * n)))
    return n - v, v


def _error(block: nn.Module, call, x: Tensor, y: Tensor, weights: Mapping[str, Tensor],
           batch: int) -> float:
    num = den = 0.0
    with torch.no_grad():
        for s in range(0, x.shape[0], batch):
            a, b = relative_error(quantized_forward(block, call, x[s : s + batch], weights),
                                  y[s : s + batch])
            num, den = num + a, den + b
    return num / den if den > 0 else 0.0


def train_block(block: nn.Module, call: tuple[tuple, dict], x: Tensor, y: Tensor,
                codes: Mapping[str, tuple[np.ndarray, np.ndarray]], *, steps: int, lr: float,
                batch: int, validation: float, seed: int,
                on_step: Callable[[int, float], None] | None = None) -> BlockResult:
    """Train the codebooks of `block`'s quantized tensors so that the block maps x to y.

    block: the decoder block with its unquantized parameters loaded (they stay frozen).
    call: the other arguments the model passes the block (position embeddings, mask).
    x: the quantized model's hidden states entering the block, float [n, L, d].
    y: the unquantized model's hidden states leaving it, float [n, L, d].
    codes: tensor name relative to the block -> (indices uint8/int16 [R, C], codebooks
        float32 [R, K]) or (indices, codebooks, mask bool [R, C] or None) for a tensor
        one-shot pruning cut (its pruned weights stay exactly 0), or (indices, codebooks,
        mask, rotation seed or None) for a tensor quantized in a rotated basis.
    steps: Adam steps, each on `batch` training windows (a seeded permutation per epoch).
    validation: the fraction of windows held out to decide whether the result is kept.
    """
    n_train, n_val = split_windows(int(x.shape[0]), validation)
    idx, start, masks, rots = _split(codes)
    cbs = {n: nn.Parameter(c.clone()) for n, c in start.items()}

    def weights(books: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return _weights(block, books, idx, masks, rots)

    xt, yt, xv, yv = x[:n_train], y[:n_train], x[n_train:], y[n_train:]
    with torch.no_grad():
        w0 = weights(start)
        errors = {"train_before": _error(block, call, xt, yt, w0, batch)}
        if n_val:
            errors["val_before"] = _error(block, call, xv, yv, w0, batch)
        del w0
    losses: list[float] = []
    if cbs and steps > 0 and n_train > 0:
        opt = torch.optim.Adam(list(cbs.values()), lr=lr)
        gen = torch.Generator().manual_seed(seed)
        order: list[int] = []
        b = min(batch, n_train)
        scale = float(yt.double().pow(2).mean()) or 1.0
        for step in range(steps):
            if len(order) < b:
                order += torch.randperm(n_train, generator=gen).tolist()
            take, order = order[:b], order[b:]
            out = quantized_forward(block, call, xt[take], weights(cbs))
            loss = (out.float() - yt[take].float()).pow(2).mean() / scale
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if on_step:
                on_step(step, losses[-1])
        del opt
    trained = {n: finish_codebooks(p.detach().numpy(), codes[n][1], codes[n][0])
               for n, p in cbs.items()}
    with torch.no_grad():
        w1 = weights({n: torch.from_numpy(c) for n, c in trained.items()})
        errors["train_after"] = _error(block, call, xt, yt, w1, batch)
        if n_val:
            errors["val_after"] = _error(block, call, xv, yv, w1, batch)
    # Selection on the held-out windows only; without any, on the training windows.
    key = "val" if n_val else "train"
    reverted = not errors[f"{key}_after"] < errors[f"{key}_before"]
    out_books = ({n: np.ascontiguousarray(c, dtype=np.float32)
                  for n, (_, c, *_) in codes.items()} if reverted else trained)
    return BlockResult(codebooks=out_books, reverted=reverted, steps=len(losses), errors=errors,
                       losses=losses)


def run_quantized(block: nn.Module, call: tuple[tuple, dict], x: Tensor,
                  codes: Mapping[str, tuple], batch: int) -> Tensor:
    """The block with codebook weights `codes` (indices, codebooks[, mask]) applied to x,
    no grad."""
    if x.shape[0] == 0:
        return x
    idx, cbs, masks, rots = _split(codes)
    w = _weights(block, cbs, idx, masks, rots)
    with torch.no_grad():
        return torch.cat([quantized_forward(block, call, x[s : s + batch], w)
                          for s in range(0, x.shape[0], batch)])


def history(losses: list[float], every: int = 10) -> list[dict[str, Any]]:
    """Every `every`-th step's loss (and the last), for the report."""
    return [{"step": s + 1, "loss": round(v, 6)} for s, v in enumerate(losses)
            if (s + 1) % every == 0 or s + 1 == len(losses)]
