"""A GGUF in the streamed residency: the load stage converts it one tensor at a time into a
float32 safetensors folder that holds exactly what the resident adapter's transformers load
holds (names, dtypes, values, config), and `auto` sizes it from its header."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("gguf")

from pipeline.config import RunConfig  # noqa: E402
from pipeline.models.weights import WeightsFolder  # noqa: E402
from pipeline.store import StageDir, Store  # noqa: E402
from testkit.models import tiny_llama, tiny_tokenizer, write_corpus, write_llama_gguf  # noqa: E402


def _cfg(gguf, store, **over) -> RunConfig:
    d = {
        "name": "t",
        "model": {"name": "hf_causal_lm", "path": str(gguf), "residency": "streamed"},
        "data": {
            "name": "text",
            "calibration": [str(gguf.parent / "corpus.txt")],
            "calibration_windows": 4,
            "seq_len": 16,
        },
        "hessian": {"estimator": "fisher", "partitions": 1, "groups": 1},
        "quantize": {"method": "uniform", "target_bits": 4.0, "embeddings": "keep"},
        "finetune": {"enabled": False},
        "store": {"url": str(store)},
    }
    for k, v in over.items():
        d[k] = {**d.get(k, {}), **v}
    return RunConfig.model_validate(d)


def _gguf(root, tied: bool, matrix_type: str):
    root.mkdir(parents=True, exist_ok=True)
    model = tiny_llama(tie_word_embeddings=tied, seed=1)
    path = write_llama_gguf(model, root / "tiny.gguf", matrix_type=matrix_type)
    tiny_tokenizer().save_pretrained(root)
    write_corpus(root / "corpus.txt", lines=120)
    return path


@pytest.mark.parametrize("tied, matrix_type", [(True, "Q8_0"), (False, "F16")])
def test_converted_folder_is_the_resident_load_bit_for_bit(
    tmp_path, tied, matrix_type, monkeypatch
):
    from pipeline.models import gguf_stream
    from pipeline.models.gguf_stream import WEIGHTS_DIR, convert_gguf
    from pipeline.models.hf_causal import save_folder_files
    from pipeline.workload import Workload, unique_state

    gguf = _gguf(tmp_path / "m", tied, matrix_type)
    cfg = _cfg(gguf, tmp_path / "store")
    out = StageDir(Store(str(tmp_path / "store")), "load", "k")
    monkeypatch.setattr(gguf_stream, "_CHUNK_BYTES", 1000)  # a few rows per dequantize call
    url, opts = convert_gguf(cfg, out, tokenizer=True)
    assert url == out.url(WEIGHTS_DIR)

    adapter = Workload(
        cfg.model_copy(update={"model": cfg.model.model_copy(update={"residency": "resident"})})
    ).adapter
    model = adapter.load()
    want, aliases = unique_state(model)
    assert bool(aliases) == tied  # tied: lm_head is an alias, stored once
    w = WeightsFolder(url, opts)
    assert w.names == list(want)  # the same names, in the model's order
    for n, t in want.items():
        got = w.read(n)
        assert got.dtype == t.dtype == torch.float32, n
        assert torch.equal(got.view(torch.int32), t.view(torch.int32)), n  # bit for bit
    assert w.sha256_all  # every tensor is checked when the stages read it

    # config.json is the one the resident load saves; the tokenizer files are there too
    folder = tmp_path / "store" / out.prefix / WEIGHTS_DIR
    conf = json.loads((folder / "config.json").read_text())
    assert conf["tie_word_embeddings"] is tied and conf["model_type"] == "llama"
    assert conf["use_cache"] is True  # hwq's passes run without a KV cache; users generate
    assert model.config.use_cache is False  # and the model in hand keeps running without one
    resident = tmp_path / "resident"
    save_folder_files(model, adapter.tokenizer(), resident)
    for f in ("config.json", "generation_config.json", "tokenizer_config.json"):
        assert json.loads((folder / f).read_text()) == json.loads((resident / f).read_text()), f
    assert (folder / "tokenizer.json").is_file()


def test_auto_residency_sizes_a_gguf_as_float32(tmp_path):
    from pipeline.models.source import resolve_residency

    gguf = _gguf(tmp_path / "m", True, "Q8_0")
    auto = {"model": {"residency": "auto"}}
    small = resolve_residency(_cfg(gguf, tmp_path, **auto, executor={"memory_budget": "300KB"}))
    assert small.model.residency == "streamed"
    big = resolve_residency(_cfg(gguf, tmp_path, **auto, executor={"memory_budget": "400KB"}))
    assert big.model.residency == "resident"


def test_identity_is_the_header_size_and_mtime(tmp_path):
    """The load stage's key changes with the file, without hashing its tensor data."""
    import os

    from pipeline.models.load_streamed import source_identity

    gguf = _gguf(tmp_path / "m", True, "F32")
    cfg = _cfg(gguf, tmp_path)
    first = source_identity(cfg)
    assert first == source_identity(cfg) and first["url"] == str(gguf)
    st = os.stat(gguf)
    os.utime(gguf, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert source_identity(cfg) != first


def test_a_streamed_run_of_a_gguf_finishes_and_its_file_decodes(tmp_path, ray_local):
    """`hwq run` on a Q8_0 GGUF, streamed: load converts it into its own folder, the later
    stages read that folder, the .hwq decodes to a model transformers loads."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline import driver
    from pipeline.cli import main

    gguf = _gguf(tmp_path / "m", True, "Q8_0")
    # two tensors quantized (the λ search is a Ray task per tensor and λ), every one encoded
    cfg = _cfg(
        gguf,
        tmp_path / "store",
        data={"calibration_windows": 2},
        quantize={"targets": ["*.mlp.down_proj.weight"]},
    )
    report = driver.run(cfg)
    m = report["metrics"]
    (load,) = (tmp_path / "store" / "stages").glob("load-*")
    assert not (load / "model.safetensors").exists()  # not the resident layout
    assert (load / "weights" / "model.safetensors.index.json").is_file()
    meta = json.loads((load / "model.json").read_text())
    assert meta["info"]["name"] == str(gguf) and meta["source"].endswith("/weights")
    assert meta["residency"] == "streamed" and meta["quantizable"] == [
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
    ]
    assert m["encode"]["decode_check"]["tensors"] == 2 * 9 + 2  # tied: no separate head
    (enc,) = (tmp_path / "store" / "stages").glob("encode-*")
    assert main(["decode", str(enc / "model.hwq"), "--hf-out", str(tmp_path / "hf")]) == 0
    dec = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    assert dec.config.tie_word_embeddings and dec.model.embed_tokens.weight.shape[0] == 300
    want = AutoTokenizer.from_pretrained(gguf.parent)("the lazy dog")["input_ids"]
    assert AutoTokenizer.from_pretrained(tmp_path / "hf")("the lazy dog")["input_ids"] == want


def test_a_truncated_gguf_is_one_error_line_when_streamed(tmp_path):
    import yaml

    from tests.test_cli_errors import _hwq, assert_user_error_line

    gguf = _gguf(tmp_path / "m", True, "F32")
    gguf.write_bytes(gguf.read_bytes()[: gguf.stat().st_size // 2])
    cfg = _cfg(gguf, tmp_path / "store").model_dump(mode="json", exclude_unset=True)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    p, _ = _hwq(["run", str(tmp_path / "run.yaml")])
    assert_user_error_line(p, "tiny.gguf", "truncated")


def test_a_gguf_missing_a_weight_is_refused_not_half_converted(tmp_path):
    """The resident load would initialise a missing weight at random; the streamed
    conversion names it and writes no index (the folder never looks complete)."""
    from types import SimpleNamespace

    from pipeline.models.gguf_stream import WEIGHTS_DIR, convert_gguf
    from pipeline.models.hf_causal import ModelSourceError

    model = tiny_llama(tie_word_embeddings=True)
    sd = {k: v for k, v in model.state_dict().items() if k != "model.layers.1.mlp.down_proj.weight"}
    (tmp_path / "m").mkdir()
    gguf = write_llama_gguf(
        SimpleNamespace(config=model.config, state_dict=lambda: sd), tmp_path / "m" / "tiny.gguf"
    )
    out = StageDir(Store(str(tmp_path / "store")), "load", "k")
    with pytest.raises(ModelSourceError, match="no tensor for model.layers.1.mlp.down_proj"):
        convert_gguf(_cfg(gguf, tmp_path / "store"), out, tokenizer=False)
    assert not (
        tmp_path / "store" / out.prefix / WEIGHTS_DIR / "model.safetensors.index.json"
    ).exists()
