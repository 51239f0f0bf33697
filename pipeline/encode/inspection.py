"""`hwq inspect`'s table: one row per item of a .hwq file and honest totals.

The totals follow the run report's definition of bits per weight (pipeline/encode/stage.py,
``quantized_bits``): the bits the quantized tensors need — their indices and positions, the
codebooks, the code tables, and the header's share by tensor entries — over the quantized
tensors' elements (pruned ones included). Unquantized tensors (embeddings, norms stored as
they are) are a separate row, never in that figure: dividing the whole file by the quantized
weights, as this table once did, reported ~12 bits where the report said ~3.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from typing import Any

__all__ = ["format_inspect", "inspect_rows", "inspect_totals", "serve_width", "serve_widths"]


def serve_width(levels: int) -> int | None:
    """The index width a lookup-table runtime packs a codebook of ``levels`` entries in:
    2, 3, 4 or 8 bits; None above 256 levels."""
    return next((b for b in (2, 3, 4, 8) if levels <= 1 << b), None)


def serve_widths(rows: list[dict]) -> dict:
    """The width a file serves at, from inspect rows: {"serve_bits" (the widest tensor's;
    None if some tensor needs more than 8 bits or none is quantized), "levels" (its largest
    row codebook, the zero of pruned weights counted), "tensor" (which)}."""
    q = [r for r in rows if r["kind"] == "quantized"]
    if not q or any("levels" not in r for r in q):  # (rows without level counts: unknown)
        return {"serve_bits": None, "levels": None, "tensor": None}
    widest = max(q, key=lambda r: r["levels"])
    return {"serve_bits": serve_width(widest["levels"]), "levels": widest["levels"],
            "tensor": widest["name"]}


def inspect_rows(
    h: Any, payload_start: int, file_bytes: int, out_bytes: Callable[[Any], int]
) -> list[dict]:
    """Per-item rows of a parsed header (container.header._Header): see ``inspect_hwq``.
    ``out_bytes(tensor)``: the bytes of its dense form."""
    rows: list[dict] = [{"kind": "header", "name": "(header)", "bytes": payload_start}]
    for name, (shape, sec, *_) in h.codebooks.items():
        rows.append({"kind": "codebook", "name": name, "shape": shape, "bytes": sec.length})
    for i, t in enumerate(h.tables):
        rows.append(
            {"kind": "code_table", "name": f"table {i} ({t.kind}, {t.alphabet} symbols)",
             "bytes": t.section.length}
        )  # fmt: skip
    for t in h.tensors.values():
        r: dict[str, Any] = {
            "kind": t.kind, "name": t.name, "shape": t.shape, "dtype": t.dtype,
            "numel": t.numel, "decoded_bytes": out_bytes(t),
        }  # fmt: skip
        if t.kind == "raw":
            r.update(bytes=t.raw.length, kept_fraction=1.0)
        else:
            # The largest row codebook (its header shape's last axis: per-row codebooks are
            # cut to the widest row) and, for a pruned tensor, the zero a runtime adds.
            levels = h.codebooks[t.codebook][0][-1] + (t.positions is not None)
            r.update(levels=levels, serve_bits=serve_width(levels))
            ib = sum(s.length for s, _ in t.indices.chunks)
            pb = sum(s.length for s, _ in t.positions.chunks) if t.positions else 0
            r.update(
                scope=t.scope, codebook=t.codebook, n_kept=t.n_kept,
                kept_fraction=t.n_kept / t.numel if t.numel else 1.0,
                index_bytes=ib, position_bytes=pb, bytes=ib + pb,
                index_bits_per_kept=8 * ib / t.n_kept if t.n_kept else 0.0,
                position_bits_per_kept=8 * pb / t.n_kept if t.n_kept else 0.0,
            )  # fmt: skip
        r["bits_per_weight"] = 8 * r["bytes"] / t.numel if t.numel else 0.0
        rows.append(r)
    for r in rows:
        r["share"] = r["bytes"] / file_bytes if file_bytes else 0.0
    return rows


def inspect_totals(rows: list[dict]) -> dict:
    """Totals of :func:`pipeline.encode.container.inspect_hwq` rows:

    - ``quantized_bytes``: bytes the quantized tensors need (indices, positions, codebooks,
      code tables, header share); ``n_weights``, ``n_kept``; ``bits_per_weight`` =
      8 · quantized_bytes / n_weights (the run report's figure);
    - ``raw_bytes``: unquantized tensors with their header share; ``n_raw_elements``;
    - ``file_bytes``: every row (the rows tile the file).
    """
    tensors = [r for r in rows if r["kind"] in ("quantized", "raw")]
    q = [r for r in tensors if r["kind"] == "quantized"]
    header = sum(r["bytes"] for r in rows if r["kind"] == "header")
    share = header * len(q) / len(tensors) if tensors else header
    side = sum(r["bytes"] for r in rows if r["kind"] in ("codebook", "code_table"))
    quantized = sum(r["bytes"] for r in q) + side + share
    n_weights = sum(r["numel"] for r in q)
    raw = [r for r in tensors if r["kind"] == "raw"]
    file_bytes = sum(r["bytes"] for r in rows)
    return {
        "quantized_bytes": quantized,
        "n_weights": n_weights,
        "n_kept": sum(r["n_kept"] for r in q),
        "bits_per_weight": 8 * quantized / n_weights if n_weights else None,
        "raw_bytes": file_bytes - quantized,
        "n_raw_elements": sum(r["numel"] for r in raw),
        "file_bytes": file_bytes,
    }


def format_inspect(rows: list[dict]) -> str:
    """A human-readable table of inspect rows, with the totals of :func:`inspect_totals`."""
    head = (
        f"{'name':<36} {'kind':<10} {'shape':<18} {'kept':>7} {'bits/weight':>11} "
        f"{'bytes':>12} {'share':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        shape = "x".join(map(str, r["shape"])) if "shape" in r else ""
        kept = f"{r['kept_fraction']:.2%}" if "kept_fraction" in r else ""
        bpw = f"{r['bits_per_weight']:.3f}" if "bits_per_weight" in r else ""
        name = r["name"] if len(r["name"]) <= 36 else "..." + r["name"][-33:]
        lines.append(
            f"{name:<36} {r['kind']:<10} {shape:<18} {kept:>7} {bpw:>11} "
            f"{r['bytes']:>12,} {r['share']:>7.2%}"
        )
    t = inspect_totals(rows)
    f = t["file_bytes"] or 1
    lines.append("-" * len(head))
    kept = f"{t['n_kept'] / t['n_weights']:.2%}" if t["n_weights"] else ""
    bpw = f"{t['bits_per_weight']:.3f}" if t["bits_per_weight"] is not None else ""
    q = round(t["quantized_bytes"])
    lines.append(
        f"{'quantized weights, all-in *':<36} {'':<10} {'':<18} {kept:>7} {bpw:>11} "
        f"{q:>12,} {q / f:>7.2%}"
    )
    raw = t["file_bytes"] - q
    lines.append(
        f"{'unquantized tensors (stored as is)':<36} {'':<10} {'':<18} {'':>7} "
        f"{'':>11} {raw:>12,} {raw / f:>7.2%}"
    )
    # The whole file over every parameter it holds (raw tensors too): what a user comparing
    # the file sizes of whole models reads.
    n_all = t["n_weights"] + t["n_raw_elements"]
    all_bpw = f"{8 * t['file_bytes'] / n_all:.3f}" if n_all else ""
    lines.append(
        f"{'total (the file)':<36} {'':<10} {'':<18} {'':>7} {'':>11} "
        f"{t['file_bytes']:>12,} {1:>7.2%}"
    )
    lines.append(
        f"{'total (all ' + format(n_all, ',') + ' parameters)':<36} {'':<10} {'':<18} "
        f"{'':>7} {all_bpw:>11} {t['file_bytes']:>12,} {1:>7.2%}"
    )
    note = (
        f"* bits per weight as the run report counts them: indices, positions, "
        f"codebooks, code tables and the header's share, over the "
        f"{t['n_weights']:,} quantized weights (pruned ones included); unquantized "
        f"tensors ({t['n_raw_elements']:,} values) are not in it. A tensor's row: its "
        "own index and position bits over its elements."
    )
    lines += textwrap.wrap(note, len(head), subsequent_indent="  ")
    w = serve_widths(rows)
    if w["serve_bits"] is not None:
        lines.append(f"serves at: {w['serve_bits']} bits per index (largest row codebook: "
                     f"{w['levels']} levels, {w['tensor']})")
    elif w["levels"] is not None:
        lines.append(f"serves at: - ({w['tensor']} has {w['levels']} levels in a row; a "
                     "lookup-table runtime takes at most 256)")
    return "\n".join(lines)
