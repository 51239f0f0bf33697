"""Stage leases: two runs on one store never compute (or delete) the same stage at once; a dead
holder's lease is taken over; a cache hit on S3 downloads nothing but the manifest."""

import json
import logging
import threading
import time

import pytest

from pipeline.config import load_config
from pipeline.driver import run
from pipeline.graph import Stage
from pipeline.lease import LeaseLost, StageBusy, StageLease
from pipeline.store import StageDir, Store

pytestmark = pytest.mark.lease_settle  # the protocol with its settle wait (tests/conftest.py)


def test_a_second_holder_waits_and_sees_the_stage_finish(tmp_path):
    store = Store(str(tmp_path))
    a = StageLease(store, "stages/q-1", ttl=5, wait=10)
    assert a.acquire()
    b = StageLease(store, "stages/q-1", ttl=5, wait=10)
    finished = threading.Event()
    threading.Timer(0.5, finished.set).start()
    t0 = time.monotonic()
    assert b.acquire(done=finished.is_set) is False  # the holder finished: nothing to do
    assert time.monotonic() - t0 < 5
    a.release()
    assert not store.exists("stages/q-1.lease")


def test_a_racer_delayed_after_reading_a_free_lease_cannot_take_a_won_one(tmp_path):
    """b reads the lease free, then stalls (longer than the settle wait) while a takes it:
    on a local store b's late write cannot replace a's lease (it is created exclusively), so
    b waits for a like any other run instead of both computing the stage."""
    store = Store(str(tmp_path))
    a = StageLease(store, "stages/q-1", ttl=30, wait=1, settle=0.05)
    b = StageLease(store, "stages/q-1", ttl=30, wait=1, settle=0.05)
    real, stalled = b._read, []

    def stale_then_real(waiting=False):
        if not stalled:
            stalled.append(True)
            assert a.acquire()  # a wins while b is between its read and its write
            return None  # what b read before it stalled: free
        return real(waiting)

    b._read = stale_then_real
    with pytest.raises(StageBusy):
        b.acquire()
    assert a._read().owner == a.owner
    a.check()  # a's lease was never taken over
    a.release()
    assert not [p for p in (tmp_path / "stages").iterdir()]  # no temporary files left


def test_a_file_system_without_hard_links_takes_leases_the_portable_way(tmp_path,
                                                                         monkeypatch):
    def no_links(src, dst):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr("pipeline.lease.os.link", no_links)
    store = Store(str(tmp_path))
    a = StageLease(store, "stages/q-1", ttl=30, wait=0.5, settle=0.05)
    assert a.acquire()
    b = StageLease(store, "stages/q-1", ttl=30, wait=0.5, settle=0.05)
    with pytest.raises(StageBusy):
        b.acquire()
    a.release()
    assert not [p for p in (tmp_path / "stages").iterdir()]


def test_a_live_holder_makes_the_other_run_stop_with_one_line(tmp_path):
    store = Store(str(tmp_path))
    a = StageLease(store, "stages/q-1", ttl=5, wait=10)
    a.acquire()
    try:
        b = StageLease(store, "stages/q-1", ttl=5, wait=0.5)
        with pytest.raises(StageBusy) as e:
            b.acquire()
        msg = str(e.value)
        assert "another run" in msg and "pid" in msg and "lease_wait_s" in msg
        assert "\n" not in msg
    finally:
        a.release()


def test_a_dead_holders_lease_is_taken_over_after_its_ttl(tmp_path):
    store = Store(str(tmp_path))
    dead = StageLease(store, "stages/q-1", ttl=1, wait=10)
    dead.acquire()
    dead._stop.set()  # killed: it renews no more and never releases
    b = StageLease(store, "stages/q-1", ttl=5, wait=10)
    t0 = time.monotonic()
    assert b.acquire() is True
    assert 0.3 < time.monotonic() - t0 < 5
    with pytest.raises(LeaseLost):
        dead.check()  # the dead run, were it to come back, must not write its manifest
    b.check()
    b.release()


def test_garbage_in_the_lease_file_does_not_block_the_stage(tmp_path):
    store = Store(str(tmp_path))
    store.write_bytes("stages/q-1.lease", b"\x00not json")
    lease = StageLease(store, "stages/q-1", ttl=5, wait=1)
    assert lease.acquire()
    lease.release()


def _planted(**fields) -> bytes:
    lease = {"owner": "evil:1:abc", "host": "evil", "pid": 1, "acquired": time.time() - 5,
             "expires": time.time() + 2, **fields}
    return json.dumps(lease).encode()  # NaN and Infinity as Python's json writes them


@pytest.mark.parametrize("planted", [
    {"expires": 1e18}, {"expires": float("nan")}, {"expires": float("inf")},
    {"acquired": 1e300, "expires": 1.0}, {"acquired": float("inf")}, {"pid": "1"},
    {"host": ["x"]}, {"owner": "o" * 5000}, {"expires": time.time() + 1e6},
    {"acquired": -1e300, "expires": 1.0}])
def test_an_implausible_lease_is_ignored_with_a_warning(tmp_path, caplog, planted):
    # A planted lease expiring far in the future (or never) must not make a run wait
    # lease_wait_s for a holder that does not exist; absurd times must not be a traceback.
    store = Store(str(tmp_path))
    store.write_bytes("stages/q-1.lease", _planted(**planted))
    lease = StageLease(store, "stages/q-1", ttl=5, wait=0.2, settle=0)
    with caplog.at_level(logging.WARNING, logger="hwq"):
        assert lease.acquire()
    lease.check()
    lease.release()
    warned = [r.getMessage() for r in caplog.records if "ignoring the lease" in r.getMessage()]
    assert len(warned) == 1, caplog.text


def test_a_folder_or_link_at_the_lease_path_is_replaced(tmp_path, caplog):
    store = Store(str(tmp_path))
    (tmp_path / "stages" / "q-1.lease").mkdir(parents=True)
    (tmp_path / "stages" / "q-1.lease" / "x").write_text("x")
    lease = StageLease(store, "stages/q-1", ttl=5, wait=0.2, settle=0)
    with caplog.at_level(logging.WARNING, logger="hwq"):
        assert lease.acquire()
    assert (tmp_path / "stages" / "q-1.lease").is_file()
    lease.release()
    assert "not a lease file" in caplog.text
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "f").write_text("kept")
    (tmp_path / "stages" / "q-1.lease").symlink_to(keep)
    lease = StageLease(store, "stages/q-1", ttl=5, wait=0.2, settle=0)
    assert lease.acquire()
    lease.release()
    assert (keep / "f").read_text() == "kept"  # the link was removed, not followed


def test_a_holders_host_is_printed_without_terminal_escapes(tmp_path, caplog):
    store = Store(str(tmp_path))
    host = "node\x1b]0;pwned\x07\x1b[2J\r\n9"
    store.write_bytes("stages/q-1.lease", _planted(host=host, expires=time.time() + 5))
    lease = StageLease(store, "stages/q-1", ttl=5, wait=0.2, settle=0)
    with caplog.at_level(logging.INFO, logger="hwq"), pytest.raises(StageBusy) as e:
        lease.acquire()
    assert "node]0;pwned[2J 9 pid 1" in str(e.value)
    for text in (str(e.value), caplog.text):
        assert not any(c in text for c in "\x1b\x07\r"), repr(text)
    assert "\n" not in str(e.value)


def test_leases_work_on_s3(s3_bucket):
    url, opts = s3_bucket
    store = Store(url, opts)
    a = StageLease(store, "stages/q-1", ttl=3, wait=10, settle=0.3)
    b = StageLease(store, "stages/q-1", ttl=3, wait=0.5, settle=0.3)
    a.acquire()
    with pytest.raises(StageBusy):
        b.acquire()
    a.release()
    assert b.acquire()
    b.release()


# -- the driver: two concurrent runs on one store --------------------------------------------

CALLS: list[str] = []


def _slow(name, inputs):
    def body(ctx):
        CALLS.append(name)
        time.sleep(0.8)
        up = {n: sd.read_json("out.json")["value"] for n, sd in ctx.inputs.items()}
        ctx.out.write_json("out.json", {"value": sum(up.values()) + 1})
        return {f"{name}_value": sum(up.values()) + 1}

    return Stage(name=name, version=1, inputs=lambda cfg: inputs,
                 sections=lambda c: {"seed": c.seed}, run=body)


def _stages():
    return [_slow("train", ()), _slow("prune", ("train",)), _slow("hessian", ("prune",))]


def test_two_concurrent_runs_compute_each_stage_once(tmp_path):
    cfg = load_config("configs/lenet5_fmnist.yaml",
                      [f"store.url={tmp_path / 'store'}", "executor.lease_ttl_s=5"])
    CALLS.clear()
    reports, errors = [], []

    def go(prefix):
        try:
            reports.append(run(cfg, stages=_stages(), init_executor=False, report_prefix=prefix))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=go, args=(p,)) for p in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert sorted(CALLS) == ["hessian", "prune", "train"]  # each stage computed once
    assert reports[0]["metrics"] == reports[1]["metrics"]
    cached = [s["cached"] for r in reports for s in r["stages"].values()]
    assert cached.count(True) == 3 and cached.count(False) == 3
    assert not list((tmp_path / "store" / "stages").glob("*.lease"))


def test_a_cache_hit_on_s3_reads_only_the_manifests(s3_bucket, monkeypatch):
    url, opts = s3_bucket
    endpoint = opts["client_kwargs"]["endpoint_url"]
    cfg = load_config("configs/lenet5_fmnist.yaml",
                      [f"store.url={url}", f"store.endpoint_url={endpoint}"])

    def big(name, inputs):
        def body(ctx):
            ctx.out.write_bytes("blob.bin", bytes(range(256)) * 4096)  # 1 MiB
            return {}

        return Stage(name=name, version=1, inputs=lambda cfg: inputs,
                     sections=lambda c: {}, run=body)

    stages = [big("train", ()), big("prune", ("train",))]
    first = run(cfg, stages=stages, init_executor=False)
    assert not any(s["cached"] for s in first["stages"].values())

    def no_download(self, rel, limit=None):
        raise AssertionError(f"a cache hit downloaded {rel}")

    monkeypatch.setattr(Store, "sha256", no_download)
    second = run(cfg, stages=stages, init_executor=False)
    assert all(s["cached"] and s["verified"] == "size+ETag listing"
               for s in second["stages"].values())

    # A rewritten object (same size, other bytes) gets a new ETag: the stage is recomputed.
    monkeypatch.undo()
    key = second["stages"]["prune"]["key"]
    sd = StageDir(Store(url, opts), "prune", key)
    sd.store.write_bytes(sd.rel("blob.bin"), bytes(reversed(range(256))) * 4096)
    third = run(cfg, stages=stages, init_executor=False)
    assert third["stages"]["train"]["cached"] and not third["stages"]["prune"]["cached"]
