"""A manifest is untrusted input: only one that validates and covers every file completes a
stage. Anything else is recomputed, never a cache hit and never a traceback."""

import json

import pytest

from pipeline.manifest import ManifestInvalid, parse_manifest
from pipeline.store import ArtifactError, StageDir, Store
from tests.test_driver import CALLS, synthetic_run


@pytest.fixture
def setup(tmp_path):
    return synthetic_run(tmp_path)


def _edit(store, folder, fn):
    m = store.read_json(f"{folder}/manifest.json")
    fn(m)
    store.write_json(f"{folder}/manifest.json", m)


def _expect_recompute(go, store, folder):
    go()
    assert CALLS == ["prune", "hessian", "quantize"]
    # ... and the recomputed stage is whole again: the next run is all cache hits.
    go()
    assert CALLS == []
    assert store.read_json(f"{folder}/out.json") == {"value": 2}


def test_empty_outputs_do_not_switch_verification_off(setup):
    go, store, folder = setup
    _edit(store, folder, lambda m: m.update(outputs={}))
    store.write_json(f"{folder}/out.json", {"value": 999})  # the flipped artifact
    _expect_recompute(go, store, folder)


@pytest.mark.parametrize("broken", [
    lambda m: m.pop("timings"),
    lambda m: m.pop("outputs"),
    lambda m: m.update(timings={"seconds": "fast"}),
    lambda m: m.update(outputs={"out.json": {"sha256": "x", "bytes": 3}}),
    lambda m: m.update(outputs={"../../etc/passwd": {"sha256": "0" * 64, "bytes": 1}}),
    lambda m: m.update(stage="train"),
    lambda m: m.update(key="0" * 16),
    lambda m: m.update(format_version=99),
    lambda m: m.update(inputs={}),
    lambda m: m.update(surprise=1),
    lambda m: m["outputs"].pop("partial.json"),  # a file in the folder the manifest omits
], ids=["no-timings", "no-outputs", "bad-timings", "bad-digest", "traversal-name",
        "other-stage", "other-key", "other-version", "other-inputs", "unknown-key",
        "unlisted-file"])
def test_invalid_manifest_makes_the_stage_incomplete(setup, broken):
    go, store, folder = setup
    _edit(store, folder, broken)
    _expect_recompute(go, store, folder)


@pytest.mark.parametrize("data", [b"", b"not json", b"[]", b"null", b"{" * 100_000, b"[" * 100_000,
                                  b"{\"a\": NaN}"])
def test_unparseable_manifest_makes_the_stage_incomplete(setup, data):
    go, store, folder = setup
    store.write_bytes(f"{folder}/manifest.json", data)
    _expect_recompute(go, store, folder)


def test_schema_checks_required_outputs():
    m = {"stage": "s", "key": "0123456789abcdef", "format_version": 1, "config": {},
         "config_digest": "x", "inputs": {}, "metrics": {},
         "timings": {"started": 1.0, "seconds": 2.0}, "versions": {},
         "outputs": {"a.bin": {"sha256": "a" * 64, "bytes": 1}}}
    ok = parse_manifest(json.dumps(m).encode(), stage="s", key="0123456789abcdef", version=1,
                        inputs={}, required=("a.bin",))
    assert set(ok.outputs) == {"a.bin"}
    with pytest.raises(ManifestInvalid, match="does not list b.bin"):
        parse_manifest(json.dumps(m).encode(), stage="s", key="0123456789abcdef", version=1,
                       inputs={}, required=("a.bin", "b.bin"))


def test_a_verified_folder_refuses_files_its_manifest_does_not_list(tmp_path):
    store = Store(str(tmp_path))
    sd = StageDir(store, "demo", "k", outputs={})
    sd.store.write_json(sd.rel("x.json"), {"a": 1})
    with pytest.raises(ArtifactError, match="not listed"):
        sd.read_json("x.json")
    assert sd.verify() == "the manifest lists no outputs"


@pytest.mark.parametrize("index", [b"[]", b'{"stages": 5}', b'{"stages": [["../../x", "0123456789abcdef"]]}',
                                   b'{"stages": [[1, 2]]}', b"\xff\xfe", b"{"])
def test_status_refuses_a_forged_run_index_with_one_message(setup, index):
    from pipeline.driver import status

    _, store, _ = setup
    store.write_bytes("run.json", index)
    with pytest.raises(ArtifactError, match="run.json"):
        status(store)


def test_status_tolerates_a_forged_report(setup):
    from pipeline.driver import status

    _, store, _ = setup
    store.write_bytes("report.json", b'{"stages": {"prune": 7}}')
    rows = status(store)
    assert [r["stage"] for r in rows] == ["train", "prune", "hessian", "quantize"]
