"""The artifact store: one fsspec URL is the run root (a local folder, or s3://bucket/prefix).

Every write is atomic: a local file is written under a temporary name and renamed; a remote
file is staged locally and uploaded with one put, which S3 makes visible whole or not at all.
A stage's files are hashed (sha256) into its manifest, written last, and `StageDir` checks the
hash of every file it reads, so a corrupt or truncated artifact is an error naming the file,
never a silently wrong number.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import posixpath
import stat
import struct
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec

from pipeline.errors import StoreAccessError, UserError

__all__ = ["ArtifactError", "StoreAccessError", "Store", "StageDir", "sha256_bytes",
           "canonical_safetensors", "describe_store_error"]

_BUF = 1 << 22
# Cap on a whole-file read of a store file whose size no manifest vouches for (run.json,
# report.json/md, manifests are checked tighter): far above any honest one.
DEFAULT_MAX_READ = 64 << 20
# Attempts of one S3 request (botocore, adaptive backoff) and of one s3fs call.
S3_ATTEMPTS = int(os.environ.get("HWQ_S3_ATTEMPTS", "10"))


class ArtifactError(UserError, RuntimeError):
    """A missing, corrupt or truncated artifact; the message says which and how to recover."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Store:
    """A folder of artifacts behind one URL.

    url: a local path (created if missing) or an fsspec URL such as s3://bucket/prefix.
    storage_options: passed to fsspec (for s3fs: key, secret, client_kwargs.endpoint_url).
    Picklable, so Ray tasks receive a Store and read/write the same root.
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None, *,
                 create: bool = True):
        self.storage_options = dict(storage_options or {})
        scheme, sep, rest = url.partition("://")
        if sep and not rest.strip("/"):
            raise StoreAccessError(f"store {url!r} names no bucket or folder; use e.g. "
                                   f"{scheme}://bucket/prefix")
        if "://" not in url:
            url = os.path.abspath(url)
        self.url = url.rstrip("/")
        opts = dict(self.storage_options)
        if self.url.startswith(("s3://", "s3a://")):
            # Transient S3 faults (500s, SlowDown, dropped connections) are retried with
            # backoff: botocore's default 5 attempts let the 5th 500 in a row fail a stage.
            conf = dict(opts.get("config_kwargs") or {})
            conf.setdefault("retries", {"max_attempts": S3_ATTEMPTS, "mode": "standard"})
            opts["config_kwargs"] = conf
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url, **opts)
        except Exception as e:  # noqa: BLE001 - each cause gets its own message below
            raise StoreAccessError(describe_store_error(e, self.url)) from None
        if hasattr(self.fs, "retries"):
            # s3fs's own retries, around a body cut mid-download (botocore has returned
            # by then, so its retries cannot help).
            self.fs.retries = max(int(self.fs.retries), S3_ATTEMPTS)
        self.root = self.root.rstrip("/")
        self.is_local = self.fs.protocol in ("file", "local") or "file" in self.fs.protocol
        if self.is_local and create:  # a read-only command (status, report) creates nothing
            try:
                os.makedirs(self.root, exist_ok=True)
            except OSError as e:
                raise StoreAccessError(not_a_folder(self.root, e, "store")) from None

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    def check_access(self) -> None:
        """Fail early, with one line saying why, if the root cannot be listed or written.

        A run's first write would fail the same way, but deep inside a stage and with a
        library's traceback (botocore's NoCredentialsError, a bucket that does not exist).
        """
        probe = f".hwq-access-check-{uuid.uuid4().hex[:12]}"  # unique: runs share a store
        try:
            self.write_bytes(probe, b"ok\n")
            self.fs.rm(self.path(probe))
        except Exception as e:  # noqa: BLE001
            raise StoreAccessError(describe_store_error(e, self.url)) from None

    def __reduce__(self):
        return (Store, (self.url, self.storage_options))

    # -- paths ---------------------------------------------------------------------------
    def path(self, rel: str) -> str:
        """The filesystem path of `rel` (for fsspec calls)."""
        return posixpath.join(self.root, rel) if rel else self.root

    def full_url(self, rel: str) -> str:
        """A URL a user can paste (`s3://...` or an absolute local path)."""
        return self.path(rel) if self.is_local else f"{self.url}/{rel}"

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def list(self, rel: str) -> list[str]:
        """Files under `rel`, recursively, as paths relative to `rel`."""
        base = self.path(rel)
        if not self.fs.exists(base):
            return []
        out = []
        for p in self.fs.find(base):
            r = posixpath.relpath(p, base)
            if not _is_temp(r):
                out.append(r)
        return sorted(out)

    def list_dirs(self, rel: str) -> list[str]:
        base = self.path(rel)
        if not self.fs.exists(base):
            return []
        return sorted(
            posixpath.basename(p.rstrip("/"))
            for p in self.fs.ls(base, detail=False)
            if self.fs.isdir(p)
        )

    def listing(self, rel: str) -> dict[str, dict[str, Any]]:
        """{path relative to `rel`: {"bytes", "etag"}} of every file under `rel`, from one
        listing (no object is read). `etag` is the server's checksum of the object (S3:
        computed by the server from the bytes it stored, so any rewrite changes it); None on
        a local folder."""
        base = self.path(rel)
        with contextlib.suppress(AttributeError):
            self.fs.invalidate_cache(base)  # other processes (Ray workers) wrote here
        try:
            found = self.fs.find(base, detail=True)
        except FileNotFoundError:
            return {}
        out = {}
        for p, info in found.items():
            r = posixpath.relpath(p, base)
            if _is_temp(r) or info.get("type") == "directory":
                continue
            etag = info.get("ETag") or info.get("etag")
            out[r] = {"bytes": int(info.get("size") or 0),
                      "etag": str(etag).strip('"') if etag else None}
        return out

    def remove(self, rel: str) -> None:
        p = self.path(rel)
        if self.fs.exists(p):
            self.fs.rm(p, recursive=True)

    def size(self, rel: str) -> int:
        return int(self.fs.size(self.path(rel)))

    # -- atomic writes --------------------------------------------------------------------
    @contextlib.contextmanager
    def atomic_open(self, rel: str) -> Iterator[io.BufferedWriter]:
        """Open `rel` for binary writing; it appears under its name only if the block succeeds."""
        final = self.path(rel)
        if self.is_local:
            os.makedirs(os.path.dirname(final), exist_ok=True)
            tmp = f"{final}.tmp-{uuid.uuid4().hex[:8]}"
        else:
            fd, tmp = tempfile.mkstemp(prefix="hwq-upload-", dir=_staging_dir())
            os.close(fd)
        try:
            with open(tmp, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            if self.is_local:
                os.replace(tmp, final)
            else:
                self.fs.put_file(tmp, final)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)

    def write_bytes(self, rel: str, data: bytes) -> str:
        """Write atomically; returns the sha256 of what was written."""
        with self.atomic_open(rel) as f:
            f.write(data)
        return sha256_bytes(data)

    def write_json(self, rel: str, obj: Any) -> str:
        return self.write_bytes(rel, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())

    def write_text(self, rel: str, text: str) -> str:
        return self.write_bytes(rel, text.encode())

    # -- reads ------------------------------------------------------------------------------
    def read_bytes(self, rel: str, max_bytes: int | None = DEFAULT_MAX_READ) -> bytes:
        """The whole file `rel`: a regular file of at most `max_bytes` (None: no cap).

        Everything in the store is untrusted: a local name may be a link to /dev/zero, a FIFO
        or a folder, and any object may be huge. Those are ArtifactErrors, never a hang or a
        MemoryError.
        """
        try:
            with self._open_regular(rel) as f:
                data = f.read(-1 if max_bytes is None else max_bytes + 1)
        except (FileNotFoundError, NotADirectoryError):
            raise ArtifactError(f"{self.full_url(rel)} does not exist") from None
        except (IsADirectoryError, _NotRegular):
            raise ArtifactError(f"{self.full_url(rel)} is not a regular file") from None
        if max_bytes is not None and len(data) > max_bytes:
            raise ArtifactError(f"{self.full_url(rel)} is larger than {max_bytes:,} bytes, "
                                "more than such a file can be")
        return data

    def read_json(self, rel: str, max_bytes: int | None = DEFAULT_MAX_READ) -> Any:
        return json.loads(self.read_bytes(rel, max_bytes))

    @contextlib.contextmanager
    def _open_regular(self, rel: str):
        """A binary reader of `rel` that is sure to be a regular file (links not followed)."""
        if not self.is_local:
            with self.fs.open(self.path(rel), "rb") as f:
                yield f
            return
        # O_NONBLOCK: opening a FIFO must not wait for a writer; O_NOFOLLOW: hwq never writes
        # links, so one here was planted.
        try:
            fd = os.open(self.path(rel), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as e:
            if e.errno == errno.ELOOP:  # the name is a symbolic link
                raise _NotRegular(rel) from None
            raise
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise _NotRegular(rel)
            f = os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise
        with f:
            yield f

    def open(self, rel: str, mode: str = "rb"):
        """A seekable file object for range reads (remote: only the bytes read are fetched)."""
        return self.fs.open(self.path(rel), mode)

    def sha256(self, rel: str, limit: int | None = None) -> tuple[str, int]:
        """Streamed sha256 and size of `rel` (a regular file; OSError otherwise). With `limit`,
        reading stops after limit + 1 bytes: enough to know the file is not the expected one."""
        h = hashlib.sha256()
        n = 0
        try:
            with self._open_regular(rel) as f:
                while chunk := f.read(_BUF):
                    h.update(chunk)
                    n += len(chunk)
                    if limit is not None and n > limit:
                        break
        except _NotRegular:
            raise IsADirectoryError(f"{rel} is not a regular file") from None
        return h.hexdigest(), n


class _NotRegular(OSError):
    """A store path that is a device, FIFO, socket or link rather than a regular file."""


def describe_store_error(e: BaseException, url: str) -> str:
    """One line saying why the store at `url` cannot be used, and what to do about it."""
    name = type(e).__name__
    where = f"store {url}" if url else "the store"
    text = " ".join(str(e).split())  # one line, whatever the library's message
    if len(text) > 300:
        text = text[:297] + "..."
    scheme = url.split("://", 1)[0] if "://" in url else "file"
    if isinstance(e, ImportError):
        # fsspec's message names the package ("Install gcsfs to access Google Storage").
        import re

        m = re.search(r"install (?:the )?['\"]?([A-Za-z0-9_.-]+)", text)
        pkg = getattr(e, "name", None) or (m.group(1) if m else None)
        hint = f"pip install {pkg}" if pkg else text
        return (f"{where}: the {scheme}:// protocol needs a package that is not installed "
                f"({hint})")
    if isinstance(e, ValueError) and "Protocol not known" in text:
        return (f"{where}: unknown protocol {scheme}://; use a folder, s3://bucket/prefix "
                "or another fsspec URL")
    if name in ("NoCredentialsError", "PartialCredentialsError") or "credentials" in text.lower():
        return (f"{where}: no usable S3 credentials ({text}); set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, a profile, or an instance role")
    if isinstance(e, PermissionError) or "AccessDenied" in text or "Forbidden" in text:
        return f"{where}: access denied ({text}); check the credentials and bucket policy"
    if isinstance(e, FileNotFoundError) or "NoSuchBucket" in text:
        return f"{where}: the bucket or folder does not exist ({text}); create it first"
    if (isinstance(e, OSError) and e.errno in (errno.EREMOTEIO, errno.EBUSY)) or any(
            c in text for c in ("SlowDown", "InternalError", "ServiceUnavailable")):
        return (f"{where}: the server kept failing after {S3_ATTEMPTS} attempts ({name}: "
                f"{text}); a transient outage: rerun the same command to resume")
    if name in ("ClientPayloadError", "ServerDisconnectedError", "ConnectionClosedError"):
        return (f"{where}: the connection kept dropping after {S3_ATTEMPTS} attempts ({name}: "
                f"{text}); rerun the same command to resume")
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError") or \
            isinstance(e, (ConnectionError, TimeoutError, OSError)):
        return f"{where}: cannot connect ({name}: {text}); check the URL and endpoint"
    return f"{where}: cannot be used ({name}: {text})"


def not_a_folder(path: str, e: OSError, what: str) -> str:
    """One line saying why the local folder `path` (a store, an output) cannot be made: the
    first part of it that exists and is not a folder (a file, /dev/null), or `e`."""
    part = os.path.abspath(path)
    while True:
        if os.path.lexists(part) and not os.path.isdir(part):
            kind = "a file" if os.path.isfile(part) else "not a folder"
            inside = "" if part == os.path.abspath(path) else f" is inside {part}, which"
            return f"{what} {path}{inside} is {kind}; name a folder"
        parent = os.path.dirname(part)
        if parent == part:
            break
        part = parent
    return f"{what} {path}: cannot make the folder ({e.strerror or e})"


def canonical_safetensors(data: bytes) -> bytes:
    """The same safetensors file with its JSON header's keys sorted.

    safetensors writes `__metadata__` in the order of a Rust hash map, which differs between
    processes; sorting makes the bytes a function of the tensors and metadata alone. Only the
    order of keys changes, so the header keeps its length (padded with spaces, as the format
    allows) and every data offset stays valid.
    """
    (n,) = struct.unpack_from("<Q", data)
    header = json.loads(data[8 : 8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    if len(text) > n:  # cannot happen for a reordering; keep the original rather than break it
        return data
    return data[:8] + text + b" " * (n - len(text)) + data[8 + n :]


def _is_temp(rel: str) -> bool:
    return ".tmp-" in posixpath.basename(rel)


def _staging_dir() -> str:
    from pipeline.executor import private_subdir

    return str(private_subdir("upload"))


# ---------------------------------------------------------------------------------------------
# Stage folders
# ---------------------------------------------------------------------------------------------


@dataclass
class StageDir:
    """The folder of one stage: `<root>/stages/<name>-<key>/`.

    Writes go through `write_*` (atomic). Reads through `read_*` check the file's sha256 against
    the stage manifest (`outputs`), so a flipped byte is an `ArtifactError` that names the file.
    `outputs` is None only while this process writes the stage (it reads back what it just
    wrote); a folder from a manifest always has a dict, and a file it does not list is refused.
    Picklable: hand it to Ray tasks.
    """

    store: Store
    name: str
    key: str
    outputs: dict[str, dict[str, Any]] | None = None  # from the manifest; None: being written

    @property
    def prefix(self) -> str:
        return f"stages/{self.name}-{self.key}"

    def rel(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def url(self, name: str) -> str:
        return self.store.full_url(self.rel(name))

    def _corrupt(self, name: str, why: str) -> ArtifactError:
        return ArtifactError(
            f"artifact {self.url(name)} is {why}: rerun with `--force {self.name}` "
            "to recompute it"
        )

    # writes
    def open(self, name: str):
        return self.store.atomic_open(self.rel(name))

    def write_bytes(self, name: str, data: bytes) -> str:
        return self.store.write_bytes(self.rel(name), data)

    def write_json(self, name: str, obj: Any) -> str:
        return self.store.write_json(self.rel(name), obj)

    def write_text(self, name: str, text: str) -> str:
        return self.store.write_text(self.rel(name), text)

    def write_safetensors(self, name: str, tensors: dict, metadata: dict[str, str] | None = None):
        from safetensors.torch import save

        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        return self.write_bytes(name, canonical_safetensors(save(tensors, metadata=metadata)))

    def write_table(self, name: str, table) -> str:
        import pyarrow.parquet as pq

        with self.open(name) as f:
            pq.write_table(table, f, compression="zstd")
        return name

    # verified reads
    def read_bytes(self, name: str) -> bytes:
        expect = None
        if self.outputs is not None:
            expect = self.outputs.get(name)
            if expect is None:
                raise self._corrupt(name, "not listed in the stage manifest")
        try:
            # A listed file is read no further than its listed size (+1 to see it is longer).
            data = self.store.read_bytes(self.rel(name),
                                         max_bytes=None if expect is None else expect["bytes"])
        except ArtifactError as e:
            why = "missing" if "does not exist" in str(e) else (
                "not a regular file" if "regular" in str(e) else "larger than the manifest says")
            raise self._corrupt(name, why) from None
        if expect is not None:
            if len(data) != expect["bytes"]:
                raise self._corrupt(
                    name, f"truncated or resized ({len(data)} bytes, manifest says {expect['bytes']})"
                )
            if sha256_bytes(data) != expect["sha256"]:
                raise self._corrupt(name, "corrupt (sha256 differs from the manifest)")
        return data

    def read_json(self, name: str) -> Any:
        try:
            return json.loads(self.read_bytes(name))
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
            raise self._corrupt(name, f"not valid JSON ({type(e).__name__})") from None

    def read_safetensors(self, name: str) -> dict:
        from safetensors.torch import load

        try:
            # Sorted by name: the loader's own order differs between processes, and every
            # artifact made from these tensors must be a function of its inputs alone.
            return dict(sorted(load(self.read_bytes(name)).items()))
        except ArtifactError:
            raise
        except Exception as e:  # safetensors raises its own types on malformed input
            raise self._corrupt(name, f"unreadable as safetensors ({e})") from None

    def read_safetensors_metadata(self, name: str) -> dict[str, str]:
        """The `__metadata__` of a safetensors file (its header: u64 length, then JSON)."""
        data = self.read_bytes(name)
        try:
            (n,) = struct.unpack_from("<Q", data)
            header = json.loads(data[8 : 8 + n])
        except (struct.error, ValueError) as e:
            raise self._corrupt(name, f"unreadable as safetensors ({e})") from None
        return dict(header.get("__metadata__") or {})

    def read_table(self, name: str):
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            return pq.read_table(pa.BufferReader(self.read_bytes(name)))
        except ArtifactError:
            raise
        except Exception as e:
            raise self._corrupt(name, f"unreadable as Parquet ({e})") from None

    def exists(self, name: str) -> bool:
        return self.store.exists(self.rel(name))

    def files(self) -> list[str]:
        return [f for f in self.store.list(self.prefix) if f != "manifest.json"]

    def hash_outputs(self) -> dict[str, dict[str, Any]]:
        """sha256 and size of every file of the stage (the manifest excluded), read back from
        the store; on S3 also each object's ETag, so a later cache hit can check the folder
        from one listing instead of downloading it (`verify`)."""
        listed = {} if self.store.is_local else self.store.listing(self.prefix)
        out = {}
        for f in self.files():
            try:
                digest, n = self.store.sha256(self.rel(f))
            except OSError:
                raise ArtifactError(f"{self.url(f)} is not a regular file: hwq writes none such, "
                                    "so it was put there; remove it and rerun") from None
            out[f] = {"sha256": digest, "bytes": n}
            etag = listed.get(f, {}).get("etag")
            if etag and listed[f]["bytes"] == n:
                out[f]["etag"] = etag
        return out

    def verify_listing(self) -> str | None:
        """Like `verify`, from one listing of the folder, downloading nothing: every file the
        manifest lists is there with its size and the ETag recorded when the stage was written,
        and nothing else is. "no etags" if the manifest has none to compare (a local store, an
        older manifest): then only `verify` can tell."""
        if not self.outputs:
            return "the manifest lists no outputs"
        if self.store.is_local or not all(m.get("etag") for m in self.outputs.values()):
            return "no etags"
        listed = self.store.listing(self.prefix)
        listed.pop("manifest.json", None)
        unlisted = sorted(set(listed) - set(self.outputs))
        if unlisted:
            return f"{unlisted[0]} is in the folder but not in the manifest"
        for f, meta in self.outputs.items():
            got = listed.get(f)
            if got is None:
                return f"{f} is missing"
            if got["bytes"] != meta["bytes"] or got["etag"] != meta["etag"]:
                return f"{f} does not match its manifest (size or ETag differs)"
        return None

    def verify(self) -> str | None:
        """None if the manifest lists exactly the files in the folder and each hashes right;
        else why not."""
        if not self.outputs:
            return "the manifest lists no outputs"
        unlisted = sorted(set(self.files()) - set(self.outputs))
        if unlisted:
            return f"{unlisted[0]} is in the folder but not in the manifest"
        bad = first_mismatch(self.store, self.prefix, self.outputs)
        if bad is None:
            return None
        f, why = bad
        return f"{f} {'does not match its manifest digest' if why == 'differs' else why}"


def first_mismatch(store: Store, prefix: str, outputs: dict[str, dict[str, Any]]
                   ) -> tuple[str, str] | None:
    """The first of `outputs` (name under `prefix` -> {"bytes", "sha256"}) whose file is
    "missing", "not a regular file", or "differs" from its recorded size and sha256, as
    (name, why); None when every one re-hashes to its record (a manifest's or a unit's)."""
    for name, meta in outputs.items():
        try:
            digest, n = store.sha256(f"{prefix}/{name}", limit=meta["bytes"])
        except FileNotFoundError:
            return name, "is missing"
        except OSError:  # a folder, device, FIFO or link where a file should be
            return name, "is not a regular file"
        if n != meta["bytes"] or digest != meta["sha256"]:
            return name, "differs"
    return None
