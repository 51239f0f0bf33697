"""deploy/'s entrypoints really start as Ray jobs: a real `ray start --head` with token
authentication, the RayJob's entrypoint and runtime env, and the CronJob's script (slow:
`make test-slow`)."""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from testkit.localcluster import free_port, kill_ray_of
from tests.deploy_checks import (
    RAY,
    ROOT,
    cronjob_container,
    one,
    ray_groups,
)

# ---------------------------------------------------------------------------------------------
# The entrypoints, submitted for real to a `ray start` head with token auth
# ---------------------------------------------------------------------------------------------

# A tiny real run: the train stage on 256 images for one epoch, then the job is stopped.
TINY = ["--set", "data.train_samples=256", "--set", "train.epochs=1"]
TRAIN_DONE = r"\[1/\d\] train\s+done in"




def _ray(head, *args, env=None, timeout=120):
    return subprocess.run([RAY, *args], env=env or head["env"], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def head():
    """A head shaped like the manifests' GPU worker: their num-cpus, their num-gpus (a GPU
    Ray only counts: CPU torch computes on the CPU), token authentication on as KubeRay sets
    it (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN), `python` and `ray` the venv's."""
    (_, gpu), = [(n, g) for n, g in ray_groups(one("RayJob")) if n != "head"]
    params = gpu["rayStartParams"]
    for other in ("RayCronJob", "RayCluster"):
        (_, g), = [(n, g) for n, g in ray_groups(one(other)) if n != "head"]
        assert g["rayStartParams"] == params, other
    temp_dir = tempfile.mkdtemp(prefix="hwqd-")  # short: Ray's socket paths are limited
    token = secrets.token_hex(24)
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token,
               RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("RAY_ADDRESS", None)
    port, dash, agent, agent_grpc, renv, metrics = (free_port() for _ in range(6))
    subprocess.run([RAY, "start", "--head", f"--port={port}",
                    f"--num-cpus={params['num-cpus']}", f"--num-gpus={params['num-gpus']}",
                    "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={agent}",
                    f"--dashboard-agent-grpc-port={agent_grpc}",
                    f"--runtime-env-agent-port={renv}", f"--metrics-export-port={metrics}",
                    f"--temp-dir={temp_dir}", "--disable-usage-stats"],
                   env=env, check=True, capture_output=True, timeout=180)
    h = {"address": f"http://127.0.0.1:{dash}", "env": env, "token": token}
    try:
        deadline = time.monotonic() + 120
        while True:  # the job agent comes up a few seconds after `ray start`
            p = _ray(h, "job", "submit", "--address", h["address"], "--submission-id",
                     "hwq-probe", "--", "python", "-c", "pass")
            out = p.stdout + p.stderr
            if p.returncode == 0 or "No available agent" not in out \
                    or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert p.returncode == 0, out[-3000:]
        yield h
    finally:
        kill_ray_of(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


_WAIT = r"""
import re, sys, time
from ray.job_submission import JobSubmissionClient, JobStatus
address, job, pattern, timeout = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
client = JobSubmissionClient(address)
end = time.monotonic() + timeout
logs, status = "", None
while time.monotonic() < end:
    try:
        logs, status = client.get_job_logs(job), client.get_job_status(job)
    except RuntimeError as e:  # not submitted yet (the CronJob's script starts it)
        if "does not exist" not in str(e):
            raise
    if re.search(pattern, logs) or (status is not None and status.is_terminal()):
        break
    time.sleep(1)
print(logs)
print("STATUS=" + (status.value if status else "NOT SUBMITTED"))
sys.exit(0 if re.search(pattern, logs) else 1)
"""


def _wait_for_log(head, job: str, pattern: str, timeout: float = 240) -> str:
    """The job's logs once `pattern` shows in them (AssertionError with the logs if the job
    ends or the time runs out first)."""
    p = subprocess.run([sys.executable, "-c", _WAIT, head["address"], job, pattern,
                        str(timeout)], env=head["env"], capture_output=True, text=True,
                       timeout=timeout + 60)
    assert p.returncode == 0, f"{job}: no {pattern!r}:\n{p.stdout[-5000:]}\n{p.stderr[-3000:]}"
    return p.stdout


def _status(head, job: str) -> str:
    code = ("import sys; from ray.job_submission import JobSubmissionClient as C; "
            "print(C(sys.argv[1]).get_job_status(sys.argv[2]).value)")
    p = subprocess.run([sys.executable, "-c", code, head["address"], job], env=head["env"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout.strip().splitlines()[-1]


@pytest.mark.slow  # minutes: `make test-slow`, not `make test`
def test_the_cluster_refuses_a_client_without_the_token(head, tmp_path):
    for env in (dict(head["env"], RAY_AUTH_TOKEN=secrets.token_hex(24)),
                {k: v for k, v in head["env"].items() if k not in ("RAY_AUTH_TOKEN",
                                                                     "RAY_AUTH_MODE")}):
        env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token either
        p = _ray(head, "job", "submit", "--address", head["address"], "--no-wait", "--",
                 "python", "-c", "pass", env=env)
        out = p.stdout + p.stderr
        assert p.returncode != 0 and ("Unauthorized" in out or "Authentication" in out), \
            out[-2000:]


@pytest.mark.slow  # minutes: `make test-slow`, not `make test`
def test_rayjob_entrypoint_and_runtime_env_start_a_run(head, tmp_path):
    """What KubeRay's submitter does with deploy/rayjob.yaml (`ray job submit
    --runtime-env-json <runtimeEnvYAML> --submission-id ... -- <entrypoint>`), with the store
    in tmp_path instead of S3, the repository as working_dir instead of the image's copy, and
    TINY appended: the driver joins the cluster, and the train stage runs as a task asking for
    the manifest's GPU and CPUs, writes its artifacts to the store, and finishes."""
    spec = one("RayJob")["spec"]
    words = shlex.split(spec["entrypoint"])
    store = tmp_path / "store"
    words[words.index("--store") + 1] = str(store)
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    runtime_env["working_dir"] = str(ROOT)
    job = "hwq-lenet5-test"
    p = _ray(head, "job", "submit", "--address", head["address"], "--submission-id", job,
             "--runtime-env-json", json.dumps(runtime_env), "--no-wait", "--", *words, *TINY)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    try:
        logs = _wait_for_log(head, job, TRAIN_DONE)
    finally:
        _ray(head, "job", "stop", "--address", head["address"], job)
    assert "connecting to Ray cluster at auto" in logs
    assert re.search(r"\[1/6\] train\s+running", logs), logs[-3000:]
    manifests_ = list(store.glob("stages/train-*/manifest.json"))
    assert manifests_, f"no train stage in {store}"
    tasks = json.loads(manifests_[0].read_text())
    assert tasks["stage"] == "train"


@pytest.mark.slow  # minutes: `make test-slow`, not `make test`
def test_cronjob_script_submits_once_per_slot_and_stops_the_job_on_term(head, tmp_path):
    """deploy/cronjob.yaml's container, run as its pod would be (its env, the token from the
    cluster's Secret, the slot from the Job's name), against the local head: it submits the
    batch and waits; SIGTERM (the Job's deadline) stops the Ray job; the same slot again
    follows the existing job instead of submitting, and Ray refuses the id a second time."""
    container = cronjob_container()
    slot = f"hwq-nightly-{int(time.time()) // 60}"
    env = dict(head["env"])
    for e in container["env"]:
        if "value" in e:
            env[e["name"]] = e["value"]
        elif "secretKeyRef" in e["valueFrom"]:
            env[e["name"]] = head["token"]  # the cluster's auth_token
        else:
            env[e["name"]] = slot  # the CronJob controller's Job name
    env["RAY_ADDRESS"] = head["address"]
    env["HWQ_STORE"] = str(tmp_path / "store")
    env["HWQ_ARGS"] += " " + " ".join(TINY)
    runtime_env = json.loads(env["HWQ_RUNTIME_ENV"])
    runtime_env["working_dir"] = str(ROOT)
    env["HWQ_RUNTIME_ENV"] = json.dumps(runtime_env)
    cmd = [*container["command"], container["args"][0]]

    pod = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        logs = _wait_for_log(head, slot, TRAIN_DONE)
        assert "lenet5" in logs or "uniform-3b" in logs, logs[-3000:]
        assert pod.poll() is None, "the pod must wait for the batch"
        pod.send_signal(signal.SIGTERM)  # what the kubelet sends at activeDeadlineSeconds
        out, _ = pod.communicate(timeout=120)
    finally:
        if pod.poll() is None:
            os.killpg(pod.pid, signal.SIGKILL)
        try:
            os.killpg(pod.pid, signal.SIGKILL)  # the CLI it left behind, if any
        except ProcessLookupError:
            pass
    assert pod.returncode == 143, out[-3000:]
    assert f"hwq: stopping {slot}" in out
    deadline = time.monotonic() + 60
    while _status(head, slot) not in ("STOPPED", "FAILED") and time.monotonic() < deadline:
        time.sleep(1)
    assert _status(head, slot) == "STOPPED"

    # A retried pod of the same Job: follows the slot's job, submits nothing, fails (the
    # batch did not succeed).
    again = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)
    out = again.stdout + again.stderr
    assert again.returncode == 1, out[-3000:]
    assert "submitted by an earlier try" in out and f"hwq: {slot} STOPPED" in out

    # And Ray itself refuses the slot's id, whoever submits it.
    dup = _ray(head, "job", "submit", "--address", head["address"], "--submission-id", slot,
               "--no-wait", "--", "python", "-c", "pass")
    assert dup.returncode != 0 and "already exists" in dup.stdout + dup.stderr
