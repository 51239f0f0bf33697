"""The coders a stream of a .hwq file can use, behind one job interface.

The writer turns every stream into independent chunk *jobs* and hands them to a map function
(in-process, or Ray tasks); the reader does the same for decoding. A job is a plain tuple, so
it pickles to a worker:

- ``("table", symbols, table)``: a static code — a Huffman or fixed-length :class:`CodeTable`
  or an :class:`AnsTable` (rANS) — over index or gap symbols;
- ``("mask", rows_of_mask, group)``: kept/pruned bits of whole rows of a tensor, coded by the
  adaptive context-mixing binary coder (:mod:`pipeline.encode.context`);
- ``("index", codes, k, rows)``: codebook indices coded adaptively with the row of each
  code as context.

Decode jobs mirror them with ``(kind, data, n, ...)``. The static coders' tables are chosen
from pooled counts on the driver; the adaptive coders need no table (their models start from
the same state in every chunk, so a chunk decodes alone).
"""

from __future__ import annotations

import math
import zlib
from typing import Any

import numpy as np

from .ans import ans_decode, ans_encode
from .ans_table import AnsTable
from .context import decode_indices, decode_mask, encode_indices, encode_mask
from .huffman import CodeTable, EncodedChunk, decode_chunk, encode_chunk

__all__ = [
    "Table",
    "decode_job",
    "encode_job",
    "make_table",
    "mask_geometry",
    "table_kind",
]

Table = CodeTable | AnsTable


def make_table(counts: np.ndarray, coder: str, *, fixed: bool = False) -> Table:
    """A static code for a histogram: ``coder`` "huffman" (or fixed-length) or "ans"."""
    if coder == "ans":
        return AnsTable.from_counts(np.asarray(counts, np.int64))
    return CodeTable.from_counts(counts, fixed=fixed)


def table_kind(table: Table) -> str:
    if isinstance(table, AnsTable):
        return "rans"
    return "fixed" if table.fixed else "huffman"


def mask_geometry(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(rows, cols, group) a mask is coded as: rows = output channels (shape[0]), cols = the
    rest in C order, group = columns per input channel (a conv kernel's kh·kw; 1 for a
    Linear). A 0-D or 1-D tensor is one row."""
    numel = math.prod(shape)
    if len(shape) < 2 or shape[0] == 0:
        return 1, numel, 1
    rows = shape[0]
    group = math.prod(shape[2:]) if len(shape) > 2 else 1
    return rows, numel // rows, max(group, 1)


def encode_job(job: tuple[Any, ...]) -> EncodedChunk:
    kind = job[0]
    if kind == "table":
        _, sym, table = job
        if isinstance(table, AnsTable):
            data = ans_encode(np.asarray(sym), table)
            return EncodedChunk(data, int(len(sym)), 8 * len(data), zlib.crc32(data))
        return encode_chunk(sym, table)
    if kind == "mask":
        _, bits, group = job
        data = encode_mask(np.asarray(bits, bool), group)
        return EncodedChunk(data, int(bits.shape[0]), 8 * len(data), zlib.crc32(data))
    if kind == "index":
        _, codes, k, rows = job
        data = encode_indices(np.asarray(codes), int(k), np.asarray(rows))
        return EncodedChunk(data, int(len(codes)), 8 * len(data), zlib.crc32(data))
    raise ValueError(f"unknown encode job kind {kind!r}")


def decode_job(job: tuple[Any, ...]) -> np.ndarray:
    """The decoded chunk: symbols (table, index) or a bool [n_rows, cols] mask block."""
    kind = job[0]
    if kind == "table":
        _, data, n, table = job
        if isinstance(table, AnsTable):
            return ans_decode(data, int(n), table)
        return decode_chunk(data, int(n), table)
    if kind == "mask":
        _, data, n_rows, cols, group = job
        return decode_mask(data, int(n_rows), int(cols), int(group))
    if kind == "index":
        _, data, n, k, rows = job
        return decode_indices(data, int(n), int(k), rows)
    raise ValueError(f"unknown decode job kind {kind!r}")
