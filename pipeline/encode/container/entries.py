"""What the writer stores: `TensorEntry` (one tensor, quantized or raw), and its validation
into `_Prepared` (the flat codes, mask, gaps and level classes its streams need)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..bitio import MAX_CODE_LENGTH
from ..huffman import symbol_dtype
from ..positions import gaps_from_mask
from ..rotation import check_width
from .header import _MAX_NDIM, QUANTIZED_DTYPES, RAW_DTYPES, ROTATE_SEED_MAX, _np_dtype


@dataclass
class TensorEntry:
    """One tensor to store.

    Attributes:
        name: unique name (e.g. a state-dict key).
        shape: the tensor's shape.
        dtype: decoded dtype: for ``quantized`` one of float32/float16/bfloat16/float64 (the
            float32 codebook values are cast to it); for ``raw`` the array's dtype (one of
            RAW_DTYPES; bfloat16 arrays are passed as uint16 bit patterns).
        codes: [n_kept] unsigned ints, the codebook index of each KEPT element in flat C order.
        mask: bool [prod(shape)] or ``shape``; None = dense (all kept).
        codebook: name of a codebook in the ``codebooks`` dict: float32 [k] (one value per
            code) or [shape[0], k] (per output channel: element (r, ...) uses row r).
        raw: for kind ``raw``: the tensor itself, stored as is (little-endian).
        rotate: for a quantized tensor whose codes are of its rows in a rotated basis
            (`quantize.rotate`): the seed of the rotation, undone after the codebook lookup
            on the [shape[0], rest] view; None when the codes are of the weights themselves.
    """

    name: str
    shape: tuple[int, ...] = ()
    dtype: str = "float32"
    codes: np.ndarray | None = None
    mask: np.ndarray | None = None
    codebook: str | None = None
    raw: np.ndarray | None = None
    rotate: int | None = None

    @property
    def kind(self) -> str:
        return "raw" if self.raw is not None else "quantized"

    @classmethod
    def quantized(
        cls,
        name: str,
        shape: Sequence[int],
        codes: np.ndarray,
        codebook: str,
        mask: np.ndarray | None = None,
        dtype: str = "float32",
        rotate: int | None = None,
    ) -> TensorEntry:
        return cls(name, tuple(int(s) for s in shape), dtype, codes, mask, codebook, None,
                   rotate)

    @classmethod
    def raw_tensor(cls, name: str, array: np.ndarray, dtype: str | None = None) -> TensorEntry:
        """A tensor stored as is. dtype defaults to the array's (give "bfloat16" for uint16 bits)."""
        a = np.asarray(array)
        return cls(name, tuple(a.shape), dtype or _dtype_name(a), None, None, None, a)


def _dtype_name(a: np.ndarray) -> str:
    if a.dtype.name == "bfloat16":  # ml_dtypes arrays, if the caller uses them
        return "bfloat16"
    return a.dtype.name


def _flat_mask(entry: TensorEntry, shape: tuple[int, ...], numel: int) -> np.ndarray | None:
    if entry.mask is None:
        return None
    m = np.asarray(entry.mask)
    if m.dtype != np.bool_:
        raise ValueError(f"{entry.name}: mask must be bool, got {m.dtype}")
    if m.size != numel or (m.ndim > 1 and tuple(m.shape) != shape):
        raise ValueError(f"{entry.name}: mask shape {m.shape} does not match {shape}")
    m = m.reshape(-1)
    return None if m.all() else m


@dataclass
class _Prepared:
    entry: TensorEntry
    shape: tuple[int, ...]
    numel: int
    k: int = 0
    codes: np.ndarray | None = None  # [n_kept]
    mask: np.ndarray | None = None  # flat bool or None (dense)
    raw_bytes: bytes | memoryview = b""
    scope: str | None = None
    index_group: str | None = None
    pos_group: str | None = None
    gaps: np.ndarray | None = None
    # Rows grouped by their codebook row's level count ("levels" order): [(L, symbols)].
    classes: list[tuple[int, np.ndarray]] | None = None


def _check_codebooks(codebooks: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    cbs: dict[str, np.ndarray] = {}
    for name, cb in codebooks.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"codebook names must be non-empty strings, got {name!r}")
        a = np.ascontiguousarray(cb, dtype="<f4")
        if a.ndim not in (1, 2) or a.shape[-1] < 1 or a.shape[-1] > (1 << MAX_CODE_LENGTH):
            raise ValueError(f"codebook {name!r} must be [k] or [rows, k], 1 <= k, got {a.shape}")
        cbs[name] = a
    return cbs


def _prepare_one(e: TensorEntry, cbs: dict[str, np.ndarray], code_sharing: str) -> _Prepared:
    """Validate one entry and derive what its streams need (scope is set by the caller, who
    knows how many tensors share each codebook)."""
    if not isinstance(e, TensorEntry):
        raise TypeError(f"an entry must be a TensorEntry (or a callable returning one), got "
                        f"{type(e).__name__}")
    if not isinstance(e.name, str) or not e.name:
        raise ValueError(f"tensor names must be non-empty strings, got {e.name!r}")
    shape = tuple(int(s) for s in e.shape)
    if any(s < 0 for s in shape) or len(shape) > _MAX_NDIM:
        raise ValueError(f"{e.name}: invalid shape {shape}")
    numel = math.prod(shape)
    if e.raw is not None:
        a = np.asarray(e.raw)
        if tuple(a.shape) != shape:
            raise ValueError(f"{e.name}: raw array shape {a.shape} != {shape}")
        if e.dtype not in RAW_DTYPES:
            raise ValueError(f"{e.name}: raw dtype {e.dtype!r} not in {RAW_DTYPES}")
        if e.dtype == "bfloat16":
            if a.dtype.name == "bfloat16":
                a = a.view(np.uint16)
            if a.dtype != np.uint16:
                raise ValueError(f"{e.name}: bfloat16 raw tensors are uint16 bit patterns")
        elif a.dtype != np.dtype(e.dtype):
            raise ValueError(f"{e.name}: raw array dtype {a.dtype} != declared {e.dtype}")
        # A view of the bytes, not a copy (a raw embedding can be hundreds of MB).
        data = memoryview(np.ascontiguousarray(a, dtype=_np_dtype(e.dtype)).reshape(-1)
                          .view(np.uint8))
        return _Prepared(e, shape, numel, raw_bytes=data)
    if e.dtype not in QUANTIZED_DTYPES:
        raise ValueError(f"{e.name}: quantized dtype {e.dtype!r} not in {QUANTIZED_DTYPES}")
    if e.codebook not in cbs or e.codes is None:
        raise ValueError(f"{e.name}: a quantized tensor needs codes and a known codebook")
    cb = cbs[e.codebook]
    k = int(cb.shape[-1])
    if cb.ndim == 2 and (len(shape) == 0 or cb.shape[0] % max(shape[0], 1)
                         or numel % max(cb.shape[0], 1)):
        raise ValueError(f"{e.name}: a per-row codebook {cb.shape} needs shape[0] rows "
                         f"(channel) or a multiple of them that divides {numel} (group)")
    mask = _flat_mask(e, shape, numel)
    codes = np.asarray(e.codes).reshape(-1)
    if codes.size and codes.dtype.kind not in "ui":
        raise ValueError(f"{e.name}: codes must be integers, got {codes.dtype}")
    n_kept = numel if mask is None else int(mask.sum())
    if codes.size != n_kept:
        raise ValueError(f"{e.name}: {codes.size} codes for {n_kept} kept elements")
    if codes.size and (int(codes.min()) < 0 or int(codes.max()) >= k):
        raise ValueError(f"{e.name}: codes out of range [0, {k}) of codebook {e.codebook!r}")
    codes = codes.astype(symbol_dtype(k), copy=False)
    if e.rotate is not None:
        if type(e.rotate) is not int or not 0 <= e.rotate <= ROTATE_SEED_MAX:
            raise ValueError(f"{e.name}: a rotation seed is an int in [0, {ROTATE_SEED_MAX}]")
        if mask is not None or not shape or not shape[0]:
            raise ValueError(f"{e.name}: only a dense tensor with rows can be rotated")
        check_width(numel // shape[0], e.name)
    p = _Prepared(e, shape, numel, k, codes, mask)
    p.index_group = e.codebook if code_sharing == "network" else e.name
    if mask is not None:
        p.gaps = gaps_from_mask(mask)
        p.pos_group = "" if code_sharing == "network" else e.name
    return p


def _scope(p: _Prepared, cb: np.ndarray, refs: int) -> str:
    if cb.ndim == 2:
        return "channel" if cb.shape[0] == p.shape[0] else "group"
    return "network" if refs > 1 else "tensor"
