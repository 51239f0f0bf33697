"""The work folder of `hwq stream` (pipeline/streamed.py): outputs, manifests, verified reads.

Everything in the work folder is untrusted, as in a `hwq run` store (docs/SECURITY.md):

- a manifest is a stage's completion marker only if it validates against `StreamManifest`
  (strict types, digests as 64 hex digits, output names that are plain paths inside the folder,
  the `codes` it names among its outputs); anything less makes the stage recompute;
- a cache hit re-hashes every output the manifest lists (regular files only, read no further
  than their listed size) — sizes alone do not make a hit;
- every read of another stage's output is checked against the digest its manifest recorded:
  whole files are read once, hashed and parsed from those bytes (`verified_bytes`), large ones
  are copied to a private local file while hashed (`verified_copy`), and the Hessian table is
  checked tensor by tensor against per-tensor digests (pipeline/hessian/table.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pipeline.manifest import MAX_MANIFEST_BYTES, OutputDigest, check_output_name
from pipeline.models.weights import _Files, _Sink
from pipeline.store import ArtifactError, Store, sha256_bytes

__all__ = ["WorkFolder", "StreamManifest", "manifest_rel"]

log = logging.getLogger(__name__)
_HEX64 = r"^[0-9a-f]{64}$"


class _Memory(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)
    driver_peak_rss: int = Field(ge=0)
    workers_peak_rss: int = Field(ge=0)
    workers: list[dict[str, Any]]


class StreamManifest(BaseModel):
    """What a streamed stage's manifest must hold to count as complete. Figures beyond these
    (timings, accounting) are kept as they are: nothing downstream reads them."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)
    stage: str
    key: str = Field(pattern=_HEX64)
    seconds: float = Field(ge=0)
    outputs: dict[str, OutputDigest] = Field(min_length=1)
    memory: _Memory
    weights_per_s: float = Field(0.0, ge=0)
    # quantize: tensor name -> its codes file (one of `outputs`)
    codes: dict[str, str] | None = None
    # hessian: tensor name -> sha256 of its float32 values; decode: of its decoded bytes
    tensor_sha256: dict[str, str] | None = None

    @field_validator("outputs")
    @classmethod
    def _plain(cls, v: dict[str, OutputDigest]) -> dict[str, OutputDigest]:
        for name in v:
            check_output_name(name)
        return v

    @field_validator("tensor_sha256")
    @classmethod
    def _digests(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        import re

        if v is not None and not all(re.fullmatch(_HEX64, d) for d in v.values()):
            raise ValueError("a tensor digest is not 64 hex digits")
        return v


def manifest_rel(stage: str) -> str:
    return f"manifests/{stage}.json"


class WorkFolder:
    """The work folder: small JSON files and streamed outputs, local or on an object store.

    Picklable by URL: Ray tasks rebuild it from (url, storage_options)."""

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url = url.rstrip("/")
        self.storage_options = storage_options
        self.files = _Files(self.url, storage_options)
        # Regular-file reads that follow no link and stop at a cap (pipeline/store.py).
        self.store = Store(self.url, storage_options)

    def sub(self, rel: str) -> str:
        return posixpath.join(self.url, rel) if "://" in self.url else f"{self.url}/{rel}"

    def write_bytes(self, rel: str, data: bytes) -> dict:
        """Publish `data` whole under `rel`; its bytes and sha256 (computed while writing)."""
        try:
            sink = _Sink(self.files, rel)
            try:
                sink.write(data)
                sink.commit()
            except BaseException:
                sink.abort()
                raise
        except (IsADirectoryError, NotADirectoryError, FileExistsError) as e:
            # Something planted where hwq writes a file (a folder, a file where a folder goes).
            raise ArtifactError(
                f"cannot write {self.store.full_url(rel)}: {e.strerror} (remove "
                "what is in the way and rerun)"
            ) from None
        return {"bytes": sink.written, "sha256": sink.sha256.hexdigest()}

    def exists(self, rel: str) -> bool:
        return self.files.exists(rel)

    def size(self, rel: str) -> int:
        return self.files.size(rel)

    # -- manifests ---------------------------------------------------------------------------

    def manifest(self, stage: str, key: str) -> tuple[StreamManifest | None, str]:
        """The stage's manifest if it is one for `key`; else (None, why not)."""
        rel = manifest_rel(stage)
        try:
            raw = self.store.read_bytes(rel, MAX_MANIFEST_BYTES)
        except ArtifactError as e:
            return None, "no manifest" if "does not exist" in str(e) else str(e)
        try:
            m = StreamManifest.model_validate(json.loads(raw))
        except (ValueError, RecursionError) as e:  # ValidationError is a ValueError
            why = e.errors()[0] if isinstance(e, ValidationError) else type(e).__name__
            return None, f"its manifest is malformed ({why})"
        if m.stage != stage:
            return None, f"its manifest is for stage {m.stage!r}"
        if m.key != key:
            return None, "settings or inputs changed"
        if m.codes is not None and not set(m.codes.values()) <= set(m.outputs):
            return None, "its manifest names a codes file it does not list"
        return m, ""

    def check(self, outputs: dict[str, OutputDigest]) -> str | None:
        """None if every output is a regular file with its listed size and sha256; else why
        not (re-hashes every byte: sizes alone say nothing)."""
        for rel, d in outputs.items():
            try:
                digest, n = self.store.sha256(check_output_name(rel), limit=d.bytes)
            except FileNotFoundError:
                return f"{rel} is missing"
            except (OSError, ValueError):  # a folder, FIFO, device or link where a file should be
                return f"{rel} is not a regular file"
            if n != d.bytes or digest != d.sha256:
                return f"{rel} does not match the sha256 its manifest recorded"
        return None

    # -- verified reads of another stage's outputs ---------------------------------------------

    def _bad(self, rel: str, why: str) -> ArtifactError:
        return ArtifactError(
            f"{self.store.full_url(rel)} is {why} since its stage wrote it; "
            "rerun `hwq stream` to recompute it"
        )

    def verified_bytes(self, rel: str, digest: dict | OutputDigest) -> bytes:
        """The whole file, read once and checked against `digest` ({"bytes", "sha256"})."""
        d = digest if isinstance(digest, OutputDigest) else OutputDigest(**digest)
        try:
            data = self.store.read_bytes(check_output_name(rel), max_bytes=d.bytes)
        except ArtifactError as e:
            raise self._bad(
                rel,
                "missing"
                if "does not exist" in str(e)
                else "not a regular file"
                if "regular" in str(e)
                else "resized",
            ) from None
        if len(data) != d.bytes:
            raise self._bad(rel, f"resized ({len(data)} bytes, {d.bytes} recorded)")
        if sha256_bytes(data) != d.sha256:
            raise self._bad(rel, "changed (its sha256 differs from the manifest's)")
        return data

    def verified_copy(self, rel: str, digest: dict | OutputDigest, folder: str) -> str:
        """Copy `rel` into a new private file of its own name under local `folder` (a fresh
        private folder), hashing while copying, and return its path once size and sha256 match
        `digest` (the copy is what gets parsed: a file too large to hold in memory, read
        once)."""
        d = digest if isinstance(digest, OutputDigest) else OutputDigest(**digest)
        dst = os.path.join(folder, posixpath.basename(rel))
        h, n = hashlib.sha256(), 0
        try:
            with (
                self.store._open_regular(check_output_name(rel)) as f,
                open(dst, "xb", opener=lambda p, fl: os.open(p, fl, 0o600)) as out,
            ):
                while n <= d.bytes and (chunk := f.read(min(8 << 20, d.bytes + 1 - n))):
                    h.update(chunk)
                    out.write(chunk)
                    n += len(chunk)
        except FileNotFoundError:
            _remove(dst)
            raise self._bad(rel, "missing") from None
        except OSError:
            _remove(dst)
            raise self._bad(rel, "not a regular file") from None
        if n != d.bytes or h.hexdigest() != d.sha256:
            _remove(dst)
            raise self._bad(rel, "changed (its size or sha256 differs from the manifest's)")
        return dst


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
