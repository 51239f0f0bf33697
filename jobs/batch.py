"""Scheduled batch entrypoint: run several configs, one after another, into one store.

    python jobs/batch.py --store s3://bucket/hwq configs/a.yaml configs/b.yaml

Runs share the store's stage cache (a model already trained is not retrained). A failing
config is reported and the batch goes on; the exit status is non-zero if any failed.
"""

import argparse
import sys

from pipeline.cli import main


def batch(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("configs", nargs="+")
    ap.add_argument("--store", required=True, help="shared run root (folder or s3:// URL)")
    ap.add_argument("--ray-address", default="auto")
    args = ap.parse_args(argv)
    failed = []
    for cfg in args.configs:
        name = cfg.rsplit("/", 1)[-1].removesuffix(".yaml")
        store = f"{args.store.rstrip('/')}/{name}"
        print(f"== {cfg} -> {store}", flush=True)
        if main(["run", cfg, "--store", store, "--ray-address", args.ray_address]) != 0:
            failed.append(cfg)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(batch())
