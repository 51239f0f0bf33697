"""The Hessian table format: Arrow/Parquet, one row per (tensor, chunk).

Columns: `tensor` (string), `offset` (int64: first flat index of the chunk), `values`
(list<float32> in the final table, list<float64> in partial sums). Schema metadata (bytes →
bytes) carries the estimator, the number of samples, the model digest and how to make values
non-negative. Chunks are bounded so huge tensors stream row by row.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import torch

__all__ = ["to_table", "from_table", "iter_rows", "table_metadata"]


def to_table(
    tensors: dict[str, torch.Tensor], chunk: int, *, dtype=np.float32,
    metadata: dict[str, str] | None = None,
) -> pa.Table:
    """{name: tensor} → table with rows of at most `chunk` values per tensor, in name order
    given. dtype: float32 (final table) or float64 (partial sums, reduced exactly later)."""
    names, offsets, values = [], [], []
    for name, t in tensors.items():
        flat = t.detach().reshape(-1).cpu().numpy().astype(dtype, copy=False)
        for off in range(0, max(flat.size, 1), chunk):
            names.append(name)
            offsets.append(off)
            values.append(flat[off : off + chunk])
    value_type = pa.float32() if dtype == np.float32 else pa.float64()
    arr = pa.array(values, type=pa.list_(value_type))
    table = pa.table({"tensor": pa.array(names, pa.string()),
                      "offset": pa.array(offsets, pa.int64()), "values": arr})
    if metadata:
        table = table.replace_schema_metadata({k: str(v) for k, v in metadata.items()})
    return table


def iter_rows(table: pa.Table) -> Iterator[tuple[str, int, np.ndarray]]:
    """(tensor, offset, values) per row, values as a numpy view where possible."""
    for batch in table.to_batches():
        names = batch.column("tensor").to_pylist()
        offs = batch.column("offset").to_numpy()
        vals = batch.column("values")
        for i, name in enumerate(names):
            yield name, int(offs[i]), vals[i].values.to_numpy(zero_copy_only=False)


def from_table(table: pa.Table, shapes: dict[str, tuple[int, ...]] | None = None,
               dtype=np.float32) -> dict[str, np.ndarray]:
    """Reassemble full tensors; checks every element is covered exactly once.

    shapes: expected shapes by name (also checks that no tensor is missing or extra)."""
    parts: dict[str, list[tuple[int, np.ndarray]]] = {}
    for name, off, vals in iter_rows(table):
        parts.setdefault(name, []).append((off, vals))
    if shapes is not None and set(parts) != set(shapes):
        raise ValueError(f"Hessian table covers {sorted(parts)} but the model has "
                         f"{sorted(shapes)}")
    out = {}
    for name, chunks in parts.items():
        chunks.sort(key=lambda c: c[0])
        n = sum(len(v) for _, v in chunks)
        want = int(np.prod(shapes[name])) if shapes is not None else n
        pos = 0
        for off, v in chunks:
            if off != pos:
                raise ValueError(f"Hessian table: {name} has a gap or overlap at {off}")
            pos += len(v)
        if pos != want:
            raise ValueError(f"Hessian table: {name} has {pos} values, expected {want}")
        flat = np.concatenate([v for _, v in chunks]).astype(dtype, copy=False)
        if not np.isfinite(flat).all():
            raise ValueError(f"Hessian table: {name} holds NaN or inf values")
        out[name] = flat.reshape(shapes[name]) if shapes is not None else flat
    return out


def table_metadata(table: pa.Table) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
