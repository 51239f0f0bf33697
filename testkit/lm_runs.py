"""Driver runs of a tiny sharded bf16 Llama folder, for tests: the config, and the stage
folders a run wrote."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .models import tiny_sharded_bf16_folder, write_corpus

__all__ = ["lm_folder", "lm_run_config", "stage_dir"]


def lm_folder(root: Path, layers: int = 2, corpus_lines: int = 300) -> Path:
    """root/model (a sharded bf16 Llama of `layers` blocks) and root/corpus.txt."""
    path = tiny_sharded_bf16_folder(root / "model", layers=layers)
    write_corpus(root / "corpus.txt", lines=corpus_lines)
    return path


def lm_run_config(folder: Path, store: Path, base: dict[str, Any] | None = None,
                  **over: dict[str, Any]):
    """A RunConfig for `folder` (from `lm_folder`) storing in `store`: Fisher over 6 windows of
    16 tokens, ECSQ at 3 bits, the embeddings kept; `base` then `over` update sections."""
    from pipeline.config import RunConfig

    d: dict[str, Any] = {
        "name": "t", "model": {"name": "hf_causal_lm", "path": str(folder),
                               "residency": "streamed"},
        "data": {"name": "text", "calibration": [str(folder.parent / "corpus.txt")],
                 "calibration_windows": 6, "seq_len": 16},
        "hessian": {"estimator": "fisher", "partitions": 2, "groups": 1},
        "quantize": {"method": "ecsq", "target_bits": 3.0, "embeddings": "keep"},
        "store": {"url": str(store)}}
    for sections in (base or {}, over):
        for k, v in sections.items():
            d[k] = {**d.get(k, {}), **v} if isinstance(v, dict) else v
    return RunConfig.model_validate(d)


def stage_dir(store: Path, name: str) -> Path:
    """The one folder of stage `name` in a local store."""
    (d,) = (Path(store) / "stages").glob(f"{name}-*")
    return d
