"""Version 2 of the container: rANS tables and context-coded streams decode to exactly what
version 1 does, account the same way from the file as from the writer, keep range reads
per tensor, and every new field is checked."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.encode import HwqFormatError, HwqReader, hwq_accounting, read_hwq, write_hwq

sys.path.insert(0, str(Path(__file__).parent))
import hostile_files as hf  # noqa: E402
from test_container import _model  # noqa: E402

CODERS = [
    {"coder": "ans"},
    {"coder": "ans", "positions": "context"},
    {"coder": "ans", "positions": "context", "indices": "context"},
    {"positions": "context", "chunk_symbols": 60},
    {"indices": "context", "chunk_symbols": 7, "code_sharing": "tensor"},
]


@pytest.fixture(scope="module")
def model():
    return _model(seed=3)


@pytest.mark.parametrize("kw", CODERS, ids=lambda kw: "-".join(f"{v}" for v in kw.values()))
def test_round_trip_and_accounting_equal_version_1(tmp_path, model, kw):
    ents, cbs, exp = model
    acct = write_hwq(tmp_path / "v2.hwq", ents, cbs, **kw)
    write_hwq(tmp_path / "v1.hwq", ents, cbs)
    assert HwqReader(tmp_path / "v1.hwq").version == 1
    assert HwqReader(tmp_path / "v2.hwq").version == 2
    got = read_hwq(tmp_path / "v2.hwq")
    for name, want in exp.items():
        np.testing.assert_array_equal(got[name], want)
    again = hwq_accounting(tmp_path / "v2.hwq")
    assert again["bits"] == acct["bits"]
    for key in ("index_entropy_bits", "gap_entropy_bits", "position_entropy_bits"):
        assert again[key] == pytest.approx(acct[key])
    assert sum(acct["bits"].values()) == 8 * (tmp_path / "v2.hwq").stat().st_size


def test_one_tensor_reads_only_its_sections(tmp_path, model):
    ents, cbs, exp = model
    write_hwq(tmp_path / "f.hwq", ents, cbs, coder="ans", positions="context",
              indices="context")
    r = HwqReader(tmp_path / "f.hwq")
    before = r.bytes_read
    out = r.read("fc1.weight")
    np.testing.assert_array_equal(out["fc1.weight"], exp["fc1.weight"])
    row = next(x for x in r.inspect() if x["name"] == "fc1.weight")
    table = sum(t["length"] for t in r.header["code_tables"])
    codebook = next(c["length"] for c in r.header["codebooks"] if c["name"] == "net")
    assert r.bytes_read - before <= row["bytes"] + table + codebook


def test_context_coding_beats_the_gap_entropy_on_structured_masks(tmp_path):
    from pipeline.encode import TensorEntry

    rng = np.random.default_rng(0)
    # Magnitude pruning of W = r_i c_j z_ij: masks with row and column densities.
    w = np.exp(rng.normal(size=(200, 1))) * np.exp(rng.normal(size=(1, 300))) * \
        rng.normal(size=(200, 300))
    mask = np.abs(w) >= np.quantile(np.abs(w), 0.9)
    ents = [TensorEntry.quantized("w", w.shape, rng.integers(0, 8, int(mask.sum())), "cb",
                                  mask=mask)]
    cb = {"cb": np.arange(8, dtype=np.float32)}
    gaps = write_hwq(tmp_path / "g.hwq", ents, cb, coder="ans")
    ctx = write_hwq(tmp_path / "c.hwq", ents, cb, coder="ans", positions="context")
    assert ctx["bits"]["positions"] < 0.9 * ctx["gap_entropy_bits"] * ctx["n_kept"]
    assert ctx["bits"]["positions"] < gaps["bits"]["positions"]
    # rANS indices: within 0.5% of their order-0 entropy (plus the chunk's few bytes).
    assert gaps["bits"]["indices"] <= 1.005 * gaps["index_entropy_bits"] * gaps["n_kept"] + 64


def _v2(tmp_path, model, **kw):
    ents, cbs, _ = model
    write_hwq(tmp_path / "ok.hwq", ents, cbs, **kw)
    return hf.split((tmp_path / "ok.hwq").read_bytes())


def _refused(tmp_path, h, payload, match):
    p = tmp_path / "bad.hwq"
    p.write_bytes(hf.join(h, payload))
    with pytest.raises(HwqFormatError, match=match):
        read_hwq(p)


def test_version_2_fields_are_refused_in_version_1_and_checked_in_2(tmp_path, model):
    h, payload = _v2(tmp_path, model, coder="ans", positions="context", indices="context",
                     chunk_symbols=64)
    v1 = json.loads(json.dumps(h))
    v1["version"] = 1
    _refused(tmp_path, v1, payload, "kind must be 'huffman', 'fixed'|coder must be 'table'")
    # A context stream naming a table, mask rows that do not add up to the tensor's, an
    # unknown coder; an rANS table section too long for its alphabet.
    bad = json.loads(json.dumps(h))
    t = hf.tensor(bad, "fc1.weight")
    t["positions"]["code_table"] = 0
    _refused(tmp_path, bad, payload, "code_table|no code table")
    bad = json.loads(json.dumps(h))
    t = hf.tensor(bad, "fc1.weight")
    t["positions"]["chunks"][0][2] += 1
    _refused(tmp_path, bad, payload, "rows")
    bad = json.loads(json.dumps(h))
    t = hf.tensor(bad, "fc1.weight")
    t["positions"]["coder"] = "magic"
    _refused(tmp_path, bad, payload, "coder")
    h2, payload2 = _v2(tmp_path, model, coder="ans")
    assert h2["code_tables"][0]["kind"] == "rans"
    h2["code_tables"][0]["alphabet"] = 1
    _refused(tmp_path, h2, payload2, "rANS table")


def test_a_newer_version_is_refused_with_what_to_do(tmp_path, model):
    h, payload = _v2(tmp_path, model, coder="ans")
    p = tmp_path / "v4.hwq"
    h["version"] = 4
    p.write_bytes(hf.join(h, payload))
    with pytest.raises(HwqFormatError, match="supports versions 1, 2, 3.*upgrade"):
        read_hwq(p)


def test_writer_refuses_impossible_settings(tmp_path, model):
    ents, cbs, _ = model
    for kw, match in (({"coder": "zip"}, "coder"), ({"positions": "rle"}, "positions"),
                      ({"indices": "lz"}, "indices"),
                      ({"coder": "ans", "fixed_length": True}, "fixed_length")):
        with pytest.raises(ValueError, match=match):
            write_hwq(tmp_path / "x.hwq", ents, cbs, **kw)
    assert not (tmp_path / "x.hwq").exists()
