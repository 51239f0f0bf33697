"""quantize.serve_bits: the config caps every row's levels at 2**bits (one fewer with
pruning), refuses settings that contradict it, and the per-row solvers then keep every row
within the cap."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import ConfigError, from_dict, load_config

LM = {"model": {"name": "hf_causal_lm", "path": "DIR"}, "data": {"calibration": "corpus.txt"}}
LENET = "configs/lenet5_fmnist.yaml"


def _lm(**quantize):
    return from_dict({**LM, "quantize": quantize})


def test_serve_bits_caps_k_max_and_enters_the_stage_key_only_when_set():
    from pipeline.quantize.stage import _sections

    assert _lm(serve_bits=3).quantize.k_max == 8
    assert _lm(serve_bits=4, method="ecsq").quantize.k_max == 16
    assert _lm(serve_bits=2, k_max=4).quantize.k_max == 4
    assert _lm(serve_bits=4, k_max=8).quantize.k_max == 8  # a lower k_max stays
    assert "serve_bits" not in _sections(_lm())["quantize"]  # earlier runs keep their keys
    assert _sections(_lm(serve_bits=3))["quantize"]["serve_bits"] == 3
    assert _sections(_lm(serve_bits=3))["quantize"]["k_max"] == 8


@pytest.mark.parametrize(
    "quantize,words",
    [
        ({"method": "kmeans", "k": 32, "serve_bits": 4}, r"quantize\.k=32 needs more than 4 bits"),
        ({"method": "uniform", "k_max": 64, "serve_bits": 4}, r"quantize\.k_max=64 contradicts"),
        ({"serve_bits": 5}, r"serve_bits"),
    ],
)
def test_contradictory_settings_are_config_errors(quantize, words):
    with pytest.raises((ConfigError, ValueError), match=words):
        _lm(**quantize)


def test_pruning_leaves_room_for_the_zero_level_and_network_scope_rates_are_refused():
    # LeNet-5 prunes by default: 4 bits hold 15 levels besides the pruned zero.
    assert (
        load_config(
            LENET, ["quantize.method=kmeans", "quantize.k=15", "quantize.serve_bits=4"]
        ).quantize.k
        == 15
    )
    with pytest.raises(ConfigError, match=r"quantize\.k=16 .*at most 15 levels"):
        load_config(LENET, ["quantize.method=kmeans", "quantize.k=16", "quantize.serve_bits=4"])
    with pytest.raises(ConfigError, match="scope=channel or group"):
        load_config(LENET, ["quantize.serve_bits=4"])  # network-scope uniform by target_bits


@pytest.mark.parametrize("method,bits", [("uniform", 1.8), ("ecsq", 2.0)])
def test_rows_solved_under_serve_bits_3_have_at_most_8_levels(method, bits):
    """At a rate where some rows want more than 8 levels (heavy-tailed rows), every row
    keeps at most 8 under serve_bits 3; without the cap some row has more."""
    from pipeline.quantize.rate import solve_rows_global_rate

    rng = np.random.default_rng(0)
    W = (rng.standard_t(4, size=(24, 512)) * 0.02).astype(np.float32)
    H = rng.gamma(2.0, size=W.shape).astype(np.float32)
    capped = _lm(method=method, serve_bits=3).quantize
    found = solve_rows_global_rate([(W, H)], bits, method, k_max=capped.k_max, tol=0.05)
    levels = np.concatenate([r.levels for r in found.results])
    assert levels.max() <= 8
    free = solve_rows_global_rate(
        [(W, H)], bits, method, k_max=_lm(method=method).quantize.k_max, tol=0.05
    )
    assert np.concatenate([r.levels for r in free.results]).max() > 8
