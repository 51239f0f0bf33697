"""Block-by-block estimators equal the in-memory ones; the model is never read whole."""

from __future__ import annotations

import pytest
import torch

from pipeline.hessian.lm import activation_diag_lm, fisher_diag_lm
from pipeline.hessian.stream import activation_streamed, fisher_streamed
from pipeline.models.stream import StreamedLM
from pipeline.models.weights import write_folder
from testkit.models import tiny_llama


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A tiny Llama saved as a sharded folder (several shards), plus the model in memory."""
    path = tmp_path_factory.mktemp("tiny") / "model"
    model = tiny_llama(layers=3, hidden=32, attn_implementation="eager")
    _save_sharded(model, path, max_shard_bytes=40_000)
    return path, model


def _save_sharded(model, path, max_shard_bytes=2 << 30):
    """`model` as a sharded safetensors folder (config.json beside; a tied head left out)."""
    model.config.save_pretrained(path)
    sd = model.state_dict()
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight")
    write_folder(path, sd, [(n, t.dtype, tuple(t.shape)) for n, t in sd.items()],
                 max_shard_bytes=max_shard_bytes)


def _ppl(model, w):
    with torch.no_grad():
        logits = model(input_ids=w).logits[:, :-1]
        return float(torch.exp(torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1))))


def _windows(n=5, L=12, vocab=300):
    return torch.randint(0, vocab, (n, L), generator=torch.Generator().manual_seed(3))


def _targets(model):
    return [n for n, p in model.named_parameters() if ".layers." in n and n.endswith("proj.weight")]


def test_streamed_perplexity_equals_the_model(sharded):
    path, model = sharded
    w = _windows()
    lm = StreamedLM(str(path))
    assert lm.perplexity(w, batch=2) == pytest.approx(_ppl(model, w), rel=1e-5)


def test_block_fisher_equals_in_memory_fisher(sharded, tmp_path):
    path, model = sharded
    w = _windows()
    names = _targets(model) + ["model.layers.1.input_layernorm.weight"]
    ref = fisher_diag_lm(model, w, names, batch_size=1)
    got = {}
    lm = StreamedLM(str(path))
    n = fisher_streamed(lm, w, names, lambda k, v, c: got.__setitem__(k, (v, c)),
                        cache_bytes=10_000, spill_dir=str(tmp_path))  # forces spilling
    assert n == w.shape[0] and set(got) == set(names)
    for k in names:
        v, c = got[k]
        assert c == ref.n
        torch.testing.assert_close(torch.from_numpy(v).double(), ref.sums[k], rtol=2e-4, atol=1e-12)
    assert not any(tmp_path.rglob("*.safetensors"))  # the spill folder is cleaned up
    # Every block was freed again.
    assert all(p.device.type == "meta" for p in lm.model.parameters())


def test_block_activation_equals_in_memory(sharded):
    path, model = sharded
    w = _windows()
    names = _targets(model)
    ref = activation_diag_lm(model, w, names)
    got = {}
    lm = StreamedLM(str(path))
    before = lm.weights.bytes_read
    activation_streamed(lm, w, names, lambda k, v, c: got.__setitem__(k, (v, c)), batch=2)
    for k in names:
        v, c = got[k]
        assert c == ref.n
        full = torch.from_numpy(v).expand_as(ref.sums[k])
        torch.testing.assert_close(full, ref.sums[k], rtol=1e-5, atol=1e-9)
    # Only the embedding and the blocks were read, each once.
    want = sum(t.nbytes for n, t in lm.weights.tensors.items()
               if ".layers." in n or n == "model.embed_tokens.weight")
    assert lm.weights.bytes_read - before == want


def test_non_block_tensor_is_refused(sharded):
    path, _ = sharded
    # the embedding and the head are streamed too (tests/hessian/test_stream_embeddings.py);
    # the final norm is not
    with pytest.raises(ValueError, match="not parameters of a decoder block"):
        fisher_streamed(StreamedLM(str(path)), _windows(), ["model.norm.weight"],
                        lambda *a: None)


def test_per_block_masks_sliding_and_full_attention(tmp_path):
    """Blocks of different kinds get their own mask (captured per block, not block 0's)."""
    import transformers

    def make(types, sliding):
        torch.manual_seed(0)
        cfg = transformers.Qwen2Config(
            vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            use_sliding_window=sliding, sliding_window=3, layer_types=types,
            attn_implementation="eager")
        return transformers.Qwen2ForCausalLM(cfg).eval()

    model = make(["sliding_attention", "full_attention", "sliding_attention"], True)
    _save_sharded(model, tmp_path)
    w = _windows(3, 12)
    streamed = StreamedLM(str(tmp_path)).perplexity(w)
    assert streamed == pytest.approx(_ppl(model, w), rel=1e-5)
    full = make(["full_attention"] * 3, False)  # same weights, every block full attention
    assert abs(_ppl(full, w) - _ppl(model, w)) > 100 * abs(streamed - _ppl(model, w))


def test_models_that_scale_their_embeddings(tmp_path):
    """Gemma multiplies the embeddings by sqrt(hidden) before block 0: the streamed hidden
    states are the ones the model hands block 0, not the raw embedding."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.Gemma2Config(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
        sliding_window=4, final_logit_softcapping=None, attn_implementation="eager")
    model = transformers.Gemma2ForCausalLM(cfg).eval()
    _save_sharded(model, tmp_path)
    w = _windows(3, 12)
    assert StreamedLM(str(tmp_path)).perplexity(w) == pytest.approx(_ppl(model, w), rel=1e-5)
