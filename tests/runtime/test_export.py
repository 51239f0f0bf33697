"""`hwq export --format compressed-tensors`: the tiny Llama written as a .hwq file with exact
uniform grids (per channel, and per group of 32 for the MLP down projections), exported, and
loaded by transformers with the compressed-tensors package gives the decoded model's logits;
hwq's own uniform levels (bin means, near a grid) are refused without --snap, exported with
it; a k-means file is refused with the reason."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from pipeline.cli import main
from pipeline.runtime.export import grid_rows, pack_int4
from testkit.models import tiny_llama_folder

HF = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def _write(tmp_path, *, method="uniform", exact=True):
    """A .hwq of the tiny Llama: decoder Linears quantized per row (down_proj per group of
    32) to 4-bit grids m·Δ (Δ a power of two: every level is exact in fp16), or, with
    exact=False, to the bin means of those grids; the rest stored as is."""
    from safetensors.numpy import load_file

    from pipeline.encode import TensorEntry, write_hwq

    src = tiny_llama_folder(tmp_path / "src")
    state = load_file(src / "model.safetensors")
    ents, cbs = [], {}
    for name, w in state.items():
        if ".layers." not in name or w.ndim != 2:
            ents.append(TensorEntry.raw_tensor(name, w))
            continue
        g = 32 if "down_proj" in name else w.shape[1]
        rows = w.reshape(-1, g).astype(np.float64)
        delta = 2.0 ** np.floor(np.log2(rows.std(axis=1) / 2))
        m = np.clip(np.rint(rows / delta[:, None]), -8, 7).astype(np.int64)
        codes = m + 8
        cb = (np.arange(16) - 8)[None, :] * delta[:, None]
        if not exact:  # each level the mean of its bin's weights, as hwq's uniform stores
            for j in range(16):
                sel = codes == j
                sums = np.where(sel, rows, 0).sum(1)
                cnt = sel.sum(1)
                cb[:, j] = np.where(cnt > 0, sums / np.maximum(cnt, 1), cb[:, j])
        cbs[name] = cb.astype(np.float16).astype(np.float32)
        ents.append(TensorEntry.quantized(name, w.shape, codes.reshape(-1), name))
    folder = tmp_path / "run"
    (folder / "hf").mkdir(parents=True)
    for f in HF:
        if (src / f).exists():
            shutil.copy(src / f, folder / "hf" / f)
    write_hwq(
        folder / "model.hwq",
        ents,
        cbs,
        codebook_dtype="float16",
        metadata={"model": "hf_causal_lm", "scope": "channel", "method": method},
    )
    return folder / "model.hwq"


def _logits(folder, state: dict | None = None) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    if state is not None:
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    ids = torch.arange(3, 40).reshape(1, -1)
    with torch.no_grad():
        return model(ids).logits


def test_pack_int4_matches_compressed_tensors_and_grids_are_found():
    rng = np.random.default_rng(0)
    u = rng.integers(0, 16, size=(5, 19)).astype(np.uint8)
    words = pack_int4(u, 1)
    assert words.shape == (5, 3) and words.dtype == np.int32
    back = (words.view(np.uint32)[:, :, None] >> (4 * np.arange(8, dtype=np.uint32))) & 15
    assert (back.reshape(5, -1)[:, :19] == u).all()
    assert pack_int4(u, 0).shape == (1, 19)
    try:
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    except ImportError:
        pass
    else:
        want = pack_to_int32(torch.from_numpy(u.astype(np.int8) - 8), 4, packed_dim=1)
        assert (want.numpy() == words).all()
    # exact grids (a step of 0.25, one through a zero point of 3) and a row that is not
    L = np.array([[-0.5, 0.0, 0.75, 1.0], [0.25, 0.5, 1.25, 0.5], [0.1, 0.33, 0.71, 0.9]])
    used = np.ones_like(L, dtype=bool)
    g = grid_rows(L, used)
    assert g.bad.tolist() == [2]
    for r in (0, 1):
        assert np.allclose((g.u[r].astype(float) - g.zero[r]) * g.scale[r], L[r])
    s = grid_rows(L, used, snap=True)
    assert s.bad.size == 0 and 0 < s.change[2] < 0.1


@pytest.fixture(scope="module")
def exact_file(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("exact"))


def test_exported_folder_gives_the_decoded_models_logits(exact_file, tmp_path, capsys):
    pytest.importorskip(
        "compressed_tensors",
        reason="compressed-tensors is not installed (benchmarks/requirements-peers.txt)",
    )
    assert main(["decode", str(exact_file), "--hf-out", str(tmp_path / "dec")]) == 0
    assert (
        main(["export", str(exact_file), str(tmp_path / "ct"), "--format", "compressed-tensors"])
        == 0
    )
    assert "14 Linear weights packed" in capsys.readouterr().out  # 2 layers x 7 Linears
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized"
    assert {g["weights"]["strategy"] for g in qc["config_groups"].values()} == {"channel", "group"}
    assert (tmp_path / "ct" / "tokenizer.json").exists()
    want, got = _logits(tmp_path / "dec"), _logits(tmp_path / "dec", _ct_state(tmp_path / "ct"))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def _ct_state(folder) -> dict[str, torch.Tensor]:
    """The folder's weights as compressed-tensors decompresses them (its own unpacking and
    dequantization of each packed module, by the config groups of config.json).
    transformers' own loader is not used: with compressed-tensors 0.19 it registers an
    asymmetric zero point unpacked ([rows, groups]) and so discards the packed one the
    format (and vLLM) stores, [rows/8, groups]."""
    from compressed_tensors.compressors.pack_quantized.base import (
        PackedQuantizationCompressor,
    )
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file

    sd = load_file(folder / "model.safetensors")
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    out = {k: v for k, v in sd.items() if not k.rsplit(".", 1)[-1].startswith("weight_")}
    for group in qc["config_groups"].values():
        scheme = QuantizationScheme(targets=group["targets"], weights=group["weights"])
        for mod in group["targets"]:
            local = {k[len(mod) + 1 :]: v for k, v in sd.items() if k.startswith(mod + ".")}
            out[f"{mod}.weight"] = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
    return out


def test_bin_means_are_refused_unless_snapped(tmp_path, capsys):
    f = _write(tmp_path, exact=False)
    assert main(["export", str(f), str(tmp_path / "ct"), "--format", "compressed-tensors"]) == 2
    err = capsys.readouterr().err
    assert "is not a uniform grid" in err and "--snap" in err and "codebook row" in err
    assert not (tmp_path / "ct").exists()
    assert (
        main(["export", str(f), str(tmp_path / "ct"), "--format", "compressed-tensors", "--snap"])
        == 0
    )
    assert "--snap moved levels by at most" in capsys.readouterr().out


def test_a_kmeans_file_is_refused_with_the_reason(tmp_path, capsys):
    f = _write(tmp_path, method="kmeans")
    assert main(["export", str(f), str(tmp_path / "ct"), "--format", "compressed-tensors"]) == 2
    assert "method kmeans" in capsys.readouterr().err
