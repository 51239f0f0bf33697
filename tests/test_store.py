import pyarrow as pa
import pytest
import torch

from pipeline.store import ArtifactError, StageDir, Store


def _finish(sd: StageDir) -> None:
    sd.outputs = sd.hash_outputs()


def test_roundtrips(store):
    sd = StageDir(store, "demo", "k1")
    table = pa.table({"tensor": ["a", "b"], "offset": pa.array([0, 5], pa.int64()),
                      "values": pa.array([[1.0, 2.0], [3.0]], pa.list_(pa.float32()))})
    sd.write_table("t.parquet", table)
    tensors = {"w": torch.randn(3, 4), "m": torch.ones(5, dtype=torch.uint8)}
    sd.write_safetensors("m.safetensors", tensors, metadata={"step": "7"})
    sd.write_json("x.json", {"a": [1, 2]})
    _finish(sd)
    assert set(sd.outputs) == {"t.parquet", "m.safetensors", "x.json"}
    assert sd.read_table("t.parquet").equals(table)
    back = sd.read_safetensors("m.safetensors")
    assert all(torch.equal(back[k], v) for k, v in tensors.items())
    assert sd.read_safetensors_metadata("m.safetensors") == {"step": "7"}
    assert sd.read_json("x.json") == {"a": [1, 2]}
    assert sd.verify() is None
    # Pickled into a Ray task and back, it still reads the same root.
    import pickle

    assert pickle.loads(pickle.dumps(sd)).read_json("x.json") == {"a": [1, 2]}


def test_crash_in_the_middle_of_a_write_leaves_nothing(store):
    sd = StageDir(store, "demo", "k2")
    with pytest.raises(RuntimeError, match="killed"), sd.open("big.bin") as f:
        f.write(b"x" * 1000)
        raise RuntimeError("killed mid-write")
    assert not sd.exists("big.bin")
    assert sd.files() == []


def test_flipped_byte_and_truncation_are_detected(store):
    sd = StageDir(store, "demo", "k3")
    sd.write_safetensors("m.safetensors", {"w": torch.arange(100.0)})
    _finish(sd)
    data = bytearray(store.read_bytes(sd.rel("m.safetensors")))
    data[-3] ^= 0x01
    store.write_bytes(sd.rel("m.safetensors"), bytes(data))
    with pytest.raises(ArtifactError, match=r"m\.safetensors is corrupt.*--force demo"):
        sd.read_safetensors("m.safetensors")
    assert "does not match" in sd.verify()
    store.write_bytes(sd.rel("m.safetensors"), bytes(data[:50]))
    with pytest.raises(ArtifactError, match="truncated"):
        sd.read_bytes("m.safetensors")


def test_missing_artifact_names_the_file(tmp_path):
    sd = StageDir(Store(str(tmp_path)), "demo", "k4", outputs={"a.json": {"sha256": "0", "bytes": 1}})
    with pytest.raises(ArtifactError, match=r"a\.json is missing"):
        sd.read_json("a.json")


def test_safetensors_bytes_do_not_depend_on_metadata_order():
    """safetensors writes metadata in hash-map order (per process): hwq sorts the header."""
    import torch
    from safetensors.torch import load, save

    from pipeline.store import canonical_safetensors

    t = {"b": torch.arange(3.0), "a": torch.ones(2, 2)}
    one = canonical_safetensors(save(t, metadata={"step": "24", "beta2": "0.999", "x": "1"}))
    two = canonical_safetensors(save(dict(reversed(t.items())),
                                     metadata={"x": "1", "beta2": "0.999", "step": "24"}))
    assert one == two
    back = load(one)
    assert torch.equal(back["a"], t["a"]) and torch.equal(back["b"], t["b"])
