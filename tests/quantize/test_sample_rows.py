"""The λ search's row sample: one row from each stratum of a high-rate bit estimate."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.quantize.rate import RowBlock, solve_rows_at
from pipeline.quantize.rows_stage import coded_bits
from pipeline.quantize.tensors_stage import sample_rows


def test_one_row_from_each_stratum_in_row_order():
    R, C = 40, 16
    scale = torch.arange(R, 0, -1, dtype=torch.float32)[:, None]  # row 0 the widest
    t = torch.tensor([1.0, -1.0]).repeat(C // 2)[None, :] * scale  # std ∝ scale
    rows = sample_rows(t.to(torch.bfloat16), np.ones(C, np.float32), (R, C), every=10)
    assert rows.tolist() == sorted(rows.tolist()) and len(rows) == 4
    # strata of 10 rows by score (log std: row 39 lowest): the middle of each
    assert rows.tolist() == [4, 14, 24, 34]
    again = sample_rows(t.to(torch.bfloat16), np.ones(C, np.float32), (R, C), every=10)
    assert np.array_equal(rows, again)
    # a full [R, C] Hessian weighs in: h̄_r = 1 / scale_r⁴ reverses the scores' order
    h = np.repeat(1.0 / scale.numpy() ** 4, C, axis=1).astype(np.float32)
    assert sample_rows(t, h.reshape(-1), (R, C), every=10).tolist() == [5, 15, 25, 35]
    assert len(sample_rows(t, np.ones(C, np.float32), (R, C), every=1)) == R
    assert len(sample_rows(t[:3], np.ones(C, np.float32), (3, C), every=100)) == 1


def test_stratified_sample_predicts_the_tensors_coded_bits_better_than_every_sth_row():
    """Rows whose bits spread widely (log-normal scales, heavy-tailed row Hessians): the
    stratified sample's predicted bits per weight lie closer to the whole tensor's."""
    R, C, every = 1024, 256, 32
    rng = np.random.default_rng(1)
    W = (rng.standard_normal((R, C)) * np.exp(rng.normal(0, 0.5, (R, 1))) / 16).astype(np.float32)
    H = (rng.gamma(0.5, 1e-3, (R, 1)) * rng.gamma(2, 1, (1, C))).astype(np.float32)
    opts = dict(k_max=64, iters=10, seed=0, bins=0)
    lam = 2e-6

    def bits(rows):
        (r,) = solve_rows_at([RowBlock(np.ascontiguousarray(W[rows]),
                                       np.ascontiguousarray(H[rows]), 0)], lam, "ecsq", **opts)
        b = coded_bits([r])
        return (b["indices"] + b["codebooks"]) / (len(rows) * C)

    whole = bits(np.arange(R))
    plain = bits(np.arange(0, R, every))
    strat = bits(sample_rows(torch.from_numpy(W), H.reshape(-1), (R, C), every))
    assert abs(strat - whole) < abs(plain - whole)
    assert abs(strat - whole) < 0.05


def test_coded_bits_price_the_indices_with_the_encoders_coder():
    """At ~2 bits a weight (rows of few, skewed levels) Huffman pays well above the index
    entropy and rANS about the entropy: the rate loop must price what the encoder writes."""
    from pipeline.quantize.rows import index_rate

    R, C = 256, 512
    rng = np.random.default_rng(4)
    W = (rng.standard_normal((R, C)) / 16).astype(np.float32)
    H = np.ones((R, C), np.float32)
    (r,) = solve_rows_at([RowBlock(W, H, 0)], 3e-3, "ecsq", k_max=64, iters=10, seed=0,
                         bins=0)
    # the order-0 entropy of what the encoder codes: the frequency-ranked indices, one
    # histogram for the rows of each level count
    ranked = -np.sort(-r.counts, axis=1)
    entropy = 0.0
    for L in np.unique(r.levels):
        h = ranked[r.levels == L, :L].sum(axis=0).astype(np.float64)
        h = h[h > 0]
        entropy -= float((h * np.log2(h / h.sum())).sum())
    assert index_rate([r]) * R * C <= entropy  # each row's own entropy is lower still
    huff, ans = coded_bits([r])["indices"], coded_bits([r], "ans")["indices"]
    assert ans < huff
    assert abs(ans - entropy) / entropy < 0.01 < (huff - entropy) / entropy
    assert coded_bits([r], "ans")["codebooks"] == coded_bits([r])["codebooks"]


def test_the_coder_enters_the_quantize_key_only_for_per_row_scopes_and_not_huffman():
    from pipeline.config import from_dict
    from pipeline.quantize.stage import _sections

    lm = {"model": {"name": "hf_causal_lm", "path": "DIR"}, "data": {"calibration": "c.txt"}}
    assert "coder" not in _sections(from_dict(lm))["quantize"]  # earlier runs keep their keys
    ans = from_dict({**lm, "encode": {"coder": "ans"}})
    assert _sections(ans)["quantize"]["coder"] == "ans"
    # the network and layer scopes do not price indices per row: a new coder re-encodes only
    net = from_dict({**lm, "encode": {"coder": "ans"}, "quantize": {"scope": "network"}})
    assert "coder" not in _sections(net)["quantize"]
