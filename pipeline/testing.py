"""Tiny models, texts and weights built offline, for tests, examples and benchmarks: a random
Llama saved as a Hugging Face model folder with a byte-level BPE tokenizer trained here on a
small corpus, and a synthetic weight stream for the quantizers.

`tiny_llama_folder(path)` writes config.json, model.safetensors and the tokenizer files;
`write_corpus(path)` writes a text file of the corpus's sentences; `synthetic_weights(a, b)` is
elements [a, b) of a (w, h) stream like trained weights and their Fisher diagonal. Everything is
seeded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["corpus", "synthetic_weights", "tiny_tokenizer", "tiny_llama", "tiny_llama_folder",
           "write_corpus"]

WORDS = ("the quick brown fox jumps over a lazy dog while hessian weighted quantization of "
         "every layer keeps the loss low and the file small").split()


def corpus(lines: int = 200, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    return "".join(" ".join(rng.choice(WORDS, size=rng.integers(3, 12))) + ".\n"
                   for _ in range(lines))


def tiny_tokenizer(vocab: int = 300):
    """A byte-level BPE trained on `corpus()`, as a transformers fast tokenizer."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([corpus()], trainers.BpeTrainer(
        vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<s>", "</s>"]))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>",
                                                eos_token="</s>")


def tiny_llama(vocab: int = 300, seed: int = 0, layers: int = 2, hidden: int = 64, **kw):
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden,
                                   intermediate_size=2 * hidden, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=256, **kw)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_llama_folder(path: str | Path, vocab: int = 300, seed: int = 0, **kw) -> Path:
    """A Hugging Face model folder (safetensors + tokenizer) of a random tiny Llama."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tiny_llama(vocab, seed, **kw).save_pretrained(path)
    tiny_tokenizer(vocab).save_pretrained(path)
    return path


def write_corpus(path: str | Path, lines: int = 200, seed: int = 0) -> Path:
    path = Path(path)
    path.write_text(corpus(lines, seed))
    return path


# --------------------------------------------------------------------------------------------
# Synthetic weights for the quantizers' tests and benchmarks
# --------------------------------------------------------------------------------------------

_SYN_CHUNK = 1 << 16


def synthetic_weights(start: int, stop: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Elements [start, stop) of a deterministic synthetic (w, h) stream, float32 each.

    w: a mixture of Laplacians (scale 0.02 around 0, 10% wider around ±0.05) like trained
    weights; h: lognormal (σ = 1.5), heavy-tailed like a Fisher diagonal, larger for larger
    |w|. Generated per chunk of 2**16 global indices from (seed, chunk), so any range equals
    the same slice of the full stream: shards can make their own data.
    """
    if stop < start:
        raise ValueError("stop < start")
    w = np.empty(stop - start, dtype=np.float32)
    h = np.empty(stop - start, dtype=np.float32)
    c0 = start // _SYN_CHUNK
    for c in range(c0, -(-stop // _SYN_CHUNK)):
        rng = np.random.default_rng([seed, c])
        m = _SYN_CHUNK
        comp = rng.random(m) < 0.1
        loc = np.where(comp, np.where(rng.random(m) < 0.5, -0.05, 0.05), 0.0)
        scale = np.where(comp, 0.04, 0.02)
        ww = (loc + rng.laplace(0.0, 1.0, m) * scale).astype(np.float32)
        hh = (rng.lognormal(0.0, 1.5, m) * (1.0 + 20.0 * np.abs(ww))).astype(np.float32)
        a = max(start, c * _SYN_CHUNK)
        b = min(stop, (c + 1) * _SYN_CHUNK)
        w[a - start:b - start] = ww[a - c * _SYN_CHUNK:b - c * _SYN_CHUNK]
        h[a - start:b - start] = hh[a - c * _SYN_CHUNK:b - c * _SYN_CHUNK]
    return w, h
