"""The streamed KL metric (pipeline/evaluate/kl.py) equals a direct computation of the mean
next-token KL(P_unquantized ‖ P_quantized) from both tiny models' full logits, and the
perplexity of the same pass equals the quantized model's."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.evaluate.kl import streamed_perplexity_kl
from testkit.models import tiny_llama


def test_streamed_kl_equals_direct_computation(tmp_path):
    ref = tiny_llama(layers=2, hidden=32, attn_implementation="eager")
    quant = tiny_llama(layers=2, hidden=32, attn_implementation="eager")
    with torch.no_grad():  # a "quantized" model: every Linear rounded to a coarse grid
        for n, p in quant.named_parameters():
            if n.endswith("proj.weight"):
                p.copy_(torch.round(p / 0.02) * 0.02)
    ref.save_pretrained(tmp_path / "ref")
    quant.save_pretrained(tmp_path / "q")
    g = torch.Generator().manual_seed(5)
    sets = {
        "a": torch.randint(0, 300, (5, 16), generator=g),
        "b": torch.randint(0, 300, (3, 9), generator=g),
    }
    got = streamed_perplexity_kl(
        str(tmp_path / "q"), None, str(tmp_path / "ref"), None, sets, batch=2, chunk_tokens=4
    )
    kl_all, nll_all, n_all = 0.0, 0.0, 0
    for name, w in sets.items():
        with torch.no_grad():
            lp = torch.log_softmax(ref(input_ids=w).logits[:, :-1].double(), -1)
            lq = torch.log_softmax(quant(input_ids=w).logits[:, :-1].double(), -1)
        kl = float((lp.exp() * (lp - lq)).sum())
        nll = float(-lq.gather(-1, w[:, 1:, None]).sum())
        n = w.shape[0] * (w.shape[1] - 1)
        assert got["kl_by_set"][name] == pytest.approx(kl / n, rel=1e-4)
        assert got["by_set"][name] == pytest.approx(math.exp(nll / n), rel=1e-5)
        kl_all, nll_all, n_all = kl_all + kl, nll_all + nll, n_all + n
    assert got["kl"] == pytest.approx(kl_all / n_all, rel=1e-4) and got["kl"] > 0
    assert got["value"] == pytest.approx(math.exp(nll_all / n_all), rel=1e-5)
    same = streamed_perplexity_kl(
        str(tmp_path / "ref"), None, str(tmp_path / "ref"), None, sets, batch=2
    )
    assert abs(same["kl"]) < 1e-6
