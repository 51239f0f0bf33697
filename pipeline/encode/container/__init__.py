"""The .hwq container: one file holding a quantized network (see docs/FORMAT.md).

Layout: a 24-byte prefix (magic, version, header length, header CRC), a JSON header, zero
padding to a multiple of 8, then the payload: codebooks, code tables, and per tensor its
index chunks and position chunks (or its raw bytes). Every payload byte belongs to exactly
one section with its own CRC-32, so a reader can fetch the header and then only the byte
ranges of the tensors it wants (local files and object stores alike, through fsspec).

Modules: ``header`` (constants, limits, the header's schema and validation), ``entries``
(`TensorEntry` and its validation), ``writer`` (`write_hwq`), ``storage`` (fsspec and the
atomic publication of a written file), ``reader`` (`HwqReader`, `read_hwq`,
`hwq_accounting`, `inspect_hwq`), ``streams`` (the reader's stream decoding), ``accounting``
(the bit accounting). This package re-exports the public names, which many callers use.
"""

from .entries import TensorEntry
from .header import (
    DEFAULT_MAX_HEADER_BYTES,
    DEFAULT_MAX_OUTPUT_BYTES,
    DEFAULT_MAX_OUTPUT_RATIO,
    FORMAT_VERSION,
    MAGIC,
    HwqFormatError,
)
from .reader import HwqReader, UnknownTensorError, hwq_accounting, inspect_hwq, read_hwq
from .writer import write_hwq

__all__ = [
    "DEFAULT_MAX_HEADER_BYTES",
    "DEFAULT_MAX_OUTPUT_BYTES",
    "DEFAULT_MAX_OUTPUT_RATIO",
    "FORMAT_VERSION",
    "MAGIC",
    "HwqFormatError",
    "HwqReader",
    "TensorEntry",
    "UnknownTensorError",
    "hwq_accounting",
    "inspect_hwq",
    "read_hwq",
    "write_hwq",
]
