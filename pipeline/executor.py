"""Where work runs: an embedded local Ray by default, or a cluster at an address.

Ray is imported lazily so that importing `pipeline` never starts anything.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import socket
import stat
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import ExecutorError

__all__ = ["cache_dir", "private_subdir", "init_ray", "shutdown_ray", "ray_has_gpus", "remote",
           "task_threads", "ray_map", "configure", "task_gpus", "worker_cpus", "task_device",
           "task_attempt", "map_units", "UnitQueue"]

log = logging.getLogger(__name__)

# Unix socket paths must stay under ~107 bytes; Ray's session folder adds ~60 more.
_MAX_RAY_TMP = 45


def cache_dir() -> Path:
    """The project's scratch/cache root: $HWQ_CACHE, else ./.cache of the working directory."""
    p = Path(os.environ.get("HWQ_CACHE") or Path.cwd() / ".cache").resolve()
    p.mkdir(parents=True, exist_ok=True)
    return p


def private_subdir(name: str) -> Path:
    """cache_dir()/name, if it is (or can be made) a folder of this user that no one else can
    write; else a fresh private temporary folder. Ray's sockets and the files staged for an
    upload live there: a folder someone else controls could swap them."""
    return _private_or_fresh(cache_dir() / name, f"hwq-{name}-")


def _private_or_fresh(p: Path, prefix: str) -> Path:
    if _private_dir(p):
        return p
    fresh = Path(tempfile.mkdtemp(prefix=prefix))
    log.warning("%s is not a private folder of this user; using %s", p, fresh)
    return fresh


def _ray_temp_dir() -> tuple[str, Path | None]:
    """Ray's temp folder, and the fresh folder made for it (to remove at shutdown) or None.

    Ray makes its temp folder (and the session and socket folders in it) mode 0777, so that
    folder is never the one checked: it is `r` inside a private parent, `$HWQ_CACHE/ray-<uid>`
    (mode 0700, which Ray does not touch). Only this user can reach anything inside, whatever
    Ray's modes; a parent that is not private (a link, someone else's, shared) is not used.
    """
    parent = cache_dir() / f"ray-{os.getuid()}"
    if len(str(parent / "r")) > _MAX_RAY_TMP:
        # A deep checkout would overflow Ray's socket paths: a short per-user folder instead,
        # used only if nobody else made (or linked) that name first.
        parent = Path(tempfile.gettempdir()) / f"hwq-{os.getuid()}-ray"
    if _private_dir(parent):
        return str(parent / "r"), None
    fresh = Path(tempfile.mkdtemp(prefix="hwq-ray-"))
    log.warning("%s is not a private folder of this user; using %s (removed at shutdown)",
                parent, fresh)
    return str(fresh / "r"), fresh


def _private_dir(p: Path) -> bool:
    """Create `p` (mode 0700) or accept it if it is a real folder owned by this user that no
    one else can write; False if it is anything else (a link, someone else's, shared)."""
    try:
        p.mkdir(mode=0o700)
    except FileExistsError:
        pass
    except OSError:
        return False
    st = os.lstat(p)
    return (stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid()
            and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


# Folders named by the driver's machine: right for an embedded Ray's workers (same machine),
# wrong on a cluster's other nodes, which keep their own (their image's or pod's environment).
_PATH_VARS = ("HWQ_CACHE", "TORCH_EXTENSIONS_DIR", "HF_HOME", "NUMBA_CACHE_DIR", "MPLCONFIGDIR")


def _worker_env(cluster: bool = False) -> dict[str, str]:
    """Environment every Ray worker gets: caches under the project's folder, passive OpenMP.
    On a cluster (`cluster`), the cache folders are left to each node."""
    if cluster:
        return {k: v for k, v in _worker_env().items() if k not in _PATH_VARS}
    c = cache_dir()
    env = {
        "HWQ_CACHE": str(c),
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(c / "torch_extensions")),
        "HF_HOME": os.environ.get("HF_HOME", str(c / "hf")),
        "NUMBA_CACHE_DIR": os.environ.get("NUMBA_CACHE_DIR", str(c / "numba")),
        "MPLCONFIGDIR": os.environ.get("MPLCONFIGDIR", str(c / "matplotlib")),
        # Two CPU-heavy processes spin each other out of OpenMP otherwise (docs/METHOD.md §2).
        "OMP_WAIT_POLICY": "PASSIVE",
        # A fine-tune's worker group may wait behind other work for its CPUs (a sweep, a
        # shared cluster): waiting is right, Ray Train's 60 s default would fail the stage.
        "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": os.environ.get(
            "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "1800"),
        # How often Ray Train's controller polls its workers (2 s by default): each state
        # change of a fine-tune (workers started, training finished) waits for a poll, which
        # cost a small fine-tune ~4 s of its ~25 s. A poll is one actor call a worker.
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get(
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5"),
        # Ray Train's workers would route print() through the root logger too, and each
        # fine-tune line reached the terminal twice (the print and the log record).
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
        # Bars redraw in place on a terminal; in a log file they would repeat every update.
        "HWQ_PROGRESS": os.environ.get("HWQ_PROGRESS", "1" if sys.stderr.isatty() else "0"),
    }
    # No credentials here: a runtime env is shown by the dashboard and the job API. Workers
    # of an embedded Ray inherit the driver's environment; a cluster's nodes get theirs from
    # their own environment (a Secret, an instance role), see docs/SECURITY.md.
    return env


# Seconds to wait for a Ray cluster's address to accept a connection before giving up with a
# message (Ray's own client retries for minutes, silently, on an address nobody listens on).
CONNECT_TIMEOUT_S = float(os.environ.get("HWQ_RAY_CONNECT_TIMEOUT", "15"))


def _probe_address(address: str) -> None:
    """ExecutorError unless `address` (host:port or ray://host:port) accepts a TCP connection.

    "auto" and other forms without a port are left to Ray (they name a local cluster file).
    """
    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or "/" in target:
        return
    host = host.strip("[]") or "127.0.0.1"
    try:
        with socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as e:
        raise ExecutorError(
            f"cannot reach the Ray cluster at {address} ({e.strerror or e}); check "
            "--ray-address (a head's GCS is host:6379, a Ray client ray://host:10001), or "
            "leave it out to run on an embedded local Ray") from None


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Start (or connect to) Ray once per process.

    address: None starts an embedded local Ray with this machine's CPUs (temp dir under the
    project's cache folder, not /tmp/ray); "auto" or "ray://host:port" joins a cluster.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    runtime_env = {"env_vars": without_job_env_vars(_worker_env(cluster=address is not None),
                                                    os.environ.get(_JOB_CONFIG))}
    if address:
        _probe_address(address)
        log.info("connecting to Ray cluster at %s", address)
        try:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        except (ConnectionError, TimeoutError, RuntimeError, ValueError) as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            # The address answered (probed above), so the likeliest cause is Ray's token
            # authentication (on by default in Ray 2.60): Ray logs that, but raises this.
            hint = ("; if the cluster uses Ray's token authentication, set RAY_AUTH_TOKEN (or "
                    "~/.ray/auth_token) to its token, see docs/DEPLOY.md")
            raise ExecutorError(f"cannot join the Ray cluster at {address}: {first}{hint}"
                                ) from None
    else:
        log.info("starting embedded local Ray (%s CPUs)", num_cpus or os.cpu_count())
        temp_dir, fresh = _ray_temp_dir()
        if fresh is not None:
            _FRESH_DIRS.append(fresh)
            # Runs before Ray's own exit handler (registered earlier, at import): Ray stops,
            # then its folder goes, also when nobody calls shutdown_ray.
            atexit.register(shutdown_ray)
        try:
            ray.init(
                num_cpus=num_cpus,
                include_dashboard=False,
                _system_config=_local_system_config(num_cpus),
                _temp_dir=temp_dir,
                runtime_env=runtime_env,
                log_to_driver=True,
                configure_logging=True,
                logging_level=logging.WARNING,
            )
        except BaseException:
            shutdown_ray()
            raise


# Ray kills idle workers beyond a soft limit (the CPU count by default) after a second. The
# fine-tune's Ray Train controller and workers are actors in processes of their own, so while it
# runs the task workers of the stages before it are over the limit and die; the encode stage
# after it then starts new ones, each importing torch and transformers again (~7 s of CPU a
# process on the 2-core machine: a tiny model's encode stage took 12 s instead of 4). The
# local Ray keeps that many more idle workers alive; they hold their imports, not a stage's
# data (each task frees what it used).
_SPARE_WORKERS = 4


def _local_system_config(num_cpus: int | None) -> dict[str, int]:
    return {"num_workers_soft_limit": int(num_cpus or os.cpu_count() or 1) + _SPARE_WORKERS}


# Set by Ray's job manager in a submitted job's driver: the job's config, runtime env included.
_JOB_CONFIG = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def without_job_env_vars(ours: dict[str, str], job_config_json: str | None) -> dict[str, str]:
    """`ours` less the variables the submitted job's runtime env already sets.

    Ray refuses a driver runtime env that sets a variable the job's own runtime env sets
    ("Failed to merge the Job's runtime env"), even to the same value: a RayJob that sets
    OMP_WAIT_POLICY, HWQ_CACHE or AWS_* would die at ray.init. The job's value wins: its
    author set it on purpose.
    """
    if not job_config_json:
        return ours
    try:
        job = json.loads(job_config_json)
        job_env = ((job.get("runtime_env") or {}).get("env_vars") or {})
    except (ValueError, AttributeError):
        return ours
    return {k: v for k, v in ours.items() if k not in job_env}


# Fresh temporary folders this process made for its embedded Ray: removed when Ray stops.
_FRESH_DIRS: list[Path] = []


def shutdown_ray() -> None:
    """Stop Ray (if this process started or joined it) and remove the fresh temporary folder
    made for it, if any."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    while _FRESH_DIRS:
        shutil.rmtree(_FRESH_DIRS.pop(), ignore_errors=True)


def ray_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def _cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


@dataclass
class Resources:
    """What each task asks Ray for, from the config's `executor` section (see `configure`).

    gpus_per_task: GPUs of every compute task and fine-tune worker (train, prune, Hessian,
        quantize, evaluation); None: one if the cluster shows a GPU when the stage starts.
        A number makes Ray (and its autoscaler) find or start a GPU node for the task: a pool
        that scales from zero shows no GPU until something asks for one.
    cpus_per_task: CPUs of a Hessian or quantize task; None: the cluster's CPUs shared.
    cpus_per_worker: CPUs of a train/prune/evaluate task and of each fine-tune worker; None:
        every CPU of an embedded Ray, the smallest live node's CPUs on a cluster (so the task
        fits on any node: asking for the largest node's count strands it on smaller ones).
    """

    gpus_per_task: float | None = None
    cpus_per_task: int | None = None
    cpus_per_worker: int | None = None
    embedded: bool = True


_RESOURCES = Resources()


def configure(executor) -> None:
    """Take the resource requests of a config's `executor` section for the tasks that follow."""
    global _RESOURCES
    _RESOURCES = Resources(gpus_per_task=executor.gpus_per_task,
                           cpus_per_task=executor.cpus_per_task,
                           cpus_per_worker=executor.cpus_per_worker,
                           embedded=executor.address is None)


def task_gpus() -> float:
    """GPUs one compute task asks for (the config's number, else 1 if the cluster has any)."""
    if _RESOURCES.gpus_per_task is not None:
        return float(_RESOURCES.gpus_per_task)
    return 1.0 if ray_has_gpus() else 0.0


def worker_cpus() -> int:
    """CPUs of one train/prune/evaluate task or fine-tune worker (see `Resources`)."""
    if _RESOURCES.cpus_per_worker is not None:
        return _RESOURCES.cpus_per_worker
    if _RESOURCES.embedded:
        return _cluster_cpus()
    return _smallest_node_cpus()


def task_cpus(default: int) -> int:
    """CPUs of one Hessian/quantize task: the config's number, else `default`."""
    return _RESOURCES.cpus_per_task if _RESOURCES.cpus_per_task is not None else default


def task_device():
    """Inside a task: the torch device to compute on (the GPU Ray assigned, else the CPU)."""
    import torch

    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def remote(fn, *, cpus: int | str = 1, gpus: float | str = 0, **options):
    """`ray.remote` with resources chosen here.

    cpus: a number, or "worker" (`worker_cpus()`: a whole-model task such as training).
    gpus: a number, or "task" (`task_gpus()`: a task that computes on a GPU when given one).
    Every task notes the node it ran on for the stage's manifest (`pipeline.placement`).
    """
    import ray

    from pipeline.placement import noting

    n = worker_cpus() if cpus in ("all", "worker") else int(cpus)
    g = task_gpus() if gpus == "task" else float(gpus)
    # Every hwq task is safe to rerun (it writes atomically and its result is a function of
    # its inputs): retry a killed worker whatever RAY_TASK_MAX_RETRIES says.
    options.setdefault("max_retries", 3)
    return ray.remote(num_cpus=n, num_gpus=g, **options)(noting(fn))


def _smallest_node_cpus() -> int:
    import ray

    per = [n.get("Resources", {}).get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
    per = [c for c in per if c > 0]
    return max(1, int(min(per, default=_cluster_cpus())))


def task_threads() -> int:
    """Inside a Ray task: give torch exactly the CPUs Ray assigned (no oversubscription)."""
    import ray
    import torch

    if not ray.is_initialized():  # a unit run in this process, not a task: asking Ray would
        return torch.get_num_threads()  # start a local Ray instance just to answer
    try:
        n = int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)) or 1
    except Exception:
        n = 1
    torch.set_num_threads(max(1, n))
    return n


def task_attempt() -> int:
    """Inside a Ray task: how many times Ray ran it before (0 the first time; 1 after one
    retry of a killed worker); 0 outside a task. Never imports Ray (0 where it is not)."""
    ray = sys.modules.get("ray")
    try:
        return int(ray._private.worker.global_worker.core_worker
                   .get_current_task_attempt_number()) if ray is not None else 0
    except Exception:  # noqa: BLE001 - not in a Ray worker, or Ray moved the call
        return 0


# Jobs holding fewer array bytes than this in all run in the calling process: a few chunks of
# a small model (LeNet-5's file is 40 KB) are milliseconds of coding, while their Ray tasks
# cost seconds on 2 cores (workers importing the coders and loading their compiled kernels):
# LeNet-5's forced encode stage took 15.4 and 14.9 s with this rule, 16.9 and 19.1 s with
# every chunk a Ray task (2026-12-08, two runs each, alternating).
LOCAL_MAP_BYTES = 4 << 20


def _job_bytes(job: Any) -> int:
    """Bytes of the numpy arrays among a job's fields (a tuple) or of the job itself."""
    fields = job if isinstance(job, tuple) else (job,)
    return sum(int(getattr(f, "nbytes", 0) or 0) for f in fields)


def ray_map(fn, jobs, *, cpus: int = 1, local_below: int = LOCAL_MAP_BYTES) -> list:
    """[fn(j) for j in jobs], each call a Ray task; results in order (a `map_fn` for the
    encoder/decoder's chunks). Jobs holding fewer than `local_below` array bytes in all run
    here, in order, without Ray."""
    jobs = list(jobs)
    if sum(_job_bytes(j) for j in jobs) < local_below:
        return [fn(j) for j in jobs]
    import ray

    task = remote(fn, cpus=cpus)
    return ray.get([task.remote(j) for j in jobs])


def call(fn, *args, cpus: int | str = 1, gpus: float | str = 0, max_retries: int | None = None,
         **kwargs):
    """fn(*args, **kwargs) as one Ray task (resources as in `remote`; max_retries: Ray's
    retries of a killed worker, `remote`'s default when None); its result."""
    import ray

    options = {} if max_retries is None else {"max_retries": max_retries}
    ref = remote(fn, cpus=cpus, gpus=gpus, **options).remote(*args, **kwargs)
    try:
        return ray.get(ref)
    except KeyboardInterrupt:
        _cancel([ref])
        raise


class BlockMap:
    """A `map_fn` for the row solvers (`pipeline.quantize.rate`): each block put in Ray's
    object store once (keyed by the block object, held while this map lives), each call a few
    Ray tasks (`task_cpus(1)` CPUs, a GPU when tasks get one) over consecutive runs of the
    blocks balanced by their sizes, results in order.

    Runs rather than a task per block: the λ search evaluates every tensor's sample (a few
    hundred blocks, 8 M weights together) at each of ~17 λ, and a task per block spent most
    of each evaluation in Ray's per-task overhead, not in the solver."""

    def __init__(self, tasks_per_cpu: int = 2) -> None:
        import ray

        self._ray = ray
        self._refs: dict[int, Any] = {}
        self._keep: list[Any] = []
        self._task = remote(_apply_blocks, cpus=task_cpus(1), gpus="task")
        self._per_cpu = max(1, int(tasks_per_cpu))
        self.calls = 0

    def __call__(self, fn, blocks):
        t0 = time.perf_counter()
        self.calls += 1
        refs, sizes = [], []
        for b in blocks:
            ref = self._refs.get(id(b))
            if ref is None:
                ref = self._ray.put(b)
                self._refs[id(b)] = ref
                self._keep.append(b)  # the id stays this block's while we hold it
            refs.append(ref)
            sizes.append(int(getattr(b.W, "size", 0)) or 1)  # a RowBlock (weights W)
        runs = balanced_runs(sizes, _cluster_cpus() * self._per_cpu)
        out = [r for part in self._ray.get([self._task.remote(fn, *refs[a:b]) for a, b in runs])
               for r in part]
        lam = getattr(fn, "keywords", {}).get("lam")
        logging.getLogger("hwq").info(
            "quantize: pass %d over %d blocks in %d tasks%s in %.1f s", self.calls, len(refs),
            len(runs), "" if lam is None else f" at λ={lam:.4g}", time.perf_counter() - t0)
        return out


def balanced_runs(sizes: list[int], parts: int) -> list[tuple[int, int]]:
    """≤ `parts` consecutive (start, stop) runs covering `sizes`, cut where the running total
    passes each multiple of total / parts (every run non-empty)."""
    n = len(sizes)
    parts = max(1, min(int(parts), n))
    total = sum(sizes) or 1
    runs, start, acc = [], 0, 0
    for i, s in enumerate(sizes):
        acc += s
        cuts = parts - 1 - len(runs)  # cuts still to make, each leaving a non-empty run after
        after = n - i - 1
        if cuts and after >= cuts and (acc * parts >= total * (len(runs) + 1) or after == cuts):
            runs.append((start, i + 1))
            start = i + 1
    runs.append((start, n))
    return runs


def _apply_blocks(fn, *blocks):
    task_threads()
    return [fn(b) for b in blocks]


def map_units(fn, calls, *, cpus: int | str = 1, gpus: float | str = 0,
              desc: str | None = None, unit: str = "unit"):
    """Run fn(*args) for each args tuple of `calls` as Ray tasks; yield (i, result) in the order
    they finish, with a progress bar (`desc`). A task's error is raised when it is reached;
    the stage code that drives this imports no Ray."""
    import ray

    from pipeline import progress

    task = remote(fn, cpus=cpus, gpus=gpus)
    refs = {task.remote(*args): i for i, args in enumerate(calls)}
    pbar = progress.bar(len(refs), desc or getattr(fn, "__name__", "tasks"), unit=unit)
    pending = list(refs)
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            yield refs[ready[0]], ray.get(ready[0])
            pbar.update(1)
    finally:
        pbar.close()
        if pending:  # stopped early (an error, Ctrl-C): the rest must not write afterwards
            _cancel(pending)


class UnitQueue:
    """A stage's Ray tasks, at most `slots` running at once, started in the order they were
    added; `add(..., first=True)` puts a unit at the head of the queue. Iterating yields
    (key, result) in the order they finish, and may add units meanwhile: a follow-up unit (a
    reduce of partials that just finished) takes the next free slot instead of waiting
    behind every queued unit, so what it consumes is freed early. An error is raised when
    reached; the units still running or queued are then cancelled (as `map_units`)."""

    def __init__(self, *, slots: int | None = None, cpus_per_slot: int = 1,
                 total: int | None = None, desc: str = "units", unit: str = "unit") -> None:
        # slots: default, as many units of cpus_per_slot CPUs as the cluster runs at once
        self.slots = max(1, int(slots) if slots is not None
                         else _cluster_cpus() // max(1, int(cpus_per_slot)))
        self._queued: deque = deque()  # (key, remote function, args)
        self._running: dict[Any, Any] = {}  # ObjectRef -> key
        self._remotes: dict[tuple, Any] = {}  # one Ray remote function per (fn, resources)
        self._total, self._desc, self._unit = total, desc, unit

    def add(self, key, fn, args: tuple, *, cpus: int | str = 1, gpus: float | str = 0,
            first: bool = False) -> None:
        task = self._remotes.get((fn, cpus, gpus))
        if task is None:
            task = self._remotes[(fn, cpus, gpus)] = remote(fn, cpus=cpus, gpus=gpus)
        item = (key, task, tuple(args))
        if first:
            self._queued.appendleft(item)
        else:
            self._queued.append(item)

    def _start(self) -> None:
        while self._queued and len(self._running) < self.slots:
            key, task, args = self._queued.popleft()
            self._running[task.remote(*args)] = key

    def __iter__(self):
        import ray

        from pipeline import progress

        pbar = progress.bar(self._total, self._desc, unit=self._unit)
        try:
            while True:
                self._start()
                if not self._running:
                    return
                ready, _ = ray.wait(list(self._running), num_returns=1)
                key = self._running.pop(ready[0])
                result = ray.get(ready[0])
                pbar.update(1)
                yield key, result
        finally:
            pbar.close()
            self._queued.clear()
            if self._running:  # stopped early (an error, Ctrl-C): nothing may write afterwards
                _cancel(list(self._running))
                self._running.clear()


def _cancel(refs: list) -> None:
    """Cancel tasks a stopped stage started and wait (up to a minute) until they have ended, so
    none finishes later and writes into a stage folder another run has since completed."""
    import ray

    # Ray's cancel is best effort: one that reaches a task while it is being handed to its
    # worker is lost, and the task then runs to its end (seen in the test suite: a queued unit
    # started as the first finished and wrote seconds after the stop). So the unfinished are
    # cancelled again every half second, and killed (force) after a few tries.
    left = list(refs)
    for attempt in range(8):
        for r in left:
            try:
                ray.cancel(r, force=attempt == 7, recursive=attempt < 7)
            except Exception:  # noqa: BLE001 - already finished, or its worker is gone
                pass
        try:
            _, left = ray.wait(left, num_returns=len(left), timeout=0.5)
        except Exception:  # noqa: BLE001 - Ray shutting down under us: nothing left to wait for
            return
        if not left:
            return
    try:
        ray.wait(left, num_returns=len(left), timeout=60)
    except Exception:  # noqa: BLE001
        pass
