"""Peer LLM quantizers (benchmarks/llm_peer_methods.py) on a tiny random Llama.

RTN and the importance matrix always run; HQQ, GPTQ and AWQ (llm-compressor) and llama.cpp
(llama-cpp-python) run when their optional packages from benchmarks/requirements-peers.txt are
installed.
"""
import copy
import math
import os
import sys

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import llm_peer_methods as peers  # noqa: E402


def tiny_llama():
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def layer_names(model):
    return [f"model.layers.{n}.weight" for n, m in model.model.layers.named_modules()
            if isinstance(m, torch.nn.Linear)]


@pytest.fixture
def model():
    return tiny_llama()


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def expected_bpw(model, names, bits, group, row_groups=True):
    params = side = 0
    sd = model.state_dict()
    for n in names:
        rows, cols = sd[n].shape
        params += rows * cols
        side += (rows * math.ceil(cols / group) if row_groups else rows * cols // group) * 32
    return bits + side / params, side, params


def max_distinct_row_groups(w, group):
    """Most distinct values in any group of `group` consecutive columns of a row
    (the last group of a row may be shorter)."""
    worst = 0
    for start in range(0, w.shape[1], group):
        blk = w[:, start:start + group]
        worst = max(worst, max(len(torch.unique(r)) for r in blk))
    return worst


def max_distinct_flat_groups(w, group):
    return max(len(torch.unique(g)) for g in w.reshape(-1, group))


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def check_untouched(model, ref, names):
    sd = model.state_dict()
    assert set(sd) == set(ref)
    for k, v in sd.items():
        if k not in names:
            assert torch.equal(v, ref[k]), f"{k} changed but was not listed"


def run_method(method, bits, group, **kw):
    m = tiny_llama()
    names = layer_names(m)
    ref = snapshot(m)
    info = method(m, names, bits, group, **kw)
    return m, names, ref, info


# ---------------------------------------------------------------- RTN
@pytest.mark.parametrize("group", [32, 48, 128])
def test_rtn_grid_bits_and_untouched(group):
    m, names, ref, info = run_method(peers.rtn, 4, group)
    bpw, side, params = expected_bpw(m, names, 4, group)
    assert info["method"] == "rtn" and info["bits"] == 4 and info["group"] == group
    assert info["quantized_params"] == params == 64 * 64 * 2 * 2 + 32 * 64 * 2 * 2 + 128 * 64 * 3 * 2
    assert info["side_bits"] == side and info["code_bits"] == 4 * params
    assert info["bits_per_weight"] == pytest.approx(bpw, rel=1e-12)
    if group == 32:
        assert info["bits_per_weight"] == pytest.approx(5.0)
    sd = m.state_dict()
    for n in names:
        assert sd[n].dtype == torch.float32
        assert max_distinct_row_groups(sd[n], group) <= 16
        assert not torch.equal(sd[n], ref[n])
    check_untouched(m, ref, names)


def test_rtn_bits_per_weight_ragged_last_group():
    # 64-column rows with group 48: one group of 48 and one of 16 per row, both counted.
    m = tiny_llama()
    names = ["model.layers.0.self_attn.q_proj.weight"]
    info = peers.rtn(m, names, 4, 48)
    assert info["side_bits"] == 64 * 2 * 32
    assert info["bits_per_weight"] == pytest.approx(4 + 2 * 32 / 64)
    assert "shorter group" in info["note"]


def test_rtn_values_on_fp16_affine_grid():
    m = tiny_llama()
    name = "model.layers.0.mlp.up_proj.weight"
    w0 = m.state_dict()[name].clone()
    peers.rtn(m, [name], 3, 32)
    w = m.state_dict()[name]
    for r in range(0, w.shape[0], 7):
        for c in range(0, w.shape[1], 32):
            orig, q = w0[r, c:c + 32], w[r, c:c + 32]
            s = ((orig.max() - orig.min()) / 7).to(torch.float16).float()
            steps = (q - q.min()) / s
            assert torch.allclose(steps, steps.round(), atol=1e-3), "not on a grid of step fp16(scale)"
            assert steps.max() <= 7 + 1e-3
            # min-max grid: the extremes are reproduced up to fp16 rounding of scale/zero
            assert (q.min() - orig.min()).abs() <= 1e-3 * s + 2e-3 * orig.abs().max()


def test_rtn_error_bounded_and_decreasing_with_bits():
    errs = {}
    for bits in (2, 3, 4, 8):
        m, names, ref, _ = run_method(peers.rtn, bits, 32)
        sd = m.state_dict()
        errs[bits] = max(rel_err(sd[n], ref[n]) for n in names)
    assert errs[8] < 0.01
    assert errs[4] < 0.12
    assert errs[3] < 0.25
    assert errs[8] < errs[4] < errs[3] < errs[2]


def test_rtn_only_listed_names_and_module_names(model):
    ref = snapshot(model)
    names = ["model.layers.1.mlp.down_proj"]  # module name is accepted too
    info = peers.rtn(model, names, 4, 32)
    assert info["quantized_params"] == 64 * 128
    check_untouched(model, ref, ["model.layers.1.mlp.down_proj.weight"])
    assert not torch.equal(model.state_dict()["model.layers.1.mlp.down_proj.weight"],
                           ref["model.layers.1.mlp.down_proj.weight"])


def test_rtn_rejects_bad_arguments(model):
    with pytest.raises(ValueError):
        peers.rtn(model, layer_names(model), 0, 32)
    with pytest.raises(ValueError):
        peers.rtn(model, layer_names(model), 4, 0)
    with pytest.raises(TypeError):
        peers.rtn(model, ["model.layers.0.input_layernorm.weight"], 4, 32)
    with pytest.raises(KeyError):
        peers.rtn(model, ["model.layers.9.mlp.up_proj.weight"], 4, 32)


def test_rtn_constant_group_is_finite(model):
    name = "model.layers.0.self_attn.v_proj.weight"
    with torch.no_grad():
        model.get_parameter(name)[:, :32] = 0.0123
        model.get_parameter(name)[:3, 32:] = 0.0
    peers.rtn(model, [name], 4, 32)
    w = model.get_parameter(name)
    assert torch.isfinite(w).all()
    assert torch.allclose(w[:, :32], torch.full_like(w[:, :32], 0.0123), rtol=1e-3)
    assert torch.all(w[:3, 32:] == 0)


# ---------------------------------------------------------------- HQQ
def test_hqq_grid_bits_and_untouched():
    pytest.importorskip("hqq")
    errs = {}
    for bits in (3, 4):
        m, names, ref, info = run_method(peers.hqq, bits, 32)
        bpw, side, params = expected_bpw(m, names, bits, 32, row_groups=False)
        assert info["method"] == "hqq" and info["group"] == 32
        assert info["quantized_params"] == params and info["side_bits"] == side
        assert info["bits_per_weight"] == pytest.approx(bits + 1.0)
        sd = m.state_dict()
        for n in names:
            assert sd[n].dtype == torch.float32
            assert max_distinct_flat_groups(sd[n], 32) <= 2 ** bits
        check_untouched(m, ref, names)
        errs[bits] = max(rel_err(sd[n], ref[n]) for n in names)
    assert errs[4] < 0.12 and errs[3] < 0.25
    assert errs[4] < errs[3]


def test_hqq_matches_library_dequantize():
    hq = pytest.importorskip("hqq.core.quantize")
    m = tiny_llama()
    name = "model.layers.0.mlp.gate_proj.weight"
    w0 = m.state_dict()[name].clone()
    peers.hqq(m, [name], 4, 64)
    layer = hq.HQQLinear.from_weights(w0.clone(), None, hq.BaseQuantizeConfig(nbits=4, group_size=64, axis=1),
                                      compute_dtype=torch.float16, device="cpu")
    lib = layer.dequantize().float()  # the library's own fp16 dequantization
    assert torch.allclose(m.state_dict()[name], lib, atol=2e-3 * w0.abs().max().item(), rtol=2e-3)


# ---------------------------------------------------------------- GPTQ
def calib_windows(n=8, seq_len=32):
    return torch.randint(0, 128, (n, seq_len), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def gptq_runs():
    pytest.importorskip("llmcompressor")
    runs = {}
    for bits in (3, 4):
        runs[bits] = run_method(peers.gptq, bits, 32, calib_windows=calib_windows())
    return runs


def test_gptq_grid_bits_and_untouched(gptq_runs):
    errs = {}
    for bits, (m, names, ref, info) in gptq_runs.items():
        bpw, side, params = expected_bpw(m, names, bits, 32)
        assert info["method"] == "gptq" and info["bits"] == bits and info["group"] == 32
        assert info["quantized_params"] == params and info["side_bits"] == side
        assert info["bits_per_weight"] == pytest.approx(bits + 1.0)
        sd = m.state_dict()
        for n in names:
            assert sd[n].dtype == torch.float32
            assert max_distinct_row_groups(sd[n], 32) <= 2 ** bits
            assert not torch.equal(sd[n], ref[n])
        check_untouched(m, ref, names)
        errs[bits] = max(rel_err(sd[n], ref[n]) for n in names)
    assert errs[4] < 0.25 and errs[3] < 0.5
    assert errs[4] < errs[3]


def test_gptq_leaves_a_plain_model(gptq_runs):
    m, names, ref, info = gptq_runs[4]
    for name, mod in m.named_modules():
        for attr in ("forward", "quantization_scheme", "quantization_status", "save_pretrained"):
            assert attr not in mod.__dict__, f"{name or 'model'} keeps {attr}"
        assert type(mod._parameters) is dict
    fresh = tiny_llama()
    fresh.load_state_dict(m.state_dict())
    x = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(m(x).logits, fresh(x).logits)
        assert not torch.allclose(m(x).logits, tiny_llama()(x).logits)


def test_gptq_beats_rtn_on_calibration_outputs(gptq_runs):
    # Layer 0 q_proj sees the same inputs before and after quantization (the normed
    # embeddings of the calibration tokens): GPTQ minimises exactly this output error.
    m_gptq = gptq_runs[4][0]
    base = tiny_llama()
    grab = {}
    q = base.model.layers[0].self_attn.q_proj
    h = q.register_forward_hook(lambda mod, a, out: grab.setdefault("x", a[0].detach()))
    with torch.no_grad():
        base(calib_windows())
    h.remove()
    x = grab["x"].reshape(-1, 64)
    w = q.weight.detach()
    m_rtn = tiny_llama()
    peers.rtn(m_rtn, layer_names(m_rtn), 4, 32)
    err_g = (x @ (m_gptq.model.layers[0].self_attn.q_proj.weight - w).T).norm()
    err_r = (x @ (m_rtn.model.layers[0].self_attn.q_proj.weight - w).T).norm()
    assert err_g < 0.9 * err_r


def test_gptq_only_listed_names_and_group_fallback():
    pytest.importorskip("llmcompressor")
    m = tiny_llama()
    ref = snapshot(m)
    names = ["model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.k_proj.weight"]
    info = peers.gptq(m, names, 4, 128, calib_windows(4, 16))
    # 64-column rows refuse group 128 in llm-compressor: it falls back to 64 and says so
    assert info["group"] == 64 and "used group 64" in info["note"]
    assert info["quantized_params"] == 128 * 64 + 32 * 64
    assert info["bits_per_weight"] == pytest.approx(4 + 32 / 64)
    check_untouched(m, ref, names)
    sd = m.state_dict()
    for n in names:
        assert not torch.equal(sd[n], ref[n])
        assert max_distinct_row_groups(sd[n], 64) <= 16


def test_awq_rounds_the_listed_linears_after_folding_its_scales_into_the_norms():
    pytest.importorskip("llmcompressor")
    m, names, ref, info = run_method(peers.awq, 4, 32, calib_windows=calib_windows())
    bpw, side, params = expected_bpw(m, names, 4, 32)
    assert info["method"] == "awq" and info["group"] == 32
    assert info["quantized_params"] == params and info["bits_per_weight"] == pytest.approx(bpw)
    sd = m.state_dict()
    for n in names:
        assert max_distinct_row_groups(sd[n], 32) <= 16
    # AWQ's scales go into the layers before the balanced ones (the norms; v and up are
    # Linears already listed): nothing else moves
    moved = {k for k, v in sd.items() if not torch.equal(v, ref[k])} - set(names)
    assert moved and all(k.endswith("layernorm.weight") for k in moved)
    for name, mod in m.named_modules():
        for attr in ("forward", "quantization_scheme", "save_pretrained"):
            assert attr not in mod.__dict__, f"{name or 'model'} keeps {attr}"
    x = calib_windows(2, 24)
    with torch.no_grad():
        base, got = tiny_llama()(x).logits, m(x).logits
    assert rel_err(got, base) < 0.25


def test_the_bit_budget_sums_to_the_rows_bits_and_is_tabled():
    import llm_peers

    m = {"bits_per_weight": 2.5, "encode": {"quantized_params": 400, "bits": {
        "indices": 800, "codebooks": 150, "code_tables": 30, "header": 600, "raw_tensors": 9000}}}
    b = llm_peers.budget(m)
    assert math.isclose(sum(b.values()), 2.5) and math.isclose(b["indices"], 2.0)
    assert "raw_tensors" not in b and math.isclose(b["header"], 2.5 - 980 / 400)
    assert llm_peers.budget({"bits_per_weight": None, "encode": {}}) == {}
    doc = {"model": "m", "calibration": "c", "evaluation": "e", "machine": "x",
           "rows": [{"id": "unquantized", "label": "u", "bits_per_weight": None,
                     "perplexity": {"t": 10.0}, "seconds": 1},
                    {"id": "hwq-ecsq-2.5", "label": "hwq 2.5", "bits_per_weight": 2.5,
                     "perplexity": {"t": 12.0}, "seconds": 1, "budget": b}]}
    md = llm_peers.markdown(doc)
    assert "Where hwq's bits go" in md
    assert "| hwq 2.5 | 2.500 | 0.075 | 0.375 | 0.050 | 2.000 | 0.000 |" in md


# --------------------------------------------------------------------------- llama.cpp
def test_the_importance_matrix_is_the_mean_squared_input_of_each_linear(model):
    import llm_peer_llamacpp as lc

    torch.manual_seed(1)
    ids = torch.randint(0, 128, (5, 16))
    names = layer_names(model)
    one = lc.importance_matrix(model, names, ids, batch=1)
    three = lc.importance_matrix(model, names, ids, batch=3)
    assert one.keys() == {n for n in names}
    with torch.no_grad():  # directly: block 0's q/k/v see its input norm of the embeddings
        x = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
    direct = (x.double() ** 2).reshape(-1, x.shape[-1]).mean(dim=0).float().numpy()
    for key in ("q_proj", "k_proj", "v_proj"):
        n = f"model.layers.0.self_attn.{key}.weight"
        torch.testing.assert_close(torch.from_numpy(one[n]), torch.from_numpy(direct))
        torch.testing.assert_close(torch.from_numpy(three[n]), torch.from_numpy(one[n]))
    assert one["model.layers.1.mlp.down_proj.weight"].shape == (128,)


def test_llamacpp_rows_quantize_the_gguf_with_the_importance_matrix(tmp_path):
    """llama.cpp's own quantizer (skipped without the llama-cpp-python package): the listed
    Linears take the dequantized weights of the file, the bits come from the file, and the
    importance matrix changes the rounding."""
    pytest.importorskip("llama_cpp")
    import llm_peer_llamacpp as lc

    from testkit.models import write_llama_gguf

    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=True)
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(cfg).eval()
    path = write_llama_gguf(ref, tmp_path / "tiny.gguf", tokens=[f"t{i}" for i in range(128)])
    names = layer_names(ref)
    imatrix = lc.importance_matrix(ref, names, torch.randint(0, 128, (4, 32)))
    before = snapshot(ref)
    runs = {}
    for ft, mat in (("Q4_0", imatrix), ("Q2_K", imatrix),
                    ("Q2_K", {k: np.ones_like(v) for k, v in imatrix.items()})):
        m = copy.deepcopy(ref)
        info = lc.llamacpp(m, names, ft, path, mat, threads=1, workdir=tmp_path)
        runs.setdefault(ft, []).append((m, info))
    m, info = runs["Q4_0"][0]
    assert info["bits_per_weight"] == pytest.approx(4.5)  # 18 bytes per 32 weights
    assert info["tensor_types"] == {"Q4_0": len(names)}
    after = snapshot(m)
    for k, v in before.items():
        if k.removesuffix(".weight").endswith(("proj",)):
            err = float((after[k] - v).norm() / v.norm())
            assert 0 < err < 0.2, (k, err)  # q/k rows in the model's own order, not GGUF's
        else:
            assert torch.equal(after[k], v), k
    (a, ia), (b, _) = runs["Q2_K"]
    assert "Q2_K" in ia["tensor_types"] and 2.5 < ia["bits_per_weight"] < 4
    assert any(not torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(),
                                                     strict=True))
