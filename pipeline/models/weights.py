"""Tensor-level reads and writes of safetensors checkpoints, local or on an object store.

A model that does not fit in memory is never read whole. `WeightsFolder` opens a model folder
(`model.safetensors`, or shards listed by `model.safetensors.index.json`) by reading, per
shard, the 8-byte length and the JSON header — nothing else — and then serves one tensor at a
time by a range read of exactly its bytes (`os.pread` locally, one ranged GET on S3 through
`fsspec`'s `cat_file(start, end)`). `bytes_read` counts every byte fetched, so a caller (and
the tests) can check that a one-tensor read cost that tensor and the headers.

Digests: a folder written by `ShardedWriter` records, in its index's `metadata`, the sha256 of
every tensor's bytes (`hwq_tensor_sha256`) and of every shard (`hwq_shard_sha256`); a read
checks the tensor's digest from the bytes it fetched, without reading the rest of the shard.
A folder written by other tools has no per-tensor digests: its reads are checked structurally
(header offsets in bounds, contiguous, sizes matching dtype × shape) and `verified` says
``"structure"`` instead of ``"sha256"``.

`ShardedWriter` writes a sharded folder tensor by tensor from a plan (name, dtype, shape) known
in advance: each shard's header is computed from the plan, its bytes are streamed to a
temporary local file (or an S3 multipart upload) and published whole; the index is written
last, so an interrupted write leaves no index and nothing that loads.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import posixpath
import struct
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.models.folder_checks import (
    ModelFileError,
    check_digests,
    check_regular_file,
    check_shard_name,
    model_file_target,
    parse_json,
)

__all__ = ["WeightsError", "TensorInfo", "WeightsFolder", "ShardedWriter", "DTYPES",
           "INDEX", "SINGLE"]

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# safetensors dtype name -> (torch dtype, bytes per element)
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2), "I64": (torch.int64, 8), "I32": (torch.int32, 4),
    "I16": (torch.int16, 2), "I8": (torch.int8, 1), "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}
_NAME_OF = {t: n for n, (t, _) in DTYPES.items()}
_MAX_HEADER = 100 << 20  # the safetensors library's own cap on a header
_CHUNK = 8 << 20  # bytes per write/read call when streaming


class WeightsError(ModelFileError):
    """A model folder or safetensors file that cannot be read as one; the message says why."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors name ("BF16", ...)
    shape: tuple[int, ...]
    file: str  # file name inside the folder
    start: int  # absolute byte offsets in the file
    end: int
    sha256: str | None = None

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


class _Files:
    """Range reads of files under one folder, counting bytes."""

    def __init__(self, root: str, storage_options: dict | None):
        self.root = root.rstrip("/")
        self.remote = _is_remote(root)
        self.bytes_read = 0
        self.requests = 0
        if self.remote:
            from fsspec.core import url_to_fs

            self.fs, self.base = url_to_fs(root, **(storage_options or {}))
        else:
            self.fs, self.base = None, root[7:] if root.startswith("file://") else root

    def path(self, name: str) -> str:
        return posixpath.join(self.base, name) if self.remote else os.path.join(self.base, name)

    def exists(self, name: str) -> bool:
        return self.fs.exists(self.path(name)) if self.remote else os.path.lexists(self.path(name))

    def size(self, name: str) -> int:
        """Size of a regular file (locally: not a link, folder, FIFO or device)."""
        if not self.remote:
            return _as_weights_error(check_regular_file, self.path(name))
        try:
            info = self.fs.info(self.path(name))
        except FileNotFoundError:
            raise WeightsError(f"{self.path(name)} does not exist") from None
        if info.get("type") != "file":
            raise WeightsError(f"{self.path(name)} is not a file")
        return int(info["size"])

    def read(self, name: str, start: int, end: int) -> bytes | bytearray:
        """Bytes [start, end) of one file: exactly those bytes are requested."""
        if end <= start:
            return b""
        if self.remote:
            data = self.fs.cat_file(self.path(name), start=start, end=end)
            got = len(data)
        else:  # straight into one buffer: no second copy of a large tensor
            data = bytearray(end - start)
            view = memoryview(data)
            got = 0
            fd = os.open(model_file_target(self.path(name)), os.O_RDONLY | os.O_NOFOLLOW)
            try:
                while got < len(data):
                    n = os.preadv(fd, [view[got : got + _CHUNK]], start + got)
                    if n <= 0:
                        break
                    got += n
            finally:
                os.close(fd)
        self.requests += 1
        self.bytes_read += got
        if got != end - start:
            raise WeightsError(f"{self.path(name)}: asked for bytes {start}..{end}, got "
                               f"{got} (the file is truncated)")
        return data

    def read_whole(self, name: str, cap: int) -> bytes:
        size = self.size(name)
        if size > cap:
            raise WeightsError(f"{self.path(name)} is {size} bytes, more than the {cap} "
                               f"allowed for it")
        return self.read(name, 0, size)


def _as_weights_error(fn, *args):
    """fn(*args), its ModelFileError raised as a WeightsError (one type for this module)."""
    try:
        return fn(*args)
    except WeightsError:
        raise
    except ModelFileError as e:
        raise WeightsError(str(e)) from None


def parse_index(raw: bytes | bytearray, where: str) -> tuple[dict[str, str], dict[str, Any]]:
    """(weight_map, metadata) of a safetensors index; every shard a plain safetensors name."""
    index = _as_weights_error(parse_json, raw, where)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    meta = (index.get("metadata") or {}) if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not isinstance(meta, dict):
        raise WeightsError(f"{where} is not a safetensors index (a weight_map object of "
                           "tensor name -> shard file, and a metadata object)")
    for s in weight_map.values():
        _as_weights_error(check_shard_name, s, where)
    return weight_map, meta


def _parse_header(where: str, raw: bytes, header_len: int, file_size: int
                  ) -> tuple[dict[str, tuple[str, tuple[int, ...], int, int]], dict[str, str]]:
    h = _as_weights_error(parse_json, raw, f"{where}: the safetensors header")
    if not isinstance(h, dict):
        raise WeightsError(f"{where}: the safetensors header is not a JSON object")
    meta = h.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise WeightsError(f"{where}: __metadata__ is not an object")
    data_start = 8 + header_len
    out = {}
    spans = []
    for name, d in h.items():
        if not isinstance(d, dict) or set(d) != {"dtype", "shape", "data_offsets"}:
            raise WeightsError(f"{where}: tensor {name!r} is not dtype/shape/data_offsets")
        dt, shape, offs = d["dtype"], d["shape"], d["data_offsets"]
        if not isinstance(dt, str) or dt not in DTYPES:
            raise WeightsError(f"{where}: tensor {name!r} has dtype {dt!r}, which hwq does not "
                               f"read (known: {', '.join(DTYPES)})")
        if (not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape)
                or not isinstance(offs, list) or len(offs) != 2
                or not all(type(o) is int and o >= 0 for o in offs)):
            raise WeightsError(f"{where}: tensor {name!r} has a malformed shape or offsets")
        b, e = offs
        if e - b != math.prod(shape) * DTYPES[dt][1]:
            raise WeightsError(f"{where}: tensor {name!r} spans {e - b} bytes, but "
                               f"{dt}{shape} needs {math.prod(shape) * DTYPES[dt][1]}")
        if data_start + e > file_size:
            raise WeightsError(f"{where}: tensor {name!r} ends at byte {data_start + e}, past "
                               f"the end of the file ({file_size} bytes): it is truncated")
        spans.append((b, e, name))
        out[name] = (dt, tuple(shape), data_start + b, data_start + e)
    spans.sort()
    at = 0
    for b, e, name in spans:
        if b != at:
            raise WeightsError(f"{where}: tensor {name!r} starts at {b}, expected {at} "
                               f"(overlapping or gapped data)")
        at = e
    if not all(isinstance(v, str) for v in meta.values()):
        raise WeightsError(f"{where}: __metadata__ values are not strings")
    return out, dict(meta)


class WeightsFolder:
    """A safetensors model folder (or one .safetensors file), read one tensor at a time.

    url: a local folder or file, or an fsspec URL (``s3://bucket/model``).
    storage_options: fsspec options (credentials, ``client_kwargs.endpoint_url``).
    """

    def __init__(self, url: str | os.PathLike, storage_options: dict | None = None):
        url = str(url)
        self.url = url
        if url.endswith(".safetensors"):
            root, single = url.rsplit("/", 1) if "/" in url else (".", url)
            _as_weights_error(check_shard_name, single, url)
            self._files = _Files(root, storage_options)
            shards, digests, shard_digests = [single], {}, {}
            weight_map = None
        else:
            self._files = _Files(url, storage_options)
            if self._files.exists(INDEX):
                where = f"{url}/{INDEX}"
                weight_map, meta = parse_index(self._files.read_whole(INDEX, 64 << 20), where)
                digests = _as_weights_error(check_digests, meta.get("hwq_tensor_sha256"), where)
                shard_digests = _as_weights_error(check_digests, meta.get("hwq_shard_sha256"),
                                                  where)
                shards = sorted(set(weight_map.values()))
            elif self._files.exists(SINGLE):
                shards, weight_map, digests, shard_digests = [SINGLE], None, {}, {}
            else:
                raise WeightsError(f"{url} holds neither {INDEX} nor {SINGLE}: not a "
                                   f"safetensors model folder")
        self.shard_sha256 = shard_digests
        self.metadata: dict[str, dict[str, str]] = {}
        self.tensors: dict[str, TensorInfo] = {}
        for s in shards:
            size = self._files.size(s)
            if size < 8:
                raise WeightsError(f"{self._files.path(s)} is {size} bytes: truncated")
            (n,) = struct.unpack("<Q", bytes(self._files.read(s, 0, 8)))
            if n > _MAX_HEADER or 8 + n > size:
                raise WeightsError(f"{self._files.path(s)}: header of {n} bytes does not fit "
                                   f"the file ({size} bytes)")
            infos, meta = _parse_header(self._files.path(s), bytes(self._files.read(s, 8, 8 + n)),
                                        n, size)
            self.metadata[s] = meta
            for name, (dt, shape, b, e) in infos.items():
                if weight_map is not None and weight_map.get(name) != s:
                    continue  # the index says another shard holds it (or nobody wants it)
                if name in self.tensors:
                    raise WeightsError(f"{url}: tensor {name!r} is in two shards")
                self.tensors[name] = TensorInfo(name, dt, shape, s, b, e, digests.get(name))
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(self.tensors))
            if missing:
                raise WeightsError(f"{url}: the index lists {len(missing)} tensors no shard "
                                   f"holds (first: {missing[0]!r})")
        self.header_bytes = self._files.bytes_read

    # -- reads -----------------------------------------------------------------------------

    @property
    def bytes_read(self) -> int:
        return self._files.bytes_read

    @property
    def names(self) -> list[str]:
        return list(self.tensors)

    @property
    def sha256_any(self) -> bool:
        """Whether the index carries a sha256 for any tensor."""
        return any(t.sha256 for t in self.tensors.values())

    @property
    def sha256_all(self) -> bool:
        return bool(self.tensors) and all(t.sha256 for t in self.tensors.values())

    @property
    def verified(self) -> str:
        """How a tensor read is checked: "sha256" (per-tensor digests) or "structure"."""
        return "sha256" if all(t.sha256 for t in self.tensors.values()) else "structure"

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise WeightsError(f"{self.url} has no tensor {name!r}") from None

    def read_bytes(self, name: str) -> bytes | bytearray:
        t = self.info(name)
        data = self._files.read(t.file, t.start, t.end)
        if t.sha256 is not None and hashlib.sha256(data).hexdigest() != t.sha256:
            raise WeightsError(f"{self._files.path(t.file)}: tensor {name!r} does not match "
                               f"its sha256 in {INDEX} (corrupt or replaced; re-copy the folder)")
        return data

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor, from a range read of exactly its bytes (copied, writable)."""
        t = self.info(name)
        data = self.read_bytes(name)
        if not isinstance(data, bytearray):
            data = bytearray(data)  # torch wants a writable buffer
        tdt = DTYPES[t.dtype][0]
        x = (torch.frombuffer(data, dtype=tdt) if data else torch.empty(0, dtype=tdt))
        x = x.reshape(t.shape)
        return x if dtype is None else x.to(dtype)

    def read_many(self, names: Iterable[str], dtype: torch.dtype | None = None
                  ) -> dict[str, torch.Tensor]:
        return {n: self.read(n, dtype) for n in names}

    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


# ---------------------------------------------------------------------------------------------
# writing


def _header_bytes(plan: Sequence[tuple[str, str, tuple[int, ...]]],
                  metadata: dict[str, str] | None) -> bytes:
    h: dict[str, Any] = {}
    if metadata:
        h["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    at = 0
    for name, dt, shape in plan:
        n = math.prod(shape) * DTYPES[dt][1]
        h[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [at, at + n]}
        at += n
    raw = json.dumps(h, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)  # 8-byte aligned data, as the safetensors library does


@dataclass
class _Shard:
    file: str
    plan: list[tuple[str, str, tuple[int, ...]]]
    sink: Any = None
    digest: Any = None
    next: int = 0
    tmp: str | None = None


class _Sink:
    """One file written in pieces and published whole: a local temporary file renamed at the
    end, or an S3 multipart upload completed at the end (aborted on failure)."""

    def __init__(self, files: _Files, name: str):
        self.files, self.name = files, name
        self.path = files.path(name)
        if files.remote:
            self.f = files.fs.open(self.path, "wb", block_size=64 << 20)
            self.tmp = None
        else:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            self.tmp = os.path.join(os.path.dirname(self.path) or ".",
                                    f".{os.path.basename(self.path)}.tmp-{uuid.uuid4().hex}")
            self.f = open(self.tmp, "wb")  # noqa: SIM115 - closed by commit/abort
        self.written = 0
        self.sha256 = hashlib.sha256()
        self.closed = False

    def write(self, data: bytes | memoryview) -> int:
        self.f.write(data)
        self.sha256.update(data)
        self.written += len(data)
        return len(data)

    def tell(self) -> int:
        return self.written

    def flush(self) -> None:
        pass

    def commit(self) -> None:
        self.closed = True
        if self.files.remote:
            self.f.close()  # completes the multipart upload: the object appears whole
            self.files.fs.invalidate_cache(self.path)
        else:
            self.f.flush()
            os.fsync(self.f.fileno())
            self.f.close()
            os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.closed = True
        try:
            if self.files.remote:
                discard = getattr(self.f, "discard", None)
                if discard is not None:
                    discard()  # aborts the multipart upload: no object, no parts kept
                self.f.closed = True  # nothing left to flush when it is collected
            else:
                self.f.close()
                if self.tmp and os.path.exists(self.tmp):
                    os.remove(self.tmp)
        except Exception:  # noqa: BLE001 - cleanup after another error; that error matters
            pass


class ShardedWriter:
    """Write a sharded safetensors folder tensor by tensor, in plan order.

    plan: (name, safetensors dtype or torch dtype, shape) of every tensor, in the order they
        will be written.
    max_shard_bytes: a new shard starts before a tensor that would take the shard past this
        (a larger tensor gets a shard of its own).
    Use as a context manager: on an exception every unpublished shard is removed (or its
    upload aborted) and no index is written.
    """

    def __init__(self, url: str | os.PathLike, plan: Sequence[tuple[str, Any, Sequence[int]]],
                 *, max_shard_bytes: int = 2 << 30, storage_options: dict | None = None,
                 metadata: dict[str, str] | None = None):
        self._files = _Files(str(url), storage_options)
        norm = []
        for name, dt, shape in plan:
            dt = _NAME_OF.get(dt, dt)
            if dt not in DTYPES:
                raise WeightsError(f"{name}: dtype {dt!r} cannot be written to safetensors")
            norm.append((str(name), dt, tuple(int(s) for s in shape)))
        if len({n for n, _, _ in norm}) != len(norm):
            raise WeightsError("the plan names a tensor twice")
        groups: list[list] = [[]]
        size = 0
        for item in norm:
            n = math.prod(item[2]) * DTYPES[item[1]][1]
            if groups[-1] and size + n > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(item)
            size += n
        total = len(groups)
        self.shards = [_Shard(f"model-{i + 1:05d}-of-{total:05d}.safetensors", g)
                       for i, g in enumerate(groups)]
        self.metadata = {"format": "pt", **(metadata or {})}
        self._order = [(si, j) for si, s in enumerate(self.shards) for j in range(len(s.plan))]
        self._at = 0
        self.tensor_sha256: dict[str, str] = {}
        self.shard_sha256: dict[str, str] = {}
        self.total_size = sum(math.prod(s) * DTYPES[d][1] for _, d, s in norm)
        self._done = False

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, et, ev, tb) -> None:
        if et is not None:
            self.abort()

    @property
    def pending(self) -> list[str]:
        return [self.shards[si].plan[j][0] for si, j in self._order[self._at:]]

    def write(self, name: str, tensor: torch.Tensor | np.ndarray) -> None:
        if self._at >= len(self._order):
            raise WeightsError(f"{name!r}: every tensor of the plan is already written")
        si, j = self._order[self._at]
        shard = self.shards[si]
        want, dt, shape = shard.plan[j]
        if name != want:
            raise WeightsError(f"tensors must come in plan order: got {name!r}, "
                               f"expected {want!r}")
        t = torch.as_tensor(tensor)
        if t.dtype != DTYPES[dt][0] or tuple(t.shape) != shape:
            raise WeightsError(f"{name}: got {_NAME_OF.get(t.dtype, t.dtype)}{list(t.shape)}, "
                               f"the plan says {dt}{list(shape)}")
        if shard.sink is None:
            header = _header_bytes(shard.plan, self.metadata)
            shard.sink = _Sink(self._files, shard.file)
            shard.digest = hashlib.sha256()
            for piece in (struct.pack("<Q", len(header)), header):
                shard.sink.write(piece)
                shard.digest.update(piece)
        t = t.detach().contiguous().cpu()
        raw = t.view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
        mv = memoryview(raw.numpy()).cast("B")
        th = hashlib.sha256()
        for at in range(0, len(mv), _CHUNK):
            piece = mv[at : at + _CHUNK]
            shard.sink.write(piece)
            shard.digest.update(piece)
            th.update(piece)
        self.tensor_sha256[name] = th.hexdigest()
        self._at += 1
        if j == len(shard.plan) - 1:
            shard.sink.commit()
            self.shard_sha256[shard.file] = shard.digest.hexdigest()
            shard.sink = None

    def close(self) -> str:
        """Write the index (last: its presence marks the folder complete); returns its path."""
        if self._at != len(self._order):
            raise WeightsError(f"{len(self._order) - self._at} tensors of the plan were never "
                               f"written (first: {self.pending[0]!r})")
        index = {"metadata": {"total_size": self.total_size,
                              "hwq_tensor_sha256": self.tensor_sha256,
                              "hwq_shard_sha256": self.shard_sha256},
                 "weight_map": {n: s.file for s in self.shards for n, _, _ in s.plan}}
        sink = _Sink(self._files, INDEX)
        try:
            sink.write(json.dumps(index, indent=1, sort_keys=True).encode())
            sink.commit()
        except BaseException:
            sink.abort()
            raise
        self._done = True
        return self._files.path(INDEX)

    def abort(self) -> None:
        """Remove what an interrupted write published (shards) or staged (temporaries)."""
        for s in self.shards:
            if s.sink is not None:
                s.sink.abort()
                s.sink = None
            if s.file in self.shard_sha256 and not self._done:
                try:
                    if self._files.remote:
                        self._files.fs.rm(self._files.path(s.file))
                    else:
                        os.remove(self._files.path(s.file))
                except (OSError, FileNotFoundError):
                    pass


def write_folder(url: str | os.PathLike, tensors: Iterator[tuple[str, torch.Tensor]] | dict,
                 plan: Sequence[tuple[str, Any, Sequence[int]]], **kw) -> str:
    """Write `tensors` (an iterator of (name, tensor) in plan order, or a dict) as a sharded
    folder; returns the index path."""
    items = tensors.items() if isinstance(tensors, dict) else tensors
    with ShardedWriter(url, plan, **kw) as w:
        for name, t in items:
            w.write(name, t)
        return w.close()
