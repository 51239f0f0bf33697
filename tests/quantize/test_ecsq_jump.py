"""ECSQ's rate search across a jump of the entropy: the closer side within 0.1 bit, with a
warning; a wider jump stays an error."""

import logging

import pytest

from pipeline.quantize.entropy_constrained import _search_lam


def _staircase(above: float, below: float):
    # The entropy as a step function of λ (a cluster appears or vanishes at λ = 5).
    return lambda lam: (None, None, [], above if lam < 5.0 else below)


def test_a_narrow_jump_takes_the_closer_side_and_says_so(caplog):
    with caplog.at_level(logging.WARNING, logger="hwq"):
        *_, lam = _search_lam(_staircase(3.04, 2.97), 3.0, 1.0, 4.0, 0.02, "net", 5.0)
    assert lam >= 5.0  # the 2.97-bit side is 0.03 off, the 3.04-bit side 0.04
    assert "inside a jump" in caplog.text


def test_a_wide_jump_is_an_error():
    with pytest.raises(RuntimeError, match="cannot hit target_bits=3.0"):
        _search_lam(_staircase(3.5, 2.5), 3.0, 1.0, 4.0, 0.02, "net", 5.0)
