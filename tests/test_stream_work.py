"""The streamed work folder is untrusted: each of the issue's attacks on a completed tiny run
either makes the affected stage recompute (the same final files as an untouched run) or
fails with one line — never exit 0 with a wrong file. Then a bounded, seeded fuzz of the
same folder under the same rule."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import struct
from pathlib import Path

import pytest
import torch

from pipeline.models.weights import write_folder
from testkit.models import tiny_llama, tiny_tokenizer

ARGS = ["--windows", "2", "--seq-len", "8", "--bits", "3"]
FINAL = "model.hwq"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("sw") / "model"
    m = tiny_llama(layers=2, hidden=32).to(torch.bfloat16)
    m.config.save_pretrained(path)
    tiny_tokenizer(300).save_pretrained(path)
    sd = dict(m.state_dict())
    write_folder(
        path, sd, [(n, t.dtype, tuple(t.shape)) for n, t in sd.items()], max_shard_bytes=30_000
    )
    return path


def _stream(model: Path, work: Path, capsys) -> tuple[int, str]:
    from pipeline.cli import main

    rc = main(["stream", str(model), str(work), *ARGS])
    return rc, capsys.readouterr().err


@pytest.fixture(scope="module")
def reference(ray_local, model, tmp_path_factory):
    """A completed run's work folder, never modified by the tests (they copy it)."""
    from pipeline.cli import main

    work = tmp_path_factory.mktemp("ref") / "work"
    assert main(["stream", str(model), str(work), *ARGS]) == 0
    return work


def _finals(work: Path) -> dict[str, bytes]:
    """What a user takes from a run: the .hwq, hf/ and the decoded folder."""
    out = {FINAL: (work / FINAL).read_bytes()}
    for sub in ("hf", "decoded"):
        for p in sorted((work / sub).iterdir()):
            out[f"{sub}/{p.name}"] = p.read_bytes()
    return out


def _copy(reference: Path, tmp_path: Path) -> Path:
    work = tmp_path / "work"
    shutil.copytree(reference, work)
    return work


def _check_rerun(model, reference, work, capsys) -> int:
    """Rerun: exit 0 with the reference's final files, or exit 2 with one line."""
    rc, err = _stream(model, work, capsys)
    if rc == 0:
        assert _finals(work) == _finals(reference)
    else:
        lines = [ln for ln in err.splitlines() if ln.startswith("hwq: error:")]
        assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return rc


def _zero_tensor(path: Path, name: str) -> None:
    """Zero one tensor's bytes in a safetensors file, in place (same size)."""
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack_from("<Q", data)
    b, e = json.loads(data[8 : 8 + n])[name]["data_offsets"]
    data[8 + n + b : 8 + n + e] = bytes(e - b)
    path.write_bytes(bytes(data))


def test_codes_zeroed_after_quantize_are_recomputed(model, reference, tmp_path, capsys):
    """--until quantize, then indices zeroed (same size): the next run re-hashes the codes,
    recomputes quantize and writes the untouched run's file (today: encoded, exit 0)."""
    work = _copy(reference, tmp_path)
    for stage in ("encode", "decode"):
        (work / "manifests" / f"{stage}.json").unlink()
    _zero_tensor(work / "codes" / "00000.safetensors", "indices")
    assert _stream(model, work, capsys)[0] == 0
    assert _finals(work) == _finals(reference)
    q = json.loads((work / "manifests" / "quantize.json").read_text())
    assert not q.get("cached")  # recomputed, not a size-only hit


def test_a_manifest_naming_a_file_outside_the_folder_is_not_followed(
    model, reference, tmp_path, capsys
):
    """The quantize manifest names ../evil/e.safetensors (zeroed codes, its digest recorded):
    the manifest is invalid, quantize recomputes, the evil file is never encoded."""
    work = _copy(reference, tmp_path)
    evil = tmp_path / "evil" / "e.safetensors"
    evil.parent.mkdir()
    shutil.copy(work / "codes" / "00000.safetensors", evil)
    _zero_tensor(evil, "indices")
    mpath = work / "manifests" / "quantize.json"
    m = json.loads(mpath.read_text())
    name = next(n for n, r in m["codes"].items() if r == "codes/00000.safetensors")
    m["codes"][name] = "../evil/e.safetensors"
    del m["outputs"]["codes/00000.safetensors"]
    m["outputs"]["../evil/e.safetensors"] = {
        "bytes": evil.stat().st_size,
        "sha256": hashlib.sha256(evil.read_bytes()).hexdigest(),
    }
    mpath.write_text(json.dumps(m))
    (work / "manifests" / "encode.json").unlink()
    assert _stream(model, work, capsys)[0] == 0
    assert _finals(work) == _finals(reference)


def test_a_swapped_decoded_shard_with_rewritten_digests_is_recomputed(
    model, reference, tmp_path, capsys
):
    work = _copy(reference, tmp_path)
    dec = work / "decoded"
    index = json.loads((dec / "model.safetensors.index.json").read_text())
    shard = sorted(index["metadata"]["hwq_shard_sha256"])[0]
    name = next(n for n, s in index["weight_map"].items() if s == shard)
    _zero_tensor(dec / shard, name)
    data = (dec / shard).read_bytes()
    (n,) = struct.unpack_from("<Q", data)
    b, e = json.loads(data[8 : 8 + n])[name]["data_offsets"]
    index["metadata"]["hwq_tensor_sha256"][name] = hashlib.sha256(
        data[8 + n + b : 8 + n + e]
    ).hexdigest()
    index["metadata"]["hwq_shard_sha256"][shard] = hashlib.sha256(data).hexdigest()
    (dec / "model.safetensors.index.json").write_text(json.dumps(index, indent=1, sort_keys=True))
    assert _stream(model, work, capsys)[0] == 0
    assert _finals(work) == _finals(reference)


def test_a_flipped_byte_of_model_hwq_is_recomputed(model, reference, tmp_path, capsys):
    work = _copy(reference, tmp_path)
    data = bytearray((work / FINAL).read_bytes())
    data[len(data) // 2] ^= 0x10
    (work / FINAL).write_bytes(bytes(data))
    assert _stream(model, work, capsys)[0] == 0
    assert _finals(work) == _finals(reference)


def test_the_decoded_folder_has_tokenizer_and_generation_config(model, reference, tmp_path):
    """transformers loads the decoded folder's tokenizer, and `hwq decode --hf-out` of the
    streamed file finds hf/ beside it (no --hf-files)."""
    from transformers import AutoTokenizer

    from pipeline.cli import main

    dec = reference / "decoded"
    assert {"tokenizer.json", "generation_config.json", "config.json"} <= set(os.listdir(dec))
    want = AutoTokenizer.from_pretrained(model)("the lazy dog")["input_ids"]
    assert AutoTokenizer.from_pretrained(dec)("the lazy dog")["input_ids"] == want
    assert main(["decode", str(reference / FINAL), "--hf-out", str(tmp_path / "hf")]) == 0
    assert AutoTokenizer.from_pretrained(tmp_path / "hf")("the lazy dog")["input_ids"] == want


# -- fuzz ------------------------------------------------------------------------------------

_VALUES = (-1, 0, "x", None, [], {}, 1e308, "../../etc/passwd", "0" * 64, {"a": {"b": 1}})


def _mutate(work: Path, rng: random.Random) -> str:
    files = sorted(p for p in work.rglob("*") if p.is_file())
    p = rng.choice(files)
    rel = p.relative_to(work).as_posix()
    kinds = ["flip", "truncate", "folder", "symlink"]
    if p.suffix == ".json" and rel.startswith("manifests/"):
        kinds += ["field", "field", "rename"]
    kind = rng.choice(kinds)
    data = bytearray(p.read_bytes())
    if kind == "flip":
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        p.write_bytes(bytes(data))
    elif kind == "truncate":
        p.write_bytes(bytes(data[: rng.randrange(len(data))]))
    elif kind == "folder":
        p.unlink()
        p.mkdir()
    elif kind == "symlink":
        p.unlink()
        p.symlink_to(rng.choice(["/dev/zero", str(rng.choice(files))]))
    else:
        m = json.loads(data)
        if kind == "rename" and m.get("outputs"):
            k = rng.choice(sorted(m["outputs"]))
            m["outputs"][rng.choice(["../", "/tmp/", "./"]) + k] = m["outputs"].pop(k)
        else:
            field = rng.choice(sorted(m))
            if isinstance(m[field], dict) and m[field] and rng.random() < 0.7:
                m[field][rng.choice(sorted(m[field]))] = rng.choice(_VALUES)
            else:
                m[field] = rng.choice(_VALUES)
        p.write_text(json.dumps(m))
    return f"{kind} {rel}"


def test_fuzz_the_work_folder(model, reference, tmp_path, capsys):
    """Seeded mutations of a completed run's files: each rerun recomputes to the untouched
    run's files or fails with one line; a second rerun after a clean one is never wrong."""
    rng = random.Random(21)
    outcomes = []
    for i in range(8):
        work = _copy(reference, tmp_path / str(i))
        what = _mutate(work, rng)
        try:
            outcomes.append((what, _check_rerun(model, reference, work, capsys)))
        except AssertionError as e:
            raise AssertionError(f"mutation {i} ({what}): {e}") from None
    print(outcomes)
    assert any(rc == 0 for _, rc in outcomes)
