"""Ray job entrypoint: one hwq run on the cluster the job was submitted to.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/run.py configs/lenet5_fmnist.yaml --store s3://bucket/hwq

Thin by design: it joins the job's cluster (`--ray-address auto`) and calls the CLI.
"""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or args[0].startswith("-"):
        sys.exit("usage: python jobs/run.py CONFIG [hwq run options]")
    if "--ray-address" not in args:
        args += ["--ray-address", "auto"]
    sys.exit(main(["run", *args]))
