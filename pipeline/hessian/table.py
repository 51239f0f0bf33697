"""The Hessian table format: Arrow/Parquet, one row per (tensor, chunk).

Columns: `tensor` (string), `offset` (int64: first flat index of the chunk), `values`
(list<float32> in the final table, list<float64> in partial sums). Schema metadata (bytes →
bytes) carries the estimator, the number of samples, the model digest and how to make values
non-negative. Chunks are bounded so huge tensors stream row by row.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa
import torch

from pipeline.errors import UserError

__all__ = ["to_table", "from_table", "iter_rows", "table_metadata", "TensorTable",
           "TensorTableWriter", "TableError"]


class TableError(UserError, ValueError):
    """A Hessian table that cannot be what its writer wrote; the message names the file."""


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


# ---------------------------------------------------------------------------------------------
# Per-tensor tables: one Parquet file written tensor by tensor, read one tensor at a time.

# `values` holds a chunk's float32 values as little-endian bytes: a list<float32> column
# decodes its repetition levels value by value (1.19 s for a 45 M-value tensor against 0.05 s
# as bytes), which made reading the Hessian as slow as quantizing the tensor.
_TENSOR_SCHEMA = pa.schema([("tensor", pa.string()), ("offset", pa.int64()),
                            ("values", pa.large_binary()), ("crc32", pa.int64())])


class TensorTableWriter:
    """Hessian values streamed into one Parquet file, a row group per tensor.

    Rows are (tensor, offset, values: the bytes of ≤ chunk little-endian float32s, crc32 of
    those bytes), so a reader
    fetches one tensor's row group (its byte range) and checks it without the rest of the file.
    `tensor_sha256` holds the sha256 of each tensor's float32 values: recorded by the caller
    (the streamed Hessian stage's manifest), it lets a reader verify the one tensor it reads.
    Published whole on `close` (local rename or a completed S3 multipart upload); an exception
    inside `with` removes (aborts) it."""

    def __init__(self, url: str, storage_options: dict | None = None, *,
                 metadata: dict[str, str] | None = None, chunk: int = 1 << 20):
        import posixpath

        import pyarrow.parquet as pq

        from pipeline.models.weights import _Files, _Sink

        folder, name = posixpath.split(str(url))
        self._sink = _Sink(_Files(folder or ".", storage_options), name)
        schema = _TENSOR_SCHEMA.with_metadata({k: str(v) for k, v in (metadata or {}).items()})
        # Plain floats: a dictionary page of Hessian values (which hardly repeat) only inflates the
        # row group past what the reader accepts for the tensor's shape (`_check_groups`).
        self._writer = pq.ParquetWriter(self._sink, schema, compression="none",
                                        use_dictionary=["tensor"])
        self.chunk = int(chunk)
        self.names: list[str] = []
        self.tensor_sha256: dict[str, str] = {}

    def add(self, tensor: str, values: np.ndarray) -> None:
        import hashlib
        import zlib

        flat = np.ascontiguousarray(np.asarray(values, dtype="<f4").reshape(-1))
        if not np.isfinite(flat).all():
            raise ValueError(f"Hessian values of {tensor} hold NaN or inf")
        if tensor in self.names:
            raise ValueError(f"{tensor} is already in the table")
        offs = list(range(0, max(flat.size, 1), self.chunk))
        # the chunks are views of `flat`'s bytes (no copy of a tensor-sized Hessian)
        ends = np.minimum(np.asarray(offs, np.int64) + self.chunk, flat.size)
        values = pa.LargeBinaryArray.from_buffers(
            pa.large_binary(), len(offs),
            [None, pa.py_buffer(np.concatenate([[0], 4 * ends]).astype(np.int64)),
             pa.py_buffer(flat)])
        crcs = [zlib.crc32(memoryview(flat[o : o + self.chunk]).cast("B")) for o in offs]
        batch = pa.table({"tensor": pa.array([tensor] * len(offs), pa.string()),
                          "offset": pa.array(offs, pa.int64()), "values": values,
                          "crc32": pa.array(crcs, pa.int64())},
                         schema=self._writer.schema)
        self._writer.write_table(batch, row_group_size=len(offs))
        self.names.append(tensor)
        self.tensor_sha256[tensor] = hashlib.sha256(memoryview(flat).cast("B")).hexdigest()

    def close(self) -> dict:
        """Publish the file; returns its bytes and sha256 (computed while writing)."""
        self._writer.close()
        self._sink.commit()
        return {"bytes": self._sink.written, "sha256": self._sink.sha256.hexdigest()}

    def abort(self) -> None:
        try:
            self._writer.close()
        except Exception:  # noqa: BLE001 - the caller's error is the one to report
            pass
        self._sink.abort()

    def __enter__(self) -> TensorTableWriter:
        return self

    def __exit__(self, et, ev, tb) -> None:
        if et is not None:
            self.abort()


# Bytes a row may take beyond its values once decoded (offset, crc32, list offset, levels):
# bounds the column chunks of an honest file, whose page sizes are its values' 4 bytes each.
_ROW_BYTES = 64
_SLACK = 1 << 20


class TensorTable:
    """Read one tensor's values from a `TensorTableWriter` file (its row groups only).

    The file is untrusted: its schema must be the writer's, and `read` checks a row group's
    metadata (rows, values, uncompressed column sizes) against the tensor's expected size
    before it decodes anything, so a small file cannot make it allocate gigabytes."""

    def __init__(self, url: str, storage_options: dict | None = None):
        import pyarrow.parquet as pq

        self.url = str(url)
        try:
            if "://" in self.url and not self.url.startswith("file://"):
                from fsspec.core import url_to_fs

                fs, path = url_to_fs(self.url, **(storage_options or {}))
                self._f = fs.open(path, "rb", block_size=1 << 16, cache_type="none")
            else:
                self._f = open(self.url, "rb")  # noqa: SIM115 - closed in close()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
            raise TableError(f"{self.url}: cannot open the Hessian table ({e.strerror or e})"
                             ) from None
        try:
            self._open(pq)
        except TableError:
            self._f.close()
            raise
        except (pa.ArrowException, OSError, ValueError, UnicodeDecodeError) as e:
            self._f.close()
            raise TableError(f"{self.url}: not a readable Hessian table ({_one_line(e)}); "
                             "rerun the Hessian stage") from None

    def _open(self, pq) -> None:
        self._pf = pq.ParquetFile(self._f)
        got = self._pf.schema_arrow
        if [(f.name, f.type) for f in got] != [(f.name, f.type) for f in _TENSOR_SCHEMA]:
            raise TableError(f"{self.url}: not a Hessian table of this version (schema "
                             f"{', '.join(f'{f.name}: {f.type}' for f in got)})")
        md = self._pf.metadata
        self.groups: dict[str, list[int]] = {}
        for g in range(md.num_row_groups):
            st = md.row_group(g).column(0).statistics
            if st is None or not st.has_min_max or st.min != st.max:
                raise TableError(f"{self.url}: row group {g} is not one tensor's")
            self.groups.setdefault(st.min, []).append(g)
        self.metadata = {k.decode(): v.decode()
                         for k, v in (got.metadata or {}).items()}

    @property
    def names(self) -> list[str]:
        return list(self.groups)

    def _check_groups(self, name: str, bound: int) -> None:
        """Refuse, from the footer alone, row groups of `name` that hold more than `bound`
        values (or rows), or whose columns inflate to more than such values can take."""
        md = self._pf.metadata
        groups = self.groups[name]
        rows = sum(md.row_group(g).num_rows for g in groups)
        inflated = sum(md.row_group(g).column(i).total_uncompressed_size
                       for g in groups for i in range(md.num_columns))
        cap = 4 * max(bound, 1) + _ROW_BYTES * rows + _SLACK
        if rows > max(bound, 1) or inflated > cap:
            raise TableError(
                f"{self.url}: the row groups of {name} hold {rows:,} rows and {inflated:,} "
                f"bytes uncompressed, more than its {bound:,} float32 values can take; the "
                "table is corrupt or not this model's (rerun the Hessian stage)")

    def read(self, name: str, sizes: Sequence[int] | None = None,
             sha256: str | None = None) -> np.ndarray:
        """float32 [n]: the values of `name`.

        sizes: the value counts the tensor may have (e.g. (in, out·in) for an activation
            vector or a full Hessian): checked before decoding, from the row-group metadata.
        sha256: the digest of the float32 values recorded when they were written."""
        import hashlib

        if name not in self.groups:
            raise KeyError(f"{self.url} holds no Hessian values for {name!r}")
        if sizes is not None:
            self._check_groups(name, max(sizes))
        try:
            t = self._pf.read_row_groups(self.groups[name], columns=["offset", "values",
                                                                       "crc32"])
        except (pa.ArrowException, OSError, ValueError) as e:
            raise TableError(f"{self.url}: the Hessian values of {name} cannot be decoded "
                             f"({_one_line(e)}); rerun the Hessian stage") from None
        out = self._assemble(name, t)
        if sizes is not None and out.size not in sizes:
            raise TableError(f"{self.url}: {name} has {out.size:,} Hessian values, expected "
                             f"{' or '.join(f'{n:,}' for n in sizes)} (not this model's table)")
        if sha256 is not None and hashlib.sha256(memoryview(out).cast("B")).hexdigest() != sha256:
            raise TableError(f"{self.url}: the Hessian values of {name} differ from the digest "
                             "recorded when they were written; rerun the Hessian stage")
        return out

    def _assemble(self, name: str, t: pa.Table) -> np.ndarray:
        import zlib

        bufs = [b for chunk in t.column("values").chunks for b in _binary_buffers(chunk)]
        parts, at = [], 0
        for off, crc, buf in zip(t.column("offset").to_pylist(), t.column("crc32").to_pylist(),
                                 bufs, strict=True):
            if off != at or len(buf) % 4 or zlib.crc32(buf) != crc:
                raise TableError(f"{self.url}: the Hessian values of {name} are corrupt "
                                 f"(offset {off}); rerun the Hessian stage")
            v = np.frombuffer(buf, "<f4")
            parts.append(v)
            at += v.size
        out = (np.concatenate(parts).astype(np.float32, copy=False) if parts
               else np.zeros(0, np.float32))
        if not np.isfinite(out).all():
            raise TableError(f"{self.url}: the Hessian values of {name} hold NaN or inf")
        return out

    def close(self) -> None:
        self._f.close()


def _binary_buffers(arr: pa.LargeBinaryArray) -> list[memoryview]:
    """The bytes of every (non-null) value of a large_binary array, as views of its data
    buffer (no copy); a null value is refused by its CRC (the empty bytes' is 0)."""
    offs = np.frombuffer(arr.buffers()[1], np.int64)[arr.offset : arr.offset + len(arr) + 1]
    data = arr.buffers()[2]
    view = memoryview(data) if data is not None else memoryview(b"")
    return [view[int(a) : int(b)] for a, b in zip(offs[:-1], offs[1:], strict=True)]


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:300] + ("..." if len(text) > 300 else "")
