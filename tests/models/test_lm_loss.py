"""Chunked next-token NLL equals the plain logits computation, values and gradients."""

import pytest
import torch

transformers = pytest.importorskip("transformers")


def _tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def _plain(model, ids):
    logits = model(input_ids=ids).logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:],
                                             reduction="none").sum(1)


@pytest.mark.parametrize("chunk", [1, 5, 128])
def test_chunked_equals_plain_values_and_gradients(chunk):
    from pipeline.models.lm_loss import chunked_head_supported, next_token_nll

    model = _tiny_llama()
    assert chunked_head_supported(model)
    ids = torch.randint(0, 97, (3, 17), generator=torch.Generator().manual_seed(1))
    want = _plain(model, ids)
    gw = torch.autograd.grad(want.sum(), list(model.parameters()))
    got = next_token_nll(model, ids, chunk_tokens=chunk)
    gg = torch.autograd.grad(got.sum(), list(model.parameters()))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(gg, gw, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_rejects_too_short_input():
    from pipeline.models.lm_loss import next_token_nll

    with pytest.raises(ValueError, match="tokens"):
        next_token_nll(_tiny_llama(), torch.zeros(2, 1, dtype=torch.long))
