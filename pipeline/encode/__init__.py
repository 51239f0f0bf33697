"""Entropy coding (canonical Huffman, chunked streams) and the .hwq container format."""

from .bitio import DecodeError
from .container import (
    FORMAT_VERSION,
    MAGIC,
    HwqFormatError,
    HwqReader,
    TensorEntry,
    hwq_accounting,
    inspect_hwq,
    read_hwq,
    write_hwq,
)
from .huffman import (
    MAX_CODE_LENGTH,
    CodeTable,
    EncodedChunk,
    canonical_codewords,
    decode_chunk,
    decode_stream,
    encode_chunk,
    encode_stream,
    entropy_bits,
    fixed_lengths,
    huffman_lengths,
    kraft_ok,
)
from .inspection import format_inspect
from .positions import choose_max_gap, gaps_from_mask, gaps_to_symbols, symbols_to_positions

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "MAX_CODE_LENGTH",
    "CodeTable",
    "DecodeError",
    "EncodedChunk",
    "HwqFormatError",
    "HwqReader",
    "TensorEntry",
    "canonical_codewords",
    "choose_max_gap",
    "decode_chunk",
    "decode_stream",
    "encode_chunk",
    "encode_stream",
    "entropy_bits",
    "fixed_lengths",
    "format_inspect",
    "gaps_from_mask",
    "gaps_to_symbols",
    "huffman_lengths",
    "hwq_accounting",
    "inspect_hwq",
    "kraft_ok",
    "read_hwq",
    "symbols_to_positions",
    "write_hwq",
]
