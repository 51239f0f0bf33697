"""Relative paths in a run config mean "beside the config file", wherever hwq is started.

A config names files (a checkpoint, a model folder, texts, the image data folder). Read
relative to the working folder, the same config would mean other files when started from
elsewhere, and a Ray worker or a Train worker on another node (with another working folder)
would not find them at all. So `load_config` makes every relative path in those fields
absolute against the config file's folder when it reads the file, and `--set` values against
the working folder; the `config.yaml` stored with a run records the absolute paths.
URLs (`s3://…`, `file://…`), absolute paths, `~` paths and placeholders (`{stdlib}/*.py`,
`{package:NAME}/…`) are left as they are. `store.url` is where a run writes, not an input: it
stays relative to the working folder, as documented for `hwq run`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["PATH_FIELDS", "resolve_paths"]

# (section, key): the fields that name input files or folders. A value may be a string, a
# list of strings (data.calibration) or a mapping of names to either (data.eval).
PATH_FIELDS = (("model", "path"), ("model", "checkpoint"), ("model", "tokenizer"),
               ("data", "root"), ("data", "calibration"), ("data", "eval"))


def _absolute(value: str, base: Path) -> str:
    if not value or "://" in value or value.startswith(("{", "~")) or os.path.isabs(value):
        return value
    return os.path.normpath(base / value)


def _walk(value: Any, base: Path) -> Any:
    if isinstance(value, str):
        return _absolute(value, base)
    if isinstance(value, list):
        return [_walk(v, base) for v in value]
    if isinstance(value, dict):
        return {k: _walk(v, base) for k, v in value.items()}
    return value  # a wrong type is left for validation to name


def resolve_paths(data: dict[str, Any], base: str | os.PathLike) -> dict[str, Any]:
    """A copy of the config mapping `data` with the relative paths of PATH_FIELDS made
    absolute against the folder `base` (which is made absolute first)."""
    base = Path(os.path.abspath(base))
    out = dict(data)
    for section, key in PATH_FIELDS:
        sec = out.get(section)
        if isinstance(sec, dict) and key in sec:
            out[section] = {**sec, key: _walk(sec[key], base)}
    return out
