"""Fault injection for tests and `benchmarks/faults.py`: kill -9 a Ray worker in the middle of
a stage, crash or kill a fine-tune worker after a chosen step (a `pipeline.hooks` hook), seed
a store with a finished run's upstream stages, and audit a store afterwards.

The audit is the "nothing lost, nothing false" check: every stage folder with a manifest must
verify (each file's sha256 and size, no unlisted file), and every stage folder without one is
incomplete by construction (the driver recomputes it). A run that stopped cleanly may leave
incomplete folders; it must never leave a manifest over files that do not match it.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["WorkerKiller", "crash_finetune", "seed_store", "audit", "stage_digests"]


@dataclass
class WorkerKiller:
    """Kill -9, once, the first Ray worker whose process title is `ray::<one of names>` and
    whose environment has `tag` set (HWQ_FAULT_TAG=tag: only the run under test's workers),
    after it has run `after_s` seconds. `killed` holds what was killed."""

    names: tuple[str, ...]
    tag: str
    after_s: float = 1.0
    timeout_s: float = 900.0
    killed: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="hwq-killer", daemon=True)

    def start(self) -> WorkerKiller:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _match(self, p) -> bool:
        import psutil

        try:
            cmd = p.cmdline()
            if not cmd or not any(cmd[0].startswith(f"ray::{n}") for n in self.names):
                return False
            return p.environ().get("HWQ_FAULT_TAG") == self.tag
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return False

    def _watch(self) -> None:
        import psutil

        deadline = time.monotonic() + self.timeout_s
        seen: dict[int, float] = {}
        while not self._stop.is_set() and time.monotonic() < deadline:
            for p in psutil.process_iter():
                if self._match(p):
                    first = seen.setdefault(p.pid, time.monotonic())
                    if time.monotonic() - first >= self.after_s:
                        try:
                            title = p.cmdline()[0]
                            p.kill()
                            self.killed.append({"pid": p.pid, "title": title})
                        except (psutil.NoSuchProcess, psutil.AccessDenied):
                            continue
                        return
            time.sleep(0.2)


def crash_finetune(step: int, marker: str | Path | None = None) -> str:
    """The HWQ_HOOK value (`pipeline.hooks`) that crashes fine-tune workers after `step`.

    Without `marker` every worker raises right after finishing step `step` (a simulated crash;
    it fires in every attempt that reaches that step). With `marker` (a file path) the first
    worker to finish it creates the marker and exits its process at once (`os._exit`, as if
    killed); no worker fires once the marker exists, so a restarted worker group finishes.
    Set it in the driver's environment: the driver hands it to its workers."""
    return f"{__name__}:finetune_crash_hook:{int(step)}" + (f",{marker}" if marker else "")


def finetune_crash_hook(event: str, argument: str, *, step: int, **info: Any) -> None:
    """The hook `crash_finetune` names; argument: "<step>[,<marker path>]"."""
    if event != "finetune.step":
        return
    at, _, marker = argument.partition(",")
    if step != int(at):
        return
    if not marker:
        raise RuntimeError(f"simulated failure after step {step}")
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        return  # it already fired (in this attempt's other worker, or an earlier attempt)
    os.close(fd)
    print(f"finetune: test hook: killing this worker (pid {os.getpid()}) after step {step}",
          flush=True)
    os._exit(1)  # no cleanup, no exception: as if the process were killed


def seed_store(src, dst, stages: dict[str, str]) -> None:
    """Copy the folders of `stages` ({name: key}) from Store `src` to Store `dst` (what a
    resumed run finds: the stages it already finished)."""
    for name, key in stages.items():
        prefix = f"stages/{name}-{key}"
        for rel in src.list(prefix):
            dst.write_bytes(f"{prefix}/{rel}", src.read_bytes(f"{prefix}/{rel}", None))


def audit(store) -> dict[str, Any]:
    """{"complete": [stage folders whose manifest verifies], "incomplete": [folders without
    a valid manifest], "false": [folders whose manifest does not match their files]}."""
    from pipeline.manifest import MANIFEST, Manifest
    from pipeline.store import StageDir

    out: dict[str, list[str]] = {"complete": [], "incomplete": [], "false": []}
    for folder in store.list_dirs("stages"):
        name, _, key = folder.rpartition("-")
        sd = StageDir(store, name, key)
        if not store.exists(sd.rel(MANIFEST)):
            out["incomplete"].append(folder)
            continue
        try:
            m = Manifest.model_validate_json(store.read_bytes(sd.rel(MANIFEST)))
        except ValueError:
            out["incomplete"].append(folder)
            continue
        sd.outputs = {f: o.model_dump(exclude_none=True) for f, o in m.outputs.items()}
        (out["complete"] if sd.verify() is None else out["false"]).append(folder)
    return out


def stage_digests(store, stages: dict[str, dict[str, Any]]) -> dict[str, dict[str, str]]:
    """{stage: {file: sha256}} from the manifests of a report's `stages`."""
    out = {}
    for name, s in stages.items():
        m = store.read_json(f"stages/{name}-{s['key']}/manifest.json")
        out[name] = {f: o["sha256"] for f, o in m["outputs"].items()}
    return out
