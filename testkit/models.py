"""Tiny models and texts built offline, for tests and benchmarks: a random Llama saved as a
Hugging Face model folder with a byte-level BPE tokenizer trained here on a small corpus.

`tiny_llama_folder(path)` writes config.json, model.safetensors and the tokenizer files;
`write_corpus(path)` writes a text file of the corpus's sentences. Everything is seeded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["corpus", "tiny_tokenizer", "tiny_llama", "tiny_llama_folder", "write_corpus"]

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


def tiny_sharded_bf16_folder(path: str | Path, layers: int = 2, hidden: int = 64,
                             max_shard_bytes: int = 60_000, tied: bool = False) -> Path:
    """A tiny random Llama as a sharded bf16 safetensors folder (index, config, tokenizer):
    what a streamed run reads in place. tied: the head tied to the input embedding (the
    folder then holds the embedding only, as `save_pretrained` writes it)."""
    import torch

    from pipeline.models.weights import write_folder

    path = Path(path)
    model = tiny_llama(layers=layers, hidden=hidden, tie_word_embeddings=tied).to(torch.bfloat16)
    model.config.save_pretrained(path)
    tiny_tokenizer(300).save_pretrained(path)
    sd = dict(model.state_dict())
    if tied:
        sd.pop("lm_head.weight")
    write_folder(path, sd, [(n, t.dtype, tuple(t.shape)) for n, t in sd.items()],
                 max_shard_bytes=max_shard_bytes)
    return path
