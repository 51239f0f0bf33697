"""Special files planted in a local store (links to /dev/zero, FIFOs, folders) and files swapped
after verification: refused with the file's name, never a hang, a MemoryError or a wrong
number."""

import os

import pyarrow as pa
import pytest

from pipeline.driver import status
from pipeline.store import ArtifactError, StageDir, Store
from tests.test_driver import CALLS, synthetic_run

pytestmark = pytest.mark.timeout(60)  # a hang is a failure, not a stuck suite


@pytest.fixture
def setup(tmp_path):
    rerun, store, prune = synthetic_run(tmp_path)
    return rerun, store, tmp_path / "store" / prune


def _plant(path, kind):
    path.unlink() if path.exists() or path.is_symlink() else None
    if kind == "zero":
        path.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "dir":
        path.mkdir()


@pytest.mark.parametrize("kind", ["zero", "fifo", "dir"])
def test_special_manifest_makes_the_stage_incomplete(setup, kind):
    go, store, folder = setup
    _plant(folder / "manifest.json", kind)
    go()
    assert CALLS == ["prune", "hessian", "quantize"]


@pytest.mark.parametrize("kind", ["zero", "fifo", "dir"])
def test_special_artifact_fails_verification_and_is_recomputed(setup, kind):
    go, store, folder = setup
    _plant(folder / "out.json", kind)
    go()
    assert CALLS == ["prune", "hessian", "quantize"]
    assert store.read_json(f"stages/{folder.name}/out.json") == {"value": 2}


@pytest.mark.parametrize("name", ["run.json", "report.json"])
@pytest.mark.parametrize("kind", ["zero", "fifo", "dir"])
def test_status_refuses_special_index_files(setup, name, kind):
    _, store, _ = setup
    _plant(store_path(store) / name, kind)
    if name == "run.json":
        with pytest.raises(ArtifactError, match="run.json"):
            status(store)
    else:  # the report is optional for status: ignored, the stages still listed
        assert len(status(store)) == 4


def store_path(store):
    from pathlib import Path

    return Path(store.root)


def test_a_huge_listed_file_is_not_read_whole(tmp_path):
    store = Store(str(tmp_path))
    sd = StageDir(store, "s", "k")
    sd.write_bytes("a.bin", b"x")
    sd.outputs = sd.hash_outputs()
    with open(store.path(sd.rel("a.bin")), "r+b") as f:
        f.truncate(1 << 40)  # sparse: 1 TiB listed as 1 byte
    with pytest.raises(ArtifactError, match="larger than the manifest"):
        sd.read_bytes("a.bin")
    assert sd.verify() == "a.bin does not match its manifest digest"


def test_a_hessian_swapped_after_verification_is_refused_by_the_filtered_read(tmp_path):
    """The quantize actors read only their tensors' rows: that read is verified too."""
    from pipeline.hessian.stage import TABLE, read_hessian
    from pipeline.hessian.table import to_table

    store = Store(str(tmp_path))
    sd = StageDir(store, "hessian", "h")
    import torch

    h = {"a": torch.ones(4), "b": torch.ones(3)}
    sd.write_table(TABLE, to_table(h, 10))
    sd.outputs = sd.hash_outputs()
    assert read_hessian(sd, {"a": (4,)}, names=["a"])["a"].tolist() == [1, 1, 1, 1]
    forged = to_table({"a": torch.full((4,), 1e6), "b": torch.ones(3)}, 10)
    with store.atomic_open(sd.rel(TABLE)) as f:
        import pyarrow.parquet as pq

        pq.write_table(forged, f)
    with pytest.raises(ArtifactError, match="hessian.parquet"):
        read_hessian(sd, {"a": (4,)}, names=["a"])
    assert isinstance(forged, pa.Table)


@pytest.mark.parametrize("name", [".", " ", "a\nb", "a/./b", "\u202eevil", "a\\b"])
def test_odd_output_names_make_the_manifest_invalid(setup, name):
    go, store, folder = setup
    m = store.read_json(f"stages/{folder.name}/manifest.json")
    m["outputs"][name] = {"sha256": "0" * 64, "bytes": 1}
    store.write_json(f"stages/{folder.name}/manifest.json", m)
    go()
    assert CALLS == ["prune", "hessian", "quantize"]


def test_private_subdir_refuses_a_shared_cache_folder(tmp_path, monkeypatch):
    from pipeline import executor

    monkeypatch.setenv("HWQ_CACHE", str(tmp_path))
    shared = tmp_path / "upload"
    shared.mkdir()
    shared.chmod(0o777)
    got = executor.private_subdir("upload")
    assert got != shared and executor._private_dir(got)
