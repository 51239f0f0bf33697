"""Run a .hwq file: packed indices and per-row lookup tables in place of dense weights
(docs/RUNTIME.md). `load(path)` returns (model, tokenizer)."""

from __future__ import annotations

__all__ = ["load"]


def load(
    path: str,
    *,
    mode: str = "fast",
    threads: int | None = None,
    storage_options: dict | None = None,
    hf_folder: str | None = None,
    fuse_siblings: bool = True,
    device: str | None = None,
    cache=True,
):
    """See :func:`pipeline.runtime.loader.load`."""
    from .loader import load as _load

    return _load(
        path,
        mode=mode,
        threads=threads,
        storage_options=storage_options,
        hf_folder=hf_folder,
        fuse_siblings=fuse_siblings,
        device=device,
        cache=cache,
    )
