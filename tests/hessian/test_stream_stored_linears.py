"""The streamed Fisher from a block whose Linears keep the checkpoint's bf16 weights
(`pipeline.models.stored_linear`): the same sums as from the block widened to float32, with
the Linears' weights held in bf16 while the block runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.hessian.stream import _check_single_use, fisher_streamed
from pipeline.models.stored_linear import StoredLinear
from pipeline.models.stream import StreamedLM
from testkit.models import tiny_sharded_bf16_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return str(tiny_sharded_bf16_folder(tmp_path_factory.mktemp("bf16") / "m", layers=3))


def _fisher(lm: StreamedLM, names, blocks=None, seen=None) -> dict[str, np.ndarray]:
    windows = torch.randint(0, 300, (4, 12), generator=torch.Generator().manual_seed(0))
    out = {}

    def emit(name, sums, count):
        out[name] = sums.copy()

    if seen is not None:  # the dtype of every Linear weight while its block runs backward
        for i, layer in enumerate(lm.layers):
            for m in layer.modules():
                if isinstance(m, torch.nn.Linear):
                    m.register_forward_pre_hook(
                        lambda mod, args, i=i: seen.add((i, mod.weight.dtype))
                        if torch.is_grad_enabled() else None)
    fisher_streamed(lm, windows, names, emit, blocks=blocks, batch=2)
    return out


@pytest.mark.parametrize("blocks", [None, range(1, 2)])
def test_stored_bf16_linears_give_the_widened_blocks_sums(folder, blocks):
    wide = StreamedLM(folder, dtype=torch.float32)
    names = [n for n in wide.weights.tensors if n.startswith("model.layers.")
             and n.endswith("proj.weight")]
    names += [wide.embedding_name, wide.head_name]
    ref = _fisher(wide, names, blocks)
    seen: set = set()
    lm = StreamedLM(folder, dtype=torch.float32, stored_linears=True)
    got = _fisher(lm, names, blocks, seen)
    assert got.keys() == ref.keys() and len(got) >= 7
    for name in ref:
        np.testing.assert_allclose(got[name], ref[name], rtol=2e-5,
                                   atol=1e-6 * float(np.abs(ref[name]).max()), err_msg=name)
    # the Linears ran backward holding bf16 weights, and nothing is left set on them
    assert {dt for _, dt in seen} == {torch.bfloat16}
    assert all(m.sums is None and m.anchor is None for m in lm.layers.modules()
               if isinstance(m, StoredLinear))


def test_a_linear_called_twice_in_one_window_is_refused():
    m = StoredLinear(4, 3, bias=False)
    m.uses = 2
    with pytest.raises(ValueError, match="runs 2 times in one forward"):
        _check_single_use({"x.weight": m})
    assert m.uses == 0
    m.uses = 1
    _check_single_use({"x.weight": m})
