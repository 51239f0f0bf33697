"""Progress bars that work in the driver and inside Ray workers.

Inside a Ray task or actor, `ray.experimental.tqdm_ray` sends bar updates to the driver, which
draws them in place instead of interleaving raw carriage returns from many workers.
"""

from __future__ import annotations

import os
import sys

__all__ = ["bar"]


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
