"""Helpers every encode path shares: a tensor as the container stores it (its dtype, bf16 as
bits; encode.raw_dtype for the tensors stored as is) and the bits the quantized tensors need."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["raw_cast", "quantized_bits", "raw_array", "dtype_of"]


def dtype_of(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def raw_array(t: torch.Tensor) -> tuple[np.ndarray, str]:
    """A tensor as the container stores it, in its own dtype (bfloat16 as uint16 bits)."""
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16), "bfloat16"
    return t.numpy(), dtype_of(t)


def raw_cast(t: torch.Tensor, raw_dtype: str) -> torch.Tensor:
    """A tensor stored as is, in encode.raw_dtype: "keep" leaves it; "float16"/"bfloat16"
    round wider floating-point tensors (biases, norms) to 16 bits. Integers are kept."""
    if raw_dtype == "keep" or not t.is_floating_point() or t.element_size() <= 2:
        return t
    return t.to(getattr(torch, raw_dtype))


def quantized_bits(acct: dict, n_quantized_entries: int, n_entries: int) -> int:
    """Bits of the file the quantized tensors need: indices, positions, codebooks, code tables,
    and their share of the header (by number of tensor entries)."""
    b = acct["bits"]
    header = b["header"] * n_quantized_entries / max(n_entries, 1)
    return int(round(b["indices"] + b["positions"] + b["codebooks"] + b["code_tables"] + header))

