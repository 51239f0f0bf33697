"""Stable outputs: the run's final `.hwq` (and the decoded model folder) copied to a path the
user chose, `hwq run ... --out DIR_OR_URL [--hf-out]`.

Stage folders are named by their keys and change with every setting; a scheduled job or a
serving system wants one path that always holds the newest result. `publish` copies

    DIR/model.hwq        the encode stage's file (its sha256 checked against the manifest)
    DIR/hf/...           with hf_out: the decoded model as a Hugging Face folder (LMs only)
    DIR/output.json      written last: sha256 and size of each file, the run and stage key

Each file is written atomically; output.json, written last, says the folder is complete, and
the run's `run.json` records where the outputs went (`hwq status` prints it).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from typing import Any

from pipeline.config import ConfigError, RunConfig
from pipeline.store import StageDir, Store, sha256_bytes

__all__ = ["publish", "check_publishable", "OUTPUT_INDEX"]

OUTPUT_INDEX = "output.json"


def check_publishable(cfg: RunConfig, out: str | None, hf_out: bool) -> None:
    """Refuse, before any stage runs, an output request the run cannot meet."""
    if hf_out and out is None:
        raise ConfigError("--hf-out needs --out DIR_OR_URL: the folder it writes hf/ into")
    if out is None:
        return
    if not cfg.encode.enabled:
        raise ConfigError("--out copies the encoded .hwq file, and encode.enabled is false")
    if hf_out and cfg.model.trained_here:
        raise ConfigError("--hf-out writes a Hugging Face model folder: only for language "
                          f"models loaded from a checkpoint, not {cfg.model.name}")


def _dest(cfg: RunConfig, out: str) -> Store:
    return Store(out, cfg.store.storage_options(out))


def publish(cfg: RunConfig, store: Store, encode: StageDir, *, out: str,
            hf_out: bool = False) -> dict[str, Any]:
    """Copy the encode stage's outputs to `out`; returns what output.json holds."""
    dest = _dest(cfg, out)
    data = encode.read_bytes("model.hwq")  # checked against the manifest's sha256
    files = {"model.hwq": {"sha256": dest.write_bytes("model.hwq", data), "bytes": len(data)}}
    if hf_out:
        files.update(_publish_hf(encode, dest, data))
    index = {"source": store.full_url(encode.rel("model.hwq")), "stage_key": encode.key,
             "config": cfg.name, "files": files}
    dest.write_json(OUTPUT_INDEX, index)
    return {"url": dest.full_url(""), **index}


def _publish_hf(encode: StageDir, dest: Store, data: bytes) -> dict[str, dict[str, Any]]:
    """Decode `data` into a Hugging Face folder (the `hwq decode --hf-out` code) and copy it
    to dest/hf/."""
    from pipeline.encode.cli import _HF_FILES, _decode_hf

    hf = {n: encode.read_bytes(f"hf/{n}") for n in _HF_FILES
          if encode.outputs is None or f"hf/{n}" in encode.outputs}
    if "config.json" not in hf:
        raise ConfigError("--hf-out: the encode stage holds no hf/config.json (not a Hugging "
                          "Face model)")
    tmp = tempfile.mkdtemp(prefix="hwq-publish-")
    try:
        src = os.path.join(tmp, "model.hwq")
        with open(src, "wb") as f:
            f.write(data)
        os.mkdir(os.path.join(tmp, "files"))
        for n, b in hf.items():
            with open(os.path.join(tmp, "files", n), "wb") as f:
                f.write(b)
        args = argparse.Namespace(file=src, hf_out=os.path.join(tmp, "hf"),
                                  hf_files=os.path.join(tmp, "files"), endpoint_url=None,
                                  max_output_bytes=None, max_header_bytes=None)
        _decode_hf(args)
        files = {}
        for n in sorted(os.listdir(args.hf_out)):
            with open(os.path.join(args.hf_out, n), "rb") as f:
                b = f.read()
            dest.write_bytes(f"hf/{n}", b)
            files[f"hf/{n}"] = {"sha256": sha256_bytes(b), "bytes": len(b)}
        return files
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
