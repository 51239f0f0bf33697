"""How .hwq stores codebooks (docs/FORMAT.md, "codebooks"): float32, float16, or ragged fp16
per-row codebooks holding only the levels each row uses; and the level counts that order a
per-row tensor's index stream ("levels" order: one code table per level count)."""

from __future__ import annotations

import numpy as np

__all__ = ["even_rows", "row_levels", "level_classes", "count_dtype", "encode_codebook", "decode_codebook"]


def even_rows(p) -> bool:
    """Whether a prepared tensor's kept codes split into its codebook's rows evenly: a dense
    tensor, or a masked one whose every row keeps the same count (one-shot pruning's masks),
    so codes.reshape(rows, -1) is row by row. Others keep every level of their rows."""
    if p.codes is None or p.mask is None:
        return True
    rows = p.shape[0] if p.shape else 0
    if rows == 0 or p.codes.shape[0] % rows:
        return False
    kept = p.mask.reshape(rows, -1).sum(axis=1)
    return bool((kept == kept[0]).all())


def row_levels(prepared: list, cbs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """For each per-row codebook: levels each row needs (1 + its largest code over every
    tensor using it; a masked tensor whose rows keep different counts needs all k)."""
    out: dict[str, np.ndarray] = {}
    for p in prepared:
        if p.codes is None or cbs[p.entry.codebook].ndim != 2:
            continue
        cb = cbs[p.entry.codebook]
        rows, k = cb.shape
        if rows == 0 or (p.mask is not None and (rows != p.shape[0] or not even_rows(p))):
            need = np.full(rows, k, np.int64)
        else:
            need = p.codes.reshape(rows, -1).max(axis=1, initial=0).astype(np.int64) + 1
        prev = out.get(p.entry.codebook)
        out[p.entry.codebook] = need if prev is None else np.maximum(prev, need)
    return out


def level_classes(codes: np.ndarray, levels: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """The codes of a dense per-row-codebook tensor (or the kept codes of one whose every row
    keeps the same count), grouped by the level count of their
    codebook row: [(L, the codes of every row with L levels, rows in order)], L ascending,
    L >= 2 only. A one-level row's codes are all 0 and its level count says so: they are not
    stored (a code of one symbol would still spend a bit a weight)."""
    rows = levels.shape[0]
    c2 = codes.reshape(rows, -1)
    return [(int(L), np.ascontiguousarray(c2[levels == L]).reshape(-1))
            for L in np.unique(levels) if L >= 2]


def count_dtype(k: int) -> str:
    return "<u1" if k <= 255 else "<u2"


def encode_codebook(name: str, a: np.ndarray, dtype: str,
                     levels: np.ndarray | None) -> tuple[bytes, dict]:
    """The stored bytes of one codebook and its extra header fields."""
    if dtype == "float32":
        return a.tobytes(), {}
    h = a.astype("<f2")
    if not np.array_equal(h.astype("<f4"), a, equal_nan=False):
        raise ValueError(f"codebook {name!r} holds values that float16 cannot represent "
                         "exactly; round them first (codebook_dtype='float16')")
    if a.ndim == 1 or levels is None:
        return h.tobytes(), {}
    keep = np.arange(a.shape[1])[None, :] < levels[:, None]
    return levels.astype(count_dtype(a.shape[1])).tobytes() + h[keep].tobytes(), \
        {"ragged": True}


def decode_codebook(buf: bytes, shape: tuple[int, ...], dtype: str, ragged: bool,
                     what: str) -> np.ndarray:
    """float32 array of `shape` from a stored codebook; a ragged row's unused slots repeat its
    first level (no code refers to them)."""
    if dtype == "float32":
        return np.frombuffer(buf, "<f4").reshape(shape)
    if not ragged:
        return np.frombuffer(buf, "<f2").astype(np.float32).reshape(shape)
    rows, k = shape
    cd = np.dtype(count_dtype(k))
    counts = np.frombuffer(buf[: rows * cd.itemsize], cd).astype(np.int64)
    if counts.size and (counts.min() < 1 or counts.max() > k):
        raise ValueError(f"{what}: a row has a level count outside [1, {k}]")
    values = buf[rows * cd.itemsize:]
    if len(values) != 2 * int(counts.sum()):
        raise ValueError(f"{what}: {len(values)} value bytes for {int(counts.sum())} levels")
    flat = np.frombuffer(values, "<f2").astype(np.float32)
    keep = np.arange(k)[None, :] < counts[:, None]
    out = np.empty((rows, k), np.float32)
    out[keep] = flat
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]) if rows else np.zeros(0, np.int64)
    first = flat[starts] if rows else np.zeros(0, np.float32)
    out[~keep] = np.broadcast_to(first[:, None], (rows, k))[~keep]
    return out
