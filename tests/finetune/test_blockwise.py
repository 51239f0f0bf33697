"""Block-wise codebook fine-tuning, plain functions: the gather's gradient is the paper's sum of
members, trained codebooks are fp16-exact with the quantize stage's padding, training lowers a
real decoder block's output error, and a fine-tune that does not help is reverted. (Through the
driver, in both residencies, with resume: tests/test_residency.py.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.finetune.blockwise import (
    finish_codebooks,
    gather_codebooks,
    run_quantized,
    split_windows,
    train_block,
)
from testkit.models import tiny_llama


def test_gather_gradient_is_the_sum_of_members():
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 3, (4, 7), generator=g).to(torch.uint8)
    cb = torch.randn(4, 3, generator=g, requires_grad=True)
    up = torch.randn(4, 7, generator=g)
    (gather_codebooks(cb, idx) * up).sum().backward()
    want = torch.zeros(4, 3)
    for r in range(4):
        for j in range(7):
            want[r, int(idx[r, j])] += up[r, j]
    assert torch.allclose(cb.grad, want)
    # int16 indices (more than 256 levels) work the same
    cb2 = cb.detach().clone().requires_grad_(True)
    (gather_codebooks(cb2, idx.to(torch.int16)) * up).sum().backward()
    assert torch.equal(cb2.grad, cb.grad)


def test_finished_codebooks_are_fp16_exact_and_keep_their_padding():
    idx = np.array([[0, 1, 1], [0, 0, 0]], np.uint8)  # row 0 uses 2 levels, row 1 one
    given = np.array([[0.5, -0.25, 0.5], [2.0, 2.0, 2.0]], np.float32)
    cb = np.array([[0.1234567, -0.3333333, 9.0], [1e6, 5.0, 7.0]], np.float32)
    out = finish_codebooks(cb, given, idx)
    assert out.dtype == np.float32
    assert np.array_equal(out.astype(np.float16).astype(np.float32), out)
    assert out[0, 2] == 0.5 and out[1, 1] == out[1, 2] == 2.0  # padding as given
    assert out[1, 0] == 65504.0  # clipped into float16's range
    assert out[0, 0] == np.float32(np.float16(0.1234567))


def test_split_windows():
    assert split_windows(8, 0.125) == (7, 1)
    assert split_windows(1, 0.5) == (1, 0)
    assert split_windows(3, 0.9) == (1, 2)
    assert split_windows(16, 0) == (16, 0)


def _block_and_codes(levels: int = 4, seed: int = 0):
    """A tiny Llama's first block, its inputs for 8 windows, and a coarse per-row uniform
    quantization of its Linear weights (indices ranked as stored, codebooks [R, K])."""
    torch.manual_seed(seed)
    model = tiny_llama(layers=2, hidden=64).eval()
    windows = torch.randint(0, 300, (8, 16))
    captured = {}

    def hook(mod, args, kwargs):
        captured["x"] = args[0] if args else kwargs["hidden_states"]
        captured["kw"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}

    block = model.model.layers[0]
    h = block.register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        model(input_ids=windows, use_cache=False)
    h.remove()
    x = captured["x"].detach()
    kw = dict(captured["kw"], use_cache=False)
    kw.pop("past_key_values", None)
    kw.pop("past_key_value", None)
    call = ((), kw)
    codes = {}
    for name, p in block.named_parameters():
        if p.ndim != 2:
            continue
        w = p.detach().numpy()
        lo, hi = w.min(1, keepdims=True), w.max(1, keepdims=True)
        step = (hi - lo) / (levels - 1)
        idx = np.rint((w - lo) / step).astype(np.uint8)
        cb = (lo + step * np.arange(levels)[None, :]).astype(np.float32)
        cb = cb.astype(np.float16).astype(np.float32)
        codes[name] = (idx, cb)
    for p in block.parameters():
        p.requires_grad_(False)
    return block, call, x, codes


def test_training_lowers_the_block_output_error():
    block, call, x, codes = _block_and_codes()
    with torch.no_grad():
        y = block(x, *call[0], **call[1])
        y = y[0] if isinstance(y, tuple) else y
    res = train_block(block, call, x, y, codes, steps=60, lr=1e-4, batch=4, validation=0.25,
                      seed=0)
    e = res.errors
    assert not res.reverted and res.steps == 60
    assert e["train_after"] < 0.8 * e["train_before"]
    assert e["val_after"] < e["val_before"]
    for n, cb in res.codebooks.items():
        assert cb.shape == codes[n][1].shape and not np.array_equal(cb, codes[n][1])
        assert np.array_equal(cb.astype(np.float16).astype(np.float32), cb)
    # the block run with the trained codebooks gives the error the result reports
    out = run_quantized(block, call, x[:6], {n: (codes[n][0], res.codebooks[n])
                                             for n in codes}, batch=2)
    err = float(((out - y[:6]) ** 2).sum() / (y[:6] ** 2).sum())
    assert err == pytest.approx(e["train_after"], rel=1e-4)


def test_a_fine_tune_that_does_not_help_is_reverted():
    block, call, x, codes = _block_and_codes()
    with torch.no_grad():
        y = block(x, *call[0], **call[1])
        y = y[0] if isinstance(y, tuple) else y
    # a huge learning rate wrecks the codebooks: the held-out error rises, the input stays
    res = train_block(block, call, x, y, codes, steps=5, lr=10.0, batch=4, validation=0.25,
                      seed=0)
    assert res.reverted and res.errors["val_after"] >= res.errors["val_before"]
    for n, cb in res.codebooks.items():
        assert np.array_equal(cb, codes[n][1])


def test_blockwise_is_refused_for_a_model_without_decoder_blocks(tmp_path):
    from pipeline.config import RunConfig

    with pytest.raises(ValueError, match="finetune.mode=blockwise"):
        RunConfig.model_validate({"name": "x", "finetune": {"mode": "blockwise"},
                                  "store": {"url": str(tmp_path)}})


def test_hwq_stream_maps_finetune_steps_onto_blockwise(tmp_path):
    from pipeline.cli import build_parser
    from pipeline.stream_cli import stream_config

    args = build_parser().parse_args(["stream", str(tmp_path / "m"), str(tmp_path / "w"),
                                      "--finetune-steps", "5"])
    assert stream_config(args)["finetune"] == {"enabled": True, "mode": "blockwise",
                                               "block_steps": 5}
    off = build_parser().parse_args(["stream", str(tmp_path / "m"), str(tmp_path / "w")])
    assert stream_config(off)["finetune"] == {"enabled": False}


def _stages(tmp_path, tuned: dict[str, np.ndarray], files: dict):
    """A quantize stage folder with one tensor's codes and a finetune folder whose
    codebooks.json is `files` (untrusted: read back from the store)."""
    from safetensors.numpy import save

    from pipeline.store import StageDir, Store

    store = Store(str(tmp_path))
    q = StageDir(store, "quantize", "q" * 16)
    idx = np.array([[0, 1, 1], [0, 0, 0]], np.uint8)
    cb = np.array([[0.5, -0.25], [2.0, 2.0]], np.float32)
    q.write_bytes("codes/00000-x.safetensors", save({"indices": idx, "codebooks": cb}))
    q.write_json("codes.json", {"lambda": 1.0, "codes": {"t": "codes/00000-x.safetensors"},
                                "shapes": {"t": [2, 3]}})
    f = StageDir(store, "finetune", "f" * 16)
    f.write_bytes("codebooks/b00000.safetensors", save(tuned))
    f.write_json("codebooks.json", {"codebooks": files})
    q.outputs, f.outputs = q.hash_outputs(), f.hash_outputs()
    return q, f, idx


def test_tensor_codes_take_the_fine_tuned_codebooks_and_refuse_a_bad_map(tmp_path):
    from pipeline.quantize.codes import TensorCodes
    from pipeline.store import ArtifactError

    good = np.array([[0.5, -0.125], [1.0, 1.0]], np.float32)
    q, f, idx = _stages(tmp_path / "a", {"t": good}, {"t": "codebooks/b00000.safetensors"})
    got_idx, got_cb = TensorCodes(q, f).read("t")
    assert np.array_equal(got_idx, idx) and np.array_equal(got_cb, good)
    assert np.array_equal(TensorCodes(q).read("t")[1], np.array([[0.5, -0.25], [2.0, 2.0]]))
    # a map naming a file outside the block files, a tensor quantize never wrote, or a
    # file whose codebooks are not the tensor's rows: refused, never read as codes
    for files in ({"t": "../../quantize/codes.json"}, {"u": "codebooks/b00000.safetensors"}):
        q, f, _ = _stages(tmp_path / str(len(files)) / next(iter(files)).replace("/", "_"),
                          {"t": good}, files)
        with pytest.raises(ArtifactError, match="codebooks.json"):
            TensorCodes(q, f)
    q, f, _ = _stages(tmp_path / "rows", {"t": good[:1]}, {"t": "codebooks/b00000.safetensors"})
    with pytest.raises(ArtifactError, match="not the codebooks of the block's tensors"):
        TensorCodes(q, f).read("t")
    q, f, _ = _stages(tmp_path / "nan", {"t": np.full((2, 2), np.nan, np.float32)},
                      {"t": "codebooks/b00000.safetensors"})
    with pytest.raises(ArtifactError, match="not the codebooks"):
        TensorCodes(q, f).read("t")


def test_a_block_keeping_bf16_linears_trains_as_the_block_widened_to_float32(monkeypatch):
    """`StreamedLM(stored_linears=True)` gives the block-wise fine-tune a float32 block whose
    Linears hold bf16 weights: the targets, the trained codebooks and the errors are those of
    the same block with its bf16 weights widened to float32. The gather and its gradient go
    a row slab at a time (a small slab here): the same values as in one piece."""
    import copy

    from pipeline.finetune import blockwise
    from pipeline.models.stored_linear import StoredLinear, use_stored_linears

    block, call, x, codes = _block_and_codes()
    for p in block.parameters():
        p.data = p.data.to(torch.bfloat16).float()  # a bf16 checkpoint widened
    stored = copy.deepcopy(block)
    use_stored_linears(stored)
    for m in stored.modules():
        if isinstance(m, StoredLinear):
            m.weight.data = m.weight.data.to(torch.bfloat16)
    assert blockwise.compute_dtype(stored) == torch.float32

    def run(b):
        with torch.no_grad():
            y = b(x, *call[0], **call[1])
            y = y[0] if isinstance(y, tuple) else y
        return y, train_block(b, call, x, y, codes, steps=6, lr=1e-4, batch=4,
                              validation=0.25, seed=0)

    y0, r0 = run(block)
    monkeypatch.setattr(blockwise, "_SLAB", 100)  # several slabs per tensor
    y1, r1 = run(stored)
    assert torch.equal(y0, y1)
    assert r0.errors == r1.errors and r0.losses == r1.losses
    for n in r0.codebooks:
        assert np.array_equal(r0.codebooks[n], r1.codebooks[n])
