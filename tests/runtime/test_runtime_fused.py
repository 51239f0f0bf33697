"""The runtime's memory and call savings change no number: a quantized embedding looked up
from its packed codes (LutEmbedding) is the decoded embedding, fused q/k/v and gate/up calls
give the unfused model's logits, and concurrent generations (hwq serve's worker threads)
and concurrent kernel calls on the shared thread pool give the sequential answers."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from pipeline.cli import main
from pipeline.runtime import load
from pipeline.runtime.kernels import bind
from pipeline.runtime.modules import LutEmbedding, LutLinear
from pipeline.runtime.transcode import transcode_codes
from testkit.hwq_models import tiny_llama_hwq

TEXT = "hessian weighted quantization of every layer"


@pytest.fixture(scope="module", params=["channel", "pruned"])
def uniform(request, tmp_path_factory):
    """A tied tiny Llama whose every matrix has the same coding, so q/k/v and gate/up fuse."""
    import transformers

    d = tmp_path_factory.mktemp("fused")
    path = tiny_llama_hwq(d, tied=True, style=request.param)
    assert main(["decode", str(path), "--hf-out", str(d / "decoded")]) == 0
    dec = transformers.AutoModelForCausalLM.from_pretrained(d / "decoded").eval()
    return path, dec


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits[0]


def test_embedding_from_codes_and_fused_calls_are_the_decoded_model(uniform):
    path, dec = uniform
    model, tok = load(str(path), mode="reference", threads=1)
    stats = model.hwq_runtime
    # 2 layers x (q/k/v, gate/up), one packed copy of the tied embedding and head
    assert stats["fused_groups"] == 4 and stats["lut_embeddings"] == 1
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(emb, LutEmbedding) and isinstance(head, LutLinear)
    assert head.idx.data_ptr() == emb.idx.data_ptr()
    ids = tok(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        np.testing.assert_array_equal(emb(ids).numpy(), dec.get_input_embeddings()(ids).numpy())
    ref = _logits(dec, ids)
    got = _logits(model, ids)
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-3
    plain, _ = load(str(path), mode="reference", threads=1, fuse_siblings=False)
    assert plain.hwq_runtime["fused_groups"] == 0
    # the same kernel rows, one call or three: the same bits
    assert torch.equal(_logits(plain, ids), got)
    a = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(a, dec.generate(ids, max_new_tokens=6, do_sample=False))


def test_a_fused_member_called_alone_or_twice_computes_its_own_input(uniform):
    path, _ = uniform
    model, _ = load(str(path), mode="reference", threads=1)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj._group is not None
    x, z = torch.randn(1, 3, attn.q_proj.in_features), torch.randn(1, 3, attn.q_proj.in_features)
    want_k = z @ attn.k_proj.dense_weight().T
    with torch.no_grad():
        attn.q_proj(x)  # caches q/k/v of x
        np.testing.assert_allclose(attn.k_proj(z).numpy(), want_k.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(attn.k_proj(z).numpy(), want_k.numpy(), rtol=1e-5, atol=1e-6)
        x.add_(1.0)  # the same object written in place is a new input
        np.testing.assert_allclose(
            attn.v_proj(x).numpy(), (x @ attn.v_proj.dense_weight().T).numpy(),
            rtol=1e-5, atol=1e-6,
        )  # fmt: skip
    with pytest.raises(IndexError, match="out of range"):
        model.get_input_embeddings()(torch.tensor([10**6]))


def test_concurrent_generations_equal_sequential_ones(uniform):
    path, _ = uniform
    model, tok = load(str(path), mode="fast", threads=2)
    prompts = [TEXT, "the quick brown fox", "layer by layer", "one two three four"] * 2
    ids = [tok(p, return_tensors="pt").input_ids for p in prompts]

    def gen(i):
        with torch.no_grad():
            return model.generate(i, max_new_tokens=5, do_sample=False)

    want = [gen(i) for i in ids]
    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(gen, ids))
    for a, b in zip(want, got, strict=True):
        assert torch.equal(a, b)


def test_kernel_calls_from_several_threads_share_the_pool_safely():
    """Products large enough to use two pool threads, from four Python threads at once."""
    rng = np.random.default_rng(3)
    rows, cols = 1500, 1472  # above the one-thread threshold for b = 1
    rc = {"shape": (rows, cols), "positions": None,
          "codes": rng.integers(0, 16, rows * cols).astype(np.uint8),
          "codebook": rng.standard_normal((rows, 16)).astype(np.float32)}  # fmt: skip
    p = transcode_codes(rc)
    xs = [torch.randn(b, cols) for b in (1, 1, 3, 5)] * 3
    calls = {path: bind(p, path=path, threads=2) for path in ("ref", "q8")}
    want = {path: [c(x) for x in xs] for path, c in calls.items()}
    with ThreadPoolExecutor(4) as ex:
        for path, c in calls.items():
            for _ in range(5):
                got = list(ex.map(c, xs))
                for a, b in zip(want[path], got, strict=True):
                    assert torch.equal(a, b)


def test_an_untied_raw_embedding_stays_at_its_stored_16_bits(tmp_path):
    import transformers

    from pipeline.runtime.modules import HalfEmbedding

    path = tiny_llama_hwq(tmp_path, tied=False, style="channel", raw_embedding=True)
    assert main(["decode", str(path), "--hf-out", str(tmp_path / "decoded")]) == 0
    dec = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "decoded", dtype=torch.float32
    ).eval()
    model, tok = load(str(path), mode="reference", threads=1)
    emb = model.get_input_embeddings()
    assert isinstance(emb, HalfEmbedding) and emb.weight.dtype == torch.bfloat16
    assert isinstance(model.get_output_embeddings(), LutLinear)  # the untied head: quantized
    ids = tok(TEXT, return_tensors="pt").input_ids
    ref, got = _logits(dec, ids), _logits(model, ids)
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-3


def _fork_product(args):
    p, x = args
    return bind(p, path="q8", threads=2)(x)


def test_a_forked_child_makes_its_own_pool():
    """The pool's workers do not survive fork(): a child's products are still right and
    finish (it makes its own pool; chunks no worker takes are the caller's, so even a pool
    whose workers are gone cannot hang; the timeout would catch it)."""
    import multiprocessing as mp

    rng = np.random.default_rng(5)
    rows, cols = 1024, 1024
    rc = {"shape": (rows, cols), "positions": None,
          "codes": rng.integers(0, 16, rows * cols).astype(np.uint8),
          "codebook": rng.standard_normal((rows, 16)).astype(np.float32)}  # fmt: skip
    p = transcode_codes(rc)
    x = torch.randn(1, cols)
    want = bind(p, path="q8", threads=2)(x)  # the parent's pool is running now
    with mp.get_context("fork").Pool(1) as pool:
        got = pool.apply_async(_fork_product, ((p, x),)).get(timeout=60)
    assert torch.equal(got, want)
