"""Decode a .hwq file into a sharded safetensors model folder, one tensor at a time.

Each tensor is decoded from its own byte ranges (`HwqReader.read([name])`) and streamed into
`ShardedWriter`, which publishes every shard whole and writes the index last: memory holds one
decoded tensor, and an interrupted decode leaves no index (nothing that loads).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence

import numpy as np
import torch

from pipeline.encode.container import HwqReader
from pipeline.memory import release_memory
from pipeline.models.weights import ShardedWriter

__all__ = ["decode_to_folder", "as_torch", "SAFETENSORS_DTYPE"]

SAFETENSORS_DTYPE = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64",
                     "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8",
                     "bool": "BOOL"}


def as_torch(a: np.ndarray, dtype: str) -> torch.Tensor:
    """A decoded array (bfloat16 as uint16 bits) as a torch tensor of the stored dtype."""
    if dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))


def decode_to_folder(src: str | os.PathLike, dst: str | os.PathLike, *,
                     names: Sequence[str] | None = None, storage_options: dict | None = None,
                     max_shard_bytes: int = 2 << 30, map_fn=None,
                     progress: Callable[[str], object] | None = None) -> dict:
    """Write the tensors of `src` (all, or `names`, in file order) as a sharded folder `dst`.

    Returns {"tensors", "bytes_written", "elements", "bytes_read" (of the .hwq), "index"}."""
    reader = HwqReader(src, storage_options=storage_options)
    meta = {t["name"]: t for t in reader.header["tensors"]}
    order = list(meta)
    if names is not None:
        want = set(names)
        unknown = want - set(order)
        if unknown:
            raise KeyError(f"{src} holds no tensor {sorted(unknown)[0]!r}")
        order = [n for n in order if n in want]
    plan = [(n, SAFETENSORS_DTYPE[meta[n]["dtype"]], tuple(meta[n]["shape"])) for n in order]
    with ShardedWriter(dst, plan, max_shard_bytes=max_shard_bytes,
                       storage_options=storage_options,
                       metadata={"decoded_from": os.path.basename(str(src))}) as w:
        for n in order:
            a = reader.read([n], map_fn=map_fn)[n]
            w.write(n, as_torch(a, reader.dtype(n)))
            del a
            release_memory()
            if progress:
                progress(n)
        index = w.close()
    return {"tensors": len(order), "bytes_written": w.total_size,
            "elements": sum(math.prod(shape) for _, _, shape in plan),
            "bytes_read": reader.bytes_read, "index": index}
