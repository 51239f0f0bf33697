"""Driver runs of a tiny sharded bf16 Llama folder, for tests: the config, and the stage
folders a run wrote."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .models import tiny_sharded_bf16_folder, write_corpus

__all__ = ["decoded_model", "lm_folder", "lm_run_config", "stage_dir"]


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


def decoded_model(encode_dir: Path):
    """(a float32 transformers model of the encode stage's `hf/` config, its state dict):
    the weights `model.hwq` in `encode_dir` decodes to (bf16 widened), head tied as the
    config says. Change entries of the dict and load it again to compare variants."""
    import numpy as np
    import torch
    import transformers

    from pipeline.encode.container import read_hwq

    hf = Path(encode_dir) / "hf"
    dense = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.from_pretrained(hf), torch_dtype=torch.float32)
    sd = {}
    for n, a in read_hwq(str(Path(encode_dir) / "model.hwq")).items():
        a = np.asarray(a)
        sd[n] = (torch.from_numpy(a.view(np.int16)).view(torch.bfloat16).float()
                 if a.dtype == np.uint16 else torch.from_numpy(a).float())
    dense.load_state_dict(sd, strict=False)
    dense.tie_weights()
    return dense, sd
