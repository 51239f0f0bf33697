"""Where the weights live: the statistics backend the 1-D Lloyd loops talk to.

One Lloyd loop, many places to run it
-------------------------------------
The 1-D quantizers (``scalar``, ``entropy_constrained``) are written once over
:class:`StatsBackend`: per iteration the driver sends the sorted centres (and, for ECSQ, a
per-cluster penalty) and gets back per-*block* sufficient statistics ``[n_blocks, 4, k]``
float64 = (count, Σh, Σh·w, Σh·w²). Blocks are fixed-size slices of the *global* index
(``BLOCK`` = 2**20 elements by default) and the driver reduces the block array in order with one
``np.sum(axis=0)`` (:func:`reduce_blocks`), so any split of the data into block-aligned shards
(``pipeline.quantize.sharded.RayBackend``) gives bit-identical centres and codes to the
in-process :class:`LocalBackend`. :func:`block_stats` and :func:`block_codes` compute one
array's blocks for both.

Also the small helpers every quantizer module shares (code dtypes, entropy, float32 rounding,
read-only views for numba, error-message subjects).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import pairwise
from typing import Protocol, runtime_checkable

import numpy as np

from .kernels import codes_kernel, prep_centres, stats_kernel, summary_kernel

__all__ = [
    "BLOCK",
    "DataSummary",
    "LocalBackend",
    "StatsBackend",
    "backend_of",
    "block_codes",
    "block_stats",
    "code_dtype",
    "entropy_bits",
    "read_only",
    "reduce_blocks",
    "round_f32",
    "run_ranges",
    "subject_of",
]

# Statistics are reduced per block of the global index; 2**20 keeps a block's [4, k] float64
# accumulator in L1 and the per-iteration payload tiny (100M weights → 96 blocks).
BLOCK = 1 << 20


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def code_dtype(k: int) -> np.dtype:
    """Smallest unsigned dtype holding indices 0..k-1: uint8 (k ≤ 256), uint16, else uint32."""
    if k <= 1 << 8:
        return np.dtype(np.uint8)
    if k <= 1 << 16:
        return np.dtype(np.uint16)
    return np.dtype(np.uint32)


def entropy_bits(counts: np.ndarray) -> float:
    """Entropy (bits per symbol) of the empirical distribution with these counts [k]."""
    c = np.asarray(counts, dtype=np.float64)
    c = c[c > 0]
    if c.size <= 1:
        return 0.0
    p = c / c.sum()
    return float(max(-(p * np.log2(p)).sum(), 0.0))


def round_f32(x: np.ndarray) -> np.ndarray:
    """Round to the nearest float32 but keep float64 storage.

    Centres are rounded at every update: the nearest float32 to the new mean is never further
    from it than the previous (float32) centre, so the objective still cannot increase, the loop
    reaches an exact fixed point, and the returned float32 centres are the ones the objective
    was measured with.
    """
    return np.asarray(x, dtype=np.float32).astype(np.float64)


def read_only(a: np.ndarray) -> np.ndarray:
    """A read-only view. Numba compiles read-only and writable arrays separately, and arrays
    that arrive through Ray's object store are read-only: handing the kernels read-only views
    everywhere keeps one (cached) compilation for drivers and workers alike."""
    v = a.view()
    v.flags.writeable = False
    return v


def subject_of(name: str | None) -> str:
    """How error messages name the data: ``tensor NAME``, or ``input`` without a name."""
    return f"tensor {name}" if name else "input"


# --------------------------------------------------------------------------------------------
# Data summary (validation) and the backend protocol
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataSummary:
    """What the driver needs to know about (w, h) before quantizing; one pass over the data."""

    n: int
    has_h: bool
    w_min: float
    w_max: float
    w_nan: int = 0
    w_inf: int = 0
    h_nan: int = 0
    h_inf: int = 0
    h_neg: int = 0
    h_pos: int = 0  # number of strictly positive h (0 → all-zero h)

    @staticmethod
    def of(w: np.ndarray, h: np.ndarray | None) -> DataSummary:
        """Summary of one array pair: w float32 [n], h float32 [n] or None."""
        w = read_only(w)
        r = summary_kernel(w, w if h is None else read_only(h), h is not None)
        return DataSummary(w.shape[0], h is not None, float(r[2]), float(r[3]), *map(int, r[:2]),
                           *map(int, r[4:]))

    @staticmethod
    def combine(parts: list[DataSummary]) -> DataSummary:
        """Summary of the concatenation of shards (min/max and counts are order-free)."""
        return DataSummary(
            n=sum(p.n for p in parts),
            has_h=all(p.has_h for p in parts),
            w_min=min((p.w_min for p in parts), default=math.inf),
            w_max=max((p.w_max for p in parts), default=-math.inf),
            w_nan=sum(p.w_nan for p in parts),
            w_inf=sum(p.w_inf for p in parts),
            h_nan=sum(p.h_nan for p in parts),
            h_inf=sum(p.h_inf for p in parts),
            h_neg=sum(p.h_neg for p in parts),
            h_pos=sum(p.h_pos for p in parts),
        )

    def check(self, name: str | None = None) -> None:
        """Raise ValueError for empty input, NaN/inf in w or h, or negative h."""
        s = subject_of(name)
        if self.n == 0:
            raise ValueError(f"{s} is empty: nothing to quantize")
        for count, what in ((self.w_nan, "NaN values in w"), (self.w_inf, "infinite values in w"),
                            (self.h_nan, "NaN values in h"), (self.h_inf, "infinite values in h")):
            if count:
                raise ValueError(f"{s} has {count} {what}")
        if self.h_neg:
            raise ValueError(
                f"{s} has {self.h_neg} negative values in h: quantization weights must be >= 0; "
                "take abs(h) or clamp at 0 (e.g. np.maximum(h, 0)) before quantizing"
            )


@runtime_checkable
class StatsBackend(Protocol):
    """Where the weights live. The Lloyd loops only talk to this.

    n: total number of weights. Block b covers global indices [b·block, (b+1)·block).
    """

    n: int

    def summary(self) -> DataSummary:
        """Validation counts and the range of w (one pass, cached)."""
        ...

    def stats(self, centres: np.ndarray, penalty: np.ndarray | None = None, *,
              assign_h: bool = True, moment_h: bool = True) -> np.ndarray:
        """Per-block statistics [n_blocks, 4, k] float64: (count, Σh, Σh·w, Σh·w²).

        centres: float64 [k] sorted. penalty: float64 [k] or None; with a penalty the
        assignment is argmin_j h_i (w_i − c_j)² + penalty_j (h_i ≡ 1 when assign_h is False),
        without it the nearest centre. moment_h=False accumulates with h ≡ 1.
        """
        ...

    def sample(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(w[idx] float32, h[idx] float32 or None when the backend holds no h); idx int64 sorted."""
        ...

    def codes(self, centres: np.ndarray, penalty: np.ndarray | None = None, *,
              assign_h: bool = True) -> np.ndarray:
        """Cluster index per weight [n], dtype code_dtype(k), same assignment rule as stats()."""
        ...


def _block_ranges(n_blocks: int, threads: int) -> list[tuple[int, int]]:
    t = max(1, min(threads, n_blocks))
    cuts = [round(i * n_blocks / t) for i in range(t + 1)]
    return [(a, b) for a, b in pairwise(cuts) if b > a]


def run_ranges(fn: Callable[[int, int], None], n_blocks: int, threads: int) -> None:
    ranges = _block_ranges(n_blocks, threads)
    if len(ranges) <= 1:
        for a, b in ranges:
            fn(a, b)
        return
    # The kernels release the GIL; each thread owns whole blocks, so results do not depend on
    # the number of threads.
    with ThreadPoolExecutor(len(ranges)) as ex:
        list(ex.map(lambda ab: fn(*ab), ranges))


def block_stats(w: np.ndarray, h: np.ndarray | None, centres: np.ndarray,
                penalty: np.ndarray | None = None, *, assign_h: bool = True,
                moment_h: bool = True, block: int = BLOCK, threads: int = 1) -> np.ndarray:
    """Per-block statistics of one block-aligned array: [ceil(n/block), 4, k] float64.

    w float32 [n], h float32 [n] or None (then h ≡ 1); see StatsBackend.stats for the rest.
    Shared by LocalBackend and the Ray shard actors, so both compute identical blocks.
    """
    args = prep_centres(centres, penalty)
    n_blocks = -(-w.shape[0] // block)
    out = np.zeros((n_blocks, 4, args[0].shape[0]))
    w = read_only(w)
    hh = w if h is None else read_only(h)
    ah, mh = bool(assign_h and h is not None), bool(moment_h and h is not None)
    run_ranges(lambda a, b: stats_kernel(w, hh, ah, mh, *args, block, a, b, out), n_blocks,
               threads)
    return out


def block_codes(w: np.ndarray, h: np.ndarray | None, centres: np.ndarray,
                penalty: np.ndarray | None = None, *, assign_h: bool = True,
                block: int = BLOCK, threads: int = 1) -> np.ndarray:
    """Assignment of every element [n], dtype code_dtype(k); see StatsBackend.codes."""
    args = prep_centres(centres, penalty)
    out = np.empty(w.shape[0], dtype=code_dtype(args[0].shape[0]))
    n_blocks = -(-w.shape[0] // block)
    w = read_only(w)
    hh = w if h is None else read_only(h)
    ah = bool(assign_h and h is not None)
    run_ranges(lambda a, b: codes_kernel(w, hh, ah, *args, block, a, b, out), n_blocks, threads)
    return out


def _as_f32_1d(x, what: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{what} must be 1-D, got shape {a.shape}")
    return np.ascontiguousarray(a, dtype=np.float32)


class LocalBackend:
    """In-process backend over arrays w float32 [n] and h float32 [n] (or None: h ≡ 1).

    block: statistics block size (results are bit-identical to a RayBackend with the same
    block). threads: blocks are spread over this many threads (results do not depend on it).
    Inputs of another dtype are converted to float32 (a copy).
    """

    def __init__(self, w: np.ndarray, h: np.ndarray | None = None, *, block: int = BLOCK,
                 threads: int = 1):
        self.w = _as_f32_1d(w, "w")
        self.h = None if h is None else _as_f32_1d(h, "h")
        if self.h is not None and self.h.shape != self.w.shape:
            raise ValueError(f"w and h differ in length: {self.w.shape[0]} vs {self.h.shape[0]}")
        if block <= 0:
            raise ValueError("block must be positive")
        self.n = int(self.w.shape[0])
        self.block = int(block)
        self.threads = int(threads)
        self._summary: DataSummary | None = None

    def summary(self) -> DataSummary:
        if self._summary is None:
            self._summary = DataSummary.of(self.w, self.h)
        return self._summary

    def stats(self, centres, penalty=None, *, assign_h=True, moment_h=True) -> np.ndarray:
        return block_stats(self.w, self.h, centres, penalty, assign_h=assign_h,
                           moment_h=moment_h, block=self.block, threads=self.threads)

    def sample(self, idx):
        return self.w[idx], (None if self.h is None else self.h[idx])

    def codes(self, centres, penalty=None, *, assign_h=True) -> np.ndarray:
        return block_codes(self.w, self.h, centres, penalty, assign_h=assign_h, block=self.block,
                           threads=self.threads)


def reduce_blocks(blocks: np.ndarray) -> np.ndarray:
    """Statistics [4, k] of the whole data from per-block statistics [n_blocks, 4, k]."""
    # One ordered reduction over the concatenated block array: the same bits whatever the shards.
    return np.sum(blocks, axis=0)


def backend_of(w, h, name) -> StatsBackend:
    """The backend a quantizer runs on: w itself if it is one (then h must be None), else a
    LocalBackend over the arrays (w, h)."""
    if isinstance(w, StatsBackend) and not isinstance(w, np.ndarray):
        if h is not None:
            raise ValueError("pass h inside the backend, not beside it")
        return w
    return LocalBackend(w, h)
