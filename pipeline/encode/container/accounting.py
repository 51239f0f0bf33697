"""The bit accounting of a .hwq file: where every bit goes (indices, positions, codebooks,
code tables, raw tensors, header) and the entropies the coded streams are measured against.
The writer returns it; `HwqReader.accounting` recomputes it from a file."""

from __future__ import annotations

import numpy as np

from ..huffman import entropy_bits
from .header import _Header


def _gap_entropy_total(values: np.ndarray, counts: np.ndarray) -> float:
    """Order-0 entropy in bits of a gap stream with this histogram (all its gaps together;
    a value may repeat, as when several tensors' histograms are pooled)."""
    _, inv = np.unique(np.asarray(values, np.int64), return_inverse=True)
    c = np.bincount(inv.reshape(-1), weights=np.asarray(counts, np.float64))
    c = c[c > 0]
    n = c.sum()
    if n <= 0:
        return 0.0
    return float(-(c * np.log2(c / n)).sum())


def _accounting(h: _Header, table_hist: list[np.ndarray], payload_start: int,
                context_index_entropy: float = 0.0, gap_entropy: float = 0.0) -> dict:
    """context_index_entropy: order-0 entropy (bits, all kept weights) of the context-coded
    indices, pooled as tables would pool them; gap_entropy: order-0 entropy of the gap values
    of every pruned tensor, pooled likewise (the yardstick for any position coder)."""
    bits = dict.fromkeys(
        ("indices", "positions", "codebooks", "code_tables", "raw_tensors", "header"), 0
    )
    bits["header"] = 8 * payload_start
    bits["codebooks"] = 8 * sum(c[1].length for c in h.codebooks.values())
    bits["code_tables"] = 8 * sum(t.section.length for t in h.tables)
    n_weights = n_kept = n_raw = fixed_bits = raw_baseline = 0
    idx_entropy = pos_entropy = 0.0
    idx_tables: set[int] = set()
    pos_tables: set[int] = set()
    for t in h.tensors.values():
        if t.kind == "raw":
            bits["raw_tensors"] += 8 * t.raw.length
            n_raw += t.numel
            raw_baseline += 8 * t.raw.length
            continue
        n_weights += t.numel
        n_kept += t.n_kept
        k = h.codebooks[t.codebook][0][-1]
        fixed_bits += t.n_kept * max(1, (k - 1).bit_length())
        bits["indices"] += 8 * sum(s.length for s, _ in t.indices.chunks)
        idx_tables.update(t.indices.tables())
        if t.positions is not None:
            bits["positions"] += 8 * sum(s.length for s, _ in t.positions.chunks)
            if t.positions.table is not None and t.positions.coder == "table":
                pos_tables.add(t.positions.table)
    idx_entropy = context_index_entropy
    for i in idx_tables:
        idx_entropy += entropy_bits(table_hist[i]) * float(table_hist[i].sum())
    for i in pos_tables:
        pos_entropy += entropy_bits(table_hist[i]) * float(table_hist[i].sum())
    file_bytes = payload_start + h.payload_bytes
    assert sum(bits.values()) == 8 * file_bytes
    per = 1.0 / n_kept if n_kept else 0.0
    return {
        "file_bytes": file_bytes,
        "bits": bits,
        "n_weights": n_weights,
        "n_kept": n_kept,
        "n_raw_elements": n_raw,
        "index_entropy_bits": idx_entropy * per,
        "position_entropy_bits": pos_entropy * per,
        "gap_entropy_bits": gap_entropy * per,
        "index_bits_per_weight": bits["indices"] * per,
        "position_bits_per_weight": bits["positions"] * per,
        "fixed_length_index_bits": fixed_bits,
        "ratio_fixed_length_bits": fixed_bits / bits["indices"] if bits["indices"] else None,
        "compression_ratio": (32 * n_weights + raw_baseline) / (8 * file_bytes),
    }
