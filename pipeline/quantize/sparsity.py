"""One-shot pruning of a language model's weight rows, inside the per-row quantizer.

A language model is not retrained after pruning (there is no training split, and a retrain
would cost a pre-training run), so its weights are cut in one shot by a saliency and the
quantizer then codes only the weights that are kept:

- **saliency** of weight w_ij: ``w²`` (``magnitude``) or ``h_ij·w²`` (``obd``, Optimal Brain
  Damage's ½·h·w² without the constant) with the run's Hessian diagonal h. With
  ``hessian.estimator=fisher`` that is OBD with the empirical Fisher; with
  ``hessian.estimator=activation`` h_ij = E[x_j²], and h·w² orders the weights as Wanda's
  |w|·‖x‖ (Sun et al., 2023) does.
- **pattern**: every row (output channel) keeps the same number of weights, its most salient
  ``round(keep·C)`` (Wanda compares weights within a row, which for language models beats a
  per-tensor threshold), or ``n`` of every ``m`` consecutive weights of a row (N:M, e.g. 2:4,
  the structure sparse tensor cores run).

Because every row of a tensor keeps the same count, the kept weights of a tensor form a dense
[R, n_keep] matrix (:func:`compact`); the per-row solvers (ECSQ, uniform, k-means) quantize it
unchanged, and :func:`expand` puts the indices back at the kept positions (pruned positions get
index 0, which no reader uses: the mask says they are zero). The mask itself is coded by the
container as for a retrained model's (gap symbols under a static code, or the context coder),
and :func:`position_bits` estimates what that costs so the rate search can leave room for it.

Ties in saliency are broken by column (the lower column is kept), so a mask depends only on
W and h, never on how rows were split into slabs or tasks.
"""

from __future__ import annotations

import fnmatch

import numpy as np

from pipeline.config_checks import parse_n_m

__all__ = ["compact", "expand", "keep_of", "keeps_for", "parse_n_m", "position_bits", "row_mask",
           "saliency", "warn_huffman_masks"]


def keep_of(name: str, keep: dict[str, float], embeddings: set[str] | frozenset = frozenset()
            ) -> float | None:
    """The kept fraction `keep` gives tensor `name`: its exact name first, else the first
    pattern (fnmatch: ``*``, ``?``, ``[...]``) that matches it; None when none does. A
    pattern never selects an embedding or the output head (``embeddings``): they are looked
    up a row per token, and their rows are tokens, not channels; name one exactly to prune it.
    """
    if name in keep:
        return float(keep[name])
    if name in embeddings:
        return None
    for pat, r in keep.items():
        if fnmatch.fnmatchcase(name, pat):
            return float(r)
    return None


def keeps_for(names: list[str], keep: dict[str, float],
              embeddings: set[str] | frozenset = frozenset()) -> dict[str, float]:
    """{tensor: kept fraction} of the tensors `keep` prunes (see :func:`keep_of`). A name or
    pattern of `keep` that selects none of `names` is an error (a typo must not silently
    leave the model unpruned)."""
    import difflib

    out = {}
    for n in names:
        r = keep_of(n, keep, embeddings)
        if r is not None and r < 1.0:
            out[n] = r
    for pat in keep:
        if pat not in names and not any(fnmatch.fnmatchcase(n, pat) for n in names
                                         if n not in embeddings):
            near = difflib.get_close_matches(pat, names, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ValueError(f"prune.keep: {pat!r} names none of the quantized tensors{hint}; "
                             "patterns use * and ? (e.g. 'model.layers.*.mlp.*')")
    return out


def saliency(W: np.ndarray, H: np.ndarray | None, criterion: str) -> np.ndarray:
    """float64 [R, C] saliency of each weight: w² (magnitude) or h·w² (obd)."""
    w2 = np.square(W, dtype=np.float64)
    if criterion == "magnitude":
        return w2
    if criterion != "obd":
        raise ValueError(f"unknown pruning criterion {criterion!r}")
    if H is None:
        raise ValueError("prune.criterion=obd needs the Hessian (hessian.enabled=true)")
    return w2 * np.asarray(H, np.float64)


def _top_per_group(S: np.ndarray, n: int) -> np.ndarray:
    """bool mask of S [G, m]: the n largest of each row, ties to the lower column."""
    order = np.argsort(-S, axis=1, kind="stable")[:, :n]
    mask = np.zeros(S.shape, bool)
    np.put_along_axis(mask, order, True, axis=1)
    return mask


def row_mask(S: np.ndarray, *, keep: float | None = None,
             n_m: tuple[int, int] | None = None) -> np.ndarray:
    """bool [R, C] (True = kept) from saliency S [R, C]: each row keeps its
    max(1, round(keep·C)) most salient weights, or (n_m) n of every m consecutive ones.
    With both, N:M wins (keep must then be n/m; the config checks it)."""
    S = np.asarray(S)
    R, C = S.shape
    if n_m is not None:
        n, m = n_m
        if C % m:
            raise ValueError(f"a row of {C} weights does not split into groups of {m} "
                             f"(prune.n_m={n}:{m}); choose M dividing the input width")
        return _top_per_group(S.reshape(R * (C // m), m), n).reshape(R, C)
    if keep is None or not 0.0 < keep <= 1.0:
        raise ValueError(f"kept fraction {keep!r} is not in (0, 1]")
    return _top_per_group(S, kept_per_row(C, keep, None))


def kept_per_row(C: int, keep: float | None, n_m: tuple[int, int] | None) -> int:
    """Weights each row of C keeps."""
    if n_m is not None:
        return C // n_m[1] * n_m[0]
    return min(C, max(1, int(round(float(keep) * C))))


def compact(A: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A [R, C] at the kept positions of `mask` (every row keeps the same count), in column
    order: [R, n_keep], C-contiguous. A broadcast row ([1, C] or a 0-stride view) is read
    row by row like a full one."""
    R = mask.shape[0]
    counts = mask.sum(axis=1)
    if R and (counts != counts[0]).any():
        raise ValueError("the rows of a mask keep different counts; one-shot pruning keeps "
                         "the same number in every row")
    n = int(counts[0]) if R else 0
    A = np.broadcast_to(A, mask.shape)
    return np.ascontiguousarray(A[mask].reshape(R, n))


def expand(idx: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Indices [R, n_keep] of the kept weights back at their positions in [R, C], 0 at the
    pruned ones (the mask says they are zero)."""
    out = np.zeros(mask.shape, idx.dtype)
    out[mask] = idx.reshape(-1)
    return out


def position_bits(mask: np.ndarray, coder: str = "huffman") -> float:
    """Bits the container's gap coding spends on a mask's kept positions with one static
    table for the tensor (the encoder may share tables between tensors), plus the table:
    what the rate search leaves room for. The context coder (encode.positions=context)
    spends less on structured masks."""
    from pipeline.encode.positions import (
        choose_max_gap,
        gap_histogram,
        gap_symbol_counts,
        gaps_from_mask,
    )

    flat = np.asarray(mask, bool).reshape(-1)
    if flat.all() or not flat.any():
        return 0.0
    values, counts = gap_histogram(gaps_from_mask(flat))
    max_gap, table = choose_max_gap(values, counts, coder=coder)
    return float(table.cost_bits(gap_symbol_counts(values, counts, max_gap))
                 + 8.0 * table.table_bytes())


def warn_huffman_masks(log, coder: str) -> None:
    """Say so when masks are gap-coded with Huffman: at least a bit per kept weight."""
    if coder == "huffman":
        log.warning("quantize: the masks are gap-coded with Huffman, at least a bit per kept "
                    "weight (a 90%-kept mask costs 1 bit a weight, its entropy 0.47): "
                    "encode.coder=ans codes them at their entropy and leaves those bits to "
                    "the kept weights (docs/PRUNING.md)")
