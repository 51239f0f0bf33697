"""Diagonal-Hessian estimation: plain-function estimators (``estimators``, with the engines
``persample`` and ``hutchinson``; ``lm`` and ``stream`` for language models); stages orchestrate.
"""

from pipeline.hessian.estimators import (
    ESTIMATORS,
    GGN_MODES,
    HUTCHINSON_NONNEG,
    HessianSums,
    adam_diag,
    estimate_diag,
)

__all__ = [
    "ESTIMATORS",
    "GGN_MODES",
    "HUTCHINSON_NONNEG",
    "HessianSums",
    "adam_diag",
    "estimate_diag",
]
