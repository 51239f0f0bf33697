"""Fine-tune checkpoints in the store, loaded without ever running code from them.

`<store root>/checkpoints/finetune-<key>/` holds one DeepSpeed checkpoint folder per tag
(`step<9 digits>/`) and `latest.json`, which names the tag to resume from and the sha256 and
size of every file in it. Anyone who can write to the store (a shared bucket) can write there,
and no stage manifest covers these files, so everything read back is treated as untrusted:

- DeepSpeed's own loader (`TorchCheckpointEngine.load`) unpickles its `.pt` files with
  weights-only off, which runs whatever a pickle's `__reduce__` says. Here every file is read
  once into memory, checked against `latest.json`, and unpickled only with
  `torch.load(weights_only=True)`: torch's restricted unpickler builds tensors and plain
  containers and refuses any other global.
  Exactly three DeepSpeed globals are allow-listed, the ones real ZeRO-1/2 optimizer files
  contain (found by saving ZeRO 0/1/2 checkpoints, fp32 and bf16, and loading them with
  weights_only=True): `deepspeed.utils.tensor_fragment.fragment_address` (a dataclass of two
  ints), `deepspeed.runtime.fp16.loss_scaler.LossScaler` (the static loss scale) and
  `deepspeed.runtime.zero.config.ZeroStageEnum` (an int enum). ZeRO-0 files need none, ZeRO-3
  files the last two (checked the same way, though no test resumes ZeRO-3). The
  unpickled object is then walked, and anything but tensors, numbers, strings, plain containers
  and those three types with plain attributes is refused, so not even an allow-listed class can
  be smuggled in as an attribute value.
- `engine.load_checkpoint` still does the loading (it restores every piece of ZeRO 0/1/2
  state: partitioned fp32 masters, Adam's moments and step, bf16 copies, its own layout
  checks), but through `_VerifiedLoadEngine`, a checkpoint engine whose `load` serves only the
  verified bytes (so a file swapped after the check is never read) through the safe unpickler.
  While it runs, `torch.load` itself is replaced by a function that refuses, so a DeepSpeed code
  path that bypassed its checkpoint engine would fail instead of unpickling.

Why not hwq's own safetensors + JSON checkpoint instead of DeepSpeed's files: it would remove
pickle altogether, but restoring a ZeRO-1/2 engine means writing Adam's moments and step into
flat, padded, per-rank partitions and the fp32 masters behind bf16 copies, through DeepSpeed
internals that differ per stage and per optimizer wrapper (and change between releases), and
resuming must be exact. DeepSpeed's own load does all of that and is what the resume tests
check bit for bit; torch's weights-only unpickler is torch's supported way to read untrusted
checkpoints. So the files stay DeepSpeed's and only the unpickling is replaced.
- `latest.json` has a strict schema: exactly {"tag", "step", "files"}; tag `step` + 9 ASCII
  digits, step the int those digits spell (and below the run's total steps); each file a flat
  name ending in `.pt` with its sha256 and size. The tag folder must hold exactly the listed
  files, each a regular file of that size and hash. Every path that is removed or created is
  built from a tag that matched the pattern, under this run's own checkpoint folder.

A checkpoint that fails any check is ignored: every worker logs a warning saying why and the
fine-tune starts from step 0 (the workers agree first, so none resumes alone). What survives
the checks can only be tensors and numbers; if DeepSpeed still cannot load them, the stage
stops with an error that names the checkpoint and says to delete it.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import io
import json
import logging
import os
import posixpath
import re
import shutil
import stat
import threading
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.store import ArtifactError, Store

__all__ = ["CheckpointRejected", "Checkpoints", "parse_latest", "safe_torch_load"]

log = logging.getLogger(__name__)

LATEST = "latest.json"
TAG_RE = re.compile(r"step[0-9]{9}", re.ASCII)
_FILE_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}\.pt", re.ASCII)
_SHA_RE = re.compile(r"[0-9a-f]{64}", re.ASCII)
_KEY_RE = re.compile(r"[0-9A-Za-z_-]{1,64}", re.ASCII)
_MAX_FILES = 4096
_MAX_LATEST_BYTES = 1 << 20


class CheckpointRejected(Exception):
    """A checkpoint that is not resumed from; the message says why."""


def tag_of(step: int) -> str:
    return f"step{int(step):09d}"


# ---------------------------------------------------------------------------------------------
# latest.json
# ---------------------------------------------------------------------------------------------


def parse_latest(raw: bytes | Any, before: int | None = None) -> dict[str, Any]:
    """The validated content of latest.json (bytes or parsed JSON); CheckpointRejected if it
    is anything but {"tag": "step<9 digits>", "step": that number, "files": {name.pt:
    {"sha256": hex, "size": int}}}. `before`: the step must be below it (a run's total steps;
    checkpoints are only ever written before the last step)."""
    if isinstance(raw, (bytes, bytearray)):
        if len(raw) > _MAX_LATEST_BYTES:
            raise CheckpointRejected(f"{LATEST} is {len(raw)} bytes, more than any real one")
        try:
            raw = json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise CheckpointRejected(f"{LATEST} is not JSON ({e})") from None
    if not isinstance(raw, dict) or set(raw) != {"tag", "step", "files"}:
        keys = sorted(map(str, raw))[:5] if isinstance(raw, dict) else type(raw).__name__
        raise CheckpointRejected(f"{LATEST} must have exactly the keys files, step, tag "
                                 f"(has {keys}; written by an older hwq, or not by hwq)")
    tag, step, files = raw["tag"], raw["step"], raw["files"]
    if not isinstance(tag, str) or not TAG_RE.fullmatch(tag):
        raise CheckpointRejected(f"{LATEST}: tag {str(tag)[:80]!r} is not step followed by "
                                 "9 digits")
    if type(step) is not int or step < 0 or step != int(tag[4:]):
        raise CheckpointRejected(f"{LATEST}: step {str(step)[:40]!r} does not match tag {tag}")
    if before is not None and step >= before:
        raise CheckpointRejected(f"{LATEST}: step {step} is not below the run's {before} steps")
    if not isinstance(files, dict) or not 0 < len(files) <= _MAX_FILES:
        raise CheckpointRejected(f"{LATEST}: files must list the checkpoint's files")
    for name, meta in files.items():
        if not isinstance(name, str) or not _FILE_RE.fullmatch(name):
            raise CheckpointRejected(f"{LATEST}: {str(name)[:80]!r} is not a checkpoint file name "
                                     "(a plain name ending in .pt)")
        if (not isinstance(meta, dict) or set(meta) != {"sha256", "size"}
                or not isinstance(meta["sha256"], str) or not _SHA_RE.fullmatch(meta["sha256"])
                or type(meta["size"]) is not int or meta["size"] < 0):
            raise CheckpointRejected(f"{LATEST}: {name} needs a sha256 (64 hex digits) and a "
                                     "size (bytes)")
    return {"tag": tag, "step": step, "files": {n: dict(m) for n, m in files.items()}}


def _check_bytes(name: str, data: bytes, meta: dict[str, Any]) -> None:
    if len(data) != meta["size"]:
        raise CheckpointRejected(f"{name} is {len(data)} bytes, {LATEST} says {meta['size']}")
    if hashlib.sha256(data).hexdigest() != meta["sha256"]:
        raise CheckpointRejected(f"{name} does not match its sha256 in {LATEST}")


# ---------------------------------------------------------------------------------------------
# Unpickling without code
# ---------------------------------------------------------------------------------------------


def _deepspeed_globals() -> list[type]:
    """The DeepSpeed types a ZeRO-1/2 optimizer file holds (ZeRO-0 files hold none)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [fragment_address, LossScaler, ZeroStageEnum]


_PLAIN = (type(None), bool, int, float, complex, str, bytes, torch.Size, torch.dtype,
          torch.device, torch.layout, torch.memory_format)


def _check_plain(obj: Any, allowed: tuple[type, ...], where: str) -> None:
    """CheckpointRejected unless `obj` is made only of tensors, plain values and containers,
    and instances of `allowed` whose attributes are such values (no classes, no functions)."""
    seen: set[int] = set()
    stack = [obj]
    while stack:
        x = stack.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        t = type(x)
        if t in (torch.Tensor, torch.nn.Parameter):
            continue
        if t in _PLAIN:
            continue
        if t in allowed:
            if isinstance(x, int):  # an int enum member
                continue
            stack.extend(vars(x).values())
            continue
        if t in (dict, collections.OrderedDict):
            stack.extend(x.keys())
            stack.extend(x.values())
            continue
        if t in (list, tuple, set, frozenset):
            stack.extend(x)
            continue
        raise CheckpointRejected(f"{where} holds a {t.__module__}.{t.__qualname__}, which no "
                                 "checkpoint of this pipeline contains")


def safe_torch_load(data: bytes, where: str, map_location: Any = "cpu") -> Any:
    """Unpickle checkpoint bytes with torch's weights-only unpickler (plus the three DeepSpeed
    types above); CheckpointRejected if the file holds anything else."""
    allowed = _deepspeed_globals()
    try:
        with torch.serialization.safe_globals(allowed):
            obj = torch.serialization.load(io.BytesIO(data), map_location=map_location,
                                           weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to unpickle means: not resumable
        # torch's message for a refused global is long and suggests allow-listing it; only
        # the global's name is of use here.
        m = re.search(r"GLOBAL ([\w.]+)", str(e))
        lines = str(e).strip().splitlines()
        gist = (f"it needs {m.group(1)}, which a weights-only load refuses" if m
                else f"{type(e).__name__}: {(lines[0] if lines else '')[:200]}")
        raise CheckpointRejected(f"{where} cannot be loaded as weights only ({gist})"
                                 ) from None
    _check_plain(obj, tuple(allowed), where)
    return obj


_guard_lock = threading.Lock()
_guard_depth = 0
_guard_saved: Any = None


def _refuse_torch_load(f, *args, **kwargs):
    raise CheckpointRejected(f"loading {f!r} with torch.load, outside hwq's verified checkpoint "
                             "loader, was refused (DeepSpeed bypassed its checkpoint engine)")


@contextlib.contextmanager
def _torch_load_refused():
    """While DeepSpeed loads: `torch.load` refuses, so only `_VerifiedLoadEngine` reads files
    (it calls `torch.serialization.load` itself). Nested or concurrent uses restore the
    original once, when the last one ends."""
    global _guard_depth, _guard_saved
    with _guard_lock:
        if _guard_depth == 0:
            _guard_saved, torch.load = torch.load, _refuse_torch_load
        _guard_depth += 1
    try:
        yield
    finally:
        with _guard_lock:
            _guard_depth -= 1
            if _guard_depth == 0:
                torch.load, _guard_saved = _guard_saved, None


def _verified_engine_class():
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class _VerifiedLoadEngine(TorchCheckpointEngine):
        """DeepSpeed's torch checkpoint engine (saving unchanged) whose `load` serves only the
        verified bytes of this checkpoint, unpickled weights-only."""

        def __init__(self, inner: TorchCheckpointEngine, files: dict[str, bytes]):
            self.__dict__.update(inner.__dict__)  # same settings; no super().__init__ (it logs)
            self._verified = files

        def load(self, path: str, map_location=None):
            key = os.path.normpath(os.path.abspath(path))
            data = self._verified.get(key)
            if data is None:
                raise CheckpointRejected(f"{path} is not a verified file of this checkpoint")
            return safe_torch_load(data, path, map_location=map_location or "cpu")

    return TorchCheckpointEngine, _VerifiedLoadEngine


# ---------------------------------------------------------------------------------------------
# Collectives (module level so tests can stand in threads for workers)
# ---------------------------------------------------------------------------------------------


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _all_agree(ok: bool, device: Any = "cpu") -> bool:
    """True only if every worker says ok (one tiny all-reduce; just `ok` outside a group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return ok
    t = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(int(t.item()))


# ---------------------------------------------------------------------------------------------
# The checkpoints of one stage key
# ---------------------------------------------------------------------------------------------


@dataclass
class Checkpoints:
    """DeepSpeed checkpoints of one stage key: `<store>/checkpoints/finetune-<key>/`.

    Picklable (a Store and strings); `save` and `load` are collective (every worker calls them
    at the same step).
    """

    store: Store
    key: str

    def __post_init__(self) -> None:
        if not isinstance(self.key, str) or not _KEY_RE.fullmatch(self.key):
            raise ValueError(f"checkpoint key {self.key!r}: letters, digits, _ and - only")

    @property
    def rel(self) -> str:
        return f"checkpoints/finetune-{self.key}"

    def _tag_rel(self, tag: str) -> str:
        if not TAG_RE.fullmatch(tag):  # the only way a path under rel is ever built
            raise ValueError(f"not a checkpoint tag: {tag!r}")
        return f"{self.rel}/{tag}"

    def _local_dir(self, rank: int) -> str:
        """Where DeepSpeed reads/writes on this worker."""
        if self.store.is_local:
            return self.store.path(self.rel)
        from pipeline.executor import cache_dir

        return str(cache_dir() / "finetune-ckpt" / self.key / f"rank{int(rank)}")

    def _remove_tag(self, tag: str) -> None:
        rel = self._tag_rel(tag)
        if self.store.is_local:
            p = self.store.path(rel)
            if os.path.islink(p):  # never follow a link out of the checkpoint folder
                os.unlink(p)
                return
        self.store.remove(rel)

    # -- reading ----------------------------------------------------------------------------

    def _latest(self, before: int | None = None) -> dict[str, Any] | None:
        """latest.json validated (CheckpointRejected if invalid), or None if there is none."""
        try:
            raw = self.store.read_bytes(f"{self.rel}/{LATEST}", _MAX_LATEST_BYTES)
        except FileNotFoundError:
            return None
        except ArtifactError as e:  # absent, or planted: too large, a link, a FIFO
            if "does not exist" in str(e):
                return None
            raise CheckpointRejected(str(e)) from None
        return parse_latest(raw, before)

    def latest(self) -> dict[str, Any] | None:
        """latest.json if there is one and it is valid, else None."""
        try:
            return self._latest()
        except CheckpointRejected:
            return None

    def inspect(self) -> tuple[dict[str, Any] | None, str | None]:
        """(latest.json, None) if the checkpoint it names is complete and hashes right;
        (None, why not) if there is one that will be ignored; (None, None) if there is none.
        Reads the files' bytes, never unpickles them (the workers do that, weights-only)."""
        try:
            info = self._latest()
            if info is not None:
                self._read_files(info)
        except CheckpointRejected as e:
            return None, str(e)
        return info, None

    def _read_files(self, info: dict[str, Any]) -> dict[str, bytes]:
        """{name: bytes} of the tag's files, each checked against latest.json; the folder must
        hold exactly those files (anything else there could be globbed by DeepSpeed)."""
        tag = info["tag"]
        rel = self._tag_rel(tag)
        out: dict[str, bytes] = {}
        if self.store.is_local:
            folder = self.store.path(rel)
            if os.path.islink(folder) or not os.path.isdir(folder):
                raise CheckpointRejected(f"{tag}/ is missing or not a plain folder")
            present = sorted(os.listdir(folder))
        else:
            present = self.store.list(rel)
        extra = sorted(set(present) - set(info["files"]))
        missing = sorted(set(info["files"]) - set(present))
        if extra or missing:
            what = (f"{tag}/{extra[0]} is not listed in {LATEST}" if extra
                    else f"{tag}/{missing[0]} is missing")
            raise CheckpointRejected(what)
        for name, meta in info["files"].items():
            if self.store.is_local:
                p = os.path.join(folder, name)
                try:
                    fd = os.open(p, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
                except OSError as e:
                    raise CheckpointRejected(f"{tag}/{name} cannot be read ({e.strerror})"
                                             ) from None
                with os.fdopen(fd, "rb") as f:
                    if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                        raise CheckpointRejected(f"{tag}/{name} is not a regular file")
                    data = f.read(meta["size"] + 1)
            else:
                try:
                    size = self.store.size(posixpath.join(rel, name))
                    if size != meta["size"]:
                        raise CheckpointRejected(f"{tag}/{name} is {size} bytes, {LATEST} "
                                                 f"says {meta['size']}")
                    data = self.store.read_bytes(posixpath.join(rel, name), meta["size"])
                except (ArtifactError, FileNotFoundError) as e:
                    raise CheckpointRejected(f"{tag}/{name} cannot be read ({e})") from None
            _check_bytes(f"{tag}/{name}", data, meta)
            out[name] = data
        return out

    def _prepare(self, rank: int, before: int | None
                 ) -> tuple[dict[str, Any] | None, dict[str, bytes]]:
        """Validate latest.json, read and verify every file, unpickle each weights-only (so a
        bad file is found before DeepSpeed touches the engine), and on a remote store put them
        where DeepSpeed looks. Returns (latest.json, {absolute local path: bytes}), or
        (None, {}) if there is no checkpoint; CheckpointRejected if it is not resumable."""
        info = self._latest(before)
        if info is None:
            return None, {}
        files = self._read_files(info)
        for name, data in files.items():
            safe_torch_load(data, f"{info['tag']}/{name}")
        local = self._local_dir(rank)
        folder = os.path.join(local, info["tag"])
        if not self.store.is_local:
            # Only the listed, verified files, by names that matched the pattern.
            shutil.rmtree(folder, ignore_errors=True)
            os.makedirs(folder)
            for name, data in files.items():
                with open(os.path.join(folder, name), "wb") as f:
                    f.write(data)
        return info, {os.path.normpath(os.path.abspath(os.path.join(folder, n))): d
                      for n, d in files.items()}

    def load(self, engine, rank: int, before: int | None = None) -> int:
        """Load the latest checkpoint into `engine`; its step, or 0 if there is none or it was
        rejected (with a warning). `before`: the run's total steps. Collective."""
        try:
            info, files = self._prepare(rank, before)
            why = None
        except CheckpointRejected as e:
            info, files, why = None, {}, str(e)
        ok = _all_agree(info is not None, getattr(engine, "device", "cpu"))
        if not ok:
            if why is not None or info is not None:
                why = why or "another worker rejected it"
                log.warning("finetune (worker %d): ignoring the checkpoint in %s: %s; "
                            "fine-tuning from step 0", rank, self.store.full_url(self.rel), why)
            self._drop_local(rank, info)
            return 0
        tag = info["tag"]
        where = self.store.full_url(self._tag_rel(tag))
        base, verified = _verified_engine_class()
        inner = getattr(engine, "checkpoint_engine", None)
        if type(inner) is not base:
            raise RuntimeError(f"cannot resume from {where}: the DeepSpeed engine uses a "
                               f"{type(inner).__name__}, not the torch checkpoint engine "
                               "hwq verifies loads through")
        engine.checkpoint_engine = verified(inner, files)
        try:
            with _torch_load_refused():
                path, client = engine.load_checkpoint(self._local_dir(rank), tag=tag,
                                                      load_module_strict=False)
        except Exception as e:
            raise RuntimeError(f"cannot resume from the checkpoint {where} ({e}); delete "
                               f"{self.store.full_url(self.rel)} to fine-tune from step 0"
                               ) from e
        finally:
            engine.checkpoint_engine = inner
            self._drop_local(rank, info)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint at {where}; delete "
                               f"{self.store.full_url(self.rel)} to fine-tune from step 0")
        step = (client or {}).get("step")
        if type(step) is not int or step != info["step"]:
            raise RuntimeError(f"the checkpoint {where} says step {step!r}, its {LATEST} "
                               f"{info['step']}; delete {self.store.full_url(self.rel)} to "
                               "fine-tune from step 0")
        return step

    def _drop_local(self, rank: int, info: dict[str, Any] | None) -> None:
        """Remote store: remove this worker's downloaded copy (a validated tag's folder)."""
        if info is not None and not self.store.is_local:
            shutil.rmtree(os.path.join(self._local_dir(rank), info["tag"]), ignore_errors=True)

    # -- writing ----------------------------------------------------------------------------

    def save(self, engine, step: int, rank: int) -> None:
        """Every worker saves its part of tag step<step>; then worker 0 records every file's
        sha256 and size in latest.json (written atomically, last) and removes older tags, so a
        kill during a save leaves the previous checkpoint in force. Collective."""
        tag = tag_of(step)
        local = self._local_dir(rank)
        if not self.store.is_local:
            shutil.rmtree(os.path.join(local, tag), ignore_errors=True)
        if rank == 0:
            # Leftovers under this tag (a save a kill interrupted, or files planted there)
            # would sit beside the new files and fail the exact-listing check on load.
            self._remove_tag(tag)
        _barrier()
        # Frozen tensors come from the input artifacts: only the trainable state is saved.
        engine.save_checkpoint(local, tag=tag, client_state={"step": int(step)},
                               save_latest=False, exclude_frozen_parameters=True)
        if not self.store.is_local:
            # Each worker uploads the files it wrote (rank 0: model states; all: their ZeRO
            # partitions); one put per file, each visible whole or not at all.
            src = os.path.join(local, tag)
            for name in sorted(os.listdir(src)):
                p = os.path.join(src, name)
                if not os.path.isfile(p):
                    raise RuntimeError(f"unexpected entry {p} in a DeepSpeed checkpoint")
                self.store.fs.put_file(p, self.store.path(f"{self._tag_rel(tag)}/{name}"))
            shutil.rmtree(src, ignore_errors=True)
        _barrier()  # every rank's files are in place before `latest` points at them
        if rank == 0:
            rel = self._tag_rel(tag)
            files = {}
            for name in self.store.list(rel):
                sha, size = self.store.sha256(f"{rel}/{name}")
                files[name] = {"sha256": sha, "size": size}
            info = {"tag": tag, "step": int(step), "files": files}
            try:
                parse_latest(info)  # exactly what load will accept (file names included)
            except CheckpointRejected as e:
                raise RuntimeError(f"DeepSpeed wrote a checkpoint hwq cannot verify on "
                                   f"resume: {e}") from None
            self.store.write_json(f"{self.rel}/{LATEST}", info)
            for d in self.store.list_dirs(self.rel):
                if TAG_RE.fullmatch(d) and d != tag:
                    self._remove_tag(d)

    # -- housekeeping -----------------------------------------------------------------------

    def ray_storage(self) -> str:
        if self.store.is_local:
            return self.store.path(f"{self.rel}/ray_train")
        from pipeline.executor import cache_dir

        return str(cache_dir() / "ray_train" / f"finetune-{self.key}")

    def clear_ray_storage(self) -> None:
        """Empty Ray Train's storage folder before a fit: hwq resumes from its own checkpoints,
        never from Ray Train's run state, which Ray Train would otherwise read back (JSON) from
        whatever the store holds there."""
        if self.store.is_local:
            p = self.store.path(f"{self.rel}/ray_train")
            if os.path.islink(p):  # never follow a link out of the checkpoint folder
                os.unlink(p)
            self.store.remove(f"{self.rel}/ray_train")
        else:
            shutil.rmtree(self.ray_storage(), ignore_errors=True)

    def remove(self) -> None:
        self.store.remove(self.rel)
        if self.store.is_local:
            with contextlib.suppress(OSError):  # only if no other stage's checkpoints are there
                os.rmdir(self.store.path("checkpoints"))
        else:
            from pipeline.executor import cache_dir

            shutil.rmtree(cache_dir() / "finetune-ckpt" / self.key, ignore_errors=True)
            shutil.rmtree(self.ray_storage(), ignore_errors=True)
