"""model.residency=streamed with quantize.embeddings=quantize: the load lists the embedding
(and an untied head) as the resident load does, the run finishes, and the .hwq decodes to a
Hugging Face model whose embedding is the quantized one — and, tied, whose head is that same
quantized embedding (stored once)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import driver
from pipeline.config import ConfigError, RunConfig
from testkit.models import tiny_sharded_bf16_folder, write_corpus

EMB = "model.embed_tokens.weight"


def _cfg(folder: Path, store: Path, estimator: str = "fisher") -> RunConfig:
    return RunConfig.model_validate(
        {
            "name": "t",
            "model": {"name": "hf_causal_lm", "path": str(folder), "residency": "streamed"},
            "data": {
                "name": "text",
                "calibration": [str(folder.parent / "corpus.txt")],
                "calibration_windows": 4,
                "seq_len": 16,
            },
            "hessian": {"estimator": estimator, "partitions": 1, "groups": 2},
            "quantize": {"method": "ecsq", "target_bits": 3.0, "embeddings": "quantize"},
            "finetune": {"enabled": False},
            "store": {"url": str(store)},
        }
    )


def _folder(root: Path, tied: bool) -> Path:
    path = tiny_sharded_bf16_folder(root / "model", layers=2, tied=tied)
    write_corpus(root / "corpus.txt", lines=100)
    return path


def _stage(store: Path, name: str) -> Path:
    (d,) = (store / "stages").glob(f"{name}-*")
    return d


def _dense(quant: Path, rel: str) -> torch.Tensor:
    from safetensors.torch import load_file

    c = load_file(quant / rel)
    return torch.gather(c["codebooks"], 1, c["indices"].long()).to(torch.bfloat16)


def test_tied_embedding_quantized_streamed_and_decoded(ray_local, tmp_path):
    from transformers import AutoModelForCausalLM

    from pipeline.cli import main
    from pipeline.models.weights import WeightsFolder

    folder = _folder(tmp_path, tied=True)
    store = tmp_path / "store"
    report = driver.run(_cfg(folder, store))
    m = report["metrics"]
    meta = json.loads((_stage(store, "load") / "model.json").read_text())
    # as the resident load: the tied pair once, under the embedding's name, first
    assert meta["quantizable"][0] == EMB and "lm_head.weight" not in meta["quantizable"]
    assert meta["embeddings"] == [EMB] and meta["tied"] == {"lm_head.weight": EMB}
    # the Fisher's embedding comes from the group starting at block 0
    assert m["hessian"]["block_groups"][0][0] == 0
    assert m["encode"]["embeddings"]["names"] == [EMB]
    assert m["encode"]["embeddings"]["bits_per_weight"] > 0

    quant = _stage(store, "quantize")
    codes = json.loads((quant / "codes.json").read_text())["codes"]
    want = _dense(quant, codes[EMB])
    orig = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    assert not torch.equal(want, orig.model.embed_tokens.weight)  # it was quantized
    # rows hold few distinct values (the per-row codebook), not the original's
    assert max(len(torch.unique(r)) for r in want) <= 64

    enc = _stage(store, "encode")
    assert main(["decode", str(enc / "model.hwq"), "--hf-out", str(tmp_path / "hf")]) == 0
    # stored once: the decoded folder has the embedding and no separate head
    names = WeightsFolder(str(tmp_path / "hf")).names
    assert EMB in names and "lm_head.weight" not in names
    dec = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.bfloat16)
    assert torch.equal(dec.model.embed_tokens.weight, want)
    assert torch.equal(dec.lm_head.weight, want)  # the head is the quantized embedding
    name = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(dec.get_parameter(name), _dense(quant, codes[name]))
    assert np.isfinite(m["decoded_perplexity"])

    # One pipeline: the same config resident (the model loaded whole, then the same
    # per-tensor stages on the load stage's copy) writes the same file, byte for byte.
    cfg = _cfg(folder, tmp_path / "resident")
    cfg.model.residency = "resident"
    driver.run(cfg)
    rmeta = json.loads((_stage(tmp_path / "resident", "load") / "model.json").read_text())
    assert rmeta["embedding_roles"] == meta["embedding_roles"] and rmeta["tied"] == meta["tied"]
    assert (_stage(tmp_path / "resident", "encode") / "model.hwq").read_bytes() == \
        (enc / "model.hwq").read_bytes()


def test_untied_embedding_and_head_are_selected_and_activation_refuses_the_input(tmp_path):
    from pipeline.models.load_streamed import embedding_tensors, quantizable_names
    from pipeline.models.weights import WeightsFolder

    folder = _folder(tmp_path, tied=False)
    roles, tied = embedding_tensors(str(folder), None)
    assert roles == {EMB: "input", "lm_head.weight": "head"} and tied == {}
    w = WeightsFolder(str(folder))
    shapes = {n: tuple(t.shape) for n, t in w.tensors.items()}
    names = quantizable_names(_cfg(folder, tmp_path / "s"), w.names, shapes, roles)
    # resident order: the embedding first, the block weights, the head last
    assert names[0] == EMB and names[-1] == "lm_head.weight" and len(names) == 2 + 2 * 7
    with pytest.raises(ConfigError, match="not tied to the head"):
        quantizable_names(_cfg(folder, tmp_path / "s", "activation"), w.names, shapes, roles)


@pytest.mark.parametrize("tied", [False, True])
def test_embeddings_head_selects_the_head_alone_in_both_residencies(tmp_path, tied):
    """quantize.embeddings=head: the output head (a tied pair's one tensor) and not an untied
    input embedding, so the activation estimator covers it; the resident selection agrees."""
    from transformers import AutoModelForCausalLM

    from pipeline.models.load_streamed import embedding_tensors, quantizable_names
    from pipeline.models.weights import WeightsFolder
    from pipeline.workload import Workload

    folder = _folder(tmp_path, tied=tied)
    roles, _ = embedding_tensors(str(folder), None)
    w = WeightsFolder(str(folder))
    shapes = {n: tuple(t.shape) for n, t in w.tensors.items()}
    cfg = _cfg(folder, tmp_path / "s", "activation")
    cfg.quantize.embeddings = "head"
    names = quantizable_names(cfg, w.names, shapes, roles)
    head = EMB if tied else "lm_head.weight"
    assert head in names and len(names) == 1 + 2 * 7
    assert tied or EMB not in names
    cfg.model.residency = "resident"
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert sorted(Workload(cfg).quantizable(model)) == sorted(names)
