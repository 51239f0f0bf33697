"""A synthetic weight stream for the quantizers' tests and benchmarks, and a loader of it.

`synthetic_weights(a, b)` is elements [a, b) of a (w, h) stream like trained weights and their
Fisher diagonal; `SyntheticLoader(a, b)` makes that slice inside a `ShardActor` of
`pipeline.quantize.sharded`, so a test or benchmark shards data it never ships.
"""

from __future__ import annotations

import numpy as np

__all__ = ["SyntheticLoader", "synthetic_weights"]

_SYN_CHUNK = 1 << 16


def synthetic_weights(start: int, stop: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Elements [start, stop) of a deterministic synthetic (w, h) stream, float32 each.

    w: a mixture of Laplacians (scale 0.02 around 0, 10% wider around ±0.05) like trained
    weights; h: lognormal (σ = 1.5), heavy-tailed like a Fisher diagonal, larger for larger
    |w|. Generated per chunk of 2**16 global indices from (seed, chunk), so any range equals
    the same slice of the full stream: shards can make their own data.
    """
    if stop < start:
        raise ValueError("stop < start")
    w = np.empty(stop - start, dtype=np.float32)
    h = np.empty(stop - start, dtype=np.float32)
    c0 = start // _SYN_CHUNK
    for c in range(c0, -(-stop // _SYN_CHUNK)):
        rng = np.random.default_rng([seed, c])
        m = _SYN_CHUNK
        comp = rng.random(m) < 0.1
        loc = np.where(comp, np.where(rng.random(m) < 0.5, -0.05, 0.05), 0.0)
        scale = np.where(comp, 0.04, 0.02)
        ww = (loc + rng.laplace(0.0, 1.0, m) * scale).astype(np.float32)
        hh = (rng.lognormal(0.0, 1.5, m) * (1.0 + 20.0 * np.abs(ww))).astype(np.float32)
        a = max(start, c * _SYN_CHUNK)
        b = min(stop, (c + 1) * _SYN_CHUNK)
        w[a - start:b - start] = ww[a - c * _SYN_CHUNK:b - c * _SYN_CHUNK]
        h[a - start:b - start] = hh[a - c * _SYN_CHUNK:b - c * _SYN_CHUNK]
    return w, h


class SyntheticLoader:
    """Loader (a picklable zero-argument callable, see ``pipeline.quantize.sharded``) that makes
    elements [start, stop) of `synthetic_weights` in the actor: w, h float32 [stop - start]."""

    def __init__(self, start: int, stop: int, seed: int = 0):
        self.start, self.stop, self.seed = int(start), int(stop), int(seed)

    def __call__(self) -> tuple[np.ndarray, np.ndarray]:
        return synthetic_weights(self.start, self.stop, self.seed)
