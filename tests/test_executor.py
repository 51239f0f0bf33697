"""The executor: no credentials in Ray's runtime env, a private Ray temp folder, and a clear
error for a cluster address nobody listens on."""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from pipeline import executor
from pipeline.errors import ExecutorError

ROOT = Path(__file__).resolve().parents[1]


def test_worker_env_carries_no_credentials(monkeypatch):
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.setenv(k, "sekrit-" + k)
    env = executor._worker_env()
    assert not any("sekrit" in v for v in env.values())


def test_runtime_env_of_the_session_carries_no_credentials(ray_local):
    import ray

    env = (ray.get_runtime_context().runtime_env or {}).get("env_vars", {})
    assert not [k for k in env if "SECRET" in k or "TOKEN" in k or "KEY_ID" in k]
    assert env.get("OMP_WAIT_POLICY") == "PASSIVE"


def test_private_dir_accepts_own_and_refuses_links_and_shared(tmp_path):
    own = tmp_path / "own"
    assert executor._private_dir(own)
    assert oct(own.stat().st_mode & 0o777) == oct(0o700)
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    assert not executor._private_dir(shared)
    link = tmp_path / "link"
    link.symlink_to(own)
    assert not executor._private_dir(link)


def test_predictable_tmp_fallback_is_not_trusted_when_planted(tmp_path, monkeypatch):
    # A checkout deep enough to need the short fallback, whose fallback name someone else
    # prepared as a world-writable folder: hwq must not use it.
    monkeypatch.setenv("HWQ_CACHE", str(tmp_path / ("d" * 60)))
    monkeypatch.setattr(executor.tempfile, "tempdir", str(tmp_path))
    planted = tmp_path / f"hwq-{os.getuid()}-ray"
    planted.mkdir()
    planted.chmod(0o777)
    got, fresh = executor._ray_temp_dir()
    assert not got.startswith(str(planted)) and executor._private_dir(fresh)
    assert Path(got).parent == fresh
    fresh.rmdir()


# Two embedded Rays one after the other, then one whose parent folder was made shared: Ray's
# temp folder stays inside a 0700 parent, the second start neither warns nor makes a fresh
# folder, and the fresh folder of the third is gone after shutdown.
_RAY_TWICE = """
import logging, os, stat, sys
from pathlib import Path
from pipeline import executor
warned = []
class Note(logging.Handler):
    def emit(self, record):
        warned.append(record.getMessage())
logging.getLogger(executor.__name__).addHandler(Note(logging.WARNING))
parent = Path(os.environ["HWQ_CACHE"]) / f"ray-{os.getuid()}"
tmp = Path(os.environ["TMPDIR"])
def mode(p):
    return oct(stat.S_IMODE(os.lstat(p).st_mode))
executor.init_ray(num_cpus=1)
executor.shutdown_ray()
assert mode(parent) == "0o700", mode(parent)
assert not warned and not list(tmp.iterdir()), (warned, list(tmp.iterdir()))
# A second start in the same process (a parent now too open) leaves nothing either.
parent.chmod(0o777)
executor.init_ray(num_cpus=1)
fresh = list(tmp.glob("hwq-ray-*"))
assert len(fresh) == 1 and mode(fresh[0]) == "0o700" and warned, (fresh, warned)
executor.shutdown_ray()
assert not list(tmp.iterdir()), list(tmp.iterdir())
print("ok")
"""


def test_ray_temp_folder_is_private_and_nothing_is_left(tmp_path):
    root = Path(tempfile.mkdtemp(prefix="hwqt-", dir="/tmp"))  # short: Ray's socket paths
    try:
        (root / "tmp").mkdir()
        env = {**os.environ, "HWQ_CACHE": str(root / "c"), "TMPDIR": str(root / "tmp"),
               "PYTHONPATH": str(ROOT)}
        p = subprocess.run([sys.executable, "-c", _RAY_TWICE], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-3000:]
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_unreachable_address_is_a_clear_error_not_a_hang():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    for addr in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        with pytest.raises(ExecutorError, match="cannot reach the Ray cluster"):
            executor._probe_address(addr)


def test_resource_requests_come_from_the_config():
    """Numbers from executor.*, not what the cluster shows now: a GPU pool that scales from zero
    only grows when something asks for a GPU, and a worker must fit the nodes that exist."""
    from pipeline.config import ExecutorConfig
    from pipeline.executor import configure, task_cpus, task_gpus, worker_cpus
    from pipeline.finetune.stage import _resources

    configure(ExecutorConfig(address="auto", gpus_per_task=0.5, cpus_per_task=2,
                             cpus_per_worker=3))
    try:
        assert task_gpus() == 0.5 and worker_cpus() == 3 and task_cpus(1) == 2
        assert _resources(2) == (0.5, 3.0)  # each fine-tune worker: half a GPU, 3 CPUs
    finally:
        configure(ExecutorConfig())
    assert task_cpus(1) == 1


def _unit(name, folder, fail=False):
    import time

    time.sleep(0.05)
    if fail:
        raise ValueError(f"unit {name} failed")
    Path(folder, name).write_text(name)
    return name


def test_a_unit_queue_starts_follow_ups_first_and_stops_on_an_error(ray_local, tmp_path):
    """One slot: units run in the order added, a unit added with first=True while iterating
    runs next; an error stops the queue and nothing queued behind it runs."""
    q = executor.UnitQueue(slots=1, total=4, desc="test units")
    for n in "abc":
        q.add(n, _unit, (n, str(tmp_path)))
    order = []
    for key, result in q:
        assert key == result
        order.append(key)
        if key == "a":
            q.add("d", _unit, ("d", str(tmp_path)), first=True)
    assert order == ["a", "d", "b", "c"]

    q = executor.UnitQueue(slots=1)
    q.add("x", _unit, ("x", str(tmp_path)), first=False)
    q.add("bad", _unit, ("bad", str(tmp_path), True))
    q.add("y", _unit, ("y", str(tmp_path)))
    seen = []
    with pytest.raises(ValueError, match="unit bad failed"):
        for key, _ in q:
            seen.append(key)
    assert seen == ["x"] and not (tmp_path / "y").exists()
    assert executor.UnitQueue(cpus_per_slot=1).slots == executor._cluster_cpus()


def test_block_runs_cover_every_block_once_in_order_and_balance_the_sizes():
    import random

    from pipeline.executor import balanced_runs

    rnd = random.Random(0)
    for n in range(1, 40):
        for parts in range(1, 9):
            sizes = [rnd.randint(1, 1000) for _ in range(n)]
            runs = balanced_runs(sizes, parts)
            assert len(runs) == min(parts, n)
            assert [i for a, b in runs for i in range(a, b)] == list(range(n))
    # equal blocks split evenly; one huge block is a run of its own
    assert balanced_runs([1] * 8, 4) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert balanced_runs([100, 1, 1, 1, 1], 2) == [(0, 1), (1, 5)]
