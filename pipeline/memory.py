"""Memory as a figure: peak resident memory of this process, and a sampler of a process tree.

`peak_rss()` is the kernel's high-water mark of this process's resident set (``ru_maxrss``):
a Ray task returns it with its result, so a stage's manifest records the peak of the driver
and of every worker that ran it (a reused worker reports its lifetime peak: an upper bound).
`RssSampler` polls the resident set of a root process and all its descendants every
``interval`` seconds (psutil) and keeps each one's peak, for a benchmark that must bound the
sum over every process of a run; `gpu_peak()` adds the CUDA allocator's peak where there is a
GPU.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
import time
from dataclasses import dataclass, field

__all__ = ["peak_rss", "gpu_peak", "process_peaks", "release_memory", "RssSampler"]


def peak_rss() -> int:
    """Bytes: this process's peak resident set so far."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


_TRIM = None


def release_memory() -> None:
    """Hand freed heap memory back to the system (glibc's malloc_trim(0); a no-op elsewhere).

    glibc keeps freed blocks of a few MB in its heap (its mmap threshold rises with every large
    block freed), so a loop over tensors of tens of MB grows a process well past what it
    holds at any moment; the streamed stages call this between tensors."""
    global _TRIM
    if _TRIM is None:
        import ctypes
        import ctypes.util

        try:
            _TRIM = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


def gpu_peak() -> int | None:
    """Bytes: the CUDA allocator's peak on the current device, or None without a GPU."""
    try:
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.max_memory_allocated())
    except Exception:  # noqa: BLE001 - no torch or no driver: simply no GPU figure
        pass
    return None


def process_peaks() -> dict:
    """What a task reports about itself: pid, peak RSS, GPU peak (None without a GPU)."""
    return {"pid": os.getpid(), "peak_rss": peak_rss(), "gpu_peak": gpu_peak()}


@dataclass
class _Proc:
    name: str
    peak: int = 0
    first: float = 0.0
    last: float = 0.0


@dataclass
class RssSampler:
    """Sample the RSS of `root` (default: this process) and its descendants."""

    root: int = field(default_factory=os.getpid)
    interval: float = 0.5
    procs: dict[int, _Proc] = field(default_factory=dict)
    peak_total: int = 0
    samples: int = 0

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> int:
        import psutil

        now = time.time()
        try:
            top = psutil.Process(self.root)
            procs = [top, *top.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0
        total = 0
        for p in procs:
            try:
                rss = p.memory_info().rss
                if p.pid not in self.procs:
                    self.procs[p.pid] = _Proc(_label(p), first=now)
                elif not self.procs[p.pid].name.startswith("ray::"):
                    self.procs[p.pid].name = _label(p)  # a starting worker takes its title late
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            rec = self.procs[p.pid]
            rec.peak = max(rec.peak, rss)
            rec.last = now
            total += rss
        self.peak_total = max(self.peak_total, total)
        self.samples += 1
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def start(self) -> RssSampler:
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()

    def __enter__(self) -> RssSampler:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def sum_of_peaks(self) -> int:
        return sum(p.peak for p in self.procs.values())

    def table(self) -> list[dict]:
        return [{"pid": pid, "process": p.name, "peak_rss": p.peak, "seconds": p.last - p.first}
                for pid, p in sorted(self.procs.items(), key=lambda kv: -kv[1].peak)]


_KNOWN = ("raylet", "gcs_server", "default_worker.py", "dashboard.py", "agent.py",
          "log_monitor.py", "monitor.py", "runtime_env_agent.py")


def _label(p) -> str:
    """A readable name: Ray's process title (ray::<task>) or the program's file name."""
    try:
        cmd = p.cmdline()
        name = p.name()
    except Exception:  # noqa: BLE001 - a process that vanished keeps a plain label
        return "?"
    if name.startswith("ray::") or (cmd and cmd[0].startswith("ray::")):
        return cmd[0].split()[0] if cmd else name
    for c in cmd:  # the executable, or the script an interpreter runs
        base = os.path.basename(c)
        if base in _KNOWN:
            return base
    return "driver" if p.pid == os.getpid() else name
