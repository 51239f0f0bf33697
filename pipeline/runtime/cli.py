"""`hwq generate`: stream a completion from a .hwq file, run from its packed indices.

Problems a user can fix (no such file, no hf/ folder beside it, a tokenizer without a chat
template for --chat) are one `hwq: error: ...` line with exit status 2.
"""

from __future__ import annotations

import argparse
import sys
import time

__all__ = ["add_commands"]


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"not a positive integer: {text!r}")
    return v


def _temperature(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not 0.0 <= v <= 100.0:
        raise argparse.ArgumentTypeError(f"not a temperature in [0, 100]: {text!r}")
    return v


def _prompt_ids(tok, prompt: str, chat: bool):
    if not chat:
        return tok(prompt, return_tensors="pt").input_ids
    if not getattr(tok, "chat_template", None):
        raise ValueError(
            "--chat needs a tokenizer with a chat template; this model's "
            "tokenizer has none (leave out --chat)"
        )
    out = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt"
    )
    return out["input_ids"] if hasattr(out, "keys") else out


def _generate(args) -> int:
    import torch
    import transformers

    from pipeline.encode.cli import _opts

    from .loader import load

    t0 = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load(
        args.file,
        mode=args.mode,
        threads=args.threads,
        storage_options=_opts(args),
        hf_folder=args.hf_files,
        device=args.device,
        cache=not args.no_cache,
    )
    if tok is None:
        raise ValueError(f"{args.file}: its hf/ folder has no tokenizer files, and hwq generate "
                         "reads and writes text; give the model's folder with --hf-files")
    ids = _prompt_ids(tok, args.prompt, args.chat).to(model.device)
    first: list[float] = []

    class Streamer(transformers.TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text and not first:
                first.append(time.perf_counter())
            print(text, flush=True, end="" if not stream_end else None)

    if not args.chat:
        print(args.prompt, end="", flush=True)
    sample = args.temperature > 0
    kw = {"do_sample": sample}
    if sample:
        kw["temperature"] = args.temperature
    else:  # greedy: the model's sampling defaults (generation_config.json) do not apply
        kw.update(temperature=None, top_p=None, top_k=None)
    t1 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=args.max_new_tokens,
            streamer=Streamer(tok, skip_prompt=True, skip_special_tokens=True),
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
            **kw,
        )
    t2 = time.perf_counter()
    n = int(out.shape[1] - ids.shape[1])
    stats = model.hwq_runtime
    first_s = (first[0] - t0) if first else float("nan")
    print(
        f"[hwq generate: {n} tokens in {t2 - t1:.2f} s ({n / max(t2 - t1, 1e-9):.1f} "
        f"tok/s), first token {first_s:.2f} s after start (load {stats['seconds']:.2f} s); "
        f"{stats['lut']} lookup-table Linears at {_bits(stats['bits'])}, mode {args.mode}]",
        file=sys.stderr,
    )
    return 0


NO_CACHE_HELP = (
    "do not keep the transcoded tables on disk (by default the first load of a file writes "
    "them to $HWQ_CACHE/runtime-lut and later loads map them instead of entropy-decoding "
    "the file; HWQ_LUT_CACHE_BYTES bounds the folder, default 16 GiB)")


def _bits(bits: dict) -> str:
    return ", ".join(f"{n}x {b}-bit" for b, n in sorted(bits.items())) or "none"


def add_commands(sub) -> None:
    g = sub.add_parser(
        "generate", help="generate text from a .hwq file (no dense decode)",
        description="Load a .hwq file (local path or s3:// URL) into the lookup-table runtime "
        "(docs/RUNTIME.md): its quantized Linears run from packed 2-, 3-, 4- or 8-bit indices and "
        "per-row tables, never decoded dense. The model's config and tokenizer come from the "
        "hf/ folder beside the file. Streams the completion to stdout (greedy unless "
        "--temperature), then one line of timings to stderr.")  # fmt: skip
    g.add_argument("file", help="a .hwq file or URL")
    g.add_argument("--prompt", required=True, help="the text to continue")
    g.add_argument(
        "--max-new-tokens",
        type=_positive,
        default=128,
        metavar="N",
        help="tokens to generate at most (default 128)",
    )
    g.add_argument(
        "--threads",
        type=_positive,
        metavar="T",
        help="CPU threads for the kernels and torch (default: torch's)",
    )
    g.add_argument(
        "--mode",
        choices=("fast", "reference"),
        default="fast",
        help="fast: int8 levels and activations (default); reference: fp32 levels "
        "and activations, the decoded model's logits",
    )
    g.add_argument(
        "--chat",
        action="store_true",
        help="wrap the prompt in the tokenizer's chat template as a user turn",
    )
    g.add_argument(
        "--temperature",
        type=_temperature,
        default=0.0,
        metavar="T",
        help="sample at this temperature (default 0: greedy)",
    )
    g.add_argument(
        "--hf-files",
        metavar="FOLDER",
        help="where config.json and the tokenizer files are (default: the hf/ "
        "folder beside the .hwq file, as the encode stage writes)",
    )
    g.add_argument(
        "--device",
        metavar="DEV",
        help="run on this torch device, e.g. cuda (the lookup-table products by the Triton "
        "kernel; default: the CPU kernels)",
    )
    g.add_argument("--no-cache", action="store_true", help=NO_CACHE_HELP)
    g.add_argument("--endpoint-url", metavar="URL", help="S3-compatible endpoint for an s3:// file")
    g.set_defaults(func=_generate)
