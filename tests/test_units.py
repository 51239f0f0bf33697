"""Unit records (pipeline/units.py): a finished unit is reused only if its record and every
file it lists still verify; anything else is recomputed with a warning, never a traceback."""

import json
import logging
import os
import pickle

import pytest

from pipeline.store import ArtifactError, StageDir, Store
from pipeline.units import MAX_RECORD_BYTES, UNITS_DIR, Units, keep_recorded


@pytest.fixture
def local(tmp_path):
    return Store(str(tmp_path / "root"))


def _unit(sd: StageDir, unit: str, data: bytes = b"partial sums", **fields) -> dict:
    """Write the unit's output, then record it (the order a stage uses)."""
    sd.write_bytes(f"partials/{unit}.bin", data)
    return Units(sd).record(unit, [f"partials/{unit}.bin"], **fields)


def _warned(caplog, *words: str) -> bool:
    return any(
        all(w in r.getMessage() for w in words) and r.levelno == logging.WARNING
        for r in caplog.records
    )


def test_recorded_unit_is_done_and_counted(store):
    sd = StageDir(store, "hessian", "k1")
    units = Units(sd)
    assert units.done("p0-g0") is None  # nothing recorded: no warning either
    sd.write_bytes("partials/p0-g0.bin", b"abc")
    rec = units.record("p0-g0", ["partials/p0-g0.bin"], n=64)
    assert rec["outputs"]["partials/p0-g0.bin"]["bytes"] == 3
    assert rec["fields"] == {"n": 64} and rec["stage"] == "hessian" and rec["key"] == "k1"
    assert sd.exists(f"{UNITS_DIR}/p0-g0.json")
    # A fresh object (a rerun, or a copy pickled into a Ray task) finds it.
    again = pickle.loads(pickle.dumps(Units(sd)))
    assert again.done("p0-g0") == rec
    assert again.done("p0-g1") is None
    assert units.summary() == {"total": 1, "reused": 0, "computed": 1}
    assert again.summary() == {"total": 1, "reused": 1, "computed": 0}


def test_tampered_output_is_recomputed_with_a_warning(store, caplog):
    sd = StageDir(store, "hessian", "k2")
    _unit(sd, "p0-g0")
    sd.write_bytes("partials/p0-g0.bin", b"partial sumz")  # same size, other bytes
    assert Units(sd).done("p0-g0") is None
    assert _warned(caplog, "p0-g0", "does not match")
    assert not sd.exists(f"{UNITS_DIR}/p0-g0.json")  # a failed record is not read again
    _unit(sd, "p1-g0")
    sd.write_bytes("partials/p1-g0.bin", b"cut")  # truncated
    assert Units(sd).done("p1-g0") is None
    _unit(sd, "p2-g0")
    store.remove(sd.rel("partials/p2-g0.bin"))
    assert Units(sd).done("p2-g0") is None
    assert _warned(caplog, "p2-g0", "missing")


def test_record_says_which_attempt_wrote_it(local):
    """Outside a Ray task a record is attempt 0; a record from before the field existed (no
    `attempt`) is still reused, and reads as attempt 0."""
    sd = StageDir(local, "hessian", "k5")
    rec = _unit(sd, "u")
    assert rec["attempt"] == 0
    del rec["attempt"]
    sd.write_bytes(f"{UNITS_DIR}/u.json", json.dumps(rec).encode())
    assert Units(sd).done("u")["attempt"] == 0


@pytest.mark.parametrize("edit,why", [
    (lambda r: r["outputs"]["partials/u.bin"].update(sha256="0" * 64), "does not match"),
    (lambda r: r["outputs"]["partials/u.bin"].update(bytes=-1), "schema"),
    (lambda r: r.update(extra=1), "schema"),
    (lambda r: r.update(fields=[1]), "schema"),
    (lambda r: r.update(attempt=-1), "schema"),
    (lambda r: r.update(unit="../u"), "schema"),
    (lambda r: r.update(unit="v"), "unit v"),
    (lambda r: r.update(stage="quantize"), "quantize-k3"),
    (lambda r: r["outputs"].update({"../escape": r["outputs"]["partials/u.bin"]}), "schema"),
    (lambda r: r["outputs"].update({"units/u.json": r["outputs"]["partials/u.bin"]}), "schema"),
])
def test_tampered_record_is_recomputed_with_a_warning(local, caplog, edit, why):
    sd = StageDir(local, "hessian", "k3")
    rec = _unit(sd, "u")
    edit(rec)
    sd.write_bytes(f"{UNITS_DIR}/u.json", json.dumps(rec).encode())
    assert Units(sd).done("u") is None
    assert _warned(caplog, "unit u", why), [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize(
    "data,why",
    [
        (b"{not json", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "not JSON"),
        (b"[]", "schema"),
        (b"{}", "schema"),
        (b" " * (MAX_RECORD_BYTES + 1), "larger than"),
    ],
)
def test_garbage_or_huge_record_is_recomputed_with_a_warning(local, caplog, data, why):
    sd = StageDir(local, "hessian", "k4")
    _unit(sd, "u")
    sd.write_bytes(f"{UNITS_DIR}/u.json", data)
    assert Units(sd).done("u") is None
    assert _warned(caplog, "unit u", why)


def test_record_of_another_key_is_not_used(store, caplog):
    a, b = StageDir(store, "hessian", "ka"), StageDir(store, "hessian", "kb")
    _unit(a, "u")
    _unit(b, "u")  # same output bytes in b's folder
    store.write_bytes(b.rel(f"{UNITS_DIR}/u.json"), store.read_bytes(a.rel(f"{UNITS_DIR}/u.json")))
    assert Units(b).done("u") is None
    assert _warned(caplog, "hessian-ka", "not hessian-kb")


def test_record_that_is_a_link_or_folder_is_not_used(local, caplog, tmp_path):
    sd = StageDir(local, "hessian", "k5")
    rec = _unit(sd, "u")
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps(rec))
    path = local.path(sd.rel(f"{UNITS_DIR}/u.json"))
    os.remove(path)
    os.symlink(outside, path)
    assert Units(sd).done("u") is None
    assert _warned(caplog, "unit u", "not a regular file")
    assert outside.exists()  # the link was removed, never what it points to
    os.makedirs(path)
    assert Units(sd).done("u") is None


def test_names_that_are_not_plain_are_refused(local):
    sd = StageDir(local, "hessian", "k6")
    units = Units(sd)
    sd.write_bytes("partials/x.bin", b"x")
    for bad in ("a/b", "../a", "", ".", "..", "a b", "a\\b", "a.tmp-1234"):
        with pytest.raises(ValueError, match="not plain"):
            units.record(bad, ["partials/x.bin"])
        with pytest.raises(ValueError, match="not plain"):
            units.done(bad)
    for bad_out in ("../x.bin", "/etc/passwd", "manifest.json", "units/a.json", "a/./b"):
        with pytest.raises(ValueError):
            units.record("u", [bad_out])
    with pytest.raises(ArtifactError, match="write it before recording"):
        units.record("u", ["partials/not-written.bin"])
    assert not sd.exists(f"{UNITS_DIR}/u.json")


def test_keep_recorded_keeps_only_valid_records_and_their_outputs(store):
    sd = StageDir(store, "hessian", "k7")
    _unit(sd, "good")
    _unit(sd, "bad")
    sd.write_bytes(f"{UNITS_DIR}/bad.json", b"{garbage")
    sd.write_bytes("partials/unrecorded.bin", b"a unit killed before its record")
    sd.write_bytes("partials/stray.tmp-deadbeef", b"a killed write")
    sd.write_bytes("manifest.json", b"{}")
    sd.write_bytes("hessian.parquet", b"half a stage")
    assert keep_recorded(sd) == 1
    left = sorted(store.listing(sd.prefix))
    assert left == ["partials/good.bin", f"{UNITS_DIR}/good.json"]
    if store.is_local:  # temporary names are hidden from listings: look at the folder itself
        assert not os.path.exists(store.path(sd.rel("partials/stray.tmp-deadbeef")))
    assert Units(sd).done("good") is not None
    # No record at all: the folder goes whole, as before units existed.
    store.remove(sd.rel(f"{UNITS_DIR}/good.json"))
    assert keep_recorded(sd) == 0
    assert not store.exists(sd.prefix)


def test_keep_recorded_never_follows_a_link(local, tmp_path):
    sd = StageDir(local, "hessian", "k8")
    _unit(sd, "u")
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("not the store's")
    os.symlink(victim, local.path(sd.rel("partials/linked")))
    os.symlink(victim / "keep.txt", local.path(sd.rel("file-link")))
    assert keep_recorded(sd) == 1
    assert (victim / "keep.txt").read_text() == "not the store's"
    assert not os.path.lexists(local.path(sd.rel("partials/linked")))
    assert not os.path.lexists(local.path(sd.rel("file-link")))


def test_a_record_naming_another_units_file_or_fields_is_not_believed(local, caplog):
    """A record is believed only when it lists exactly the files its unit writes and its
    fields pass the stage's check, however well the files it names hash."""
    sd = StageDir(local, "quantize", "k9")
    _unit(sd, "t0", name="a")
    other = _unit(sd, "t1", name="b")
    lie = json.loads(sd.read_bytes(f"{UNITS_DIR}/t0.json"))
    lie["outputs"] = other["outputs"]  # t1's file, its true digest
    sd.write_bytes(f"{UNITS_DIR}/t0.json", json.dumps(lie).encode())
    assert Units(sd).done("t0") is not None  # without the expected outputs: believed
    assert Units(sd).done("t0", ["partials/t0.bin"]) is None
    assert _warned(caplog, "t0", "not the unit's own output")
    assert not sd.exists(f"{UNITS_DIR}/t0.json")  # removed: the unit is recomputed

    def named_b(fields: dict) -> str | None:
        return None if fields.get("name") == "b" else f"it names {fields.get('name')!r}"

    assert Units(sd).done("t1", ["partials/t1.bin"], named_b) is not None
    _unit(sd, "t2", name="a")
    assert Units(sd).done("t2", ["partials/t2.bin"], named_b) is None
    assert _warned(caplog, "t2", "its fields are not the unit's", "'a'")
