"""hwq as a submitted Ray job: the job's runtime env and hwq's must merge (a RayJob that sets
OMP_WAIT_POLICY, HWQ_CACHE or AWS_* used to die at ray.init), on a real `ray start` head with
the Jobs API."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.executor import without_job_env_vars
from testkit.localcluster import LocalCluster

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def test_job_env_vars_win_over_hwqs():
    ours = {"OMP_WAIT_POLICY": "PASSIVE", "HWQ_CACHE": "/a", "HF_HOME": "/h"}
    job = json.dumps({"runtime_env": {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE",
                                                   "HWQ_CACHE": "/job"}}})
    assert without_job_env_vars(ours, job) == {"HF_HOME": "/h"}
    assert without_job_env_vars(ours, None) == ours
    assert without_job_env_vars(ours, "not json") == ours
    assert without_job_env_vars(ours, json.dumps({"runtime_env": None})) == ours



@pytest.fixture(scope="module")
def ray_head():
    """A `ray start` head with the Jobs API, every port its own (the suite's embedded Ray holds
    the default agent ports, and a job agent that cannot bind them never comes up)."""
    with LocalCluster(cpus=1) as c:
        yield c.dashboard_url, c.env


def test_a_job_whose_runtime_env_sets_hwqs_variables_starts(ray_head, tmp_path):
    address, env = ray_head
    cache = str(tmp_path / "cache")
    runtime_env = {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE", "HWQ_CACHE": cache}}
    probe = ("import json, ray; from pipeline.executor import init_ray; init_ray('auto'); "
             "print('ENV=' + json.dumps(ray.get_runtime_context().runtime_env['env_vars']))")
    deadline = time.monotonic() + 120
    while True:  # the head's job agent comes up a few seconds after `ray start`
        p = subprocess.run([RAY, "job", "submit", "--address", address,
                            "--runtime-env-json", json.dumps(runtime_env), "--",
                            sys.executable, "-c", probe],
                           env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
        out = p.stdout + p.stderr
        if "No available agent" not in out or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert p.returncode == 0 and "succeeded" in out, out[-4000:]
    assert "Failed to merge" not in out
    line = next(ln for ln in out.splitlines() if ln.startswith("ENV="))
    merged = json.loads(line[4:])
    assert merged["HWQ_CACHE"] == cache  # the job's value
    assert merged["OMP_WAIT_POLICY"] == "PASSIVE"
    assert "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S" in merged  # hwq's own, merged in
    # On a cluster the driver's cache folders are not pushed to other nodes' workers.
    assert "TORCH_EXTENSIONS_DIR" not in merged
