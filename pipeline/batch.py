"""`hwq batch BATCH.yaml`: a list of runs (model × config entries) into one store, for
scheduled batches.

A batch file::

    name: nightly                    # optional: folder under <store>/batches/ (default: file stem)
    store: s3://bucket/hwq           # optional: the one store (--store wins)
    set: [finetune.epochs=0.5]       # optional: overrides for every entry
    entries:
      - name: lenet-uniform-3b       # optional: [A-Za-z0-9._-]+ (default: <config stem>-<n>)
        config: lenet5_fmnist.yaml   # a run config, relative to the batch file's folder
        set: [quantize.method=uniform, quantize.target_bits=3]
        force: [quantize]            # optional: stages to recompute (with downstream)

Every entry's config is loaded and validated (unknown keys, --force names, names the model must
have) before anything runs, so a typo in the fifth entry is an error now, not after four hours.
Overrides apply in this order, later winning: the config file, the batch's `set`, the entry's
`set`, the command line's --set; then the batch's store, --endpoint-url and --ray-address.

The entries run one after another into one store on one Ray (started, or joined, once): stages
one entry shares with another (the same trained, pruned model and Hessian under different
quantizers) are cache hits, and a rerun of the batch finds every completed entry cached. Each
entry's config.yaml and report land under `<store>/batches/<batch>/<entry>/`; an entry that
fails (any exception) is recorded with a one-line error (the traceback in the log and in that
folder's error.txt) and the batch goes on. `batches/<batch>/batch.json` and `batch.md` say, per
entry, its status (ok, cached, failed, ...), its metric before and after, bits per weight,
compression ratio, seconds and error; they are rewritten after every entry, so a killed batch
leaves a truthful partial report.
"""

from __future__ import annotations

import datetime
import difflib
import logging
import os
import re
import reprlib
import time
import traceback
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pipeline.batch_report import render_markdown
from pipeline.config import ConfigError, RunConfig, digest, load_config, read_yaml_file
from pipeline.digests import memoized_digests
from pipeline.error_lines import MAX_ERROR_CHARS, error_line, one_line
from pipeline.stages import default_stages

__all__ = ["BatchFile", "Batch", "BatchEntry", "load_batch", "batch_of_configs", "run_batch",
           "BatchRun", "render_markdown", "add_commands"]

log = logging.getLogger("hwq.batch")

NAME_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")
REPORT_DIR = "batches"
# Statuses of an entry in batch.json.
OK, CACHED, FAILED, PENDING, RUNNING, INTERRUPTED, NOT_RUN = (
    "ok", "cached", "failed", "pending", "running", "interrupted", "not run")


# -- the batch file ------------------------------------------------------------------------

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def _check_sets(items: list[str]) -> list[str]:
    for item in items:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise ValueError(f"{item!r}: expected section.key=value, e.g. quantize.k=32")
    return items


class EntrySpec(_Strict):
    name: str | None = None
    config: str
    sets: list[str] = Field(default_factory=list, alias="set")
    force: list[str] = Field(default_factory=list)

    _sets = field_validator("sets")(_check_sets)


class BatchFile(_Strict):
    name: str | None = None
    store: str | None = None
    sets: list[str] = Field(default_factory=list, alias="set")
    entries: list[EntrySpec] = Field(min_length=1)

    _sets = field_validator("sets")(_check_sets)


_KEYS = {(): ["name", "store", "set", "entries"], ("entry",): ["name", "config", "set", "force"]}


def _validation_errors(err: ValidationError, where: str, raw: Any) -> list[str]:
    """One line per problem, naming the entry (by number and name) and the key."""
    out = []
    for e in err.errors():
        loc = list(e["loc"])
        label, keys = "", _KEYS[()]
        if loc[:1] == ["entries"] and len(loc) >= 2 and isinstance(loc[1], int):
            i = loc[1]
            ent = raw.get("entries", [])[i] if isinstance(raw, dict) else None
            nm = ent.get("name") if isinstance(ent, dict) else None
            label = f"entry {i + 1}" + (f" ({nm!r})" if isinstance(nm, str) else "") + ": "
            loc, keys = loc[2:], _KEYS[("entry",)]
        path = ".".join(str(p) for p in loc) or ("(the entry)" if label else "(top level)")
        if e["type"] == "extra_forbidden":
            near = difflib.get_close_matches(str(loc[-1]), keys, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            out.append(f"{where}: {label}{path}: unknown key{hint} (valid: {', '.join(keys)})")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            got = "" if e["type"] == "missing" else f" (got {reprlib.repr(e.get('input'))})"
            out.append(f"{where}: {label}{path}: {msg}{got}")
    if any("did you mean 'entries'" in ln for ln in out):  # one typo, one line
        out = [ln for ln in out if not ln.endswith(": entries: Field required")]
    return out


def _read_yaml(path: Path) -> Any:
    return read_yaml_file(path, "batch file", "see configs/batch_example.yaml")


def is_batch_file(path: str | os.PathLike) -> bool:
    """Whether a YAML file is a batch file (a mapping with `entries`) rather than a run
    config."""
    try:
        data = _read_yaml(Path(path))
    except ConfigError:
        return False
    return isinstance(data, dict) and "entries" in data


def batch_of_configs(paths: Iterable[str | os.PathLike], name: str = "batch") -> dict[str, Any]:
    """A batch (as data) of run configs, one entry each: what `jobs/batch.py a.yaml b.yaml`
    runs."""
    return {"name": name, "entries": [{"config": os.fspath(p)} for p in paths]}


# -- a loaded, validated batch -------------------------------------------------------------

@dataclass
class BatchEntry:
    name: str
    index: int  # 1-based position in the batch file
    config: str  # as written in the batch file
    overrides: list[str]  # everything applied on top of the config file, in order
    force: list[str]
    cfg: RunConfig | None  # None: not run (--only) and its config does not load
    digest: str | None

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "config": self.config,
                "overrides": [_redact(o) for o in self.overrides], "force": self.force,
                "config_digest": self.digest}


@dataclass
class Batch:
    name: str
    root: str  # the store URL every entry runs into
    entries: list[BatchEntry]  # the ones to run (after --only)
    all_entries: list[BatchEntry]  # every entry of the batch file, in order
    source: str  # the batch file, or "batch" for batch data
    stages: Any = None  # the stage graph (None: the pipeline's; tests inject their own)
    digests: dict = field(default_factory=dict)  # of model files, hashed once per batch

    @property
    def folder(self) -> str:
        return f"{REPORT_DIR}/{self.name}"

    def entry_prefix(self, entry: BatchEntry) -> str:
        return f"{self.folder}/{entry.name}"


def _redact(item: str) -> str:
    key, sep, _ = item.partition("=")
    return f"{key}=***" if sep and key.strip() in ("store.key", "store.secret") else item


def _key(item: str) -> str:
    return item.split("=", 1)[0].strip()


def load_batch(source: str | os.PathLike | Mapping[str, Any], *,
               base_dir: str | os.PathLike | None = None, store: str | None = None,
               endpoint_url: str | None = None, ray_address: str | None = None,
               sets: Iterable[str] = (), force: Iterable[str] = (), only: Iterable[str] = (),
               name: str | None = None, stages=None) -> Batch:
    """Read and validate a batch file (or batch data) and every entry's run config.

    Raises ConfigError listing every problem, one line each, before anything has run.
    base_dir: the folder relative config paths are read from (default: the batch file's
    folder; for batch data, the working directory).
    """
    if isinstance(source, Mapping):
        raw: Any = dict(source)
        where = "batch"
        base = Path(base_dir) if base_dir is not None else Path.cwd()
        default_name = "batch"
    else:
        path = Path(source)
        raw = _read_yaml(path)
        where = str(path)
        base = Path(base_dir) if base_dir is not None else path.resolve().parent
        default_name = re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem).lstrip(".") or "batch"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: the top level must be a mapping with `entries` (a list "
                          "of {name, config, set, force}); see configs/batch_example.yaml")
    if "entries" not in raw and set(raw) & (set(RunConfig.model_fields) - {"name", "store"}):
        raise ConfigError(f"{where} is a run config, not a batch file (it has no `entries`): "
                          "run it with `hwq run`, or name it as an entry's `config`; see "
                          "configs/batch_example.yaml")
    try:
        spec = BatchFile.model_validate(raw)
    except ValidationError as e:
        raise ConfigError("\n".join(_validation_errors(e, where, raw))) from None

    errors: list[str] = []
    bname = name or spec.name or default_name
    if not NAME_RE.fullmatch(bname):
        errors.append(f"{where}: name {bname!r}: use letters, digits, '.', '_' and '-' "
                      "(it names the folder batches/NAME in the store)")
    cli_sets, cli_force, only = list(sets), list(force), list(only)
    for origin, items in (("set", spec.sets), ("--set", cli_sets),
                          *((f"entry {i} set", e.sets) for i, e in enumerate(spec.entries, 1))):
        for item in items:
            if _key(item) in ("store.url", "store"):
                errors.append(f"{where}: {origin} {item!r}: a batch runs into one store; give "
                              "it as `store:` in the batch file or --store")

    # Names: given, or <config stem>-<position>; unique either way.
    names: list[str] = []
    for i, e in enumerate(spec.entries, 1):
        if e.name is not None:
            if not NAME_RE.fullmatch(e.name):
                errors.append(f"{where}: entry {i}: name {e.name!r}: use letters, digits, '.', "
                              "'_' and '-' (at most 100; it names the entry's report folder)")
            names.append(e.name)
        else:
            stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(e.config).stem).lstrip(".") or "entry"
            names.append(f"{stem[:90]}-{i}")
    seen: dict[str, int] = {}
    for i, n in enumerate(names, 1):
        if n in seen:
            errors.append(f"{where}: entry {i}: name {n!r} is already entry {seen[n]}'s; "
                          "entry names must be unique")
        seen.setdefault(n, i)
    unknown_only = [o for o in only if o not in names]
    if unknown_only:  # at once: nothing else is worth validating
        shown = ", ".join(names[:20]) + (f", … ({len(names)} in all)" if len(names) > 20 else "")
        raise ConfigError("\n".join([*errors, f"--only {unknown_only[0]}: no such entry "
                                                f"(entries: {shown})"]))

    # Every entry's config, loaded and checked now.
    from pipeline.driver import check_against_model
    from pipeline.graph import plan

    tail: list[str] = []
    if store:
        tail.append(f"store.url={store}")
    elif spec.store:
        tail.append(f"store.url={spec.store}")
    if endpoint_url:
        tail.append(f"store.endpoint_url={endpoint_url}")
    if ray_address:
        tail.append(f"executor.address={ray_address}")
    entries: list[BatchEntry] = []
    others: list[BatchEntry] = []  # not chosen by --only: in the report, not validated
    stage_names: dict[str, list[str]] = {}
    digests: dict[tuple, str] = {}  # each model folder hashed once (memoized_digests)
    for i, (e, n) in enumerate(zip(spec.entries, names, strict=True), 1):
        label = f"{where}: entry {i} ({n!r})"
        p = Path(e.config).expanduser()
        cpath = p if p.is_absolute() else base / p
        overrides = [*spec.sets, *e.sets, *cli_sets, *tail]
        if only and n not in only:  # its config's digest keeps its earlier row, if unchanged
            try:
                cfg = load_config(cpath, overrides)
                others.append(BatchEntry(n, i, e.config, overrides, e.force, cfg, digest(cfg)))
            except ConfigError:
                others.append(BatchEntry(n, i, e.config, overrides, e.force, None, None))
            continue
        if not cpath.is_file():
            errors.append(f"{label}: config {e.config!r} not found (relative paths are read "
                          f"from the batch file's folder, {base})")
            continue
        try:
            cfg = load_config(cpath, overrides)  # (its residency resolves when it runs)
            check_against_model(cfg)
            with memoized_digests(digests):
                planned = [p_.stage.name for p_ in plan(cfg, stages if stages is not None else default_stages())]
        except ConfigError as err:
            errors.append(f"{label}: {one_line(str(err))}")
            continue
        except ValueError as err:  # plan(): a stage needs a disabled one
            errors.append(f"{label}: {one_line(str(err))}")
            continue
        bad = [f for f in e.force if f not in planned]
        if bad:
            errors.append(f"{label}: force {bad[0]!r}: not a stage of this entry "
                          f"(stages: {', '.join(planned)})")
        stage_names[n] = planned
        entries.append(BatchEntry(n, i, e.config, overrides,
                                  list(dict.fromkeys([*e.force, *(f for f in cli_force
                                                                  if f in planned)])),
                                  cfg, digest(cfg)))
    for f in cli_force:
        if stage_names and not any(f in s for s in stage_names.values()):
            every = sorted({s for st in stage_names.values() for s in st})
            errors.append(f"--force {f}: no entry has this stage (stages: {', '.join(every)})")
    if errors:
        raise ConfigError("\n".join(errors))

    urls = sorted({en.cfg.store.url for en in entries})
    if len(urls) != 1:
        raise ConfigError(f"{where}: the entries name different stores ({', '.join(urls)}); a "
                          "batch runs into one: give `store:` in the batch file or --store")
    execs = {(en.cfg.executor.address, en.cfg.executor.num_cpus) for en in entries}
    if len(execs) != 1:
        raise ConfigError(f"{where}: the entries name different executors "
                          f"({sorted(execs, key=str)}); a batch runs on one Ray: set "
                          "executor.* in the batch's `set` or give --ray-address")
    every = sorted([*entries, *others], key=lambda en: en.index)
    return Batch(bname, urls[0], entries, every, where, stages, digests)


# -- running it ----------------------------------------------------------------------------

def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def summarize(report: Mapping[str, Any]) -> dict[str, Any]:
    """The batch row's numbers from a run's report.json."""
    m = report.get("metrics") or {}
    metric = report.get("metric") or {"name": "accuracy", "direction": "higher"}
    mname = metric.get("name", "accuracy")
    values = {st: m[f"{st}_{mname}"] for st in
              ("baseline", "pruned", "quantized", "finetuned", "decoded")
              if isinstance(m.get(f"{st}_{mname}"), (int, float))}
    result_stage = next((st for st in ("decoded", "finetuned", "quantized", "pruned")
                         if st in values), None)
    enc = m.get("encode") if isinstance(m.get("encode"), dict) else {}
    bpw, basis = m.get("bits_per_weight", enc.get("bits_per_weight")), "quantized weights"
    params = (report.get("model") or {}).get("params")
    if bpw is None and enc.get("file_bytes") and params:
        bpw, basis = 8 * enc["file_bytes"] / params, "all parameters"
    stages = report.get("stages") or {}
    return {
        "metric": {"name": mname, "direction": metric.get("direction", "higher")},
        "values": values,
        "baseline": values.get("baseline"),
        "result": values.get(result_stage) if result_stage else None,
        "result_stage": result_stage,
        "bits_per_weight": bpw,
        "bits_per_weight_basis": basis if bpw is not None else None,
        "compression_ratio": enc.get("compression_ratio"),
        "file_bytes": enc.get("file_bytes"),
        "stages_ran": sum(1 for s in stages.values() if not s.get("cached")),
        "stages_cached": sum(1 for s in stages.values() if s.get("cached")),
    }


_NUM = (int, float)
# What a row kept from an earlier batch.json may carry (the store is not trusted: anything else,
# or of another type, is dropped).
_ROW_FIELDS = {"status": str, "seconds": _NUM, "error": str, "error_file": str, "started": str,
               "baseline": _NUM, "result": _NUM, "result_stage": str, "bits_per_weight": _NUM,
               "bits_per_weight_basis": str, "compression_ratio": _NUM, "file_bytes": int,
               "stages_ran": int, "stages_cached": int}


def _checked_row(old: Mapping[str, Any]) -> dict[str, Any]:
    row = {k: v for k, v in old.items() if k in _ROW_FIELDS
           and isinstance(v, _ROW_FIELDS[k]) and not isinstance(v, bool)}
    for k in ("error", "error_file", "started", "bits_per_weight_basis"):
        if k in row:
            row[k] = row[k][:MAX_ERROR_CHARS]
    if row.get("result_stage") not in ("decoded", "finetuned", "quantized", "pruned"):
        row.pop("result_stage", None)
    metric = old.get("metric")
    if isinstance(metric, dict) and isinstance(metric.get("name"), str) and \
            metric.get("direction") in ("higher", "lower"):
        row["metric"] = {"name": metric["name"][:64], "direction": metric["direction"]}
    values = old.get("values")
    if isinstance(values, dict):
        row["values"] = {k: v for k, v in values.items() if k in
                         ("baseline", "pruned", "quantized", "finetuned", "decoded")
                         and isinstance(v, _NUM) and not isinstance(v, bool)}
    return row


class BatchRun:
    """Runs a loaded batch; `result` is the batch report (batch.json) so far."""

    def __init__(self, batch: Batch, *, shutdown: bool = True):
        self.batch = batch
        self.shutdown = shutdown
        self.store = None
        self.result: dict[str, Any] = {}
        self._t0 = time.perf_counter()

    # The report -------------------------------------------------------------------------
    def _previous(self) -> dict[str, dict]:
        """Rows of the last batch.json whose entry is not run this time (--only) and whose
        config is unchanged: kept, so the report stays whole."""
        try:
            old = self.store.read_json(f"{self.batch.folder}/batch.json")
        except Exception:  # noqa: BLE001 - no report, or an unreadable one: start afresh
            return {}
        rows = old.get("entries") if isinstance(old, dict) else None
        if not isinstance(rows, list):
            return {}
        return {r["name"]: r for r in rows
                if isinstance(r, dict) and isinstance(r.get("name"), str)}

    def _init_result(self) -> None:
        b = self.batch
        run_now = {e.name for e in b.entries}
        previous = self._previous() if len(b.entries) < len(b.all_entries) else {}
        rows = []
        for e in b.all_entries:
            row = {**e.record(), "status": PENDING if e.name in run_now else NOT_RUN,
                   "report": f"{b.entry_prefix(e)}/report.json"}
            old = previous.get(e.name)
            if e.name not in run_now and isinstance(old, dict) and e.digest is not None and \
                    old.get("config_digest") == e.digest and \
                    old.get("status") in (OK, CACHED, FAILED):
                row = {**row, **_checked_row(old), "previous": True}
            rows.append(row)
        self.result = {"name": b.name, "batch_file": b.source, "store": self.store.full_url(""),
                       "state": "running", "started": _now(), "updated": _now(),
                       "seconds": 0.0, "only": [e.name for e in b.entries]
                       if len(b.entries) < len(b.all_entries) else None,
                       "entries": rows, "totals": {}}
        self._totals()

    def _totals(self) -> None:
        rows = self.result["entries"]
        t = {"entries": len(rows)}
        for s in (OK, CACHED, FAILED, PENDING, RUNNING, INTERRUPTED, NOT_RUN):
            t[s.replace(" ", "_")] = sum(1 for r in rows if r["status"] == s)
        t["seconds"] = round(sum(r.get("seconds") or 0 for r in rows
                                 if not r.get("previous")), 3)
        t["stages_ran"] = sum(r.get("stages_ran") or 0 for r in rows if not r.get("previous"))
        t["stages_cached"] = sum(r.get("stages_cached") or 0 for r in rows
                                 if not r.get("previous"))
        self.result["totals"] = t
        self.result["updated"] = _now()
        self.result["seconds"] = round(time.perf_counter() - self._t0, 3)

    def write(self, *, strict: bool = False) -> None:
        """batch.json and batch.md, atomically (each one PUT on S3)."""
        self._totals()
        try:
            self.store.write_json(f"{self.batch.folder}/batch.json", self.result)
            self.store.write_text(f"{self.batch.folder}/batch.md", render_markdown(self.result))
        except Exception as e:  # noqa: BLE001
            if strict:
                raise
            log.warning("batch %s: could not write the batch report (%s); going on",
                        self.batch.name, error_line(e))

    @property
    def report_url(self) -> str:
        return self.store.full_url(f"{self.batch.folder}/batch.md")

    # Running ------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        from pipeline import driver
        from pipeline.executor import init_ray, shutdown_ray

        b = self.batch
        first = b.entries[0].cfg
        self.store = driver.open_store(first)
        self.store.check_access()
        self._init_result()
        self.write(strict=True)
        import ray

        started_ray = not ray.is_initialized()
        try:
            init_ray(first.executor.address, first.executor.num_cpus)
            log.info("batch %s: %d of %d entries into %s; report %s", b.name, len(b.entries),
                     len(b.all_entries), self.store.url, self.report_url)
            rows = {r["name"]: r for r in self.result["entries"]}
            with memoized_digests(b.digests):
                for n, e in enumerate(b.entries, 1):
                    self._run_entry(e, rows[e.name], n)
            self.result["state"] = "complete"
        except KeyboardInterrupt:
            self.result["state"] = "interrupted"
            raise
        finally:
            if self.result.get("state") == "running":  # an error of the batch itself
                self.result["state"] = "stopped"
            for r in self.result["entries"]:
                if r["status"] in (PENDING, RUNNING):
                    r["status"] = NOT_RUN
            self.write(strict=self.result.get("state") == "complete")
            if started_ray and self.shutdown:
                shutdown_ray()
            t = self.result["totals"]
            log.info("batch %s %s: %d ok, %d cached, %d failed, %d not run in %.1f s → %s",
                     b.name, self.result["state"], t["ok"], t["cached"], t["failed"],
                     t["not_run"] + t["pending"], self.result["seconds"], self.report_url)
        return self.result

    def _run_entry(self, e: BatchEntry, row: dict[str, Any], n: int) -> None:
        from pipeline import driver

        b = self.batch
        pre = b.entry_prefix(e)
        log.info("batch %s: [%d/%d] %s (%s) running", b.name, n, len(b.entries), e.name,
                 e.config)
        row.update(status=RUNNING, started=_now())
        self.write()
        t0 = time.perf_counter()
        for stale in ("report.json", "report.md", "run.json", "error.txt"):
            try:  # a failed rerun must not leave the last success's report looking current
                self.store.remove(f"{pre}/{stale}")
            except Exception:  # noqa: BLE001 - the run itself will report a broken store
                pass
        try:
            report = driver.run(e.cfg, force=e.force, stages=b.stages, report_prefix=pre,
                                 init_executor=False)
        except KeyboardInterrupt:
            row.update(status=INTERRUPTED, seconds=round(time.perf_counter() - t0, 3),
                       error="interrupted")
            raise
        except (SystemExit, GeneratorExit):
            raise
        except BaseException as err:  # noqa: BLE001 - one entry's failure is not the batch's
            # (a library's panic, pyo3's PanicException, is a BaseException)
            line = error_line(err)
            tb = traceback.format_exc()
            log.error("batch %s: [%d/%d] %s failed: %s\n%s", b.name, n, len(b.entries),
                      e.name, line, tb)
            row.update(status=FAILED, seconds=round(time.perf_counter() - t0, 3), error=line)
            for k in ("metric", "values", "baseline", "result", "result_stage",
                      "bits_per_weight", "bits_per_weight_basis", "compression_ratio",
                      "file_bytes", "stages_ran", "stages_cached"):
                row.pop(k, None)
            try:
                self.store.write_text(f"{pre}/error.txt", f"{line}\n\n{tb}")
                row["error_file"] = f"{pre}/error.txt"
            except Exception:  # noqa: BLE001
                pass
            self.write()
            return
        s = summarize(report)
        cached = bool(report.get("stages")) and all(
            st.get("cached") for st in report["stages"].values())
        row.pop("error", None)
        row.pop("error_file", None)
        row.update(status=CACHED if cached else OK, seconds=round(time.perf_counter() - t0, 3),
                   **s)
        log.info("batch %s: [%d/%d] %s %s in %.1f s", b.name, n, len(b.entries), e.name,
                 row["status"], row["seconds"])
        self.write()


def run_batch(source: str | os.PathLike | Mapping[str, Any] | Batch, *, shutdown: bool = True,
              **kw: Any) -> dict[str, Any]:
    """Load (unless given a Batch) and run a batch; returns batch.json's content.

    kw: load_batch's options (store, endpoint_url, ray_address, sets, force, only, name,
    stages, base_dir)."""
    batch = source if isinstance(source, Batch) else load_batch(source, **kw)
    return BatchRun(batch, shutdown=shutdown).run()


# -- the command ---------------------------------------------------------------------------

EXAMPLES = """\
examples:
  hwq batch configs/batch_example.yaml --store runs/batch
  hwq batch nightly.yaml --store s3://bucket/hwq --endpoint-url http://minio:9000
  hwq batch nightly.yaml --set finetune.epochs=0.5 --only lenet-ecsq-3b
  hwq batch nightly.yaml --ray-address auto --force encode

batch file (config paths are relative to the batch file's folder):
  name: nightly
  store: s3://bucket/hwq
  set: [finetune.epochs=0.5]
  entries:
    - {name: lenet-uniform-3b, config: lenet5_fmnist.yaml, set: [quantize.target_bits=3]}
    - {name: lenet-ecsq-3b, config: lenet5_fmnist.yaml, set: [quantize.method=ecsq]}

Exit status: 0 when every entry run is ok or cached, 1 when any failed, 2 for an invalid
batch (nothing ran), 130 when interrupted (the report says what finished).
"""


def add_arguments(ap, *, several: bool = False) -> None:
    """The options of `hwq batch` (jobs/batch.py takes the same)."""
    if several:
        ap.add_argument("batch", nargs="+", metavar="BATCH.yaml",
                        help="a batch file, or several run configs (one entry each)")
    else:
        ap.add_argument("batch", metavar="BATCH.yaml",
                        help="the batch file: entries of {name, config, set, force}")
    ap.add_argument("--store", metavar="URL",
                    help="the one store every entry runs into (a folder or s3://bucket/prefix; "
                    "default: the batch file's `store`)")
    ap.add_argument("--endpoint-url", metavar="URL", help="S3-compatible endpoint for the store")
    ap.add_argument("--ray-address", metavar="ADDR",
                    help="join a Ray cluster ('auto', ray://host:10001); default: embedded "
                    "local Ray, started once for the whole batch")
    ap.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="override a config value in every entry (repeatable; wins over the "
                    "batch file's)")
    ap.add_argument("--force", action="append", metavar="STAGE",
                    help="recompute STAGE and downstream in every entry that has it "
                    "(repeatable)")
    ap.add_argument("--only", action="append", metavar="NAME",
                    help="run only this entry (repeatable); the report keeps the others' "
                    "earlier results")
    ap.add_argument("--name", help="folder under <store>/batches/ (default: the batch file's "
                    "`name`, else its file name)")


def cmd_batch(args, *, stages=None) -> int:
    """`hwq batch` (and jobs/batch.py, whose `batch` is a list: one batch file, or run
    configs that become one entry each)."""
    opts = dict(store=args.store, endpoint_url=args.endpoint_url, ray_address=args.ray_address,
                sets=args.set or [], force=args.force or [], only=args.only or [],
                name=args.name, stages=stages)
    files = args.batch if isinstance(args.batch, list) else [args.batch]
    if isinstance(args.batch, list) and not (len(files) == 1 and is_batch_file(files[0])):
        if any(is_batch_file(f) for f in files):
            raise ConfigError("give one batch file, or several run configs (not both)")
        batch = load_batch(batch_of_configs(files), **opts)
    else:
        batch = load_batch(files[0], **opts)
    runner = BatchRun(batch)
    try:
        result = runner.run()
    except KeyboardInterrupt:
        if runner.result:
            print(render_markdown(runner.result))
            print(f"batch report: {runner.report_url}")
        raise
    print()
    print(render_markdown(result))
    print(f"batch report: {runner.report_url}")
    # Failures of this run only: rows kept from an earlier run (--only) do not count.
    return 1 if any(r["status"] == FAILED and not r.get("previous")
                    for r in result["entries"]) else 0


def add_commands(sub) -> None:
    import argparse

    b = sub.add_parser(
        "batch", help="run a batch file's entries (model × config) into one store",
        description="Run every entry of a batch file — a run config with its own overrides "
        "— one after another into one store, on one Ray. Entries share the store's stage "
        "cache (a model trained for one entry is a cache hit for the next; a rerun finds "
        "completed entries cached). Every entry's config is validated before anything runs. "
        "A failing entry is recorded and the batch goes on. Writes each entry's report under "
        "batches/NAME/ENTRY/ and batches/NAME/batch.json and batch.md in the store.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(b)
    b.set_defaults(func=cmd_batch)
