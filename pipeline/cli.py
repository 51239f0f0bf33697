"""`hwq`: the command line.

    hwq run CONFIG [--store URL] [--ray-address ADDR] [--set section.key=value ...] [--force STAGE]
            [--out DIR_OR_URL [--hf-out]]
    hwq status ROOT          each stage of the last run: key, cached or run, seconds, headline
    hwq report ROOT [--json] the run's report
    hwq stream MODEL WORK    a safetensors model larger than memory, tensor by tensor
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from pipeline.error_lines import user_error as _user_error
from pipeline.errors import printable

__all__ = ["main"]

EXAMPLES = """\
examples:
  hwq run configs/lenet5_fmnist.yaml                        # embedded Ray, ./runs/default
  hwq run configs/lenet5_fmnist.yaml --set quantize.target_bits=2.5
  hwq run configs/lenet5_fmnist.yaml --force quantize       # rerun quantize and downstream
  hwq run configs/lenet5_fmnist.yaml --store s3://bucket/hwq --ray-address auto
  hwq run configs/smollm2_135m.yaml --set quantize.target_bits=4  # a causal LM
  hwq run configs/smollm2_135m.yaml --out s3://bucket/models/smollm2 --hf-out  # stable path
  hwq decode runs/default/stages/encode-<key>/model.hwq --hf-out smollm2-3bit
  hwq status runs/default
  hwq report runs/default --json
  hwq stream /models/llama-2-7b work/llama7b --bits 3 --text corpus.txt  # larger than memory
"""


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname).1s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("fsspec", "s3fs", "botocore", "aiobotocore", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _store_options(args) -> dict:
    opts = {}
    if getattr(args, "endpoint_url", None):
        opts["client_kwargs"] = {"endpoint_url": args.endpoint_url}
    return opts


def _cmd_run(args) -> int:
    from pipeline.api import compress

    overrides = list(args.set or [])
    if args.store:
        overrides.append(f"store.url={args.store}")
    if args.endpoint_url:
        overrides.append(f"store.endpoint_url={args.endpoint_url}")
    if args.ray_address:
        overrides.append(f"executor.address={args.ray_address}")
    report = compress(args.config, overrides, force=args.force or [], out=args.out,
                      hf_out=args.hf_out)
    print()
    from pipeline.report import render_markdown

    print(render_markdown(report))
    return 0


def _cmd_status(args) -> int:
    from pipeline.driver import published_output, run_state, status
    from pipeline.store import Store

    store = Store(args.root, _store_options(args), create=False)
    rows = status(store)
    run = run_state(store)
    print(f"{'stage':<10} {'key':<18} {'state':<9} {'seconds':>8}  headline")
    for r in rows:
        state = ("failed" if r.get("failed") else "missing" if not r["complete"] else
                 "cached" if r["cached"] else "ran")
        secs = f"{r['seconds']:.1f}" if r["seconds"] is not None else "–"
        head = ", ".join(
            f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
            for k, v in r["metrics"].items() if not isinstance(v, (dict, list))
        )
        print(f"{r['stage']:<10} {r['key']:<18} {state:<9} {secs:>8}  {printable(head)}")
    done = sum(r["complete"] for r in rows)
    if run["status"] is None:
        print(f"run: no run.json (a run that failed before this version recorded it, or "
              f"was killed); {done} of {len(rows)} stages complete")
    elif run["status"] != "complete":
        where = f" in stage {run['failed_stage']}" if run["failed_stage"] else ""
        why = f": {run['error']}" if run["error"] else ""
        label = "running (or killed)" if run["status"] == "running" else run["status"]
        print(printable(f"run: {label}{where} ({done} of {len(rows)} stages complete)"
                         f"{why}"))
    out = published_output(store)
    if out:
        print(f"output: {printable(out)}")
    return 0




def _cmd_report(args) -> int:
    from pipeline.store import Store

    store = Store(args.root, _store_options(args), create=False)
    if args.json:
        print(json.dumps(store.read_json("report.json"), indent=2))
    else:
        print(printable(store.read_bytes("report.md").decode("utf-8", "replace")))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="hwq",
        description="Compress trained networks with Hessian-weighted quantization and Huffman "
        "coding (Choi et al., ICLR 2017), as resumable stages on Ray.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    r = sub.add_parser("run", help="run (or resume) every stage of a config",
                       description="Run the stage graph. Stages whose key is already complete "
                       "in the store are cache hits; a killed run resumes where it stopped.")
    r.add_argument("config", help="YAML run config, e.g. configs/lenet5_fmnist.yaml")
    r.add_argument("--store", metavar="URL",
                   help="run root: a folder or s3://bucket/prefix (default: store.url)")
    r.add_argument("--endpoint-url", metavar="URL", help="S3-compatible endpoint for the store")
    r.add_argument("--ray-address", metavar="ADDR",
                   help="join a Ray cluster ('auto', ray://host:10001); default: embedded local")
    r.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config value, e.g. --set quantize.k=32 (repeatable)")
    r.add_argument("--force", action="append", metavar="STAGE",
                   help="recompute STAGE and everything downstream (repeatable)")
    r.add_argument("--out", metavar="DIR_OR_URL",
                   help="copy the final model.hwq to this folder or s3:// URL (a stable path "
                   "for a scheduled job; output.json beside it is written last)")
    r.add_argument("--hf-out", action="store_true",
                   help="with --out: also write the decoded model as a Hugging Face folder "
                   "(DIR/hf/, language models only)")
    r.set_defaults(func=_cmd_run)

    s = sub.add_parser("status", help="show the stages of the last run in a store")
    s.add_argument("root", help="run root (folder or s3:// URL)")
    s.add_argument("--endpoint-url", metavar="URL", help="S3-compatible endpoint for the store")
    s.set_defaults(func=_cmd_status)

    p = sub.add_parser("report", help="print a run's report")
    p.add_argument("root", help="run root (folder or s3:// URL)")
    p.add_argument("--json", action="store_true", help="report.json instead of report.md")
    p.add_argument("--endpoint-url", metavar="URL", help="S3-compatible endpoint for the store")
    p.set_defaults(func=_cmd_report)

    for extra in _extra_commands():
        extra(sub)
    return ap


def _extra_commands():
    """Subcommands contributed by stage packages (decode/inspect, sweep, batch, generate,
    serve, export)."""
    from pipeline.batch import add_commands as batch_commands
    from pipeline.encode.cli import add_commands as encode_commands
    from pipeline.runtime.cli import add_commands as runtime_commands
    from pipeline.runtime.export import add_commands as export_commands
    from pipeline.runtime.serve import add_commands as serve_commands
    from pipeline.stream_cli import add_commands as stream_commands
    from pipeline.sweep import add_commands as sweep_commands

    return [encode_commands, sweep_commands, batch_commands, stream_commands, runtime_commands,
            serve_commands, export_commands]


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("hwq: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except (SystemExit, GeneratorExit):
        raise
    except BaseException as e:  # noqa: BLE001 - decide below what a user sees (a library's
        # panic is a BaseException too)
        shown = _user_error(e)
        if shown is None or args.verbose:
            raise
        print(f"hwq: error: {shown}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
