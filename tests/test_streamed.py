"""`hwq stream` (hwq run with model.residency=streamed) on a tiny sharded bf16 Llama: the stage
graph under the driver, per-tensor codes files, manifests with memory figures, a .hwq that
decodes to the codebooks at the codes, cache hits on a rerun, and a store that is untrusted
(a changed file or a lying unit record is recomputed, never used). One streamed run is shared
by the tests; each test that changes the store changes a copy of it."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.models.weights import WeightsFolder
from testkit.models import tiny_sharded_bf16_folder, write_corpus

ARGS = ["--windows", "3", "--seq-len", "16", "--bits", "3", "--partitions", "2",
        "--groups", "2", "--cpus", "2"]


@pytest.fixture(scope="module")
def bf16_folder(tmp_path_factory):
    return tiny_sharded_bf16_folder(tmp_path_factory.mktemp("scale") / "model")


def _stream(model, work, *extra: str) -> tuple[int, str]:
    """`hwq stream MODEL WORK ARGS extra`: (exit code, what it printed)."""
    from pipeline.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["stream", str(model), str(work), *ARGS, *extra])
    return rc, buf.getvalue()


@pytest.fixture(scope="module")
def reference(ray_local, bf16_folder, tmp_path_factory):
    """A completed run's store with a calibration text and an eval text; never modified by
    the tests (they copy it). Returns (store, stdout, text file)."""
    tmp = tmp_path_factory.mktemp("ref")
    text = write_corpus(tmp / "calib.txt")
    work = tmp / "work"
    rc, out = _stream(bf16_folder, work, "--text", str(text), "--eval", str(text),
                      "--eval-seq-len", "32", "--eval-windows", "2")
    assert rc == 0
    return work, out, text


def _stage(work: Path, name: str) -> Path:
    """The stage folder of the last run in `work` (from its run.json)."""
    stages = dict(json.loads((work / "run.json").read_text())["stages"])
    return work / "stages" / f"{name}-{stages[name]}"


def _manifest(work: Path, name: str) -> dict:
    return json.loads((_stage(work, name) / "manifest.json").read_text())


def _copy(reference, tmp_path: Path) -> Path:
    work = tmp_path / "work"
    shutil.copytree(reference[0], work)
    return work


def _rerun(bf16_folder, reference, work: Path, *extra: str) -> dict:
    """The reference's command again on `work`; returns its report.json (with --until, which
    writes none: {})."""
    text = str(reference[2])
    rc, _ = _stream(bf16_folder, work, "--text", text, "--eval", text, "--eval-seq-len", "32",
                    "--eval-windows", "2", *extra)
    assert rc == 0
    return {} if "--until" in extra else json.loads((work / "report.json").read_text())


def _flip(path: Path, at: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if at is None else at] ^= 0x10
    path.write_bytes(bytes(data))


def _bf16_bits(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.int16).numpy().view(np.uint16)


def test_streamed_run_end_to_end(reference, bf16_folder, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.cli import main
    from pipeline.encode.container import read_hwq
    from pipeline.encode.container.reader import one_tensor_decode

    work, out, _ = reference
    assert "model.hwq" in out and "perplexity" in out
    assert {"report.md", "report.json", "run.json", "config.yaml"} <= {
        p.name for p in work.iterdir()}
    for name in ("load", "hessian", "quantize", "encode"):
        m = _manifest(work, name)
        assert m["memory"]["driver_peak_rss"] > 0 and m["memory"]["workers"], name
        assert all(w["peak_rss"] > 0 for w in m["memory"]["workers"]), name
    h = _manifest(work, "hessian")["metrics"]["hessian"]
    assert (h["partitions"], h["groups"], h["units"]["computed"]) == (2, 2, 6)
    q = _manifest(work, "quantize")["metrics"]["quantize"]
    assert 2.9 <= q["coded_rate_bits"] <= 3.0  # the exact-rate loop's window
    assert q["units"]["total"] == 14 and q["weights_per_s"] > 0

    quant = _stage(work, "quantize")
    codes = json.loads((quant / "codes.json").read_text())["codes"]
    # Each quantize task read only its own tensor (and the shard headers).
    src = WeightsFolder(bf16_folder)
    assert q["bytes_read"] == sum(src.info(n).nbytes + src.header_bytes for n in codes)

    # The .hwq decodes to the per-row codebook at the stored codes, in the tensor's dtype;
    # the other tensors bit for bit as stored.
    enc = _stage(work, "encode")
    e = _manifest(work, "encode")["metrics"]
    assert e["encode"]["decode_check"]["tensors"] == len(src.names)
    got = read_hwq(enc / "model.hwq")
    assert set(got) == set(src.names)
    for n in src.names:
        if n in codes:
            from safetensors.torch import load_file

            c = load_file(quant / codes[n])
            want = torch.gather(c["codebooks"], 1, c["indices"].long()).to(torch.bfloat16)
            assert c["codebooks"].shape[1] <= 64
        else:
            want = src.read(n)
        assert np.array_equal(np.asarray(got[n]), _bf16_bits(want)), n

    # Perplexities (load: the original's; encode: the decoded file's), both streamed block by
    # block, equal the whole model's on the same windows.
    from safetensors.torch import load_file

    ev = load_file(_stage(work, "load") / "windows.safetensors")["eval/eval"]
    assert list(ev.shape) == [2, 32]

    def ppl(model) -> float:
        with torch.no_grad():
            logits = model.float()(input_ids=ev).logits[:, :-1]
            return float(torch.exp(torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), ev[:, 1:].reshape(-1))))

    orig = AutoModelForCausalLM.from_pretrained(bf16_folder, dtype=torch.bfloat16)
    base = _manifest(work, "load")["metrics"]["baseline_perplexity"]
    assert base == pytest.approx(ppl(orig), rel=1e-4)
    # `hwq decode --hf-out` finds hf/ beside the stage's model.hwq (config, tokenizer).
    assert main(["decode", str(enc / "model.hwq"), "--hf-out", str(tmp_path / "hf")]) == 0
    dec = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.bfloat16)
    assert e["decoded_perplexity"] == pytest.approx(ppl(dec), rel=1e-4)
    want_ids = AutoTokenizer.from_pretrained(bf16_folder)("the lazy dog")["input_ids"]
    assert AutoTokenizer.from_pretrained(tmp_path / "hf")("the lazy dog")["input_ids"] == want_ids

    one = one_tensor_decode(str(enc / "model.hwq"), "model.layers.1.mlp.down_proj.weight")
    assert one["bytes_read"] == one["header_bytes"] + one["tensor_section_bytes"]
    assert one["bytes_read"] < one["file_bytes"] / 4


def test_a_rerun_is_all_cache_hits(reference, bf16_folder, tmp_path):
    work = _copy(reference, tmp_path)
    report = _rerun(bf16_folder, reference, work)
    assert all(s["cached"] for s in report["stages"].values()), report["stages"]


def test_a_flipped_codes_file_and_a_lying_unit_record_are_recomputed(reference, bf16_folder,
                                                                    tmp_path):
    """One byte of k_proj's codes file (same size), and q_proj's unit record naming o_proj's
    codes file (same shape, its true digest): the quantize stage fails verification, resumes
    in its folder, believes neither, quantizes those two tensors again and reuses the other
    12; the same .hwq comes out. (Before records had to list their unit's own file, q_proj
    was encoded from o_proj's codes.)"""
    work = _copy(reference, tmp_path)
    quant = _stage(work, "quantize")
    codes = json.loads((quant / "codes.json").read_text())["codes"]
    _flip(quant / codes["model.layers.0.self_attn.k_proj.weight"])
    recs = {json.loads(p.read_text())["fields"]["name"]: p for p in (quant / "units").iterdir()}
    q_rec = json.loads(recs["model.layers.0.self_attn.q_proj.weight"].read_text())
    o_rec = json.loads(recs["model.layers.0.self_attn.o_proj.weight"].read_text())
    q_rec["outputs"] = o_rec["outputs"]
    recs["model.layers.0.self_attn.q_proj.weight"].write_text(json.dumps(q_rec))
    report = _rerun(bf16_folder, reference, work)
    st = report["stages"]
    assert st["hessian"]["cached"] and not st["quantize"]["cached"]
    assert _manifest(work, "quantize")["metrics"]["quantize"]["units"]["reused"] == 12
    ref_hwq = _stage(reference[0], "encode") / "model.hwq"
    assert (_stage(work, "encode") / "model.hwq").read_bytes() == ref_hwq.read_bytes()


# (22 s; a hessian group's unit record against its file is also tests/hessian/
# test_hessian_resume.py's and test_handover.py's, in `make test`)
@pytest.mark.slow
def test_a_flipped_hessian_table_is_recomputed(reference, bf16_folder, tmp_path):
    """One byte of a group's Hessian table: the hessian stage recomputes that group only (the
    other group's record verifies) and writes the same table."""
    work = _copy(reference, tmp_path)
    hess = _stage(work, "hessian")
    good = (hess / "hessian" / "g0.parquet").read_bytes()
    _flip(hess / "hessian" / "g0.parquet")
    _rerun(bf16_folder, reference, work, "--until", "hessian")
    h = _manifest(work, "hessian")
    assert h["metrics"]["hessian"]["units"]["reused"] == 3  # g1 and its two partials
    assert (hess / "hessian" / "g0.parquet").read_bytes() == good


def test_streamed_run_on_s3(ray_local, bf16_folder, s3_bucket):
    """Model and store on the S3 server: range reads of the model, the stages' files on the
    store; a rerun is all cache hits; a flipped byte of the .hwq is recomputed. Run as the
    config `hwq stream` stands for, with the store's credentials in it (the Ray workers of an
    embedded Ray started before the S3 fixture set them do not see them in their
    environment)."""
    import s3fs

    from pipeline import driver
    from pipeline.api import to_config
    from pipeline.cli import build_parser
    from pipeline.encode.container.reader import one_tensor_decode
    from pipeline.stream_cli import stream_config

    url, opts = s3_bucket
    endpoint = opts["client_kwargs"]["endpoint_url"]
    fs = s3fs.S3FileSystem(**opts)
    fs.put(str(bf16_folder), f"{url[5:]}/model", recursive=True)
    # One partition and one group: what is checked here is the store and the model on S3 (the
    # units' split is the local reference run's: test_streamed_run_end_to_end).
    args = build_parser().parse_args(["stream", f"{url}/model", f"{url}/work", "--windows", "2",
                                      "--seq-len", "8", "--partitions", "1", "--groups", "1",
                                      "--endpoint-url", endpoint])
    cfg = stream_config(args)
    cfg["store"].update(key=opts["key"], secret=opts["secret"])

    def run() -> dict:
        report = driver.run(to_config(cfg))
        fs.invalidate_cache()
        return report

    first = run()
    enc = f"{url[5:]}/work/stages/encode-{first['stages']['encode']['key']}"
    hwq = f"{enc}/model.hwq"
    assert fs.exists(f"{enc}/manifest.json")
    one = one_tensor_decode(f"s3://{hwq}", "model.layers.0.mlp.up_proj.weight", opts)
    assert one["bytes_read"] == one["header_bytes"] + one["tensor_section_bytes"]
    # One flipped byte of the .hwq on the store (same size): the rerun's other stages are
    # cache hits (verified by size and ETag), the encode stage is not.
    good = fs.cat_file(hwq)
    fs.pipe_file(hwq, good[:100] + bytes([good[100] ^ 1]) + good[101:])
    fs.invalidate_cache()
    st = run()["stages"]
    assert all(st[s]["cached"] for s in ("load", "hessian", "quantize"))
    assert not st["encode"]["cached"]
    assert fs.cat_file(hwq) == good
