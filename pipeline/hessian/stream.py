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
    parameter gradients into float32 sums, and passes the input's cotangent down. Windows do
    not interact (causal attention, no padding, eval mode), so row s of the batch cotangent is
    window s's own: the sums equal the in-memory ``fisher_diag_lm`` up to float rounding.

The input embedding and the output head (named by the model's own names, e.g.
``model.embed_tokens.weight``, ``lm_head.weight``) follow ``lm.py``'s definitions. Fisher:
the head's per-window gradient is taken at the top with the cotangent; the embedding's from the
cotangent at block 0's input, scattered to the window's distinct tokens; a head tied to the
embedding is one tensor whose window gradient is the sum of both uses (see `_TopGrads`).
Activation: the head's inputs (the final norm's outputs) are the statistics of the head and of
an embedding tied to it; an untied input embedding has none (refused). With ``blocks=``, the
embedding's Fisher is computed by the range starting at block 0, the head's (and the
activation statistics of a tied pair) by the range ending at the top; other ranges ignore them.

Peak memory: one block's weights (and, for the Fisher, its float32 sums and the gradient
autograd is finishing), the hidden states of the windows, and the cache's budget; never the
model. The Fisher's sums are float32 because they are a block's size (1.6 GB in float64 for a
7B block, beside its 0.8 GB of weights) and the partial tables store float32 anyway; over a
task's n windows their relative rounding is at most ~n × 6e-8. With a `StreamedLM` built with
``stored_linears=True`` the block's Linears keep a 16-bit checkpoint's weights, widen them per
call and square their weight's gradient themselves (`pipeline.models.stored_linear`): the same
sums, half the block's weight memory. An untied head's sums are dropped once emitted.

Sharding (``blocks=range(lo, hi)``, planned by `pipeline.hessian.shards`): a task computes and
emits only the tensors of blocks lo … hi−1, for the windows it is given, still with one block
resident at a time. Its inputs are recomputed: blocks 0 … lo−1 run forward from the embeddings,
and the Fisher runs every block forward and back-propagates from the top down to lo, so G
equal groups cost about (G + 1)/2 times the single task in block passes. The streamed stage does
not do that: its units (`pipeline.hessian.handover`) chain the pieces below — `forward_range`,
`fisher_top`, `fisher_backward`, `activation_range` — with the block inputs and cotangents
handed over through the work folder, which costs each block one forward and one backward.

Partitions: the sums and their counts are returned together, so the sums of P
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
from pipeline.models.stored_linear import StoredLinear
from pipeline.models.stream import ActivationCache, StreamedLM

__all__ = ["activation_range", "activation_streamed", "activation_top_names", "embedding_roles",
           "fisher_backward", "fisher_streamed", "fisher_top", "forward_range"]

Emit = Callable[[str, np.ndarray, int], None]


def embedding_roles(lm: StreamedLM, names: Sequence[str]) -> tuple[str | None, str | None]:
    """(input embedding, untied output head) among `names`, each None when not named. A head
    tied to the embedding is the embedding's tensor (one name: the embedding's)."""
    emb = lm.embedding_name if lm.embedding_name in names else None
    head = lm.head_name if lm.head_name in names and not lm.tied else None
    return emb, head


def _targets_by_block(lm: StreamedLM, names: Sequence[str]) -> dict[int, list[str]]:
    by: dict[int, list[str]] = {}
    left = set(names) - {n for n in embedding_roles(lm, names) if n is not None}
    for i in range(len(lm.layers)):
        own = [n for n in lm.block_params(i) if n in left]
        if own:
            by[i] = own
            left -= set(own)
    if left:
        raise ValueError(
            f"{len(left)} tensors are not parameters of a decoder block and cannot "
            f"be streamed (first: {sorted(left)[0]!r}); quantize block weights, the input "
            "embedding and the output head only"
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
    top = activation_top_names(lm, names, span)
    hidden, calls = lm.block_inputs(windows)
    n_tokens = int(windows.numel())
    for i in range(span.start):  # recompute this group's input
        hidden = _forward(lm, i, hidden, calls[i], batch)
        if progress:
            progress(i)
    activation_range(lm, hidden, calls, span, by, emit, n_tokens, top=top, batch=batch,
                     progress=progress)
    return n_tokens


def activation_top_names(lm: StreamedLM, names: Sequence[str], span: range) -> list[str]:
    """The head's weight and an embedding tied to it among `names`: their statistics are the
    head's inputs, computed by the range that reaches the top (none for other ranges).
    ValueError: an input embedding not tied to the head (it has no activation statistics)."""
    emb, head = embedding_roles(lm, names)
    if emb is not None and not lm.tied:
        raise ValueError(
            f"{emb}: an input embedding not tied to the head has no activation "
            "statistics (use the Fisher, or keep the embedding)"
        )
    return [n for n in (emb, head) if n is not None] if span.stop == len(lm.layers) else []


def activation_range(lm: StreamedLM, hidden: Tensor, calls: list, span: range,
                     by: dict[int, list[str]], emit: Emit, n_tokens: int, *,
                     top: Sequence[str] = (), batch: int = 8,
                     progress: Callable[[int], object] | None = None,
                     need_output: bool = False) -> Tensor | None:
    """Blocks `span` forward from `hidden` (the input of block span.start), the E[x²] sums of
    the tensors `by` names per block emitted as each block finishes, then those of `top`
    (the head's inputs; `activation_top_names`). Returns the output of the last block when
    `need_output` (the next range's input), else None."""
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
            # the last block's output is needed only for the next range or the top
            if want or i + 1 < span.stop or top or need_output:
                hidden = lm.run_block(i, hidden, calls[i], batch=batch)
        finally:
            for h in handles:
                h.remove()
            lm.unload(block)
        for full in want:
            emit(full, sums[full].numpy(), n_tokens)
        if progress:
            progress(i)
    if top:
        sums = _head_input_squares(lm, hidden, batch)
        for full in top:
            emit(full, sums, n_tokens)
    return hidden if need_output else None


def _head_input_squares(lm: StreamedLM, hidden: Tensor, batch: int) -> np.ndarray:
    """Σ over every token of the final norm's output squared, float64 [d]: what the head
    (an nn.Linear) sees, as `activation_diag_lm` hooks it."""
    norm, _ = lm._head()
    lm.load(norm)
    acc = torch.zeros(hidden.shape[-1], dtype=torch.float64)
    try:
        with torch.no_grad():
            for s in range(0, hidden.shape[0], batch):
                x = norm(hidden[s : s + batch]).reshape(-1, hidden.shape[-1]).double()
                acc += (x * x).sum(0)
    finally:
        lm.unload(norm)
    return acc.numpy()


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

    emit(name, sums float32 shaped like the parameter, n_windows) per tensor, from the top
    block down. blocks: only the named tensors of these blocks are computed and emitted (the
    others are ignored); the forward still runs every block (the loss is at the top), the
    backward stops at the range's first block."""
    span = _check_range(blocks, len(lm.layers))
    lo, hi = span.start, span.stop
    by = _targets_by_block(lm, names)
    emb, head = embedding_roles(lm, names)
    # The embedding is the range's at block 0 (its gradient needs the cotangent there); an
    # untied head the range's at the top. Every range computes the top's gradients anyway.
    emb = emb if lo == 0 else None
    head = head if hi == len(lm.layers) else None
    n = int(windows.shape[0])
    hidden, calls = lm.block_inputs(windows)
    with ActivationCache(cache_bytes, spill_dir or tempfile.gettempdir()) as cache:
        def keep(i: int, h: Tensor) -> None:
            if i >= lo:  # the backward reaches no block below lo
                cache.put(i, h)

        hidden = forward_range(lm, hidden, calls, range(len(lm.layers)), keep, batch=batch,
                               progress=progress)
        cot, top = fisher_top(lm, windows, hidden, head, emb if lm.tied else None, emit,
                              chunk_tokens=chunk_tokens)
        del hidden
        want = {i: v for i, v in by.items() if lo <= i < hi}
        cot = fisher_backward(lm, calls, range(lo, len(lm.layers)), cot, cache.get, want,
                              emit, pass_down=emb is not None, drop=cache.drop,
                              progress=progress)
    if emb is not None:
        emit(emb, top.embedding_sums(cot).numpy(), n)
    return n


def forward_range(lm: StreamedLM, hidden: Tensor, calls: list, span: range,
                  keep: Callable[[int, Tensor], object] | None = None, *, batch: int = 8,
                  progress: Callable[[int], object] | None = None) -> Tensor:
    """Blocks `span` forward from `hidden` (the input of block span.start), one block
    resident at a time; keep(i, input of block i) for each. Returns the last block's output."""
    for i in span:
        if keep is not None:
            keep(i, hidden)
        hidden = _forward(lm, i, hidden, calls[i], batch)
        if progress:
            progress(i)
    return hidden


def fisher_top(lm: StreamedLM, windows: Tensor, hidden: Tensor, head: str | None,
               tied: str | None, emit: Emit, *, chunk_tokens: int = 128) -> tuple[Tensor, _TopGrads]:
    """The top: every window's mean NLL from `hidden` (the last block's output) and its
    cotangent there, one window at a time (its logits chunks are all that exist). With
    `head` (an untied head's name) its sums are emitted; with `tied` (the embedding tied to
    the head) the head's half of that weight's gradients is kept in the returned
    `_TopGrads` for `embedding_sums`."""
    n, L = windows.shape
    top = _TopGrads(lm, windows, head, tied)
    cot = torch.empty_like(hidden)
    for s in range(n):
        h = hidden[s : s + 1].detach().requires_grad_(True)
        loss = (lm.window_nll(h, windows[s : s + 1], chunk_tokens) / (L - 1)).sum()
        cot[s : s + 1] = top.backward(s, loss, h)
    lm.release_head()
    top.weight = None  # the head's storage goes with the release
    if head is not None:
        emit(head, top.head_sums.numpy(), int(n))
        if top.tied is None:  # only a tied embedding still needs them
            top.head_sums = None
    return cot, top


def fisher_backward(lm: StreamedLM, calls: list, span: range, cot: Tensor,
                    inputs_of: Callable[[int], Tensor], want: dict[int, list[str]], emit: Emit, *,
                    pass_down: bool = False, drop: Callable[[int], object] | None = None,
                    progress: Callable[[int], object] | None = None) -> Tensor | None:
    """Blocks `span` backward from `cot` (the cotangent at the last block's output), each
    block reloaded and its forward recomputed from inputs_of(i) one window at a time; the
    squared per-window gradients of the tensors `want` names per block summed and emitted
    as each block finishes. Returns the cotangent at block span.start's input when
    `pass_down` (another range below, or the embedding's gradient), else None."""
    lo = span.start
    n = int(cot.shape[0])
    for i in reversed(span):
        block = lm.block(i)
        prefix = lm.block_prefix(i)
        own = set(want.get(i, []))
        params = [(prefix + pn, p) for pn, p in block.named_parameters() if prefix + pn in own]
        sums = {full: torch.zeros(p.shape, dtype=torch.float32) for full, p in params}
        # A Linear holding its 16-bit weight squares that weight's gradient itself
        # (`pipeline.models.stored_linear`); every other parameter takes a gradient here.
        stored = _stored_linears(block, prefix, own)
        anchor = torch.zeros(0, requires_grad=True)
        for full, m in stored.items():
            m.sums, m.anchor = sums[full], anchor
        tracked = [(full, p) for full, p in params if full not in stored]
        for _, p in tracked:
            p.requires_grad_(True)
        x_all = inputs_of(i)
        down_here = i > lo or pass_down
        down = torch.empty_like(x_all) if down_here else None
        inputs_wanted = down_here or bool(params)
        # Each parameter's gradient is squared into its sum as autograd finishes it and
        # freed there: a block's gradients never exist all at once (for a 7B block, 0.8 GB
        # of float32).
        hooks = [p.register_post_accumulate_grad_hook(_square_into(sums[full]))
                 for full, p in tracked]
        for s in range(n if inputs_wanted else 0):
            x = x_all[s : s + 1].detach().requires_grad_(down_here)
            out = lm.call_block(block, x, *calls[i])
            inputs = (([x] if down_here else []) + [p for _, p in tracked]
                      + ([anchor] if stored else []))
            torch.autograd.backward(out, grad_tensors=cot[s : s + 1], inputs=inputs)
            if down_here:
                down[s : s + 1] = x.grad
            del out, x
            _check_single_use(stored)
        for h in hooks:
            h.remove()
        for m in stored.values():
            m.sums = m.anchor = None
        lm.unload(block)
        del x_all
        if drop is not None:
            drop(i)
        for full in want.get(i, []):
            emit(full, sums[full].numpy(), n)
        del sums
        cot = down
        if progress:
            progress(i)
    return cot if pass_down else None


def _stored_linears(block: nn.Module, prefix: str, want: set[str]) -> dict[str, StoredLinear]:
    """{full weight name: module} of the wanted Linears of `block` holding a 16-bit weight
    below the block's float32 compute."""
    return {prefix + name + ".weight": m for name, m in block.named_modules()
            if isinstance(m, StoredLinear) and prefix + name + ".weight" in want
            and m.weight.dtype in (torch.bfloat16, torch.float16)}


def _check_single_use(stored: dict[str, StoredLinear]) -> None:
    """A stored Linear squares each call's gradient: right only for one call a window."""
    for full, m in stored.items():
        uses, m.uses = m.uses, 0
        if uses > 1:
            raise ValueError(f"{full}: its Linear runs {uses} times in one forward of its block; "
                             "the streamed Fisher squares a window's gradient per call, so it "
                             "needs one call a window")


def _square_into(acc: Tensor) -> Callable[[Tensor], None]:
    """A post-accumulate-grad hook: acc += p.grad², then p.grad is dropped."""

    def hook(p: Tensor) -> None:
        acc.addcmul_(p.grad, p.grad)
        p.grad = None

    return hook


class _TopGrads:
    """The per-window gradients of the output head's weight, taken at the top of
    `fisher_streamed`, and of the input embedding, from the cotangent at block 0's input.

    An untied head: ``Σ_s (∂ℓ_s/∂W_head)²``. A head tied to the embedding: the weight's
    gradient of window s is the sum of both uses, ``H_s + E_s`` (as autograd sums them for the
    shared tensor of `fisher_diag_lm`), and the top is reached long before ``E_s`` is known.
    ``E_s`` is non-zero only at the rows of window s's tokens (≤ L rows), so the square is
    split: ``H_s²`` is added at the top, and ``H_s`` is kept at those rows only until
    ``E_s ⊙ (2 H_s + E_s)`` completes them — [≤ L, d] per window, not [V, d]."""

    def __init__(self, lm: StreamedLM, windows: Tensor, head: str | None, tied: str | None):
        self.lm, self.windows, self.head, self.tied = lm, windows, head, tied
        self.weight: Tensor | None = None
        self.head_sums: Tensor | None = None
        self.kept: list[Tensor] = []  # tied: H_s at window s's distinct tokens, float64
        if head is not None or tied is not None:
            _, module = lm.head_modules()
            self.weight = module.weight
            self.weight.requires_grad_(True)  # `load` leaves a resident piece's flag alone
            # float32 as the blocks' sums, except for a tied weight: its (H_s + E_s)² is
            # completed as H_s² + E_s ⊙ (2 H_s + E_s), which cancels where E_s ≈ −H_s
            self.head_sums = torch.zeros(self.weight.shape, dtype=torch.float64
                                         if tied is not None else torch.float32)

    def backward(self, s: int, loss: Tensor, h: Tensor) -> Tensor:
        """Window s's cotangent at `h`; its head gradient squared into the sums on the way."""
        if self.weight is None:
            (g,) = torch.autograd.grad(loss, h)
            return g
        g, gw = torch.autograd.grad(loss, [h, self.weight])
        self.head_sums.addcmul_(gw, gw)  # no [V, d] temporary beside the sums
        if self.tied is not None:
            self.kept.append(gw[self.windows[s].unique()].double())
        return g

    def embedding_sums(self, cot: Tensor) -> Tensor:
        """Σ_s (∂ℓ_s/∂W_emb)² (tied: of the shared weight) from `cot`, the cotangent of every
        window at block 0's input [n, L, d]."""
        lm = self.lm
        ge = lm.embedding_cotangent(self.windows, cot)
        if self.tied is not None:  # H_s² are in already
            sums = self.head_sums
        else:
            shape = lm.weights.info(lm.embedding_name).shape
            sums = torch.zeros(tuple(shape), dtype=torch.float32)
        for s in range(self.windows.shape[0]):
            rows, inv = self.windows[s].unique(return_inverse=True)
            # a window's gradient rows: its tokens' cotangents summed per distinct token
            e = torch.zeros(len(rows), ge.shape[-1]).index_add_(0, inv, ge[s]).to(sums.dtype)
            sums[rows] += e * (2 * self.kept[s] + e) if self.kept else e * e
        self.kept.clear()
        return sums
