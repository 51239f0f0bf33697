"""Transcoding at load: one quantized tensor's entropy-coded indices (``read_codes``) into
fixed-width packed indices and per-row lookup tables, the layout the kernels read
(docs/RUNTIME.md).

A matrix [rows, cols] with T tables (one a row for per-channel and shared codebooks, ``ng`` a
row for per-group ones: table ``r * ng + c // group_size``) becomes:

- ``idx`` uint8 [rows, stride]: 2, 3 or 4 bits when every table needs at most 4, 8 or 16
  levels, in blocks of 32 columns of 4 * bits bytes (the last block padded with index 0):
  4 bits: byte j holds column j in its low nibble and column j + 16 in its high nibble;
  2 bits: byte j (< 8) holds columns j, j + 8, j + 16, j + 24 in its bit pairs, lowest first;
  3 bits: the low two bits as a 2-bit block, then 4 bytes of third bits, byte j (< 4) bit m
  holding column j + 4m. Else 8 bits (one byte a column);
- ``tables`` float32 [T, 16] (2 to 4 bits) or [T, 256] (8 bits), padded with zeros;
- for 2 to 4 bits, ``tq`` int8 [T, 16] and ``ts`` float32 [T]: level ≈ ts * tq (the fast path).

Pruned positions are weight 0: each table with a pruned position gets a zero level after its
highest used one (so it may need the next width: 5 levels are 3 bits, 17 are 8). One tensor
in memory at a time; everything is vectorised numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .kernels import kernels

__all__ = [
    "NotServable",
    "Packed",
    "index_bits",
    "pack_indices",
    "transcode",
    "transcode_codes",
    "unpack_indices",
]


class NotServable(ValueError):
    """The tensor cannot be packed for the kernels (not 2-D, or over 256 levels a row)."""


@dataclass
class Packed:
    """A matrix in the kernels' layout (see the module docstring). Tensors are CPU torch
    tensors (zero-copy views of the numpy arrays the transcoder made)."""

    rows: int
    cols: int
    bits: int  # 2, 3, 4 or 8
    group_size: int  # columns a table covers (cols for one table a row)
    idx: torch.Tensor  # uint8 [rows, stride]
    tables: torch.Tensor  # float32 [rows * groups, 16 or 256]
    tq: torch.Tensor | None = None  # int8 [rows * groups, 16] (2 to 4 bits)
    ts: torch.Tensor | None = None  # float32 [rows * groups] (2 to 4 bits)
    levels: int = 0  # most levels any table needs (zero level of pruned tables included)

    @property
    def groups(self) -> int:
        return self.cols // self.group_size if self.group_size else 1

    @property
    def q8_ok(self) -> bool:
        """Whether the int8 fast path applies: 2 to 4 bits, tables over whole 32-column
        blocks."""
        return self.bits in (2, 3, 4) and (self.groups == 1 or self.group_size % 32 == 0)

    @property
    def nbytes(self) -> int:
        """Bytes the kernels read: packed indices and the tables they use."""
        extra = (self.tq.numel() + 4 * self.ts.numel()) if self.tq is not None else 0
        return self.idx.numel() + 4 * self.tables.numel() + extra

    def indices(self, r0: int = 0, r1: int | None = None) -> np.ndarray:
        """Unpacked indices uint8 [r1 - r0, cols] of rows r0..r1."""
        return unpack_indices(self.idx[r0:r1].numpy(), self.bits, self.cols)

    def dense_rows(self, r0: int, r1: int) -> torch.Tensor:
        """Ŵ[r0:r1] float32 (the reference levels), for the torch fallback and tests."""
        i = self.indices(r0, r1).astype(np.int64)
        t = np.arange(r0, r1)[:, None] * self.groups + np.arange(self.cols)[None, :] // max(
            self.group_size, 1
        )
        return torch.from_numpy(self.tables.numpy()[t, i])


def index_bits(levels: int) -> int:
    """The packed width of a tensor whose largest table needs ``levels`` entries: 2, 3, 4 or
    8 bits (the caller refuses more than 256)."""
    return next(b for b in (2, 3, 4, 8) if levels <= 1 << b)


def pack_indices(full: np.ndarray, bits: int, *, use_kernels: bool = True) -> np.ndarray:
    """uint8 [rows, cols] indices (< 2**bits) -> uint8 [rows, stride] in the packed layout
    (2, 3, 4 bits: ``stride = ceil(cols / 32) * 4 * bits``; 8 bits: ``stride = cols``)."""
    rows, cols = full.shape
    if bits == 8:
        return np.ascontiguousarray(full, np.uint8)
    if bits not in (2, 3, 4):
        raise ValueError(f"packed indices are 2, 3, 4 or 8 bits, not {bits}")
    nblk = -(-cols // 32)
    lib = kernels() if use_kernels else None
    if lib is not None:  # the C loop: several times faster than the numpy one below
        full = np.ascontiguousarray(full, np.uint8)
        out = np.empty((rows, nblk * 4 * bits), np.uint8)
        lib.lib.hwq_pack(full.ctypes.data, rows, cols, bits, out.ctypes.data, 1)
        return out
    if cols % 32:
        full = np.pad(full, ((0, 0), (0, nblk * 32 - cols)))
    full = np.ascontiguousarray(full, np.uint8)
    if bits == 4:
        # As uint64 words: each byte < 16, so a 4-bit shift of a word never carries between
        # bytes, and one word operation packs 8 columns (4x fewer numpy element operations).
        w = full.view(np.uint64).reshape(rows, nblk, 2, 2)
        out = np.empty((rows, nblk, 2), np.uint64)
        np.left_shift(w[:, :, 1, :], np.uint64(4), out=out)
        out |= w[:, :, 0, :]
        return out.view(np.uint8).reshape(rows, nblk * 16)
    # The same word trick: word q of a block (columns 8q..8q+7) shifted by 2q, or-ed.
    w = (full & np.uint8(3)).view(np.uint64).reshape(rows, nblk, 4)
    lo = np.zeros((rows, nblk, 1), np.uint64)
    for q in range(4):
        lo[:, :, 0] |= w[:, :, q] << np.uint64(2 * q)
    if bits == 2:
        return lo.view(np.uint8).reshape(rows, nblk * 8)
    # Third bits: uint32 word m of a block (columns 4m..4m+3, each 0 or 1) shifted by m.
    h = ((full >> np.uint8(2)) & np.uint8(1)).view(np.uint32).reshape(rows, nblk, 8)
    hi = np.zeros((rows, nblk, 1), np.uint32)
    for m in range(8):
        hi[:, :, 0] |= h[:, :, m] << np.uint32(m)
    out = np.concatenate([lo.view(np.uint8), hi.view(np.uint8)], axis=2)
    return out.reshape(rows, nblk * 12)


def unpack_indices(a: np.ndarray, bits: int, cols: int) -> np.ndarray:
    """uint8 [n, stride] packed indices -> uint8 [n, cols] (inverse of :func:`pack_indices`)."""
    n = a.shape[0]
    if bits == 8:
        return a[:, :cols]
    if a.size == 0:
        return np.zeros((n, cols), np.uint8)
    blocks = a.reshape(n, -1, 4 * bits)
    if bits == 4:
        full = np.concatenate([blocks & 15, blocks >> 4], axis=2)
    else:
        lo = blocks[:, :, :8]
        full = np.concatenate([(lo >> np.uint8(2 * q)) & 3 for q in range(4)], axis=2)
        if bits == 3:
            hi = blocks[:, :, 8:12]
            full |= np.concatenate([((hi >> np.uint8(m)) & 1) << 2 for m in range(8)], axis=2)
    return full.reshape(n, -1)[:, :cols]


def int8_tables(tables: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 [T, L] -> (int8 [T, L], float32 [T]): scale = max|level| / 127 a table and
    int8 = round(level / scale) (0 stays exactly 0)."""
    amax = np.abs(tables).max(axis=1) if tables.size else np.zeros(tables.shape[0], np.float32)
    ts = (amax / 127.0).astype(np.float32)
    inv = np.divide(1.0, ts, out=np.zeros_like(ts), where=ts > 0)
    tq = np.clip(np.rint(tables * inv[:, None]), -127, 127).astype(np.int8)
    return tq, ts


def _scatter(out: np.ndarray, positions: np.ndarray, codes: np.ndarray, name: str) -> None:
    """out[positions] = codes (the C loop for uint8 codes, else numpy)."""
    lib = kernels()
    if lib is not None and codes.dtype == np.uint8 and out.dtype == np.uint8:
        codes = np.ascontiguousarray(codes)
        bad = lib.lib.hwq_scatter_u8(positions.ctypes.data, codes.ctypes.data, positions.size,
                                     out.ctypes.data, out.size)  # fmt: skip
        if bad:
            raise ValueError(f"{name}: {bad} kept positions outside the tensor")
        return
    out[positions] = codes


def transcode_codes(rc: dict, name: str = "tensor") -> Packed:
    """``HwqReader.read_codes`` output of a 2-D tensor -> :class:`Packed`."""
    shape = tuple(int(s) for s in rc["shape"])
    if len(shape) != 2:
        raise NotServable(f"{name}: shape {shape} is not a matrix")
    rows, cols = shape
    numel = rows * cols
    codes, positions, cb = rc["codes"], rc["positions"], np.asarray(rc["codebook"], np.float32)
    if cb.ndim == 1:  # one shared codebook: every row gets a copy of it
        cb = np.broadcast_to(cb, (rows, cb.shape[0]))
    ntab = cb.shape[0]
    per = numel // ntab if ntab else cols  # columns a table covers
    if numel == 0:
        return Packed(
            rows,
            cols,
            4,
            max(cols, 1),
            torch.zeros(rows, 0, dtype=torch.uint8),
            torch.zeros(ntab, 16),
            *map(torch.from_numpy, int8_tables(np.zeros((ntab, 16), np.float32))),
        )
    if positions is None:
        full = np.asarray(codes).reshape(ntab, per)
        need = full.max(axis=1).astype(np.int64) + 1
        zero_slot = None
    else:
        codes = np.asarray(codes)
        positions = np.asarray(positions, np.int64)
        # Positions are sorted (flat C order): each table's kept run by binary search, no
        # per-element division.
        at = np.searchsorted(positions, np.arange(ntab + 1, dtype=np.int64) * per)
        kept = np.diff(at)
        used = np.zeros(ntab, np.int64)
        has = kept > 0
        if codes.size:  # the starts of the non-empty runs rise strictly and are < size
            used[has] = np.maximum.reduceat(codes, at[:-1][has]).astype(np.int64) + 1
        pruned = kept < per
        need = used + pruned
        zero_slot = np.where(pruned, used, -1)
        # Every position starts at its table's zero slot; the kept ones are then overwritten.
        full = np.repeat(np.where(pruned, used, 0).astype(codes.dtype), per)
        _scatter(full, positions, codes, name)
        full = full.reshape(ntab, per)
    levels = int(need.max(initial=0))
    if levels > 256:
        raise NotServable(f"{name}: a row uses {levels} levels; the kernels take at most 256")
    bits = index_bits(levels)
    width = 16 if bits <= 4 else 256
    tables = np.zeros((ntab, width), np.float32)
    n = min(width, cb.shape[1])
    tables[:, :n] = cb[:, :n]
    if rc.get("dtype") in ("bfloat16", "float16") and rc.get("rotate") is None:
        # The decoded tensor holds the levels rounded to the stored dtype: so do the tables
        # (a rotated tensor rounds its rotated-back weights, which no table holds: its
        # levels stay as stored).
        t = torch.from_numpy(tables)
        tables = t.to(getattr(torch, rc["dtype"])).to(torch.float32).numpy()
    if zero_slot is not None:
        z = np.flatnonzero(zero_slot >= 0)
        tables[z, zero_slot[z]] = 0.0
    full = full.reshape(rows, cols).astype(np.uint8, copy=False)
    idx = pack_indices(full, bits)
    p = Packed(
        rows, cols, bits, per, torch.from_numpy(idx), torch.from_numpy(tables), levels=levels
    )
    if bits <= 4:
        tq, ts = int8_tables(tables)
        p.tq, p.ts = torch.from_numpy(tq), torch.from_numpy(ts)
    return p


def transcode(reader, name: str) -> Packed:
    """Tensor ``name`` of an open :class:`HwqReader` -> :class:`Packed` (reads its streams)."""
    return transcode_codes(reader.read_codes(name), name)
