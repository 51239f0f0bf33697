"""`write_hwq`: tensors and codebooks into one .hwq file, streamed and published atomically."""

from __future__ import annotations

import json
import os
import tempfile
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..ans_table import AnsTable
from ..codebooks import encode_codebook, even_rows, level_classes, row_levels
from ..coders import encode_job, make_table, mask_geometry, table_kind
from ..huffman import entropy_bits, pack_lengths
from ..positions import choose_max_gap, gap_histogram, gap_symbol_counts, gaps_to_symbols
from .accounting import _accounting, _gap_entropy_total
from .entries import TensorEntry, _check_codebooks, _prepare_one, _Prepared, _scope
from .header import (
    _PREFIX,
    FLAG_HEADER_ZLIB,
    MAGIC,
    PREFIX_BYTES,
    MapFn,
    _parse_header,
    _payload_start,
)
from .storage import _atomic_write


def _default_map(fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
    return [fn(x) for x in items]


def write_hwq(
    path_or_url: str | os.PathLike,
    entries: Sequence[TensorEntry],
    codebooks: dict[str, np.ndarray],
    *,
    code_sharing: str = "network",
    fixed_length: bool = False,
    chunk_symbols: int = 4_000_000,
    metadata: dict | None = None,
    storage_options: dict | None = None,
    map_fn: MapFn | None = None,
    codebook_dtype: str = "float32",
    coder: str = "huffman",
    positions: str = "gaps",
    indices: str = "static",
    stream_symbols: int = 1 << 26,
    spool_bytes: int = 256 << 20,
    spill_dir: str | None = None,
) -> dict:
    """Encode tensors into one .hwq file, atomically; return its bit accounting.

    Args:
        path_or_url: local path or fsspec URL (``s3://bucket/key`` ...).
        entries: tensors in file order: each a `TensorEntry`, or a zero-argument callable
            returning one (loaded when needed, two or three times, never all at once: how a
            model larger than memory is written; the bytes are the same either way).
        codebooks: name -> float32 [k] or [rows, k]. All are stored.
        code_sharing: ``"network"``: one Huffman table per codebook (indices) and one for all
            pruned tensors' positions; ``"tensor"``: one table per tensor for each stream.
        fixed_length: fixed-length codes instead of Huffman (for comparison: Han et al.'s
            fixed-width fields).
        chunk_symbols: symbols per independently decodable chunk.
        metadata: JSON-serializable dict stored in the header (e.g. the resolved run config).
        storage_options: fsspec options for URLs (credentials, endpoint).
        map_fn: ``map_fn(fn, jobs) -> results`` used to encode chunks, e.g. a Ray-backed map;
            default: in-process, in order.
        codebook_dtype: ``"float32"`` or ``"float16"`` (values must be exact in fp16). With
            float16, a per-row codebook [rows, k] is stored ragged: row r keeps only the levels
            its codes use (1 + its largest code), so a row with 5 levels costs 5 values.
        coder: the static code of every table-coded stream (indices, gap symbols):
            ``"huffman"`` (canonical, length-limited) or ``"ans"`` (rANS, within a fraction of
            a percent of the order-0 entropy).
        positions: ``"gaps"`` (gap symbols under a static table) or ``"context"`` (the mask
            bits, row by row, by the adaptive context-mixing coder).
        indices: ``"static"`` (a table per group) or ``"context"`` (adaptive, the row as
            context; tensors whose indices are level-ordered keep static tables).

        stream_symbols: with callable entries, tensors are encoded in windows of about this
            many elements (memory: the window's codes and their encoded bytes).
        spool_bytes: the payload is kept in memory up to this size, then in a temporary file
            in `spill_dir` (default: the system's), and copied into the destination at the end.

    Returns:
        The accounting dict (see :func:`hwq_accounting`).
    """
    if code_sharing not in ("network", "tensor"):
        raise ValueError(f"code_sharing must be 'network' or 'tensor', got {code_sharing!r}")
    if chunk_symbols < 1:
        raise ValueError("chunk_symbols must be >= 1")
    if codebook_dtype not in ("float32", "float16"):
        raise ValueError(f"codebook_dtype must be 'float32' or 'float16', got {codebook_dtype!r}")
    if coder not in ("huffman", "ans"):
        raise ValueError(f"coder must be 'huffman' or 'ans', got {coder!r}")
    if fixed_length and coder != "huffman":
        raise ValueError("fixed_length codes are a Huffman-table setting; use coder='huffman'")
    if positions not in ("gaps", "context"):
        raise ValueError(f"positions must be 'gaps' or 'context', got {positions!r}")
    if indices not in ("static", "context"):
        raise ValueError(f"indices must be 'static' or 'context', got {indices!r}")
    version = 1 if (coder, positions, indices) == ("huffman", "gaps", "static") else 2
    cbs = _check_codebooks(codebooks)
    lazy = any(callable(x) for x in entries)

    def load(i: int) -> _Prepared:
        x = entries[i]
        return _prepare_one(x() if callable(x) else x, cbs, code_sharing)

    # Pass 1, one tensor at a time: validation, codebook references, per-row level counts,
    # gap histograms (and index histograms when no level count can change them).
    seen: set[str] = set()
    refs: dict[str, int] = {}
    levels: dict[str, np.ndarray] = {}
    kept: list[_Prepared] = []  # in-memory entries only: prepared once
    idx_hist: dict[Any, np.ndarray] = {}
    ctx_idx_hist: dict[Any, np.ndarray] = {}  # context-coded indices: for the entropy only
    pos_gaps: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    late_hist = codebook_dtype == "float16"  # level classes known only after pass 1

    def add_index_hist(p: _Prepared) -> None:
        ctx = indices == "context" and p.classes is None
        parts = ([(p.index_group, p.codes)] if p.classes is None else
                 [((p.index_group, L), sym) for L, sym in p.classes])
        for key, sym in parts:
            h = np.bincount(sym, minlength=p.k if p.classes is None else key[1])
            pool = ctx_idx_hist if ctx else idx_hist
            pool[key] = pool.get(key, 0) + h.astype(np.int64)

    for i in range(len(entries)):
        p = load(i)
        if p.entry.name in seen:
            raise ValueError(f"duplicate tensor name {p.entry.name!r}")
        seen.add(p.entry.name)
        if p.codes is not None:
            refs[p.entry.codebook] = refs.get(p.entry.codebook, 0) + 1
            if late_hist:
                for name, need in row_levels([p], cbs).items():
                    prev = levels.get(name)
                    levels[name] = need if prev is None else np.maximum(prev, need)
            else:
                add_index_hist(p)
        if p.gaps is not None:
            pos_gaps.setdefault(p.pos_group, []).append(gap_histogram(p.gaps))
        if not lazy:
            kept.append(p)

    def final(i: int) -> _Prepared:
        p = kept[i] if not lazy else load(i)
        if p.codes is not None:
            p.scope = _scope(p, cbs[p.entry.codebook], refs[p.entry.codebook])
            if p.entry.codebook in levels and p.classes is None and (
                    p.mask is None or (p.scope == "channel" and even_rows(p))):
                p.classes = level_classes(p.codes, levels[p.entry.codebook])
        return p

    if late_hist:  # Pass 2: index histograms by level class, in tensor order.
        for i in range(len(entries)):
            p = final(i)
            if p.codes is not None:
                add_index_hist(p)

    # Code tables: pooled histograms per group; a group with no symbols gets no table.
    # Level-ordered tensors: one table per (group, level count).
    tables: list[Any] = []
    table_hist: list[np.ndarray] = []
    table_of: dict[tuple[str, str], int] = {}
    for g, h in idx_hist.items():
        if h.sum() > 0:
            table_of[("i", g)] = len(tables)
            tables.append(make_table(h, coder, fixed=fixed_length))
            table_hist.append(h)
    max_gap_of: dict[str, int] = {}
    gap_entropy = 0.0  # order-0 entropy of the gap values, pooled as the tables would be
    for g, hists in pos_gaps.items():
        vals = np.concatenate([v for v, _ in hists])
        cnts = np.concatenate([c for _, c in hists])
        if vals.size == 0:
            continue
        gap_entropy += _gap_entropy_total(vals, cnts)
        if positions == "context":
            continue
        m, table = choose_max_gap(vals, cnts, fixed=fixed_length, coder=coder)
        max_gap_of[g] = m
        table_of[("p", g)] = len(tables)
        tables.append(table)
        table_hist.append(gap_symbol_counts(vals, cnts, m))
    del pos_gaps

    def tensor_jobs(p: _Prepared) -> list[tuple[str, tuple, int | None]]:
        """(stream, job, own table) of one tensor's chunks, in payload order."""
        out: list[tuple[str, tuple, int | None]] = []
        if indices == "context" and p.classes is None:
            _, cols, _ = mask_geometry(p.shape)
            flat = np.flatnonzero(p.mask) if p.mask is not None else None
            for i in range(0, p.codes.shape[0], chunk_symbols):
                c = p.codes[i : i + chunk_symbols]
                at = flat[i : i + c.shape[0]] if flat is not None else \
                    np.arange(i, i + c.shape[0], dtype=np.int64)
                rows = at // max(cols, 1)
                out.append(("indices", ("index", c, p.k, rows - (rows[0] if rows.size else 0)),
                            None))
        else:
            pieces = ([(p.codes, table_of.get(("i", p.index_group)), False)]
                      if p.classes is None else
                      [(sym, table_of.get(("i", (p.index_group, L))), True)
                       for L, sym in p.classes])
            for sym, t, own in pieces:
                for i in range(0, sym.shape[0], chunk_symbols):
                    out.append(("indices", ("table", sym[i : i + chunk_symbols], tables[t]),
                                t if own else None))
        if p.gaps is None:
            return out
        if positions == "context":
            rows, cols, group = mask_geometry(p.shape)
            bits = p.mask.reshape(rows, cols)
            step = max(1, chunk_symbols // max(cols, 1))
            for r in range(0, rows, step):
                out.append(("positions", ("mask", bits[r : r + step], group), None))
        else:
            sym = gaps_to_symbols(p.gaps, max_gap_of.get(p.pos_group, 1))
            t = table_of.get(("p", p.pos_group))
            for i in range(0, sym.shape[0], chunk_symbols):
                out.append(("positions", ("table", sym[i : i + chunk_symbols], tables[t]), None))
        return out

    # Pass 3: the payload, section by section, into a spool (memory, then a file past
    # spool_bytes); tensors are encoded in windows of about stream_symbols symbols.
    payload = tempfile.SpooledTemporaryFile(max_size=spool_bytes, dir=spill_dir)  # noqa: SIM115
    try:
        offset = 0

        def put(data: bytes) -> list[int]:
            nonlocal offset
            payload.write(data)
            sec = [offset, len(data), zlib.crc32(data)]
            offset += len(data)
            return sec

        h_codebooks = []
        for name, a in cbs.items():
            blob, extra = encode_codebook(name, a, codebook_dtype, levels.get(name))
            o, n, c = put(blob)
            h_codebooks.append(
                {"name": name, "shape": list(a.shape), "dtype": codebook_dtype, **extra,
                 "offset": o, "length": n, "crc32": c}
            )  # fmt: skip
        h_tables = []
        for t in tables:
            d: dict[str, Any] = {"kind": table_kind(t), "alphabet": t.alphabet}
            if isinstance(t, AnsTable):
                o, n, c = put(t.pack())
                d.update(offset=o, length=n, crc32=c)
            elif t.fixed:
                d.update(fixed_length=t.max_length, width=None, offset=offset, length=0, crc32=0)
            else:
                data, width = pack_lengths(t.lengths)
                o, n, c = put(data)
                d.update(fixed_length=None, width=width, offset=o, length=n, crc32=c)
            h_tables.append(d)
        h_tensors: list[dict] = []

        def emit(window: list[tuple[_Prepared, list]]) -> None:
            jobs = [job for _, tj in window for _, job, _ in tj]
            encoded = list((map_fn or _default_map)(encode_job, jobs)) if jobs else []
            if len(encoded) != len(jobs):
                raise RuntimeError(f"map_fn returned {len(encoded)} results for {len(jobs)} "
                                   f"jobs")
            it = iter(encoded)
            for p, tj in window:
                e = p.entry
                d = {"name": e.name, "kind": e.kind, "shape": list(p.shape), "dtype": e.dtype}
                if p.codes is None:
                    o, n, c = put(p.raw_bytes)
                    d.update(offset=o, length=n, crc32=c)
                    h_tensors.append(d)
                    continue
                d.update(scope=p.scope, codebook=e.codebook, n_kept=int(p.codes.shape[0]))
                if e.rotate is not None:
                    d["rotate"] = {"kind": "hadamard", "seed": int(e.rotate)}
                d["positions"] = None
                for sname in ("indices", "positions"):
                    mine = [own for st, _, own in tj if st == sname]
                    if sname == "positions" and p.gaps is None:
                        continue
                    chunks = []
                    for own in mine:
                        ch = next(it)
                        o, n, c = put(ch.data)
                        chunks.append([o, n, ch.n_symbols, c] + ([] if own is None else [own]))
                    key = ("i", p.index_group) if sname == "indices" else ("p", p.pos_group)
                    context = (positions if sname == "positions" else indices) == "context"
                    if sname == "indices" and p.classes is not None:
                        stream = {"code_table": None, "order": "levels", "chunks": chunks}
                    elif context:
                        stream = {"code_table": None, "coder": "context", "chunks": chunks}
                    else:
                        stream = {"code_table": table_of.get(key), "chunks": chunks}
                    if sname == "positions" and not context:
                        stream["max_gap"] = max_gap_of.get(p.pos_group)
                    d[sname] = stream
                h_tensors.append(d)

        window: list[tuple[_Prepared, list]] = []
        pending = 0
        for i in range(len(entries)):
            p = final(i)
            tj = tensor_jobs(p) if p.codes is not None else []
            window.append((p, tj))
            pending += p.numel if p.codes is not None else len(p.raw_bytes)
            if not lazy or pending < stream_symbols:
                continue
            emit(window)
            window, pending = [], 0
        emit(window)
        if any("rotate" in d for d in h_tensors):
            version = 3  # readers of versions 1–2 would ignore the rotation: refuse them
        header = {
            "format": "hwq",
            "version": version,
            "payload_bytes": offset,
            "code_sharing": code_sharing,
            "fixed_length": bool(fixed_length),
            "codebooks": h_codebooks,
            "code_tables": h_tables,
            "tensors": h_tensors,
            "metadata": metadata or {},
        }
        hjson = zlib.compress(json.dumps(header, separators=(",", ":"), allow_nan=False).encode(),
                              9)
        payload_start = _payload_start(len(hjson))
        prefix = _PREFIX.pack(MAGIC, version, FLAG_HEADER_ZLIB, len(hjson), zlib.crc32(hjson), 0)
        pad = b"\0" * (payload_start - PREFIX_BYTES - len(hjson))
        payload.seek(0)
        _atomic_write(str(path_or_url), prefix + hjson + pad, payload, storage_options)
    finally:
        payload.close()

    parsed = _parse_header(str(path_or_url), header, payload_start + offset)
    ctx_entropy = sum(entropy_bits(h) * float(h.sum()) for h in ctx_idx_hist.values())
    return _accounting(parsed, table_hist, payload_start, ctx_entropy, gap_entropy)
