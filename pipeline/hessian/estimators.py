"""Diagonal-Hessian estimators for classifiers, as plain functions (no Ray, no store, no files).

The quantizers weight each parameter's squared quantization error by ``h_i``, the i-th diagonal
element of the Hessian of the average training loss (Choi et al. 2017, §1 of DESIGN.md). This
module estimates that diagonal in four ways:

``ggn``
    Diagonal of the generalized Gauss-Newton matrix ``Σ_n J_nᵀ H_out,n J_n`` of the summed
    softmax cross-entropy, ``H_out = diag(p) - p pᵀ``. It is the curvature LeCun-style
    second-derivative backprop approximates, is non-negative, and equals the Hessian at a
    minimum where the residuals vanish. ``mode="exact"`` uses ``H_out = Σ_k s_k s_kᵀ`` with
    ``s_k = sqrt(p_k) (e_k - p)`` (K backward passes); ``mode="mc"`` draws labels
    ``ŷ ~ Categorical(p)`` and sums squared per-sample gradients (unbiased, one backward per draw).
``fisher``
    Empirical Fisher: squared per-sample gradients with the true labels (SqueezeLLM's choice).
``hutchinson``
    ``E[z ⊙ H z]`` with Rademacher ``z``: an unbiased estimate of the true Hessian diagonal. It can
    be negative; it is returned raw and the quantizers make it non-negative (``HUTCHINSON_NONNEG``).
``adam``
    ``sqrt(v̂)`` from Adam's second moments at the end of training (``adam_diag``), free but
    only available when the optimizer state came with the model.

Every estimator returns float64 *sums* over samples plus the sample count (``HessianSums``) so
that data partitions computed on different workers reduce exactly by addition; ``.mean()``
divides once at the end.

Per-sample gradients are computed without a loop over samples: forward hooks on ``nn.Linear``
and ``nn.Conv2d`` record each layer's input, one backward per output cotangent yields the
gradient wrt each layer's output, and the per-sample squared weight gradients follow from one
matmul (Linear: ``(g²)ᵀ (a²)``) or one batched matmul over unfolded patches (Conv2d). Parameters
owned by any other module type go through ``torch.func`` (``vmap(grad(...))``).

Model contract: ``model(x)`` returns logits ``[B, K]``, or ``[B, ..., K]`` with labels
``[B, ...]`` (a sample is then one input and its loss is the sum over positions; ``ggn`` exact
needs ``[B, K]``). Call ``model.eval()`` first: BatchNorm in train mode couples the samples of a
batch, and dropout makes the estimate random. Parameters of ``nn.Linear``/``nn.Conv2d`` modules
must be used only through those modules' ``forward`` (true for standard architectures; tied
weights shared between such modules are handled).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ESTIMATORS",
    "GGN_MODES",
    "HUTCHINSON_NONNEG",
    "HessianSums",
    "adam_diag",
    "estimate_diag",
]

# Estimators computed from data by `estimate_diag`; "adam" needs optimizer state, see adam_diag.
ESTIMATORS = ("ggn", "fisher", "hutchinson")
GGN_MODES = ("exact", "mc")
# Hutchinson's diagonal is stored raw (it can be negative where the loss is locally non-convex
# or from probe noise); the quantizers turn it into weights with this function of the raw value.
HUTCHINSON_NONNEG = "abs"

_MISSING_ADAM = (
    "the model came without Adam state; use estimator ggn/fisher or train with hwq's train stage"
)


@dataclass
class HessianSums:
    """Per-parameter diagonal-Hessian sums over ``n`` samples, ready to be reduced by addition.

    ``sums[name]``: float64 tensor on the CPU, shaped like the parameter ``name``, holding the sum
    over samples (for ``hutchinson``: over batches of the batch-summed loss's ``z ⊙ Hz``) so that
    ``sums[name] / n`` is the estimate for the mean loss. ``n``: number of inputs summed.
    """

    sums: dict[str, Tensor]
    n: int

    def add(self, other: HessianSums) -> HessianSums:
        """Return a new ``HessianSums`` with the sums and counts of ``self`` and ``other`` added.

        Both must cover the same parameter names with the same shapes (partitions of the data
        for one parameter group). Neither operand is modified.
        """
        if self.sums.keys() != other.sums.keys():
            only_self = sorted(self.sums.keys() - other.sums.keys())
            only_other = sorted(other.sums.keys() - self.sums.keys())
            raise ValueError(
                "cannot add HessianSums over different parameters: "
                f"only in left {only_self}, only in right {only_other}"
            )
        out: dict[str, Tensor] = {}
        for name, a in self.sums.items():
            b = other.sums[name]
            if a.shape != b.shape:
                raise ValueError(
                    f"cannot add HessianSums: {name!r} has shape {tuple(a.shape)} on the left "
                    f"and {tuple(b.shape)} on the right"
                )
            out[name] = a.to(torch.float64) + b.to(device=a.device, dtype=torch.float64)
        return HessianSums(sums=out, n=self.n + other.n)

    def mean(self) -> dict[str, Tensor]:
        """Per-parameter diagonal of the Hessian of the mean loss: float32 ``sums[name] / n``."""
        if self.n <= 0:
            raise ValueError("HessianSums.mean() needs n > 0; no samples were summed")
        # Divide in float64, round once.
        return {name: (s / self.n).to(torch.float32) for name, s in self.sums.items()}


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------


def estimate_diag(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    estimator: str,
    *,
    params: Sequence[str] | None = None,
    mode: str = "mc",
    n_samples: int = 1,
    seed: int = 0,
) -> HessianSums:
    """Estimate the diagonal of the Hessian of the summed cross-entropy over ``batches``.

    Args:
        model: classifier, ``model(x) -> logits`` float ``[B, K]`` (or ``[B, ..., K]``, see the
            module docstring). Put it in eval mode first. Its parameters' ``requires_grad``
            flags are changed during the call (group on, others off) and restored afterwards.
        batches: iterable of ``(x, y)``: ``x`` the model input with batch dim ``B`` first,
            ``y`` int64 class indices ``[B]`` (``[B, ...]`` for per-position logits). Moved to
            the device of the model's parameters. ``y`` is unused by ``ggn``.
        estimator: ``"ggn"``, ``"fisher"`` or ``"hutchinson"`` (Adam: see ``adam_diag``).
        params: parameter group, names from ``model.named_parameters()``; ``None`` = all. Only
            these are differentiated, so the backward stops at the group's earliest layer.
            ``ggn`` and ``fisher`` give exactly the entries of a full pass; ``hutchinson``'s
            probes then only span the group, so its noise (not its expectation) differs.
        mode: ``ggn`` only: ``"mc"`` (default; ``n_samples`` labels drawn per input, one backward
            each) or ``"exact"`` (K backward passes per batch).
        n_samples: ``ggn`` mc: labels drawn per input; ``hutchinson``: Rademacher probes per
            batch. The result is averaged over them. Ignored otherwise.
        seed: seeds the ``torch.Generator`` for label draws and probes (one per call; give each
            data partition its own seed).

    Returns:
        ``HessianSums`` with float64 CPU sums for the names of the group (in
        ``named_parameters`` order) and ``n`` = number of inputs seen; ``.mean()`` is the
        diagonal for the mean loss. ``hutchinson`` sums are raw (may be negative).

    Raises:
        ValueError: unknown estimator/mode, bad ``n_samples``, unknown parameter names, an
            empty group or no data, logits of the wrong shape.
        FloatingPointError: a non-finite result (names the parameters affected).
    """
    if estimator not in ESTIMATORS:
        hint = "; for Adam's sqrt(v) use adam_diag()" if estimator == "adam" else ""
        raise ValueError(f"unknown estimator {estimator!r}: expected one of {ESTIMATORS}{hint}")
    if estimator == "ggn" and mode not in GGN_MODES:
        raise ValueError(f"unknown ggn mode {mode!r}: expected one of {GGN_MODES}")
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive int, got {n_samples!r}")

    named = _select_params(model, params)
    device = named[0][1].device
    sums = {name: torch.zeros(p.shape, dtype=torch.float64, device=device) for name, p in named}
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    n = 0
    with _differentiate_only(model, [p for _, p in named]):
        for x, y in batches:
            x = x.to(device)
            y = y.to(device)
            if estimator == "hutchinson":
                part = _hutchinson_batch(model, named, x, y, n_samples, gen)
            else:
                part = _per_sample_sq_batch(model, named, x, y, estimator, mode, n_samples, gen)
            for name, v in part.items():
                sums[name] += v.to(torch.float64)
            n += int(x.shape[0])
    if n == 0:
        raise ValueError("estimate_diag got no samples: `batches` was empty")
    bad = [name for name, s in sums.items() if not torch.isfinite(s).all()]
    if bad:
        raise FloatingPointError(
            f"non-finite {estimator} diagonal for parameters {bad}; check the model's logits "
            "(NaN/inf weights or inputs)"
        )
    return HessianSums(sums={name: s.cpu() for name, s in sums.items()}, n=n)


def adam_diag(
    exp_avg_sq: dict[str, Tensor],
    step: int,
    beta2: float,
    *,
    params: Iterable[str] | None = None,
) -> dict[str, Tensor]:
    """Paper's free alternative: ``sqrt(v̂)`` from Adam's second-moment estimates.

    Args:
        exp_avg_sq: ``{name: v}`` Adam's ``exp_avg_sq`` per parameter (any float dtype, parameter
            shape), as stored in ``torch.optim.Adam``'s state.
        step: number of Adam steps taken (>= 1), for the bias correction.
        beta2: Adam's second-moment decay, in ``[0, 1)``.
        params: names that must all be present (e.g. the model's parameter names); ``None``
            only requires ``exp_avg_sq`` to be non-empty. Only these are returned when given.

    Returns:
        ``{name: sqrt(v / (1 - beta2**step))}`` float32, shaped like ``v``. This is already a
        per-sample-mean scale; it is not a ``HessianSums`` because there is nothing to reduce.
    """
    if not exp_avg_sq:
        raise ValueError(_MISSING_ADAM)
    names = list(exp_avg_sq) if params is None else list(params)
    missing = [name for name in names if name not in exp_avg_sq]
    if missing:
        raise ValueError(f"{_MISSING_ADAM} (no exp_avg_sq for {missing})")
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"Adam step must be a positive int, got {step!r}")
    if not 0.0 <= beta2 < 1.0:
        raise ValueError(f"Adam beta2 must be in [0, 1), got {beta2!r}")
    # 1 - beta2**step cancels catastrophically for beta2 near 1 and small steps; expm1 does not.
    correction = -math.expm1(step * math.log(beta2)) if beta2 > 0 else 1.0
    out: dict[str, Tensor] = {}
    for name in names:
        v = exp_avg_sq[name].detach().to(torch.float64)
        if not torch.isfinite(v).all() or (v < 0).any():
            raise ValueError(f"exp_avg_sq[{name!r}] has negative or non-finite entries")
        out[name] = torch.sqrt(v / correction).to(torch.float32)
    return out


# --------------------------------------------------------------------------------------------
# Parameter groups
# --------------------------------------------------------------------------------------------


def _select_params(model: nn.Module, params: Sequence[str] | None) -> list[tuple[str, Tensor]]:
    all_named = list(model.named_parameters())
    if params is None:
        named = all_named
    else:
        if isinstance(params, str):
            raise ValueError("params must be a list of parameter names, not one string")
        known = dict(all_named)
        unknown = [name for name in params if name not in known]
        if unknown:
            raise ValueError(
                f"unknown parameter names {unknown}; expected names from model.named_parameters()"
            )
        wanted = set(params)
        named = [(name, p) for name, p in all_named if name in wanted]
    if not named:
        raise ValueError("empty parameter group: nothing to estimate")
    return named


@contextlib.contextmanager
def _differentiate_only(model: nn.Module, group: list[Tensor]) -> Iterator[None]:
    """Freeze every parameter outside ``group`` (so autograd skips their weight gradients and
    the backward stops at the group's earliest layer); restore all flags on exit."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    in_group = {id(p) for p in group}
    try:
        for p, _ in saved:
            p.requires_grad_(id(p) in in_group)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


# --------------------------------------------------------------------------------------------
# Squared per-sample gradients (ggn, fisher)
# --------------------------------------------------------------------------------------------


def _check_logits(logits: object, batch: int) -> Tensor:
    if not isinstance(logits, Tensor) or logits.dim() < 2 or logits.shape[0] != batch:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"model(x) must return logits [B, ..., K] with B={batch}, got {shape}")
    return logits


def _cotangents(
    logits: Tensor, y: Tensor, estimator: str, mode: str, n_samples: int, gen: torch.Generator
) -> list[Tensor]:
    """Output-space vectors ``v_r`` (each shaped like ``logits``) such that the wanted diagonal
    for this batch is ``Σ_r Σ_n (J_nᵀ v_{r,n})²``."""
    logits = logits.detach()
    k = logits.shape[-1]
    p = torch.softmax(logits.to(torch.float64), dim=-1)
    if estimator == "fisher":
        # ∇_logits CE(logits, y) = p - e_y: the true per-sample gradient.
        if y.shape != logits.shape[:-1]:
            raise ValueError(
                f"labels must be class indices shaped {tuple(logits.shape[:-1])}, "
                f"got {tuple(y.shape)}"
            )
        return [(p - F.one_hot(y.long(), k).to(p.dtype)).to(logits.dtype)]
    if mode == "exact":
        if logits.dim() != 2:
            raise ValueError(
                "ggn mode='exact' needs logits [B, K]; use mode='mc' for per-position logits"
            )
        # H_out = Σ_k s_k s_kᵀ with s_k = sqrt(p_k) (e_k - p): one backward per class.
        sqrt_p = p.sqrt()
        eye = torch.eye(k, dtype=p.dtype, device=p.device)
        return [(sqrt_p[:, j : j + 1] * (eye[j] - p)).to(logits.dtype) for j in range(k)]
    # mc: ŷ ~ Categorical(p); E[(p - e_ŷ)(p - e_ŷ)ᵀ] = diag(p) - ppᵀ, so squared gradients of
    # CE(logits, ŷ) are unbiased for the GGN diagonal. The 1/sqrt(R) makes Σ_r an average.
    flat = p.reshape(-1, k)
    draws = torch.multinomial(flat, n_samples, replacement=True, generator=gen)  # [M, R]
    scale = 1.0 / math.sqrt(n_samples)
    out = []
    for r in range(n_samples):
        onehot = F.one_hot(draws[:, r], k).to(p.dtype)
        out.append(((flat - onehot) * scale).reshape(logits.shape).to(logits.dtype))
    return out


def _fast_module(module: nn.Module) -> bool:
    """Modules whose per-sample weight gradients we compute from hooks (else torch.func)."""
    if isinstance(module, nn.Linear):
        return True
    # F.unfold only pads with zeros and needs explicit integer padding.
    return (
        isinstance(module, nn.Conv2d)
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    )


def _split_group(
    model: nn.Module, named: list[tuple[str, Tensor]]
) -> tuple[dict[int, str], list[nn.Module], list[str]]:
    """Split the group into hook-path params (owned only by Linear/Conv2d as weight/bias) and
    torch.func fallback params. Returns ({id(param): name} for the hook path, the modules to
    hook, the fallback names)."""
    group = {id(p): name for name, p in named}
    owners: dict[int, list[nn.Module]] = {}
    for module in model.modules():
        for attr, p in module.named_parameters(recurse=False):
            if id(p) in group:
                ok = _fast_module(module) and attr in ("weight", "bias")
                owners.setdefault(id(p), []).append(module if ok else None)
    fast: dict[int, str] = {}
    hooked: dict[int, nn.Module] = {}
    fallback: list[str] = []
    for name, p in named:
        mods = owners.get(id(p), [None])
        if all(m is not None for m in mods):
            fast[id(p)] = name
            for m in mods:
                hooked[id(m)] = m
        else:
            fallback.append(name)
    return fast, list(hooked.values()), fallback


def _per_sample_sq_batch(
    model: nn.Module,
    named: list[tuple[str, Tensor]],
    x: Tensor,
    y: Tensor,
    estimator: str,
    mode: str,
    n_samples: int,
    gen: torch.Generator,
) -> dict[str, Tensor]:
    """``{name: Σ_r Σ_n (∂<logits_n, v_{r,n}>/∂θ)²}`` for one batch, shaped like each param."""
    fast, hooked, fallback = _split_group(model, named)
    calls: list[tuple[nn.Module, Tensor, Tensor]] = []  # (module, input, output) per forward call

    def record(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        calls.append((module, inputs[0].detach(), output))

    handles = [m.register_forward_hook(record) for m in hooked]
    try:
        with torch.enable_grad() if fast else torch.no_grad():
            logits = _check_logits(model(x), x.shape[0])
    finally:
        for h in handles:
            h.remove()
    cots = _cotangents(logits, y, estimator, mode, n_samples, gen)
    out: dict[str, Tensor] = {}
    calls = [c for c in calls if c[2].requires_grad]
    if calls:
        out.update(_hooked_sq(calls, fast, logits, cots))
    if fallback:
        out.update(_func_sq(model, dict(named), fallback, x, cots))
    # Group params that the forward never reached have zero curvature.
    return {name: out.get(name, torch.zeros_like(p)) for name, p in named}


def _hooked_sq(
    calls: list[tuple[nn.Module, Tensor, Tensor]],
    fast: dict[int, str],
    logits: Tensor,
    cots: list[Tensor],
) -> dict[str, Tensor]:
    # A param takes the cheapest route, (g²)ᵀ(a²), when it belongs to exactly one Linear call
    # with one position per sample; else its per-sample gradients are materialized, summed over
    # every call that uses it (tied weights, reused modules), then squared.
    uses: dict[int, int] = {}
    for module, _, _ in calls:
        for p in module.parameters(recurse=False):
            if id(p) in fast:
                uses[id(p)] = uses.get(id(p), 0) + 1
    simple = [
        isinstance(m, nn.Linear)
        and a.dim() == 2
        and all(uses[id(p)] == 1 for p in m.parameters(recurse=False) if id(p) in fast)
        for m, a, _ in calls
    ]
    g2: list[Tensor | None] = [None] * len(calls)  # Σ_r g_r² per simple call, [B, out]
    out: dict[str, Tensor] = {}
    outputs = [o for _, _, o in calls]
    for r, v in enumerate(cots):
        # Gradients wrt layer outputs only: autograd never forms the batch-summed weight grads.
        gouts = torch.autograd.grad(
            logits, outputs, grad_outputs=v, retain_graph=r + 1 < len(cots), allow_unused=True
        )
        per_sample: dict[str, Tensor] = {}
        for i, ((module, a, _), g) in enumerate(zip(calls, gouts, strict=True)):
            if g is None:
                continue
            if simple[i]:
                g2[i] = g * g if g2[i] is None else g2[i] + g * g
                continue
            for name, grads in _per_sample_grads(module, a, g, fast).items():
                per_sample[name] = grads if name not in per_sample else per_sample[name] + grads
        for name, grads in per_sample.items():
            sq = (grads * grads).sum(0)
            out[name] = sq if name not in out else out[name] + sq
    for i, (module, a, _) in enumerate(calls):
        if g2[i] is None:
            continue
        w_name = fast.get(id(module.weight))
        if w_name is not None:
            out[w_name] = g2[i].t() @ (a * a)  # Σ_n g_n² a_nᵀ²: exact for one position
        if module.bias is not None and id(module.bias) in fast:
            out[fast[id(module.bias)]] = g2[i].sum(0)
    return out


def _per_sample_grads(
    module: nn.Module, a: Tensor, g: Tensor, fast: dict[int, str]
) -> dict[str, Tensor]:
    """Per-sample gradients ``{name: [B, *param.shape]}`` of a Linear/Conv2d call from its input
    ``a`` and the gradient ``g`` wrt its output."""
    b = a.shape[0]
    res: dict[str, Tensor] = {}
    weight, bias = module.weight, module.bias
    if isinstance(module, nn.Linear):
        a3 = a.reshape(b, -1, a.shape[-1])  # [B, T, in]: positions of one sample
        g3 = g.reshape(b, -1, g.shape[-1])  # [B, T, out]
        if id(weight) in fast:
            res[fast[id(weight)]] = torch.bmm(g3.transpose(1, 2), a3)  # [B, out, in]
        if bias is not None and id(bias) in fast:
            res[fast[id(bias)]] = g3.sum(1)
        return res
    assert isinstance(module, nn.Conv2d)
    if id(weight) in fast:
        groups = module.groups
        # [B, C_in*kh*kw, L]: each column is the receptive field of one output position.
        cols = F.unfold(
            a,
            module.kernel_size,
            dilation=module.dilation,
            padding=module.padding,
            stride=module.stride,
        )
        cols = cols.reshape(b, groups, -1, cols.shape[-1])  # [B, G, C_in/G*kk, L]
        go = g.reshape(b, groups, -1, g.shape[-2] * g.shape[-1])  # [B, G, C_out/G, L]
        per = torch.einsum("bgol,bgcl->bgoc", go, cols)
        res[fast[id(weight)]] = per.reshape(b, *weight.shape)
    if bias is not None and id(bias) in fast:
        res[fast[id(bias)]] = g.sum((2, 3))
    return res


def _func_sq(
    model: nn.Module,
    params: dict[str, Tensor],
    names: list[str],
    x: Tensor,
    cots: list[Tensor],
) -> dict[str, Tensor]:
    """torch.func fallback for parameters of other module types: ``vmap(grad)`` over the batch,
    one vectorized pass per cotangent."""
    from torch.func import functional_call, grad, vmap

    primals = {name: params[name].detach() for name in names}

    def contracted(ps: dict[str, Tensor], xn: Tensor, vn: Tensor) -> Tensor:
        logits = functional_call(model, ps, (xn.unsqueeze(0),))
        return (logits.squeeze(0) * vn).sum()

    per_sample_grad = vmap(grad(contracted), in_dims=(None, 0, 0))
    out = {name: torch.zeros_like(p) for name, p in primals.items()}
    # torch.func's grad ignores an outer no_grad; it only stops regular autograd from also
    # recording a graph for the parameters that still require grad.
    with torch.no_grad():
        for v in cots:
            grads = per_sample_grad(primals, x, v)
            for name in names:
                out[name] += (grads[name] * grads[name]).sum(0)
    return out


# --------------------------------------------------------------------------------------------
# Hutchinson
# --------------------------------------------------------------------------------------------


def _hutchinson_batch(
    model: nn.Module,
    named: list[tuple[str, Tensor]],
    x: Tensor,
    y: Tensor,
    n_samples: int,
    gen: torch.Generator,
) -> dict[str, Tensor]:
    """``(1/R) Σ_r z_r ⊙ H z_r`` for the Hessian of this batch's summed loss (group block)."""
    with torch.enable_grad():
        logits = _check_logits(model(x), x.shape[0])
        if y.shape != logits.shape[:-1]:
            raise ValueError(
                f"labels must be class indices shaped {tuple(logits.shape[:-1])}, "
                f"got {tuple(y.shape)}"
            )
        # Summed, not mean, loss: batches then add up to the Hessian of the total loss.
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), y.reshape(-1).long(), reduction="sum"
        )
        tensors = [p for _, p in named]
        grads = torch.autograd.grad(loss, tensors, create_graph=True, allow_unused=True)
    # A gradient that does not depend on the parameters (or a param the loss never touches)
    # has a zero Hessian row.
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    out = [torch.zeros_like(p) for p in tensors]
    for r in range(n_samples):
        # Draw a probe for every group param (also dead ones) so the stream stays aligned.
        zs = [_rademacher(p, gen) for p in tensors]
        if live:
            hz = torch.autograd.grad(
                [grads[i] for i in live],
                [tensors[i] for i in live],
                grad_outputs=[zs[i] for i in live],
                retain_graph=r + 1 < n_samples,
                allow_unused=True,
            )
            for i, h in zip(live, hz, strict=True):
                if h is not None:
                    out[i] += zs[i] * h
    return {name: o / n_samples for (name, _), o in zip(named, out, strict=True)}


def _rademacher(like: Tensor, gen: torch.Generator) -> Tensor:
    bits = torch.randint(0, 2, like.shape, generator=gen, device=like.device, dtype=torch.int8)
    return (bits * 2 - 1).to(like.dtype)
