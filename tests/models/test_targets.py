"""Target patterns: globs and re: regexes on module and parameter names, ignore lists, the
no-match error with suggestions, model order, tied weights; output axes."""

import pytest
import torch
from torch import nn

from pipeline.models.lenet import LeNet5
from pipeline.models.targets import TargetError, match_named_parameters, output_axis

transformers = pytest.importorskip("transformers")


def _llama(**kw):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64, **kw)
    return transformers.LlamaForCausalLM(cfg)


@pytest.fixture(scope="module")
def llama():
    return _llama(tie_word_embeddings=False)


def _layer(i, *mods):
    return [f"model.layers.{i}.{m}.weight" for m in mods]


def test_globs_select_module_weights(llama):
    assert match_named_parameters(llama, ["model.layers.*.self_attn.q_proj"]) == \
        _layer(0, "self_attn.q_proj") + _layer(1, "self_attn.q_proj")
    assert match_named_parameters(llama, ["*.mlp.*"]) == [
        *_layer(0, "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
        *_layer(1, "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    # Model order, whatever the order of the patterns.
    assert match_named_parameters(llama, ["lm_head", "model.embed_tokens"]) == \
        ["model.embed_tokens.weight", "lm_head.weight"]


def test_regex_targets_and_ignore(llama):
    projs = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    assert match_named_parameters(llama, [r"re:.*layers\.1\..*_proj"]) == _layer(1, *projs)
    assert match_named_parameters(llama, [r"re:.*_proj"], ignore=["*.down_proj", "re:.*\\.0\\..*"]
                                  ) == _layer(1, *projs[:-1])
    # re: is anchored at both ends: a prefix alone matches no module with a weight.
    with pytest.raises(TargetError, match="matches no parameter"):
        match_named_parameters(llama, [r"re:model\.layers"])


def test_bias_patterns_take_the_parameter_route():
    m = _llama(attention_bias=True, tie_word_embeddings=False)
    sel = match_named_parameters(m, ["*.self_attn.*"])
    assert sel and all(n.endswith(".weight") for n in sel)  # module route: weights only
    biases = match_named_parameters(m, ["*.bias"])
    assert biases and all(n.endswith(".bias") for n in biases) and len(biases) == 8
    lenet = LeNet5()
    assert match_named_parameters(lenet, ["fc1.weight", "conv*"]) == \
        ["conv1.weight", "conv2.weight", "fc1.weight"]
    assert match_named_parameters(lenet, ["*.bias"]) == \
        ["conv1.bias", "conv2.bias", "fc1.bias", "fc2.bias"]


def test_no_match_names_the_pattern_and_suggests(llama):
    with pytest.raises(TargetError, match=r"'model\.layers\.\*\.self_attn\.q_prj' matches no "
                                          r"parameter.*did you mean 'model\.layers\.\*\.self_attn\.q_proj'"):
        match_named_parameters(llama, ["model.layers.*.self_attn.q_prj"])
    with pytest.raises(TargetError, match=r"\(ignore\): pattern 'lm_haed'.*did you mean 'lm_head'"):
        match_named_parameters(llama, ["*.mlp.*"], ignore=["lm_haed"])
    with pytest.raises(TargetError, match="not a valid regular expression"):
        match_named_parameters(llama, ["re:(unclosed"])
    with pytest.raises(TargetError, match="lists of patterns"):
        match_named_parameters(llama, "*.mlp.*")


def test_tied_weight_is_selected_once_by_its_first_name():
    tied = _llama(tie_word_embeddings=True)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert match_named_parameters(tied, ["lm_head"]) == ["model.embed_tokens.weight"]
    assert match_named_parameters(tied, ["lm_head", "model.embed_tokens"]) == \
        ["model.embed_tokens.weight"]


def test_default_targets_of_a_gpt2_are_its_conv1d_weights_with_axis_1():
    from pipeline.models.hf_causal import HFCausalLM

    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=50, n_positions=32, n_embd=32, n_layer=2, n_head=2))
    adapter = HFCausalLM(path="unused")
    names = adapter.default_quantizable(gpt2)
    assert names == [f"transformer.h.{i}.{m}.weight" for i in range(2)
                     for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert [n for n, _ in adapter.blocks(gpt2)] == ["transformer.h.0", "transformer.h.1"]
    assert adapter.output_axis("transformer.h.0.attn.c_attn.weight", gpt2) == 1
    w = gpt2.transformer.h[0].attn.c_attn.weight
    assert w.shape == (32, 96)  # [in, out]: the output channels are axis 1


def test_output_axes():
    m = nn.Sequential(nn.Linear(3, 4), nn.Conv2d(2, 5, 3), nn.ConvTranspose2d(2, 6, 3),
                      nn.Conv1d(2, 3, 1))
    assert [output_axis(m, f"{i}.weight") for i in range(4)] == [0, 0, 1, 0]
    assert m[2].weight.shape[1] == 6
    with pytest.raises(TargetError, match="no parameter '9.weight'"):
        output_axis(m, "9.weight")
    with pytest.raises(TargetError, match="no parameter '0.scale'"):
        output_axis(m, "0.scale")
