"""Incoherence processing (`quantize.rotate: hadamard`): a seeded orthogonal transform V on
the input side of a weight matrix, applied before quantization and undone after.

For an input width n = 2ᵏ·m (m odd), V = (C_m ⊗ H_2ᵏ) · diag(s):

- s: n random signs, a counter-based hash of (seed, column), so the file stores one integer;
- H_2ᵏ: the Walsh–Hadamard matrix, normalised (orthonormal), applied in O(n log n);
- C_m: the orthonormal DCT-II of size m (identity when m = 1), which mixes the 2ᵏ-wide blocks
  with each other so every input column is spread over all n.

A row w of W is quantized as w' = V·w (W' = W·Vᵀ), and rebuilt as w = Vᵀ·w'. A layer's output
is unchanged when its input is rotated the same way: W·x = W'·(V·x), so a runtime that keeps
W' packed rotates x instead of the weights (`forward` serves both).

The Hessian weight of w' is the diagonal of V·diag(h)·Vᵀ, i.e. Σ_k V[j,k]²·h[k] (what the
diagonal of the run's Hessian says about the rotated coordinates; the off-diagonal terms it
does not have are ignored): the mean of h over each 2ᵏ block, mixed by C_m∘C_m.

Works on numpy arrays and torch tensors alike (the runtime rotates activations with it), in
the input's dtype. Only element-wise operations in a fixed order: the same input gives the
same bits whatever the batch or thread count, so a decoded model equals the quantized one.
"""

from __future__ import annotations

import math
import zlib

import numpy as np

__all__ = ["MAX_ODD", "check_width", "forward", "hessian", "hessian_from_moment", "inverse", "seed_for", "signs",
           "tensor_seed"]

MAX_ODD = 255
"""Largest odd factor m of a rotated width (C_m is a dense m × m product)."""


def _split(n: int) -> tuple[int, int]:
    p = n & -n  # the largest power of two dividing n
    return p, n // p


def check_width(n: int, name: str = "") -> None:
    """Refuse a width whose odd factor is too large for the dense C_m."""
    if n < 1:
        raise ValueError(f"cannot rotate {name or 'a tensor'} with {n} input columns")
    p, m = _split(n)
    if m > MAX_ODD:
        raise ValueError(
            f"quantize.rotate=hadamard cannot rotate {name or 'a tensor'}: its {n} input "
            f"columns are {p} × {m}, and the odd factor {m} is over {MAX_ODD}; set "
            f"quantize.rotate=none")


def seed_for(seed: int, width: int) -> int:
    """The rotation seed (31 bits, stored in the file per tensor) of every tensor with
    `width` input columns, from the run's seed: siblings that read one input (q/k/v,
    gate/up) share it, so a runtime rotates that input once for all of them."""
    return zlib.crc32(f"{int(seed)}:in{int(width)}".encode()) & 0x7FFFFFFF


def tensor_seed(rotate: str, seed: int, width: int, embedding: bool = False) -> int | None:
    """The rotation seed of a quantized tensor with `width` input columns under
    ``quantize.rotate`` (None: not rotated). Embeddings and the output head are never
    rotated: a lookup reads rows, and the head's logits are what the runtime's last product
    returns."""
    if rotate == "none" or embedding:
        return None
    return seed_for(seed, width)


def signs(seed: int, n: int) -> np.ndarray:
    """±1 (float32) for columns 0..n-1: splitmix64 of (seed, column)."""
    with np.errstate(over="ignore"):
        z = np.arange(n, dtype=np.uint64) ^ np.uint64(int(seed) * 0x9E3779B97F4A7C15 % (1 << 64))
        for mul, sh in ((0xBF58476D1CE4E5B9, 30), (0x94D049BB133111EB, 27)):
            z = (z ^ (z >> np.uint64(sh))) * np.uint64(mul)
        z = z ^ (z >> np.uint64(31))
    return np.where((z >> np.uint64(63)) == 1, -1.0, 1.0).astype(np.float32)


def _dct(m: int) -> np.ndarray:
    """Orthonormal DCT-II [m, m] (float64)."""
    a = np.arange(m, dtype=np.float64)[:, None]
    b = np.arange(m, dtype=np.float64)[None, :]
    c = np.sqrt(2.0 / m) * np.cos(np.pi * (2 * b + 1) * a / (2 * m))
    c[0] /= np.sqrt(2.0)
    return c


def _stack(parts: list, axis: int):
    if isinstance(parts[0], np.ndarray):
        return np.stack(parts, axis=axis)
    import torch

    return torch.stack(parts, dim=axis)


def _like(a: np.ndarray, x):
    """`a` as x's kind, dtype and device (numpy array or torch tensor)."""
    if isinstance(x, np.ndarray):
        return a.astype(x.dtype)
    import torch

    return torch.from_numpy(np.ascontiguousarray(a)).to(x.device, x.dtype)


def _fwht(x):
    """Normalised Walsh–Hadamard transform over the last axis (a power of two); its own
    inverse. Element-wise adds in a fixed order: the same bits whatever the batch or the
    number of threads."""
    p = x.shape[-1]
    lead = tuple(x.shape[:-1])
    h = 1
    while h < p:
        y = x.reshape(*lead, p // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        x = _stack([a + b, a - b], -2).reshape(*lead, p)
        h *= 2
    return x * (1.0 / math.sqrt(p)) if p > 1 else x


def _mix(x, m: int, p: int, transpose: bool):
    """C_m (or its transpose) over the m axis of x viewed [..., m, p], as Σ_b c[a, b]·y_b in
    order (not a matrix product, whose summation order may change with the threads)."""
    if m == 1:
        return x
    c = _dct(m)
    if transpose:
        c = c.T
    y = x.reshape(*x.shape[:-1], m, p)
    rows = []
    for a in range(m):
        acc = y[..., 0, :] * float(c[a, 0])
        for b in range(1, m):
            acc = acc + y[..., b, :] * float(c[a, b])
        rows.append(acc)
    return _stack(rows, -2).reshape(*x.shape)


def forward(x, seed: int):
    """V·x over the last axis of `x` (a float numpy array or torch tensor): rotates weight
    rows before quantization, and a layer's input in a runtime that keeps the rotated
    weights."""
    n = x.shape[-1]
    check_width(n)
    p, m = _split(n)
    y = x * _like(signs(seed, n), x)
    y = _fwht(y.reshape(*x.shape[:-1], m, p)).reshape(x.shape)
    return _mix(y, m, p, transpose=False)


def inverse(x, seed: int):
    """Vᵀ·x over the last axis: rebuilds weight rows from rotated (quantized) ones."""
    n = x.shape[-1]
    check_width(n)
    p, m = _split(n)
    y = _mix(x, m, p, transpose=True)
    y = _fwht(y.reshape(*x.shape[:-1], m, p)).reshape(x.shape)
    return y * _like(signs(seed, n), x)


def hessian(h: np.ndarray) -> np.ndarray:
    """The diagonal Hessian weights of rotated rows from those of the rows: Σ_k V[j,k]²·h[k]
    over the last axis (independent of the signs, so of the seed)."""
    n = h.shape[-1]
    check_width(n)
    p, m = _split(n)
    y = np.asarray(h, np.float64).reshape(*h.shape[:-1], m, p).mean(axis=-1, keepdims=True)
    if m > 1:
        y = np.matmul(_dct(m) ** 2, y)  # H∘H = J / p
    return np.ascontiguousarray(np.broadcast_to(y, (*h.shape[:-1], m, p)).reshape(h.shape)
                                .astype(h.dtype))


def hessian_from_moment(h: np.ndarray, xtx: np.ndarray, seed: int) -> np.ndarray:
    """Rotated Hessian weights from the layer's input second moment M = X·Xᵀ/n [n, n]: each
    row keeps its total Σ_j h[r, j] (the Fisher's row sensitivity), spread over the rotated
    columns as diag(V·M·Vᵀ) is (the Kronecker-factored Fisher E[g_r²]·M, rotated; for the
    activation estimator, whose h is diag(M), exactly the rotated diagonal)."""
    n = xtx.shape[0]
    d = np.diagonal(forward(forward(np.asarray(xtx, np.float64), seed).T, seed)).copy()
    d = np.maximum(d, 0.0)
    total = float(d.sum())
    if not total > 0:
        return hessian(h)
    rows = np.asarray(h, np.float64).reshape(-1, n).sum(axis=1, keepdims=True)
    out = rows * (d / total)[None, :]
    return np.ascontiguousarray(out.reshape(h.shape).astype(h.dtype))
