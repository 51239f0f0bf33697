"""Planning the streamed Hessian as P data partitions × G groups of consecutive blocks.

The driver plans the work units without building a module: `block_index` maps each target
tensor to its decoder block from the names in a `WeightsFolder`'s headers, `block_counts`
sums the target weights per block, and `block_groups` cuts the stack into ≤ G runs of
consecutive blocks with balanced weight counts. `window_slices` cuts the calibration windows
into P contiguous partitions. The streamed stage runs each (partition, group) as units that
hand the group's input activations over (`pipeline.hessian.handover`); one task can also
compute a group alone with `activation_streamed` or `fisher_streamed` and ``blocks=group``.
Either way the unit emits float64 sums with counts; `reduce_partials` adds the partitions'
sums and counts per tensor and divides once, which is the single-task result up to float64
summation order (the per-window numbers are computed by the same operations whichever unit
runs them, when the forward batch does not straddle a partition boundary: see
`pipeline.hessian.stream`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "group_names",
    "block_of",
    "block_index",
    "num_blocks",
    "block_counts",
    "block_groups",
    "window_slices",
    "reduce_partials",
]

# The same decoder-block naming `pipeline.models.load_streamed.block_targets` selects
# (`…layers.<i>.…`, GPT-2's `h.<i>.`, `blocks.<i>.`); the first match in a name is its block.
_BLOCK = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")


def block_of(name: str) -> int | None:
    """The decoder block index in a tensor name (`…layers.<i>.…`), or None."""
    return _index(name)


def _index(name: str) -> int | None:
    m = _BLOCK.search(name)
    return int(m.group(1)) if m else None


def num_blocks(weights: Any) -> int:
    """Decoder blocks in a `WeightsFolder` (1 + the largest block index among its tensors)."""
    found = [i for i in map(_index, weights.tensors) if i is not None]
    return max(found) + 1 if found else 0


def block_index(weights: Any, names: Iterable[str]) -> dict[str, int]:
    """The decoder block of each named tensor, from the names alone (no module is built).

    weights: a `WeightsFolder` (only its header-derived ``tensors`` mapping is used).
    Raises ValueError for a name that is not in the folder or not inside a block."""
    out: dict[str, int] = {}
    for n in names:
        if n not in weights.tensors:
            raise ValueError(f"{n!r} is not a tensor of {getattr(weights, 'url', 'the model')}")
        i = _index(n)
        if i is None:
            raise ValueError(
                f"{n!r} is not a parameter of a decoder block (…layers.<i>.…) "
                f"and cannot be streamed; quantize block weights only"
            )
        out[n] = i
    return out


def block_counts(weights: Any, names: Iterable[str]) -> list[int]:
    """Target weights per decoder block: a list as long as the model has blocks (0 for a
    block without targets), the input `block_groups` balances."""
    counts = [0] * num_blocks(weights)
    for n, i in block_index(weights, names).items():
        counts[i] += int(weights.tensors[n].numel)
    return counts


def _lm_counts(lm: Any) -> list[int]:
    """Parameters per block of a `StreamedLM`, from the checkpoint's headers."""
    return [
        sum(int(lm.weights.tensors[n].numel) for n in lm.block_params(i) if n in lm.weights.tensors)
        for i in range(len(lm.layers))
    ]


def block_groups(lm_or_counts: Any, groups: int) -> list[range]:
    """≤ `groups` ranges of consecutive blocks covering every block, in order, balanced by
    the per-block counts (a `StreamedLM`: its parameters per block; a sequence of ints:
    e.g. `block_counts`).

    The cut minimises the largest group's count, then the sum of squared group counts (so
    the other groups are balanced too); among equal cuts the earliest boundaries win, so the
    plan is deterministic. min(groups, blocks) ranges, none empty."""
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be an integer ≥ 1, got {groups!r}")
    counts = (
        _lm_counts(lm_or_counts)
        if hasattr(lm_or_counts, "layers")
        else [int(c) for c in lm_or_counts]
    )
    if any(c < 0 for c in counts):
        raise ValueError("block counts must be ≥ 0")
    n = len(counts)
    g = min(groups, n)
    if g == 0:
        return []
    pre = [0]
    for c in counts:
        pre.append(pre[-1] + c)
    # best[k][j]: the best (max, sum of squares) cutting blocks [0, j) into k groups;
    # cut[k][j]: where its last group starts.
    inf = (float("inf"), float("inf"))
    best = [[inf] * (n + 1) for _ in range(g + 1)]
    cut = [[0] * (n + 1) for _ in range(g + 1)]
    best[0][0] = (0, 0)
    for k in range(1, g + 1):
        for j in range(k, n - (g - k) + 1):
            for i in range(k - 1, j):
                prev = best[k - 1][i]
                if prev == inf:
                    continue
                s = pre[j] - pre[i]
                cand = (max(prev[0], s), prev[1] + s * s)
                if cand < best[k][j]:
                    best[k][j], cut[k][j] = cand, i
    out, j = [], n
    for k in range(g, 0, -1):
        i = cut[k][j]
        out.append(range(i, j))
        j = i
    return out[::-1]


def window_slices(n_windows: int, parts: int) -> list[slice]:
    """min(parts, n_windows) contiguous slices of the windows, sizes differing by ≤ 1."""
    if parts < 1:
        raise ValueError(f"parts must be ≥ 1, got {parts!r}")
    p = min(parts, n_windows)
    edges = [n_windows * k // p for k in range(p + 1)] if p else [0]
    return [slice(a, b) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def reduce_partials(
    partials: Iterable[Mapping[str, tuple[np.ndarray, int]]],
) -> dict[str, np.ndarray]:
    """Per tensor: (Σ of the partitions' float64 sums) / (Σ of their counts).

    partials: one mapping per unit, name -> (sums float64 [any shape], count) as `emit`
    received them. The result is float64, shaped like the sums."""
    acc: dict[str, np.ndarray] = {}
    count: dict[str, int] = {}
    for part in partials:
        for name, (sums, n) in part.items():
            s = np.asarray(sums, dtype=np.float64)
            if name in acc:
                if acc[name].shape != s.shape:
                    raise ValueError(
                        f"{name}: partial sums shaped {list(s.shape)} and "
                        f"{list(acc[name].shape)} cannot be added"
                    )
                acc[name] += s
                count[name] += int(n)
            else:
                acc[name] = s.copy()
                count[name] = int(n)
    for name, n in count.items():
        if n <= 0:
            raise ValueError(f"{name}: the partitions saw no data (count {n})")
    return {name: acc[name] / count[name] for name in acc}


def _check_range(blocks: Sequence[int] | None, n: int) -> range:
    """`blocks` as a non-empty range of consecutive blocks within [0, n) (all when None)."""
    if blocks is None:
        return range(n)
    if (
        not isinstance(blocks, range)
        or blocks.step != 1
        or not (0 <= blocks.start < blocks.stop <= n)
    ):
        raise ValueError(
            f"blocks must be a non-empty range(lo, hi) with 0 ≤ lo < hi ≤ {n}, got {blocks!r}"
        )
    return blocks


def group_names(names: list[str], shapes: dict[str, list[int]], groups: int, *,
                first: tuple[str, ...] | list[str] = (), last: tuple[str, ...] | list[str] = (),
                blocks: int = 0) -> list[tuple[range, list[str]]]:
    """(block range, its tensors in model order) of ≤ `groups` runs of consecutive decoder
    blocks, balanced by the weights of the block tensors in them (`shards.block_groups`); a
    run without any tensor to quantize is left out.

    `first`: tensors outside the blocks that the group starting at block 0 computes; `last`:
    those that the last group computes, its range then reaching the model's top (`blocks`,
    the model's block count). See `embedding_placement`."""
    outside = set(first) | set(last)
    where = {n: block_of(n) for n in names if n not in outside}
    counts = [0] * (max(where.values(), default=-1) + 1)
    for n, b in where.items():
        counts[b] += int(np.prod(shapes[n]))
    ranges = block_groups(counts, groups) if counts else [range(0, max(blocks, 1))]
    out = []
    for k, rng in enumerate(ranges):
        top = k == len(ranges) - 1
        own = [n for n in names if (n in where and where[n] in rng)
               or (k == 0 and n in first) or (top and n in last)]
        if top and any(n in last for n in names):
            rng = range(rng.start, max(rng.stop, blocks))
        if own:
            out.append((rng, own))
    return out
