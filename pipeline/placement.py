"""Where each task of a stage ran: one record per task, written into the stage's manifest.

On a cluster a stage's tasks spread over nodes; the manifest says which, so a run can be
audited ("did the GPU pool get used?") and a test can assert that a stage really ran on two
nodes. The driver starts a small Ray actor, the ledger, named after its Ray job; every task
wrapped by `noting` (every task `pipeline.executor.remote` makes, the quantize actors and
the fine-tune workers call `note` themselves) records (stage, task name, node) there before
it computes. The driver tells the ledger which stage is running and takes that stage's
records when it ends.

The ledger is telemetry: a task that cannot reach it (run outside a driver, in a unit test)
computes all the same, and a stage's records are only as complete as its tasks' notes.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from typing import Any

__all__ = ["noting", "note", "note_memory", "Ledger", "node_summary"]

log = logging.getLogger(__name__)

_NAMESPACE = "hwq"


def _ledger_name(job_id: str) -> str:
    return f"hwq-ledger-{job_id}"


def _this_node() -> dict[str, Any]:
    import ray

    ctx = ray.get_runtime_context()
    gpus = ctx.get_accelerator_ids().get("GPU") or []
    return {"node_id": ctx.get_node_id(), "ip": ray.util.get_node_ip_address(),
            "gpus": len(gpus)}


def note(task: str) -> None:
    """Inside a Ray task or actor: record that `task` runs on this node, for the stage the
    driver is running. Waits for the ledger's answer, so the record is in before the task's
    result can end the stage."""
    try:
        import ray

        job = ray.get_runtime_context().get_job_id()
        ledger = ray.get_actor(_ledger_name(job), namespace=_NAMESPACE)
        # Waited on through a future, not ray.get: a task blocked in ray.get hands its CPU
        # back to Ray, which starts another worker process for the next queued task (measured:
        # 9-12 processes instead of 2 in one quantize stage on 2 CPUs, each its own peak RSS).
        ledger.record.remote(task, _this_node()).future().result(timeout=30)
    except Exception as e:  # noqa: BLE001 - telemetry never fails a task
        log.debug("placement not recorded for %s: %s", task, e)


def note_memory(task: str) -> None:
    """Inside a Ray task or actor, when its work is done: record this process's peak RSS (and
    the GPU allocator's peak) for the stage's manifest. Telemetry: never fails the task."""
    try:
        import ray

        from pipeline.memory import process_peaks

        job = ray.get_runtime_context().get_job_id()
        ledger = ray.get_actor(_ledger_name(job), namespace=_NAMESPACE)
        rec = {**process_peaks(), "node_id": ray.get_runtime_context().get_node_id()}
        ledger.memory.remote(task, rec).future().result(timeout=30)  # see `note`
    except Exception as e:  # noqa: BLE001 - telemetry never fails a task
        log.debug("memory not recorded for %s: %s", task, e)


def noting(fn):
    """`fn` as a task body that notes its node first and its peak memory after (names kept:
    Ray names tasks by them)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        note(fn.__name__)
        try:
            return fn(*args, **kwargs)
        finally:
            note_memory(fn.__name__)

    return wrapper


class _LedgerActor:
    def __init__(self) -> None:
        self.stage: str | None = None
        self.records: dict[str, list[dict[str, Any]]] = {}
        self.mem: dict[str, dict[tuple[str, int], dict[str, Any]]] = {}

    def begin(self, stage: str) -> None:
        self.stage = stage
        self.records[stage] = []
        self.mem[stage] = {}

    def record(self, task: str, node: dict[str, Any]) -> None:
        if self.stage is not None:
            self.records[self.stage].append({"task": task, **node})

    def memory(self, task: str, rec: dict[str, Any]) -> None:
        """One process's peaks: kept per (node, pid), the largest seen, with its tasks."""
        if self.stage is None:
            return
        key = (rec.get("node_id", ""), int(rec.get("pid", 0)))
        cur = self.mem[self.stage].setdefault(key, {**rec, "tasks": 0, "gpu_peak": None})
        cur["tasks"] += 1
        cur["peak_rss"] = max(int(cur.get("peak_rss") or 0), int(rec.get("peak_rss") or 0))
        if rec.get("gpu_peak") is not None:
            cur["gpu_peak"] = max(cur["gpu_peak"] or 0, int(rec["gpu_peak"]))

    def take(self, stage: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        if self.stage == stage:
            self.stage = None
        procs = sorted(self.mem.pop(stage, {}).values(), key=lambda r: (r["node_id"], r["pid"]))
        return self.records.pop(stage, []), procs


_LEDGERS: dict[tuple[str, str], Any] = {}


class Ledger:
    """The driver's side: one ledger actor for this Ray job (started on first use, and kept
    for the job's life: an actor dies with its creator's last handle, so the handle is held
    here, not by one run)."""

    def __init__(self) -> None:
        import ray

        ctx = ray.get_runtime_context()
        job = ctx.get_job_id()
        # A new embedded Ray in the same process reuses job ids: key by the cluster too.
        where = (job, str(getattr(ctx, "gcs_address", "")))
        if where not in _LEDGERS:
            # Zero CPUs: it must never wait behind the work it records.
            actor = ray.remote(num_cpus=0, max_restarts=-1)(_LedgerActor)
            _LEDGERS.clear()  # handles of an earlier, shut-down Ray are of no use
            _LEDGERS[where] = actor.options(name=_ledger_name(job), namespace=_NAMESPACE,
                                            get_if_exists=True).remote()
        self._actor = _LEDGERS[where]

    def begin(self, stage: str) -> None:
        import ray

        try:
            ray.get(self._actor.begin.remote(stage), timeout=60)
        except Exception as e:  # noqa: BLE001 - telemetry never fails a run
            log.warning("placement of stage %s will not be recorded (%s)", stage, e)

    def take(self, stage: str) -> dict[str, Any]:
        """The stage's placement for its manifest: tasks per node, and each task's node."""
        import ray

        try:
            records, procs = ray.get(self._actor.take.remote(stage), timeout=60)
        except Exception as e:  # noqa: BLE001 - a restarted ledger lost its records
            log.warning("placement of stage %s not recorded (%s)", stage, e)
            records, procs = [], []
        out = node_summary(records)
        out["processes"] = procs
        return out


def node_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """{"nodes": {node_id: {"ip", "resources", "tasks"}}, "tasks": [[task, node_id, count,
    on_gpu]]}: how many times each task ran on each node, and how many of those runs Ray gave
    a GPU (a stage of thousands of tasks stays small).

    `resources` are the node's custom resource names (what `ray start --resources` gave it),
    the way a test or an operator tells nodes apart."""
    counts = Counter(r["node_id"] for r in records)
    info = _node_info(set(counts))
    nodes = {nid: {"ip": info.get(nid, {}).get("ip", ""),
                   "resources": info.get(nid, {}).get("resources", []),
                   "tasks": counts[nid]} for nid in sorted(counts)}
    per = Counter((r["task"], r["node_id"]) for r in records)
    gpu = Counter((r["task"], r["node_id"]) for r in records if r.get("gpus"))
    tasks = [[t, n, c, gpu[(t, n)]] for (t, n), c in sorted(per.items())]
    return {"nodes": nodes, "tasks": tasks}


_STANDARD = ("CPU", "GPU", "memory", "object_store_memory", "accelerator_type:")


def _node_info(ids: set[str]) -> dict[str, dict[str, Any]]:
    if not ids:
        return {}
    import ray

    out = {}
    for n in ray.nodes():
        nid = n.get("NodeID")
        if nid in ids:
            res = sorted(k for k in (n.get("Resources") or {})
                         if not k.startswith(_STANDARD) and not k.startswith("node:"))
            out[nid] = {"ip": n.get("NodeManagerAddress", ""), "resources": res}
    return out
