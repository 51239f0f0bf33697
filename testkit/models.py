"""Tiny models and texts built offline, for tests and benchmarks: a random Llama saved as a
Hugging Face model folder with a byte-level BPE tokenizer trained here on a small corpus.

`tiny_llama_folder(path)` writes config.json, model.safetensors and the tokenizer files;
`write_corpus(path)` writes a text file of the corpus's sentences. Everything is seeded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["corpus", "tiny_tokenizer", "tiny_llama", "tiny_llama_folder", "write_corpus",
           "tiny_sharded_bf16_folder", "write_llama_gguf"]

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


_GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
               "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def write_llama_gguf(model, path: str | Path, tokens: list[str] | None = None,
                     matrix_type: str = "F32") -> Path:
    """A transformers Llama as a GGUF in llama.cpp's layout (q/k rows permuted as its
    converter does; transformers undoes it on load). `tokens`: a token list for its metadata;
    `matrix_type`: the ggml type of its 2-D weights ("F32", "F16" or "Q8_0": real
    dequantization on load); norms stay F32. Tied embeddings write no output.weight."""
    import gguf
    from gguf.quants import quantize

    cfg = model.config
    qtype = gguf.GGMLQuantizationType[matrix_type]

    def permute(w, heads):
        return (w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:])
                .swapaxes(1, 2).reshape(w.shape))

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(cfg.vocab_size)
    if tokens is not None:
        w.add_token_list(tokens)
        w.add_token_scores([0.0] * len(tokens))
        w.add_token_types([1] * len(tokens))
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    for name, t in model.state_dict().items():
        a = t.float().numpy()
        if name == "model.embed_tokens.weight":
            key = "token_embd.weight"
        elif name == "model.norm.weight":
            key = "output_norm.weight"
        elif name == "lm_head.weight":
            if tied:
                continue
            key = "output.weight"
        else:
            _, _, layer, rest = name.split(".", 3)
            mod = rest.removesuffix(".weight")
            key = f"blk.{layer}.{_GGUF_NAMES[mod]}.weight"
            if mod == "self_attn.q_proj":
                a = permute(a, cfg.num_attention_heads)
            elif mod == "self_attn.k_proj":
                a = permute(a, cfg.num_key_value_heads)
        a = np.ascontiguousarray(a, dtype=np.float32)
        if a.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            w.add_tensor(key, quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(key, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)
