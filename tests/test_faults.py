"""Faults that fit the suite's time (benchmarks/faults.py runs the whole table): a worker
killed with SIGKILL in the middle of a stage, a store that fails for good. Each run either
finishes with every artifact byte-identical to an undisturbed run, or stops with one line and
leaves nothing that verifies as complete."""

import uuid

import pytest

from pipeline.store import Store
from testkit.faults import WorkerKiller, audit, seed_store, stage_digests
from tests.quick import QUICK, hwq

# The quick run's stages in the order they run (report.json lists them sorted by name).
ORDER = ("train", "prune", "hessian", "quantize", "finetune", "encode")


def _seeded(reference: Store, dst: Store, upto: str) -> None:
    report = reference.read_json("report.json")
    assert set(report["stages"]) == set(ORDER)
    keep = ORDER[: ORDER.index(upto)]
    seed_store(reference, dst, {n: report["stages"][n]["key"] for n in keep})


# (35 s: a run of its own with a fresh Ray; the kill-and-resume of every stage's units is
# tests/test_residency.py's in `make test`, and `make bench-faults` kills every stage)
@pytest.mark.slow
def test_a_worker_killed_in_the_middle_of_encode_is_retried_and_changes_nothing(quick_run,
                                                                               tmp_path):
    ref = Store(str(quick_run[0]))
    store = Store(str(tmp_path / "store"))
    _seeded(ref, store, "encode")
    tag = uuid.uuid4().hex
    killer = WorkerKiller(("_decode_and_evaluate",), tag=tag, after_s=0.3).start()
    try:
        hwq("run", "configs/lenet5_fmnist.yaml", "--store", store.url, *QUICK,
            env_extra={"HWQ_FAULT_TAG": tag})
    finally:
        killer.stop()
    assert killer.killed, "the fault was not injected (no worker matched)"
    report = store.read_json("report.json")
    # Only encode ran (the seeded stages are cache hits): the kill hit this stage's task.
    assert [n for n, s in report["stages"].items() if not s["cached"]] == ["encode"]
    assert stage_digests(store, report["stages"]) == stage_digests(ref, report["stages"])
    assert audit(store)["false"] == []


@pytest.mark.parametrize("fault", ["missing bucket", "denied"])
def test_a_store_that_fails_for_good_stops_the_run_with_one_line(fault, s3_endpoint, tmp_path):
    if fault == "missing bucket":
        url, key = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/run", "testing"
        expect = "does not exist"
    else:
        from testkit.chaos import ChaosProxy  # a server refusing every request

        url, key = "s3://any/run", "testing"
        expect = "access denied"
    args = ["run", "configs/lenet5_fmnist.yaml", "--store", url, *QUICK]
    if fault == "denied":
        with ChaosProxy(s3_endpoint, mode="deny") as proxy:
            p = hwq(*args, "--endpoint-url", proxy.url, check=False, timeout=300,
                    env_extra={"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": "x"})
    else:
        p = hwq(*args, "--endpoint-url", s3_endpoint, check=False, timeout=300,
                env_extra={"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": "x"})
    assert p.returncode == 2, p.stderr[-3000:]
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("hwq: error:")]
    assert len(errors) == 1 and expect in errors[0], p.stderr[-3000:]
    assert "Traceback" not in p.stderr
