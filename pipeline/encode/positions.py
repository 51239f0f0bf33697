"""Positions of the kept weights of a pruned tensor as gap symbols (Han et al. 2015).

A tensor's kept flat positions p_0 < p_1 < ... become gaps g_i = p_i - p_{i-1} with
p_{-1} = -1, so every gap is >= 1. With a largest directly coded gap ``max_gap`` = m, the
symbol alphabet is 0..m:

- symbol s in 1..m: the next kept weight is s positions after the current one;
- symbol 0 (escape, Han's "filler"): advance m positions without a kept weight.

A gap g is coded as (g - 1) // m escapes followed by the symbol (g - 1) % m + 1. Everything
lives in one Huffman-coded stream, with no raw extension bits; m is chosen per code table to
minimise (coded symbols + table) bits.
"""

from __future__ import annotations

import numpy as np

from .huffman import CodeTable, fixed_lengths, huffman_lengths

__all__ = [
    "MAX_GAP_LIMIT",
    "choose_max_gap",
    "gap_histogram",
    "gap_symbol_counts",
    "gaps_from_mask",
    "gaps_to_symbols",
    "symbols_to_positions",
]

MAX_GAP_LIMIT = (1 << 16) - 1
"""Largest max_gap considered: a 65,536-symbol alphabet; longer gaps are rare enough that
escapes cost less than the code table for a larger alphabet."""


def gaps_from_mask(mask: np.ndarray) -> np.ndarray:
    """Gaps between consecutive kept positions. mask: bool [numel] (flat, C order).

    Returns int64 [n_kept], every gap >= 1 (the first is measured from position -1).
    """
    pos = np.flatnonzero(mask)
    return np.diff(pos, prepend=-1)


def gaps_to_symbols(gaps: np.ndarray, max_gap: int) -> np.ndarray:
    """Gap symbols for gaps int [n_kept] (each >= 1): [n_kept + n_escapes], uint16/uint32."""
    g = np.asarray(gaps, np.int64)
    q = (g - 1) // max_gap
    r = (g - 1) % max_gap + 1
    n_out = int(g.shape[0] + q.sum())
    out = np.zeros(n_out, np.uint16 if max_gap < (1 << 16) else np.uint32)
    # Each gap's escapes come first (zeros already), then its remainder symbol.
    out[np.cumsum(q + 1) - 1] = r
    return out


def symbols_to_positions(symbols: np.ndarray, max_gap: int) -> np.ndarray:
    """Kept flat positions int64 [n_kept] from gap symbols [n] (values 0..max_gap)."""
    s = np.asarray(symbols).astype(np.int64)
    inc = np.where(s == 0, max_gap, s)
    cum = np.cumsum(inc) - 1
    return cum[s != 0]


def gap_histogram(gaps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct gap values int64 [d], their counts int64 [d]) for gaps [n_kept] (>= 1)."""
    g = np.asarray(gaps, np.int64)
    if g.size and int(g.max()) < (1 << 24):
        # O(n) instead of unique's sort: pruned LLM tensors have 10^8 gaps.
        hist = np.bincount(g)
        vals = np.flatnonzero(hist)
        return vals.astype(np.int64), hist[vals].astype(np.int64)
    vals, cnts = np.unique(g, return_counts=True)
    return vals, cnts.astype(np.int64)


def gap_symbol_counts(values: np.ndarray, counts: np.ndarray, max_gap: int) -> np.ndarray:
    """Symbol histogram int64 [max_gap + 1] of the gap stream, from a gap histogram."""
    v = np.asarray(values, np.int64)
    c = np.asarray(counts, np.int64)
    # float64 weights are exact for counts below 2**53.
    hist = np.bincount((v - 1) % max_gap + 1, weights=c, minlength=max_gap + 1)
    hist = np.rint(hist).astype(np.int64)
    hist[0] = int(np.dot((v - 1) // max_gap, c))
    return hist


def choose_max_gap(
    values: np.ndarray, counts: np.ndarray, *, fixed: bool = False, coder: str = "huffman"
):
    """Pick max_gap minimising coded gap-stream bits plus code-table bits.

    Args:
        values, counts: gap histogram (see :func:`gap_histogram`), pooled over every tensor
            that will share the code table.
        fixed: fixed-length codes (Han et al.'s fixed-width gap field): candidates are
            2**b - 1 for b = 1..16, and the table costs nothing.
        coder: ``"huffman"`` (a :class:`CodeTable`) or ``"ans"`` (an rANS
            :class:`~pipeline.encode.ans_table.AnsTable`, costed by its coded bits plus its table).

    Returns:
        (max_gap, table) with table.alphabet == max_gap + 1.
    """
    v = np.asarray(values, np.int64)
    largest = int(v.max()) if v.size else 1
    top = max(1, min(largest, MAX_GAP_LIMIT))
    if fixed:
        cands = sorted({min((1 << b) - 1, MAX_GAP_LIMIT) for b in range(1, 17)})
        # No point in a wider field than the largest gap needs.
        cands = [m for m in cands if m < 2 * top] or [1]
    else:
        cands = np.unique(np.round(np.geomspace(1, top, num=48)).astype(np.int64)).tolist()
        cands = sorted(set(cands) | {top})
    best = None
    for m in cands:
        hist = gap_symbol_counts(v, counts, m)
        table, table_bits = _gap_table(hist, m, fixed, coder)
        bits = table.cost_bits(hist) + table_bits
        if best is None or bits < best[0]:
            best = (bits, m, table)
    assert best is not None
    return best[1], best[2]


def _gap_table(hist: np.ndarray, max_gap: int, fixed: bool, coder: str):
    """(table, bits its serialization costs) for a gap-symbol histogram."""
    if coder == "ans":
        from .ans_table import AnsTable

        table = AnsTable.from_counts(hist)
        return table, 8 * table.table_bytes()
    if fixed:
        return CodeTable(fixed_lengths(max_gap + 1), fixed=True), 0
    lengths = huffman_lengths(hist)
    return CodeTable(lengths), (max_gap + 1) * max(1, int(lengths.max()).bit_length())
