"""The quantizers' Ray twin: parameter sharding over actors, exact by construction.

Each :class:`ShardActor` owns a block-aligned shard of (w, h) that it builds itself from a
*loader* (a picklable zero-argument callable, e.g. one that reads its slice from the object
store), so the driver never ships the data. :class:`RayBackend` implements
``backend.StatsBackend`` over the actors: per Lloyd iteration only the centres (and an ECSQ
penalty) go out, and per-block statistics ``[n_blocks, 4, k]`` come back; the driver reduces the
blocks of all shards, in global order, exactly as ``backend.LocalBackend`` does, so every
quantizer of ``scalar`` and ``entropy_constrained`` run on a RayBackend returns bit-identical
results to its single-process run with the same ``block`` and seed.

Faults. An actor holds no state but its shard, which its constructor rebuilds from the loader,
and every method is a pure function of that shard and its arguments (the centres, the ECSQ
penalty, the sample indices are sent with each call; no state is carried across Lloyd
iterations). So the actors are created restartable (``ACTOR_FAULT_OPTIONS``: Ray restarts a
killed actor process, which re-reads its shard, and retries the calls it lost), and a retried
call returns the same bits as the lost one: a run in which an actor was killed gives the
bit-identical result of an undisturbed run. An exception raised by a loader or a method is not
retried (it would only repeat); Ray's actor restarts are for dead processes.

Channel scope needs no reduction: :func:`solve_channels_sharded` gives row ranges to Ray tasks
and concatenates; every row depends only on its own data, the seed and its global index.

Example, with ``SliceLoader(a, b)`` a loader of elements [a, b)::

    ranges = shard_ranges(n, 2, BLOCK)
    with RayBackend([SliceLoader(a, b) for a, b in ranges], [a for a, _ in ranges]) as be:
        res = hw_kmeans(be, None, 32)
"""

from __future__ import annotations

import os
import resource
from collections.abc import Callable, Sequence
from itertools import pairwise
from typing import Any

import numpy as np
import ray

from .backend import BLOCK, DataSummary, block_codes, block_stats
from .channel import ChannelResult, solve_channels

__all__ = [
    "ACTOR_FAULT_OPTIONS",
    "ArrayLoader",
    "RayBackend",
    "ShardActor",
    "shard_ranges",
    "solve_channels_sharded",
]

Loader = Callable[[], tuple[np.ndarray, "np.ndarray | None"]]

# Ray options every ShardActor gets unless actor_options overrides them: restart a dead actor
# process (its constructor re-reads the shard) and retry the calls that died with it; safe
# because every method is a pure function of the shard and its arguments (module docstring).
# Bounded, so an actor that keeps dying (out of memory on its shard) ends the run.
ACTOR_FAULT_OPTIONS: dict[str, Any] = {"max_restarts": 3, "max_task_retries": 3}


def shard_ranges(n: int, n_shards: int, block: int = BLOCK) -> list[tuple[int, int]]:
    """n_shards contiguous [start, stop) ranges over n elements, starts multiples of block.

    Balances element counts (whole blocks per shard, ±1 block); a shard is empty when there
    are fewer blocks than shards.
    """
    if n_shards < 1 or block < 1 or n < 0:
        raise ValueError("need n >= 0, n_shards >= 1, block >= 1")
    n_blocks = -(-n // block)
    cuts = [min(round(i * n_blocks / n_shards) * block, n) for i in range(n_shards + 1)]
    return list(pairwise(cuts))


class ArrayLoader:
    """Loader over arrays already in memory (w float32 [n], h float32 [n] or None).

    Pickles its arrays into the actor (Ray puts them in the object store once); for data
    that lives elsewhere write a loader that reads its own shard instead.
    """

    def __init__(self, w: np.ndarray, h: np.ndarray | None = None):
        self.w, self.h = w, h

    def __call__(self) -> tuple[np.ndarray, np.ndarray | None]:
        return self.w, self.h


@ray.remote
class ShardActor:
    """Holds one shard: w float32 [n_s], h float32 [n_s] or None, starting at a block boundary.

    Methods mirror backend.StatsBackend on the shard; stats() returns the shard's blocks
    [ceil(n_s / block), 4, k], computed by the same code as LocalBackend.
    """

    def __init__(self, loader: Loader, block: int = BLOCK, threads: int = 1):
        from pipeline.placement import note

        note("ShardActor")
        w, h = loader()
        self.w = np.ascontiguousarray(np.asarray(w).ravel(), dtype=np.float32)
        self.h = None if h is None else np.ascontiguousarray(np.asarray(h).ravel(),
                                                             dtype=np.float32)
        if self.h is not None and self.h.shape != self.w.shape:
            raise ValueError(f"shard w and h differ in length: {self.w.shape} vs {self.h.shape}")
        self.block = int(block)
        self.threads = int(threads)

    def info(self) -> tuple[int, DataSummary]:
        return int(self.w.shape[0]), DataSummary.of(self.w, self.h)

    def stats(self, centres, penalty, assign_h: bool, moment_h: bool) -> np.ndarray:
        return block_stats(self.w, self.h, centres, penalty, assign_h=assign_h, moment_h=moment_h,
                           block=self.block, threads=self.threads)

    def sample(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        return self.w[idx], (None if self.h is None else self.h[idx])

    def codes(self, centres, penalty, assign_h: bool) -> np.ndarray:
        return block_codes(self.w, self.h, centres, penalty, assign_h=assign_h, block=self.block,
                           threads=self.threads)

    def peak_rss_bytes(self) -> int:
        """Peak resident memory of this actor's process (Linux ru_maxrss is in KiB)."""
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024

    def pid(self) -> int:
        """This actor's process id (a restarted actor has a new one)."""
        return os.getpid()

    def note_memory(self) -> None:
        """Record this actor's peak memory for the stage's manifest (pipeline/placement.py)."""
        from pipeline.placement import note_memory

        note_memory("ShardActor")


class RayBackend:
    """backend.StatsBackend over ShardActors, one per loader.

    loaders: picklable zero-argument callables, loader i returning (w, h) of shard i.
    block_offsets: global start of each shard (multiples of block, contiguous, in order); None
    derives them from the shard lengths (then every shard but the last must be a whole number
    of blocks). block: statistics block size (use the same as the LocalBackend it must match).
    actor_options: passed to ShardActor.options over ACTOR_FAULT_OPTIONS (e.g. {"num_cpus": 1}
    to reserve a core each; the default reserves none, so more actors than CPUs still start).
    threads: threads per actor over its blocks.
    Use as a context manager, or call close(), to free the actors.
    """

    def __init__(self, loaders: Sequence[Loader], block_offsets: Sequence[int] | None = None, *,
                 block: int = BLOCK, actor_options: dict[str, Any] | None = None,
                 threads: int = 1):
        if not loaders:
            raise ValueError("need at least one loader")
        self.block = int(block)
        if block_offsets is not None:
            offs = np.asarray(block_offsets, dtype=np.int64)
            # Fail before starting any actor.
            if offs.shape != (len(loaders),) or np.any(offs % self.block):
                raise ValueError(f"block_offsets {offs.tolist()} must give one start per loader, "
                                 f"each a multiple of block={self.block}; use shard_ranges()")
        opts = {**ACTOR_FAULT_OPTIONS, **(actor_options or {})}
        self._actors = [ShardActor.options(**opts).remote(ld, self.block, threads)
                        for ld in loaders]
        try:
            infos = ray.get([a.info.remote() for a in self._actors])
        except Exception:
            # A loader failed in its actor: do not leave the other actors holding their shards.
            self.close()
            raise
        lengths = [n for n, _ in infos]
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        if block_offsets is not None:
            given = np.asarray(block_offsets, dtype=np.int64)
            if given.shape != starts.shape or not np.array_equal(given, starts):
                self.close()
                raise ValueError(f"block_offsets {given.tolist()} do not match the shard lengths "
                                 f"{lengths} (shards must be contiguous, in order)")
        if np.any(starts % self.block):
            self.close()
            raise ValueError(f"shard starts {starts.tolist()} are not multiples of block="
                             f"{self.block}; use shard_ranges() to cut the data")
        self.starts = starts
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.n = int(self.lengths.sum())
        self._summary = DataSummary.combine([s for _, s in infos])

    # -- StatsBackend -----------------------------------------------------------------------

    def summary(self) -> DataSummary:
        return self._summary

    def stats(self, centres, penalty=None, *, assign_h=True, moment_h=True) -> np.ndarray:
        c = np.ascontiguousarray(centres, dtype=np.float64)
        p = None if penalty is None else np.ascontiguousarray(penalty, dtype=np.float64)
        parts = ray.get([a.stats.remote(c, p, assign_h, moment_h) for a in self._actors])
        # Shards are block-aligned and in order: the concatenation is the global block array.
        return np.concatenate(parts, axis=0)

    def sample(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        idx = np.asarray(idx, dtype=np.int64)
        bounds = np.searchsorted(idx, np.append(self.starts, self.n))
        refs = [a.sample.remote(idx[bounds[i]:bounds[i + 1]] - self.starts[i])
                for i, a in enumerate(self._actors)]
        parts = ray.get(refs)
        w = np.concatenate([p[0] for p in parts])
        h = None if any(p[1] is None for p in parts) else np.concatenate([p[1] for p in parts])
        return w, h

    def codes(self, centres, penalty=None, *, assign_h=True) -> np.ndarray:
        c = np.ascontiguousarray(centres, dtype=np.float64)
        p = None if penalty is None else np.ascontiguousarray(penalty, dtype=np.float64)
        return np.concatenate(ray.get([a.codes.remote(c, p, assign_h) for a in self._actors]))

    # -- housekeeping -------------------------------------------------------------------------

    def peak_rss_bytes(self) -> list[int]:
        """Peak resident memory of each actor's process."""
        return ray.get([a.peak_rss_bytes.remote() for a in self._actors])

    def close(self) -> None:
        actors = getattr(self, "_actors", [])
        try:  # telemetry: the actors' peak memory into the manifest, then they go
            ray.get([a.note_memory.remote() for a in actors], timeout=60)
        except Exception:  # noqa: BLE001 - a dead actor has nothing to report
            pass
        for a in actors:
            ray.kill(a)
        self._actors = []

    def __enter__(self) -> RayBackend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@ray.remote
def _solve_rows(W, H, mask, k, row_offset, opts) -> ChannelResult:
    return solve_channels(W, H, k, mask=mask, row_offset=row_offset, **opts)


def solve_channels_sharded(W: np.ndarray, H: np.ndarray | None, k: int, *,
                           mask: np.ndarray | None = None, n_tasks: int | None = None,
                           task_options: dict[str, Any] | None = None,
                           **opts: Any) -> ChannelResult:
    """channel.solve_channels with row ranges spread over Ray tasks; bit-identical to it.

    W, H, mask: [rows, cols] as in solve_channels; opts: its keyword options (weighted, n_init,
    init_iter, max_iter, tol, seed, batch_rows, name). n_tasks: number of row ranges (default:
    the cluster's CPU count), balanced by kept elements. task_options: Ray task options.
    """
    W = np.asarray(W)
    if W.ndim != 2:
        raise ValueError(f"W must be 2-D [rows, cols], got shape {W.shape}")
    if "row_offset" in opts:
        raise ValueError("row_offset is set per task")
    R = W.shape[0]
    if n_tasks is None:
        n_tasks = max(1, int(ray.cluster_resources().get("CPU", 1)))
    n_tasks = max(1, min(int(n_tasks), R))
    # Balance by kept elements (the cost), not by number of rows.
    cost = np.cumsum(mask.sum(axis=1) if mask is not None else np.full(R, W.shape[1]))
    total = cost[-1] if R else 0
    cuts = [0] + [int(np.searchsorted(cost, total * i / n_tasks, side="left")) + 1
                  for i in range(1, n_tasks)] + [R]
    cuts = sorted(set(min(max(c, 0), R) for c in cuts))
    fn = _solve_rows.options(**task_options) if task_options else _solve_rows
    refs = [fn.remote(W[a:b], None if H is None else H[a:b], None if mask is None else mask[a:b],
                      k, a, opts) for a, b in pairwise(cuts) if b > a]
    return ChannelResult.concat(ray.get(refs))
