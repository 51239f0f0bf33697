"""rANS decoding without the 2**prob_bits-slot lookup table, for short streams.

:func:`pipeline.encode.ans.ans_decode` looks a symbol up by the low ``prob_bits`` bits of its
state in a table of ``M = 2**prob_bits`` slots. Building that table costs M steps; for a
stream of a few symbols (a chunk under a table of its own) the build is all the cost, and a
header can name a different table for every chunk. Here the symbol is found by binary search
over the cumulative frequencies instead: O(alphabet) to prepare, O(log alphabet) a symbol. The
result is identical (same state arithmetic); ans_decode uses it for one-lane streams of fewer
than M / 16 symbols whose table has no lookup table built yet, so building one costs at most
16 slots per decoded symbol.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["SEARCH_MAX_FRACTION", "decode_one_lane_search"]

SEARCH_MAX_FRACTION = 16
"""Streams of fewer than M / 16 symbols are decoded by search (no lookup table built)."""


@njit(cache=True, nogil=True)
def decode_one_lane_search(data, n, cum, freq, prob_bits, x_end, lower, out):  # pragma: no cover
    """As ans._decode_one_lane, the symbol found in ``cum`` (int64 [alphabet]: cumulative
    frequencies) by binary search; ``lower`` is the renormalization bound L. 0 if consistent,
    1 (final state or end position wrong), 2 (a leading zero byte)."""
    size = data.shape[0]
    fmask = (np.int64(1) << prob_bits) - 1
    k = cum.shape[0]
    pos = 0
    x = np.int64(0)
    if size > 0 and data[0] == 0:
        return 2
    while x < lower and pos < size:
        x = (x << 8) | data[pos]
        pos += 1
    for i in range(n):
        slot = x & fmask
        # The largest s with cum[s] <= slot: a symbol of frequency 0 shares its cum with the
        # next one, so s always has a nonzero frequency, and slot < cum[s] + freq[s].
        lo = 0
        hi = k
        while hi - lo > 1:
            mid = (lo + hi) >> 1
            if cum[mid] <= slot:
                lo = mid
            else:
                hi = mid
        x = freq[lo] * (x >> prob_bits) + slot - cum[lo]
        out[i] = lo
        while x < lower and pos < size:
            x = (x << 8) | data[pos]
            pos += 1
    if x != x_end or pos != size:
        return 1
    return 0
