"""The Ray-sharded quantizers equal their single-process twins bit for bit."""

from itertools import pairwise

import numpy as np
import pytest

from pipeline.quantize import (
    LocalBackend,
    ecsq,
    hw_kmeans,
    kmeans,
    solve_channels,
    uniform,
)
from testkit.synthetic import SyntheticLoader, synthetic_weights

N = 120_000
BLOCK = 1 << 13  # small blocks so three shards each get several


def test_shard_ranges_are_block_aligned_and_balanced():
    from pipeline.quantize import shard_ranges

    r = shard_ranges(10 * 1000 + 7, 3, 1000)
    assert r[0][0] == 0 and r[-1][1] == 10_007
    assert all(a % 1000 == 0 and b == c for (a, b), (c, _) in pairwise(r))
    sizes = [b - a for a, b in r]
    assert max(sizes) - min(sizes) <= 1000
    assert shard_ranges(5, 3, 1000) == [(0, 0), (0, 5), (5, 5)]


@pytest.fixture(scope="module")
def shards(ray_local):
    """Three actors that make their own shard of the synthetic stream (no data shipped)."""
    from pipeline.quantize import RayBackend, shard_ranges

    ranges = shard_ranges(N, 3, BLOCK)
    be = RayBackend([SyntheticLoader(a, b, seed=7) for a, b in ranges], [a for a, _ in ranges],
                    block=BLOCK)
    yield be
    be.close()


@pytest.fixture(scope="module")
def local():
    return LocalBackend(*synthetic_weights(0, N, seed=7), block=BLOCK)


def _same(a, b):
    np.testing.assert_array_equal(a.centres, b.centres)
    np.testing.assert_array_equal(a.codes, b.codes)
    assert a.history == b.history
    assert a.entropy_bits == b.entropy_bits
    assert a.weighted_distortion == b.weighted_distortion


def test_network_scope_kmeans_variants_equal_local(shards, local):
    assert shards.n == N and shards.summary() == local.summary()
    # sample_size < N: the inits gather a sample from the three actors by global index.
    # Few iterations keep the Ray round trips down; exactness does not depend on it.
    for fn in (lambda be: hw_kmeans(be, None, 16, seed=3, sample_size=30_000, max_iter=15),
               lambda be: kmeans(be, 16, seed=3, max_iter=15)):
        _same(fn(shards), fn(local))


def test_network_scope_uniform_and_ecsq_equal_local(shards, local):
    _same(uniform(shards, target_bits=3.0), uniform(local, target_bits=3.0))
    a = ecsq(local, lam=2e-4, init_bits=4.0, max_iter=15)
    _same(ecsq(shards, lam=2e-4, init_bits=4.0, max_iter=15), a)


def test_misaligned_offsets_are_refused_before_any_actor_starts(ray_local):
    from pipeline.quantize import ArrayLoader, RayBackend

    w, h = synthetic_weights(0, 3000, seed=1)
    with pytest.raises(ValueError, match="multiple of block"):
        RayBackend([ArrayLoader(w[:1500], h[:1500]), ArrayLoader(w[1500:], h[1500:])],
                   [0, 1500], block=1000)


def test_channel_scope_sharded_equals_local(ray_local):
    from pipeline.quantize import solve_channels_sharded

    w, h = synthetic_weights(0, 30 * 512, seed=4)
    W, H = w.reshape(30, 512), h.reshape(30, 512)
    mask = np.random.default_rng(1).random(W.shape) < 0.6
    a = solve_channels(W, H, 8, mask=mask, seed=2, batch_rows=8)
    b = solve_channels_sharded(W, H, 8, mask=mask, seed=2, batch_rows=8, n_tasks=3)
    assert b.info["parts"] == 3
    for f in ("centres", "codes", "counts", "history", "n_iter", "weighted_distortion",
              "distortion", "entropy_bits"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))


class _KillingBackend:
    """Mixin for RayBackend: SIGKILLs one actor's process right before the `at`-th stats call
    is sent (so the call goes to a dead or restarting actor), and remembers the pid."""

    at, victim = 3, -1

    def stats(self, *args, **kwargs):
        import os
        import signal

        import ray

        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == self.at:
            pid = ray.get(self._actors[self.victim].pid.remote())
            os.kill(pid, signal.SIGKILL)
            self.killed = pid
        return super().stats(*args, **kwargs)


def killing_backend(**attrs):
    """A RayBackend subclass that kills an actor once (attrs: at, victim)."""
    from pipeline.quantize import RayBackend

    return type("KillingRayBackend", (_KillingBackend, RayBackend), attrs)


def test_a_killed_actor_is_restarted_and_the_result_is_bit_identical(ray_local, local):
    """An actor process killed between Lloyd iterations comes back (it re-reads its shard)
    and the lost call is retried: the same bits as the single-process run."""
    import ray

    from pipeline.quantize import shard_ranges

    ranges = shard_ranges(N, 3, BLOCK)
    backend = killing_backend(at=4, victim=1)
    with backend([SyntheticLoader(a, b, seed=7) for a, b in ranges], [a for a, _ in ranges],
                 block=BLOCK) as be:
        got = hw_kmeans(be, None, 16, seed=3, sample_size=30_000, max_iter=15)
        assert be.calls > be.at  # iterations went on after the kill
        assert ray.get(be._actors[1].pid.remote()) != be.killed  # a new process
    _same(got, hw_kmeans(local, None, 16, seed=3, sample_size=30_000, max_iter=15))
