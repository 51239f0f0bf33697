"""The executor: no credentials in Ray's runtime env, a private Ray temp folder, and a clear
error for a cluster address nobody listens on."""

import os
import socket

import pytest

from pipeline import executor
from pipeline.errors import ExecutorError


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
    planted = tmp_path / f"hwq-ray-{os.getuid()}"
    planted.mkdir()
    planted.chmod(0o777)
    got = executor._ray_temp_dir()
    assert got != str(planted) and executor._private_dir(type(planted)(got))


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
