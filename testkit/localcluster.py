"""A real multi-node Ray cluster on one machine, for tests and the fault benchmark.

Each node is its own `ray start` (a head with the dashboard and Jobs API, then workers that
join it), with its own ports, its own custom resource (so placement can be told apart and
asserted), its own cache folder (HWQ_CACHE: no folder is shared between the nodes), and the
environment a cluster node would get from its image or pod (S3 credentials). Jobs go through
the Ray Jobs API as `ray job submit` would send them. A node can be stopped (kill -9 of its
processes) to inject a node failure.

Nothing here touches other Ray instances on the machine: processes are found by the
cluster's own temp folder and ports, never `ray stop`.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["LocalCluster", "free_port", "pids_of", "kill_ray_of"]

RAY = str(Path(sys.executable).with_name("ray"))
ROOT = Path(__file__).resolve().parents[1]  # the checkout: pipeline/ and testkit/


_GIVEN: set[int] = set()


def free_port() -> int:
    """A port nothing listens on now and that this process has not handed out before.

    Chosen below the kernel's ephemeral range (32768-60999 on Linux), so the OS does not give
    it to an outgoing connection between now and the `ray start` that binds it, and never
    twice: two OS-chosen ports asked for in a row can be the same one (CI saw a head whose
    dashboard and object manager got one port, and `ray start` refused it)."""
    import random

    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(23000, 32000)  # worker ports are 21000 + 400 per node
        if port in _GIVEN:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _GIVEN.add(port)
        return port
    raise RuntimeError("no free port found in 23000-32000")


def pids_of(temp_dir: str) -> set[int]:
    """Processes of the Ray started with `--temp-dir temp_dir` (its path is in their command
    lines): that Ray's processes only, never another on the machine."""
    import psutil

    out = set()
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in a for a in (p.info["cmdline"] or [])):
                out.add(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


def kill_ray_of(temp_dir: str) -> int:
    """Stop (SIGTERM, then SIGKILL after 10 s) the Ray started with `--temp-dir temp_dir`, and
    remove that folder (its sessions and logs); `ray stop` would stop every Ray on the
    machine."""
    n = _kill(pids_of(temp_dir), graceful=True)
    shutil.rmtree(temp_dir, ignore_errors=True)
    return n


# Seconds a SIGTERM'd process of a test cluster gets before SIGKILL: Ray's processes that
# exit on SIGTERM do so within a second; one that does not (a raylet waiting on its workers)
# held each teardown for the whole wait, 10 s when it was 10.
_GRACE_S = 3.0


def _kill(pids: set[int], *, graceful: bool) -> int:
    """Signal `pids` and their children: SIGTERM then SIGKILL (graceful), or SIGKILL at once
    (a crash). Returns how many processes were signalled."""
    import psutil

    procs = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            procs += [p, *p.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    for p in procs:
        try:
            p.terminate() if graceful else p.kill()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=_GRACE_S if graceful else 10)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    return len(procs)


@dataclass
class _Node:
    name: str
    pids: set[int] = field(default_factory=set)
    cache: str = ""


class LocalCluster:
    """`with LocalCluster(env=...) as c: c.add_node("node2"); c.submit(...)`.

    env: extra environment of every node (e.g. AWS_ACCESS_KEY_ID for the store).
    cpus: CPUs each node advertises.
    gpus: GPUs each node advertises (Ray schedules by the number; without a real device the
        tasks compute on the CPU: a test of placement, not of CUDA).
    """

    def __init__(self, *, env: dict[str, str] | None = None, cpus: int = 2, gpus: int = 0,
                 head_resource: str = "hwq_head"):
        self.temp_dir = tempfile.mkdtemp(prefix="hwqc-")  # short: socket paths are limited
        # The checkout first on every node's path: its workers import this tree's pipeline
        # (as a node image holds hwq) and testkit (a test hook a worker fires), whatever the
        # driver's folder or the venv's install.
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                    "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": path, **(env or {})}
        for k in ("RAY_ADDRESS", "RAY_JOB_CONFIG_JSON_ENV_VAR"):
            self.env.pop(k, None)
        self.cpus = cpus
        self.gpus = gpus
        self.head_resource = head_resource
        self.nodes: dict[str, _Node] = {}
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self._next_worker_port = 21000

    # -- nodes ------------------------------------------------------------------------------
    def _ports(self) -> list[str]:
        lo = self._next_worker_port
        self._next_worker_port += 400
        return [f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
                f"--dashboard-agent-listen-port={free_port()}",
                f"--dashboard-agent-grpc-port={free_port()}",
                f"--runtime-env-agent-port={free_port()}",
                f"--metrics-export-port={free_port()}",
                f"--min-worker-port={lo}", f"--max-worker-port={lo + 399}"]

    def _start(self, name: str, args: list[str]) -> None:
        before = self._pids()
        cache = os.path.join(self.temp_dir, f"cache-{name}")
        os.makedirs(cache, exist_ok=True)
        env = dict(self.env, HWQ_CACHE=cache, TORCH_EXTENSIONS_DIR=f"{cache}/torch_extensions",
                   HF_HOME=f"{cache}/hf", NUMBA_CACHE_DIR=f"{cache}/numba",
                   MPLCONFIGDIR=f"{cache}/matplotlib")
        p = subprocess.run([RAY, "start", *args, f"--num-cpus={self.cpus}",
                            f"--num-gpus={self.gpus}",
                            f"--resources={json.dumps({name: 1})}", "--disable-usage-stats",
                            *self._ports()], env=env, capture_output=True, text=True,
                           timeout=240)
        if p.returncode != 0:
            raise RuntimeError(f"ray start ({name}) failed:\n{p.stdout[-2000:]}\n"
                               f"{p.stderr[-3000:]}")
        self.nodes[name] = _Node(name, self._pids() - before, cache)

    def start_head(self) -> LocalCluster:
        self._start(self.head_resource, [
            "--head", f"--port={self.gcs_port}", f"--temp-dir={self.temp_dir}",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}"])
        return self

    def add_node(self, name: str) -> None:
        self._start(name, [f"--address=127.0.0.1:{self.gcs_port}"])
        self.wait_for_nodes(len(self.nodes))

    def stop_node(self, name: str) -> int:
        """kill -9 every process of node `name` (its raylet, agents and workers); returns how
        many were killed."""

        node = self.nodes.pop(name)
        return _kill(node.pids, graceful=False)

    def _pids(self) -> set[int]:
        return pids_of(self.temp_dir)

    def alive_nodes(self) -> list[dict]:
        """The cluster's live nodes, from the dashboard's API ({"resources": [...]} each)."""
        import urllib.request

        url = f"{self.dashboard_url}/nodes?view=summary"
        with urllib.request.urlopen(url, timeout=10) as r:
            data = json.loads(r.read())
        out = []
        for n in data.get("data", {}).get("summary", []):
            raylet = n.get("raylet", {})
            if raylet.get("state") == "ALIVE":
                out.append({"node_id": raylet.get("nodeId"),
                            "resources": sorted(raylet.get("resourcesTotal", {}))})
        return out

    def wait_for_nodes(self, n: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if len(self.alive_nodes()) >= n:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster did not reach {n} live nodes in {timeout} s")
            time.sleep(0.5)

    # -- jobs -------------------------------------------------------------------------------
    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    def client(self):
        from ray.job_submission import JobSubmissionClient

        deadline = time.monotonic() + 120
        while True:  # the job agent comes up a few seconds after `ray start`
            try:
                return JobSubmissionClient(self.dashboard_url)
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def submit(self, entrypoint: str, *, submission_id: str | None = None,
               runtime_env: dict | None = None) -> str:
        client = self.client()
        deadline = time.monotonic() + 120
        while True:
            try:
                return client.submit_job(entrypoint=entrypoint, submission_id=submission_id,
                                         runtime_env=runtime_env)
            except RuntimeError as e:
                if "No available agent" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def wait(self, job_id: str, timeout: float = 900) -> tuple[str, str]:
        """(final status, logs) of a job."""
        client = self.client()
        deadline = time.monotonic() + timeout
        while True:
            status = str(client.get_job_status(job_id)).rsplit(".", 1)[-1]
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                return status, client.get_job_logs(job_id)
            if time.monotonic() > deadline:
                client.stop_job(job_id)
                return "TIMEOUT", client.get_job_logs(job_id)
            time.sleep(0.5)

    # -- lifetime ---------------------------------------------------------------------------
    def stop(self) -> None:
        """Kill every process of this cluster (found by its temp folder) and its nodes, and
        remove the temp folder."""
        _kill(self._pids() | {p for n in self.nodes.values() for p in n.pids}, graceful=True)
        self.nodes.clear()
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self.start_head()

    def __exit__(self, *exc) -> None:
        self.stop()
