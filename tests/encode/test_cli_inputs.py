"""`hwq decode` / `hwq inspect` on inputs that are not what they claim (a folder or a FIFO
where a .hwq or a model folder's config.json belongs): one `hwq: error:` line, never a hang;
`--hf-out` into folders that do not exist yet; and `hwq inspect`'s totals, which follow the
run report's definition of bits per weight."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.encode import TensorEntry, hwq_accounting, write_hwq
from pipeline.encode.inspection import inspect_totals


def _cli(capsys, *args) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def _one_line(rc, err, *needles):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and "Traceback" not in err, (rc, err)
    assert len(lines) == 1 and lines[0].startswith("hwq: error: "), err
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture
def model(tmp_path):
    """A small .hwq with quantized and large unquantized tensors, and hf/ beside it."""
    rng = np.random.default_rng(0)
    cb = {"c": np.sort(rng.normal(size=8)).astype(np.float32)}
    ents = [
        TensorEntry.quantized(f"l{i}.weight", (64, 64), rng.integers(0, 8, 4096), "c")
        for i in range(3)
    ]
    ents.append(
        TensorEntry.raw_tensor("embed.weight", rng.normal(size=(500, 64)).astype(np.float32))
    )
    p = tmp_path / "run" / "model.hwq"
    p.parent.mkdir()
    write_hwq(p, ents, cb)
    hf = p.parent / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (hf / "tokenizer.json").write_text("{}")
    return p


@pytest.mark.timeout(60)
@pytest.mark.parametrize("what", ["folder", "fifo"])
def test_a_hwq_that_is_a_folder_or_fifo_is_one_line(tmp_path, capsys, what):
    p = tmp_path / "m.hwq"
    p.mkdir() if what == "folder" else os.mkfifo(p)
    word = "a folder" if what == "folder" else "a FIFO"
    rc, _, err = _cli(capsys, "inspect", p)
    _one_line(rc, err, str(p), f"is {word}", "not a file")
    rc, _, err = _cli(capsys, "decode", p, "--out", tmp_path / "x.safetensors")
    _one_line(rc, err, f"is {word}", "not a file")
    rc, _, err = _cli(capsys, "decode", p, "--hf-out", tmp_path / "hfo")
    _one_line(rc, err, f"is {word}")
    assert sorted(os.listdir(tmp_path)) == ["m.hwq"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "name,what", [("config.json", "folder"), ("config.json", "fifo"), ("tokenizer.json", "fifo")]
)
def test_a_model_file_that_is_a_folder_or_fifo_is_one_line(model, tmp_path, capsys, name, what):
    f = model.parent / "hf" / name
    f.unlink()
    f.mkdir() if what == "folder" else os.mkfifo(f)
    out = tmp_path / "decoded"
    rc, _, err = _cli(capsys, "decode", model, "--hf-out", out)
    _one_line(rc, err, f"hf/{name}", "a folder" if what == "folder" else "a FIFO", "regular files")
    assert not out.exists() and not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


def test_hf_out_creates_missing_parent_folders(model, tmp_path, capsys):
    out = tmp_path / "new" / "deeper" / "decoded"
    rc, text, err = _cli(capsys, "decode", model, "--hf-out", out)
    assert rc == 0, err
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert os.listdir(out.parent) == ["decoded"]  # no temporary left
    # Under a file there is no folder to create: one line, nothing written.
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    rc, _, err = _cli(capsys, "decode", model, "--hf-out", blocker / "sub" / "decoded")
    _one_line(rc, err, "is not a folder")


def test_inspect_total_is_the_report_bits_per_weight(model, capsys):
    """The all-in row counts what the run report counts (stage.quantized_bits): indices,
    positions, codebooks, code tables and the header's share, over the quantized weights;
    the 128 KB embedding is a separate row. (The old total divided the whole file, the
    embedding included, by the quantized weights: ~90 bits a 3-bit weight here.)"""
    from pipeline.encode.container import inspect_hwq
    from pipeline.encode.stage import quantized_bits

    rows = inspect_hwq(model)
    acct = hwq_accounting(model)
    want = quantized_bits(acct, 3, 4) / (3 * 4096)
    t = inspect_totals(rows)
    assert t["bits_per_weight"] == pytest.approx(want, abs=1e-3) and 3 < want < 3.5
    assert t["raw_bytes"] + t["quantized_bytes"] == pytest.approx(model.stat().st_size)
    rc, text, _ = _cli(capsys, "inspect", model)
    assert rc == 0
    line = next(ln for ln in text.splitlines() if ln.startswith("quantized weights, all-in"))
    assert f"{want:.3f}" in line.split()
    assert re.search(r"^unquantized tensors \(stored as is\)\s+12[89],", text, re.M), text
    assert "bits/weight" in text.splitlines()[0] and "as the run report counts" in text
    assert re.search(rf"^total \(the file\)\s+{model.stat().st_size:,}\s+100\.00%$", text, re.M)
