"""Diagonal-Hessian estimators for causal language models, as plain functions (no Ray, no store).

Two estimators over calibration windows (int64 token ids ``[n, L]``, every window ``L ≥ 2``
tokens, no padding):

``fisher_diag_lm``
    Empirical Fisher from per-*sequence* gradients (SqueezeLLM's choice):
    ``F_i = (1/n) Σ_s (∂ℓ_s/∂w_i)²``.
``activation_diag_lm``
    Forward only: for each ``nn.Linear`` with weight ``[out, in]``, ``E[x_j²]`` over every token
    of every window of its input channel ``j`` (the diagonal of GPTQ's ``X Xᵀ / N``),
    broadcast over the rows to an ``[out, in]`` "Hessian".

Both return ``HessianSums`` (``pipeline.hessian.estimators``): float64 sums plus a count, so
data partitions computed by different Ray tasks reduce by addition exactly like the classifier
estimators' partials, and ``.mean()`` divides once at the end.

Scale convention
----------------
``fisher``: ``ℓ_s`` is the loss of window ``s`` as the *mean* next-token NLL over its ``L − 1``
predicted tokens, ``next_token_nll(model, ids)[s] / (L − 1)``; ``n`` counts windows, so
``sums / n`` is the Fisher of the per-token mean loss with sequences as the samples. Summing the
NLL over tokens instead would multiply every entry by ``(L − 1)²``; averaging over tokens
*before* squaring (per-token gradients) would give a different, not just rescaled, matrix. The
absolute scale therefore depends on this choice and on ``L``: use the values for relative
weighting only, and compare runs only at the same window length.

``activation``: the sums are ``Σ_tokens x_j²`` and ``n`` is the number of tokens fed to the model
(``n_windows × L``), so ``sums / n`` is ``E[x_j²]``. A Linear that sees only some tokens (a
mixture-of-experts expert) still divides by all tokens: its mean is then its share of the curvature
of the loss summed over all tokens, which is what network-wide weighting needs. An input channel
that is zero for every token (a dead channel, or a column pruned upstream) gets exactly 0; the
quantizers must floor it (a weight with zero weight is free to move anywhere).

Per-sequence gradients
----------------------
The default path computes every window's gradients in one batched forward and one backward,
without a loop over windows and without ever forming a batch-summed weight gradient:

- every parameter is frozen; each group ``nn.Linear`` gets a forward hook that keeps its input
  ``a`` ``[B, T, in]`` and routes its output through ``_Tap``, an identity autograd function with
  one extra input, a scalar ``probe`` that requires grad;
- ``autograd.grad(Σ_s ℓ_s, probe)`` runs the backward from the loss down to the earliest tapped
  Linear (every tap depends on the probe). No weight gradient is computed anywhere (nothing else
  requires grad); each tap receives ``g = ∂(Σ_s ℓ_s)/∂y`` ``[B, T, out]``, and because windows do
  not interact (causal attention, no padding, eval mode), the rows of window ``s`` are
  ``∂ℓ_s/∂y_s``. The tap forms window ``s``'s weight gradient ``g_sᵀ a_s`` ``[out, in]`` (one
  ``bmm`` over a few windows at a time, the same FLOPs as an ordinary weight gradient), squares
  it and adds it to the float64 sums, then frees it.

That path covers parameters of ``nn.Linear`` modules called once per forward (all of a decoder
block's projections). Anything else in the group — embeddings, norms, the output head (called
chunk by chunk by ``next_token_nll``), tied or shared weights, a Linear found to be called twice —
sends the whole call to the generic path: one forward and one ``autograd.grad`` per window (what
the brute-force definition says), so ``batch_size`` only matters on the batched path.

Memory never scales with batch × vocabulary: the loss is ``next_token_nll``'s chunked head.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from pipeline.hessian.estimators import HessianSums, differentiate_only
from pipeline.hessian.persample import chunk_size
from pipeline.models.lm_loss import next_token_nll

__all__ = ["activation_diag_lm", "fisher_diag_lm", "lm_param_groups"]

Progress = Callable[[int], object]


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------


def fisher_diag_lm(
    model: nn.Module,
    windows: Tensor,
    params: Sequence[str],
    *,
    batch_size: int = 1,
    chunk_tokens: int = 128,
    progress: Progress | None = None,
) -> HessianSums:
    """Sums of squared per-window gradients of the mean next-token NLL (empirical Fisher).

    Args:
        model: Hugging Face causal LM (anything ``next_token_nll`` accepts). Run in eval mode
            during the call (no dropout: the result is deterministic); every module's
            train/eval flag and every parameter's ``requires_grad`` are restored afterwards.
        windows: int64 token ids ``[n, L]``, ``L ≥ 2``; moved to the model's device.
        params: parameter group, names from ``model.named_parameters()``. Only these are
            accumulated; the backward stops at the group's earliest layer.
        batch_size: windows per forward on the batched path (group = Linear weights/biases,
            see the module docstring). Does not change the result beyond float rounding of the
            per-window gradients; memory grows with it (activations of ``batch_size`` windows).
            The generic path runs one window at a time whatever it is. Batching pays where
            per-call overhead dominates (small models, accelerators: 7x at 64 hidden units on
            CPU); on CPU at SmolLM-135M's shape and L = 512, 1 was fastest (3.5 s/window vs
            3.9 at 2 and 4.5 at 4).
        chunk_tokens: positions whose logits exist at once in ``next_token_nll``.
        progress: called with the number of windows just processed (e.g. a bar's ``update``).

    Returns:
        ``HessianSums``: ``sums[name]`` float64 CPU tensor shaped like the parameter,
        ``Σ_s (∂ℓ_s/∂θ)²`` with ``ℓ_s = next_token_nll(model, windows)[s] / (L − 1)``; ``n`` =
        number of windows. ``.mean()`` is the Fisher diagonal (relative scale only, see the
        module docstring).

    Raises:
        ValueError: bad ``windows``, ``batch_size`` or ``chunk_tokens``; unknown, duplicate or
            no parameter names.
        FloatingPointError: a non-finite result (names the parameters affected).
    """
    windows = _check_windows(windows)
    _check_positive("batch_size", batch_size)
    _check_positive("chunk_tokens", chunk_tokens)
    named = _select(model, params)
    device = named[0][1].device
    windows = windows.to(device)

    with _eval_mode(model):
        tapped = _tap_slots(model, named)
        sums = None
        if tapped is not None:
            slots, extras = tapped
            # Other parameters (an embedding, the head) take their gradient from the same
            # backward, one window at a time (a batch's gradient would be a sum of windows').
            try:
                sums = _fisher_tapped(model, windows, slots, 1 if extras else batch_size,
                                      chunk_tokens, progress, extras)
            except _NotOnce:
                sums = None  # a tapped Linear ran twice: its per-window gradient is a sum
        if sums is None:
            sums = _fisher_generic(model, windows, named, chunk_tokens, progress)
    return _finish(sums, int(windows.shape[0]), "fisher")


def activation_diag_lm(
    model: nn.Module,
    windows: Tensor,
    linear_names: Sequence[str],
    *,
    batch_size: int = 4,
    broadcast: bool = True,
    progress: Progress | None = None,
) -> HessianSums:
    """Sums over tokens of each Linear's squared inputs, per input channel (forward only).

    Args:
        model: Hugging Face causal LM; run in eval mode under ``torch.no_grad`` during the call
            (module flags restored afterwards).
        windows: int64 token ids ``[n, L]``, ``L ≥ 2``; moved to the model's device.
        linear_names: weight names of ``nn.Linear`` modules, e.g.
            ``"model.layers.0.self_attn.q_proj.weight"``.
        batch_size: windows per forward (memory: activations of that many windows).
        broadcast: ``True``: ``sums[name]`` has the weight's shape ``[out, in]`` (every row the
            same); ``False``: the ``[in]`` vector (8 bytes per input channel instead of per
            weight; the caller broadcasts).
        progress: called with the number of windows just processed.

    Returns:
        ``HessianSums``: ``sums[name]`` float64 CPU, ``Σ_tokens x_j²`` of the module's input
        channel ``j`` over all tokens of all windows; ``n`` = tokens fed, ``n_windows × L``.
        ``.mean()`` is ``E[x_j²]``. A dead channel (zero for every token) is exactly 0: the
        caller floors it.

    The forward stops early when it can: before the first decoder block after the last hooked
    one, or before the output head when the head is not hooked (its logits are the largest
    activation of a small model). Hooks are removed on exit, also when the forward raises.

    Raises:
        ValueError: bad ``windows`` or ``batch_size``; a name that is not the weight of an
            ``nn.Linear``; duplicate or no names.
        FloatingPointError: a non-finite result.
    """
    windows = _check_windows(windows)
    _check_positive("batch_size", batch_size)
    named = _select(model, linear_names)
    modules: dict[str, nn.Linear] = {}
    head = getattr(model, "get_output_embeddings", lambda: None)()
    for name, p in named:
        owner = _owner(model, name)
        if isinstance(head, nn.Linear) and p is head.weight:
            # An input embedding tied to the head: the head's inputs (final hidden states)
            # are the statistics of the shared weight's rows.
            owner = ("weight", head)
        if owner is None or not isinstance(owner[1], nn.Linear) or owner[0] != "weight":
            raise ValueError(f"{name!r} is not the weight of an nn.Linear module (an input "
                             "embedding not tied to the head has no activation statistics)")
        modules[name] = owner[1]
    device = named[0][1].device
    windows = windows.to(device)
    acc = {name: torch.zeros(m.in_features, dtype=torch.float64, device=device)
           for name, m in modules.items()}

    def make_hook(name: str) -> Callable[[nn.Module, tuple], None]:
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            # Square in float64: a batch's sum then does not depend on how the windows were
            # batched or partitioned beyond float64 rounding.
            x = x.reshape(-1, x.shape[-1]).to(torch.float64)
            acc[name] += (x * x).sum(0)

        return hook

    handles = [m.register_forward_pre_hook(make_hook(name)) for name, m in modules.items()]
    stop_at = _stop_module(model, list(modules.values()))
    if stop_at is not None:
        handles.append(stop_at.register_forward_pre_hook(_raise_stop))
    try:
        with _eval_mode(model), torch.no_grad():
            for lo in range(0, windows.shape[0], batch_size):
                ids = windows[lo : lo + batch_size]
                with contextlib.suppress(_Stop):
                    model(input_ids=ids, use_cache=False)
                if progress is not None:
                    progress(int(ids.shape[0]))
    finally:
        for h in handles:
            h.remove()
    sums = {}
    for name, m in modules.items():
        v = acc[name].cpu()
        sums[name] = v.expand(m.out_features, -1).contiguous() if broadcast else v
    return _finish(sums, int(windows.numel()), "activation")


def lm_param_groups(model: nn.Module, names: Sequence[str], groups: int) -> list[list[str]]:
    """Split parameter names into at most ``groups`` groups of consecutive decoder blocks.

    A decoder block (``model.layers.<i>``: the largest ``nn.ModuleList`` of the model) is never
    split; parameters outside the blocks (embeddings, final norm, head) are units of their own
    at their place in model order. Units are cut into contiguous runs minimizing the largest
    group's element count, every group non-empty (fewer than ``groups`` when there are fewer
    units). Names keep model order.

    Cost trade-off (G groups, one Ray task each, over the same windows):

    - ``fisher``: every task still runs the whole forward (the loss needs the whole model) and
      the backward from the loss down to its group's first layer; it only accumulates its own
      group's squares. Total compute ≈ ``G × forward + Σ_g backward(g)``, versus
      ``forward + backward`` for one task: groups buy parallelism and bound each task's float64
      sums (8 bytes per parameter of the group) at the price of repeated forwards. Later groups
      are cheaper (shorter backward), which is why groups follow block order.
    - ``activation``: every task hooks only its group's Linears and its forward stops after its
      last block, so the early groups are cheap; total ≈ ``Σ_g forward up to g's last block``.

    Raises:
        ValueError: unknown or duplicate names, none, or ``groups < 1``.
    """
    _check_positive("groups", groups)
    named = _select(model, names)
    blocks = _decoder_blocks(model)
    units: list[list[str]] = []
    weights: list[int] = []
    last_key = None
    for name, p in named:
        key = name
        if blocks is not None and name.startswith(blocks[0] + "."):
            key = blocks[0] + "." + name[len(blocks[0]) + 1 :].split(".", 1)[0]
        if key != last_key:
            units.append([])
            weights.append(0)
            last_key = key
        units[-1].append(name)
        weights[-1] += p.numel()
    cuts = _contiguous_partition(weights, min(groups, len(units)))
    return [[n for u in units[a:b] for n in u] for a, b in zip(cuts, cuts[1:], strict=False)]


# --------------------------------------------------------------------------------------------
# Fisher: batched per-window gradients of Linear layers through taps
# --------------------------------------------------------------------------------------------


class _NotOnce(Exception):
    """A tapped Linear was called other than once per forward with batch-first input."""


class _Slot:
    """One tapped ``nn.Linear``: its group parameter names, the input of the current forward and
    the float64 sums its backward adds to."""

    def __init__(self, module: nn.Linear, weight: str | None, bias: str | None) -> None:
        self.module, self.weight, self.bias = module, weight, bias
        self.inputs: list[Tensor] = []
        self.sums: dict[str, Tensor] = {
            n: torch.zeros(getattr(module, a).shape, dtype=torch.float64,
                           device=module.weight.device)
            for a, n in (("weight", weight), ("bias", bias)) if n is not None
        }

    def accumulate(self, g: Tensor) -> None:
        """Add ``Σ_s (per-window gradient)²`` for the output gradient ``g`` ``[B, ..., out]``."""
        a = self.inputs.pop()
        b = a.shape[0]
        a3 = a.reshape(b, -1, a.shape[-1])
        g3 = g.reshape(b, -1, g.shape[-1])
        if a3.dtype not in (torch.float32, torch.float64):
            # Half-precision per-window gradients would round before squaring.
            a3, g3 = a3.float(), g3.float()
        else:
            g3 = g3.to(a3.dtype)
        if self.bias is not None:
            self.sums[self.bias] += g3.sum(1).square_().sum(0, dtype=torch.float64)
        if self.weight is None:
            return
        out_f, in_f = g3.shape[-1], a3.shape[-1]
        step = chunk_size(out_f * in_f, b, a3.device)
        for lo in range(0, b, step):
            # g_sᵀ a_s for a few windows at once: [c, out, in], squared in place (it is ours).
            per = torch.bmm(g3[lo : lo + step].transpose(1, 2), a3[lo : lo + step])
            self.sums[self.weight] += per.square_().sum(0, dtype=torch.float64)


class _Tap(torch.autograd.Function):
    """Identity on a Linear's output whose backward hands the output gradient to its slot.

    The scalar ``probe`` input (requires grad) puts every tap on the path of
    ``autograd.grad(loss, probe)``, so the backward reaches them all while no parameter
    requires grad (no weight gradient is ever computed)."""

    @staticmethod
    def forward(ctx, y: Tensor, probe: Tensor, slot: _Slot) -> Tensor:
        ctx.slot = slot
        # A clone, not y itself: an in-place op after the Linear on an output returned as-is
        # would be refused by autograd; on a clone it is recorded after the tap, so the tap
        # still receives the gradient wrt the Linear's output.
        return y.clone()

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor | None, None, None]:
        ctx.slot.accumulate(g)
        return (g if ctx.needs_input_grad[0] else None), None, None


def _tap_slots(
    model: nn.Module, named: list[tuple[str, Tensor]]
) -> tuple[list[_Slot], list[tuple[str, Tensor]]] | None:
    """(slots, extras) for the tapped path, or ``None`` when it cannot serve the group.

    Extras are the input embedding and the output head weights (tied or not): their gradient
    comes from the same backward (run one window at a time). Any other parameter not owned
    by an nn.Linear, or a weight or module used at two places, needs the generic path."""
    embeddings = {id(getattr(m, "weight", None)) for m in (
        getattr(model, "get_input_embeddings", lambda: None)(),
        getattr(model, "get_output_embeddings", lambda: None)()) if m is not None}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    module_uses = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    param_uses = Counter(
        id(p) for _, m in model.named_modules() for p in m.parameters(recurse=False)
    )
    by_module: dict[int, tuple[nn.Linear, dict[str, str]]] = {}
    extras = []
    for name, p in named:
        if id(p) in embeddings:
            extras.append((name, p))
            continue
        owner = _owner(model, name)
        if owner is None:
            return None
        attr, module = owner
        if (
            not isinstance(module, nn.Linear)
            or module is head
            or module_uses[id(module)] > 1
            or param_uses[id(p)] > 1
        ):
            return None
        by_module.setdefault(id(module), (module, {}))[1][attr] = name
    slots = [_Slot(m, names.get("weight"), names.get("bias")) for m, names in by_module.values()]
    return slots, extras


def _fisher_tapped(
    model: nn.Module,
    windows: Tensor,
    slots: list[_Slot],
    batch_size: int,
    chunk_tokens: int,
    progress: Progress | None,
    extras: list[tuple[str, Tensor]] = (),
) -> dict[str, Tensor]:
    length = int(windows.shape[1])
    probe = torch.zeros((), device=windows.device, requires_grad=True)
    if extras and batch_size != 1:
        raise ValueError("parameters outside the taps need one window per backward")
    tensors = [p for _, p in extras]
    extra_sums = [torch.zeros(p.shape, dtype=torch.float64, device=p.device) for p in tensors]
    calls: Counter[int] = Counter()

    def make_hook(slot: _Slot) -> Callable[[nn.Module, tuple, Tensor], Tensor]:
        def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
            calls[id(slot)] += 1
            slot.inputs.append(args[0].detach())
            return _Tap.apply(output, probe, slot)

        return hook

    handles = [s.module.register_forward_hook(make_hook(s)) for s in slots]
    try:
        with differentiate_only(model, tensors), torch.enable_grad():
            for lo in range(0, windows.shape[0], batch_size):
                ids = windows[lo : lo + batch_size]
                calls.clear()
                for s in slots:
                    s.inputs.clear()
                # Windows are independent, so the gradient of the sum has window s's
                # gradient in window s's rows: one backward serves the whole batch.
                loss = next_token_nll(model, ids, chunk_tokens=chunk_tokens).sum() / (length - 1)
                for s in slots:
                    if calls[id(s)] > 1 or any(a.dim() < 2 or a.shape[0] != ids.shape[0]
                                               for a in s.inputs):
                        raise _NotOnce
                if loss.requires_grad:  # False when nothing of the group is on its path
                    grads = torch.autograd.grad(loss, [probe, *tensors], allow_unused=True)
                    for acc, g in zip(extra_sums, grads[1:], strict=True):
                        if g is not None:
                            acc += g.to(torch.float64).square_()
                    del grads
                del loss
                if progress is not None:
                    progress(int(ids.shape[0]))
    finally:
        for h in handles:
            h.remove()
        for s in slots:
            s.inputs.clear()
    out = {n: v for s in slots for n, v in s.sums.items()}
    out.update({name: acc for (name, _), acc in zip(extras, extra_sums, strict=True)})
    return out


# --------------------------------------------------------------------------------------------
# Fisher: generic path, one backward per window
# --------------------------------------------------------------------------------------------


def _fisher_generic(
    model: nn.Module,
    windows: Tensor,
    named: list[tuple[str, Tensor]],
    chunk_tokens: int,
    progress: Progress | None,
) -> dict[str, Tensor]:
    length = int(windows.shape[1])
    tensors = [p for _, p in named]
    sums = [torch.zeros(p.shape, dtype=torch.float64, device=p.device) for p in tensors]
    with differentiate_only(model, tensors):
        for s in range(windows.shape[0]):
            with torch.enable_grad():
                loss = next_token_nll(model, windows[s : s + 1], chunk_tokens=chunk_tokens)[0]
                loss = loss / (length - 1)
            if loss.requires_grad:
                grads = torch.autograd.grad(loss, tensors, allow_unused=True)
                for acc, g in zip(sums, grads, strict=True):
                    if g is not None:
                        acc += g.to(torch.float64).square_()
            if progress is not None:
                progress(1)
    return {name: acc for (name, _), acc in zip(named, sums, strict=True)}


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


class _Stop(Exception):
    """Raised by a pre-hook to end a forward whose remaining modules are not needed."""


def _raise_stop(module: nn.Module, args: tuple) -> None:
    raise _Stop


def _stop_module(model: nn.Module, hooked: list[nn.Module]) -> nn.Module | None:
    """A module whose call can end the forward once every hooked module has run: the block
    after the last hooked block, else the output head when it is not hooked, else ``None``.

    Only used when each hooked module occurs once in the module tree (a module shared with a
    later block could still be called after the stop)."""
    uses = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    if any(uses[id(m)] > 1 for m in hooked):
        return None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    blocks = _decoder_blocks(model)
    if blocks is not None:
        owner: dict[int, int] = {}
        for i, block in enumerate(blocks[1]):
            for m in block.modules():
                owner[id(m)] = i
        if all(id(m) in owner for m in hooked):
            last = max(owner[id(m)] for m in hooked)
            if last + 1 < len(blocks[1]):
                return blocks[1][last + 1]
    if isinstance(head, nn.Module) and all(m is not head for m in hooked):
        return head
    return None


def _decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """``(prefix, blocks)``: the ``nn.ModuleList`` of same-type modules holding the most
    parameters (a decoder's layers: ``model.layers``, ``transformer.h``), or ``None``."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for prefix, m in model.named_modules():
        if not isinstance(m, nn.ModuleList) or len(m) == 0:
            continue
        if len({type(c) for c in m}) != 1:
            continue
        size = sum(p.numel() for p in m.parameters())
        if best is None or size > best[0]:
            best = (size, prefix, m)
    return None if best is None else (best[1], best[2])


def _contiguous_partition(weights: list[int], parts: int) -> list[int]:
    """Cut points ``[0, c1, ..., len]`` splitting ``weights`` into ``parts`` non-empty
    contiguous runs with the smallest possible largest run sum (exact, dynamic programming)."""
    u = len(weights)
    prefix = [0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    inf = float("inf")
    # best[g][i]: smallest max over i first units in g runs; arg[g][i]: start of the last run.
    best = [[inf] * (u + 1) for _ in range(parts + 1)]
    arg = [[0] * (u + 1) for _ in range(parts + 1)]
    best[0][0] = 0
    for g in range(1, parts + 1):
        for i in range(g, u - (parts - g) + 1):
            for j in range(g - 1, i):
                cost = max(best[g - 1][j], prefix[i] - prefix[j])
                if cost < best[g][i]:  # strict: the earliest cut wins ties (deterministic)
                    best[g][i], arg[g][i] = cost, j
    cuts = [u]
    for g in range(parts, 0, -1):
        cuts.append(arg[g][cuts[-1]])
    return cuts[::-1]


def _owner(model: nn.Module, name: str) -> tuple[str, nn.Module] | None:
    """``(attribute, module)`` owning the parameter named ``name``, or ``None``."""
    path, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(path) if path else model
    except AttributeError:
        return None
    return (attr, module) if attr in dict(module.named_parameters(recurse=False)) else None


def _select(model: nn.Module, names: Sequence[str]) -> list[tuple[str, Tensor]]:
    """``(name, parameter)`` for ``names``, in model order; each must exist once."""
    if isinstance(names, str):
        raise ValueError("expected a list of parameter names, not one string")
    names = list(names)
    dup = sorted(n for n, k in Counter(names).items() if k > 1)
    if dup:
        raise ValueError(f"duplicate parameter names {dup}")
    all_named = dict(model.named_parameters())
    unknown = [n for n in names if n not in all_named]
    if unknown:
        raise ValueError(
            f"unknown parameter names {unknown}; expected names from model.named_parameters()"
        )
    if not names:
        raise ValueError("empty parameter group: nothing to estimate")
    wanted = set(names)
    return [(n, p) for n, p in all_named.items() if n in wanted]


def _check_windows(windows: Tensor) -> Tensor:
    if not isinstance(windows, Tensor) or windows.dim() != 2 or windows.shape[1] < 2:
        shape = tuple(windows.shape) if isinstance(windows, Tensor) else type(windows).__name__
        raise ValueError(f"windows must be token ids [n, L ≥ 2], got {shape}")
    if windows.shape[0] == 0:
        raise ValueError("windows is empty: no calibration sequences")
    if windows.dtype != torch.int64:
        raise ValueError(f"windows must be int64 token ids, got {windows.dtype}")
    return windows


def _check_positive(what: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive int, got {value!r}")


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the call (no dropout, deterministic); every module's flag restored."""
    saved = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in saved:
            m.training = flag  # per module: a caller may have mixed modes


def _finish(sums: dict[str, Tensor], n: int, what: str) -> HessianSums:
    bad = [name for name, s in sums.items() if not torch.isfinite(s).all()]
    if bad:
        raise FloatingPointError(
            f"non-finite {what} diagonal for parameters {bad}; check the model's weights "
            "(NaN/inf) and the token ids"
        )
    return HessianSums(sums={name: s.cpu() for name, s in sums.items()}, n=n)
