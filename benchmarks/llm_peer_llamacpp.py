"""llama.cpp's k- and i-quants with an importance matrix: a peer of hwq in the LLM benchmark.

llama.cpp quantizes a GGUF file tensor by tensor. Given an *importance matrix* (for each
Linear, the mean over calibration tokens of each input column's squared activation), its
quantizers minimise Σ imatrix_j · (w_j − ŵ_j)² instead of the plain squared error; that is
how its users run the low-bit types. This module does what `llama-imatrix` + `llama-quantize
--imatrix` do, with two differences that make the row comparable with the others:

- the importance matrix is accumulated here, in PyTorch, over the benchmark's own calibration
  windows (the same token windows every other row sees), as llama-imatrix accumulates it: the
  sum of x² per input column over every token a Linear saw, divided by their count;
- the quantizer is llama.cpp's own, called through the `llama-cpp-python` package (which
  builds llama.cpp from source with the machine's compiler): `llama_model_quantize` with
  that matrix in its `imatrix` parameter, on the model's own GGUF file (its tensors are
  dequantized to float32 and quantized again, as `--allow-requantize` does: the float32
  values are exactly the unquantized model's).

The token embedding (and an untied output matrix) is written as F32 so that, as in the other
rows, only the decoder Linears are quantized; norms stay F32 in every GGUF.

llama.cpp picks each tensor's type from the requested file type (Q4_K_M, for one, spends
Q6_K on some attn_v and ffn_down), and a K- or i-quant block spans 256 weights of a row: a
row whose length is not a multiple of 256 (SmolLM2's 576-wide q/k/v/o/gate/up rows) falls
back to a 32-weight block type (measured there: Q4_0 for Q2_K and Q3_K, IQ4_NL for IQ3_XXS,
Q5_0 for Q4_K). The summary counts the types that were written and the bits they cost, from
the file.
"""

from __future__ import annotations

import ctypes
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from llm_peer_methods import resolve_linears
from torch import nn

__all__ = ["FILE_TYPES", "importance_matrix", "gguf_names", "quantize_gguf", "llamacpp"]

# The file types offered: llama.cpp's names (llama_ftype LLAMA_FTYPE_MOSTLY_<name>).
FILE_TYPES = ("Q2_K", "Q3_K_S", "IQ3_XXS", "Q3_K_M", "Q4_K_M", "IQ4_NL", "Q4_0")
_F32 = 0  # ggml_type GGML_TYPE_F32


@torch.no_grad()
def importance_matrix(model: nn.Module, names: list[str], calib_windows: torch.Tensor,
                      batch: int = 4) -> dict[str, np.ndarray]:
    """{Linear parameter name: float32 [in_features]}: the mean over every calibration token
    of each input column's squared activation (float64 sums), as llama-imatrix stores it."""
    calib = torch.as_tensor(calib_windows)
    if calib.ndim != 2:
        raise ValueError("calib_windows must be [n, seq_len] token ids")
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []

    def hook(key):
        def pre(mod, args):
            x = args[0].detach().reshape(-1, mod.in_features).double()
            sums[key] = sums.get(key, 0) + (x * x).sum(dim=0)
            counts[key] = counts.get(key, 0) + x.shape[0]
        return pre

    for mname, mod in resolve_linears(model, names):
        hooks.append(mod.register_forward_pre_hook(hook(f"{mname}.weight")))
    try:
        for a in range(0, calib.shape[0], batch):
            model(calib[a:a + batch])
    finally:
        for h in hooks:
            h.remove()
    missing = [n for n, _ in resolve_linears(model, names) if f"{n}.weight" not in sums]
    if missing:
        raise RuntimeError(f"the calibration forward never reached {missing[:3]}")
    return {k: (sums[k] / counts[k]).float().numpy() for k in sums}


def gguf_names(gguf_path: str | Path, model: nn.Module) -> dict[str, str]:
    """{transformers parameter name: GGUF tensor name} for every tensor of the GGUF file that
    the model has a place for (transformers' own GGUF name map)."""
    from gguf import GGUFReader
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
        read_field,
    )

    parsed = load_gguf_checkpoint(str(gguf_path), return_tensors=False)
    arch = read_field(GGUFReader(str(gguf_path)), "general.architecture")[0]
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=parsed["config"])
    return {hf: g for g, hf in get_gguf_hf_weights_map(model, processor).items()}


def quantize_gguf(src: str | Path, dst: str | Path, file_type: str,
                  imatrix: dict[str, np.ndarray], threads: int = 2) -> None:
    """llama.cpp's `llama_model_quantize` of the GGUF `src` into `dst` at `file_type` (one of
    FILE_TYPES), with the importance matrix `imatrix` ({GGUF tensor name: float32 [in]}),
    token embedding and output matrix as F32."""
    import llama_cpp

    if file_type not in FILE_TYPES:
        raise ValueError(f"file type {file_type!r}: one of {', '.join(FILE_TYPES)}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = threads
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{file_type}")
    params.allow_requantize = True  # the source is a quantized GGUF: dequantized, then this
    params.token_embedding_type = _F32
    params.output_tensor_type = _F32
    keep = [np.ascontiguousarray(v, dtype=np.float32) for v in imatrix.values()]
    entries = (llama_cpp.llama_model_imatrix_data * (len(keep) + 1))()
    for e, name, v in zip(entries, imatrix, keep, strict=False):
        e.name = name.encode()
        e.data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        e.size = v.size
    entries[len(keep)].name = None  # the terminator llama.cpp looks for
    params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(),
                                        ctypes.byref(params))
    if rc != 0 or not Path(dst).is_file():
        raise RuntimeError(f"llama_model_quantize to {file_type} failed (return code {rc})")


def _file_tensors(path: str | Path) -> dict[str, tuple[str, int, int]]:
    """{GGUF tensor name: (ggml type name, bytes, elements)} of a GGUF file."""
    from gguf import GGUFReader

    return {t.name: (t.tensor_type.name, int(t.n_bytes), int(t.n_elements))
            for t in GGUFReader(str(path)).tensors}


@torch.no_grad()
def _load_linears(model: nn.Module, names: list[str], path: Path) -> None:
    """The Linears `names` of `model` set to the dequantized weights of the GGUF `path`
    (transformers' GGUF loader: gguf's dequantizers, q/k rows put back in its order)."""
    from transformers import AutoModelForCausalLM

    q = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                             dtype=torch.float32)
    qs = dict(q.named_parameters())
    for mname, mod in resolve_linears(model, names):
        w = qs[f"{mname}.weight"]
        if w.shape != mod.weight.shape:
            raise RuntimeError(f"{mname}: {tuple(w.shape)} in the GGUF, "
                               f"{tuple(mod.weight.shape)} in the model")
        mod.weight.data.copy_(w.to(mod.weight.dtype))
    del q


def llamacpp(model: nn.Module, names: list[str], file_type: str, gguf_path: str | Path,
             imatrix: dict[str, np.ndarray], threads: int = 2,
             workdir: str | Path | None = None) -> dict:
    """Quantize the model's GGUF `gguf_path` with llama.cpp at `file_type` with the
    importance matrix `imatrix` ({Linear parameter name: [in]}, from importance_matrix), and
    set the Linears `names` of `model` (the same model, in float32) to its dequantized
    weights. Returns the summary of llm_peer_methods, with bits counted from the file: the
    decoder Linears' bytes over their weights, and the whole file's over every weight."""
    to_gguf = gguf_names(gguf_path, model)
    linears = [f"{m}.weight" for m, _ in resolve_linears(model, names)]
    absent = [n for n in linears if n not in to_gguf]
    if absent:
        raise KeyError(f"no GGUF tensor for {absent[:3]}")
    mat = {to_gguf[n]: imatrix[n] for n in linears}
    with tempfile.TemporaryDirectory(prefix="hwq_llamacpp_", dir=workdir) as tmp:
        out = Path(tmp) / f"model-{file_type}.gguf"
        quantize_gguf(gguf_path, out, file_type, mat, threads)
        tensors = _file_tensors(out)
        file_bytes = out.stat().st_size
        _load_linears(model, names, out)
    mine = [tensors[to_gguf[n]] for n in linears]
    params = sum(e for _, _, e in mine)
    code_bits = sum(8 * b for _, b, _ in mine)
    kinds = Counter(t for t, _, _ in mine)
    all_params = sum(e for _, _, e in tensors.values())
    shapes = {n: p.shape for n, p in model.named_parameters()}
    ragged = sorted({int(shapes[n][1]) for n in linears if shapes[n][1] % 256})
    note = ("llama.cpp llama_model_quantize with an importance matrix from the calibration "
            "windows; Linears stored as " + ", ".join(f"{k}×{v}" for k, v in kinds.most_common())
            + f"; whole file {8 * file_bytes / all_params:.3f} bits/weight (embedding F32)")
    if ragged:
        note += (f"; rows of {ragged} weights are not a multiple of the 256-weight K/i-quant "
                 "block and take llama.cpp's 32-weight fallback type")
    return {"method": "llamacpp", "bits": file_type, "group": 0,
            "bits_per_weight": code_bits / params, "side_bits": 0, "code_bits": int(code_bits),
            "quantized_params": int(params), "file_bits_per_weight": 8 * file_bytes / all_params,
            "tensor_types": dict(kinds), "note": note}
