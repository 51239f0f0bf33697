"""A bounded walk over a GGUF file's header, metadata and tensor table, before transformers
reads it.

transformers reads a GGUF through `gguf.GGUFReader`, which builds a numpy object per element
of every metadata array, and trusts each count it reads: a few MB of crafted metadata cost
gigabytes and minutes, and a count past the end of the file is a `struct.error` traceback.
`check_gguf` reads the same structure itself — magic, version, tensor and key counts, each
key's type, each array's length, each tensor's type, shape and offset — checking every count
against the bytes left in the file before it moves on, and refuses with one line naming the
file and what is wrong. It allocates nothing in proportion to a count (the file is mapped,
values are skipped, not built).

Limits. gguf's reader spends about 40 µs and several hundred bytes per metadata item (measured:
100,000 one-byte items took 3.8 s), so items are bounded absolutely and by the file's size. A
real model's arrays hold under a million items in all (Llama 3: 128,256 tokens and types,
280,147 merges; Gemma 3: 3 × 262,144) in a file of hundreds of MB or more. `MAX_ARRAY` items in
one array; `MAX_ITEMS` in all arrays, and no more than one per `BYTES_PER_ITEM` bytes of the
file beyond the first `FREE_ITEMS`; `MAX_STRING` bytes in one string; `MAX_DIMS` dimensions.
"""

from __future__ import annotations

import mmap
import os
import struct

from pipeline.models.folder_checks import ModelFileError, check_regular_file

__all__ = ["check_gguf", "GgufSummary", "MAX_ARRAY", "MAX_ITEMS", "BYTES_PER_ITEM"]

MAX_ARRAY = 1 << 20
MAX_ITEMS = 1 << 21
FREE_ITEMS = 1 << 16
BYTES_PER_ITEM = 64
MAX_STRING = 64 << 20
MAX_DIMS = 8
_MAGIC = b"GGUF"
# GGUF value types -> fixed byte size (8: string, 9: array are variable)
_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


class GgufSummary(dict):
    """{"version", "tensors", "keys", "items", "numel", "data_start"} of a GGUF that passed
    the checks: numel is the elements of every tensor (float32 bytes = 4 × numel), data_start
    the byte where the tensor data begins (what comes before is header, metadata and table)."""


class _Walk:
    def __init__(self, buf: memoryview, where: str, wide: bool):
        self.buf, self.at, self.where, self.wide = buf, 0, where, wide
        self.items = 0
        self.max_items = min(MAX_ITEMS, max(FREE_ITEMS, len(buf) // BYTES_PER_ITEM))

    def fail(self, what: str) -> ModelFileError:
        return ModelFileError(f"{self.where} is not a GGUF file hwq can read: {what}")

    def take(self, n: int, what: str) -> int:
        if n < 0 or self.at + n > len(self.buf):
            raise self.fail(f"{what} runs past the end of the file at byte {self.at} "
                            f"(needs {n} bytes, {len(self.buf) - self.at} left): truncated or "
                            "a count that is too large")
        start = self.at
        self.at += n
        return start

    def u32(self, what: str) -> int:
        return struct.unpack_from("<I", self.buf, self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack_from("<Q", self.buf, self.take(8, what))[0]

    def count(self, what: str) -> int:
        return self.u64(what) if self.wide else self.u32(what)

    def string(self, what: str, cap: int = MAX_STRING) -> bytes:
        n = self.count(f"the length of {what}")
        if n > cap:
            raise self.fail(f"{what} is {n} bytes long (at most {cap})")
        start = self.take(n, what)
        return bytes(self.buf[start : start + n])

    def skip_string(self, what: str) -> None:
        n = self.count(f"the length of {what}")
        if n > MAX_STRING:
            raise self.fail(f"{what} is {n} bytes long (at most {MAX_STRING})")
        self.take(n, what)

    def value(self, vtype: int, key: str, depth: int = 0) -> int | None:
        """Skip one value; returns it if it is an unsigned integer scalar (for alignment)."""
        if vtype in _FIXED:
            start = self.take(_FIXED[vtype], f"the value of {key!r}")
            if vtype in (4, 10):
                return int.from_bytes(self.buf[start : start + _FIXED[vtype]], "little")
            return None
        if vtype == _STRING:
            self.skip_string(f"the value of {key!r}")
            return None
        if vtype != _ARRAY:
            raise self.fail(f"{key!r} has value type {vtype}, which GGUF does not define")
        if depth >= 2:
            raise self.fail(f"{key!r} nests arrays more than two deep")
        itype = self.u32(f"the item type of {key!r}")
        n = self.count(f"the length of {key!r}")
        if n > MAX_ARRAY:
            raise self.fail(f"{key!r} is an array of {n} items (at most {MAX_ARRAY})")
        self.items += n
        if self.items > self.max_items:
            raise self.fail(f"the metadata arrays hold more than {self.max_items} items in all "
                            f"(at {key!r}; at most {MAX_ITEMS}, and one per {BYTES_PER_ITEM} "
                            "bytes of the file)")
        if itype in _FIXED:
            self.take(n * _FIXED[itype], f"the {n} items of {key!r}")
            return None
        # Each string or array item takes at least its length field: bound n before looping.
        if n * (8 if self.wide else 4) > len(self.buf) - self.at:
            raise self.fail(f"{key!r} claims {n} items, more than the {len(self.buf) - self.at} "
                            "bytes left can hold")
        for _ in range(n):
            self.value(itype, key, depth + 1)
        return None


def check_gguf(path: str | os.PathLike[str]) -> GgufSummary:
    """Walk the GGUF at local `path`; ModelFileError naming the file and the problem, or a
    summary of what it holds. Reads only the header, metadata and tensor table."""
    path = os.fspath(path)
    where = repr(path)
    size = check_regular_file(path, where)
    if size < 24:
        raise ModelFileError(f"{where} is not a GGUF file hwq can read: {size} bytes, "
                             "truncated")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        buf = memoryview(mm)
        try:
            return _walk(buf, where, size)
        finally:
            buf.release()


def _walk(buf: memoryview, where: str, size: int) -> GgufSummary:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    if bytes(buf[:4]) != _MAGIC:
        raise ModelFileError(f"{where} is not a GGUF file (it does not start with 'GGUF')")
    w = _Walk(buf, where, wide=True)
    w.take(4, "the magic")
    version = w.u32("the version")
    if version not in (1, 2, 3):
        raise w.fail(f"version {version} (hwq reads versions 1 to 3)")
    w.wide = version >= 2
    n_tensors = w.count("the tensor count")
    n_keys = w.count("the key count")
    # A tensor entry takes ≥ 24 bytes, a key ≥ 13: counts beyond that cannot be honest.
    if n_tensors * 24 > size or n_keys * 13 > size:
        raise w.fail(f"it claims {n_tensors} tensors and {n_keys} metadata keys, more than "
                     f"its {size} bytes can hold")
    alignment = 32
    for i in range(n_keys):
        key = w.string(f"the name of metadata key {i}", cap=1 << 16).decode("utf-8", "replace")
        vtype = w.u32(f"the type of {key!r}")
        got = w.value(vtype, key)
        if key == "general.alignment":
            if got is None or got == 0 or got & (got - 1) or got > 1 << 16:
                raise w.fail(f"general.alignment {got!r} is not a power of two ≤ 65536")
            alignment = got
    tensors = []
    total = 0
    for i in range(n_tensors):
        name = w.string(f"the name of tensor {i}", cap=1 << 16).decode("utf-8", "replace")
        n_dims = w.u32(f"the dimension count of {name!r}")
        if n_dims > MAX_DIMS:
            raise w.fail(f"tensor {name!r} has {n_dims} dimensions (at most {MAX_DIMS})")
        dims = [w.count(f"a dimension of {name!r}") for _ in range(n_dims)]
        ttype = w.u32(f"the type of {name!r}")
        offset = w.u64(f"the offset of {name!r}")
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
        except (ValueError, KeyError):
            raise w.fail(f"tensor {name!r} has type {ttype}, which gguf does not know") from None
        numel = 1
        for d in dims:
            numel *= d
        if dims and dims[0] % block:
            raise w.fail(f"tensor {name!r}: its first dimension {dims[0]} is not a multiple of "
                         f"its type's block of {block}")
        tensors.append((name, offset, numel // block * type_size))
        total += numel
    data_start = -(-w.at // alignment) * alignment
    for name, offset, nbytes in tensors:
        if offset % alignment:
            raise w.fail(f"tensor {name!r} starts at offset {offset}, not a multiple of the "
                         f"alignment {alignment}")
        if data_start + offset + nbytes > size:
            raise w.fail(f"tensor {name!r} needs bytes {data_start + offset}.."
                         f"{data_start + offset + nbytes}, past the end of the file ({size} "
                         "bytes): truncated or a wrong shape")
    return GgufSummary(version=version, tensors=n_tensors, keys=n_keys, items=w.items,
                       numel=total, data_start=data_start)
