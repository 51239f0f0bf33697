"""The lookup-table product on a GPU: one Triton kernel over the packed layout of
`pipeline.runtime.transcode` (docs/RUNTIME.md §2–3), so a `LutLinear` whose buffers are on a
CUDA device multiplies from its packed indices there as it does on the CPU.

``y[b, r] = Σ_c x[b, c] · tables[r·groups + c // group_size, idx(r, c)]`` in float32. A
program owns a tile of BLOCK_R rows and BLOCK_B tokens and walks the columns BLOCK_C at a
time: it loads the tile's packed bytes, unpacks them in registers (the 2-, 3-, 4- and 8-bit
layouts, one specialisation each), gathers the levels from the rows' tables and accumulates
— at batch 1 (decode) as a multiply and a row sum, for a batch (prefill) as a `tl.dot` of the
token tile and the unpacked weight tile. The dense matrix never exists beyond one tile.

Levels and activations are float32 in both runtime modes (the fp32 tables are what a GPU
reads fastest; the CPU's int8 fast path exists for `vpshufb`). ``precision``: "ieee" for the
reference products (tests compare them with the CPU reference), "tf32" lets the batched
products use the tensor cores (mode "fast").

Triton is imported when the first product on a CUDA tensor runs (it is not a dependency of
the CPU install). With ``TRITON_INTERPRET=1`` set before that, the same kernel runs on CPU
tensors through Triton's interpreter: that is how the tests check it on machines without a
GPU.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch

__all__ = ["available", "lut_matmul_triton"]

BLOCK_C = 64  # columns a step (two 32-column blocks of the packed layout)


def available() -> bool:
    """Whether Triton can be imported here."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@lru_cache(maxsize=1)
def _kernel() -> Any:
    """The jitted kernel (decorated on first use, so that TRITON_INTERPRET set by a test
    before its first call is honoured)."""
    import triton
    import triton.language as tl

    @triton.jit
    def lut_kernel(x_ptr, idx_ptr, tab_ptr, y_ptr, B, ROWS, COLS, STRIDE, TSTRIDE, GROUPS,
                   GSIZE, BITS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr,
                   BLOCK_C: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        toks = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
        rmask = rows < ROWS
        bmask = toks < B
        rbase = rows.to(tl.int64)[:, None] * STRIDE
        acc = tl.zeros((BLOCK_B, BLOCK_R), dtype=tl.float32)
        for c0 in range(0, COLS, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            cmask = cols < COLS
            wmask = rmask[:, None] & cmask[None, :]
            blk = cols // 32
            cb = cols % 32
            if BITS == 8:
                i = tl.load(idx_ptr + rbase + cols[None, :], mask=wmask, other=0).to(tl.int32)
            elif BITS == 4:  # byte j: column j low nibble, column j + 16 high nibble
                byte = tl.load(idx_ptr + rbase + (blk * 16 + cb % 16)[None, :], mask=wmask,
                               other=0).to(tl.int32)  # fmt: skip
                i = (byte >> (4 * (cb // 16))[None, :]) & 15
            elif BITS == 2:  # byte j: columns j, j + 8, j + 16, j + 24, lowest pair first
                byte = tl.load(idx_ptr + rbase + (blk * 8 + cb % 8)[None, :], mask=wmask,
                               other=0).to(tl.int32)  # fmt: skip
                i = (byte >> (2 * (cb // 8))[None, :]) & 3
            else:  # 3 bits: the low two bits as a 2-bit block, then 4 bytes of third bits
                lo = tl.load(idx_ptr + rbase + (blk * 12 + cb % 8)[None, :], mask=wmask,
                             other=0).to(tl.int32)  # fmt: skip
                hi = tl.load(idx_ptr + rbase + (blk * 12 + 8 + cb % 4)[None, :], mask=wmask,
                             other=0).to(tl.int32)  # fmt: skip
                i = ((lo >> (2 * (cb // 8))[None, :]) & 3) | (((hi >> (cb // 4)[None, :]) & 1) << 2)
            t = rows.to(tl.int64)[:, None] * GROUPS + (cols // GSIZE)[None, :]
            w = tl.load(tab_ptr + t * TSTRIDE + i, mask=wmask, other=0.0)  # [BLOCK_R, BLOCK_C]
            xv = tl.load(x_ptr + toks.to(tl.int64)[:, None] * COLS + cols[None, :],
                         mask=bmask[:, None] & cmask[None, :], other=0.0)  # fmt: skip
            if BLOCK_B == 1:
                acc += tl.sum(w * xv, axis=1)[None, :]
            elif IEEE:
                acc += tl.dot(xv, tl.trans(w), input_precision="ieee")
            else:
                acc += tl.dot(xv, tl.trans(w), input_precision="tf32")
        out = y_ptr + toks.to(tl.int64)[:, None] * ROWS + rows[None, :]
        tl.store(out, acc, mask=bmask[:, None] & rmask[None, :])

    return lut_kernel


def lut_matmul_triton(x: torch.Tensor, p, *, precision: str = "ieee") -> torch.Tensor:
    """y [b, rows] float32 = x [b, cols] · Ŵᵀ for a packed matrix ``p``
    (:class:`pipeline.runtime.transcode.Packed`) whose tensors are on x's device."""
    import triton

    if precision not in ("ieee", "tf32"):
        raise ValueError(f"precision must be 'ieee' or 'tf32', not {precision!r}")
    x = x.detach().to(torch.float32).contiguous()
    b, cols = x.shape
    if cols != p.cols:
        raise ValueError(f"input has {cols} features, the matrix {p.cols}")
    for name in ("idx", "tables"):
        t = getattr(p, name)
        if t.device != x.device:
            raise ValueError(f"the packed {name} is on {t.device}, the input on {x.device}")
    y = torch.empty(b, p.rows, dtype=torch.float32, device=x.device)
    if b == 0 or p.rows == 0:
        return y
    idx, tables = p.idx.contiguous(), p.tables.contiguous()
    block_b = 1 if b == 1 else 16
    block_r = 64 if b == 1 else 32
    grid = (triton.cdiv(p.rows, block_r), triton.cdiv(b, block_b))
    _kernel()[grid](
        x, idx, tables, y, b, p.rows, cols, idx.shape[1], tables.shape[1], p.groups,
        p.group_size or cols, BITS=p.bits, BLOCK_R=block_r, BLOCK_B=block_b, BLOCK_C=BLOCK_C,
        IEEE=precision == "ieee",
    )  # fmt: skip
    return y
