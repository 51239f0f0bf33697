"""The streamed Hessians sharded into P window partitions × G block groups: the partial sums
add up to the single task's, every tensor comes from exactly one group, and a group reads only
the blocks it needs, one at a time."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.hessian.shards import (
    block_counts,
    block_groups,
    block_index,
    reduce_partials,
    window_slices,
)
from pipeline.hessian.stream import activation_streamed, fisher_streamed
from pipeline.models.stream import StreamedLM
from pipeline.models.weights import WeightsFolder, write_folder
from testkit.models import tiny_llama

LAYERS = 4


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny4") / "model"
    model = tiny_llama(layers=LAYERS, hidden=32, attn_implementation="eager")
    model.config.save_pretrained(path)
    sd = model.state_dict()
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight")
    write_folder(
        path, sd, [(n, t.dtype, tuple(t.shape)) for n, t in sd.items()], max_shard_bytes=40_000
    )
    names = [n for n in sd if ".layers." in n and n.endswith("proj.weight")]
    return str(path), names


def _windows(n=6, L=10):
    return torch.randint(0, 300, (n, L), generator=torch.Generator().manual_seed(5))


class _Loads:
    """Records the blocks `lm` reads, asserting no other block is resident at that moment."""

    def __init__(self, lm: StreamedLM):
        self.order: list[int] = []
        inner = lm.block

        def block(i: int):
            others = [p for j, layer in enumerate(lm.layers) if j != i for p in layer.parameters()]
            assert all(p.device.type == "meta" for p in others), f"block {i} read beside another"
            self.order.append(i)
            return inner(i)

        lm.block = block


def _run(kind: str, path: str, windows, names, blocks, **kw):
    lm = StreamedLM(path)
    loads = _Loads(lm)
    got: dict[str, tuple[np.ndarray, int]] = {}

    def emit(k, v, c):
        assert k not in got, f"{k} emitted twice"
        got[k] = (v.copy(), c)

    fn = activation_streamed if kind == "activation" else fisher_streamed
    fn(lm, windows, names, emit, blocks=blocks, batch=1, **kw)
    assert all(p.device.type == "meta" for p in lm.model.parameters())
    return got, loads.order


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


@pytest.mark.parametrize(
    "kind,cases,tol",
    [
        ("activation", [(1, 2), (1, 3), (2, 1), (2, 2), (3, 3)], 1e-12),
        # the Fisher's sums are float32 per task (a 7B block's would be 1.6 GB in float64)
        ("fisher", [(1, 3), (2, 2), (3, 1), (3, 3)], 1e-6),
    ],
)
def test_partitions_times_groups_equal_one_task(folder, tmp_path, kind, cases, tol):
    path, names = folder
    w = _windows()
    kw = {"cache_bytes": 4_000, "spill_dir": str(tmp_path)} if kind == "fisher" else {}
    ref, order = _run(kind, path, w, names, None, **kw)
    assert set(ref) == set(names)
    if kind == "fisher":
        assert order == list(range(LAYERS)) + list(range(LAYERS))[::-1]
    else:
        assert order == list(range(LAYERS))
    ref_n = next(iter(ref.values()))[1]
    lm = StreamedLM(path)
    owner = {n: i for i in range(LAYERS) for n in lm.block_params(i)}
    for P, G in cases:
        groups = block_groups(block_counts(WeightsFolder(path), names), G)
        assert len(groups) == G and [b for g in groups for b in g] == list(range(LAYERS))
        partials = []
        for part in window_slices(w.shape[0], P):
            seen: list[str] = []
            for g in groups:
                got, order = _run(kind, path, w[part], names, g, **kw)
                assert all(owner[n] in g for n in got)  # only the group's own tensors
                seen += list(got)
                if kind == "activation":  # 0 … hi−1, never a block above
                    assert order == list(range(g.stop))
                else:  # the whole stack forward, then the top down to lo
                    assert order == list(range(LAYERS)) + list(range(g.start, LAYERS))[::-1]
                partials.append(got)
            assert sorted(seen) == sorted(names)  # every tensor exactly once per partition
        out = reduce_partials(partials)
        assert set(out) == set(names)
        for n in names:
            want = ref[n][0] / ref_n
            assert _rel(out[n], want) <= tol, (P, G, n, _rel(out[n], want))
    assert not any(tmp_path.rglob("*.safetensors"))  # spilled inputs cleaned up


def test_block_plan_from_the_headers_matches_the_model(folder):
    path, names = folder
    w = WeightsFolder(path)
    lm = StreamedLM(path)
    idx = block_index(w, names)
    assert idx == {n: i for i in range(LAYERS) for n in lm.block_params(i) if n in names}
    counts = block_counts(w, names)
    assert len(counts) == LAYERS and sum(counts) == sum(w.info(n).numel for n in names)
    assert block_groups(lm, 2) == [range(0, 2), range(2, 4)]
    with pytest.raises(ValueError, match="not a parameter of a decoder block"):
        block_index(w, ["model.embed_tokens.weight"])
    with pytest.raises(ValueError, match="not a tensor"):
        block_index(w, ["model.layers.9.mlp.up_proj.weight"])


def test_block_groups_are_balanced_consecutive_and_deterministic():
    assert block_groups([5, 1, 1, 1, 1, 1], 2) == [range(0, 1), range(1, 6)]
    assert block_groups([1, 1, 1, 1, 1, 1], 4) == [
        range(0, 1),
        range(1, 2),
        range(2, 4),
        range(4, 6),
    ]
    assert block_groups([3, 0, 3], 5) == [range(0, 1), range(1, 2), range(2, 3)]
    assert block_groups([], 3) == []
    counts = [7, 3, 9, 1, 4, 4, 8, 2, 6, 5]
    g = block_groups(counts, 3)
    assert [b for r in g for b in r] == list(range(10)) and all(len(r) for r in g)
    # No other cut into 3 has a smaller largest group.
    best = min(
        max(sum(counts[:a]), sum(counts[a:b]), sum(counts[b:]))
        for a in range(1, 9)
        for b in range(a + 1, 10)
    )
    assert max(sum(counts[i] for i in r) for r in g) == best
    assert block_groups(counts, 3) == g
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="groups"):
            block_groups(counts, bad)


def test_window_slices_and_reduce_partials():
    assert window_slices(7, 3) == [slice(0, 2), slice(2, 4), slice(4, 7)]
    assert window_slices(2, 5) == [slice(0, 1), slice(1, 2)]
    a, b = np.array([1.0, 2.0]), np.array([3.0, 6.0])
    assert np.array_equal(reduce_partials([{"t": (a, 1)}, {"t": (b, 3)}])["t"], [1.0, 2.0])
    assert a[0] == 1.0  # the caller's arrays are not modified
    with pytest.raises(ValueError, match="cannot be added"):
        reduce_partials([{"t": (a, 1)}, {"t": (np.zeros(3), 1)}])


def test_bad_block_range_is_refused(folder):
    path, names = folder
    for bad in (range(2, 2), range(0, LAYERS + 1), range(0, 4, 2), (0, 2)):
        with pytest.raises(ValueError, match="blocks must be"):
            activation_streamed(StreamedLM(path), _windows(), names, lambda *a: None, blocks=bad)
