"""quantize.embeddings / embedding_floor: which stage keys hold them, and the floor itself."""

import numpy as np

from pipeline.api import to_config
from pipeline.graph import plan
from pipeline.quantize.rows_stage import embedding_floor
from pipeline.stages import default_stages


def _lm(tmp_path) -> dict:
    (tmp_path / "t.txt").write_text("some text\n")
    t = str(tmp_path / "t.txt")
    return {"model": {"name": "hf_causal_lm", "path": str(tmp_path / "m")},
            "data": {"name": "text", "calibration": [t], "eval": {"a": t}},
            "quantize": {"method": "ecsq", "scope": "channel"}}


def _sections(cfg) -> dict:
    return {p.stage.name: p.config for p in plan(cfg, default_stages())}


def test_lenet_keys_hold_neither_option():
    s = _sections(to_config("configs/lenet5_fmnist.yaml"))
    assert "embeddings" not in s["quantize"]["quantize"]
    assert "embedding_floor" not in s["quantize"]["quantize"]


def test_lm_keys_embeddings_in_load_floor_in_quantize_keep_is_the_earlier_key(tmp_path):
    LM = _lm(tmp_path)
    new = _sections(to_config(LM))
    assert new["load"]["targets"] == {"targets": None, "ignore": [], "embeddings": "quantize"}
    assert new["quantize"]["quantize"]["embedding_floor"] == 0.1
    old = _sections(to_config(LM, quantize={"embeddings": "keep"}))
    assert old["load"]["targets"] == {"targets": None, "ignore": []}  # as before the option
    assert "embedding_floor" not in old["quantize"]["quantize"]
    other = _sections(to_config(LM, quantize={"embedding_floor": 0.3}))
    assert other["load"] == new["load"] and other["quantize"] != new["quantize"]


def test_embedding_floor_raises_rows_of_unseen_tokens_only():
    H = np.ones((4, 3), np.float32)
    H[1] = 0.0  # a token never seen: no Fisher
    H[2] = 1e-6
    got = embedding_floor(H, 0.01)
    m = float(H.mean())
    assert np.allclose(got[1], 0.01 * m) and np.allclose(got[2], 0.01 * m)
    assert np.array_equal(got[[0, 3]], H[[0, 3]])
    assert np.array_equal(embedding_floor(H, 0.0), H)
