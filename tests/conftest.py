import os

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(autouse=True)
def lease_without_settle(request, monkeypatch):
    """Each test's runs in this process use a store no other run writes at the same time, so
    a stage lease's settle wait (after writing the lease, before reading it back: 0.2 s a stage
    on a local store, 1 s on S3, for a racing run's write to land) is only time; it is 0 here
    unless the caller gives one. The lease is still written, read back, renewed and released.
    Tests of the lease protocol itself (tests/test_lease.py) keep the wait:
    `pytest.mark.lease_settle`."""
    if request.node.get_closest_marker("lease_settle"):
        return
    from pipeline.lease import StageLease

    init = StageLease.__init__

    def no_settle(self, *args, settle=None, **kwargs):
        init(self, *args, settle=0.0 if settle is None else settle, **kwargs)

    monkeypatch.setattr(StageLease, "__init__", no_settle)


@pytest.fixture(scope="session")
def ray_local():
    """One embedded local Ray for the whole test session (starting it costs seconds)."""
    from pipeline.executor import init_ray, shutdown_ray

    init_ray(num_cpus=2)
    yield
    shutdown_ray()


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 API on loopback (moto's server), the way s3fs tests itself."""
    from moto.server import ThreadedMotoServer

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh bucket; returns (url prefix, storage_options)."""
    import uuid

    import s3fs

    opts = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": s3_endpoint}}
    fs = s3fs.S3FileSystem(**opts)
    name = f"hwq-{uuid.uuid4().hex[:10]}"
    fs.mkdir(name)
    s3fs.S3FileSystem.clear_instance_cache()
    return f"s3://{name}/run", opts



@pytest.fixture(scope="session")
def quick_run(tmp_path_factory):
    """One quick LeNet-5 run (every stage, embedded Ray) in a local store, shared by the tests
    that compare against it: (store folder, seconds it took)."""
    import time

    from tests.quick import QUICK, hwq

    store = tmp_path_factory.mktemp("e2e") / "store"
    t0 = time.perf_counter()
    hwq("run", "configs/lenet5_fmnist.yaml", "--store", str(store), *QUICK)
    return store, time.perf_counter() - t0


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path, s3_endpoint):
    """A store on a local folder, then on the S3 server (tests run once for each)."""
    from pipeline.store import Store

    if request.param == "local":
        return Store(str(tmp_path / "root"))
    url, opts = request.getfixturevalue("s3_bucket")
    return Store(url, opts)
