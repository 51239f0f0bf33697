"""Model adapters: LeNet-5, factories, and Hugging Face causal LMs from a folder, shards, s3://
and a GGUF file, with their errors. Models are tiny random Llamas built here, offline."""

import json
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

transformers = pytest.importorskip("transformers")

from testkit.models import tiny_llama as _tiny_llama  # noqa: E402
from testkit.models import tiny_tokenizer  # noqa: E402

VOCAB = 300


def tiny_llama(vocab: int = VOCAB, seed: int = 0, **kw):
    kw.setdefault("tie_word_embeddings", False)
    return _tiny_llama(vocab, seed, **kw)


LINEARS = [f"model.layers.{i}.{m}.weight" for i in range(2) for m in
           ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A single-file model folder with its tokenizer; returns (folder, model)."""
    d = tmp_path_factory.mktemp("tiny_llama")
    model = tiny_llama()
    model.save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d, model


def _ids(n=2, length=12, vocab=VOCAB):
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(3))


def _same_logits(a, b, ids=None):
    ids = _ids() if ids is None else ids
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits.float(), b(ids).logits.float(),
                                   rtol=1e-5, atol=1e-5)


# -- registry and LeNet-5 -------------------------------------------------------------------


def test_registry_names_and_errors():
    from pipeline.models import ADAPTERS, adapter_names, get_adapter, make_adapter
    from pipeline.models.base import AdapterError

    assert {"lenet5", "factory", "hf_causal_lm"} <= set(adapter_names())
    assert get_adapter("hf_causal_lm").name == "hf_causal_lm" and "hf_causal_lm" in ADAPTERS
    with pytest.raises(AdapterError, match="did you mean 'hf_causal_lm'"):
        get_adapter("hf_causal")
    with pytest.raises(AdapterError, match="no option 'pth'; did you mean 'path'"):
        make_adapter("hf_causal_lm", pth="x")


def test_lenet5_adapter_keeps_todays_rules(tmp_path):
    from pipeline.models import REGISTRY, build, make_adapter, num_params

    adapter = make_adapter("lenet5")
    model = adapter.load()
    assert not model.training
    assert adapter.quantizable(model) == ["conv1.weight", "conv2.weight", "fc1.weight",
                                          "fc2.weight"]
    assert adapter.quantizable(model, ignore=["fc2"]) == ["conv1.weight", "conv2.weight",
                                                          "fc1.weight"]
    assert [n for n, _ in adapter.blocks(model)] == ["conv1", "conv2", "fc1", "fc2"]
    assert adapter.output_axis("fc1.weight") == 0 and adapter.output_axis("conv1.weight") == 0
    x, y = torch.randn(4, 1, 28, 28), torch.tensor([0, 3, 9, 1])
    loss = adapter.loss(model, (x, y))
    assert loss.dim() == 0
    torch.testing.assert_close(loss, nn.functional.cross_entropy(model(x), y))
    info = adapter.describe(model)
    assert (info.name, info.params, info.dtype) == ("lenet5", 431_080, "float32")
    # The old API is untouched.
    assert REGISTRY["lenet5"] is type(build("lenet5")) and num_params(build("lenet5")) == 431_080
    # A safetensors checkpoint is loaded (and validated by load_checkpoint).
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "m.st")
    again = make_adapter("lenet5", checkpoint=str(tmp_path / "m.st")).load()
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(),
                                                 model.state_dict().values(), strict=True))


# -- factories --------------------------------------------------------------------------------


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    name = "hwq_user_factory_mod"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn
        from pipeline.models.base import ModelAdapter

        def make(width=8):
            return nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 2))

        def not_a_model():
            return 3

        def my_loss(model, batch):
            return model(batch).pow(2).mean()

        def score(model, data):
            return 1.0
        score.direction = "lower"

        class Mine(ModelAdapter):
            def _load(self):
                return make()
            def loss(self, model, batch):
                return my_loss(model, batch)
        """))
    (tmp_path / "hwq_user_broken_mod.py").write_text("import hwq_no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for m in (name, "hwq_user_broken_mod"):
        monkeypatch.delitem(sys.modules, m, raising=False)
    yield name
    for m in (name, "hwq_user_broken_mod"):
        sys.modules.pop(m, None)


def test_factory_adapter_and_checkpoint(user_module, tmp_path):
    from pipeline.models import get_adapter, make_adapter

    adapter = make_adapter("factory", factory=f"{user_module}:make", kwargs={"width": 16},
                           loss_fn=f"{user_module}:my_loss")
    model = adapter.load()
    assert isinstance(model, nn.Sequential) and model[0].out_features == 16
    assert adapter.quantizable(model) == ["0.weight", "2.weight"]
    assert adapter.loss(model, torch.ones(3, 4)).dim() == 0
    torch.nn.init.constant_(model[0].weight, 0.5)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "w.st")
    again = make_adapter("factory", factory=f"{user_module}:make", kwargs={"width": 16},
                         checkpoint=str(tmp_path / "w.st")).load()
    assert torch.equal(again[0].weight, model[0].weight)
    # One's own adapter class by import path.
    cls = get_adapter(f"{user_module}:Mine")
    assert cls().loss(cls().load(), torch.ones(2, 4)).dim() == 0


def test_import_object_errors(user_module):
    from pipeline.models import make_adapter
    from pipeline.models.factory import ImportPathError, import_callable, import_object

    assert callable(import_object(f"{user_module}:make"))
    with pytest.raises(ImportPathError, match="expected 'package.module:name'"):
        import_object(user_module)
    with pytest.raises(ImportPathError, match="no module named 'hwq_nope_mod'"):
        import_object("hwq_nope_mod:make")
    with pytest.raises(ImportPathError, match="has no attribute 'mkae'; did you mean 'make'"):
        import_object(f"{user_module}:mkae")
    with pytest.raises(ImportPathError, match="failed to import.*hwq_no_such_dependency"):
        import_object("hwq_user_broken_mod:x", what="data.factory")
    with pytest.raises(ImportPathError, match="not a torch.nn.Module"):
        make_adapter("factory", factory=f"{user_module}:not_a_model").load()
    with pytest.raises(ImportPathError, match="unexpected keyword"):
        make_adapter("factory", factory=f"{user_module}:make", kwargs={"depth": 2}).load()
    with pytest.raises(ImportPathError, match="loss_fn"):
        make_adapter("factory", factory=f"{user_module}:make", loss_fn="mse")
    with pytest.raises(ImportPathError, match="not a function"):
        import_callable("math:pi")


# -- Hugging Face folders -----------------------------------------------------------------------


def test_hf_folder_loads_with_default_targets_blocks_loss(llama_dir):
    from pipeline.models import make_adapter

    folder, ref = llama_dir
    adapter = make_adapter("hf_causal_lm", path=str(folder))
    model = adapter.load()
    _same_logits(model, ref)
    assert model.dtype == torch.float32 and not model.training
    assert model.config.use_cache is False
    assert adapter.quantizable(model) == LINEARS
    assert adapter.quantizable(model, ignore=["*.mlp.*"]) == [n for n in LINEARS
                                                              if ".mlp." not in n]
    assert [n for n, _ in adapter.blocks(model)] == ["model.layers.0", "model.layers.1"]
    assert adapter.output_axis("model.layers.0.mlp.down_proj.weight") == 0
    ids = _ids()
    with torch.no_grad():
        logits = model(ids).logits[:, :-1]
        want = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        torch.testing.assert_close(adapter.loss(model, ids), want, rtol=1e-5, atol=1e-6)
    info = adapter.describe()
    assert info.params == sum(p.numel() for p in ref.parameters())
    assert (info.dtype, info.extra["layers"], info.extra["model_type"]) == ("float32", 2, "llama")
    tok = adapter.tokenizer()
    assert len(tok) == VOCAB and tok("the quick fox")["input_ids"]


def test_hf_sharded_folder_keeps_stored_dtype(tmp_path, llama_dir):
    from pipeline.models import make_adapter

    _, ref = llama_dir
    bf16 = tiny_llama().to(torch.bfloat16)
    bf16.save_pretrained(tmp_path, max_shard_size="50KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    model = make_adapter("hf_causal_lm", path=str(tmp_path)).load()
    assert model.dtype == torch.bfloat16
    _same_logits(model.float(), bf16.float())
    f32 = make_adapter("hf_causal_lm", path=str(tmp_path), dtype="float32").load()
    assert f32.dtype == torch.float32


def test_hf_folder_from_s3_downloads_once_into_cache(llama_dir, s3_bucket, tmp_path, monkeypatch):
    import s3fs

    from pipeline.models import make_adapter

    folder, ref = llama_dir
    url, opts = s3_bucket
    fs = s3fs.S3FileSystem(**opts)
    remote = f"{url.removeprefix('s3://')}/tiny"
    for p in folder.iterdir():
        fs.put_file(str(p), f"{remote}/{p.name}")
    fs.pipe_file(f"{remote}/pytorch_model.bin", b"pickle: never fetched")
    fs.pipe_file(f"{remote}/original/consolidated.pth", b"a subfolder: never fetched")
    cache = tmp_path / "cache"

    adapter = make_adapter("hf_causal_lm", path=f"{url}/tiny", storage_options=opts,
                           cache_dir=str(cache))
    _same_logits(adapter.load(), ref)
    local, gguf = adapter.resolve()
    assert gguf is None and local.parent == cache / "models"
    assert sorted(p.name for p in local.iterdir()) == sorted(p.name for p in folder.iterdir())
    assert len(adapter.tokenizer()) == VOCAB

    # A second adapter reuses the download without fetching anything.
    def refuse(*a, **k):
        raise AssertionError("downloaded again")

    monkeypatch.setattr(s3fs.S3FileSystem, "get_file", refuse)
    again = make_adapter("hf_causal_lm", path=f"{url}/tiny/", storage_options=opts,
                         cache_dir=str(cache))
    assert again.resolve()[0] == local
    # A truncated cached file fails the size check and is fetched again.
    monkeypatch.undo()
    (local / "model.safetensors").write_bytes(b"short")
    third = make_adapter("hf_causal_lm", path=f"{url}/tiny", storage_options=opts,
                         cache_dir=str(cache))
    _same_logits(third.load(), ref)
    assert third.resolve()[0] == local

    from pipeline.models.hf_causal import ModelSourceError

    with pytest.raises(ModelSourceError, match="does not exist"):
        make_adapter("hf_causal_lm", path=f"{url}/missing", storage_options=opts,
                     cache_dir=str(cache)).resolve()


# -- GGUF ---------------------------------------------------------------------------------------


_GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
               "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


from testkit.models import write_llama_gguf  # noqa: E402  (used here and by other tests)


def test_gguf_file_loads_as_a_plain_fp32_model(tmp_path, llama_dir):
    from pipeline.models import make_adapter

    _, ref = llama_dir
    write_llama_gguf(ref, tmp_path / "tiny.gguf")
    tiny_tokenizer().save_pretrained(tmp_path)
    adapter = make_adapter("hf_causal_lm", path=str(tmp_path / "tiny.gguf"))
    model = adapter.load()
    _same_logits(model, ref)
    assert model.dtype == torch.float32
    # transformers marks GGUF models quantized; the adapter makes them plain models again.
    assert getattr(model, "hf_quantizer", None) is None
    assert not getattr(model, "is_quantized", False)
    assert getattr(model.config, "quantization_config", None) is None
    assert adapter.quantizable(model) == LINEARS
    model.save_pretrained(tmp_path / "saved")
    _same_logits(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "saved"), ref)
    assert len(adapter.tokenizer()) == VOCAB
    # Loaded the default way, transformers attaches a GgufHfQuantizer that refuses to save.
    from pipeline.models.hf_causal import _drop_gguf_quantizer

    raw = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf",
                                                            dtype=torch.float32)
    assert getattr(raw, "hf_quantizer", None) is not None
    _drop_gguf_quantizer(raw)
    assert getattr(raw, "hf_quantizer", None) is None and not raw.is_quantized
    assert getattr(raw.config, "quantization_config", None) is None
    raw.save_pretrained(tmp_path / "saved_raw")
    # The folder + gguf_file form resolves the same file.
    other = make_adapter("hf_causal_lm", path=str(tmp_path), gguf_file="tiny.gguf")
    assert other.resolve() == adapter.resolve()


def test_gguf_file_from_s3(tmp_path, llama_dir, s3_bucket):
    import s3fs

    from pipeline.models import make_adapter

    _, ref = llama_dir
    url, opts = s3_bucket
    write_llama_gguf(ref, tmp_path / "tiny.gguf")
    fs = s3fs.S3FileSystem(**opts)
    bucket_path = url.removeprefix("s3://")
    fs.put_file(str(tmp_path / "tiny.gguf"), f"{bucket_path}/g/tiny.gguf")
    fs.pipe_file(f"{bucket_path}/g/other.gguf", b"another GGUF: not fetched")
    adapter = make_adapter("hf_causal_lm", path=f"{url}/g/tiny.gguf", storage_options=opts,
                           cache_dir=str(tmp_path / "cache"))
    _same_logits(adapter.load(), ref)
    local, gguf = adapter.resolve()
    assert gguf == "tiny.gguf" and sorted(p.name for p in local.iterdir()) == ["tiny.gguf"]


def test_gguf_without_the_gguf_package_says_which(tmp_path, monkeypatch):
    from pipeline.models import make_adapter
    from pipeline.models.hf_causal import ModelSourceError

    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` fail
    with pytest.raises(ModelSourceError, match="needs the Python package 'gguf'.*pip install gguf"):
        make_adapter("hf_causal_lm", path=str(tmp_path / "m.gguf")).load()


# -- errors -------------------------------------------------------------------------------------


def test_hf_path_errors(tmp_path):
    from pipeline.models import make_adapter
    from pipeline.models.hf_causal import ModelSourceError

    def resolve(path, **kw):
        make_adapter("hf_causal_lm", path=str(path), **kw).resolve()

    with pytest.raises(ModelSourceError, match="does not exist"):
        resolve(tmp_path / "nowhere")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ModelSourceError, match="is a file, not a model folder"):
        resolve(tmp_path / "notes.txt")
    with pytest.raises(ModelSourceError, match="is not a Hugging Face model folder: no config.json$"):
        resolve(tmp_path)
    (tmp_path / "w.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelSourceError, match="no config.json .it holds 'w.gguf'"):
        resolve(tmp_path)
    with pytest.raises(ModelSourceError, match="no GGUF file 'other.gguf'"):
        resolve(tmp_path, gguf_file="other.gguf")
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ModelSourceError, match="'pytorch_model.bin' is a pickle"):
        resolve(tmp_path)
    with pytest.raises(ModelSourceError, match="model.dtype"):
        make_adapter("hf_causal_lm", path="x", dtype="float64")


def test_tokenizer_larger_than_the_embedding_is_a_mismatch(tmp_path):
    from pipeline.models import make_adapter
    from pipeline.models.hf_causal import TokenizerMismatch

    tiny_llama(vocab=100).save_pretrained(tmp_path)
    tiny_tokenizer(VOCAB).save_pretrained(tmp_path)
    adapter = make_adapter("hf_causal_lm", path=str(tmp_path))
    with pytest.raises(TokenizerMismatch, match="300 token ids but the model's embedding has "
                                                "100 rows"):
        adapter.tokenizer()  # before load(): rows come from config.json
