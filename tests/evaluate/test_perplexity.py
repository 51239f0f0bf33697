"""Perplexity equals exp(mean cross-entropy) of the plain logits; a uniform model's is the
vocabulary size; the metric registry knows which way is better."""

import math
import sys
import textwrap

import pytest
import torch
from torch import nn

from pipeline.evaluate.metrics import MetricError, get_metric, is_better, metric_key
from pipeline.evaluate.perplexity import perplexity

transformers = pytest.importorskip("transformers")

VOCAB = 97


def _llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg)


def _windows(m=5, length=16):
    return torch.randint(0, VOCAB, (m, length), generator=torch.Generator().manual_seed(1))


def test_perplexity_equals_brute_force_cross_entropy():
    model = _llama().train()
    w = _windows()
    calls = []
    got = perplexity(model, w, batch_size=2, chunk_tokens=5,
                     progress=lambda done, total: calls.append((done, total)))
    with torch.no_grad():
        logits = model.eval()(w).logits[:, :-1]
        ce = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), w[:, 1:].reshape(-1))
    assert got["tokens"] == 5 * 15 and got["windows"] == 5
    assert got["ppl"] == pytest.approx(math.exp(float(ce)), rel=1e-5)
    assert got["nll"] == pytest.approx(float(ce) * 75, rel=1e-5)
    assert got["nll_per_token"] == pytest.approx(float(ce), rel=1e-5)
    assert calls == [(2, 5), (4, 5), (5, 5)]
    model.train()
    perplexity(model, w)
    assert model.training  # the flag is restored


def test_uniform_logits_give_the_vocabulary_size():
    model = _llama()
    nn.init.zeros_(model.lm_head.weight)
    assert perplexity(model, _windows(3, 9), batch_size=8)["ppl"] == pytest.approx(VOCAB, rel=1e-6)


def test_perplexity_rejects_bad_windows():
    with pytest.raises(ValueError, match="windows must be"):
        perplexity(_llama(), torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="windows must be"):
        perplexity(_llama(), torch.zeros(8, dtype=torch.long))


def test_metric_registry(tmp_path, monkeypatch):
    from pipeline.data import Split

    ppl, acc = get_metric("perplexity"), get_metric("accuracy")
    assert (ppl.direction, acc.direction) == ("lower", "higher")
    assert is_better("perplexity", 10.0, 12.0) and not is_better("perplexity", 12.0, 10.0)
    assert is_better(acc, 0.9, 0.8)
    assert metric_key("quantized", "perplexity") == "quantized_perplexity"
    model, w = _llama(), _windows(2, 8)
    assert ppl(model, w) == pytest.approx(perplexity(model, w)["ppl"])
    lin = nn.Linear(4, 3)
    x = torch.randn(10, 4)
    split = Split(x, lin(x).argmax(1))
    assert acc(lin, split) == 1.0

    (tmp_path / "hwq_user_metric_mod.py").write_text(textwrap.dedent("""
        def lower_is_better(model, data):
            return 2.5
        lower_is_better.direction = "lower"

        def undirected(model, data):
            return 1.0
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "hwq_user_metric_mod", raising=False)
    mine = get_metric("hwq_user_metric_mod:lower_is_better")
    assert (mine.name, mine.direction, mine(model, None)) == ("lower_is_better", "lower", 2.5)
    assert metric_key("finetuned", "hwq_user_metric_mod:lower_is_better") == \
        "finetuned_lower_is_better"
    with pytest.raises(MetricError, match="higher or lower is better"):
        get_metric("hwq_user_metric_mod:undirected")
    assert get_metric("hwq_user_metric_mod:undirected", direction="higher").direction == "higher"
    with pytest.raises(MetricError, match="unknown metric 'bleu'"):
        get_metric("bleu")
    sys.modules.pop("hwq_user_metric_mod", None)
