"""The streamed quantize stage floors a tensor's Hessian in place (a full [V, d] embedding
Hessian is the unit's largest array), to exactly what the resident stage's floors give: the
Hessian floor, then the embedding floor, for a full [R, C] table and for an [C] activation
vector broadcast over the rows; `_h_rows` serves either shape by rows."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.quantize.rows import floor_hessian
from pipeline.quantize.rows_stage import embedding_floor
from pipeline.quantize.tensors_stage import _floor_in_place, _h_rows

R, C = 50, 8


@pytest.mark.parametrize("vector", [False, True], ids=["full", "vector"])
def test_in_place_floors_equal_the_resident_floors(vector):
    rng = np.random.default_rng(0)
    h = (rng.random(C if vector else R * C) ** 6).astype(np.float32)
    h[:3] = 0  # dead channels / unseen tokens
    floored = floor_hessian(h, 1e-3)
    want = embedding_floor(
        np.broadcast_to(floored.reshape(1, C), (R, C)) if vector else floored.reshape(R, C), 0.1
    )
    got = h.copy()
    _floor_in_place(got, 1e-3)
    _floor_in_place(got, 0.1)
    assert np.array_equal(_h_rows(got, (R, C), slice(0, R)), want)
    assert np.array_equal(_h_rows(got, (R, C), np.arange(0, R, 7)), want[::7])
    assert not np.array_equal(got, h)  # the floors did raise something


@pytest.mark.parametrize("method", ["uniform", "ecsq"])
def test_slab_ranked_codes_equal_the_whole_tensor_ranking(method):
    """A tensor's codes ranked slab by slab (bounded memory) are the whole tensor's ranking."""
    from pipeline.quantize.rate import RowBlock, solve_rows_at
    from pipeline.quantize.rows import RowsResult
    from pipeline.quantize.rows_stage import frequency_ranked
    from pipeline.quantize.tensors_stage import _ranked_codes

    rng = np.random.default_rng(1)
    W = rng.standard_normal((40, 16)).astype(np.float32)
    W[12:20] *= 20  # slabs with different level counts (codebook widths)
    H = rng.random((40, 16)).astype(np.float32) + 0.1
    parts = [
        solve_rows_at([RowBlock(W[a:b], H[a:b], a)], 0.02, method, k_max=64)[0]
        for a, b in ((0, 12), (12, 20), (20, 40))
    ]
    assert len({p.codebooks.shape[1] for p in parts}) > 1
    cb, idx = _ranked_codes(parts, 40, 16)
    want_cb, want_idx = frequency_ranked(RowsResult.concat(parts))
    assert np.array_equal(cb, want_cb) and idx.dtype == np.uint8
    assert np.array_equal(idx, want_idx.astype(np.uint8))
