"""Bits of a pruned network's masks (and quantization indices) under today's static codes vs
the adaptive context-mixing range coder (pipeline/encode/context.py).

    python benchmarks/position_coding.py [RUN] [--out benchmarks/results/position_coding.json]

RUN (default runs/default) is a pipeline run: its prune stage's masks.safetensors (uint8,
1 = kept) and, when present, its quantize stage's indices.safetensors / codebooks /
quantized.json. Per tensor and in total it prints: kept weights, numel, today's Huffman gap
bits (one code table pooled over the network, as the encoder builds it; the table's bits
are counted once, in the total), the gap stream's order-0 entropy per tensor and under the
network-pooled gap distribution, each context model's ideal bits (mask_cost_bits), the coded
bytes of encode_mask, and bits per kept weight. The index table compares a network-pooled
Huffman code and the order-0 entropies with encode_indices. Speeds are one thread, best of
--repeats, with the load average beside them. Writes a JSON copy of everything.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from pipeline.encode.context import (
    MASK_MODELS,
    decode_indices,
    decode_mask,
    encode_indices,
    encode_mask,
    indices_cost_bits,
    mask_cost_bits,
)
from pipeline.encode.huffman import CodeTable
from pipeline.encode.positions import (
    choose_max_gap,
    gap_histogram,
    gap_symbol_counts,
    gaps_from_mask,
)


def geometry(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(rows, cols, group): rows = shape[0], cols = the rest, group = kernel taps (conv)."""
    numel = int(np.prod(shape))
    if len(shape) < 2 or shape[0] == 0:
        return 1, numel, 1
    return shape[0], numel // shape[0], int(np.prod(shape[2:])) if len(shape) > 2 else 1


def order0_bits(values: np.ndarray, probs: dict | None = None) -> float:
    """sum -log2 p(v) with p the values' own empirical distribution, or ``probs``."""
    vals, counts = np.unique(np.asarray(values, np.int64), return_counts=True)
    if probs is None:
        p = counts / counts.sum()
    else:
        p = np.array([probs[int(v)] for v in vals])
    return float(-(counts * np.log2(p)).sum())


def best_of(repeats: int, fn):
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def stage_file(run: Path, stage: str, name: str) -> Path | None:
    hits = sorted(glob.glob(str(run / "stages" / f"{stage}-*" / name)), key=os.path.getmtime)
    return Path(hits[-1]) if hits else None


def mask_table(masks: dict[str, np.ndarray]) -> tuple[list[dict], dict]:
    gaps = {n: gaps_from_mask(m.ravel() != 0) for n, m in masks.items()}
    vals, cnts = gap_histogram(np.concatenate(list(gaps.values())))
    max_gap, table = choose_max_gap(vals, cnts)
    pooled = dict(zip(vals.tolist(), (cnts / cnts.sum()).tolist(), strict=True))
    rows = []
    for name, m in masks.items():
        r, c, group = geometry(m.shape)
        bits = (m != 0).reshape(r, c)
        g = gaps[name]
        hv, hc = gap_histogram(g)
        row = {
            "tensor": name,
            "shape": list(m.shape),
            "group": group,
            "kept": int(bits.sum()),
            "numel": int(bits.size),
            "huffman_gap_bits": int(table.cost_bits(gap_symbol_counts(hv, hc, max_gap))),
            "gap_h0_bits": order0_bits(g),
            "gap_h0_pooled_bits": order0_bits(g, pooled),
        }
        for model in MASK_MODELS:
            row[f"{model}_bits"] = mask_cost_bits(bits, group, model=model)
        data = encode_mask(bits, group)
        assert np.array_equal(decode_mask(data, r, c, group), bits)
        row["coded_bits"] = 8 * len(data)
        rows.append(row)
    total = {"tensor": "total", "shape": None, "group": None}
    for key in rows[0]:
        if key not in total:
            total[key] = sum(r[key] for r in rows)
    total["huffman_table_bits"] = 8 * table.table_bytes()
    total["huffman_max_gap"] = int(max_gap)
    return rows, total


def index_table(codes: dict[str, tuple[np.ndarray, np.ndarray, int]]) -> tuple[list[dict], dict]:
    ks = {k for _, _, k in codes.values()}
    kmax = max(ks)
    pooled_counts = sum(
        np.bincount(c.astype(np.int64), minlength=kmax) for c, _, _ in codes.values()
    )
    table = CodeTable.from_counts(pooled_counts)
    pooled = {i: p for i, p in enumerate(pooled_counts / pooled_counts.sum()) if p > 0}
    rows = []
    for name, (c, r, k) in codes.items():
        data = encode_indices(c, k, r)
        assert np.array_equal(decode_indices(data, len(c), k, r), c)
        rows.append(
            {
                "tensor": name,
                "n": int(len(c)),
                "k": int(k),
                "huffman_bits": int(
                    table.cost_bits(np.bincount(c.astype(np.int64), minlength=kmax))
                ),
                "h0_bits": order0_bits(c),
                "h0_pooled_bits": order0_bits(c, pooled),
                "adaptive_bits": indices_cost_bits(c, k, r),
                "coded_bits": 8 * len(data),
            }
        )
    total = {"tensor": "total", "k": None}
    for key in rows[0]:
        if key not in total:
            total[key] = sum(x[key] for x in rows)
    total["huffman_table_bits"] = 8 * table.table_bytes()
    return rows, total


def load_codes(run: Path, masks: dict[str, np.ndarray]) -> dict:
    idx_path = stage_file(run, "quantize", "indices.safetensors")
    if idx_path is None:
        return {}
    meta = json.loads((idx_path.parent / "quantized.json").read_text())
    books = load_file(str(idx_path.parent / "codebooks.safetensors"))
    indices = load_file(str(idx_path))
    out = {}
    for name, info in meta["tensors"].items():
        if name not in indices:
            continue
        v = indices[name]
        k = int(books[info["codebook"]].shape[-1])
        keep = masks[name] != 0 if name in masks else np.ones(v.shape, bool)
        r, c, _ = geometry(v.shape)
        flat = np.flatnonzero(keep.ravel())
        out[name] = (v.ravel()[flat], flat // max(c, 1), k)
    return out


def speeds(masks: dict, codes: dict, repeats: int) -> dict:
    name = max(masks, key=lambda n: masks[n].size)
    r, c, g = geometry(masks[name].shape)
    bits = (masks[name] != 0).reshape(r, c)
    te, data = best_of(repeats, lambda: encode_mask(bits, g))
    td, _ = best_of(repeats, lambda: decode_mask(data, r, c, g))
    out = {
        "mask_tensor": name,
        "mask_bits": int(bits.size),
        "mask_encode_mbit_s": bits.size / te / 1e6,
        "mask_decode_mbit_s": bits.size / td / 1e6,
    }
    if codes:
        name = max(codes, key=lambda n: len(codes[n][0]))
        cc, rr, k = codes[name]
        te, data = best_of(repeats, lambda: encode_indices(cc, k, rr))
        td, _ = best_of(repeats, lambda: decode_indices(data, len(cc), k, rr))
        out |= {
            "index_tensor": name,
            "index_symbols": int(len(cc)),
            "index_encode_msym_s": len(cc) / te / 1e6,
            "index_decode_msym_s": len(cc) / td / 1e6,
        }
    out["loadavg"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", nargs="?", default="runs/default", help="a pipeline run folder")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "position_coding.json")
    )
    args = ap.parse_args(argv)
    run = Path(args.run)
    path = stage_file(run, "prune", "masks.safetensors")
    if path is None:
        raise SystemExit(f"no prune stage masks.safetensors under {run}/stages")
    masks = load_file(str(path))
    codes = load_codes(run, masks)
    # warm the compiled kernels so the speeds measure coding, not compilation
    encode_mask(np.ones((2, 3), bool), 2)
    encode_indices(np.zeros(3, np.uint8), 4, np.zeros(3, int))

    mrows, mtot = mask_table(masks)
    n_kept = max(mtot["kept"], 1)
    cols = ["huffman_gap", "gap_h0", "gap_h0_pooled", *MASK_MODELS, "coded"]
    head = f"{'tensor':<16}{'kept':>8}{'numel':>9}" + "".join(f"{c:>14}" for c in cols)
    print(f"masks: {path}")
    print(f"bits ({', '.join(MASK_MODELS)} = ideal adaptive code lengths; coded = encode_mask)")
    print(head)
    print("-" * len(head))
    for r in [*mrows, mtot]:
        print(
            f"{r['tensor']:<16}{r['kept']:>8}{r['numel']:>9}"
            + "".join(f"{r[c + '_bits']:>14,.0f}" for c in cols)
        )
    per_kept = {c: mtot[c + "_bits"] / n_kept for c in cols}
    print(
        f"{'bits/kept':<33}"
        + "".join(f"{per_kept[c]:>14.3f}" for c in cols)
        + f"\nHuffman table: {mtot['huffman_table_bits']} bits (max_gap {mtot['huffman_max_gap']});"
        f" coded vs gap order-0 per tensor {100 * (mtot['coded_bits'] / mtot['gap_h0_bits'] - 1):+.2f}%,"
        f" vs pooled {100 * (mtot['coded_bits'] / mtot['gap_h0_pooled_bits'] - 1):+.2f}%,"
        f" vs Huffman + table "
        f"{100 * (mtot['coded_bits'] / (mtot['huffman_gap_bits'] + mtot['huffman_table_bits']) - 1):+.2f}%"
    )
    result = {
        "run": str(run),
        "masks": str(path),
        "masks_table": mrows,
        "masks_total": mtot,
        "mask_bits_per_kept": per_kept,
    }
    if codes:
        irows, itot = index_table(codes)
        icols = ["huffman", "h0", "h0_pooled", "adaptive", "coded"]
        head = f"{'tensor':<16}{'n':>8}{'k':>6}" + "".join(f"{c:>12}" for c in icols)
        print("\nindices (huffman = one network-pooled table; h0 = order-0 entropy)")
        print(head)
        print("-" * len(head))
        for r in [*irows, itot]:
            print(
                f"{r['tensor']:<16}{r['n']:>8}{r['k'] or '':>6}"
                + "".join(f"{r[c + '_bits']:>12,.0f}" for c in icols)
            )
        print(
            f"Huffman table: {itot['huffman_table_bits']} bits; coded vs order-0 per tensor "
            f"{100 * (itot['coded_bits'] / itot['h0_bits'] - 1):+.2f}%"
        )
        result |= {"indices_table": irows, "indices_total": itot}
    sp = speeds(masks, codes, args.repeats)
    print(
        f"\nspeed (1 thread, best of {args.repeats}): mask {sp['mask_tensor']} "
        f"encode {sp['mask_encode_mbit_s']:.1f} / decode {sp['mask_decode_mbit_s']:.1f} Mbit/s"
        + (
            f"; indices {sp['index_tensor']} encode {sp['index_encode_msym_s']:.1f} / decode "
            f"{sp['index_decode_msym_s']:.1f} Msym/s"
            if "index_tensor" in sp
            else ""
        )
        + f"; load average {sp['loadavg']} on {os.cpu_count()} CPUs"
    )
    result |= {"speed": sp, "machine": platform.processor() or platform.machine()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
