"""Tensor-level reads of safetensors folders: exactly the tensor's bytes, locally and on S3."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.models.weights import INDEX, ShardedWriter, WeightsError, WeightsFolder, write_folder


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(50, 16, generator=g).to(torch.bfloat16),
        "layers.0.q.weight": torch.randn(16, 16, generator=g).to(torch.bfloat16),
        "layers.0.mlp.weight": torch.randn(40, 16, generator=g),
        "layers.1.q.weight": torch.randn(16, 16, generator=g).to(torch.float16),
        "layers.1.mlp.weight": torch.randn(40, 16, generator=g),
        "norm.weight": torch.ones(16),
        "empty": torch.zeros(0, 4),
    }


def _plan(ts):
    return [(n, t.dtype, tuple(t.shape)) for n, t in ts.items()]


def _write(url, ts, **kw):
    return write_folder(url, ts, _plan(ts), max_shard_bytes=3000, **kw)


def test_sharded_write_round_trips_through_safetensors(tmp_path):
    ts = _tensors()
    _write(tmp_path, ts)
    index = json.loads((tmp_path / INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3
    loaded = {}
    for s in shards:  # the safetensors library reads every shard we wrote
        loaded.update(load_file(tmp_path / s))
    assert set(loaded) == set(ts)
    for n, t in ts.items():
        assert loaded[n].dtype == t.dtype and torch.equal(loaded[n], t)
    w = WeightsFolder(tmp_path)
    assert w.verified == "sha256"
    for n, t in ts.items():
        assert torch.equal(w.read(n), t)


def test_one_tensor_read_fetches_only_its_bytes(tmp_path, monkeypatch):
    ts = _tensors()
    _write(tmp_path, ts)
    w = WeightsFolder(tmp_path)
    seen = []
    real = os.preadv

    def spy(fd, bufs, at):
        n = real(fd, bufs, at)
        seen.append(n)
        return n

    monkeypatch.setattr(os, "preadv", spy)
    t = w.read("layers.0.mlp.weight")
    assert torch.equal(t, ts["layers.0.mlp.weight"])
    assert sum(seen) == 40 * 16 * 4  # the tensor's bytes and nothing else
    total = sum(os.path.getsize(p) for p in tmp_path.iterdir())
    assert w.header_bytes < total // 4


def test_tampered_tensor_is_refused_by_its_digest(tmp_path):
    ts = _tensors()
    _write(tmp_path, ts)
    w = WeightsFolder(tmp_path)
    info = w.info("layers.1.mlp.weight")
    p = tmp_path / info.file
    data = bytearray(p.read_bytes())
    data[info.start + 5] ^= 0x40
    p.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="sha256"):
        WeightsFolder(tmp_path).read("layers.1.mlp.weight")
    # The other tensors of that shard still read (nothing else of the shard is fetched).
    others = [n for n, t in w.tensors.items() if t.file == info.file and n != info.name]
    for n in others:
        assert torch.equal(WeightsFolder(tmp_path).read(n), ts[n])


def test_foreign_single_file_reads_structurally(tmp_path):
    ts = {k: v for k, v in _tensors().items() if v.numel()}
    save_file(ts, tmp_path / "model.safetensors")
    w = WeightsFolder(tmp_path)
    assert w.verified == "structure"
    assert torch.equal(w.read("layers.0.q.weight"), ts["layers.0.q.weight"])
    (tmp_path / "model.safetensors").write_bytes((tmp_path / "model.safetensors").read_bytes()[:-10])
    with pytest.raises(WeightsError, match="truncated"):
        WeightsFolder(tmp_path)


def test_interrupted_write_leaves_nothing_that_loads(tmp_path):
    ts = _tensors()
    items = list(ts.items())
    with pytest.raises(RuntimeError, match="worker died"):
        with ShardedWriter(tmp_path, _plan(ts), max_shard_bytes=3000) as w:
            for i, (n, t) in enumerate(items):
                if i == 4:
                    raise RuntimeError("worker died")
                w.write(n, t)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(WeightsError, match="neither"):
        WeightsFolder(tmp_path)


def test_writer_refuses_out_of_order_and_wrong_shapes(tmp_path):
    ts = _tensors()
    w = ShardedWriter(tmp_path, _plan(ts))
    with pytest.raises(WeightsError, match="plan order"):
        w.write("norm.weight", ts["norm.weight"])
    with pytest.raises(WeightsError, match="plan says"):
        w.write("embed.weight", ts["embed.weight"].float())
    with pytest.raises(WeightsError, match="never"):
        w.close()
    w.abort()


def test_s3_range_read_and_interrupted_multipart(s3_bucket, monkeypatch):
    import s3fs

    url, opts = s3_bucket
    ts = _tensors()
    _write(f"{url}/model", ts, storage_options=opts)
    calls = []
    real = s3fs.S3FileSystem._call_s3

    async def spy(self, method, *a, **kw):
        calls.append((method, kw.get("Range")))
        return await real(self, method, *a, **kw)

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", spy)
    w = WeightsFolder(f"{url}/model", opts)
    assert w.verified == "sha256"
    calls.clear()
    before = w.bytes_read
    t = w.read("layers.1.mlp.weight")
    assert torch.equal(t, ts["layers.1.mlp.weight"])
    gets = [r for m, r in calls if m == "get_object"]
    assert len(gets) == 1
    lo, hi = (int(x) for x in gets[0].split("=")[1].split("-"))
    assert hi - lo + 1 == 40 * 16 * 4 == w.bytes_read - before

    # An interrupted streamed write publishes no object.
    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", real)
    items = list(ts.items())
    with pytest.raises(RuntimeError):
        with ShardedWriter(f"{url}/broken", _plan(ts), max_shard_bytes=3000,
                           storage_options=opts) as wr:
            for i, (n, x) in enumerate(items):
                if i == 4:
                    raise RuntimeError("interrupted")
                wr.write(n, x)
    fs = s3fs.S3FileSystem(**opts)
    fs.invalidate_cache()
    assert not fs.exists(f"{url}/broken/{INDEX}")
    assert fs.find(f"{url[5:]}/broken") == []


def _raw_file(path, header: dict, data: bytes = b"") -> None:
    import struct

    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)


@pytest.mark.parametrize("header, data, match", [
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, "truncated"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, "overlapping"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "needs 12"),
    ({"a": {"dtype": "PICKLE", "shape": [1], "data_offsets": [0, 1]}}, b"\0", "does not read"),
    ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, "malformed"),
    ([1, 2], b"", "not a JSON object"),
])
def test_hostile_headers_are_refused_by_name(tmp_path, header, data, match):
    _raw_file(tmp_path / "model.safetensors", header, data)
    with pytest.raises(WeightsError, match=match):
        WeightsFolder(tmp_path)


def test_index_naming_a_path_outside_the_folder_is_refused(tmp_path):
    (tmp_path / INDEX).write_text(json.dumps({"weight_map": {"a": "../../etc/passwd"}}))
    with pytest.raises(WeightsError, match="not a file name"):
        WeightsFolder(tmp_path)
