"""Diagonal-Hessian estimators for classifiers, as plain functions (no Ray, no store, no files).

The quantizers weight each parameter's squared quantization error by ``h_i``, the i-th diagonal
element of the Hessian of the average training loss (Choi et al. 2017; docs/METHOD.md §1). This
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

This module holds the entry points and parameter groups; the engines are ``persample``
(squared per-sample gradients for ``ggn`` and ``fisher``, without a loop over samples) and
``hutchinson``.

Model contract: ``model(x)`` returns logits ``[B, K]``, or ``[B, ..., K]`` with labels
``[B, ...]`` (a sample is then one input and its loss is the sum over its positions; ``ggn``
exact needs ``[B, K]``). Call ``model.eval()`` first: BatchNorm in train mode couples the
samples of a batch, and dropout makes the estimate random. A parameter must be used only inside
the forward of the module(s) that own it (true of standard architectures). Batch-first layouts
are recognised by size, so a sequence-first module input ``[T, B, D]`` is only misread when
``T == B``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pipeline.hessian.hutchinson import hutchinson_batch
from pipeline.hessian.persample import per_sample_sq_batch

__all__ = [
    "ESTIMATORS",
    "GGN_MODES",
    "HUTCHINSON_NONNEG",
    "HessianSums",
    "adam_diag",
    "differentiate_only",
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
    with differentiate_only(model, [p for _, p in named]):
        for x, y in batches:
            x = x.to(device)
            y = y.to(device)
            if estimator == "hutchinson":
                part = hutchinson_batch(model, named, x, y, n_samples, gen)
            else:
                part = per_sample_sq_batch(model, named, x, y, estimator, mode, n_samples, gen)
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
def differentiate_only(model: nn.Module, group: list[Tensor]) -> Iterator[None]:
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
