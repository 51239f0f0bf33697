"""The stage manifest: the completion marker of a stage folder, and the schema it must meet.

A manifest is read from the store, so it is untrusted like every other artifact. A stage is
complete only if its `manifest.json` validates against `Manifest`, names the stage and key it
sits under, lists the stage's required outputs, and lists every file in the folder (no more,
no fewer) with the sha256 and size each file has. Anything less — invalid JSON, a missing or
extra key, `"outputs": {}`, a file the manifest does not cover — makes the stage incomplete,
and the driver recomputes it.
"""

from __future__ import annotations

import json
import posixpath
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

__all__ = ["MANIFEST", "MAX_MANIFEST_BYTES", "Manifest", "OutputDigest", "ManifestInvalid", "parse_manifest",
           "check_output_name"]

MANIFEST = "manifest.json"
# A manifest is a few KB; one far larger is not a manifest (and must not be parsed whole).
MAX_MANIFEST_BYTES = 16 << 20


class ManifestInvalid(ValueError):
    """A manifest that does not make its stage complete; the message says why."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class OutputDigest(_Strict):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)
    # The object store's own checksum of the file when the stage was written (S3's ETag):
    # lets a cache hit check the folder from a listing, without downloading it.
    etag: str | None = Field(None, pattern=r"^[0-9A-Za-z-]{1,80}$")


class Timings(_Strict):
    started: float = Field(ge=0)  # epoch seconds; the one place a clock reading belongs
    seconds: float = Field(ge=0)


class Manifest(_Strict):
    stage: str
    key: str = Field(pattern=r"^[0-9a-f]{16}$")
    format_version: int = Field(ge=1)
    config: dict[str, Any]
    config_digest: str
    inputs: dict[str, str]
    outputs: dict[str, OutputDigest] = Field(min_length=1)
    metrics: dict[str, Any]
    timings: Timings
    versions: dict[str, str]
    # Where the stage's tasks ran (pipeline/placement.py): nodes and each task's node.
    placement: dict[str, Any] = Field(default_factory=dict)
    # Peak RSS of the driver and of each worker process of the stage (pipeline/memory.py).
    memory: dict[str, Any] = Field(default_factory=dict)

    @field_validator("outputs")
    @classmethod
    def _names(cls, v: dict[str, OutputDigest]) -> dict[str, OutputDigest]:
        for name in v:
            check_output_name(name)
        return v


# Names hwq writes: letters, digits, '.', '_', '-' in '/'-separated parts. Nothing else (no
# spaces, control or bidi characters, backslashes) can be a name a stage wrote.
_NAME = re.compile(r"[A-Za-z0-9._-]+(?:/[A-Za-z0-9._-]+)*")


def check_output_name(name: str) -> str:
    """A file name relative to its stage folder: plain characters, no absolute path, no `.` or
    `..` part, not the manifest, no temporary name."""
    parts = name.split("/")
    if (not _NAME.fullmatch(name) or any(p in (".", "..") for p in parts)
            or posixpath.normpath(name) != name or name == MANIFEST or ".tmp-" in name):
        raise ValueError(f"output name {name!r} is not a plain path inside the stage folder")
    return name


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "(top level)"
    more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
    return f"{where}: {err['msg']}{more}"


def parse_manifest(
    data: bytes,
    *,
    stage: str,
    key: str,
    version: int,
    inputs: dict[str, str],
    required: tuple[str, ...] = (),
) -> Manifest:
    """Validate `data` as the manifest of stage `stage` with key `key`; ManifestInvalid if not.

    required: outputs the stage always writes; each must be listed.
    (That every listed file exists with its digest, and that no unlisted file sits in the
    folder, is `StageDir.verify`'s job: it needs the store.)
    """
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestInvalid(f"manifest is {len(data)} bytes, more than any manifest")
    try:
        raw = json.loads(data)
    except (ValueError, RecursionError) as e:  # RecursionError: absurdly deep nesting
        raise ManifestInvalid(f"manifest is not JSON ({type(e).__name__})") from None
    try:
        m = Manifest.model_validate(raw)
    except ValidationError as e:
        raise ManifestInvalid(f"manifest does not match its schema: {_first_error(e)}") from None
    if m.stage != stage or m.key != key:
        raise ManifestInvalid(f"manifest is for {m.stage}-{m.key}, not {stage}-{key}")
    if m.format_version != version:
        raise ManifestInvalid(f"manifest format_version {m.format_version}, stage is {version}")
    if m.inputs != inputs:
        raise ManifestInvalid("manifest lists other inputs than the stage key was made from")
    missing = [f for f in required if f not in m.outputs]
    if missing:
        raise ManifestInvalid(f"manifest does not list {', '.join(missing)}")
    return m
