"""Resume inside a stage: per-unit completion records of a stage folder being written.

A stage that does its work in independent units (the Hessian's (partition, group) tasks)
records each finished unit in `units/<unit>.json`: the stage and key it belongs to, the sha256
and size of every file the unit wrote, and the unit's own small results (`fields`). The
record is written after the unit's outputs, atomically, so a record that exists names files
that were complete when it was written.

A run killed inside such a stage leaves its folder without a manifest. The driver keeps that
folder for the rerun (same key), minus everything that is neither a record nor a file a
record lists (`keep_recorded`); the stage asks `Units.done(unit)` before each unit and skips
those that verify. A record is read from the store, so it is untrusted like a manifest: one
that is not a small regular file, does not parse under the schema, names another stage or key,
or lists a file whose bytes no longer hash to it is not believed (a warning says why, the
record is removed, and the unit is computed again).

A record also says which attempt of its Ray task wrote it (`attempt`: 0 the first time, 1 after
Ray retried the task once because its worker was killed), so a stage can report how many unit
executions its units cost (`retried` in its metrics; benchmarks/stream_faults.py counts them).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import re
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pipeline.manifest import check_output_name
from pipeline.store import ArtifactError, StageDir, first_mismatch

__all__ = ["UNITS_DIR", "MAX_RECORD_BYTES", "Units", "UnitRecord", "keep_recorded"]

log = logging.getLogger("hwq")

UNITS_DIR = "units"
# A record is a few hundred bytes; one far larger is not a record (and is not parsed).
MAX_RECORD_BYTES = 1 << 20
_UNIT = re.compile(r"[A-Za-z0-9._-]{1,200}")


def check_unit_name(unit: str) -> str:
    """A unit name: letters, digits, '.', '_', '-' (no slash), not '.'/'..', no temp name."""
    if (
        not isinstance(unit, str)
        or not _UNIT.fullmatch(unit)
        or unit in (".", "..")
        or ".tmp-" in unit
    ):
        raise ValueError(f"unit name {unit!r} is not plain ([A-Za-z0-9._-]+, no slash)")
    return unit


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class UnitOutput(_Strict):
    bytes: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class UnitRecord(_Strict):
    unit: str
    stage: str
    key: str
    outputs: dict[str, UnitOutput]
    fields: dict[str, Any] = Field(default_factory=dict)
    # Ray's attempt number of the task that wrote the record (0: not retried); records
    # written before this field existed read as 0.
    attempt: int = Field(default=0, ge=0)

    @field_validator("unit")
    @classmethod
    def _unit(cls, v: str) -> str:
        return check_unit_name(v)

    @field_validator("outputs")
    @classmethod
    def _names(cls, v: dict[str, UnitOutput]) -> dict[str, UnitOutput]:
        for name in v:
            _check_unit_output(name)
        return v


def _check_unit_output(name: str) -> str:
    """An output of a unit: a plain name in the stage folder, not a record, not the manifest."""
    check_output_name(name)
    if name.split("/", 1)[0] == UNITS_DIR:
        raise ValueError(f"output name {name!r} is inside {UNITS_DIR}/, where only records go")
    return name


class Units:
    """Per-unit completion records of one stage folder being written (units/<unit>.json).

    Picklable (hand it to Ray tasks); each copy counts its own calls in `summary()`.
    """

    def __init__(self, sd: StageDir) -> None:
        self.sd = sd
        self._reused: set[str] = set()
        self._computed: set[str] = set()

    def _rel(self, unit: str) -> str:
        return f"{UNITS_DIR}/{check_unit_name(unit)}.json"

    def done(
        self,
        unit: str,
        outputs: list[str] | None = None,
        check: Callable[[dict], str | None] | None = None,
    ) -> dict | None:
        """The unit's record if units/<unit>.json exists, is a regular small file, parses
        under `UnitRecord`, names this stage, key and unit, lists exactly `outputs` (the files
        the unit writes, when the caller knows them: a record naming another unit's file,
        however well it hashes, is a lie), `check(fields)` finds nothing wrong with its
        fields (returns why not, else None), and every output it lists hashes to its
        recorded size and sha256; else None. A record that existed but failed is logged (why)
        and removed: the unit is then recomputed. ValueError: `unit` not plain."""
        rel = self._rel(unit)
        rec, why = self._read(unit)
        if rec is not None and outputs is not None and set(rec["outputs"]) != set(outputs):
            rec, why = None, (f"it lists {sorted(rec['outputs'])[:3]}, not the unit's own "
                              f"output{'s' if len(outputs) != 1 else ''} {sorted(outputs)}")
        if rec is not None and check is not None:
            bad = check(rec["fields"])
            if bad is not None:
                rec, why = None, f"its fields are not the unit's: {bad}"
        if rec is not None:
            why = self._verify_outputs(rec)
        if why is None and rec is not None:
            self._reused.add(unit)
            return rec
        if why is not None:
            log.warning(
                "%s: unit %s: record %s is not used (%s); recomputing the unit",
                self.sd.name,
                unit,
                self.sd.url(rel),
                why,
            )
            with contextlib.suppress(Exception):  # best effort: the unit is recomputed anyway
                self.sd.store.remove(self.sd.rel(rel))
        return None

    def record(self, unit: str, outputs: list[str], **fields: Any) -> dict:
        """After the unit's output files (names relative to the stage folder) are written:
        hash them, write units/<unit>.json atomically (after the outputs), return the record.
        fields: the unit's small JSON-able results (e.g. a sample count), kept in `fields`.
        The record's `attempt` is the calling Ray task's attempt number (0 outside Ray)."""
        from pipeline.executor import task_attempt

        rel = self._rel(unit)
        digests = {}
        for name in outputs:
            _check_unit_output(name)
            try:
                sha, n = self.sd.store.sha256(self.sd.rel(name))
            except OSError:
                raise ArtifactError(
                    f"unit {unit}: output {self.sd.url(name)} is missing or not "
                    "a regular file; write it before recording the unit"
                ) from None
            digests[name] = {"bytes": n, "sha256": sha}
        rec = {
            "unit": unit,
            "stage": self.sd.name,
            "key": self.sd.key,
            "outputs": digests,
            "fields": fields,
            "attempt": task_attempt(),
        }
        data = (json.dumps(rec, indent=1, sort_keys=True, allow_nan=False) + "\n").encode()
        if len(data) > MAX_RECORD_BYTES:
            raise ValueError(
                f"unit {unit}: record of {len(data):,} bytes is over "
                f"{MAX_RECORD_BYTES:,}; keep large results in output files"
            )
        self.sd.store.write_bytes(self.sd.rel(rel), data)
        self._computed.add(unit)
        self._reused.discard(unit)
        return rec

    def summary(self) -> dict:
        """{"total", "reused", "computed"} of this object's calls: units whose `done` returned
        a record, units it recorded (records written by copies of it in Ray tasks are
        counted there, not here)."""
        return {
            "total": len(self._reused) + len(self._computed),
            "reused": len(self._reused),
            "computed": len(self._computed),
        }

    # -- reading ------------------------------------------------------------------------
    def _read(self, unit: str) -> tuple[dict | None, str | None]:
        """(the record, None) if units/<unit>.json parses for this stage, key and unit;
        (None, None) if there is none; (None, why) if there is one that does not."""
        rel = self.sd.rel(self._rel(unit))
        try:
            data = self.sd.store.read_bytes(rel, MAX_RECORD_BYTES)
        except ArtifactError as e:
            return (None, None) if "does not exist" in str(e) else (None, _reason(e))
        except OSError as e:  # the store failed to read it: not believed, recomputed
            return None, f"unreadable ({type(e).__name__})"
        try:
            raw = json.loads(data)
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
            return None, f"not JSON ({type(e).__name__})"
        try:
            rec = UnitRecord.model_validate(raw)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "(top level)"
            return None, f"does not match the record schema: {where}: {err['msg']}"
        if (rec.stage, rec.key, rec.unit) != (self.sd.name, self.sd.key, unit):
            return None, (
                f"it is the record of {rec.stage}-{rec.key} unit {rec.unit}, not "
                f"{self.sd.name}-{self.sd.key} unit {unit}"
            )
        return rec.model_dump(), None

    def _verify_outputs(self, rec: dict) -> str | None:
        bad = first_mismatch(self.sd.store, self.sd.prefix, rec["outputs"])
        if bad is None:
            return None
        name, why = bad
        return (f"its output {name} "
                f"{'does not match the recorded size and sha256' if why == 'differs' else why}")


def _reason(e: ArtifactError) -> str:
    text = str(e)
    if "regular" in text:
        return "not a regular file"
    if "larger than" in text:
        return f"larger than {MAX_RECORD_BYTES:,} bytes, more than any record"
    return text


def keep_recorded(sd: StageDir) -> int:
    """Before a stage resumes in its folder (same key, no valid manifest): remove every file
    except the unit records that parse for this stage and key and the files they list
    (hashes are checked later, by `Units.done`). Stale temporary files, the leftovers of a
    killed unit, an old manifest: all go, so the new manifest lists only what this attempt
    made or verified. A folder with no record is removed whole. Returns the records kept."""
    store = sd.store
    rels = _all_files(sd)
    units = Units(sd)
    keep: set[str] = set()
    for r in rels:
        parent, _, base = r.rpartition("/")
        if parent != UNITS_DIR or not base.endswith(".json") or ".tmp-" in base:
            continue
        unit = base[: -len(".json")]
        if not _UNIT.fullmatch(unit) or unit in (".", ".."):
            continue
        rec, why = units._read(unit)
        if rec is None:
            log.warning("%s: record %s is not used (%s)", sd.name, sd.url(r), why)
            continue
        keep.add(r)
        keep.update(rec["outputs"])
    kept = sum(1 for r in keep if r.startswith(f"{UNITS_DIR}/"))
    if not kept:
        store.remove(sd.prefix)
        return 0
    _remove_except(sd, keep)
    return kept


def _all_files(sd: StageDir) -> list[str]:
    """Every name under the stage folder (temporary files included), relative to it; on a
    local folder links are listed, never followed."""
    store = sd.store
    base = store.path(sd.prefix)
    if store.is_local:
        out = []
        for d, dirs, files in os.walk(base, followlinks=False):
            rel = posixpath.relpath(d, base) if d != base else ""
            out += [posixpath.join(rel, f) if rel else f for f in files]
            # os.walk lists a link to a folder among `dirs` and does not enter it.
            out += [
                posixpath.join(rel, x) if rel else x
                for x in dirs
                if os.path.islink(os.path.join(d, x))
            ]
        return sorted(out)
    with contextlib.suppress(AttributeError):
        store.fs.invalidate_cache(base)  # Ray workers wrote here
    try:
        return sorted(posixpath.relpath(p, base) for p in store.fs.find(base))
    except FileNotFoundError:
        return []


def _remove_except(sd: StageDir, keep: set[str]) -> None:
    store = sd.store
    drop = [r for r in _all_files(sd) if r not in keep]
    if not drop:
        return
    if store.is_local:  # unlink, never follow: a link's target is outside the store
        for r in drop:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(store.path(sd.rel(r)))
        # Folders left empty (one may stand where a unit's output file must be written).
        for d, _, _ in os.walk(store.path(sd.prefix), topdown=False, followlinks=False):
            with contextlib.suppress(OSError):
                os.rmdir(d)  # fails, as it should, on a folder that still holds a file
    else:
        store.fs.rm([store.path(sd.rel(r)) for r in drop])
