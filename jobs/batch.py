r"""Ray job entrypoint for scheduled batches: `hwq batch` on the cluster the job was submitted to.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/batch.py configs/batch_example.yaml --store s3://bucket/hwq/nightly

Takes `hwq batch`'s options (--store, --endpoint-url, --ray-address, --set, --force, --only,
--name; `python jobs/batch.py --help`). Every entry of the batch file runs into the one store,
sharing its stage cache (a model already trained is not retrained; a rerun finds completed
entries cached); a failing entry is recorded and the batch goes on. The report is
`<store>/batches/<name>/batch.json` and `batch.md`; the exit status is 1 if any entry failed,
2 if the batch file is invalid (nothing ran).

Several run configs instead of a batch file (the form earlier versions of deploy/cronjob.yaml
used) make a batch named "batch" with one entry per config (paths relative to the working
directory):

    python jobs/batch.py --store s3://bucket/hwq configs/a.yaml configs/b.yaml

Inside a submitted job (Ray sets RAY_JOB_CONFIG_JSON_ENV_VAR) or with RAY_ADDRESS set, it joins
that cluster (`--ray-address auto`) unless told otherwise; elsewhere it starts an embedded Ray.
"""

import argparse
import os
import sys


def _argv(argv: list[str]) -> list[str]:
    """argv with `--ray-address auto` added when running as a Ray job (or RAY_ADDRESS is set)
    and no address was given."""
    given = any(a == "--ray-address" or a.startswith("--ray-address=") for a in argv)
    in_job = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or os.environ.get("RAY_ADDRESS")
    return [*argv, "--ray-address", "auto"] if in_job and not given else list(argv)


def main(argv: list[str] | None = None) -> int:
    from pipeline import cli
    from pipeline.batch import add_arguments, cmd_batch
    from pipeline.error_lines import user_error

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    ap = argparse.ArgumentParser(prog="python jobs/batch.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_arguments(ap, several=True)
    args = ap.parse_args(_argv(sys.argv[1:] if argv is None else argv))
    cli._setup_logging(args.verbose)
    # The same handling of errors and Ctrl-C as `hwq`: one line for what a user can fix.
    try:
        return cmd_batch(args)
    except KeyboardInterrupt:
        print("hwq: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001
        shown = user_error(e)
        if shown is None or args.verbose:
            raise
        print(f"hwq: error: {shown}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
