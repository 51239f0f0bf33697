"""`hwq stream`: the streamed pipeline for a model larger than memory (pipeline/streamed.py)."""

from __future__ import annotations

import json
import logging
import time

__all__ = ["add_commands"]

log = logging.getLogger(__name__)
GiB = 1 << 30


def _windows(args):
    """Calibration windows from --text with the model folder's tokenizer, or None (seeded
    random tokens: enough for a synthetic model, a poor Hessian for a real one)."""
    if not args.text:
        log.warning("no --text: calibrating on seeded random tokens (fine for a synthetic "
                    "model; give real text for a real one)")
        return None
    from pipeline.data.text import calibration_windows, load_tokenizer, read_text

    if "://" in args.model:
        raise ValueError("--text needs the tokenizer files of a local model folder; copy "
                         "them next to the text or calibrate without --text")
    tok = load_tokenizer(args.model)  # checked files; a tokenizer panic is one line
    return calibration_windows(tok, read_text(args.text), args.windows, args.seq_len, args.seed)


def _eval_windows(args):
    if not args.eval:
        return None
    from pipeline.data.text import eval_windows, load_tokenizer, read_text

    if "://" in args.model:
        raise ValueError("--eval needs the tokenizer files of a local model folder")
    tok = load_tokenizer(args.model)  # checked files; a tokenizer panic is one line
    return eval_windows(tok, read_text(args.eval), args.eval_seq_len, args.eval_windows)


def _stream(args) -> int:
    from pipeline.executor import init_ray, shutdown_ray
    from pipeline.streamed import StreamSettings, run_streamed

    opts = {"client_kwargs": {"endpoint_url": args.endpoint_url}} if args.endpoint_url else None
    st = StreamSettings(estimator=args.estimator, windows=args.windows, seq_len=args.seq_len,
                        seed=args.seed, method=args.method, target_bits=args.bits,
                        coder=args.coder)
    stages = ("hessian", "quantize", "encode", "decode")[: ("hessian", "quantize", "encode",
                                                          "decode").index(args.until) + 1]
    from pipeline.models.weights import WeightsFolder

    WeightsFolder(args.model, opts)  # a clear error before anything starts
    windows = _windows(args)
    ev = _eval_windows(args)
    import ray

    started = not ray.is_initialized()
    init_ray(address=args.ray_address, num_cpus=args.cpus)
    t0 = time.perf_counter()
    rows = []

    def on_stage(name: str, m: dict) -> None:
        mem = m["memory"]
        rows.append((name, m))
        log.info("%s: %s%.1f s, %.2f M weights/s, driver %.2f GiB, workers ≤ %.2f GiB",
                 name, "cache hit; " if m.get("cached") else "", m["seconds"],
                 m.get("weights_per_s", 0) / 1e6, mem["driver_peak_rss"] / GiB,
                 mem["workers_peak_rss"] / GiB)

    def progress(name: str) -> None:
        log.debug("quantized %s", name)

    try:
        out = run_streamed(args.model, args.work, st, storage_options=opts, windows=windows,
                           stages=stages, on_stage=on_stage, progress=progress,
                           eval_windows=ev)
    finally:
        if started:
            shutdown_ray()
    print(f"\n{'stage':<9} {'state':<7} {'seconds':>8} {'M weights/s':>12} "
          f"{'driver GiB':>10} {'worker GiB':>10}")
    for name, m in rows:
        print(f"{name:<9} {'cached' if m.get('cached') else 'ran':<7} {m['seconds']:>8.1f} "
              f"{m.get('weights_per_s', 0) / 1e6:>12.2f} "
              f"{m['memory']['driver_peak_rss'] / GiB:>10.2f} "
              f"{m['memory']['workers_peak_rss'] / GiB:>10.2f}")
    if "quantize" in out:
        print(f"rate: {out['quantize']['rate_bits']:.3f} bits/weight (all-in, quantized "
              f"tensors), λ = {out['quantize']['lam']:.4g}")
    if "encode" in out:
        print(f"file: {args.work.rstrip('/')}/model.hwq "
              f"({out['encode']['outputs']['model.hwq']['bytes'] / GiB:.3f} GiB)")
    if "decode" in out:
        print(f"decoded folder: {args.work.rstrip('/')}/decoded")
    if "evaluate" in out:
        e = out["evaluate"]
        print(f"perplexity: {e['original_perplexity']:.4g} original, "
              f"{e['decoded_perplexity']:.4g} decoded ({e['perplexity_ratio']:.3f}×)")
    print(f"manifests: {args.work.rstrip('/')}/manifests/ ({time.perf_counter() - t0:.0f} s)")
    if args.json:
        print(json.dumps(out, indent=1, default=str))
    return 0


def add_commands(sub) -> None:
    s = sub.add_parser(
        "stream", help="compress a safetensors model larger than memory, tensor by tensor",
        description="The streamed pipeline: Hessian one decoder block at a time, per-channel "
        "quantization under one λ with a Ray task per tensor, a .hwq written section by "
        "section, and a decoded sharded folder. No process reads the whole model: every "
        "tensor is a range read of its bytes (local or s3://). Rerunning resumes: a stage "
        "whose manifest matches is a cache hit. Manifests under WORK/manifests/ record "
        "seconds, weights/s, bytes read and the peak RSS of the driver and every worker.")
    s.add_argument("model", help="a safetensors model folder with config.json (or s3:// URL)")
    s.add_argument("work", help="work folder for every output (or s3:// URL)")
    s.add_argument("--estimator", choices=("activation", "fisher"), default="activation",
                   help="activation: E[x²] per input channel, forward only (default); fisher: "
                   "per-window squared gradients, block-wise recomputation")
    s.add_argument("--method", choices=("uniform", "ecsq"), default="uniform",
                   help="per-channel quantizer under one λ for every row (default uniform)")
    s.add_argument("--bits", type=float, default=3.0,
                   help="all-in bits per weight of the quantized tensors (default 3)")
    s.add_argument("--text", help="calibration text (file, folder or URL); default: seeded "
                   "random tokens")
    s.add_argument("--windows", type=int, default=4, help="calibration windows (default 4)")
    s.add_argument("--seq-len", type=int, default=64, help="tokens per window (default 64)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--coder", choices=("huffman", "ans"), default="huffman")
    s.add_argument("--eval", metavar="TEXT", help="after decoding, perplexity of the original "
                   "and the decoded model on this text (non-overlapping windows, both models "
                   "streamed block by block); needs the tokenizer in the model folder")
    s.add_argument("--eval-seq-len", type=int, default=512, help="tokens per eval window")
    s.add_argument("--eval-windows", type=int, default=16, help="at most this many windows")
    s.add_argument("--until", choices=("hessian", "quantize", "encode", "decode"),
                   default="decode", help="stop after this stage")
    s.add_argument("--cpus", type=int, help="CPUs of the embedded Ray (default: all)")
    s.add_argument("--ray-address", metavar="ADDR", help="join a Ray cluster instead")
    s.add_argument("--endpoint-url", metavar="URL", help="S3-compatible endpoint")
    s.add_argument("--json", action="store_true", help="also print the manifests as JSON")
    s.set_defaults(func=_stream)
