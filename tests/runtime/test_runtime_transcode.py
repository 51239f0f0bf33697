"""Transcoding: packed indices and tables decode to exactly what the reader decodes, pruned
positions to 0, and the width is the smallest that holds every table's levels."""

import numpy as np
import pytest
import torch

from pipeline.encode.container import HwqReader, TensorEntry, write_hwq
from pipeline.runtime.transcode import (
    NotServable,
    pack_indices,
    transcode,
    transcode_codes,
    unpack_indices,
)


def _write(
    tmp_path,
    shape,
    k,
    *,
    density=1.0,
    shared=False,
    groups=1,
    seed=0,
    dead_rows=(),
    dtype="float32",
):
    rng = np.random.default_rng(seed)
    rows = shape[0]
    cb = rng.normal(size=k if shared else (rows * groups, k)).astype(np.float32)
    mask = rng.random(shape) < density if density < 1 else None
    if dead_rows:
        mask = np.ones(shape, bool) if mask is None else mask
        mask[list(dead_rows)] = False
    n = int(np.prod(shape)) if mask is None else int(mask.sum())
    codes = rng.integers(0, k, n)
    path = tmp_path / "t.hwq"
    entry = TensorEntry.quantized("w", shape, codes, "c", mask=mask, dtype=dtype)
    write_hwq(path, [entry], {"c": cb})
    return HwqReader(path)


CASES = {
    "dense16": dict(shape=(7, 45), k=16),
    "pruned15": dict(shape=(9, 70), k=15, density=0.6),
    "pruned16_widens": dict(shape=(9, 70), k=16, density=0.6),
    "shared": dict(shape=(5, 33), k=12, shared=True, density=0.5),
    "groups": dict(shape=(6, 64), k=8, groups=2),
    "eight_bit": dict(shape=(4, 50), k=40),
    "last_rows_pruned": dict(shape=(8, 40), k=10, density=0.7, dead_rows=(0, 5, 6, 7)),
    "bfloat16": dict(shape=(5, 40), k=15, density=0.8, dtype="bfloat16"),
    "float16": dict(shape=(5, 40), k=16, dtype="float16"),
    "dense4": dict(shape=(6, 100), k=4),
    "pruned3": dict(shape=(6, 100), k=3, density=0.6),
    "pruned4_widens": dict(shape=(6, 100), k=4, density=0.6),
    "dense8": dict(shape=(3, 576), k=8),
    "pruned7": dict(shape=(9, 70), k=7, density=0.6),
    "pruned8_widens": dict(shape=(9, 70), k=8, density=0.6),
    "groups_two_bit": dict(shape=(4, 128), k=4, groups=2),
    "shared_three_bit": dict(shape=(5, 33), k=6, shared=True, density=0.5),
}
# The width each case packs at: the smallest that holds its largest table's levels, the zero
# level of a table with pruned positions counted.
BITS = {"dense16": 4, "pruned15": 4, "pruned16_widens": 8, "shared": 4, "groups": 3,
        "eight_bit": 8, "last_rows_pruned": 4, "bfloat16": 4, "float16": 4, "dense4": 2,
        "pruned3": 2, "pruned4_widens": 3, "dense8": 3, "pruned7": 3, "pruned8_widens": 4,
        "groups_two_bit": 2, "shared_three_bit": 3}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_packed_matrix_is_the_decoded_tensor(tmp_path, case):
    r = _write(tmp_path, **CASES[case])
    p = transcode(r, "w")
    dense = r.read(["w"])["w"]
    if r.dtype("w") == "bfloat16":  # bits -> values
        dense = torch.from_numpy(dense.view(np.int16)).view(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(p.dense_rows(0, p.rows).numpy(), dense)
    assert p.bits == BITS[case]
    assert p.idx.shape[1] == (p.cols if p.bits == 8 else -(-p.cols // 32) * 4 * p.bits)
    assert p.q8_ok == (p.bits < 8 and (p.groups == 1 or p.group_size % 32 == 0))
    if case.startswith("pruned") or case == "last_rows_pruned":
        assert (dense == 0).any()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_numpy_packing_is_the_c_packing(bits):
    rng = np.random.default_rng(bits)
    for rows, cols in ((3, 1), (3, 31), (3, 32), (3, 33), (3, 576), (3, 1000), (1, 95)):
        full = rng.integers(0, 1 << bits, size=(rows, cols)).astype(np.uint8)
        c = pack_indices(full, bits)
        assert np.array_equal(c, pack_indices(full, bits, use_kernels=False))
        assert np.array_equal(unpack_indices(c, bits, cols), full)


def test_not_servable():
    rc = {
        "codes": np.zeros(8, np.uint16),
        "positions": None,
        "codebook": np.zeros(300, np.float32),
        "shape": (2, 2, 2),
        "dtype": "float32",
    }
    with pytest.raises(NotServable, match="not a matrix"):
        transcode_codes(rc)
    rc.update(shape=(2, 4), codes=np.array([0, 299, 1, 2, 3, 4, 5, 6], np.uint16))
    with pytest.raises(NotServable, match="300 levels"):
        transcode_codes(rc)


def test_zero_slot_never_takes_a_used_level():
    """The last kept code of the last non-empty row is its highest: the zero level goes
    after it (found by the level count of each row's whole run of codes)."""
    cb = np.arange(1, 13, dtype=np.float32).reshape(3, 4)
    rc = {"codes": np.array([0, 1, 0, 1], np.uint8), "positions": np.array([0, 1, 4, 5]),
          "codebook": cb, "shape": (3, 4), "dtype": "float32"}  # fmt: skip
    w = transcode_codes(rc).dense_rows(0, 3).numpy()
    np.testing.assert_array_equal(w, [[1, 2, 0, 0], [5, 6, 0, 0], [0, 0, 0, 0]])
