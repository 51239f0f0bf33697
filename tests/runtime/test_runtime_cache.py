"""The runtime's cache of transcoded tensors (`pipeline.runtime.lut_cache`): a second load
maps what the first wrote and computes the same logits; a damaged, truncated or foreign entry
is a miss that is written again; a changed file finds no entry; a folder that cannot be
written leaves the load working; the folder is kept under its byte limit."""

import logging
import shutil

import numpy as np
import pytest
import torch

from pipeline.encode.container import HwqReader
from pipeline.runtime import load
from pipeline.runtime.lut_cache import cache_key
from pipeline.runtime.modules import LutEmbedding, LutLinear
from testkit.hwq_models import tiny_llama_hwq

TEXT = "the quick brown fox jumps over"


@pytest.fixture(scope="module")
def hwq(tmp_path_factory):
    return tiny_llama_hwq(tmp_path_factory.mktemp("cache"), tied=True)


def _logits(model, tok):
    with torch.no_grad():
        return model(tok(TEXT, return_tensors="pt").input_ids).logits


def _arrays(model) -> dict:
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (LutLinear, LutEmbedding)):
            p = m.packed() if isinstance(m, LutLinear) else m._packed
            for k in ("idx", "tables", "tq", "ts"):
                if getattr(p, k) is not None:
                    out[f"{name}.{k}"] = getattr(p, k).clone()
    return out


def test_a_second_load_maps_the_first_loads_tables(hwq, tmp_path):
    folder = tmp_path / "lut"
    m1, tok = load(str(hwq), cache=folder)
    assert m1.hwq_runtime["cache"] == "written"
    (entry,) = folder.glob("*.lut")
    m2, _ = load(str(hwq), cache=folder)
    assert m2.hwq_runtime["cache"] == "hit" and m2.hwq_runtime["cache_path"] == str(entry)
    a1, a2 = _arrays(m1), _arrays(m2)
    assert a1.keys() == a2.keys() and len(a1) > 10
    assert all(torch.equal(a1[k], a2[k]) for k in a1)
    assert torch.equal(_logits(m1, tok), _logits(m2, tok))
    off, _ = load(str(hwq), cache=False)
    assert off.hwq_runtime["cache"] == "off"
    assert torch.equal(_logits(off, tok), _logits(m2, tok))


def test_the_key_is_the_content_not_the_path(hwq, tmp_path):
    copy = tmp_path / "elsewhere.hwq"
    shutil.copy(hwq, copy)
    assert cache_key(HwqReader(hwq)) == cache_key(HwqReader(copy))
    other = tiny_llama_hwq(tmp_path / "other", tied=False)
    assert cache_key(HwqReader(other)) != cache_key(HwqReader(hwq))


@pytest.mark.parametrize("damage", ["flip", "truncate", "foreign"])
def test_a_damaged_entry_is_a_miss_and_is_written_again(hwq, tmp_path, caplog, damage):
    folder = tmp_path / "lut"
    ref, tok = load(str(hwq), cache=folder)
    (entry,) = folder.glob("*.lut")
    data = bytearray(entry.read_bytes())
    if damage == "flip":
        data[100] ^= 0xFF  # inside the first array
    elif damage == "truncate":
        data = data[: len(data) // 2]
    else:  # another file's entry under this name
        other = tiny_llama_hwq(tmp_path / "other", tied=False)
        load(str(other), cache=tmp_path / "lut2")
        (data,) = [p.read_bytes() for p in (tmp_path / "lut2").glob("*.lut")]
    entry.write_bytes(bytes(data))
    with caplog.at_level(logging.INFO, logger="pipeline.runtime.loader"):
        caplog.set_level(logging.INFO, logger="pipeline.runtime.lut_cache")
        m, _ = load(str(hwq), cache=folder)
    assert m.hwq_runtime["cache"] == "written"
    assert "unusable" in caplog.text
    assert torch.equal(_logits(m, tok), _logits(ref, tok))
    again, _ = load(str(hwq), cache=folder)
    assert again.hwq_runtime["cache"] == "hit"


def test_a_folder_that_cannot_be_written_leaves_the_load_working(hwq, tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with caplog.at_level(logging.INFO):
        m, tok = load(str(hwq), cache=blocker / "lut")
    assert m.hwq_runtime["cache"] == "off"
    assert "could not cache" in caplog.text or "no cache" in caplog.text
    assert not list(tmp_path.glob("**/*.lut")) and not list(tmp_path.glob("**/*.tmp"))
    ref, _ = load(str(hwq), cache=False)
    assert torch.equal(_logits(m, tok), _logits(ref, tok))


def test_the_folder_stays_under_its_limit(hwq, tmp_path, monkeypatch):
    folder = tmp_path / "lut"
    other = tiny_llama_hwq(tmp_path / "other", tied=False)
    load(str(hwq), cache=folder)
    monkeypatch.setenv("HWQ_LUT_CACHE_BYTES", "1")
    m, _ = load(str(other), cache=folder)
    (left,) = folder.glob("*.lut")  # the older entry went; the one just written stays
    assert str(left) == m.hwq_runtime["cache_path"]
    monkeypatch.setenv("HWQ_LUT_CACHE_BYTES", "lots")
    with pytest.raises(ValueError, match="HWQ_LUT_CACHE_BYTES"):
        load(str(hwq), cache=folder)


def test_cached_arrays_are_the_transcoders(hwq, tmp_path):
    """Every cached tensor's packed indices and tables equal a fresh transcoding's."""
    from pipeline.runtime.lut_cache import LutCache
    from pipeline.runtime.transcode import transcode

    load(str(hwq), cache=tmp_path)
    r = HwqReader(hwq)
    c = LutCache(r, tmp_path)
    assert c.hit
    n = 0
    for name in r.names:
        p = c.get(name)
        if p is None:
            continue
        q = transcode(r, name)
        n += 1
        assert (p.rows, p.cols, p.bits, p.group_size, p.levels) == (
            q.rows, q.cols, q.bits, q.group_size, q.levels)
        for f in ("idx", "tables", "tq", "ts"):
            a, b = getattr(p, f), getattr(q, f)
            assert (a is None) == (b is None)
            if a is not None:
                assert np.array_equal(a.numpy(), b.numpy())
    assert n >= 15
