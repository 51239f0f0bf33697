"""A tiny Llama written straight to a .hwq file (no pipeline run): per-row, shared, group and
pruned codebooks, one 8-bit tensor, a quantized embedding, and the `hf/` folder beside it, as
the encode stage lays it out. For the runtime's tests and benchmarks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

__all__ = ["tiny_llama_hwq"]


def _levels(w: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-row quantile levels [rows, k] and the nearest level's index [rows, cols]."""
    q = np.quantile(w, (np.arange(k) + 0.5) / k, axis=1).T.astype(np.float32)
    codes = np.abs(w[:, :, None] - q[:, None, :]).argmin(axis=2)
    return q, codes


def tiny_llama_hwq(
    folder: str | Path,
    *,
    tied: bool = False,
    seed: int = 0,
    hidden: int = 64,
    style: str | None = None,
    raw_embedding: bool = False,
) -> Path:
    """Write `folder`/model.hwq and `folder`/hf/ for a random tiny Llama; returns the file.
    Its 2-D tensors cycle through five codings (per-channel, pruned, per-group, one shared
    codebook, 40 levels a row), or all take `style` (one of those names: channel, pruned,
    group, shared, wide). raw_embedding: the token embedding stored unquantized, bfloat16."""
    from pipeline.encode.container import TensorEntry, write_hwq

    from .models import tiny_llama, tiny_tokenizer

    folder = Path(folder)
    (folder / "hf").mkdir(parents=True, exist_ok=True)
    model = tiny_llama(seed=seed, hidden=hidden, tie_word_embeddings=tied)
    model.config.save_pretrained(folder / "hf")
    tiny_tokenizer().save_pretrained(folder / "hf")
    rng = np.random.default_rng(seed)
    entries, cbs = [], {}
    net_k = 16
    shared = np.sort(rng.normal(scale=0.02, size=net_k)).astype(np.float32)
    cbs["net"] = shared
    for i, (name, t) in enumerate(model.state_dict().items()):
        w = t.detach().float().numpy()
        if name == "lm_head.weight" and tied:
            continue
        if w.ndim != 2:
            entries.append(TensorEntry.raw_tensor(name, w))
            continue
        if raw_embedding and name == "model.embed_tokens.weight":
            bits = t.detach().to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            entries.append(TensorEntry.raw_tensor(name, bits, "bfloat16"))
            continue
        kind = style or ["channel", "pruned", "group", "shared", "wide"][i % 5]
        if name == "model.embed_tokens.weight" and style is None:
            kind = "channel"  # a quantized tensor that is not a Linear's weight
        if kind == "shared":
            codes = np.abs(w.reshape(-1, 1) - shared[None, :]).argmin(axis=1)
            entries.append(TensorEntry.quantized(name, w.shape, codes, "net"))
            continue
        if kind == "group":  # two codebooks a row, each over half the columns
            g = w.reshape(w.shape[0] * 2, -1)
            cb, codes = _levels(g, 8)
        else:
            cb, codes = _levels(w, 40 if kind == "wide" else 15 if kind == "pruned" else 16)
        cbs[name] = cb
        mask = None
        if kind == "pruned":
            mask = rng.random(w.shape) > 0.3
            codes = codes.reshape(-1)[mask.reshape(-1)]
        entries.append(TensorEntry.quantized(name, w.shape, codes.reshape(-1), name, mask=mask))
    path = folder / "model.hwq"
    write_hwq(path, entries, cbs)
    return path
