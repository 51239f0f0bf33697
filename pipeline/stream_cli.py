"""`hwq stream MODEL WORK`: `hwq run` with model.residency=streamed, its flags mapped onto
config keys (`stream_config`), so the commands written for the earlier separate program keep
working. WORK is the run's store."""

from __future__ import annotations

import argparse
import json
import logging
import math

from pipeline.errors import UserError

__all__ = ["add_commands"]

log = logging.getLogger(__name__)


class StreamFlagError(UserError, ValueError):
    """Flags of `hwq stream` that do not go together."""


def _int_at_least(lo: int):
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if n < lo:
            raise argparse.ArgumentTypeError(f"must be at least {lo}, got {n}")
        return n

    return parse


def _bits(text: str) -> float:
    try:
        b = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(b) or not 0 < b <= 32:
        raise argparse.ArgumentTypeError(f"must be a number of bits in (0, 32], got {text}")
    return b


def _seed(text: str) -> int:
    n = _int_at_least(0)(text)
    if n >= 2**31:
        raise argparse.ArgumentTypeError(f"must be below 2^31, got {n}")
    return n


def _prune(text: str) -> dict:
    """--prune: "N:M" or a kept fraction in (0, 1) → the prune section (one shot, OBD)."""
    from pipeline.config_checks import parse_n_m

    if ":" in text:
        try:
            parse_n_m(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e).replace("prune.n_m=", "")) from None
        return {"enabled": True, "n_m": text.strip(), "criterion": "obd"}
    try:
        keep = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not N:M (e.g. 2:4) or a kept fraction: {text!r}"
                                         ) from None
    if not 0 < keep < 1:
        raise argparse.ArgumentTypeError(f"a kept fraction is in (0, 1), got {text}")
    return {"enabled": True, "keep": {"*": keep}, "criterion": "obd"}


def stream_config(args) -> dict:
    """The `hwq run` config `hwq stream`'s flags stand for (a dict of sections)."""
    data: dict = {"calibration_windows": args.windows, "seq_len": args.seq_len}
    if args.text:
        data.update(name="text", calibration=[args.text])
        if args.eval:
            data["eval"] = {"eval": args.eval}
            data["eval_seq_len"] = args.eval_seq_len
            data["eval_max_windows"] = args.eval_windows
    else:
        if args.eval:
            raise StreamFlagError("--eval needs --text (the calibration text; the model's "
                                  "tokenizer reads both)")
        log.warning("no --text: calibrating on seeded random tokens (fine for a synthetic "
                    "model; give real text for a real one)")
        data["name"] = "random_tokens"
    model = {"name": "hf_causal_lm", "path": args.model, "residency": "streamed"}
    if args.tokenizer:
        model["tokenizer"] = args.tokenizer
    store: dict = {"url": args.work}
    if args.endpoint_url:
        store["endpoint_url"] = args.endpoint_url
    executor: dict = {}
    if args.cpus:
        executor["num_cpus"] = args.cpus
    if args.ray_address:
        executor["address"] = args.ray_address
    return {
        "name": "stream", "seed": args.seed, "model": model, "data": data,
        "hessian": {"estimator": args.estimator, "partitions": args.partitions,
                    "groups": args.groups},
        "quantize": {"method": args.method, "scope": "channel", "target_bits": args.bits,
                     "embeddings": args.embeddings, "ecsq_bins": args.ecsq_bins,
                     **({"serve_bits": sb} if (sb := getattr(args, "serve_bits", None)) else {})},
        "finetune": ({"enabled": True, "mode": "blockwise", "block_steps": args.finetune_steps}
                     if args.finetune_steps else {"enabled": False}),
        "encode": {"coder": args.coder},
        "store": store, "executor": executor,
        **({"prune": pr} if (pr := getattr(args, "prune", None)) else {}),
    }


def _stream(args) -> int:
    from pipeline import driver
    from pipeline.api import to_config
    from pipeline.executor import shutdown_ray
    from pipeline.progress import default_log_handler
    from pipeline.report import render_markdown
    from pipeline.stream_inputs import check_lengths, check_paths, model_config

    opts = {"client_kwargs": {"endpoint_url": args.endpoint_url}} if args.endpoint_url else None
    # Every check the arguments and the file system allow, before Ray starts, named by flag
    # (driver.run's preflight checks the config again, named by its keys).
    check_paths(args.model, args.work, opts, texts={"--text": args.text, "--eval": args.eval},
                tokenizer=args.tokenizer)
    lengths = {"--seq-len": args.seq_len}
    if args.eval:
        lengths["--eval-seq-len"] = args.eval_seq_len
    check_lengths(model_config(args.model, opts), args.model, lengths)
    cfg = to_config(stream_config(args))
    default_log_handler()
    until = {"hessian": "hessian", "quantize": "quantize", "finetune": "finetune"}.get(args.until)
    try:
        report = driver.run(cfg, until=until, out=args.out)
    finally:
        shutdown_ray()
    if until is not None:
        print(f"stopped after {until}: {args.work.rstrip('/')}/stages/")
        return 0
    print()
    print(render_markdown(report))
    if args.json:
        print(json.dumps(report, indent=1, default=str))
    return 0


def add_commands(sub) -> None:
    s = sub.add_parser(
        "stream", help="compress a safetensors model larger than memory (hwq run, streamed)",
        description="hwq run with model.residency=streamed: the model folder is read in place, "
        "tensor by tensor and one decoder block at a time, never whole. Stages: load (what the "
        "model is, the calibration windows), hessian (P data partitions x G block groups as Ray "
        "tasks), quantize (a Ray task per tensor under one λ, the file's rate aimed at --bits), "
        "encode (the .hwq written section by section, then decoded tensor by tensor and checked "
        "bit for bit; with --eval, perplexity of the original and the decoded model). WORK is "
        "the run's store: stage folders with manifests, report.md, and per-unit records, so a "
        "killed run resumes without redoing finished units. Same as `hwq run CONFIG` with the "
        "config these flags stand for.")
    s.add_argument("model", help="a safetensors model folder with config.json (or s3:// URL)")
    s.add_argument("work", help="the run's store: a folder or s3:// URL")
    s.add_argument("--estimator", choices=("activation", "fisher"), default="activation",
                   help="activation: E[x²] per input channel, forward only (default); fisher: "
                   "per-window squared gradients, block-wise recomputation")
    s.add_argument("--method", choices=("uniform", "ecsq"), default="uniform",
                   help="per-channel quantizer under one λ for every row (default uniform)")
    s.add_argument("--ecsq-bins", type=_int_at_least(0), default=0, metavar="N",
                   help="--method ecsq on rows of at least 8·N weights: iterate on N bins of "
                   "values, then one exact pass (20-50x faster, a Lagrangian ~2-3%% above the "
                   "exact solver's); 0: exact (default)")
    s.add_argument("--bits", type=_bits, default=3.0,
                   help="all-in bits per weight of the quantized tensors (default 3)")
    s.add_argument("--serve-bits", type=int, choices=(2, 3, 4), default=None, metavar="B",
                   help="quantize.serve_bits: at most 2^B levels a row, so that `hwq generate` "
                        "and `hwq serve` run the file from B-bit packed indices (2, 3 or 4)")
    s.add_argument("--text", help="calibration text (file, folder or URL); default: seeded "
                   "random tokens")
    s.add_argument("--tokenizer", metavar="PATH_OR_URL",
                   help="folder (or s3:// URL) with the tokenizer files for --text and --eval, "
                   "copied into hf/ and the decoded folder (default: the model's own)")
    s.add_argument("--windows", type=_int_at_least(1), default=4,
                   help="calibration windows (default 4)")
    s.add_argument("--seq-len", type=_int_at_least(2), default=64,
                   help="tokens per window, at most the model's positions (default 64)")
    s.add_argument("--seed", type=_seed, default=0,
                   help="seed of the calibration windows and quantizer inits (default 0)")
    s.add_argument("--coder", choices=("huffman", "ans"), default="huffman")
    s.add_argument("--embeddings", choices=("keep", "head", "quantize"), default="keep",
                   help="the token embedding and output head: keep them as stored (default), "
                   "quantize the head only (an untied input embedding has no activation "
                   "statistics), or both (quantize.embeddings)")
    s.add_argument("--prune", type=_prune, metavar="N:M|KEEP",
                   help="one-shot pruning of every decoder Linear before quantizing, by OBD "
                   "saliency (h·w² with the run's Hessian): N of every M consecutive weights "
                   "of a row (2:4) or a kept fraction of each row (0.75); the masks are coded "
                   "in the file and count in --bits (prune.method=one_shot)")
    s.add_argument("--finetune-steps", type=_int_at_least(0), default=0, metavar="N",
                   help="block-wise fine-tuning of the codebooks, N Adam steps per decoder "
                   "block (finetune.mode=blockwise); 0 (default): none")
    s.add_argument("--eval", metavar="TEXT", help="after decoding, perplexity of the original "
                   "and the decoded model on this text (non-overlapping windows, both models "
                   "streamed block by block); needs the model's tokenizer (or --tokenizer)")
    s.add_argument("--eval-seq-len", type=_int_at_least(2), default=512,
                   help="tokens per eval window")
    s.add_argument("--eval-windows", type=_int_at_least(1), default=16,
                   help="at most this many windows")
    s.add_argument("--partitions", type=_int_at_least(1), default=2,
                   help="Hessian data partitions (default 2)")
    s.add_argument("--groups", type=_int_at_least(1), default=2,
                   help="Hessian groups of consecutive decoder blocks (default 2); partitions x "
                   "groups Ray tasks")
    s.add_argument("--until", choices=("hessian", "quantize", "finetune", "encode", "decode"),
                   default="decode", help="stop after this stage (encode and decode: the whole "
                   "run; the encode stage decodes its file to check it)")
    s.add_argument("--out", metavar="DIR_OR_URL",
                   help="copy the final model.hwq there (as hwq run --out)")
    s.add_argument("--cpus", type=_int_at_least(1),
                   help="CPUs of the embedded Ray (default: all)")
    s.add_argument("--ray-address", metavar="ADDR", help="join a Ray cluster instead")
    s.add_argument("--endpoint-url", metavar="URL", help="S3-compatible endpoint")
    s.add_argument("--json", action="store_true", help="also print the report as JSON")
    s.set_defaults(func=_stream)
