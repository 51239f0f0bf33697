"""Scalar quantizers (k-means, Hessian-weighted k-means, uniform, ECSQ) and their Ray twin.

The numpy functions live in ``scalar`` (k-means, uniform, the Lloyd loop), ``entropy_constrained``
(ECSQ), ``channel`` (one codebook per row), ``backend`` (block statistics, ``LocalBackend``) and
``kernels`` (numba); the Ray-sharded backend in ``sharded`` is imported on first use of one of
its names, so ``import pipeline.quantize`` never imports Ray.
"""

from __future__ import annotations

import importlib
from typing import Any

from .backend import (
    BLOCK,
    DataSummary,
    LocalBackend,
    StatsBackend,
    block_codes,
    block_stats,
    code_dtype,
    entropy_bits,
)
from .channel import ChannelResult, solve_channels
from .entropy_constrained import ecsq
from .scalar import QuantResult, hw_kmeans, kmeans, uniform

_SHARDED = ("ArrayLoader", "RayBackend", "ShardActor", "shard_ranges", "solve_channels_sharded")

__all__ = [
    "BLOCK",
    "ChannelResult",
    "DataSummary",
    "LocalBackend",
    "QuantResult",
    "StatsBackend",
    "block_codes",
    "block_stats",
    "code_dtype",
    "ecsq",
    "entropy_bits",
    "hw_kmeans",
    "kmeans",
    "solve_channels",
    "uniform",
    *_SHARDED,
]


def __getattr__(name: str) -> Any:
    # PEP 562: Ray is heavy to import; pull in the sharded module only when asked for.
    if name in _SHARDED:
        return getattr(importlib.import_module(".sharded", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
