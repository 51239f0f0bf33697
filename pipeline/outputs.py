"""Stable outputs: the run's final `.hwq` (and the decoded model folder) copied to a path the
user chose, `hwq run ... --out DIR_OR_URL [--hf-out]`.

Stage folders are named by their keys and change with every setting; a scheduled job or a
serving system wants one path that always holds the newest result. `publish` copies

    DIR/model.hwq        the encode stage's file (its sha256 checked against the manifest)
    DIR/hf/...           language models: the config and tokenizer files, which `hwq generate`
                         and `hwq serve` read beside the file; with hf_out, the decoded model
                         as a whole Hugging Face folder
    DIR/output.json      written last: sha256 and size of each file, the run and stage key

Each file is written atomically; output.json is removed first and written last, so it says
the folder is complete, and the run's `run.json` records where the outputs went (`hwq status`
prints it). A local `hf/` is written beside the old one and swapped in (on S3, files an earlier
publish wrote and this one did not are deleted): no stale file of an earlier model stays. The
destination is checked before any stage runs (a folder that can be made and written; on S3,
the credentials and the bucket).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import uuid
from typing import Any

from pipeline.config import ConfigError, RunConfig
from pipeline.store import StageDir, Store, StoreAccessError, not_a_folder, sha256_bytes

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
    if "://" not in out:
        try:
            os.makedirs(out, exist_ok=True)
        except OSError as e:  # a folder inside a file, /dev/null
            raise ConfigError(not_a_folder(out, e, "--out")) from None
    dest = _dest(cfg, out)
    try:
        dest.check_access()  # writable; on S3, the credentials and the bucket
    except StoreAccessError as e:
        raise StoreAccessError(f"--out: {e}") from None
    for name in ("model.hwq", OUTPUT_INDEX):
        if dest.is_local and os.path.isdir(dest.path(name)):
            raise ConfigError(f"--out: {dest.path(name)} is a folder, where publishing writes "
                              "a file; remove it or choose another --out")


def _dest(cfg: RunConfig, out: str) -> Store:
    return Store(out, cfg.store.storage_options(out))


def publish(cfg: RunConfig, store: Store, encode: StageDir, *, out: str,
            hf_out: bool = False) -> dict[str, Any]:
    """Copy the encode stage's outputs to `out`; returns what output.json holds."""
    dest = _dest(cfg, out)
    dest.remove(OUTPUT_INDEX)  # the folder is incomplete until the new index is written
    data = encode.read_bytes("model.hwq")  # checked against the manifest's sha256
    files = {"model.hwq": {"sha256": dest.write_bytes("model.hwq", data), "bytes": len(data)}}
    hf = _hf_sources(encode)
    if hf_out:
        files.update(_publish_hf(hf, dest, data))
    elif hf:
        files.update(_write_folder(dest, "hf", hf))
    index = {"source": store.full_url(encode.rel("model.hwq")), "stage_key": encode.key,
             "config": cfg.name, "files": files}
    dest.write_json(OUTPUT_INDEX, index)
    return {"url": dest.full_url(""), **index}


def _hf_sources(encode: StageDir) -> dict[str, bytes]:
    """The config and tokenizer files the encode stage wrote to hf/ ({} for other models)."""
    from pipeline.encode.cli import _HF_FILES

    return {n: encode.read_bytes(f"hf/{n}") for n in _HF_FILES
            if encode.outputs is None or f"hf/{n}" in encode.outputs}


def _publish_hf(hf: dict[str, bytes], dest: Store, data: bytes) -> dict[str, dict[str, Any]]:
    """Decode `data` into a Hugging Face folder (the `hwq decode --hf-out` code) and copy it
    to dest/hf/."""
    from pipeline.encode.cli import _decode_hf

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
        made = {}
        for n in sorted(os.listdir(args.hf_out)):
            with open(os.path.join(args.hf_out, n), "rb") as f:
                made[n] = f.read()
        return _write_folder(dest, "hf", made)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_folder(dest: Store, name: str, content: dict[str, bytes]) -> dict[str, dict[str, Any]]:
    """dest/`name`/ holding exactly `content` ({file: bytes}); returns {name/file: {sha256,
    bytes}}. Locally: written beside the old folder and swapped in. On S3 (no folders to
    rename): written over it, then what the old one had and this one has not is deleted."""
    staging = f"{name}.tmp-{uuid.uuid4().hex[:8]}" if dest.is_local else name
    files = {}
    try:
        for n, b in content.items():
            dest.write_bytes(f"{staging}/{n}", b)
            files[f"{name}/{n}"] = {"sha256": sha256_bytes(b), "bytes": len(b)}
        if dest.is_local:
            _swap_in(dest, staging, name)
        else:
            for stale in set(dest.list(name)) - {f.removeprefix(f"{name}/") for f in files}:
                dest.remove(f"{name}/{stale}")
    finally:
        if staging != name:
            dest.remove(staging)
    return files


def _swap_in(dest: Store, staging: str, name: str) -> None:
    """Replace the local folder `name` of `dest` by `staging` (two renames: `name` is missing
    only between them, and never holds a mix of old and new files)."""
    final = dest.path(name)
    old = f"{name}.tmp-old-{uuid.uuid4().hex[:8]}"
    if os.path.lexists(final):
        os.rename(final, dest.path(old))
    os.rename(dest.path(staging), final)
    dest.remove(old)  # a link is removed, not followed
