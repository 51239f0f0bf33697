"""X·Xᵀ / n per decoder Linear, block by block (quantize.feedback=ldl), equals the in-memory
second moment of each Linear's input; q/k/v and gate/up share one matrix."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.hessian.second_moment import second_moments_streamed
from pipeline.models.stream import StreamedLM
from testkit.models import tiny_llama


def test_block_second_moments_equal_the_model(tmp_path):
    model = tiny_llama(layers=3, hidden=32, attn_implementation="eager")
    model.save_pretrained(tmp_path)
    w = torch.randint(0, 300, (5, 12), generator=torch.Generator().manual_seed(3))
    names = [
        n for n, _ in model.named_parameters() if ".layers." in n and n.endswith("proj.weight")
    ]
    ref: dict[str, torch.Tensor] = {}
    handles = []
    for n, mod in model.named_modules():
        if n + ".weight" in names:

            def hook(m, a, n=n):
                x = a[0].reshape(-1, a[0].shape[-1]).double()
                ref[n + ".weight"] = ref.get(n + ".weight", 0) + x.T @ x

            handles.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(input_ids=w)
    for h in handles:
        h.remove()
    got: dict[int, list] = {}
    n = second_moments_streamed(
        StreamedLM(str(tmp_path), dtype=torch.float32),
        w,
        names,
        lambda i, mats, k: got.__setitem__(i, mats),
        blocks=range(1, 3),
        batch=2,
    )
    assert n == w.numel() and sorted(got) == [1, 2]
    for mats in got.values():
        groups = sorted(sorted(t.rsplit(".", 2)[-2] for t in members) for members, _ in mats)
        assert groups == [
            ["down_proj"],
            ["gate_proj", "up_proj"],
            ["k_proj", "q_proj", "v_proj"],
            ["o_proj"],
        ]
        for members, m in mats:
            for t in members:
                np.testing.assert_allclose(m, ref[t].numpy() / n, rtol=1e-4, atol=1e-6)
