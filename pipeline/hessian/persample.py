"""Squared per-sample gradients for the ``ggn`` and ``fisher`` estimators of ``estimators``.

For one batch, :func:`per_sample_sq_batch` returns ``Σ_r Σ_n (∂<logits_n, v_{r,n}>/∂θ)²`` per
group parameter, for output-space cotangents ``v_r`` (:func:`_cotangents`: the true-label
gradient for ``fisher``, K exact or sampled square-root factors of ``H_out`` for ``ggn``).

Per-sample gradients are computed without a loop over samples. One forward records, for every
module that owns group parameters, its input and the graph edge of its output; one backward per
output cotangent yields the gradient wrt each such output (never the batch-summed weight
gradients); then, per module type:

- ``nn.Linear`` with one position per sample: ``Σ_n g_n² (a_n²)ᵀ = (g²)ᵀ (a²)``, one matmul;
- ``nn.Linear`` over positions ``[B, T, in]``: per-sample ``gᵀa`` by one batched matmul;
- ``nn.Conv2d``: the weight gradient of one grouped convolution with the batch folded into the
  groups (per-sample gradients in one kernel call);
- ``nn.Embedding``: per-sample rows scattered with ``index_put_``;
- BatchNorm in eval mode and ``nn.LayerNorm``: closed forms from the normalized input;
- any other module called as ``module(x) -> y`` with batch-first ``x`` and ``y`` (RMSNorm,
  custom layers): ``torch.func`` ``vmap(grad)`` over that module alone;
- parameters of modules called otherwise (extra arguments, the batch folded into rows such as
  ``[B*T, D]``): ``torch.func`` over the whole model, one sample ``x[n:n+1]`` at a time (vmapped).

A parameter used by several calls (tied weights, a module applied twice) has its per-sample
gradients summed over the calls before squaring. In-place ops after a layer
(``ReLU(inplace=True)``) are fine: the gradient edge is taken when the layer returns.

The model contract is that of ``estimators``.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge

__all__ = ["check_logits", "chunk_size", "per_sample_sq_batch"]


def check_logits(logits: object, batch: int) -> Tensor:
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


# Per-sample gradients that are materialized ([chunk, *param.shape]: Conv2d, Linear over
# positions, Embedding, norms, shared parameters) are produced a chunk of samples at a time, with
# at most this many elements per chunk. On CPU the buffer should stay cache-resident while it is
# squared and summed: on LeNet-5 (batch 256, one thread) budgets 2**18..2**20 were equally good
# and one buffer for the whole batch made the fisher pass 17% slower (conv2's per-sample
# gradients: ~45 ms -> ~25 ms per batch). On accelerators it only caps memory (a tied LM head
# must not allocate [B, V, D] at once) while keeping kernels large.
_CHUNK_ELEMENTS_CPU = 2**19
_CHUNK_ELEMENTS_ACCEL = 2**25


def chunk_size(width: int, batch: int, device: torch.device) -> int:
    """Samples per chunk for per-sample buffers of ``width`` elements each."""
    budget = _CHUNK_ELEMENTS_CPU if device.type == "cpu" else _CHUNK_ELEMENTS_ACCEL
    return max(1, min(batch, budget // max(width, 1)))


_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@dataclass
class _Call:
    """One forward call of a module that owns group parameters directly."""

    module: nn.Module
    inp: Tensor  # detached first positional input, batch dim first
    edge: GradientEdge  # where the module's output enters the graph (see per_sample_sq_batch)
    kind: str  # "linear" | "conv" | "embedding" | "batchnorm" | "layernorm" | "module"
    names: dict[str, str]  # attribute on the module -> group parameter name


def _kind(module: nn.Module, attrs: Iterable[str]) -> str:
    """How per-sample gradients of a module's direct parameters are computed."""
    if not set(attrs) <= {"weight", "bias"}:
        return "module"
    if isinstance(module, nn.Linear):
        return "linear"
    # Non-zero padding modes pad inside forward (the hooked input is not what the kernel sees)
    # and string padding has no explicit integer form for convolution_backward.
    if (
        isinstance(module, nn.Conv2d)
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    ):
        return "conv"
    # max_norm renormalizes the table in place during forward; scale_grad_by_freq couples a
    # sample's positions: both go through torch.func.
    if isinstance(module, nn.Embedding) and module.max_norm is None:
        return "module" if module.scale_grad_by_freq else "embedding"
    # In eval mode with running statistics BatchNorm is a fixed per-channel affine map; in train
    # mode it couples the samples and has no per-sample gradient (torch.func will refuse it).
    if isinstance(module, _BATCH_NORMS) and not module.training and module.running_var is not None:
        return "batchnorm"
    if isinstance(module, nn.LayerNorm):
        return "layernorm"
    return "module"


def per_sample_sq_batch(
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
    b = x.shape[0]
    group = {id(p): name for name, p in named}
    owners = [m for m in model.modules() if any(id(p) in group for p in m.parameters(False))]
    records: list[tuple[nn.Module, tuple, dict, object, GradientEdge | None]] = []

    def record(module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        # The gradient edge is taken now: an in-place op after the module (ReLU(inplace=True))
        # re-points the output tensor at the later node, and differentiating wrt the tensor
        # would then give the post-activation gradient.
        edge = None
        if isinstance(output, Tensor) and output.requires_grad:
            edge = torch.autograd.graph.get_gradient_edge(output)
        records.append((module, args, kwargs, output, edge))

    handles = [m.register_forward_hook(record, with_kwargs=True) for m in owners]
    try:
        with torch.enable_grad():
            logits = check_logits(model(x), b)
    finally:
        for h in handles:
            h.remove()
    cots = _cotangents(logits, y, estimator, mode, n_samples, gen)

    # Modules called as module(batch_first_tensor) -> batch_first_tensor get the local paths;
    # any other call (extra args, batch folded into rows, no tensor out) sends that module's
    # parameters to the whole-model torch.func fallback, where "a sample" is unambiguous.
    whole_model: set[str] = set()
    candidates = []
    for module, args, kwargs, output, edge in records:
        direct = {
            a: group[id(p)] for a, p in module.named_parameters(recurse=False) if id(p) in group
        }
        if edge is None and isinstance(output, Tensor):
            continue  # called under no_grad: contributes nothing
        ok = (
            len(args) == 1
            and not kwargs
            and isinstance(args[0], Tensor)
            and args[0].dim() >= 1
            and args[0].shape[0] == b
            and isinstance(output, Tensor)
            and output.shape[0] == b
        )
        if not ok:
            whole_model.update(direct.values())
            continue
        candidates.append((module, args[0].detach(), edge, direct))
    calls = []
    for module, inp, edge, direct in candidates:
        names = {a: n for a, n in direct.items() if n not in whole_model}
        if names:
            calls.append(_Call(module, inp, edge, _kind(module, names), names))

    out: dict[str, Tensor] = {}
    if calls:
        out.update(_hooked_sq(calls, dict(named), logits, cots))
    if whole_model:
        fallback = [name for name, _ in named if name in whole_model]
        out.update(_func_sq(model, dict(named), fallback, x, cots))
    # Group params that the forward never reached have zero curvature.
    return {name: out.get(name, torch.zeros_like(p)) for name, p in named}


def _hooked_sq(
    calls: list[_Call], params: dict[str, Tensor], logits: Tensor, cots: list[Tensor]
) -> dict[str, Tensor]:
    # A Linear call with one position per sample whose parameters no other call uses takes the
    # cheapest route, Σ_n g_n² (a_n²)ᵀ = (g²)ᵀ(a²): one matmul, nothing per-sample materialized.
    # Everything else materializes per-sample gradients chunk by chunk; a parameter used by
    # several calls (tied weights, a module applied twice) has them summed over its calls
    # before squaring.
    uses = Counter(name for c in calls for name in c.names.values())
    shared = {name for name, k in uses.items() if k > 1}
    simple = [
        c.kind == "linear" and c.inp.dim() == 2 and not shared & set(c.names.values())
        for c in calls
    ]
    # Calls touching a shared parameter run through one chunk loop together so that the
    # per-sample gradients of that parameter can be summed over calls; the others each get the
    # chunk size that suits their own width.
    joint = [
        not s and bool(shared & set(c.names.values())) for c, s in zip(calls, simple, strict=True)
    ]
    numel = {name: p.numel() for name, p in params.items()}
    b = calls[0].inp.shape[0]
    device = calls[0].inp.device
    joint_width = max(
        (sum(numel[n] for n in c.names.values()) for c, j in zip(calls, joint, strict=True) if j),
        default=0,
    ) + sum(numel[n] for n in shared)
    joint_chunk = chunk_size(joint_width, b, device)

    out: dict[str, Tensor] = {}

    def add(name: str, value: Tensor) -> None:
        out[name] = value if name not in out else out[name] + value

    g2: list[Tensor | None] = [None] * len(calls)  # Σ_r g_r² per simple call, [B, out]
    for r, v in enumerate(cots):
        # Gradients wrt the layers' outputs only: autograd never forms batch-summed weight
        # gradients, and stops at the earliest layer of the group.
        gouts = torch.autograd.grad(
            logits,
            [c.edge for c in calls],
            grad_outputs=v,
            retain_graph=r + 1 < len(cots),
            allow_unused=True,
        )
        for i, (c, g) in enumerate(zip(calls, gouts, strict=True)):
            if g is None:
                continue
            if simple[i]:
                g2[i] = g * g if g2[i] is None else g2[i] + g * g
            elif not joint[i]:
                chunk = chunk_size(sum(numel[n] for n in c.names.values()), b, device)
                for lo in range(0, b, chunk):
                    for name, grads in _per_sample_grads(
                        c, c.inp[lo : lo + chunk], g[lo : lo + chunk]
                    ).items():
                        # Square in place: the [chunk, *shape] buffer is ours.
                        add(name, grads.square_().sum(0))
        if not any(joint):
            continue
        for lo in range(0, b, joint_chunk):
            hi = lo + joint_chunk
            acc: dict[str, Tensor] = {}  # shared params: per-sample grads summed over calls
            for i, (c, g) in enumerate(zip(calls, gouts, strict=True)):
                if not joint[i] or g is None:
                    continue
                for name, grads in _per_sample_grads(c, c.inp[lo:hi], g[lo:hi]).items():
                    if name in shared:
                        acc[name] = grads if name not in acc else acc[name] + grads
                    else:
                        add(name, grads.square_().sum(0))
            for name, grads in acc.items():
                add(name, grads.square_().sum(0))
    for c, sq in zip(calls, g2, strict=True):
        if sq is None:
            continue
        if "weight" in c.names:
            add(c.names["weight"], sq.t() @ (c.inp * c.inp))
        if "bias" in c.names:
            add(c.names["bias"], sq.sum(0))
    return out


def _per_sample_grads(call: _Call, a: Tensor, g: Tensor) -> dict[str, Tensor]:
    """Per-sample gradients ``{name: [b, *param.shape]}`` of one call's group parameters from its
    input ``a`` ``[b, ...]`` and the gradient ``g`` wrt its output ``[b, ...]``."""
    module, names, b = call.module, call.names, a.shape[0]
    res: dict[str, Tensor] = {}
    if call.kind == "linear":
        a3 = a.reshape(b, -1, a.shape[-1])  # [b, T, in]: the positions of one sample
        g3 = g.reshape(b, -1, g.shape[-1])  # [b, T, out]
        if "weight" in names:
            res[names["weight"]] = torch.bmm(g3.transpose(1, 2), a3)  # [b, out, in]
        if "bias" in names:
            res[names["bias"]] = g3.sum(1)
    elif call.kind == "conv":
        weight = module.weight
        if "weight" in names:
            # Per-sample weight gradients are the weight gradient of one grouped convolution
            # whose groups are the samples: fold the batch into channels, groups = b * groups.
            # Cheaper than unfold + bmm (no im2col copy of the input) on every backend. The
            # weight argument only supplies its shape; it is uninitialized memory because the
            # backends make it contiguous (a stride-0 view was copied: ~7% of the cost).
            out_ch = weight.shape[0]
            _, per, _ = torch.ops.aten.convolution_backward(
                g.reshape(1, b * out_ch, *g.shape[2:]),
                a.reshape(1, b * a.shape[1], *a.shape[2:]),
                weight.new_empty((b * out_ch, *weight.shape[1:])),
                None,
                list(module.stride),
                list(module.padding),
                list(module.dilation),
                False,
                [0, 0],
                b * module.groups,
                [False, True, False],
            )
            res[names["weight"]] = per.reshape(b, *weight.shape)
        if "bias" in names:
            res[names["bias"]] = g.sum((2, 3))
    elif call.kind == "embedding":
        ids = a.reshape(b, -1)
        rows = torch.arange(b, device=ids.device).unsqueeze(1).expand_as(ids)
        per = g.new_zeros((b, *module.weight.shape))
        per.index_put_((rows, ids), g.reshape(b, ids.shape[1], -1), accumulate=True)
        if module.padding_idx is not None:
            per[:, module.padding_idx] = 0  # nn.Embedding never updates the padding row
        res[names["weight"]] = per
    elif call.kind == "batchnorm":
        # y = (a - mean) / sqrt(var + eps) * weight + bias, channels on dim 1.
        c = a.shape[1]
        a3, g3 = a.reshape(b, c, -1), g.reshape(b, c, -1)
        g_sum = g3.sum(-1)  # [b, C]
        if "weight" in names:
            mean = module.running_mean.to(a.dtype)
            inv_std = torch.rsqrt(module.running_var.to(a.dtype) + module.eps)
            ga = torch.einsum("bcl,bcl->bc", g3, a3)
            res[names["weight"]] = (ga - mean * g_sum) * inv_std
        if "bias" in names:
            res[names["bias"]] = g_sum
    elif call.kind == "layernorm":
        shape = module.normalized_shape
        g3 = g.reshape(b, -1, *shape)  # [b, positions, *normalized_shape]
        if "weight" in names:
            a_hat = F.layer_norm(a, shape, eps=module.eps).reshape(g3.shape)
            res[names["weight"]] = (g3 * a_hat).sum(1)
        if "bias" in names:
            res[names["bias"]] = g3.sum(1)
    else:
        res = _module_per_sample_grads(module, names, a, g)
    return res


def _module_per_sample_grads(
    module: nn.Module, names: dict[str, str], a: Tensor, g: Tensor
) -> dict[str, Tensor]:
    """torch.func for one module (RMSNorm, custom layers): vmap over the samples of the gradient
    through this module alone, not through the whole model."""
    from torch.func import functional_call, grad, vmap

    primals = {attr: getattr(module, attr).detach() for attr in names}

    def contracted(ps: dict[str, Tensor], an: Tensor, gn: Tensor) -> Tensor:
        return (functional_call(module, ps, (an.unsqueeze(0),)).squeeze(0) * gn).sum()

    # torch.func's grad ignores an outer no_grad; it only stops regular autograd from also
    # recording a graph for the parameters that still require grad.
    with torch.no_grad():
        grads = vmap(grad(contracted), in_dims=(None, 0, 0))(primals, a, g)
    return {names[attr]: grads[attr] for attr in names}


def _func_sq(
    model: nn.Module,
    params: dict[str, Tensor],
    names: list[str],
    x: Tensor,
    cots: list[Tensor],
) -> dict[str, Tensor]:
    """Whole-model torch.func fallback: ``vmap(grad)`` over the batch, one vectorized pass per
    cotangent. For parameters of modules called with extra arguments or without batch-first
    tensors; it needs ``model`` itself to run on one sample ``x[n:n+1]``."""
    from torch.func import functional_call, grad, vmap

    primals = {name: params[name].detach() for name in names}

    def contracted(ps: dict[str, Tensor], xn: Tensor, vn: Tensor) -> Tensor:
        logits = functional_call(model, ps, (xn.unsqueeze(0),))
        return (logits.squeeze(0) * vn).sum()

    per_sample_grad = vmap(grad(contracted), in_dims=(None, 0, 0))
    out = {name: torch.zeros_like(p) for name, p in primals.items()}
    with torch.no_grad():
        for v in cots:
            grads = per_sample_grad(primals, x, v)
            for name in names:
                out[name] += grads[name].square_().sum(0)
    return out
