"""The quick LeNet-5 run several test files share: every stage real, small and fast."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HWQ = [sys.executable, "-m", "pipeline.cli"]
# A 3,000-image training subset, short epochs. One CPU per train/evaluate task and fine-tune
# worker, set explicitly: the same thread counts on an embedded Ray and on a cluster, so the
# two give the same bytes (torch's reductions may split differently over more threads).
QUICK = [
    "--set", "data.train_samples=3000",
    "--set", "train.epochs=2",
    "--set", "prune.steps=1",
    "--set", "prune.retrain_epochs=1",
    "--set", "hessian.calibration_samples=512",
    "--set", "finetune.epochs=0.2",
    "--set", "executor.cpus_per_worker=1",
]


def hwq(*args, check=True, env_extra=None, timeout=900):
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PYTHONUNBUFFERED="1", **(env_extra or {}))
    p = subprocess.run([*HWQ, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"hwq {' '.join(args)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
    return p


def local_digests(store: Path) -> dict[str, dict[str, str]]:
    """{stage: {file: sha256}} of the run in a local store, from its manifests."""
    from pipeline.store import Store
    from testkit.faults import stage_digests

    st = Store(str(store), create=False)
    return stage_digests(st, st.read_json("report.json")["stages"])
