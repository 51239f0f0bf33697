"""`hwq batch`: validation before anything runs, one store, failures recorded and the batch
going on, cache hits on a rerun, the batch report; synthetic stages in process, and one real
quick LeNet-5 batch through the command line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.batch import load_batch, run_batch
from pipeline.config import ConfigError
from pipeline.error_lines import error_line
from tests.test_driver import CALLS, _mk

ROOT = Path(__file__).resolve().parents[1]
LENET = str(ROOT / "configs/lenet5_fmnist.yaml")


class PanicException(BaseException):
    """What pyo3 raises for a Rust panic (tokenizers on a regex it cannot run): not an
    Exception."""


def _quantize_that_fails_on_tol():
    """The synthetic quantize stage, failing for one entry's setting: tol=0.5 raises the
    FileExistsError that once aborted a whole batch, tol=0.25 a Ctrl-C, tol=0.125 a panic."""
    base = _mk("quantize", ("prune", "hessian"), lambda c: {"q": c.quantize.model_dump()})

    def body(ctx):
        if ctx.cfg.quantize.tol == 0.5:
            CALLS.append("quantize")
            raise FileExistsError(17, "File exists", "/store/stages/quantize-x/tmp")
        if ctx.cfg.quantize.tol == 0.25:
            raise KeyboardInterrupt
        if ctx.cfg.quantize.tol == 0.125:
            raise PanicException("called `Result::unwrap()` on an `Err` value\nmore")
        return base.run(ctx)

    return type(base)(name=base.name, version=base.version, inputs=base.inputs,
                      sections=base.sections, run=body, headline=base.headline)


def _stages():
    return [
        _mk("train", (), lambda c: {"train": c.train.model_dump(), "seed": c.seed}),
        _mk("prune", ("train",), lambda c: {"prune": c.prune.model_dump()}),
        _mk("hessian", ("prune",), lambda c: {"hessian": c.hessian.model_dump()}),
        _quantize_that_fails_on_tol(),
    ]


def _batch(tmp_path, data, name="nightly.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


def _errors(path, **kw) -> str:
    with pytest.raises(ConfigError) as e:
        load_batch(path, stages=_stages(), **kw)
    return str(e.value)


def test_invalid_batches_are_refused_with_the_entry_and_key_named(tmp_path):
    store = tmp_path / "store"
    ok = {"name": "a", "config": LENET}
    msg = _errors(_batch(tmp_path, {"entrys": [ok]}))
    assert "entrys: unknown key; did you mean 'entries'?" in msg
    msg = _errors(_batch(tmp_path, {"entries": [ok, {"name": "b", "config": LENET,
                                                     "sett": ["quantize.k=4"]}]}))
    assert "entry 2 ('b'): sett: unknown key; did you mean 'set'?" in msg
    msg = _errors(_batch(tmp_path, {"entries": [ok, {"name": "x", "config": LENET}, ok]}))
    assert "entry 3: name 'a' is already entry 1's" in msg
    msg = _errors(_batch(tmp_path, {"entries": [{"name": "../up", "config": LENET}]}))
    assert "entry 1: name '../up'" in msg
    msg = _errors(_batch(tmp_path, {"entries": [{"config": "nope.yaml"}]}))
    assert "entry 1 ('nope-1'): config 'nope.yaml' not found" in msg and str(tmp_path) in msg
    msg = _errors(_batch(tmp_path, {"entries": [{"config": LENET, "set": ["store.url=/x"]}]}))
    assert "one store" in msg
    msg = _errors(_batch(tmp_path, {"entries": [{"config": LENET, "force": ["qantize"]}]}))
    assert "force 'qantize': not a stage" in msg
    msg = _errors(_batch(tmp_path, {"entries": [ok]}), only=["b"])
    assert "--only b: no such entry (entries: a)" in msg
    msg = _errors(Path(LENET))
    assert "is a run config, not a batch file" in msg
    # A typo in the last entry's overrides is found before the first entry runs, along with
    # every other problem, one line each.
    bad = _batch(tmp_path, {"name": "t", "store": str(store), "entries": [
        ok, {"name": "b", "config": LENET},
        {"name": "c", "config": LENET, "set": ["quantize.metod=ecsq"]},
        {"name": "d", "config": LENET, "set": ["prune.keep={fc9.weight: 0.1}"]}]})
    msg = _errors(bad)
    lines = msg.splitlines()
    assert len(lines) == 2
    assert "entry 3 ('c'): invalid config: quantize.metod: unknown key; did you mean 'method'?" \
        in lines[0]
    assert "entry 4 ('d'): prune.keep: 'fc9.weight' is not a parameter" in lines[1]
    CALLS.clear()
    with pytest.raises(ConfigError):
        run_batch(bad, stages=_stages())
    assert CALLS == [] and not store.exists()


def test_only_validates_the_entries_it_names_and_an_unknown_one_at_once(tmp_path,
                                                                         monkeypatch):
    import pipeline.driver

    path = _batch(tmp_path, {"entries": [
        {"name": "a", "config": LENET},
        {"name": "typo", "config": LENET, "set": ["quantize.metod=ecsq"]},
        {"name": "badkeep", "config": LENET, "set": ["prune.keep={fc9.weight: 0.1}"]},
        {"name": "gone", "config": "nope.yaml"}]})
    b = load_batch(path, stages=_stages(), only=["a"])
    assert [e.name for e in b.entries] == ["a"]
    assert [e.name for e in b.all_entries] == ["a", "typo", "badkeep", "gone"]
    # An unknown --only name: refused before any entry's config is read or checked.
    checked = []
    monkeypatch.setattr(pipeline.driver, "check_against_model", checked.append)
    many = _batch(tmp_path, {"entries": [{"config": LENET} for _ in range(50)]}, "many.yaml")
    msg = _errors(many, only=["nope"])
    assert msg.startswith("--only nope: no such entry (entries: lenet5_fmnist-1, ")
    assert "(50 in all)" in msg and len(msg) < 600 and checked == []


def test_a_batch_hashes_each_model_folder_once(tmp_path, monkeypatch):
    from pipeline import digests
    from testkit.models import tiny_llama_folder, write_corpus

    tiny_llama_folder(tmp_path / "llama")
    write_corpus(tmp_path / "calib.txt", 50, 1)
    cfg = tmp_path / "lm.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": {"name": "hf_causal_lm", "path": str(tmp_path / "llama")},
        "data": {"name": "text", "calibration": [str(tmp_path / "calib.txt")],
                 "eval": {"a": str(tmp_path / "calib.txt")}},
        "quantize": {"scope": "channel", "method": "ecsq"}}))
    hashed = []
    real = digests._hash_now
    monkeypatch.setattr(digests, "_hash_now", lambda paths: hashed.append(paths) or real(paths))
    path = _batch(tmp_path, {"entries": [
        {"config": str(cfg), "set": [f"quantize.target_bits={b}"]} for b in (2, 3, 4)]})
    b = load_batch(path)
    assert len(b.entries) == 3 and len(hashed) == 1
    with digests.memoized_digests(b.digests):  # as the batch's runs plan
        from pipeline.models.stage import source_digest

        first = source_digest(b.entries[0].cfg)["model"]
        assert len(hashed) == 1
        # A rewritten file (even with its size and mtime put back) is hashed again.
        weights = next((tmp_path / "llama").glob("*.safetensors"))
        st = weights.stat()
        data = bytearray(weights.read_bytes())
        data[-1] ^= 1
        weights.write_bytes(bytes(data))
        os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert source_digest(b.entries[0].cfg)["model"] != first and len(hashed) == 2


def test_a_library_panic_fails_its_entry_and_the_batch_goes_on(ray_local, tmp_path):
    path = _batch(tmp_path, {"store": str(tmp_path / "store"), "entries": [
        {"name": "panics", "config": LENET, "set": ["quantize.tol=0.125"]},
        {"name": "good", "config": LENET}]})
    res = run_batch(path, stages=_stages())
    panics, good = res["entries"]
    assert panics["status"] == "failed" and "PanicException" in panics["error"]
    assert "\n" not in panics["error"] and good["status"] == "ok"


def test_a_failed_entry_is_recorded_the_rest_run_and_a_rerun_is_cached(ray_local, tmp_path):
    store = tmp_path / "store"
    path = _batch(tmp_path, {"store": str(store), "entries": [
        {"name": "bad", "config": LENET, "set": ["quantize.tol=0.5"]},
        {"name": "good", "config": LENET}]})
    CALLS.clear()
    res = run_batch(path, stages=_stages())
    assert CALLS == ["train", "prune", "hessian", "quantize", "quantize"]
    saved = json.loads((store / "batches/nightly/batch.json").read_text())
    assert saved == res and saved["state"] == "complete"
    bad, good = saved["entries"]
    assert bad["status"] == "failed" and bad["error"].startswith("FileExistsError:")
    assert "Traceback" in (store / bad["error_file"]).read_text()
    assert good["status"] == "ok" and good["stages_ran"] == 1 and good["stages_cached"] == 3
    assert good["metric"] == {"name": "accuracy", "direction": "higher"}
    assert (store / good["report"]).exists() and not (store / bad["report"]).exists()
    assert saved["totals"]["ok"] == 1 and saved["totals"]["failed"] == 1
    md = (store / "batches/nightly/batch.md").read_text()
    assert "| bad |" in md and "| failed |" in md and "FileExistsError" in md
    # Rerun: the good entry is all cache hits, the bad one fails again (nothing else runs).
    CALLS.clear()
    again = run_batch(path, stages=_stages())
    assert CALLS == ["quantize"]
    assert [e["status"] for e in again["entries"]] == ["failed", "cached"]
    # --only: the other entry keeps its earlier row in the report.
    only = run_batch(path, stages=_stages(), only=["good"])
    assert [(e["status"], e.get("previous", False)) for e in only["entries"]] == \
        [("failed", True), ("cached", False)]


def test_set_passes_through_and_same_file_names_do_not_collide(ray_local, tmp_path):
    for sub, q in (("a", "uniform"), ("b", "ecsq")):
        (tmp_path / sub).mkdir()
        cfg = yaml.safe_load(Path(LENET).read_text())
        cfg["quantize"] = {"method": q}
        (tmp_path / sub / "run.yaml").write_text(yaml.safe_dump(cfg))
    path = _batch(tmp_path, {"name": "same", "set": ["finetune.epochs=0.5"],
                             "entries": [{"config": "a/run.yaml"}, {"config": "b/run.yaml"}]})
    store = tmp_path / "store"
    res = run_batch(path, stages=_stages(), store=str(store), sets=["hessian.n_samples=3"])
    assert [e["name"] for e in res["entries"]] == ["run-1", "run-2"]
    assert all(e["status"] == "ok" for e in res["entries"])
    for name, method in (("run-1", "uniform"), ("run-2", "ecsq")):
        cfg = yaml.safe_load((store / f"batches/same/{name}/config.yaml").read_text())
        assert cfg["quantize"]["method"] == method
        assert cfg["hessian"]["n_samples"] == 3 and cfg["finetune"]["epochs"] == 0.5
        assert cfg["store"]["url"] == str(store)


def test_ctrl_c_stops_the_batch_and_leaves_a_truthful_report(ray_local, tmp_path):
    store = tmp_path / "store"
    path = _batch(tmp_path, {"name": "k", "store": str(store), "entries": [
        {"name": "one", "config": LENET},
        {"name": "two", "config": LENET, "set": ["quantize.tol=0.25"]},
        {"name": "three", "config": LENET, "set": ["quantize.tol=0.1"]}]})
    with pytest.raises(KeyboardInterrupt):
        run_batch(path, stages=_stages())
    saved = json.loads((store / "batches/k/batch.json").read_text())
    assert saved["state"] == "interrupted"
    assert [e["status"] for e in saved["entries"]] == ["ok", "interrupted", "not run"]


def test_error_lines_unwrap_ray_task_errors(ray_local):
    import ray

    from pipeline.data import DatasetMissing

    @ray.remote
    def boom():
        raise DatasetMissing("Fashion-MNIST file x not found in '/nowhere'.")

    with pytest.raises(Exception) as e:
        ray.get(boom.remote())
    assert error_line(e.value) == "Fashion-MNIST file x not found in '/nowhere'."
    assert error_line(RuntimeError("a\n  b")) == "RuntimeError: a; b"


def test_job_entrypoint_joins_the_cluster_of_a_submitted_job(monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("jobs_batch", ROOT / "jobs/batch.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert mod._argv(["b.yaml"]) == ["b.yaml"]
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    assert mod._argv(["b.yaml"]) == ["b.yaml", "--ray-address", "auto"]
    assert mod._argv(["b.yaml", "--ray-address=ray://h:10001"]) == \
        ["b.yaml", "--ray-address=ray://h:10001"]


# The real thing, small (the quick settings of the end-to-end tests): one entry runs LeNet-5
# (encode computed, its upstream stages shared with the suite's quick run), the other cannot
# find its data and fails inside a Ray task.
QUICK = ["data.train_samples=3000", "train.epochs=2", "prune.steps=1",
         "prune.retrain_epochs=1", "hessian.calibration_samples=512", "finetune.epochs=0.2"]


def _hwq_batch(*args):
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "batch", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow  # minutes: `make test-slow`, not `make test`
def test_cli_batch_end_to_end_on_lenet(tmp_path, quick_run):
    from pipeline.store import Store
    from testkit.faults import seed_store

    store = tmp_path / "store"
    # The suite's quick run already computed this config's stages up to fine-tuning: seed the
    # store with them (what a store shared with earlier runs holds); the entry computes encode.
    ref = Store(str(quick_run[0]), create=False)
    stages = ref.read_json("report.json")["stages"]
    seed_store(ref, Store(str(store)), {n: stages[n]["key"] for n in
                                        ("train", "prune", "hessian", "quantize", "finetune")})
    path = _batch(tmp_path, {"name": "e2e", "entries": [
        {"name": "quick", "config": LENET},
        {"name": "nodata", "config": LENET, "set": [f"data.root={tmp_path / 'none'}"]}]})
    sets = [a for s in QUICK for a in ("--set", s)]
    p = _hwq_batch(str(path), "--store", str(store), *sets)
    assert p.returncode == 1, p.stderr[-4000:]
    assert "| quick |" in p.stdout and f"batch report: {store}/batches/e2e/batch.md" in p.stdout
    res = json.loads((store / "batches/e2e/batch.json").read_text())
    quick, nodata = res["entries"]
    assert nodata["status"] == "failed" and "dataset-fashion-mnist" in nodata["error"]
    assert quick["status"] == "ok" and quick["stages_ran"] == 1  # encode; the rest cached
    assert 0.5 < quick["baseline"] <= 1 and quick["result_stage"] == "decoded"
    assert 0.5 < quick["result"] <= 1
    assert quick["compression_ratio"] > 10 and 0 < quick["bits_per_weight"] < 3.2
    cfg = yaml.safe_load((store / "batches/e2e/quick/config.yaml").read_text())
    assert cfg["data"]["train_samples"] == 3000  # --set reached the entry
    # Rerun: the completed entry is cache hits; the broken one still fails, alone.
    p = _hwq_batch(str(path), "--store", str(store), *sets)
    assert p.returncode == 1, p.stderr[-4000:]
    res = json.loads((store / "batches/e2e/batch.json").read_text())
    assert [e["status"] for e in res["entries"]] == ["cached", "failed"]
    assert res["entries"][0]["result"] == quick["result"]
