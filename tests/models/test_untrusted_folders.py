"""Hostile model folders and GGUF files: each is refused with one line (a UserError naming
the file and what is wrong) before anything is built, unpickled or run (issue 21)."""

from __future__ import annotations

import ast
import json
import pickle
import struct
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from pipeline.errors import UserError  # noqa: E402
from pipeline.models import make_adapter  # noqa: E402
from pipeline.models.folder_checks import ModelFileError  # noqa: E402
from pipeline.models.weights import INDEX, WeightsError, WeightsFolder, write_folder  # noqa: E402
from testkit.models import tiny_llama, tiny_tokenizer  # noqa: E402

VOCAB = 300


@pytest.fixture(scope="module")
def model():
    return tiny_llama(VOCAB, tie_word_embeddings=False)


@pytest.fixture
def folder(tmp_path, model):
    """A single-file tiny Llama folder with its tokenizer."""
    d = tmp_path / "m"
    model.save_pretrained(d)
    tiny_tokenizer(VOCAB).save_pretrained(d)
    return d


def _hwq_folder(d: Path, model) -> Path:
    """The model as a folder written by hwq's ShardedWriter: per-tensor sha256 in the index."""
    sd = {n: t.contiguous() for n, t in model.state_dict().items()}
    write_folder(d, sd, [(n, t.dtype, tuple(t.shape)) for n, t in sd.items()],
                 max_shard_bytes=60_000)
    model.config.save_pretrained(d)
    tiny_tokenizer(VOCAB).save_pretrained(d)
    return d


def _edit_config(d: Path, **kw) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(kw)
    (d / "config.json").write_text(json.dumps(cfg))


def _stream(d):
    from pipeline.models.stream import StreamedLM

    return StreamedLM(str(d))


def _resident(d):
    return make_adapter("hf_causal_lm", path=str(d)).load()


# -- item 4: config.json's sizes against the weights ---------------------------------------------


@pytest.mark.parametrize("load", [_stream, _resident], ids=["stream", "run"])
@pytest.mark.parametrize("field, value, match", [
    ("num_hidden_layers", 10_000, "num_hidden_layers is 10000, but the weights hold 2 numbered"),
    ("num_hidden_layers", 3, "num_hidden_layers is 3"),
    ("hidden_size", 1 << 40, "hidden_size is 1099511627776"),
    ("intermediate_size", 2000, "intermediate_size 2000 × hidden size 64"),
    ("vocab_size", 10**9, "vocab_size"),
    ("num_attention_heads", -1, "num_attention_heads is -1, not a non-negative integer"),
    ("max_position_embeddings", 1 << 40, "max_position_embeddings is 1099511627776"),
    ("hidden_size", "64", "hidden_size is '64'"),
])
def test_config_sizes_are_checked_before_the_model_is_built(folder, monkeypatch, load, field,
                                                            value, match):
    from transformers import AutoModelForCausalLM

    def never(*a, **k):
        raise AssertionError("a model was built from a config the weights cannot back")

    monkeypatch.setattr(AutoModelForCausalLM, "from_config", never)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", never)
    _edit_config(folder, **{field: value})
    with pytest.raises(ModelFileError, match=match) as e:
        load(folder)
    assert "config.json" in str(e.value) and "\n" not in str(e.value)


def test_streamed_skeleton_shapes_must_match_the_weights(folder):
    """Sizes that pass the bounds but disagree with the tensors: named before any block runs."""
    _edit_config(folder, intermediate_size=96)
    with pytest.raises(WeightsError, match=r"'model.layers.0.mlp.gate_proj.weight' is \[128, 64\] "
                                           r"in the weights, but config.json makes it \[96, 64\]"):
        _stream(folder)


# -- item 8: digests and links in the resident loader -------------------------------------------


@pytest.mark.parametrize("tied", [False, True])
def test_resident_loader_reads_hwq_folders_through_their_digests(tmp_path, tied):
    ref = tiny_llama(VOCAB, tie_word_embeddings=tied)
    d = _hwq_folder(tmp_path / "m", ref)
    if tied:  # the head is the embedding: a folder may hold it once
        index = json.loads((d / INDEX).read_text())
        del index["weight_map"]["lm_head.weight"]
        del index["metadata"]["hwq_tensor_sha256"]["lm_head.weight"]
        (d / INDEX).write_text(json.dumps(index))
    got = _resident(d)
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(got(ids).logits, ref(ids).logits, rtol=0, atol=0)
    assert all(p.device.type == "cpu" for p in got.parameters())


def test_resident_loader_refuses_a_lying_digest(tmp_path, model):
    d = _hwq_folder(tmp_path / "m", model)
    index = json.loads((d / INDEX).read_text())
    index["metadata"]["hwq_tensor_sha256"]["model.norm.weight"] = "0" * 64
    (d / INDEX).write_text(json.dumps(index))
    with pytest.raises(WeightsError, match="'model.norm.weight' does not match its sha256"):
        _resident(d)


def test_resident_loader_refuses_a_flipped_tensor_byte(tmp_path, model):
    d = _hwq_folder(tmp_path / "m", model)
    info = WeightsFolder(d).info("model.layers.1.mlp.down_proj.weight")
    data = bytearray((d / info.file).read_bytes())
    data[info.start + 5] ^= 1
    (d / info.file).write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="down_proj.weight' does not match its sha256"):
        _resident(d)


@pytest.mark.parametrize("kind", ["symlink", "folder", "fifo"])
def test_shards_must_be_regular_files(tmp_path, model, kind):
    import os

    d = _hwq_folder(tmp_path / "m", model)
    shard = sorted(d.glob("model-*.safetensors"))[0]
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes(shard.read_bytes())
    shard.unlink()
    if kind == "symlink":
        shard.symlink_to(outside)
        match = "symbolic link"
    elif kind == "folder":
        shard.mkdir()
        match = "not a regular file"
    else:
        os.mkfifo(shard)
        match = "not a regular file"
    for load in (WeightsFolder, _resident):
        with pytest.raises(UserError, match=match):
            load(d)


def test_a_hugging_face_cache_snapshot_reads_through_its_blob_links(tmp_path, model):
    """The Hub's cache keeps files as blobs and each snapshot's names as links to
    ../../blobs/HASH: such a folder loads; a link out of its cache folder is refused."""
    import hashlib
    import os

    src = _hwq_folder(tmp_path / "src", model)
    repo = tmp_path / "hub" / "models--org--tiny"
    snap = repo / "snapshots" / "0123abc"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        blob.write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    ref = WeightsFolder(src)
    got = WeightsFolder(snap)
    name = ref.names[0]
    assert torch.equal(got.read(name), ref.read(name))
    assert torch.equal(_resident(snap).state_dict()[name], model.state_dict()[name])
    shard = sorted(snap.glob("model-*.safetensors"))[0]
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes(shard.read_bytes())
    shard.unlink()
    shard.symlink_to(outside)
    with pytest.raises(UserError, match="symbolic link"):
        WeightsFolder(snap)


@pytest.mark.parametrize("shard, match", [
    ("a\0b.safetensors", "not a file name"),
    ("../m2/model.safetensors", "not a file name"),
    (["model.safetensors"], "is not a file name .a JSON list"),
    (7, "is not a file name .a JSON int"),
    ("weights.npz", "not a .safetensors file"),
])
def test_index_shard_names_are_plain_safetensors_names(folder, shard, match):
    (folder / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": {"x": shard}}))
    for load in (WeightsFolder, _resident, _stream):
        with pytest.raises(UserError, match=match):
            load(folder)


# -- item 10: pickles --------------------------------------------------------------------------


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "ran"))


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "w.pth", "w.ckpt", "w.pkl"])
def test_an_index_naming_a_pickle_is_refused(folder, tmp_path, name):
    marker = tmp_path / "unpickled"
    (folder / name).write_bytes(pickle.dumps(_Payload(str(marker))))
    (folder / "model.safetensors").unlink()
    (folder / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": {
        n: name for n in ("model.embed_tokens.weight", "lm_head.weight")}}))
    for load in (_resident, WeightsFolder):
        with pytest.raises(UserError, match=f"{name!r} is a pickle, which hwq never loads.*"
                                            "convert the weights to safetensors"):
            load(folder)
    assert not marker.exists()


def test_an_index_naming_a_pickle_on_s3_is_refused_before_download(folder, tmp_path, s3_bucket):
    import s3fs

    url, opts = s3_bucket
    fs = s3fs.S3FileSystem(**opts)
    root = url.removeprefix("s3://") + "/p"
    fs.pipe_file(f"{root}/config.json", (folder / "config.json").read_bytes())
    fs.pipe_file(f"{root}/pytorch_model.bin", pickle.dumps(_Payload(str(tmp_path / "ran"))))
    fs.pipe_file(f"{root}/{INDEX}", json.dumps(
        {"metadata": {}, "weight_map": {"a": "pytorch_model.bin"}}).encode())
    adapter = make_adapter("hf_causal_lm", path=f"s3://{root}", storage_options=opts,
                           cache_dir=str(tmp_path / "cache"))
    with pytest.raises(UserError, match="'pytorch_model.bin' is a pickle"):
        adapter.resolve()
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.bin"))


# -- item 9: remote code ------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["llama", "evil"])
def test_auto_map_code_never_runs(folder, tmp_path, monkeypatch, model_type):
    marker = tmp_path / "code-ran"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                    "from transformers import LlamaConfig as EvilConfig\n"
                                    "from transformers import LlamaForCausalLM as EvilModel\n")
    _edit_config(folder, model_type=model_type, auto_map={
        "AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel",
        "AutoTokenizer": ["evil.EvilConfig", None]})
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["auto_map"] = {"AutoTokenizer": ["evil.EvilConfig", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    asked = []
    monkeypatch.setattr("builtins.input", lambda *a: asked.append(a) or "y")

    def attempt(fn):
        try:
            fn()
        except UserError:
            pass  # an unknown model_type is a clean refusal

    attempt(lambda: make_adapter("hf_causal_lm", path=str(folder)).load())
    attempt(lambda: make_adapter("hf_causal_lm", path=str(folder))._embedding_rows())
    attempt(lambda: make_adapter("hf_causal_lm", path=str(folder)).tokenizer())
    attempt(lambda: _stream(folder))
    from pipeline.models.hf_causal import skeleton_from_folder

    attempt(lambda: skeleton_from_folder(folder))
    assert not marker.exists() and not asked


def test_every_transformers_auto_call_refuses_remote_code():
    """Every Auto*.from_pretrained/from_config call in pipeline/ passes trust_remote_code=False
    by keyword (a `**kw` alone does not count)."""
    root = Path(__file__).resolve().parents[2] / "pipeline"
    calls = bad = 0
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("from_pretrained", "from_config")):
                continue
            owner = node.func.value
            name = owner.id if isinstance(owner, ast.Name) else getattr(owner, "attr", "")
            if not name.startswith("Auto"):
                continue
            calls += 1
            ok = any(k.arg == "trust_remote_code" and isinstance(k.value, ast.Constant)
                     and k.value.value is False for k in node.keywords)
            if not ok:
                bad += 1
                print(f"{path}:{node.lineno}: {ast.unparse(node)[:100]}")
    assert calls >= 6 and bad == 0


# -- item 12: malformed JSON, tokenizers ---------------------------------------------------------


@pytest.mark.parametrize("name", ["config.json", INDEX, "tokenizer_config.json",
                                  "tokenizer.json"])
def test_deeply_nested_json_is_one_line(folder, name):
    (folder / name).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ModelFileError, match="nests JSON too deeply") as e:
        make_adapter("hf_causal_lm", path=str(folder)).resolve()
    assert name in str(e.value)


@pytest.mark.parametrize("entry, match", [
    ({"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}, "has dtype"),
    ({"dtype": {"F32": 1}, "shape": [1], "data_offsets": [0, 4]}, "has dtype"),
    ({"dtype": "F32", "shape": "1", "data_offsets": [0, 4]}, "malformed"),
    ({"dtype": "F32", "shape": [1], "data_offsets": [0.0, 4]}, "malformed"),
    ({"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}, "malformed"),
])
def test_safetensors_header_fields_of_the_wrong_type(tmp_path, entry, match):
    h = json.dumps({"a": entry}).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(h)) + h + b"\0" * 4)
    with pytest.raises(WeightsError, match=match):
        WeightsFolder(tmp_path)


@pytest.mark.parametrize("index", [
    {"weight_map": ["model.safetensors"]}, {"weight_map": {"a": "model.safetensors"},
                                            "metadata": [1]},
    {"weight_map": {"a": "model.safetensors"}, "metadata": {"hwq_tensor_sha256": {"a": 5}}},
    [1, 2],
])
def test_index_of_the_wrong_shape(folder, index):
    (folder / INDEX).write_text(json.dumps(index))
    for load in (WeightsFolder, _resident):
        with pytest.raises(UserError):
            load(folder)


def _break_tokenizer(folder: Path, how: str) -> None:
    tj = json.loads((folder / "tokenizer.json").read_text())
    if how == "panic":  # the Rust library panics: a BaseException, not an Exception
        tj["normalizer"] = {"type": "Precompiled", "precompiled_charsmap": "AAAA"}
    elif how == "regex":
        tj["pre_tokenizer"] = {"type": "Split", "pattern": {"Regex": "("},
                               "behavior": "Isolated", "invert": False}
    else:  # loads, then fails on every text
        tj["model"] = {"type": "WordPiece", "unk_token": "[UNK]", "vocab": {"a": 0},
                       "continuing_subword_prefix": "##", "max_input_chars_per_word": 100}
    (folder / "tokenizer.json").write_text(json.dumps(tj))


@pytest.mark.parametrize("how", ["panic", "regex"])
def test_a_tokenizer_that_fails_to_load_is_one_line(folder, how):
    from pipeline.data.text import TokenizerError, load_tokenizer

    _break_tokenizer(folder, how)
    with pytest.raises(TokenizerError, match="cannot load its tokenizer") as e:
        make_adapter("hf_causal_lm", path=str(folder)).tokenizer()
    assert str(folder) in str(e.value)
    with pytest.raises(TokenizerError, match=str(folder)):
        load_tokenizer(folder)


def test_a_tokenizer_that_fails_on_text_is_one_line(folder):
    from pipeline.data.text import TokenizerError, calibration_windows, load_tokenizer

    _break_tokenizer(folder, "use")
    tok = load_tokenizer(folder)
    with pytest.raises(TokenizerError, match=f"tokenizer of '{folder}' failed on the text"):
        calibration_windows(tok, "some text here", 1, 2, 0)


# -- item 3: GGUF metadata -----------------------------------------------------------------------


def _gguf_plus_array(g: bytes, itype: int, count: int, payload: bytes) -> bytes:
    n_keys = struct.unpack_from("<Q", g, 16)[0]
    key = b"tokenizer.ggml.extra"
    kv = struct.pack("<Q", len(key)) + key + struct.pack("<IIQ", 9, itype, count) + payload
    return g[:16] + struct.pack("<Q", n_keys + 1) + kv + g[24:]


@pytest.mark.parametrize("itype, count, payload, match", [
    (0, 5 << 20, bytes(5 << 20), "an array of 5242880 items .at most 1048576"),
    (0, 300_000, bytes(300_000), "more than 65536 items in all"),  # a small file: few items
    (0, 1 << 62, b"", "an array of 4611686018427387904 items"),
    (8, 1 << 40, b"\0" * 64, "an array of 1099511627776 items"),
    # the counts below read the rest of the file as the array's items, then misparse
    (8, 1000, b"\0" * 64, "bytes long .at most"),
    (4, 10, b"\0" * 8, "metadata key 2 is 7308604896145334642 bytes long"),
])
def test_gguf_metadata_is_bounded_before_transformers_reads_it(tmp_path, model, monkeypatch,
                                                               itype, count, payload, match):
    import gguf

    from tests.models.test_adapters import write_llama_gguf

    def never(*a, **k):
        raise AssertionError("gguf's reader saw a file hwq should have refused")

    write_llama_gguf(model, tmp_path / "ok.gguf")
    (tmp_path / "bad.gguf").write_bytes(
        _gguf_plus_array((tmp_path / "ok.gguf").read_bytes(), itype, count, payload))
    monkeypatch.setattr(gguf, "GGUFReader", never)
    with pytest.raises(ModelFileError, match=match) as e:
        make_adapter("hf_causal_lm", path=str(tmp_path / "bad.gguf")).load()
    assert "bad.gguf' is not a GGUF file hwq can read" in str(e.value)


def test_gguf_truncated_anywhere_is_one_line(tmp_path, model):
    from pipeline.models.gguf_check import check_gguf
    from tests.models.test_adapters import write_llama_gguf

    write_llama_gguf(model, tmp_path / "ok.gguf")
    g = (tmp_path / "ok.gguf").read_bytes()
    assert check_gguf(tmp_path / "ok.gguf")["tensors"] == 21
    for cut in (0, 3, 4, 23, 24, 25, 100, 1000, len(g) // 2, len(g) - 1):
        (tmp_path / "t.gguf").write_bytes(g[:cut])
        with pytest.raises(ModelFileError, match="t.gguf"):
            check_gguf(tmp_path / "t.gguf")
