"""`LutLinear`: a Linear layer whose weight is packed indices and per-row lookup tables
(:class:`pipeline.runtime.transcode.Packed`), computed by the lookup-table kernels."""

from __future__ import annotations

import torch
from torch import nn

from .kernels import bind
from .transcode import Packed

__all__ = ["LutLinear", "MODES"]

# mode -> kernel path: "reference" is fp32 levels and activations (the decoded model's
# products up to float32 summation order); "fast" int8 levels and activations.
MODES = {"reference": "ref", "fast": "q8"}


class LutLinear(nn.Module):
    """y = x Ŵᵀ + bias with Ŵ[r, c] = tables[r * groups + c // group_size][idx[r, c]].

    Buffers: ``idx`` uint8 [out, stride] (2-, 3-, 4- or 8-bit packed indices), ``tables``
    float32 [out * groups, 16 or 256], below 8 bits ``tq`` int8 [out * groups, 16] and
    ``ts`` float32 [out * groups] (the fast path's int8 levels and scales); parameter
    ``bias`` float32 [out] or None. Inputs [*, in] of any float dtype; outputs [*, out] in the input's dtype.

    Args:
        packed: the transcoded weight.
        bias: optional [out] tensor.
        mode: "fast" or "reference" (see MODES).
        threads: kernel threads (None: torch.get_num_threads()).
    """

    def __init__(
        self,
        packed: Packed,
        bias: torch.Tensor | None = None,
        *,
        mode: str = "fast",
        threads: int | None = None,
    ):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.in_features, self.out_features = packed.cols, packed.rows
        self.bits, self.group_size, self.levels = packed.bits, packed.group_size, packed.levels
        self.mode, self.threads = mode, threads
        self.register_buffer("idx", packed.idx, persistent=False)
        self.register_buffer("tables", packed.tables, persistent=False)
        self.register_buffer("tq", packed.tq, persistent=False)
        self.register_buffer("ts", packed.ts, persistent=False)
        self.bias = (
            None
            if bias is None
            else nn.Parameter(bias.detach().to(torch.float32), requires_grad=False)
        )
        self._call, self._bound = None, None  # the kernel call bound at the first forward

    def packed(self) -> Packed:
        return Packed(
            self.out_features,
            self.in_features,
            self.bits,
            self.group_size,
            self.idx,
            self.tables,
            self.tq,
            self.ts,
            self.levels,
        )

    def dense_weight(self) -> torch.Tensor:
        """Ŵ float32 [out, in] (the reference levels), decoded on demand; the forward pass
        never builds it."""
        return self.packed().dense_rows(0, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._bound != (self.mode, self.threads):  # first call, or mode/threads changed
            self._call = bind(self.packed(), path=MODES[self.mode], threads=self.threads)
            self._bound = (self.mode, self.threads)
        lead = x.shape[:-1]
        y = self._call(x.reshape(-1, x.shape[-1]))
        if self.bias is not None:
            y += self.bias
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bits={self.bits}, levels={self.levels}, group_size={self.group_size}, "
            f"mode={self.mode}, bias={self.bias is not None}"
        )
