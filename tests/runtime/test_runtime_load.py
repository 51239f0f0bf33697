"""`pipeline.runtime.load` on a tiny Llama written straight to a .hwq file: the reference
mode's logits are the decoded model's (`hwq decode --hf-out`, from_pretrained), the fast
mode's close to them, and no quantized Linear is decoded dense."""

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.cli import main
from pipeline.runtime import load
from pipeline.runtime.modules import LutLinear
from testkit.hwq_models import tiny_llama_hwq

PROMPTS = ["the quick brown fox jumps over", "hessian weighted quantization of every layer"]


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def files(request, tmp_path_factory):
    import transformers

    d = tmp_path_factory.mktemp("rt")
    path = tiny_llama_hwq(d, tied=request.param)
    assert main(["decode", str(path), "--hf-out", str(d / "decoded")]) == 0
    dec = transformers.AutoModelForCausalLM.from_pretrained(d / "decoded").eval()
    return path, dec


def _logits(model, tok, text):
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits[0].double()


def test_reference_mode_is_the_decoded_model(files):
    path, dec = files
    model, tok = load(str(path), mode="reference", threads=1)
    stats = model.hwq_runtime
    assert stats["lut"] == 15 and stats["bits"][8] == 2
    for text in PROMPTS:
        ref = _logits(dec, tok, text)
        got = _logits(model, tok, text)
        assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-3
    ids = tok(PROMPTS[0], return_tensors="pt").input_ids
    a = model.generate(ids, max_new_tokens=8, do_sample=False)
    b = dec.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(a, b)


def test_fast_mode_is_close(files):
    path, dec = files
    model, tok = load(str(path), mode="fast", threads=2)
    for text in PROMPTS:
        ref = _logits(dec, tok, text)
        got = _logits(model, tok, text)
        # int8 levels and activations: measured ~1e-2 of the largest logit on this model
        assert ((got - ref).abs().max() / ref.abs().max()).item() < 0.05
        p, q = torch.log_softmax(ref, -1), torch.log_softmax(got, -1)
        kl = (p.exp() * (p - q)).sum(-1).mean().item()
        assert kl < 1e-2


def test_quantized_linears_are_never_dense(files):
    path, _ = files
    model, _ = load(str(path))
    luts = [m for m in model.modules() if isinstance(m, LutLinear)]
    assert len(luts) == 15
    # a tied head runs from the quantized embedding's codes; the embedding stays dense
    assert not [n for n, m in model.named_modules() if type(m) is nn.Linear]
    assert isinstance(model.get_output_embeddings(), LutLinear)
    assert all(not t.is_meta for t in model.state_dict().values())


def test_group_pruned_and_eight_bit_tensors_decode_exactly(files):
    """Every LutLinear's levels are the decoded tensor, pruned positions exactly 0."""
    path, dec = files
    model, _ = load(str(path), mode="reference")
    sd = dec.state_dict()
    for name, m in model.named_modules():
        if isinstance(m, LutLinear):
            want = sd[f"{name}.weight"]  # a tied head: the embedding's
            np.testing.assert_array_equal(m.dense_weight().numpy(), want.numpy())


def test_missing_hf_folder_is_one_line(tmp_path, files):
    import shutil

    path, _ = files
    lone = tmp_path / "lone.hwq"
    shutil.copy(path, lone)
    with pytest.raises(FileNotFoundError, match="holds no config.json"):
        load(str(lone))
    with pytest.raises(ValueError, match="mode must be"):
        load(str(path), mode="turbo")


def test_a_config_without_a_kv_cache_still_generates_with_one(tmp_path):
    """A GGUF's config (and hf/ folders of older hwq runs) says use_cache: false; the runtime
    turns the cache on, or generate() recomputes the whole prefix at every new token."""
    import json

    path = tiny_llama_hwq(tmp_path)
    conf = tmp_path / "hf" / "config.json"
    conf.write_text(json.dumps({**json.loads(conf.read_text()), "use_cache": False}))
    model, tok = load(str(path), mode="reference", threads=1)
    assert model.config.use_cache and model.generation_config.use_cache
    ids = tok(PROMPTS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        out = model(ids)
    assert out.past_key_values is not None
