"""Progress bars that work in the driver and inside Ray workers, and the fallback log handler
that shows a run's progress to a caller of the Python API who set up no logging.

Inside a Ray task or actor, `ray.experimental.tqdm_ray` sends bar updates to the driver, which
draws them in place instead of interleaving raw carriage returns from many workers.
"""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["bar", "default_log_handler"]


def _in_ray_worker() -> bool:
    try:
        import ray

        return ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE
    except Exception:
        return False


def _enabled() -> bool:
    env = os.environ.get("HWQ_PROGRESS")
    if env is not None:
        return env != "0"
    return sys.stderr.isatty()


def bar(total: int | None, desc: str, unit: str = "it"):
    """A tqdm-like bar (`update(n)`, `close()`); silent when output is not a terminal
    (HWQ_PROGRESS=1 forces bars, 0 hides them), where stages log lines instead."""
    if not _enabled():
        from tqdm.auto import tqdm

        return tqdm(total=total, disable=True)
    if _in_ray_worker():
        from ray.experimental.tqdm_ray import tqdm

        return tqdm(total=total, desc=desc, unit=unit)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False)


class _FallbackHandler(logging.StreamHandler):
    """Writes hwq's records to stderr only while the root logger has no handler: progress
    for a caller of the Python API who configured no logging, and no second copy of each line
    once anyone (the CLI, the caller) has."""

    def emit(self, record: logging.LogRecord) -> None:
        if not logging.getLogger().handlers:
            super().emit(record)


_LOGGERS = ("hwq", "pipeline")  # the stage lines; module loggers (executor: Ray starting)


def default_log_handler() -> None:
    """Give hwq's loggers a fallback handler (as transformers gives its own), so that
    `pipeline.compress` shows its progress without any logging setup; INFO and above unless
    the caller set a level. Idempotent."""
    quiet = not logging.getLogger().handlers
    for name in _LOGGERS:
        lg = logging.getLogger(name)
        if not any(isinstance(h, _FallbackHandler) for h in lg.handlers):
            h = _FallbackHandler()
            h.setFormatter(logging.Formatter("%(asctime)s %(levelname).1s %(name)s: %(message)s",
                                             "%H:%M:%S"))
            lg.addHandler(h)
        if quiet and lg.level == logging.NOTSET:
            lg.setLevel(logging.INFO)
