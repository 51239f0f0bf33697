"""The driver on synthetic stages: cache hits, invalidation, resume, --force."""

import pytest

from pipeline.config import load_config
from pipeline.driver import run, status
from pipeline.graph import Stage, plan
from pipeline.store import Store
from pipeline.units import Units

CALLS: list[str] = []


def _mk(name, inputs, section, crash=None):
    def body(ctx):
        CALLS.append(name)
        upstream = {n: sd.read_json("out.json")["value"] for n, sd in ctx.inputs.items()}
        ctx.out.write_json("partial.json", {"started": True})
        if crash and crash.get(name):
            raise RuntimeError(f"{name} killed")
        value = sum(upstream.values()) + 1
        ctx.out.write_json("out.json", {"value": value})
        return {f"{name}_value": value}

    return Stage(name=name, version=1, inputs=lambda cfg: inputs,
                 sections=section, run=body, headline=(f"{name}_value",))


def _stages(crash=None):
    return [
        _mk("train", (), lambda c: {"train": c.train.model_dump(), "seed": c.seed}, crash),
        _mk("prune", ("train",), lambda c: {"prune": c.prune.model_dump()}, crash),
        _mk("hessian", ("prune",), lambda c: {"hessian": c.hessian.model_dump()}, crash),
        _mk("quantize", ("prune", "hessian"), lambda c: {"q": c.quantize.model_dump()}, crash),
    ]


@pytest.fixture
def cfg(tmp_path):
    return lambda *sets: load_config(
        "configs/lenet5_fmnist.yaml", [f"store.url={tmp_path / 'store'}", *sets])


def _run(cfg, **kw):
    CALLS.clear()
    return run(cfg, stages=_stages(kw.pop("crash", None)), init_executor=False, **kw)


def test_second_run_is_all_cache_hits(cfg):
    r1 = _run(cfg())
    assert CALLS == ["train", "prune", "hessian", "quantize"]
    assert r1["metrics"]["quantize_value"] == 6
    r2 = _run(cfg())
    assert CALLS == []
    assert all(s["cached"] for s in r2["stages"].values())
    assert r2["metrics"] == r1["metrics"]
    assert {s["key"] for s in r1["stages"].values()} == {s["key"] for s in r2["stages"].values()}


def test_changing_one_setting_reruns_that_stage_and_downstream_only(cfg):
    _run(cfg())
    _run(cfg("hessian.n_samples=4"))
    assert CALLS == ["hessian", "quantize"]
    _run(cfg("quantize.target_bits=2"))
    assert CALLS == ["quantize"]
    # Both variants stay in the store: switching back is all hits (a sweep shares them).
    _run(cfg("hessian.n_samples=4"))
    assert CALLS == []


def test_killed_run_resumes_in_the_stage_it_died_in(cfg, tmp_path):
    with pytest.raises(RuntimeError, match="hessian killed"):
        _run(cfg(), crash={"hessian": True})
    assert CALLS == ["train", "prune", "hessian"]
    _run(cfg())
    assert CALLS == ["hessian", "quantize"]


UNIT_CALLS: list[str] = []


def _unit_stages(kill_after=None):
    """train, prune, a `hessian` made of four units (pipeline/units.py), quantize. With
    kill_after=k the run is interrupted (KeyboardInterrupt) once k units were computed."""

    def body(ctx):
        units = Units(ctx.out)
        for i in range(4):
            if units.done(f"u{i}") is None:
                if len(UNIT_CALLS) == kill_after:
                    raise KeyboardInterrupt
                UNIT_CALLS.append(f"u{i}")
                ctx.out.write_json(f"parts/u{i}.json", {"v": i})
                units.record(f"u{i}", [f"parts/u{i}.json"], v=i)
        value = ctx.inputs["prune"].read_json("out.json")["value"] + 1
        ctx.out.write_json("out.json", {"value": value})
        return {"units": units.summary()}

    st = _stages()
    unit_hessian = Stage(name="hessian", version=1, inputs=lambda cfg: ("prune",),
                         sections=lambda c: {"hessian": c.hessian.model_dump()}, run=body)
    return [st[0], st[1], unit_hessian, st[3]]


def _unit_run(cfg, kill_after=None, **kw):
    CALLS.clear()
    UNIT_CALLS.clear()
    return run(cfg, stages=_unit_stages(kill_after), init_executor=False, **kw)


def test_killed_stage_resumes_its_recorded_units_only(cfg, tmp_path):
    """A run killed inside a stage after 2 of its 4 units: the rerun computes the other 2 in
    the same folder; the manifest lists no stale temporary file; --force and recomputed
    inputs start the stage from an empty folder."""
    with pytest.raises(KeyboardInterrupt):
        _unit_run(cfg(), kill_after=2)
    assert UNIT_CALLS == ["u0", "u1"]
    store = Store(str(tmp_path / "store"))
    hp = plan(cfg(), _unit_stages())[2]
    folder = tmp_path / "store" / f"stages/hessian-{hp.key}"
    (folder / "parts" / "u2.json.tmp-deadbeef").write_text("a write the kill cut short")
    (folder / "parts" / "u3.json").write_text("a unit killed before its record")
    _unit_run(cfg())
    assert UNIT_CALLS == ["u2", "u3"] and CALLS == ["quantize"]
    m = store.read_json(f"stages/hessian-{hp.key}/manifest.json")
    assert m["metrics"]["units"] == {"total": 4, "reused": 2, "computed": 2}
    assert not any(".tmp-" in f for f in m["outputs"])
    assert not (folder / "parts" / "u2.json.tmp-deadbeef").exists()
    # The records stay, listed in the manifest like every other file of the folder.
    assert {f"units/u{i}.json" for i in range(4)} <= set(m["outputs"])
    _unit_run(cfg())
    assert UNIT_CALLS == [] and CALLS == []  # complete: a cache hit
    _unit_run(cfg(), force=["hessian"])
    assert UNIT_CALLS == ["u0", "u1", "u2", "u3"]
    # Killed again; then its input is recomputed in the rerun (prune's manifest is gone):
    # same key, but nothing recorded against the old input may be reused.
    with pytest.raises(KeyboardInterrupt):
        _unit_run(cfg(), kill_after=2, force=["hessian"])
    store.remove(f"stages/prune-{plan(cfg(), _unit_stages())[1].key}/manifest.json")
    _unit_run(cfg())
    assert CALLS == ["prune", "quantize"] and UNIT_CALLS == ["u0", "u1", "u2", "u3"]


def test_force_reruns_stage_and_downstream(cfg):
    _run(cfg())
    _run(cfg(), force=["prune"])
    assert CALLS == ["prune", "hessian", "quantize"]
    with pytest.raises(ValueError, match="not a stage of this run"):
        _run(cfg(), force=["nonsense"])


def test_corrupt_cached_artifact_is_recomputed(cfg, tmp_path):
    _run(cfg())
    store = Store(str(tmp_path / "store"))
    key = plan(cfg(), _stages())[1].key
    store.write_json(f"stages/prune-{key}/out.json", {"value": 999})
    _run(cfg())
    assert CALLS == ["prune", "hessian", "quantize"]


def test_status_lists_stages_with_headline(cfg, tmp_path):
    _run(cfg())
    rows = status(Store(str(tmp_path / "store")))
    assert [r["stage"] for r in rows] == ["train", "prune", "hessian", "quantize"]
    assert all(r["complete"] for r in rows)
    assert rows[-1]["metrics"] == {"quantize_value": 6}


def synthetic_run(tmp_path):
    """A completed run of the synthetic stages in tmp_path/store: (rerun, store, the prune
    stage's folder relative to the store). rerun() runs again and leaves the stages it ran in
    CALLS."""
    cfg = load_config("configs/lenet5_fmnist.yaml", [f"store.url={tmp_path / 'store'}"])

    def rerun():
        CALLS.clear()
        return run(cfg, stages=_stages(), init_executor=False)

    rerun()
    return rerun, Store(str(tmp_path / "store")), f"stages/prune-{plan(cfg, _stages())[1].key}"


def test_a_failed_run_is_recorded_and_status_describes_it(cfg, tmp_path, capsys):
    """A run that died in a stage leaves run.json saying so; `hwq status` lists the stages
    that completed, the one that failed and the error (not "holds no hwq run")."""
    from pipeline.cli import main
    from pipeline.driver import run_state

    with pytest.raises(RuntimeError, match="hessian killed"):
        _run(cfg(), crash={"hessian": True})
    store = Store(str(tmp_path / "store"))
    state = run_state(store)
    assert state["status"] == "failed" and state["failed_stage"] == "hessian"
    assert state["error"] == "RuntimeError: hessian killed"
    rows = status(store)
    assert [(r["stage"], r["complete"], r["failed"]) for r in rows] == [
        ("train", True, False), ("prune", True, False), ("hessian", False, True),
        ("quantize", False, False)]
    assert main(["status", str(tmp_path / "store")]) == 0
    out = capsys.readouterr().out
    assert "failed" in out.splitlines()[3]  # the hessian row
    assert "run: failed in stage hessian (2 of 4 stages complete): RuntimeError: hessian " \
           "killed" in out
    _run(cfg())  # the rerun completes: run.json says so
    assert run_state(store)["status"] == "complete"
    assert all(r["complete"] and not r["failed"] for r in status(store))


def test_status_of_a_store_with_stages_but_no_run_json(cfg, tmp_path, capsys):
    """A store whose failed run left no run.json (an older hwq): its stage folders."""
    from pipeline.cli import main

    with pytest.raises(RuntimeError):
        _run(cfg(), crash={"hessian": True})
    (tmp_path / "store" / "run.json").unlink()
    rows = status(Store(str(tmp_path / "store")))
    assert [(r["stage"], r["complete"]) for r in rows] == [("train", True), ("prune", True),
                                                           ("hessian", False)]
    assert main(["status", str(tmp_path / "store")]) == 0
    assert "no run.json" in capsys.readouterr().out


_API_LOGGING = """
import logging, sys
import pipeline.driver
from pipeline.api import compress

def fake_run(cfg, **kw):
    logging.getLogger("hwq").info("[1/1] quantize  done in 1.0 s")
    logging.getLogger("hwq").debug("debug detail")
    return {}

pipeline.driver.run = fake_run
if sys.argv[1] == "configured":  # the CLI's setup (or a caller's): its handler, not ours
    logging.basicConfig(level=logging.INFO, format="ROOT %(message)s")
compress(None)
compress(None)  # a second call adds no second handler
"""


@pytest.mark.parametrize("setup", ["none", "configured"])
def test_the_python_api_shows_progress_without_logging_setup_and_never_twice(setup):
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-c", _API_LOGGING, setup], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if "quantize  done" in ln]
    assert len(lines) == 2, p.stderr  # once per call
    assert all(ln.startswith("ROOT") == (setup == "configured") for ln in lines), lines
    assert "debug detail" not in p.stderr
