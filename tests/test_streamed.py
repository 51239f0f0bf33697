"""The streamed pipeline on a tiny sharded bf16 Llama: Ray tasks, per-tensor files, manifests
with memory figures, a decoded folder transformers loads, cache hits on a rerun."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.models.weights import WeightsFolder, write_folder
from pipeline.streamed import StreamSettings, _Work, one_tensor_decode, run_streamed
from testkit.models import tiny_llama, tiny_tokenizer, write_corpus


@pytest.fixture(scope="module")
def bf16_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("scale") / "model"
    model = tiny_llama(layers=2, hidden=64).to(torch.bfloat16)
    model.config.save_pretrained(path)
    tiny_tokenizer(300).save_pretrained(path)
    sd = {k: v for k, v in model.state_dict().items()}
    write_folder(path, sd, [(n, t.dtype, tuple(t.shape)) for n, t in sd.items()],
                 max_shard_bytes=60_000)
    return path


def test_streamed_pipeline_end_to_end(ray_local, bf16_folder, tmp_path):
    from transformers import AutoModelForCausalLM

    work = tmp_path / "work"
    st = StreamSettings(windows=3, seq_len=16, target_bits=3.0, slab_rows=24)
    ev = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(5))
    out = run_streamed(str(bf16_folder), str(work), st, eval_windows=ev)
    q = out["quantize"]
    assert abs(q["rate_bits"] - 3.0) < 0.1  # every row sampled at this size: the λ is exact
    for name in ("hessian", "quantize", "encode", "decode", "evaluate"):
        m = json.loads((work / "manifests" / f"{name}.json").read_text())
        assert m["memory"]["driver_peak_rss"] > 0 and m["memory"]["workers"]
        assert all(w["peak_rss"] > 0 for w in m["memory"]["workers"])
        assert (name == "evaluate" or m["weights_per_s"] > 0) and not out[name]["cached"]
    # Each quantize task read only its own tensor.
    src = WeightsFolder(bf16_folder)
    assert q["bytes_read"] == sum(src.info(n).nbytes + src.header_bytes for n in q["codes"])

    dec = AutoModelForCausalLM.from_pretrained(work / "decoded", dtype=torch.bfloat16)
    ref = {n: src.read(n) for n in src.names}
    got = dec.state_dict()
    for n, t in ref.items():
        if n in q["codes"]:
            # Decoded = the per-row codebook at the stored codes, in the tensor's dtype.
            codes = WeightsFolder(work / q["codes"][n])
            idx = codes.read("indices").long()
            cb = codes.read("codebooks")
            assert cb.shape[1] <= st.k_max
            want = torch.gather(cb, 1, idx).to(torch.bfloat16)
            assert torch.equal(got[n], want)
        else:
            assert torch.equal(got[n], t)  # stored as is, bit for bit

    def ppl(model):
        with torch.no_grad():
            logits = model.float()(input_ids=ev).logits[:, :-1]
            return float(torch.exp(torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), ev[:, 1:].reshape(-1))))

    e = out["evaluate"]  # both perplexities streamed block by block, equal to the whole model's
    assert e["decoded_perplexity"] == pytest.approx(ppl(dec), rel=1e-4)
    orig = AutoModelForCausalLM.from_pretrained(bf16_folder, dtype=torch.bfloat16)
    assert e["original_perplexity"] == pytest.approx(ppl(orig), rel=1e-4)

    one = one_tensor_decode(_Work(str(work)), "model.layers.1.mlp.down_proj.weight")
    assert one["bytes_read"] == one["header_bytes"] + one["tensor_section_bytes"]
    assert one["bytes_read"] < one["file_bytes"] / 4

    again = run_streamed(str(bf16_folder), str(work), st)
    assert all(m["cached"] for m in again.values())
    (work / q["codes"]["model.layers.0.self_attn.q_proj.weight"]).write_bytes(b"x")
    third = run_streamed(str(bf16_folder), str(work), st, stages=("hessian", "quantize"))
    assert third["hessian"]["cached"] and not third["quantize"]["cached"]
    np.testing.assert_allclose(third["quantize"]["rate_bits"], q["rate_bits"])


def test_hwq_stream_command(ray_local, bf16_folder, tmp_path, capsys):
    from pipeline.cli import main

    work = tmp_path / "w"
    text = write_corpus(tmp_path / "calib.txt")
    assert main(["stream", str(bf16_folder), str(work), "--bits", "2.5", "--windows", "2",
                 "--seq-len", "8", "--text", str(text), "--eval", str(text),
                 "--eval-seq-len", "32", "--eval-windows", "2"]) == 0
    out = capsys.readouterr().out
    assert "rate:" in out and "model.hwq" in out and "perplexity:" in out
    m = json.loads((work / "manifests" / "quantize.json").read_text())
    assert abs(m["rate_bits"] - 2.5) < 0.1
    e = json.loads((work / "manifests" / "evaluate.json").read_text())
    assert e["windows"] == [2, 32] and e["decoded_perplexity"] > 1


def test_stream_refuses_a_folder_without_weights(tmp_path):
    from pipeline.cli import main

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    assert main(["stream", str(tmp_path / "m"), str(tmp_path / "w")]) == 2


def test_streamed_pipeline_on_s3(ray_local, bf16_folder, s3_bucket):
    """Model and work folder on the S3 server: range reads, multipart writes, one-tensor
    decode reading only its sections."""
    import s3fs

    url, opts = s3_bucket
    fs = s3fs.S3FileSystem(**opts)
    fs.put(str(bf16_folder), f"{url[5:]}/model", recursive=True)
    st = StreamSettings(windows=2, seq_len=8, target_bits=3.0)
    out = run_streamed(f"{url}/model", f"{url}/work", st, storage_options=opts,
                       stages=("hessian", "quantize", "encode"))
    assert abs(out["quantize"]["rate_bits"] - 3.0) < 0.1
    one = one_tensor_decode(_Work(f"{url}/work", opts), "model.layers.0.mlp.up_proj.weight")
    assert one["bytes_read"] == one["header_bytes"] + one["tensor_section_bytes"]
    fs.invalidate_cache()
    assert fs.exists(f"{url}/work/manifests/encode.json")
    again = run_streamed(f"{url}/model", f"{url}/work", st, storage_options=opts,
                         stages=("hessian", "quantize", "encode"))
    assert all(m["cached"] for m in again.values())
    # One flipped byte of the .hwq on the store (same size): re-hashed, not a cache hit.
    hwq = f"{url[5:]}/work/model.hwq"
    good = fs.cat_file(hwq)
    fs.pipe_file(hwq, good[:100] + bytes([good[100] ^ 1]) + good[101:])
    fs.invalidate_cache()
    third = run_streamed(f"{url}/model", f"{url}/work", st, storage_options=opts,
                         stages=("hessian", "quantize", "encode"))
    assert third["quantize"]["cached"] and not third["encode"]["cached"]
    fs.invalidate_cache()
    assert fs.cat_file(hwq) == good
