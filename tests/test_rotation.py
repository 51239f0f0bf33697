"""Incoherence processing (quantize.rotate=hadamard): the transform's properties, the
container's rotated tensors (version 3), the config's refusals, and a run of the pipeline on
a tiny Llama whose widths (48, 96) have an odd factor: error feedback and the block-wise
fine-tune in the rotated basis, the file decoding to the quantized weights, the runtime
serving it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import driver
from pipeline.config import ConfigError, RunConfig
from pipeline.encode import rotation
from pipeline.encode.container import HwqFormatError, HwqReader, TensorEntry, write_hwq
from testkit.lm_runs import decoded_model, lm_run_config, stage_dir
from testkit.models import tiny_sharded_bf16_folder, write_corpus

sys.path.insert(0, str(Path(__file__).parent / "encode"))
import hostile_files as hf  # noqa: E402

# -- the transform -------------------------------------------------------------------------


def _matrix(n: int, seed: int) -> np.ndarray:
    """V [n, n] (float64) as `forward` applies it: forward(x) = V·x."""
    return rotation.forward(np.eye(n), seed).T


@pytest.mark.parametrize("n", [1, 2, 3, 12, 48, 96, 576, 1536])
def test_the_rotation_is_orthogonal_and_inverse_undoes_it(n):
    V = _matrix(n, 5)
    assert np.abs(V @ V.T - np.eye(n)).max() < 1e-12
    x = np.random.default_rng(n).normal(size=(4, n)).astype(np.float32)
    y = rotation.forward(x, 5)
    assert np.allclose(y, x @ V.T, atol=1e-5)
    assert np.abs(rotation.inverse(y, 5) - x).max() < 1e-5
    # the seed matters (signs), and every input column spreads over many outputs
    if n >= 12:
        assert not np.allclose(_matrix(n, 6), V)
        assert (np.abs(V) > 0).sum(axis=0).min() >= n // 2


def test_numpy_and_torch_give_the_same_bits_whatever_the_batch():
    x = np.random.default_rng(0).normal(size=(9, 576)).astype(np.float32)
    a = rotation.inverse(x, 3)
    b = rotation.inverse(torch.from_numpy(x), 3).numpy()
    assert np.array_equal(a, b)
    assert np.array_equal(rotation.inverse(x[4:5], 3), a[4:5])
    assert np.array_equal(rotation.forward(x[:2], 3), rotation.forward(x, 3)[:2])


def test_rotated_hessian_weights_are_the_diagonal_of_v_diag_h_vt():
    n = 96
    V = _matrix(n, 1)
    h = np.random.default_rng(1).gamma(0.5, size=(3, n))
    want = np.stack([np.diag(V @ np.diag(r) @ V.T) for r in h])
    assert np.allclose(rotation.hessian(h), want, rtol=1e-12, atol=1e-15)
    assert np.allclose(rotation.hessian(h).sum(axis=1), h.sum(axis=1))  # the trace is kept


def test_with_the_layer_second_moment_rotated_weights_follow_its_rotated_diagonal():
    """Under the Kronecker-factored Fisher F_r = g_r·M, row r's rotated weights are
    g_r·diag(V·M·Vᵀ): each row keeps its total, spread as M's rotated diagonal."""
    rng = np.random.default_rng(2)
    n = 96
    X = rng.normal(size=(400, n)) * rng.gamma(1.0, size=n) + rng.normal(size=(400, 1))
    M = X.T @ X / 400
    g = rng.gamma(1.0, size=(3, 1))
    h = g * np.diag(M)[None, :]
    V = _matrix(n, 4)
    want = g * np.diag(V @ M @ V.T)[None, :]
    got = rotation.hessian_from_moment(h, M.astype(np.float32), 4)
    assert np.allclose(got, want, rtol=1e-5)
    # the diagonal-only version misses the correlations M holds
    assert not np.allclose(rotation.hessian(h), want, rtol=0.05)


def test_widths_with_a_large_odd_factor_are_refused():
    with pytest.raises(ValueError, match="odd factor 257"):
        rotation.check_width(2 * 257, "w")
    rotation.check_width(11008)  # 256 × 43


# -- the container ---------------------------------------------------------------------------


def _rotated_file(path: Path, dtype: str = "float32") -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    R, C, K = 6, 48, 5
    cb = np.sort(rng.normal(size=(R, K)).astype(np.float16).astype(np.float32), axis=1)
    idx = rng.integers(0, K, (R, C))
    write_hwq(str(path), [TensorEntry.quantized("w", (R, C), idx.reshape(-1), "w",
                                                dtype=dtype, rotate=77)],
              {"w": cb}, codebook_dtype="float16")
    return cb, idx


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_a_rotated_tensor_decodes_to_the_rotated_back_lookup(tmp_path, dtype):
    cb, idx = _rotated_file(tmp_path / "r.hwq", dtype)
    r = HwqReader(str(tmp_path / "r.hwq"))
    assert r._h.version == 3 and r.rotation("w") == 77 and r.read_codes("w")["rotate"] == 77
    want = torch.from_numpy(rotation.inverse(np.take_along_axis(cb, idx, 1), 77))
    want = want.to(getattr(torch, dtype))
    want = want.view(torch.uint16) if dtype == "bfloat16" else want
    got = r.read(["w"])["w"]
    assert np.array_equal(np.asarray(got).view(np.uint8), want.numpy().view(np.uint8))


def _rewrite_header(blob: bytes, edit) -> bytes:
    """The file with its header edited, every checksum right (a hostile writer)."""
    h, payload = hf.split(blob)
    edit(h)
    return hf.join(h, payload)


@pytest.mark.parametrize("edit, message", [
    (lambda h: h.update(version=2), "not a hadamard rotation of a version-3 file"),
    (lambda h: h["tensors"][0]["rotate"].update(seed=-1), "rotate.seed"),
    (lambda h: h["tensors"][0]["rotate"].update(kind="dct"), "not a hadamard rotation"),
    (lambda h: h["tensors"][0]["rotate"].update(scale=2), "not a hadamard rotation"),
    (lambda h: h["tensors"][0].update(rotate=[1]), "rotate"),
])
def test_a_tampered_rotation_is_refused(tmp_path, edit, message):
    _rotated_file(tmp_path / "r.hwq")
    blob = _rewrite_header((tmp_path / "r.hwq").read_bytes(), edit)
    (tmp_path / "bad.hwq").write_bytes(blob)
    with pytest.raises(HwqFormatError, match=message):
        HwqReader(str(tmp_path / "bad.hwq")).read()


def test_the_writer_refuses_rotations_it_cannot_store(tmp_path):
    cb = {"w": np.zeros((2, 2), np.float32)}
    codes = np.zeros(2 * 514, np.uint8)
    with pytest.raises(ValueError, match="odd factor 257"):
        write_hwq(str(tmp_path / "a.hwq"), [TensorEntry.quantized(
            "w", (2, 514), codes, "w", rotate=1)], cb)
    with pytest.raises(ValueError, match="rotation seed"):
        write_hwq(str(tmp_path / "a.hwq"), [TensorEntry.quantized(
            "w", (2, 4), codes[:8], "w", rotate=1 << 40)], cb)
    assert not (tmp_path / "a.hwq").exists()


# -- the config ------------------------------------------------------------------------------


def _lm(**over) -> dict:
    d = {"model": {"name": "hf_causal_lm", "path": "/nowhere"},
         "data": {"name": "text", "calibration": ["/nowhere.txt"]},
         "quantize": {"method": "ecsq", "rotate": "hadamard"}, "finetune": {"enabled": False}}
    for k, v in over.items():
        d[k] = {**d.get(k, {}), **v}
    return d


@pytest.mark.parametrize("over, message", [
    ({"finetune": {"enabled": True, "mode": "end_to_end"}}, "finetune.mode=blockwise"),
    ({"quantize": {"method": "uniform", "scope": "group"}}, "quantize.scope=channel"),
    ({"prune": {"enabled": True, "n_m": "2:4"}}, "no one-shot pruning"),
])
def test_rotation_settings_it_cannot_run_are_refused(over, message):
    with pytest.raises((ConfigError, ValueError), match=message):
        RunConfig.model_validate(_lm(**over))
    RunConfig.model_validate(_lm())


# -- the pipeline ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rotated_run(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("rotate")
    folder = tiny_sharded_bf16_folder(root / "model", hidden=48)
    write_corpus(root / "corpus.txt", lines=300)
    store = root / "store"
    cfg = lm_run_config(folder, store, {
        "quantize": {"rotate": "hadamard", "feedback": "ldl"},
        "finetune": {"mode": "blockwise", "block_steps": 4, "block_batch": 2,
                     "block_lr": 1e-4}})
    return folder, store, driver.run(cfg)


def test_a_rotated_run_decodes_to_its_rotated_back_codes(rotated_run):
    from safetensors.numpy import load_file

    from pipeline.encode.container import read_hwq
    from pipeline.models.weights import WeightsFolder

    folder, store, report = rotated_run
    m = report["metrics"]
    assert m["encode"]["bits_per_weight"] <= 3.0 + 0.02
    assert m["quantize"]["feedback"]["rows"] > 0
    q = stage_dir(store, "quantize")
    doc = json.loads((q / "codes.json").read_text())
    rots = doc["rotations"]
    assert len(rots) == 14 and all(".layers." in n for n in rots)  # not the embeddings
    assert len(set(rots.values())) == 2  # one per input width: 48 and 96
    dec = read_hwq(str(stage_dir(store, "encode") / "model.hwq"))
    src = WeightsFolder(str(folder), None)
    errors = []
    for name, seed in rots.items():
        t = load_file(q / doc["codes"][name])
        looked_up = np.take_along_axis(t["codebooks"], t["indices"].astype(np.int64), axis=1)
        got = torch.from_numpy(np.asarray(dec[name]).view(np.int16)).view(torch.bfloat16)
        got = got.float().numpy()
        w = src.read(name).float().numpy()
        # the codes approximate the rotated rows V·w: rotated back, the error is the same
        err = np.linalg.norm(rotation.inverse(looked_up, seed) - w)
        assert err == pytest.approx(np.linalg.norm(looked_up - rotation.forward(w, seed)),
                                    rel=1e-4)
        errors.append(err / np.linalg.norm(w))
        # the decoded weight is the rotated-back lookup (the block-wise fine-tune's codebooks
        # moved the levels a little)
        assert np.abs(got - rotation.inverse(looked_up, seed)).max() < 0.05 * np.abs(w).max()
    # the global λ gives the tensors the Fisher rates least one level (error 1); the others
    # are quantized as their level counts allow
    assert min(errors) < 0.3
    assert m["finetune"]["mode"] == "blockwise"
    assert np.isfinite(m["decoded_perplexity"])


def test_the_runtime_serves_a_rotated_file(rotated_run):

    from pipeline.runtime import load
    from pipeline.runtime.modules import LutLinear

    _, store, _ = rotated_run
    path = str(stage_dir(store, "encode") / "model.hwq")
    fast, _ = load(path, mode="fast", threads=1)
    luts = [m for m in fast.modules() if isinstance(m, LutLinear)]
    assert sum(m.rotate is not None for m in luts) == 14
    # siblings share their rotation (one per input width), so they still fuse where their
    # packed widths agree
    groups = {id(m._group): m._group for m in luts if m._group is not None}
    assert fast.hwq_runtime["fused_groups"] == len(groups) >= 1
    assert all(g.rotate is not None for g in groups.values())
    ref, _ = load(path, mode="reference", threads=1)
    dense, sd = decoded_model(stage_dir(store, "encode"))
    ids = torch.arange(1, 17)[None, :] % fast.config.vocab_size
    with torch.no_grad():
        decoded = dense(ids).logits.double()
        # the rotated weights before the decoder's cast to the file's bf16: what the packed
        # levels (float32) times the rotated input compute
        r = HwqReader(path)
        for n in r.names:
            if r.quantized(n) and r.rotation(n) is not None:
                c = r.read_codes(n)
                cb = np.asarray(c["codebook"], np.float32)
                rows = cb[np.arange(c["shape"][0])[:, None],
                          c["codes"].reshape(c["shape"]).astype(np.int64)]
                sd[n] = torch.from_numpy(rotation.inverse(rows, r.rotation(n)))
        dense.load_state_dict(sd, strict=False)
        want = dense(ids).logits.double()
        got, quick = ref(ids).logits.double(), fast(ids).logits.double()
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-3
    assert ((got - decoded).abs().max() / decoded.abs().max()).item() < 1e-2  # bf16 rounding
    assert ((quick - want).abs().max() / want.abs().max()).item() < 0.05
