"""Kill -9 inside the streamed stages: a Ray worker at random moments of hessian, quantize and
encode (SmolLM2-135M, `model.residency: streamed`), and the driver once per stage. Each run
must finish with the model.hwq of an uninterrupted run (sha256), and redo only what the kill
interrupted.

    python benchmarks/stream_faults.py [--kills 3] [--windows 8] [--seed 0]

The model is SmolLM2-135M as a bf16 sharded folder with its tokenizer (benchmarks/residency.py
makes it once under $HWQ_CACHE/scale); the config is what `hwq stream FOLDER WORK --estimator
fisher --method ecsq --bits 3.5 --text TEXT --windows W --seq-len 128 --partitions 2 --groups 4`
stands for (`pipeline.stream_cli.stream_config`), with executor.lease_ttl_s=10 so a rerun after
a killed driver waits 10 s, not 60, for the dead driver's stage lease.

1. A baseline run gives the expected sha256 of the encode stage's model.hwq and, from each
   stage's manifest, how many times each unit task ran without a fault (`placement.tasks`: the
   placement ledger counts every start of a task, a killed one included).
2. Worker kills: per stage, `--kills` runs, each in its own store seeded with the baseline's
   stages upstream of the attacked one (what a resumed run finds), so the attacked stage and
   those after it are computed. The driver is a subprocess (`python -m pipeline.cli run`); when
   its log says `[k/4] <stage>   running` and a worker of the stage's unit tasks has appeared
   (process title `ray::fisher_forward_unit` / `ray::fisher_backward_unit` /
   `ray::_reduce_task`, `ray::_tensor_task`,
   `ray::_encode_task`, and HWQ_FAULT_TAG in its environment: this run's workers only), the
   benchmark waits a seeded random 0.5 s to 80% of the time the stage's unit tasks
   were seen running in the baseline, and SIGKILLs one such worker running then. Ray
   retries the task. Counted from the stage's manifest: unit task starts (placement) against
   the baseline's (one more per kill), and `units.retried` / `retried` in its metrics (each
   unit record keeps the Ray attempt number of the task that wrote it); the unit killed is the
   record with attempt > 0.
3. Driver kills: per stage, one run whose driver is SIGKILLed at such a moment, its Ray
   processes (tagged) killed with it, the unit records in the stage folder counted, then the
   same run again in the same store: its `units.reused` must equal that count (encode has no
   units: it is redone whole).

Prints a table and writes benchmarks/results/stream_faults.{json,md} with the load average.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.faults import RESULTS  # noqa: E402
from pipeline.store import Store  # noqa: E402
from testkit.faults import seed_store  # noqa: E402

ORDER = ["load", "hessian", "quantize", "encode"]
# The Ray task functions that are a stage's units (their process titles are ray::<name>).
TASKS = {
    "hessian": ("fisher_forward_unit", "fisher_backward_unit", "activation_unit", "_reduce_task"),
    "quantize": ("_tensor_task",),
    "encode": ("_encode_task",),
}
TEXT = "{stdlib}/a*.py"  # Python stdlib sources (a*: tokenized in seconds, enough for 8 windows)


def config(folder: Path, windows: int, text: str, method: str = "ecsq", ecsq_bins: int = 0
           ) -> dict:
    """The `hwq run` config of `hwq stream FOLDER WORK --estimator fisher --method ecsq
    --bits 3.5 --text TEXT --windows W --seq-len 128 --partitions 2 --groups 4`."""
    from pipeline.cli import build_parser
    from pipeline.stream_cli import stream_config

    # hwq's own parser: a flag added to `hwq stream` takes its default here too
    args = build_parser().parse_args([
        "stream", str(folder), "unused", "--estimator", "fisher", "--method", method,
        "--bits", "3.5", "--text", text, "--windows", str(windows), "--seq-len", "128",
        "--partitions", "2", "--groups", "4", "--ecsq-bins", str(ecsq_bins)])
    cfg = stream_config(args)
    del cfg["store"]  # given as --store per run
    cfg["executor"]["lease_ttl_s"] = 10
    return cfg


class Driver:
    """`python -m pipeline.cli run CONFIG --store STORE` as a subprocess whose Ray workers
    carry HWQ_FAULT_TAG=tag; its log lines are collected, and `started[stage]` is set when
    the log says that stage is running."""

    def __init__(self, cfg_path: Path, store: Path, tag: str) -> None:
        env = dict(
            os.environ,
            OMP_WAIT_POLICY="PASSIVE",
            PYTHONUNBUFFERED="1",
            HWQ_PROGRESS="0",
            HWQ_FAULT_TAG=tag,
        )
        self.tag = tag
        self.lines: list[str] = []
        self.started = {s: threading.Event() for s in ORDER}
        self.t0 = time.monotonic()
        self.p = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "run", str(cfg_path), "--store", str(store)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        pat = re.compile(r"\[\d+/\d+\] (\w+)\s+running")
        for line in self.p.stdout:
            self.lines.append(line.rstrip())
            m = pat.search(line)
            if m and m.group(1) in self.started:
                self.started[m.group(1)].set()

    def wait(self, timeout: float = 1800) -> int:
        try:
            rc = self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            rc = self.p.wait()
        self._reader.join(timeout=10)
        return rc

    def tail(self, n: int = 30) -> str:
        return "\n".join(self.lines[-n:])


def _tagged(tag: str, names: tuple[str, ...] | None = None) -> list:
    """Processes whose environment has HWQ_FAULT_TAG=tag (this run's Ray processes), those
    whose title is ray::<one of names> if `names` is given (the same match as
    testkit.faults.WorkerKiller)."""
    import psutil

    out = []
    for p in psutil.process_iter():
        try:
            if names is not None:
                cmd = p.cmdline()
                if not cmd or not any(cmd[0].startswith(f"ray::{n}") for n in names):
                    continue
            if p.environ().get("HWQ_FAULT_TAG") == tag:
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return out


def _moment(drv: Driver, stage: str, delay: float, timeout: float = 1200) -> list:
    """Wait until `stage` runs and one of its unit tasks has appeared, then `delay` seconds,
    then until one runs: the workers running a unit task of the stage then ([] on timeout
    or when the driver ended first)."""
    deadline = time.monotonic() + timeout
    while not drv.started[stage].wait(0.5):
        if drv.p.poll() is not None or time.monotonic() > deadline:
            return []
    while not _tagged(drv.tag, TASKS[stage]):
        if drv.p.poll() is not None or time.monotonic() > deadline:
            return []
        time.sleep(0.1)
    time.sleep(delay)
    while drv.p.poll() is None and time.monotonic() < deadline:
        found = _tagged(drv.tag, TASKS[stage])
        if found:
            return found
        time.sleep(0.1)
    return []


def _stage_dir(store: Path, stage: str, key: str) -> Path:
    return store / "stages" / f"{stage}-{key}"


def _sha(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def _unit_starts(manifest: dict, stage: str) -> int:
    """Starts of the stage's unit tasks the placement ledger counted (killed ones included)."""
    return sum(
        c for t, _, c, _ in manifest.get("placement", {}).get("tasks", []) if t in TASKS[stage]
    )


def _finished(store: Path, stage: str) -> dict:
    """What a finished run's report and the stage's manifest say: keys, sha256 of model.hwq,
    the stage's unit metrics, unit task starts, records written by a retried task."""
    rep = json.loads((store / "report.json").read_text())
    keys = {s: rep["stages"][s]["key"] for s in ORDER}
    sd = _stage_dir(store, stage, keys[stage])
    man = json.loads((sd / "manifest.json").read_text())
    met = man["metrics"]
    units = (
        met[stage].get("units", {})
        if stage != "encode"
        else {"total": 1, "retried": met["encode"].get("retried", 0)}
    )
    retried_units = (
        sorted(
            f"{r['unit']} (attempt {r['attempt']})"
            for r in (json.loads(f.read_text()) for f in (sd / "units").glob("*.json"))
            if r.get("attempt", 0) > 0
        )
        if (sd / "units").is_dir()
        else []
    )
    return {
        "keys": keys,
        "stage_seconds": met[stage]["seconds"],
        "sha256": _sha(_stage_dir(store, "encode", keys["encode"]) / "model.hwq"),
        "units": units,
        "unit_starts": _unit_starts(man, stage),
        "retried_units": retried_units,
    }


def _seeded(work: Path, name: str, base: dict, stage: str) -> Path:
    """A fresh store holding the baseline's stages upstream of `stage`."""
    store = work / name
    shutil.rmtree(store, ignore_errors=True)
    keep = ORDER[: ORDER.index(stage)]
    seed_store(Store(str(base["store"])), Store(str(store)), {s: base["keys"][s] for s in keep})
    return store


def worker_kill(ctx: dict, stage: str, i: int, rng: random.Random) -> dict:
    base = ctx["base"]
    store = _seeded(ctx["work"], f"worker-{stage}-{i}", base, stage)
    delay = round(rng.uniform(0.5, ctx["max_delay"][stage]), 2)
    drv = Driver(ctx["cfg_path"], store, uuid.uuid4().hex)
    victims = _moment(drv, stage, delay)
    killed = None
    if victims:
        v = rng.choice(sorted(victims, key=lambda p: p.pid))
        try:
            killed = {"pid": v.pid, "title": v.cmdline()[0]}
            os.kill(v.pid, signal.SIGKILL)
        except (OSError, IndexError):
            killed = None
    rc = drv.wait()
    row = {
        "kind": "worker",
        "stage": stage,
        "run": i,
        "delay_s": delay,
        "rc": rc,
        "killed": killed["title"] if killed else None,
        "seconds": round(time.monotonic() - drv.t0, 1),
    }
    if rc != 0:
        return {**row, "ok": False, "error": drv.tail()}
    f = _finished(store, stage)
    extra = f["unit_starts"] - base["unit_starts"][stage]
    row.update(
        identical=f["sha256"] == base["sha256"],
        units=f["units"],
        unit_starts=f["unit_starts"],
        unit_starts_baseline=base["unit_starts"][stage],
        extra_starts=extra,
        retried=f["units"].get("retried"),
        unit_killed=", ".join(f["retried_units"])
        or ("the stage's one task" if stage == "encode" and f["units"].get("retried") else "-"),
    )
    row["ok"] = bool(killed) and row["identical"] and extra == 1 and row["retried"] == 1
    return row


def driver_kill(ctx: dict, stage: str, rng: random.Random) -> dict:
    base = ctx["base"]
    store = _seeded(ctx["work"], f"driver-{stage}", base, stage)
    delay = round(rng.uniform(0.5, ctx["max_delay"][stage]), 2)
    tag = uuid.uuid4().hex
    drv = Driver(ctx["cfg_path"], store, tag)
    t0 = time.monotonic()
    injected = bool(_moment(drv, stage, delay))
    if injected:
        os.kill(drv.p.pid, signal.SIGKILL)
    drv.wait()
    # The embedded Ray's processes of the dead driver: killed too (by pid, this run's tag), so
    # that no unit finishes after the count below.
    for p in _tagged(tag):
        try:
            p.kill()
        except Exception:  # noqa: BLE001 - already gone
            pass
    units_dir = _stage_dir(store, stage, base["keys"][stage]) / "units"
    recorded = len(list(units_dir.glob("*.json"))) if units_dir.is_dir() else 0
    rerun = Driver(ctx["cfg_path"], store, uuid.uuid4().hex)
    rc = rerun.wait()
    row = {
        "kind": "driver",
        "stage": stage,
        "run": 0,
        "delay_s": delay,
        "rc": rc,
        "killed": "driver (python -m pipeline.cli run)" if injected else None,
        "records_at_kill": recorded,
        "seconds": round(time.monotonic() - t0, 1),
    }
    if rc != 0:
        return {**row, "ok": False, "error": rerun.tail()}
    f = _finished(store, stage)
    reused = f["units"].get("reused", 0)
    row.update(
        identical=f["sha256"] == base["sha256"],
        units=f["units"],
        reused=reused,
        unit_starts=f["unit_starts"],
        unit_starts_baseline=base["unit_starts"][stage],
    )
    row["ok"] = injected and row["identical"] and reused == recorded
    return row


class TaskWatch:
    """Polls a run's processes: for each stage, the first and last moment one of its unit
    tasks was seen running (monotonic seconds). A kill moment is drawn inside that span: an
    encode stage whose one task runs 8 of its 38 seconds is otherwise missed."""

    def __init__(self, tag: str, every: float = 0.2) -> None:
        self.tag, self.every = tag, every
        self.seen: dict[str, list[float]] = {}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            now = time.monotonic()
            for stage, names in TASKS.items():
                if _tagged(self.tag, names):
                    span = self.seen.setdefault(stage, [now, now])
                    span[1] = now

    def stop(self) -> dict[str, float]:
        """{stage: seconds from its first unit task seen to its last one seen}."""
        self._stop.set()
        self._t.join(timeout=10)
        return {s: round(b - a, 2) for s, (a, b) in self.seen.items()}


def baseline(ctx: dict) -> dict:
    store = ctx["work"] / "baseline"
    shutil.rmtree(store, ignore_errors=True)
    drv = Driver(ctx["cfg_path"], store, uuid.uuid4().hex)
    watch = TaskWatch(drv.tag)
    rc = drv.wait()
    spans = watch.stop()
    if rc != 0:
        sys.exit(f"baseline run failed:\n{drv.tail(60)}")
    out = {
        "store": store,
        "seconds": round(time.monotonic() - drv.t0, 1),
        "unit_starts": {},
        "stage_seconds": {},
        "task_seconds": spans,
    }
    for stage in TASKS:
        f = _finished(store, stage)
        out.update(keys=f["keys"], sha256=f["sha256"])
        out["unit_starts"][stage] = f["unit_starts"]
        out["stage_seconds"][stage] = f["stage_seconds"]
        out[f"{stage}_units"] = f["units"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--kills", type=int, default=3, help="worker kills per stage (default 3)")
    ap.add_argument("--no-driver", action="store_true", help="leave out the driver kills")
    ap.add_argument("--stages", nargs="+", choices=list(TASKS), default=list(TASKS))
    ap.add_argument("--windows", type=int, default=8, help="calibration windows (default 8)")
    ap.add_argument("--text", default=TEXT, help=f"calibration text (default {TEXT})")
    ap.add_argument(
        "--method",
        choices=("ecsq", "uniform"),
        default="ecsq",
        help="quantizer (default ecsq, as the issue; uniform: a quicker quantize stage)",
    )
    ap.add_argument("--ecsq-bins", type=int, default=64,
                    help="quantize.ecsq_bins (default 64: SmolLM2's rows of 576 are binned, "
                    "a quantize stage of seconds; 0: the exact solver, minutes per run)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    ap.add_argument("--work", default=str(ROOT / "runs" / "stream_faults"))
    ap.add_argument("--out", default=str(RESULTS / "stream_faults"))
    a = ap.parse_args(argv)
    from benchmarks.residency import _folder

    folder = _folder()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    cfg = config(folder, a.windows, a.text, a.method, a.ecsq_bins)
    cfg_path = work / "config.yaml"
    cfg_path.write_text(json.dumps(cfg, indent=1))  # JSON is YAML
    load0 = os.getloadavg()
    ctx = {"work": work, "cfg_path": cfg_path}
    print("== baseline", flush=True)
    base = ctx["base"] = baseline(ctx)
    print(
        f"   {base['seconds']} s, model.hwq {base['sha256'][:16]}, stage seconds "
        f"{base['stage_seconds']}, unit task starts {base['unit_starts']}",
        flush=True,
    )
    # A kill moment: 0.5 s to 80% of the time the stage's unit tasks were seen running in the
    # baseline, after its first one appears (half the stage's time when none was seen).
    ctx["max_delay"] = {s: max(1.0, 0.8 * base["task_seconds"][s])
                        if base["task_seconds"].get(s) else max(1.0, 0.5 * t)
                        for s, t in base["stage_seconds"].items()}
    print(f"   unit tasks seen running for {base['task_seconds']} s; kill moments up to "
          f"{ctx['max_delay']} s after the first", flush=True)
    rng = random.Random(a.seed)
    rows = []
    # Cheapest first (encode redoes one stage, hessian three): a run cut short keeps the most.
    order = [s for s in ("encode", "quantize", "hessian") if s in a.stages]
    plan = [("worker", s, i) for s in order for i in range(a.kills)]
    plan += [] if a.no_driver else [("driver", s, 0) for s in order]
    for kind, stage, i in plan:
        print(f"== {kind} kill in {stage} ({i + 1})", flush=True)
        try:
            row = (
                worker_kill(ctx, stage, i, rng)
                if kind == "worker"
                else driver_kill(ctx, stage, rng)
            )
        except Exception as e:  # noqa: BLE001 - a harness failure is a row, not the end
            row = {
                "kind": kind,
                "stage": stage,
                "run": i,
                "ok": False,
                "error": f"{type(e).__name__}: {e}"[:400],
            }
        rows.append(row)
        print("   " + json.dumps({k: v for k, v in row.items() if k != "error"}), flush=True)
        if row.get("error"):
            print(row["error"], flush=True)
        _write(a.out, {**_summary(rows, base, cfg, a, load0)}, final=False)
    md = _write(a.out, _summary(rows, base, cfg, a, load0), final=True)
    print(md)
    if not os.environ.get("HWQ_KEEP"):
        shutil.rmtree(work, ignore_errors=True)
    return 0 if rows and all(r.get("ok") for r in rows) else 1


def _summary(rows: list, base: dict, cfg: dict, a, load0) -> dict:
    return {
        "rows": rows,
        "baseline": {k: (str(v) if isinstance(v, Path) else v) for k, v in base.items()},
        "config": cfg,
        "kills_per_stage": a.kills,
        "seed": a.seed,
        "loadavg_start": load0,
        "loadavg_end": os.getloadavg(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }


def _write(prefix: str, out: dict, final: bool) -> str:
    """benchmarks/results/stream_faults.{json,md} (after every row too: a partial run keeps
    what it measured)."""
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    out["complete"] = final
    Path(prefix + ".json").write_text(json.dumps(out, indent=1, default=str) + "\n")
    md = render(out)
    Path(prefix + ".md").write_text(md)
    return md


def render(out: dict) -> str:
    b = out["baseline"]
    lines = [
        "| kill | stage | after (s) | process killed | unit(s) retried | units | unit task "
        "starts (baseline) | retried (manifest) | records at kill / reused by rerun | "
        "model.hwq identical | ok |",
        "|---|---|---:|---|---|---:|---:|---:|---|---|---|",
    ]
    for r in out["rows"]:
        u = r.get("units", {})
        reuse = f"{r['records_at_kill']} / {r.get('reused', '?')}" if r["kind"] == "driver" else ""
        ident = {True: "yes", False: "NO"}.get(r.get("identical"), "?")
        lines.append(
            f"| {r['kind']} | {r['stage']} | {r.get('delay_s', '')} | {r.get('killed') or '-'} "
            f"| {r.get('unit_killed', '')} | {u.get('total', '')} | "
            f"{r.get('unit_starts', '?')} ({r.get('unit_starts_baseline', '?')}) | "
            f"{u.get('retried', '')} | {reuse} | {ident} | {'yes' if r.get('ok') else 'NO'} |"
        )
    ok = sum(bool(r.get("ok")) for r in out["rows"])
    w = out["config"]["data"]
    lines += [
        "",
        f"SmolLM2-135M (bf16 folder) streamed: Fisher over {w['calibration_windows']} "
        f"windows × {w['seq_len']} tokens of `{w['calibration'][0]}`, 2 partitions × 4 "
        f"groups, {out['config']['quantize']['method']} at 3.5 bits. Baseline run {b['seconds']} s (stages: "
        f"{b['stage_seconds']}; unit tasks seen running {b.get('task_seconds', '?')}), "
        f"model.hwq sha256 {b['sha256'][:16]}…. Each kill lands a seeded random 0.5 s to "
        "80% of the stage's unit-task time after its first unit task appears. "
        f"{ok} of {len(out['rows'])} fault runs ok. Load average "
        f"{out['loadavg_start'][0]:.1f} at start, {out['loadavg_end'][0]:.1f} at end, "
        f"{out['cpus']} CPUs."
        + ("" if out.get("complete") else " (Partial: the run was cut short.)"),
        "",
        "Unit task starts: starts of the stage's unit tasks counted by the placement "
        "ledger (the stage manifest's `placement.tasks`; a killed start included), "
        "against the uninterrupted run's; a worker kill must add exactly one, and the "
        "manifest's `retried` (Ray attempt numbers in the unit records; encode: of its "
        "one task) must be 1. A driver kill: the rerun reuses every unit recorded "
        "before the kill (encode has no units and is redone).",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
