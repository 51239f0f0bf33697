"""A tiny random Llama (a model folder written here) through every stage on embedded Ray:
load → Fisher Hessian → per-channel ECSQ under one λ → DeepSpeed fine-tune → .hwq →
`hwq decode --hf-out` → transformers.from_pretrained, with the same perplexity; a second run
is all cache hits. Also: the activation estimator with uniform and k-means per channel, a
bring-your-own module through the import path, and the clear errors of bad input."""

import math

import pytest

transformers = pytest.importorskip("transformers")

from pipeline.api import compress, to_config  # noqa: E402
from pipeline.config import ConfigError  # noqa: E402
from testkit.models import tiny_llama_folder, write_corpus  # noqa: E402


@pytest.fixture(scope="module")
def lm_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm")
    tiny_llama_folder(d / "llama", tie_word_embeddings=True)
    write_corpus(d / "calib.txt", 400, 1)
    write_corpus(d / "a.txt", 150, 2)
    write_corpus(d / "b.txt", 150, 3)
    return d


def lm_config(d, **over):
    cfg = {"name": "tiny-llama",
           "model": {"name": "hf_causal_lm", "path": str(d / "llama")},
           "data": {"name": "text", "calibration": [str(d / "calib.txt")],
                    "calibration_windows": 8, "seq_len": 32,
                    "eval": {"a": str(d / "a.txt"), "b": str(d / "b.txt")}},
           "hessian": {"partitions": 2, "groups": 2},
           "quantize": {"method": "ecsq", "scope": "channel", "target_bits": 3.0},
           "finetune": {"workers": 1, "batch_size": 4, "epochs": 1, "lr": 1e-3},
           "executor": {"num_cpus": 2},
           "store": {"url": str(d / "store")}}
    for k, v in over.items():
        cfg[k] = {**cfg.get(k, {}), **v}
    return cfg


@pytest.fixture(scope="module")
def lm_run(lm_files, ray_local):
    return compress(lm_config(lm_files), keep_ray=True)


def test_every_stage_runs_and_the_report_keys_on_perplexity(lm_run):
    m = lm_run["metrics"]
    assert lm_run["metric"] == {"name": "perplexity", "direction": "lower"}
    assert list(lm_run["stages"]) == ["load", "hessian", "quantize", "finetune", "encode"]
    for stage in ("baseline", "quantized", "finetuned", "decoded"):
        assert math.isfinite(m[f"{stage}_perplexity"]) and m[f"{stage}_perplexity"] > 1
        assert set(m[f"{stage}_perplexity_by_set"]) == {"a", "b"}
    # The file decodes to the fine-tuned model exactly (fp16 codebooks on both sides).
    assert m["decoded_perplexity"] == pytest.approx(m["finetuned_perplexity"], rel=1e-9)
    # Decoder Linears (2 layers × 7 Linears) and the embedding, tied to the head (once);
    # norms stay raw.
    linears = 2 * (4 * 64 * 64 // 2 + 2 * 64 * 64 // 2 + 3 * 64 * 128)
    assert lm_run["model"]["quantized_params"] == linears + 300 * 64
    q, e = m["quantize"], m["encode"]
    # One λ for all rows, aimed so that the bits the file spends meet the target ...
    # (a model this small has few rows: the rate moves in steps; SmolLM2 lands within 0.015
    # below the target)
    assert 3.0 - 0.1 <= q["coded_rate_bits"] <= 3.0 + 0.01
    assert q["all_in_bits"] < q["coded_rate_bits"]  # (the entropy model is below the code)
    # ... and they do: the file's own accounting, its header share included.
    # (the header's share is estimated: ~0.1 bit a weight on a model this small, a little
    # more with the embedding's level-count streams and tables: 0.12 measured)
    assert e["bits_per_weight"] == pytest.approx(q["coded_rate_bits"], abs=0.15)
    assert e["bits_per_weight"] > e["index_bits_per_weight"] + e["codebook_bits_per_weight"] - 1e-9
    assert e["compression_ratio_vs_fp32"] == pytest.approx(e["compression_ratio"])  # fp32 model
    assert m["finetune"]["steps"] == 2


def test_the_tied_embedding_is_quantized_stored_once_and_decodes_tied(lm_run, lm_files,
                                                                       tmp_path):
    """The embedding (tied to the head) is one quantized tensor of the file, with its own
    per-row codebooks under the run's λ; the decoded folder loads in transformers with the
    head and the embedding one tensor, equal to the fine-tuned codebook[codes]; the bits
    over all parameters are the file's bits over every parameter."""
    import torch

    from pipeline.cli import main
    from pipeline.encode.container import HwqReader
    from pipeline.quantize.artifacts import QuantizedModel, gather_weights
    from pipeline.store import StageDir, Store

    emb = "model.embed_tokens.weight"
    rows = HwqReader(lm_run["metrics"]["encode"]["file"]).inspect()
    kinds = {(r["kind"], r["name"]) for r in rows}
    assert ("quantized", emb) in kinds and ("codebook", emb) in kinds
    assert not any("lm_head" in r["name"] for r in rows)  # stored once
    store = Store(str(lm_files / "store"), create=False)

    def stage(name):
        return StageDir(store, name, lm_run["stages"][name]["key"])

    qm = QuantizedModel.read(stage("quantize"), codebooks_from=stage("finetune"))
    assert emb in qm.assignment and qm.codebooks[emb].shape[0] == 300  # a codebook per row
    want = gather_weights(qm.codebooks[emb].to(torch.float16).float(), qm.indices[emb])
    out = tmp_path / "decoded"
    assert main(["decode", lm_run["metrics"]["encode"]["file"], "--hf-out", str(out)]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(model.model.embed_tokens.weight.detach(), want, rtol=0, atol=0)

    e = lm_run["metrics"]["encode"]
    params = sum(p.numel() for p in model.parameters())  # tied: counted once
    assert e["params"] == params
    assert e["bits_per_weight_all"] == pytest.approx(8 * e["file_bytes"] / params)
    assert e["embeddings"]["names"] == [emb] and e["embeddings"]["params"] == 300 * 64
    assert 0 < e["embeddings"]["bits_per_weight"] < 16
    # Quantized = embedding + Linears: the two figures average to the all-quantized one.
    n_lin = e["quantized_params"] - 300 * 64
    assert (e["bits_per_weight_linears"] * n_lin + e["embeddings"]["bits"]) / \
        e["quantized_params"] == pytest.approx(e["bits_per_weight"], rel=1e-9)


def test_embeddings_keep_stores_them_raw_and_is_another_load_key(lm_run, lm_files):
    # (one Hessian unit: the split over partitions and groups is lm_run's and test_streamed's;
    # this checks what the load and encode stages do with a kept embedding)
    r = compress(lm_config(lm_files, quantize={"embeddings": "keep"},
                           hessian={"partitions": 1, "groups": 1},
                           finetune={"enabled": False}), keep_ray=True)
    assert r["stages"]["load"]["key"] != lm_run["stages"]["load"]["key"]
    assert r["model"]["quantized_params"] == lm_run["model"]["quantized_params"] - 300 * 64
    e = r["metrics"]["encode"]
    assert e["embeddings"]["params"] == 0
    assert e["raw_tensor_bytes"] >= 4 * 300 * 64  # the fp32 embedding, as stored
    assert e["bits_per_weight_linears"] == pytest.approx(e["bits_per_weight"])


def test_decode_hf_out_loads_with_transformers_and_gives_the_same_perplexity(lm_run, lm_files,
                                                                            tmp_path):
    import torch

    from pipeline.cli import main
    from pipeline.evaluate.perplexity import perplexity
    from testkit.models import tiny_tokenizer

    hwq = lm_run["metrics"]["encode"]["file"]
    out = tmp_path / "decoded"
    assert main(["decode", hwq, "--hf-out", str(out)]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert len(tok) == len(tiny_tokenizer())
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    from pipeline.data.text import eval_windows

    by = lm_run["metrics"]["decoded_perplexity_by_set"]
    for name in ("a", "b"):
        w = eval_windows(tok, (lm_files / f"{name}.txt").read_text(), 32)
        with torch.no_grad():
            ppl = perplexity(model, w)["ppl"]
        assert ppl == pytest.approx(by[name], rel=1e-6)
    # Refusals: an existing non-empty folder, and both outputs at once.
    assert main(["decode", hwq, "--hf-out", str(out)]) == 2
    assert main(["decode", hwq, "--hf-out", str(tmp_path / "x"), "--out", "y"]) == 2


def test_the_runtime_runs_the_file_with_the_decoded_perplexity(lm_run, lm_files):
    """pipeline.runtime.load on the pipeline's own .hwq (ECSQ per channel, tied embedding):
    reference mode has the decoded model's perplexity, the fast mode's is within 0.5%."""
    import torch

    from pipeline.data.text import eval_windows
    from pipeline.evaluate.perplexity import perplexity
    from pipeline.runtime import load

    hwq = lm_run["metrics"]["encode"]["file"]
    by = lm_run["metrics"]["decoded_perplexity_by_set"]
    for mode, rel in (("reference", 1e-4), ("fast", 5e-3)):
        model, tok = load(hwq, mode=mode)
        assert model.hwq_runtime["lut"] > 0
        for name in ("a", "b"):
            w = eval_windows(tok, (lm_files / f"{name}.txt").read_text(), 32)
            with torch.no_grad():
                ppl = perplexity(model, w)["ppl"]
            assert ppl == pytest.approx(by[name], rel=rel), (mode, name)


def test_second_run_is_all_cache_hits(lm_run, lm_files):
    again = compress(lm_config(lm_files), keep_ray=True)
    assert all(s["cached"] for s in again["stages"].values())
    assert again["metrics"]["decoded_perplexity"] == lm_run["metrics"]["decoded_perplexity"]


def test_out_copies_the_hwq_and_the_decoded_folder_to_a_stable_path(lm_run, lm_files, tmp_path,
                                                                    s3_bucket):
    """--out on a cached run: model.hwq (the encode stage's bytes), hf/ (loadable, the same
    perplexity), output.json written last; to a local folder and to S3; status prints it."""
    import hashlib
    import json

    from pipeline.driver import open_store, published_output
    from pipeline.store import Store

    out = tmp_path / "published"
    (out / "hf").mkdir(parents=True)  # an earlier publish's folder, with a file this one lacks
    (out / "hf" / "model-00002-of-00002.safetensors").write_bytes(b"stale")
    report = compress(lm_config(lm_files), keep_ray=True, out=str(out), hf_out=True)
    assert not (out / "hf" / "model-00002-of-00002.safetensors").exists()
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name]
    assert all(s["cached"] for s in report["stages"].values())
    src = open(report["metrics"]["encode"]["file"], "rb").read()
    assert (out / "model.hwq").read_bytes() == src
    index = json.loads((out / "output.json").read_text())
    for name, meta in index["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == meta["sha256"]
    assert {"hf/config.json", "hf/model.safetensors"} <= set(index["files"])
    model = transformers.AutoModelForCausalLM.from_pretrained(out / "hf")
    assert model.config.num_hidden_layers == 2
    assert published_output(open_store(to_config(lm_config(lm_files)))) == report["output"]["url"]

    url, opts = s3_bucket  # the same to S3, with the store's credentials and endpoint
    endpoint = opts["client_kwargs"]["endpoint_url"]
    compress(lm_config(lm_files, store={"endpoint_url": endpoint}), keep_ray=True,
             out=url + "/published")
    pub = Store(url + "/published", opts)
    assert pub.read_bytes("model.hwq") == src
    # without --hf-out: the config and tokenizer files the runtime reads beside the file
    files = set(json.loads(pub.read_bytes("output.json"))["files"])
    assert {"hf/config.json", "hf/tokenizer.json"} <= files and "hf/model.safetensors" not in files
    assert set(pub.list("hf")) == {f.removeprefix("hf/") for f in files if f.startswith("hf/")}


def test_out_is_checked_before_anything_runs(lm_files, tmp_path):
    with pytest.raises(ConfigError, match="--hf-out needs --out"):
        compress(lm_config(lm_files), hf_out=True)
    with pytest.raises(ConfigError, match="only for language models"):
        compress("configs/lenet5_fmnist.yaml", out=str(tmp_path), hf_out=True)


# uniform: the per-tensor stages on a resident model, which tests/test_residency.py also runs
# (resident = streamed byte for byte): slow (45 s)
@pytest.mark.parametrize("method,extra", [pytest.param("uniform", {"target_bits": 4.0},
                                                       marks=pytest.mark.slow),
                                          # error feedback (X·Xᵀ in the hessian stage)
                                          pytest.param("ecsq", {"target_bits": 4.0,
                                                                "feedback": "ldl"},
                                                       marks=pytest.mark.slow),
                                          ("hw_kmeans", {"k": 4}),
                                          ("ecsq", {"target_bits": 4.0, "scope": "group",
                                                    "group_size": 32})])
def test_activation_estimator_and_other_channel_quantizers(lm_run, lm_files, method, extra):
    r = compress(lm_config(lm_files, hessian={"estimator": "activation"},
                           quantize={"method": method, "target_bits": None, **extra},
                           finetune={"enabled": False}), keep_ray=True)
    if extra.get("scope") == "group":  # a codebook per row and 32 columns: 2 or 4 a row
        from pipeline.encode.container import HwqReader

        rows = HwqReader(r["metrics"]["encode"]["file"]).inspect()
        name = "model.layers.0.mlp.down_proj.weight"  # [64, 128]: 4 groups a row
        tensor = next(x for x in rows if x["name"] == name and x["kind"] == "quantized")
        book = next(x for x in rows if x["name"] == name and x["kind"] == "codebook")
        assert tensor["scope"] == "group" and tuple(book["shape"])[0] == 64 * 4
    m = r["metrics"]
    assert r["stages"]["load"]["cached"]  # shared with the first run
    if extra.get("feedback"):  # every decoder Linear's X·Xᵀ, q/k/v and gate/up shared
        sm = m["hessian"]["second_moment"]
        assert (sm["tensors"], sm["matrices"]) == (14, 8)
        fb = m["quantize"]["feedback"]
        assert fb["tensors"] == 14 and fb["rows_feedback"] > 0
        assert fb["objective_final"] <= fb["objective_plain"]
        assert m["decoded_kl"] > 0 and set(m["decoded_kl_by_set"]) == {"a", "b"}
    if method == "uniform" or extra.get("feedback"):
        # channel scope without fine-tuning: the per-tensor stages a streamed run takes (the
        # load stage's copy read tensor by tensor); encode decodes every tensor bit for bit
        # and scores the decoded model (no separate score of the quantized one)
        assert "quantized_perplexity" not in m and m["quantize"]["residency"] == "resident"
        assert m["encode"]["decode_check"]["tensors"] > 0
        assert math.isfinite(m["decoded_perplexity"])
    else:  # the whole-model stages: the quantized model scored, then the decoded file
        assert m["decoded_perplexity"] == pytest.approx(m["quantized_perplexity"], rel=1e-9)
    if method == "hw_kmeans":
        assert m["quantize"]["k"] == 4
        assert m["quantize"]["index_entropy_bits"] <= 2.0 + 1e-9  # at most 4 levels a row
    else:
        assert 4.0 - 0.1 <= m["quantize"]["coded_rate_bits"] <= 4.0 + 0.01


@pytest.mark.parametrize("quantize", [
    {"method": "hw_kmeans", "scope": "channel", "k": 4},
    # the paper's all-layers-together ECSQ, on a model hwq did not train (the pruned run
    # below takes network-scope ECSQ on the same module too, so this one is slow: 40 s)
    pytest.param({"method": "ecsq", "scope": "network", "target_bits": 2.0},
                 marks=pytest.mark.slow)])
def test_bring_your_own_module_through_the_import_path(tmp_path, ray_local, quantize):
    r = compress({"name": "byo", "model": {"name": "factory",
                                           "factory": "tests.byo_model:small_mlp",
                                           "kwargs": {"hidden": 16}},
                  "data": {"name": "fashion_mnist"},
                  "hessian": {"calibration_samples": 256, "batch_size": 64},
                  "quantize": quantize,
                  # (the fine-tune of a module from the import path is the pruned run's below)
                  "finetune": {"enabled": False},
                  "executor": {"num_cpus": 2}, "store": {"url": str(tmp_path / "s")}},
                 keep_ray=True)
    m = r["metrics"]
    assert r["metric"]["name"] == "accuracy"
    assert 0 <= m["decoded_accuracy"] <= 1
    assert 0 <= m["quantized_accuracy"] <= 1
    assert m["decoded_accuracy"] == m["quantized_accuracy"]
    assert r["model"]["quantized_params"] == 784 * 16 + 16 * 10
    if quantize["scope"] == "network":
        from pipeline.encode.container import HwqReader

        rows = HwqReader(m["encode"]["file"]).inspect()
        books = [x for x in rows if x["kind"] == "codebook"]
        assert [b["name"] for b in books] == ["network"]  # one codebook for both Linears
        assert m["quantize"]["scope"] == "network"
        assert m["quantize"]["index_entropy_bits"] <= 2.0 + 0.05


def test_your_own_model_pruned_retrained_network_ecsq_and_fine_tuned(tmp_path, ray_local):
    """The paper's whole method on a model hwq did not train: magnitude pruning with
    retraining on the data's "train" split, network-scope ECSQ over the kept weights of both
    Linears, fine-tuning of the shared values, the masks coded in the file."""
    import torch

    from pipeline.encode import read_hwq

    r = compress({"name": "byo-prune", "model": {"name": "factory",
                                                 "factory": "tests.byo_model:small_mlp",
                                                 "kwargs": {"hidden": 32}},
                  "data": {"name": "fashion_mnist", "train_samples": 2000},
                  "prune": {"enabled": True, "keep": {"1.weight": 0.1, "3.weight": 0.5},
                            "steps": 1, "retrain_epochs": 1},
                  "hessian": {"calibration_samples": 256, "batch_size": 64},
                  "quantize": {"method": "ecsq", "scope": "network", "target_bits": 2.0},
                  "finetune": {"workers": 1, "batch_size": 64, "epochs": 1},
                  "executor": {"num_cpus": 2}, "store": {"url": str(tmp_path / "s")}},
                 keep_ray=True)
    m = r["metrics"]
    assert list(r["stages"]) == ["load", "prune", "hessian", "quantize", "finetune", "encode"]
    assert m["keep"] == pytest.approx({"1.weight": 0.1, "3.weight": 0.5}, abs=1e-3)
    assert 0.3 < m["pruned_accuracy"] <= 1  # retrained on 2,000 images: far above chance
    assert m["decoded_accuracy"] == m["finetuned_accuracy"]
    dec = read_hwq(m["encode"]["file"])
    w = torch.as_tensor(dec["1.weight"])
    assert int((w != 0).sum()) <= round(0.1 * w.numel())  # pruned weights decode to 0
    assert m["encode"]["bits"]["positions"] > 0  # the masks are in the file
    assert m["encode"]["compression_ratio_vs_fp32"] > 20


def test_pruning_your_own_model_needs_a_train_split_and_named_tensors(tmp_path, ray_local):
    from pipeline.errors import UserError

    base = {"name": "byo", "model": {"name": "factory", "factory": "tests.byo_model:small_mlp",
                                     "kwargs": {"hidden": 8}},
            "data": {"name": "custom", "factory": "tests.byo_model:eval_only_batches"},
            "evaluate": {"metric": "tests.byo_model:batch_accuracy"},
            "prune": {"enabled": True, "keep": {"1.weight": 0.5}, "retrain_epochs": 1,
                      "steps": 1},
            "quantize": {"method": "hw_kmeans", "scope": "layer", "k": 4},
            "executor": {"num_cpus": 2}, "store": {"url": str(tmp_path / "s")}}
    with pytest.raises(UserError, match="prune retrains on the data's \"train\" split"):
        compress(base, keep_ray=True)
    with pytest.raises(UserError, match="prune.keep: 'fc9.weight' is not a parameter"):
        compress({**base, "data": {"name": "custom", "factory": "tests.byo_model:few_batches"},
                  "prune": {"enabled": True, "keep": {"fc9.weight": 0.5}}}, keep_ray=True)
    with pytest.raises(ConfigError, match="quantize.scope=network or layer"):
        compress({**base, "quantize": {"method": "hw_kmeans", "scope": "channel", "k": 4}})


@pytest.mark.parametrize("change,message", [
    ({"model": {"path": "MISSING"}}, "does not exist"),
    ({"quantize": {"targets": ["model.layers.*.no_such_proj"]}}, "no_such_proj"),
    ({"data": {"calibration": ["EMPTY"]}}, "empty"),
])
def test_bad_input_is_one_clear_error(lm_files, tmp_path, change, message, ray_local):
    (tmp_path / "empty.txt").write_text("")
    cfg = lm_config(lm_files, store={"url": str(tmp_path / "s")})
    for section, values in change.items():
        for k, v in values.items():
            if v == "MISSING":
                v = str(tmp_path / "nothing")
            if v == ["EMPTY"]:
                v = [str(tmp_path / "empty.txt")]
            cfg[section][k] = v
    with pytest.raises(Exception) as exc:
        compress(cfg, keep_ray=True)
    assert message in str(exc.value)


def test_folder_without_config_json_and_config_errors(tmp_path):
    from pipeline.models.hf_causal import ModelSourceError
    from pipeline.workload import Workload

    (tmp_path / "m").mkdir()
    cfg = to_config({"model": {"name": "hf_causal_lm", "path": str(tmp_path / "m")},
                     "data": {"name": "text", "calibration": ["x"], "eval": {"a": "y"}},
                     "quantize": {"scope": "channel", "method": "ecsq"}})
    with pytest.raises(ModelSourceError, match="no config.json"):
        Workload(cfg).adapter.load()
    # Inferred for a language model (docs/LANGUAGE_MODELS.md): text data, per-channel scope.
    assert to_config({"model": {"name": "hf_causal_lm", "path": "x"},
                      "data": {"calibration": ["x"]}}).quantize.scope == "channel"
    # every scope for every model: network scope runs resident; streaming needs channel rows
    assert to_config({"model": {"name": "hf_causal_lm", "path": "x"},
                      "data": {"name": "text", "calibration": ["x"], "eval": {"a": "y"}},
                      "quantize": {"scope": "network"}}).quantize.scope == "network"
    with pytest.raises(ConfigError, match="scope=channel"):
        to_config({"model": {"name": "hf_causal_lm", "path": "x", "residency": "streamed"},
                   "data": {"name": "text", "calibration": ["x"], "eval": {"a": "y"}},
                   "quantize": {"scope": "network"}, "finetune": {"enabled": False}})
    with pytest.raises(ConfigError, match="needs data.calibration"):
        to_config({"model": {"name": "hf_causal_lm", "path": "x"}})
    with pytest.raises(ConfigError, match="needs data.name=text"):
        to_config({"model": {"name": "hf_causal_lm", "path": "x"},
                   "data": {"name": "fashion_mnist"}})
    with pytest.raises(ConfigError, match="lenet5"):
        to_config({"model": {"name": "hf_causal_lm", "path": "x"},
                   "data": {"name": "text", "calibration": ["x"], "eval": {"a": "y"}},
                   "quantize": {"scope": "channel"}, "hessian": {"estimator": "ggn"}})


def test_the_three_line_config_runs_first_time(tmp_path, ray_local, capfd):
    """A model folder and one text, nothing else (docs/LANGUAGE_MODELS.md): text data,
    per-channel scope, the Fisher, a fine-tune batch cut to the 64 windows, evaluation on
    the held-out tail of the text; every stage runs. Each fine-tune line is printed once."""
    # (hidden 128: the 2-layer 64-wide Llama has too few rows for the uniform quantizer's
    # default 3 bits to be met within its tolerance)
    tiny_llama_folder(tmp_path / "llama", hidden=128)
    write_corpus(tmp_path / "corpus.txt", 500, 1)  # ~9,700 tokens: 19 windows of 512
    cfg = {"model": {"name": "hf_causal_lm", "path": str(tmp_path / "llama")},
           "data": {"calibration": str(tmp_path / "corpus.txt")}}
    r = compress(cfg, keep_ray=True, store=str(tmp_path / "store"))
    m = r["metrics"]
    assert list(r["stages"]) == ["load", "hessian", "quantize", "finetune", "encode"]
    assert set(m["baseline_perplexity_by_set"]) == {"heldout"}
    assert math.isfinite(m["decoded_perplexity"])
    assert m["finetune"]["steps"] == 1  # one batch of all 64 windows
    out = capfd.readouterr()
    steps = [ln for ln in (out.out + out.err).splitlines() if "finetune: step 1/1" in ln]
    assert len(steps) == 1, steps
