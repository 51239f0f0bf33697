"""Fault injection: every fault of the table against real runs; each must finish with every
artifact byte-identical (sha256) to an undisturbed run, or stop with one clear line and leave
nothing that verifies as complete.

    python benchmarks/faults.py [--only NAME ...] [--skip-default]

A reference run (the quick LeNet-5 config of the test suite, embedded Ray, local store) gives
the expected digests. Each fault run starts from a store seeded with the reference's stages
upstream of the stage under attack (what a resumed run finds), so the attacked stage and
everything after it are computed under the fault:

- worker-kill-*: kill -9 of a Ray worker in the middle of hessian / quantize / finetune /
  encode (Ray retries the task, restarts the actor, or Ray Train restarts the worker group);
- node-stop: a two-node cluster (testkit.localcluster), the second node killed while the
  Hessian's tasks run on it; the job is submitted through the Ray Jobs API, store on S3;
- driver-kill: the job's driver killed (kill -9) while it fine-tunes, the same job submitted
  again: it waits out the dead driver's stage lease and resumes;
- s3-throttle / s3-500 / s3-drop: the S3 server (moto) behind a proxy answering every k-th
  request with 503 SlowDown, 500 InternalError, or a dropped connection;
- s3-denied / s3-missing-bucket: a store that fails for good (403 on every request; a bucket
  that does not exist): the run must stop with one line;
- concurrent: two runs of one config started together on one store: each stage computed once.

Then the cache-hit transfer: the default config (configs/lenet5_fmnist.yaml, unchanged) run
on S3 through a counting proxy, then run again: bytes moved by the second run against the
bytes of the artifacts (target: <= 1%). --skip-default leaves that out (it costs ~7 min).

Prints a table and writes benchmarks/results/faults.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.store import Store  # noqa: E402
from testkit.faults import WorkerKiller, audit, seed_store, stage_digests  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "runs" / "faults"
CONFIG = "configs/lenet5_fmnist.yaml"
QUICK = ["data.train_samples=3000", "train.epochs=2", "prune.steps=1", "prune.retrain_epochs=1",
         "hessian.calibration_samples=512", "finetune.epochs=0.2", "executor.cpus_per_worker=1"]
SETS = [a for s in QUICK for a in ("--set", s)]
CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
ORDER = ["train", "prune", "hessian", "quantize", "finetune", "encode"]


def hwq(*args, env_extra=None, timeout=1800) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PYTHONUNBUFFERED="1", **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


class S3:
    """moto's S3 server on loopback, and fresh buckets on it."""

    def __init__(self) -> None:
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise

        os.environ.update(CREDS)
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"

    def bucket(self) -> str:
        import s3fs

        name = f"hwq-{uuid.uuid4().hex[:10]}"
        s3fs.S3FileSystem(key="testing", secret="testing",
                          client_kwargs={"endpoint_url": self.endpoint}).mkdir(name)
        s3fs.S3FileSystem.clear_instance_cache()
        return f"s3://{name}/run"

    def store(self, url: str, endpoint: str | None = None) -> Store:
        return Store(url, {"key": "testing", "secret": "testing",
                           "client_kwargs": {"endpoint_url": endpoint or self.endpoint}})

    def stop(self) -> None:
        self.server.stop()


def _outcome(store: Store, ref: dict, p: subprocess.CompletedProcess | None,
             *, expect_stop: bool = False) -> dict:
    """Compare a finished run with the reference; or check it stopped cleanly."""
    row: dict = {}
    try:
        found = audit(store)
    except Exception as e:  # noqa: BLE001 - a store that cannot even be listed
        found = {"complete": [], "incomplete": [], "false": [], "error": str(e)[:200]}
    row["false_manifests"] = found["false"]
    errors = [ln for ln in (p.stderr if p else "").splitlines() if ln.startswith("hwq: error:")]
    if p is not None and p.returncode != 0:
        clean = (len(errors) == 1 and "Traceback" not in p.stderr and not found["false"])
        row["outcome"] = "stopped cleanly" if clean else "FAILED (unclean stop)"
        row["detail"] = errors[0][len("hwq: error: "):][:240] if errors else p.stderr[-400:]
        row["ok"] = clean and expect_stop
        return row
    try:
        report = store.read_json("report.json")
        same = stage_digests(store, report["stages"]) == ref
    except Exception as e:  # noqa: BLE001
        row.update(outcome="FAILED (no report)", detail=str(e)[:240], ok=False)
        return row
    row["outcome"] = "completed identical" if same else "FAILED (artifacts differ)"
    row["ok"] = same and not found["false"] and not expect_stop
    row["detail"] = ""
    return row


def _seed(ref_store: Store, dst: Store, ref_report: dict, upto: str) -> None:
    keep = ORDER[: ORDER.index(upto)]
    seed_store(ref_store, dst, {n: ref_report["stages"][n]["key"] for n in keep})


# -- scenarios ---------------------------------------------------------------------------------

def worker_kill(ctx, stage: str, names: tuple[str, ...], after: float) -> dict:
    store = Store(str(WORK / f"kill-{stage}-{uuid.uuid4().hex[:6]}"))
    _seed(ctx["ref_store"], store, ctx["ref_report"], stage)
    tag = uuid.uuid4().hex
    killer = WorkerKiller(names, tag=tag, after_s=after).start()
    p = hwq("run", CONFIG, "--store", store.url, *SETS, env_extra={"HWQ_FAULT_TAG": tag})
    killer.stop()
    row = _outcome(store, ctx["ref"], p)
    row["injected"] = bool(killer.killed)
    row["fault"] = f"kill -9 {killer.killed[0]['title']}" if killer.killed else "no worker matched"
    row["ok"] = row["ok"] and row["injected"]
    return row


def s3_transient(ctx, mode: str, every: int) -> dict:
    from testkit.chaos import ChaosProxy

    s3 = ctx["s3"]
    url = s3.bucket()
    _seed(ctx["ref_store"], s3.store(url), ctx["ref_report"], "quantize")
    with ChaosProxy(s3.endpoint, mode=mode, every=every) as proxy:
        p = hwq("run", CONFIG, "--store", url, "--endpoint-url", proxy.url, *SETS,
                env_extra=CREDS)
        stats = proxy.stats()
    row = _outcome(s3.store(url), ctx["ref"], p)
    n = sum(stats.get("injected", {}).values())
    row["injected"] = n > 0
    row["fault"] = f"{mode} on every {every}th S3 request ({n} of {stats.get('requests')})"
    row["ok"] = row["ok"] and row["injected"]
    return row


def s3_permanent(ctx, kind: str) -> dict:
    from testkit.chaos import ChaosProxy

    s3 = ctx["s3"]
    if kind == "denied":
        url = s3.bucket()
        with ChaosProxy(s3.endpoint, mode="deny") as proxy:
            p = hwq("run", CONFIG, "--store", url, "--endpoint-url", proxy.url, *SETS,
                    env_extra=CREDS, timeout=600)
        fault = "403 AccessDenied on every request (bad credentials)"
    else:
        url = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/run"
        p = hwq("run", CONFIG, "--store", url, "--endpoint-url", s3.endpoint, *SETS,
                env_extra=CREDS, timeout=600)
        fault = "a bucket that does not exist"
    try:
        store = s3.store(url)
    except Exception:  # noqa: BLE001
        store = None
    row = _outcome(store, ctx["ref"], p, expect_stop=True) if store else {}
    row.update(injected=True, fault=fault)
    return row


def concurrent(ctx) -> dict:
    store = Store(str(WORK / f"concurrent-{uuid.uuid4().hex[:6]}"))
    _seed(ctx["ref_store"], store, ctx["ref_report"], "hessian")
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PYTHONUNBUFFERED="1")
    procs = [subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", CONFIG, "--store",
                               store.url, *SETS], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [pr.communicate(timeout=1800) for pr in procs]
    rcs = [pr.returncode for pr in procs]
    # Each process's report is the same file: read the stage records from their logs instead.
    ran = sum(err.count(" running (key ") for _, err in outs)
    p = subprocess.CompletedProcess([], max(rcs), outs[0][0], outs[0][1] + outs[1][1])
    row = _outcome(store, ctx["ref"], p)
    row["injected"] = True
    row["fault"] = f"two runs at once on one store ({ran} stage computations for 4 stages)"
    row["ok"] = row["ok"] and ran == 4 and rcs == [0, 0]
    return row


def _cluster_entry(url: str, endpoint: str, *extra: str) -> str:
    args = " ".join(["run", CONFIG, "--store", url, "--endpoint-url", endpoint,
                     "--ray-address", "auto", *SETS, *extra])
    return f"cd {ROOT} && {sys.executable} -m pipeline.cli {args}"


def _wait_for(pred, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.5)
    return False


def _two_node_job(ctx, stage: str, fault, *extra: str) -> tuple[dict, dict]:
    """A two-node cluster, an S3 store seeded up to `stage`, the run submitted as a job;
    `fault(cluster, url)` is called a few seconds after `stage` took its lease and returns
    (injected, facts). Returns (the row, facts)."""
    from testkit.localcluster import LocalCluster

    s3 = ctx["s3"]
    url = s3.bucket()
    store = s3.store(url)
    _seed(ctx["ref_store"], store, ctx["ref_report"], stage)
    key = ctx["ref_report"]["stages"][stage]["key"]
    with LocalCluster(env=CREDS, cpus=2) as c:
        c.add_node("hwq_node2")
        job = c.submit(_cluster_entry(url, s3.endpoint, *extra))
        started = _wait_for(lambda: store.exists(f"stages/{stage}-{key}.lease"), 600)
        time.sleep(3)  # the stage's tasks are running, some on the second node
        injected, facts = fault(c, url, job) if started else (False, {})
        status, logs = c.wait(facts.get("job", job), timeout=1800)
    p = subprocess.CompletedProcess([], 0 if status == "SUCCEEDED" else 1, "", logs)
    row = _outcome(store, ctx["ref"], p)
    row["injected"] = injected
    row["ok"] = row["ok"] and injected
    return row, facts


def node_stop(ctx) -> dict:
    def stop(c, url, job):
        n = c.stop_node("hwq_node2")
        return n > 0, {"killed": n}

    row, facts = _two_node_job(ctx, "hessian", stop)
    row["fault"] = f"second node killed during hessian ({facts.get('killed', 0)} processes)"
    return row


def driver_kill(ctx) -> dict:
    import psutil

    ttl = ("--set", "executor.lease_ttl_s=10")

    def kill_and_resubmit(c, url, job):
        killed = []
        for pr in psutil.process_iter(["cmdline"]):
            cmd = pr.info["cmdline"] or []
            if "pipeline.cli" in cmd and url in cmd:
                pr.kill()
                killed.append(pr.pid)
        first, _ = c.wait(job, timeout=600)
        t0 = time.monotonic()
        job2 = c.submit(_cluster_entry(url, ctx["s3"].endpoint, *ttl))
        return bool(killed), {"job": job2, "first": first, "t0": t0}

    row, facts = _two_node_job(ctx, "finetune", kill_and_resubmit, *ttl)
    resumed = time.monotonic() - facts.get("t0", time.monotonic())
    row["fault"] = (f"job driver killed in finetune (first job {facts.get('first')}); same "
                    f"job resubmitted, done in {resumed:.0f} s")
    return row


SCENARIOS = {
    "worker-kill-hessian": lambda c: worker_kill(c, "hessian", ("_partial_task",), 1.0),
    "worker-kill-quantize": lambda c: worker_kill(c, "quantize", ("ShardActor",), 0.3),
    "worker-kill-finetune": lambda c: worker_kill(c, "finetune", ("RayTrainWorker",), 8.0),
    "worker-kill-encode": lambda c: worker_kill(c, "encode", ("_decode_and_evaluate",), 0.3),
    "node-stop": node_stop,
    "driver-kill": driver_kill,
    "s3-throttle": lambda c: s3_transient(c, "throttle", 4),
    "s3-500": lambda c: s3_transient(c, "error500", 5),
    "s3-drop": lambda c: s3_transient(c, "drop", 7),
    "s3-denied": lambda c: s3_permanent(c, "denied"),
    "s3-missing-bucket": lambda c: s3_permanent(c, "missing"),
    "concurrent": concurrent,
}


def cache_hit_transfer(s3: S3) -> dict:
    """The default config on S3 through a counting proxy, then again: bytes moved."""
    from testkit.chaos import ChaosProxy

    url = s3.bucket()
    with ChaosProxy(s3.endpoint) as proxy:
        t0 = time.perf_counter()
        p = hwq("run", CONFIG, "--store", url, "--endpoint-url", proxy.url, env_extra=CREDS,
                timeout=3600)
        first_s = time.perf_counter() - t0
        if p.returncode != 0:
            return {"error": p.stderr[-1000:]}
        first = proxy.stats()
        t0 = time.perf_counter()
        p = hwq("run", CONFIG, "--store", url, "--endpoint-url", proxy.url, env_extra=CREDS)
        second_s = time.perf_counter() - t0
        second = proxy.stats()
    store = s3.store(url)
    report = store.read_json("report.json")
    artifact_bytes = 0
    for name, s in report["stages"].items():
        m = store.read_json(f"stages/{name}-{s['key']}/manifest.json")
        artifact_bytes += sum(o["bytes"] for o in m["outputs"].values())
    moved = {k: second.get(k, 0) - first.get(k, 0) for k in ("bytes_in", "bytes_out",
                                                              "requests")}
    return {"config": CONFIG, "artifact_bytes": artifact_bytes, "first_run_s": round(first_s, 1),
            "rerun_s": round(second_s, 1), "rerun_requests": moved["requests"],
            "rerun_bytes": moved["bytes_in"] + moved["bytes_out"],
            "rerun_share": (moved["bytes_in"] + moved["bytes_out"]) / max(1, artifact_bytes),
            "all_cached": all(s["cached"] for s in report["stages"].values()),
            "verified": sorted({s.get("verified", "") for s in report["stages"].values()})}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", choices=sorted(SCENARIOS), metavar="NAME",
                    help=f"run only these faults (repeatable): {', '.join(SCENARIOS)}")
    ap.add_argument("--skip-default", action="store_true",
                    help="leave out the cache-hit transfer of the default config (~7 min; "
                    "the last measured one is kept in the results)")
    ap.add_argument("--only-default", action="store_true",
                    help="only the cache-hit transfer of the default config")
    args = ap.parse_args(argv)
    WORK.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()
    s3 = S3()
    ctx = {"s3": s3}
    if not args.only_default:
        ref_dir = WORK / "reference"
        p = hwq("run", CONFIG, "--store", str(ref_dir), *SETS)
        if p.returncode != 0:
            sys.exit(f"reference run failed:\n{p.stderr[-3000:]}")
        ref_store = Store(str(ref_dir))
        ref_report = ref_store.read_json("report.json")
        ctx.update(ref_store=ref_store, ref_report=ref_report,
                   ref=stage_digests(ref_store, ref_report["stages"]))
    rows = []
    try:
        for name in [] if args.only_default else (args.only or SCENARIOS):
            t0 = time.perf_counter()
            print(f"== {name}", flush=True)
            try:
                row = SCENARIOS[name](ctx)
            except Exception as e:  # noqa: BLE001 - a harness failure is a row, not the end
                row = {"outcome": "FAILED (harness)", "detail": f"{type(e).__name__}: {e}"[:300],
                       "ok": False, "injected": False, "fault": name}
            row = {"name": name, "seconds": round(time.perf_counter() - t0, 1), **row}
            rows.append(row)
            print(f"   {row['outcome']}: {row['fault']} {row.get('detail', '')}", flush=True)
        transfer = None if args.skip_default else cache_hit_transfer(s3)
    finally:
        s3.stop()
        shutil.rmtree(WORK, ignore_errors=True) if not os.environ.get("HWQ_KEEP") else None
    old = _previous() if args.only or args.skip_default or args.only_default else {}
    if args.only_default:
        rows = old.get("rows", [])
    elif args.only:  # a partial rerun replaces its rows and keeps the others
        mine = {r["name"] for r in rows}
        rows = [r for r in old.get("rows", []) if r["name"] not in mine] + rows
        rows.sort(key=lambda r: list(SCENARIOS).index(r["name"]))
    if transfer is None:
        transfer = old.get("cache_hit_transfer")
    out = {"rows": rows, "cache_hit_transfer": transfer, "loadavg_start": load0,
           "loadavg_end": os.getloadavg(), "cpus": os.cpu_count(),
           "python": platform.python_version(), "quick_overrides": QUICK}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "faults.json").write_text(json.dumps(out, indent=2) + "\n")
    md = render(out)
    (RESULTS / "faults.md").write_text(md)
    print(md)
    return 0 if all(r.get("ok") for r in rows) else 1


def _previous() -> dict:
    try:
        return json.loads((RESULTS / "faults.json").read_text())
    except (OSError, ValueError):
        return {}


def render(out: dict) -> str:
    rows = out["rows"]
    lines = ["| fault | what was done | outcome | seconds | false manifests |",
             "|---|---|---|---:|---:|"]
    for r in rows:
        detail = f" ({r['detail']})" if r.get("detail") else ""
        lines.append(f"| {r['name']} | {r['fault']} | {r['outcome']}{detail} | {r['seconds']} "
                     f"| {len(r.get('false_manifests', []))} |")
    done = sum(r["outcome"] == "completed identical" for r in rows)
    stopped = sum(r["outcome"] == "stopped cleanly" for r in rows)
    lost = sum(len(r.get("false_manifests", [])) for r in rows)
    lines += ["", f"Faults injected: {sum(bool(r.get('injected')) for r in rows)} of {len(rows)}; "
              f"runs completed identical: {done}; stopped cleanly: {stopped}; "
              f"failed: {len(rows) - done - stopped}; manifests over wrong files (lost): {lost}. "
              f"Load average {out['loadavg_start'][0]:.1f} at start, "
              f"{out['loadavg_end'][0]:.1f} at end, {out['cpus']} CPUs."]
    t = out.get("cache_hit_transfer")
    if t and "error" not in t:
        lines += ["", f"Cache-hit rerun of `{t['config']}` on S3: {t['rerun_bytes']:,} bytes in "
                  f"{t['rerun_requests']} requests for {t['artifact_bytes']:,} bytes of artifacts "
                  f"({100 * t['rerun_share']:.2f}%), all stages cached: {t['all_cached']}, "
                  f"verified by {', '.join(t['verified'])}; first run {t['first_run_s']} s, "
                  f"rerun {t['rerun_s']} s."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
