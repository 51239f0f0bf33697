"""A tiny Llama quantized per channel with the uniform method and quantize.serve_bits: 3 on
embedded Ray: every row of the file has at most 8 levels, the report says it serves at 3
bits, the runtime packs its Linears in 3 bits (2 where every row has at most 4 levels) and
computes with them what it computes from the reference levels, and `hwq export --snap` writes
it as compressed-tensors int4."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from pipeline.api import compress  # noqa: E402
from pipeline.cli import main  # noqa: E402
from testkit.models import tiny_llama_folder, write_corpus  # noqa: E402


def test_a_file_quantized_with_serve_bits_3_serves_at_3_bits(tmp_path, ray_local, capsys):
    from pipeline.encode.container import HwqReader
    from pipeline.report import render_markdown

    tiny_llama_folder(tmp_path / "llama")
    write_corpus(tmp_path / "calib.txt", 200, 1)
    r = compress(
        {
            "name": "serve-bits",
            "model": {"name": "hf_causal_lm", "path": str(tmp_path / "llama")},
            "data": {
                "name": "text",
                "calibration": [str(tmp_path / "calib.txt")],
                "calibration_windows": 8,
                "seq_len": 32,
            },
            "hessian": {"partitions": 1, "groups": 1},
            "quantize": {
                "method": "uniform",
                "scope": "channel",
                "target_bits": 2.5,
                "serve_bits": 3,
            },
            "finetune": {"enabled": False},
            "executor": {"num_cpus": 2},
            "store": {"url": str(tmp_path / "store")},
        },
        keep_ray=True,
    )
    enc = r["metrics"]["encode"]
    assert enc["serve"]["serve_bits"] == 3 and enc["serve"]["levels"] <= 8
    assert "Serves at **3 bits**" in render_markdown(r)
    reader = HwqReader(enc["file"])
    for name in reader.names:
        if any(x["name"] == name and x["kind"] == "quantized" for x in reader.inspect()):
            d = reader.read_codes(name)
            assert d["codebook"].shape[-1] <= 8 and int(np.max(d["codes"])) < 8, name
    _serves_at_3_bits(enc["file"])
    out = tmp_path / "ct"
    # hwq's uniform levels are bin means: refused as they are, written with --snap
    assert main(["export", enc["file"], str(out), "--format", "compressed-tensors"]) == 2
    assert "not a uniform grid" in capsys.readouterr().err
    assert main(["export", enc["file"], str(out), "--format", "compressed-tensors", "--snap"]) == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["weights"]["strategy"] == "channel"


def _serves_at_3_bits(path: str) -> None:
    from pipeline.encode.inspection import serve_width
    from pipeline.runtime import load
    from pipeline.runtime.modules import LutLinear

    fast, _ = load(path, mode="fast", threads=2)
    luts = [m for m in fast.modules() if isinstance(m, LutLinear)]
    assert luts and max(m.bits for m in luts) == 3, fast.hwq_runtime["bits"]
    assert all(
        m.bits == serve_width(m.levels) and m.idx.shape[1] == -(-m.in_features // 32) * 12
        for m in luts
        if m.bits == 3
    )
    ref, _ = load(path, mode="reference", threads=1)
    ids = torch.arange(1, 17)[None, :] % fast.config.vocab_size
    with torch.no_grad():
        a, b = fast(ids).logits.double(), ref(ids).logits.double()
    assert ((a - b).abs().max() / b.abs().max()).item() < 0.05  # int8 levels and activations
