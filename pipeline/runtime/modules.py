"""`LutLinear`: a Linear layer whose weight is packed indices and per-row lookup tables
(:class:`pipeline.runtime.transcode.Packed`), computed by the lookup-table kernels;
`LutEmbedding`: an embedding whose rows are looked up from the same layout; `fuse`: sibling
LutLinears that read the same input (q/k/v, gate/up) computed by one kernel call."""

from __future__ import annotations

import threading

import torch
from torch import nn

from ..encode import rotation
from .kernels import bind
from .transcode import Packed

__all__ = ["BACKENDS", "FUSE", "HalfEmbedding", "LutEmbedding", "LutLinear", "MODES", "fuse"]

# mode -> kernel path: "reference" is fp32 levels and activations (the decoded model's
# products up to float32 summation order); "fast" int8 levels and activations.
MODES = {"reference": "ref", "fast": "q8"}
BACKENDS = ("auto", "cpu", "triton")


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
        rotate: the seed of the input-side rotation the weight was quantized in
            (`quantize.rotate`): the packed levels are of Ŵ·Vᵀ, so the input is rotated
            (x → V·x, O(in·log in) a token) instead of the weight; None: no rotation.
        backend: "auto" (the Triton kernel for an input on a CUDA device, the CPU kernels
            otherwise), "cpu" or "triton" (`pipeline.runtime.triton_lut`; with
            TRITON_INTERPRET=1 it runs on CPU tensors too, which is how it is tested).
    """

    def __init__(
        self,
        packed: Packed,
        bias: torch.Tensor | None = None,
        *,
        mode: str = "fast",
        threads: int | None = None,
        rotate: int | None = None,
        backend: str = "auto",
    ):
        super().__init__()
        self.rotate = rotate
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self.backend = backend
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
        self._group: _Group | None = None  # set by fuse(): computed with its siblings

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
        w = self.packed().dense_rows(0, self.out_features)
        return w if self.rotate is None else rotation.inverse(w, self.rotate)

    def _triton(self, x: torch.Tensor) -> bool:
        return self.backend == "triton" or (self.backend == "auto" and x.is_cuda)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # a fused group's concatenation stays on the CPU: the Triton path runs alone
        if self._group is not None and not self._triton(x) and self._group.usable(self):
            y = self._group.output(self, x)
            if self.bias is not None:
                y = y + self.bias
            return y.to(x.dtype)
        lead = x.shape[:-1]
        xr = x if self.rotate is None else rotation.forward(x.to(torch.float32), self.rotate)
        y = self._product(xr.reshape(-1, x.shape[-1]))
        if self.bias is not None:
            y += self.bias
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def _product(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 [n, in] (rotated) times Ŵᵀ: the Triton kernel on the module's own buffers
        (wherever `.to(device)` put them) for a CUDA input or backend "triton", else the CPU
        kernels."""
        if self._triton(x2):
            from .triton_lut import lut_matmul_triton

            precision = "ieee" if self.mode == "reference" else "tf32"
            return lut_matmul_triton(x2, self.packed(), precision=precision)
        if self._bound != (self.mode, self.threads):  # first call, or mode/threads changed
            self._call = bind(self.packed(), path=MODES[self.mode], threads=self.threads)
            self._bound = (self.mode, self.threads)
        return self._call(x2)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bits={self.bits}, levels={self.levels}, group_size={self.group_size}, "
            f"mode={self.mode}, bias={self.bias is not None}"
        )


def _gather_rows(p: Packed, ids: torch.Tensor) -> Packed:
    """The rows ``ids`` (int64 [n]) of ``p`` as a Packed of n rows (indices and tables are
    gathered, never unpacked beyond them)."""
    g = p.groups
    tables = p.tables.view(p.rows, g, -1)[ids].reshape(ids.numel() * g, -1)
    return Packed(ids.numel(), p.cols, p.bits, p.group_size, p.idx[ids], tables, None, None,
                  p.levels)  # fmt: skip


class LutEmbedding(nn.Module):
    """An embedding whose [num, dim] table is a :class:`Packed` matrix: a lookup unpacks only
    the looked-up rows (the reference levels, float32), so a quantized embedding costs its
    packed bytes in memory instead of num × dim floats. ``packed`` may be shared with a tied
    head's LutLinear. Inputs: integer ids of any shape; outputs [*ids.shape, dim] float32."""

    def __init__(self, packed: Packed, padding_idx: int | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = packed.rows, packed.cols
        self.padding_idx = padding_idx
        self.bits, self.levels = packed.bits, packed.levels
        self.register_buffer("idx", packed.idx, persistent=False)
        self.register_buffer("tables", packed.tables, persistent=False)
        self._packed = packed

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # The rows are unpacked on the CPU from the packed copy made at load (a lookup reads
        # a few rows); on a CUDA model they are moved to the ids' device.
        flat = ids.reshape(-1).to(torch.int64).cpu()
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.num_embeddings):
            raise IndexError(f"token id out of range for an embedding of {self.num_embeddings}")
        rows = _gather_rows(self._packed, flat).dense_rows(0, flat.numel())
        return rows.reshape(*ids.shape, self.embedding_dim).to(ids.device)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, "
                f"levels={self.levels}")  # fmt: skip


class HalfEmbedding(nn.Module):
    """An unquantized embedding kept at its stored 16-bit dtype; lookups return float32 (the
    rest of the runtime's model), exactly the float32 copy's rows."""

    def __init__(self, weight: torch.Tensor, padding_idx: int | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        self.padding_idx = padding_idx
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(ids, self.weight, self.padding_idx).float()

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, dtype={self.weight.dtype}"


# Sibling Linears that read the same input in the architectures transformers ships (Llama,
# Mistral, Qwen, Gemma, Phi-3 and kin: q/k/v and gate/up; BERT-like: query/key/value).
FUSE = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("query", "key", "value"),
        ("w1", "w3"))  # fmt: skip


class _Group:
    """LutLinears computed by one kernel call over their concatenated rows. A member called
    with an input computes every member's output for it; the others, called with the same
    input object (same version), take their slices. A member called with any other input, or
    a second time, starts a new call (always right; a model that fed siblings different
    inputs would pay for the unused rows)."""

    def __init__(self, members: list[LutLinear]):
        p0 = members[0].packed()
        parts = [m.packed() for m in members]
        cat = Packed(
            sum(p.rows for p in parts), p0.cols, p0.bits, p0.group_size,
            torch.cat([p.idx for p in parts]), torch.cat([p.tables for p in parts]),
            None if p0.tq is None else torch.cat([p.tq for p in parts]),
            None if p0.ts is None else torch.cat([p.ts for p in parts]),
            max(p.levels for p in parts),
        )  # fmt: skip
        self.call = bind(cat, path=MODES[members[0].mode], threads=members[0].threads)
        self.key = (members[0].mode, members[0].threads)
        self.rotate = members[0].rotate  # fuse() groups only members of one rotation
        self.slot, r0 = {}, 0
        tg = cat.tables.shape[0] // cat.rows
        for m in members:  # members' buffers become views of the concatenation (one copy)
            n = m.out_features
            self.slot[id(m)] = (r0, r0 + n)
            m.idx = cat.idx[r0 : r0 + n]
            m.tables = cat.tables[r0 * tg : (r0 + n) * tg]
            if cat.tq is not None:
                m.tq, m.ts = cat.tq[r0 * tg : (r0 + n) * tg], cat.ts[r0 * tg : (r0 + n) * tg]
            m._group, m._bound = self, None
            r0 += n
        # Per thread (hwq serve generates on several): the last input, its outputs and the
        # members that have not taken theirs.
        self._state = threading.local()

    def usable(self, m: LutLinear) -> bool:
        return (m.mode, m.threads) == self.key

    def output(self, m: LutLinear, x: torch.Tensor) -> torch.Tensor:
        k, st = id(m), self._state
        if not (getattr(st, "x", None) is x and st.version == _version(x) and k in st.left):
            lead = x.shape[:-1]
            xr = x if self.rotate is None else rotation.forward(x.to(torch.float32),
                                                                 self.rotate)
            y = self.call(xr.reshape(-1, x.shape[-1]))
            st.x, st.version, st.left = x, _version(x), set(self.slot)
            st.y = y.reshape(*lead, y.shape[-1])
        r0, r1 = self.slot[k]
        out = st.y[..., r0:r1].contiguous()
        st.left.discard(k)
        if not st.left:  # every member served: drop the input and the outputs
            st.x = st.y = None
        return out


def _version(x: torch.Tensor) -> int | None:
    """x's in-place version counter; None for an inference-mode tensor (it has none: the
    group then relies on the object alone, and transformers never writes into q/k/v's or
    gate/up's input between their calls)."""
    return None if x.is_inference() else x._version


def fuse(model: nn.Module) -> int:
    """Group the LutLinear siblings named in FUSE that read the same input and can share a
    kernel call (same input width, bits, tables per row, mode, threads and rotation); returns how many
    groups were made."""
    made = 0
    for parent in model.modules():
        for names in FUSE:
            ms = [getattr(parent, n, None) for n in names]
            if not all(isinstance(m, LutLinear) and m._group is None for m in ms):
                continue
            ps = [m.packed() for m in ms]
            if len({(p.cols, p.bits, p.group_size, p.tables.shape[1], p.tq is None,
                     m.mode, m.threads, m.rotate)
                    for p, m in zip(ps, ms, strict=True)}) != 1:  # fmt: skip
                continue
            _Group(ms)
            made += 1
    return made
