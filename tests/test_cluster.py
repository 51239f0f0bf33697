"""A real two-node Ray cluster: a head and a second node, each its own `ray start` with its own
resources and cache folder, the store on S3 (moto's server), the run submitted through the Ray
Jobs API. Every stage's tasks are recorded by node in its manifest; the artifacts equal a
single-node run's byte for byte, file by file (this run is also the suite's check that a run in
other processes, with another hash seed, writes the same bytes)."""

import hashlib
import sys
import uuid

import pytest

from pipeline.store import Store
from testkit.faults import stage_digests
from testkit.localcluster import LocalCluster
from tests.quick import QUICK, ROOT, local_digests


@pytest.fixture(scope="module")
def cluster():
    # Another hash seed than the pytest process's quick run (other dict and loader orders):
    # every process of the cluster, the job's driver included, gets it.
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "PYTHONHASHSEED": "12345"}
    with LocalCluster(env=env, cpus=2) as c:
        c.add_node("hwq_node2")
        yield c


def _bucket(endpoint: str) -> tuple[str, dict]:
    import s3fs

    opts = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": endpoint}}
    name = f"hwq-{uuid.uuid4().hex[:10]}"
    s3fs.S3FileSystem(**opts).mkdir(name)
    s3fs.S3FileSystem.clear_instance_cache()
    return f"s3://{name}/run", opts


def _entrypoint(store: str, endpoint: str, *extra: str) -> str:
    args = " ".join(["run", "configs/lenet5_fmnist.yaml", "--store", store, "--endpoint-url",
                     endpoint, "--ray-address", "auto", *QUICK, *extra])
    return f"cd {ROOT} && PYTHONHASHSEED=12345 {sys.executable} -m pipeline.cli {args}"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _records(store: Store, prefix: str) -> dict[str, dict]:
    """The manifest's record of each output, less the ETag (S3 only: the local store has none)."""
    outputs = store.read_json(f"{prefix}/manifest.json")["outputs"]
    return {f: {k: v for k, v in o.items() if k != "etag"} for f, o in outputs.items()}


@pytest.mark.slow  # minutes: `make test-slow`, not `make test`
def test_a_job_on_two_nodes_writes_a_single_node_runs_bytes(cluster, s3_endpoint, quick_run):
    url, opts = _bucket(s3_endpoint)
    job = cluster.submit(_entrypoint(url, s3_endpoint))
    status, logs = cluster.wait(job, timeout=900)
    assert status == "SUCCEEDED", logs[-6000:]

    store = Store(url, opts, create=False)
    report = store.read_json("report.json")
    assert set(report["stages"]) == {"train", "prune", "hessian", "quantize", "finetune",
                                     "encode"}
    ours = stage_digests(store, report["stages"])
    single = local_digests(quick_run[0])
    assert ours == single, "the two-node run's artifacts differ from the single-node run's"
    # Every artifact is a function of the config and inputs alone: the same stage keys, the
    # same files in each stage folder, each with the same bytes (manifests aside: they hold
    # timings and placement), and the manifests agree on every output's record.
    ref = Store(str(quick_run[0]), create=False)
    ref_stages = ref.read_json("report.json")["stages"]
    assert {n: s["key"] for n, s in report["stages"].items()} == \
        {n: s["key"] for n, s in ref_stages.items()}
    differ = []
    for name, s in report["stages"].items():
        prefix = f"stages/{name}-{s['key']}"
        files = store.list(prefix)
        assert files == ref.list(prefix), name
        differ += [f"{prefix}/{f}" for f in files if f != "manifest.json"
                   and _sha(store.read_bytes(f"{prefix}/{f}", None))
                   != _sha(ref.read_bytes(f"{prefix}/{f}", None))]
        assert _records(store, prefix) == _records(ref, prefix), name
    assert not differ, f"artifacts differ between two runs of one config: {differ}"

    # Where each stage ran: both nodes took tasks, and each stage names its nodes.
    nodes_by_stage = {}
    for name, s in report["stages"].items():
        m = store.read_json(f"stages/{name}-{s['key']}/manifest.json")
        placement = m["placement"]
        assert placement["tasks"], f"{name}: no task placement recorded"
        nodes_by_stage[name] = {r for n in placement["nodes"].values() for r in n["resources"]}
    used = set().union(*nodes_by_stage.values())
    assert {"hwq_head", "hwq_node2"} <= used, nodes_by_stage
    # The Hessian's P x G tasks are more than one node's CPUs: they spread over both.
    assert nodes_by_stage["hessian"] == {"hwq_head", "hwq_node2"}, nodes_by_stage

    # A rerun (a resubmitted job) is all cache hits, checked from listings on S3.
    job = cluster.submit(_entrypoint(url, s3_endpoint))
    status, logs = cluster.wait(job, timeout=300)
    assert status == "SUCCEEDED", logs[-6000:]
    again = store.read_json("report.json")
    assert all(s["cached"] and s["verified"] == "size+ETag listing"
               for s in again["stages"].values())


def test_a_local_store_on_a_two_node_cluster_is_refused(cluster, tmp_path):
    job = cluster.submit(f"cd {ROOT} && {sys.executable} -m pipeline.cli run "
                         f"configs/lenet5_fmnist.yaml --store {tmp_path / 'store'} "
                         "--ray-address auto")
    status, logs = cluster.wait(job, timeout=300)
    assert status == "FAILED"
    assert "is a local folder, and the Ray cluster has 2 nodes" in logs
    assert "Traceback" not in logs


@pytest.mark.slow  # minutes: `make test-slow`, not `make test`
def test_gpus_per_task_puts_every_compute_task_on_a_gpu(tmp_path):
    """executor.gpus_per_task is a request: on a node that advertises GPUs, every train, prune,
    Hessian, quantize and evaluation task is given one (the manifests record it), and the
    reductions in between are not. (The node has no real device: Ray schedules by the number,
    the tasks compute on the CPU; the CUDA path itself needs a GPU machine.)"""
    store = tmp_path / "store"
    # Placement is the point, not accuracy: less data than the quick run (every task still runs).
    small = [*QUICK, "--set", "data.train_samples=1000", "--set", "train.epochs=1",
             "--set", "hessian.calibration_samples=128"]
    with LocalCluster(cpus=2, gpus=2) as c:
        job = c.submit(f"cd {ROOT} && {sys.executable} -m pipeline.cli run "
                       f"configs/lenet5_fmnist.yaml --store {store} --ray-address auto "
                       f"{' '.join(small)} --set executor.gpus_per_task=1 "
                       "--set finetune.enabled=false")
        status, logs = c.wait(job, timeout=600)
    assert status == "SUCCEEDED", logs[-6000:]
    st = Store(str(store), create=False)
    report = st.read_json("report.json")
    runs = {}
    for name, s in report["stages"].items():
        m = st.read_json(f"stages/{name}-{s['key']}/manifest.json")
        for task, _node, count, on_gpu in m["placement"]["tasks"]:
            c_, g_ = runs.get(task, (0, 0))
            runs[task] = (c_ + count, g_ + on_gpu)
    compute = {"_train_task", "_prune_task", "_partial_task", "_evaluate_task",
               "_decode_and_evaluate"}
    assert compute <= set(runs), runs
    for task in compute:
        assert runs[task][1] == runs[task][0] > 0, (task, runs[task])
    assert runs["_sum_task"][1] == 0 if "_sum_task" in runs else True


@pytest.mark.slow  # minutes: `make test-slow`, not `make test`
def test_a_streamed_job_on_two_nodes_writes_a_single_node_runs_file(cluster, s3_endpoint,
                                                                    tmp_path):
    """Streamed residency on two nodes: the model on S3, the Hessian's P × G units and the
    per-tensor quantize units spread over both nodes, the .hwq the bytes of one node's run
    (an embedded Ray, another hash seed)."""
    import os
    import subprocess

    import s3fs

    from testkit.models import tiny_sharded_bf16_folder

    url, opts = _bucket(s3_endpoint)
    folder = tiny_sharded_bf16_folder(tmp_path / "model", layers=4)
    s3fs.S3FileSystem(**opts).put(str(folder), f"{url[5:]}/model", recursive=True)
    args = ["--windows", "4", "--seq-len", "16", "--partitions", "2", "--groups", "2",
            "--method", "ecsq", "--endpoint-url", s3_endpoint]
    job = cluster.submit(f"cd {ROOT} && PYTHONHASHSEED=12345 {sys.executable} -m pipeline.cli "
                         f"stream {url}/model {url}/two --ray-address auto " + " ".join(args))
    status, logs = cluster.wait(job, timeout=900)
    assert status == "SUCCEEDED", logs[-6000:]
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    one = subprocess.run([sys.executable, "-m", "pipeline.cli", "stream", f"{url}/model",
                          f"{url}/one", "--cpus", "2", *args], cwd=ROOT,
                         env={**os.environ, **env}, capture_output=True, text=True, timeout=900)
    assert one.returncode == 0, one.stderr[-4000:]
    two, single = Store(f"{url}/two", opts, create=False), Store(f"{url}/one", opts, create=False)
    r2, r1 = two.read_json("report.json"), single.read_json("report.json")
    enc2, enc1 = (f"stages/encode-{r['stages']['encode']['key']}/model.hwq" for r in (r2, r1))
    assert _sha(two.read_bytes(enc2, None)) == _sha(single.read_bytes(enc1, None))
    nodes = set()
    for name in ("hessian", "quantize"):
        m = two.read_json(f"stages/{name}-{r2['stages'][name]['key']}/manifest.json")
        nodes |= {r for n in m["placement"]["nodes"].values() for r in n["resources"]}
    assert {"hwq_head", "hwq_node2"} <= nodes, nodes
