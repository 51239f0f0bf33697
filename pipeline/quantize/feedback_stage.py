"""The error-feedback step of a tensor's quantize unit (``quantize.feedback: ldl``).

`pipeline.quantize.tensors_stage` solves every row of a tensor with plain ECSQ (or uniform) at
the run's λ, then hands the result here: the tensor's X·Xᵀ / n (written by the hessian stage,
pipeline/hessian/second_moment.py) drives :func:`pipeline.quantize.feedback.ecsq_feedback`
with the same λ, codebooks and code lengths, and the better of the two per row (on the
layer's full second-order loss + λ·bits) becomes the tensor's result. A tensor without a
matrix (the embedding, the head) keeps its plain result. The unit then measures the coded
bits of what it keeps, so the stage's exact-rate loop sees the rate the feedback spends.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pipeline.encode import rotation

__all__ = ["feedback_tensor"]


def feedback_tensor(cfg, hess, name: str, t: torch.Tensor, h: np.ndarray,
                    shape: tuple[int, int], parts: list, lam: float) -> tuple[list, dict | None]:
    """(parts, stats): `parts` (the tensor's plain row results, consecutive slabs) replaced
    by one `RowsResult` of the error-feedback rows; stats for the unit's layer figures, None
    when the tensor has no X·Xᵀ (parts returned as given)."""
    from pipeline.hessian.second_moment import read_second_moment
    from pipeline.quantize.feedback import compact, ecsq_feedback
    from pipeline.quantize.rows import RowsResult
    from pipeline.quantize.rows_stage import coded_bits

    R, C = shape
    XtX = read_second_moment(hess, name, C)
    if XtX is None:
        return parts, None
    seed = rotation.tensor_seed(cfg.quantize.rotate, cfg.seed, C)
    if seed is not None:  # quantize.rotate: t holds V·w per row; its moment is V·XᵀX·Vᵀ
        XtX = np.ascontiguousarray(rotation.forward(rotation.forward(XtX, seed).T, seed))
    q = cfg.quantize
    plain = RowsResult.concat(parts)
    plain_bits = float(sum(coded_bits(parts, cfg.encode.coder).values()))
    W = t.to(torch.float32).numpy()
    hh = h.reshape(-1, C)  # [1, C] (activation) or [R, C]
    idx, cb, st = ecsq_feedback(W, XtX, plain.codebooks, plain.levels, plain.counts, lam,
                                h=hh, indices=plain.indices, damp=q.feedback_damp,
                                block=q.feedback_block,
                                level_bits=float(plain.info.get("level_bits", 20.0)),
                                floor=q.hessian_floor)
    del XtX
    cb, idx, levels, counts, entropy = compact(idx, cb)
    deq = np.take_along_axis(cb, idx.astype(np.int64), axis=1)
    dist = (np.broadcast_to(hh, (R, C)) * (W - deq).astype(np.float64) ** 2).sum(1)
    res = RowsResult(cb, idx, levels, counts, dist, entropy, float(lam), plain.row_offset,
                     plain.method, {**plain.info, "feedback": True})
    stats: dict[str, Any] = {k: st[k] for k in ("rows", "rows_feedback", "objective_plain",
                                                "objective_final", "seconds")}
    stats["coded_bits_plain"] = plain_bits
    return [res], stats
