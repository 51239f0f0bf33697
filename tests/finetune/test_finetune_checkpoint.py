"""Fine-tune checkpoints read back from the store: no code runs, nothing outside is deleted.

No Ray here: two threads stand in for two workers (their barrier and all-reduce replaced), and
a fake engine saves and loads through DeepSpeed's torch checkpoint engine the way
`engine.save_checkpoint` / `load_checkpoint` do. The real DeepSpeed engines are in
test_finetune_stage.py.
"""

import contextlib
import hashlib
import json
import logging
import os
import pickle
import threading

import pytest
import torch

from pipeline.finetune import checkpoint as ckmod
from pipeline.finetune.checkpoint import (
    CheckpointRejected,
    Checkpoints,
    parse_latest,
    safe_torch_load,
)
from pipeline.store import Store

# Every .pt name DeepSpeed gives a checkpoint file: model states (ZeRO 0-2, and ZeRO-3's per
# rank), ZeRO optimizer partitions (fp32 and bf16), pipeline layers, MoE experts.
DEEPSPEED_NAMES = [
    "mp_rank_00_model_states.pt",
    "zero_pp_rank_0_mp_rank_00_model_states.pt",
    "zero_pp_rank_1_mp_rank_00_model_states.pt",
    "zero_pp_rank_0_mp_rank_00_optim_states.pt",
    "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
    "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
    "layer_00-model_00-model_states.pt",
    "expp_rank_0_mp_rank_00_optim_states.pt",
]


class Planted:
    """A pickle that creates `marker` when unpickled (as the issue's 90-byte file ran a
    command). `os.system` would do the same through the shell; open() needs none."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def planted_files(marker) -> dict[str, bytes]:
    """The issue's raw pickle, and the same payload inside torch.save's zip format."""
    import io

    raw = pickle.dumps(Planted(marker), protocol=2)
    buf = io.BytesIO()
    torch.save({"module": Planted(marker), "step": 2}, buf)
    return {name: (raw if i % 2 == 0 else buf.getvalue())
            for i, name in enumerate(DEEPSPEED_NAMES)}


def plant(store: Store, rel: str, files: dict[str, bytes], tag="step000000002", step=2,
          hashes=True):
    """Write `files` under rel/tag and a latest.json pointing at them (with their true
    hashes: an attacker who can write the files can write latest.json too)."""
    for name, data in files.items():
        store.write_bytes(f"{rel}/{tag}/{name}", data)
    info = {"tag": tag, "step": step}
    if hashes:
        info["files"] = {n: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)}
                         for n, d in files.items()}
    store.write_json(f"{rel}/latest.json", info)


class FakeEngine:
    """Saves/loads one file per rank through DeepSpeed's TorchCheckpointEngine (whose load is
    `torch.load(weights_only=False)`), as engine.save_checkpoint/load_checkpoint do."""

    def __init__(self, rank: int):
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import (
            TorchCheckpointEngine,
        )

        self.rank = rank
        self.checkpoint_engine = TorchCheckpointEngine()

    def _name(self, d, tag):
        return os.path.join(d, tag, f"zero_pp_rank_{self.rank}_mp_rank_00_optim_states.pt")

    def save_checkpoint(self, save_dir, tag, client_state, **_):
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        self.checkpoint_engine.save({"client": client_state, "x": torch.arange(3)},
                                    self._name(save_dir, tag))

    def load_checkpoint(self, load_dir, tag, **_):
        sd = self.checkpoint_engine.load(self._name(load_dir, tag))
        return os.path.join(load_dir, tag), sd["client"]


class TwoWorkers:
    """Runs fn(rank) for ranks 0 and 1 in threads whose barrier and all-reduce meet."""

    def __init__(self, monkeypatch):
        self.bar = threading.Barrier(2)
        self.votes = [True, True]
        monkeypatch.setattr(ckmod, "_barrier", lambda: self.bar.wait(timeout=60))
        monkeypatch.setattr(ckmod, "_all_agree", self._agree)

    def _agree(self, ok, device="cpu"):
        r = threading.current_thread().rank
        self.votes[r] = ok
        self.bar.wait(timeout=60)
        out = all(self.votes)
        self.bar.wait(timeout=60)
        return out

    def run(self, fn):
        out, errors = [None, None], []

        def target(r):
            threading.current_thread().rank = r
            try:
                out[r] = fn(r)
            except BaseException as e:  # noqa: BLE001 - re-raised below
                errors.append(e)
                self.bar.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return out


@pytest.fixture
def workers(monkeypatch):
    return TwoWorkers(monkeypatch)


@pytest.fixture
def store(tmp_path, monkeypatch, request):
    """A local store, or (param "s3") a bucket on a loopback S3 server."""
    monkeypatch.setenv("HWQ_CACHE", str(tmp_path / "cache"))  # remote stores stage here
    if getattr(request, "param", "local") == "s3":
        url, opts = request.getfixturevalue("s3_bucket")
        return Store(url, opts)
    return Store(str(tmp_path / "store"))


# -- latest.json ----------------------------------------------------------------------------

GOOD = {"tag": "step000000002", "step": 2,
        "files": {"mp_rank_00_model_states.pt": {"sha256": "0" * 64, "size": 90}}}


@pytest.mark.parametrize("bad", [
    {"tag": "../../etc", "step": 2},
    {**GOOD, "tag": "../../something"},
    {**GOOD, "tag": "step000000002/../../x"},
    {**GOOD, "tag": "/abs/step000000002"},
    {**GOOD, "tag": "step00000002"},  # 8 digits
    {**GOOD, "tag": "step٠٠٠٠٠٠٠٠٢"},  # Arabic-Indic digits: \d would take them
    {**GOOD, "step": 3},  # not the tag's number
    {**GOOD, "step": True},
    {**GOOD, "step": 2.0},
    {**GOOD, "step": "2"},
    {**GOOD, "extra": 1},
    {"tag": "step000000002", "step": 2},  # the format before this fix: no hashes
    {**GOOD, "files": {}},
    {**GOOD, "files": {"../mp_rank_00_model_states.pt": GOOD["files"]
                       ["mp_rank_00_model_states.pt"]}},
    {**GOOD, "files": {"sub/x.pt": {"sha256": "0" * 64, "size": 1}}},
    {**GOOD, "files": {"..pt": {"sha256": "0" * 64, "size": 1}}},
    {**GOOD, "files": {"latest.json": {"sha256": "0" * 64, "size": 1}}},
    {**GOOD, "files": {"x.pt": {"sha256": "0" * 63, "size": 1}}},
    {**GOOD, "files": {"x.pt": {"sha256": "0" * 64, "size": -1}}},
    {**GOOD, "files": {"x.pt": {"sha256": "0" * 64}}},
    ["step000000002"],
])
def test_latest_json_schema_is_strict(bad):
    assert parse_latest(GOOD) == GOOD
    assert parse_latest(json.dumps(GOOD).encode()) == GOOD
    with pytest.raises(CheckpointRejected):
        parse_latest(bad)
    with pytest.raises(CheckpointRejected, match="not below"):
        parse_latest(GOOD, before=2)
    with pytest.raises(CheckpointRejected, match="not JSON"):
        parse_latest(b"{" * 100_000)


# -- unpickling -----------------------------------------------------------------------------


def test_planted_pickles_are_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    for name, data in planted_files(marker).items():
        with pytest.raises(CheckpointRejected, match="weights only"):
            safe_torch_load(data, name)
    # The control: DeepSpeed's own engine runs it.
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    p = tmp_path / "x.pt"
    p.write_bytes(planted_files(marker)["mp_rank_00_model_states.pt"])
    assert not marker.exists()
    with contextlib.suppress(RuntimeError):  # the payload runs, then the file is no checkpoint
        TorchCheckpointEngine().load(str(p))
    assert marker.exists()


def test_allow_listed_types_cannot_carry_other_objects():
    import io

    from deepspeed.runtime.fp16.loss_scaler import LossScaler

    ok = LossScaler(1.0)
    buf = io.BytesIO()
    torch.save({"loss_scaler": ok, "t": torch.ones(2)}, buf)
    got = safe_torch_load(buf.getvalue(), "plain")
    assert got["loss_scaler"].cur_scale == 1.0
    bad = LossScaler(1.0)
    bad.update_scale = LossScaler  # an allow-listed class as an attribute value
    buf = io.BytesIO()
    torch.save({"loss_scaler": bad}, buf)
    with pytest.raises(CheckpointRejected, match="holds a builtins.type"):
        safe_torch_load(buf.getvalue(), "smuggled")


# -- through Checkpoints (save, verify, load) ------------------------------------------------


@pytest.mark.parametrize("store", ["local", "s3"], indirect=True)
def test_save_records_hashes_and_load_verifies_them(store, workers):
    ck = Checkpoints(store, "abc")
    assert ck.latest() is None and ck.inspect() == (None, None)
    assert workers.run(lambda r: ck.load(FakeEngine(r), r)) == [0, 0]
    for step in (2, 4):
        workers.run(lambda r, step=step: ck.save(FakeEngine(r), step, r))
    info = ck.latest()
    names = ["zero_pp_rank_0_mp_rank_00_optim_states.pt",
             "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert info["tag"] == "step000000004" and info["step"] == 4
    assert sorted(info["files"]) == names
    for n in names:
        data = store.read_bytes(f"{ck.rel}/step000000004/{n}")
        assert info["files"][n] == {"sha256": hashlib.sha256(data).hexdigest(),
                                    "size": len(data)}
    assert store.list_dirs(ck.rel) == ["step000000004"]  # the older tag is gone
    assert not store.exists("stages")
    assert ck.inspect() == (info, None)
    assert workers.run(lambda r: ck.load(FakeEngine(r), r)) == [4, 4]
    assert workers.run(lambda r: ck.load(FakeEngine(r), r, before=4)) == [0, 0]

    # One flipped byte: ignored by both workers (they agree), fine-tune from step 0.
    rel = f"{ck.rel}/step000000004/{names[1]}"
    data = bytearray(store.read_bytes(rel))
    data[-1] ^= 1
    store.write_bytes(rel, bytes(data))
    assert "does not match its sha256" in ck.inspect()[1]
    assert workers.run(lambda r: ck.load(FakeEngine(r), r)) == [0, 0]
    ck.remove()
    assert not store.exists(ck.rel)


@pytest.mark.parametrize("store", ["local", "s3"], indirect=True)
@pytest.mark.parametrize("hashes", [True, False])
def test_planted_checkpoint_never_runs_and_fine_tunes_from_step_0(store, workers, tmp_path,
                                                                  hashes, caplog):
    marker = tmp_path / "pwned"
    ck = Checkpoints(store, "abc")
    plant(store, ck.rel, planted_files(marker), hashes=hashes)
    with caplog.at_level(logging.WARNING, logger=ckmod.__name__):
        assert workers.run(lambda r: ck.load(FakeEngine(r), r)) == [0, 0]
    assert not marker.exists()
    assert "fine-tuning from step 0" in caplog.text
    assert ("weights only" if hashes else "exactly the keys") in caplog.text
    # The next save replaces it; the planted tag goes with the older ones.
    workers.run(lambda r: ck.save(FakeEngine(r), 4, r))
    assert store.list_dirs(ck.rel) == ["step000000004"]
    assert workers.run(lambda r: ck.load(FakeEngine(r), r)) == [4, 4]
    assert not marker.exists()


def test_files_beside_the_listed_ones_are_refused(store, workers):
    ck = Checkpoints(store, "abc")
    workers.run(lambda r: ck.save(FakeEngine(r), 2, r))
    # DeepSpeed globs mp_rank_*_model_states.pt: an unlisted one must not be picked up.
    store.write_bytes(f"{ck.rel}/step000000002/mp_rank_01_model_states.pt", b"x")
    assert "not listed" in ck.inspect()[1]
    assert workers.run(lambda r: ck.load(FakeEngine(r), r)) == [0, 0]


def test_a_load_that_bypasses_the_checkpoint_engine_is_refused(store, workers):
    ck = Checkpoints(store, "abc")
    workers.run(lambda r: ck.save(FakeEngine(r), 2, r))

    class Bypass(FakeEngine):
        def load_checkpoint(self, load_dir, tag, **_):
            return load_dir, torch.load(self._name(load_dir, tag), weights_only=False)

    with pytest.raises(RuntimeError, match="refused"):
        workers.run(lambda r: ck.load(Bypass(r), r))
    assert torch.load is torch.serialization.load  # restored


# -- nothing outside the run's checkpoint folder is touched ---------------------------------


@pytest.mark.parametrize("store", ["local", "s3"], indirect=True)
def test_a_traversal_tag_deletes_nothing(store, workers, tmp_path):
    ck = Checkpoints(store, "abc")
    # Sentinels where `join(<checkpoint dir>, "../../something")` points: beside the store's
    # checkpoints (local) and beside the workers' download folders (remote), and further up.
    victims = []
    for base in (store.path(ck.rel) if store.is_local else None,
                 str(tmp_path / "cache" / "finetune-ckpt" / "abc" / "rank0"),
                 str(tmp_path / "cache" / "finetune-ckpt" / "abc" / "rank1")):
        if base is None:
            continue
        for up in ("../../something", "../something", "../../../something"):
            v = os.path.normpath(os.path.join(base, up))
            if v.startswith(str(tmp_path / "cache" / "finetune-ckpt" / "abc")):
                continue  # the run's own scratch folder (removed when the stage completes)
            os.makedirs(v, exist_ok=True)
            with open(os.path.join(v, "keep"), "w") as f:
                f.write("x")
            victims.append(v)
    store.write_bytes("something/keep", b"x")  # inside the store root, outside the run's folder
    for tag in ("../../something", "../something", "../../../something", "step000000002/.."):
        store.write_json(f"{ck.rel}/latest.json", {"tag": tag, "step": 2, "files": {
            "mp_rank_00_model_states.pt": {"sha256": "0" * 64, "size": 1}}})
        assert workers.run(lambda r: ck.load(FakeEngine(r), r)) == [0, 0]
        workers.run(lambda r: ck.save(FakeEngine(r), 4, r))
        ck.remove()
    for v in victims:
        assert os.path.exists(os.path.join(v, "keep")), v
    assert store.read_bytes("something/keep") == b"x"


def test_a_linked_tag_folder_is_unlinked_not_followed(tmp_path, workers):
    store = Store(str(tmp_path / "store"))
    ck = Checkpoints(store, "abc")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("x")
    files = {"mp_rank_00_model_states.pt": b"not even a pickle"}
    for name, data in files.items():
        (outside / name).write_bytes(data)
    os.makedirs(store.path(ck.rel))
    os.symlink(outside, store.path(f"{ck.rel}/step000000002"))
    os.symlink(outside, store.path(f"{ck.rel}/step000000004"))
    store.write_json(f"{ck.rel}/latest.json", {"tag": "step000000002", "step": 2, "files": {
        n: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)} for n, d in files.items()}})
    assert "not a plain folder" in ck.inspect()[1]
    assert workers.run(lambda r: ck.load(FakeEngine(r), r)) == [0, 0]
    workers.run(lambda r: ck.save(FakeEngine(r), 4, r))  # replaces the linked step 4 ...
    assert store.list_dirs(ck.rel) == ["step000000004"]  # ... and drops the linked step 2
    assert not os.path.islink(store.path(f"{ck.rel}/step000000004"))
    kept = ["keep", "mp_rank_00_model_states.pt"]
    assert (outside / "keep").read_text() == "x" and sorted(os.listdir(outside)) == kept
    ck.remove()
    assert (outside / "keep").read_text() == "x"


def test_the_key_cannot_leave_the_checkpoints_folder(tmp_path):
    for key in ("../x", "a/b", "", ".."):
        with pytest.raises(ValueError):
            Checkpoints(Store(str(tmp_path)), key)


def test_ray_trains_own_state_is_cleared_before_a_fit(tmp_path):
    """Ray Train reads its run state back from its storage folder (inside the checkpoint
    folder on a local store); hwq never resumes from it, so a fit starts with it empty."""
    store = Store(str(tmp_path / "store"))
    ck = Checkpoints(store, "abc")
    snap = f"{ck.rel}/ray_train/finetune-abc/checkpoint_manager_snapshot.json"
    store.write_bytes(snap, b"{}")
    ck.clear_ray_storage()
    assert not store.exists(f"{ck.rel}/ray_train")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("x")
    os.symlink(outside, store.path(f"{ck.rel}/ray_train"))
    ck.clear_ray_storage()
    assert not os.path.lexists(store.path(f"{ck.rel}/ray_train"))
    assert (outside / "keep").read_text() == "x"
