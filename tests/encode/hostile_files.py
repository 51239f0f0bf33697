"""Valid .hwq files from the writer, and hostile ones built from them with correct checksums
(a hostile writer), for the fuzz and limit tests. Not a test module itself."""

from __future__ import annotations

import copy
import json
import struct
import zlib
from pathlib import Path

import numpy as np

from pipeline.encode import TensorEntry, write_hwq

__all__ = [
    "base_files",
    "bombs",
    "header_file",
    "join",
    "split",
    "tensor",
    "zlib_bomb",
]

_PREFIX = struct.Struct("<4sHHQII")


def split(blob: bytes) -> tuple[dict, bytearray]:
    """(header dict, payload) of a valid file."""
    _, _, flags, hlen, _, _ = _PREFIX.unpack_from(blob)
    start = -(-(24 + hlen) // 8) * 8
    raw = blob[24 : 24 + hlen]
    return json.loads(zlib.decompress(raw) if flags & 1 else raw), bytearray(blob[start:])


def header_file(stored: bytes, payload: bytes = b"", *, compressed: bool = False,
                version: int = 1) -> bytes:
    """A file around header bytes as stored: right header CRC, zero padding, the payload."""
    prefix = _PREFIX.pack(b"HWQ1", version, int(compressed), len(stored), zlib.crc32(stored), 0)
    return prefix + stored + b"\0" * (-(24 + len(stored)) % 8) + bytes(payload)


def join(header: dict, payload: bytes, *, fix_payload_len: bool = True,
         compressed: bool = False) -> bytes:
    """Rebuild a file from a (modified) header: every checksum the prefix has is right."""
    if fix_payload_len:
        header["payload_bytes"] = len(payload)
    hj = json.dumps(header, separators=(",", ":")).encode()
    # The prefix repeats the header's version (a version 2 header in a version 1 prefix is
    # refused before its sections are looked at, which would leave them unfuzzed).
    v = header.get("version") if isinstance(header, dict) else 1
    version = v if type(v) is int and 0 <= v < 1 << 16 else 1
    return header_file(zlib.compress(hj, 6) if compressed else hj, payload,
                       compressed=compressed, version=version)


def tensor(h: dict, name: str) -> dict:
    return next(t for t in h["tensors"] if t["name"] == name)


def base_files(folder: Path, seed: int = 0) -> dict[str, bytes]:
    """A few small valid files covering the format: shared and per-tensor code tables,
    Huffman, fixed-length and rANS codes, gap-coded and context-coded positions, static and
    context-coded indices, pruned (with escapes) and dense quantized tensors, a channel
    codebook, every raw dtype, empty and fully pruned tensors. name -> bytes."""
    rng = np.random.default_rng(seed)
    cbs = {
        "net": np.sort(rng.normal(size=16)).astype(np.float32),
        "chan": rng.normal(size=(6, 4)).astype(np.float32),
        "solo": np.array([0.5, -2.0, 3.0], np.float32),
    }

    def quant(name, shape, cb, density=1.0, dtype="float32"):
        numel = int(np.prod(shape))
        mask = rng.random(numel) < density if density < 1 else None
        n_kept = numel if mask is None else int(mask.sum())
        codes = rng.integers(0, cbs[cb].shape[-1], n_kept)
        return TensorEntry.quantized(name, shape, codes, cb, mask=mask, dtype=dtype)

    quantized = [
        quant("conv1.weight", (4, 3, 3, 3), "net", density=0.3),
        quant("fc1.weight", (30, 20), "net", density=0.05),
        quant("fc2.weight", (10, 8), "net"),
        quant("half.weight", (5, 3), "net", dtype="float16"),
        quant("bf.weight", (4, 4), "net", density=0.5, dtype="bfloat16"),
        quant("wide.weight", (3, 5), "net", dtype="float64"),
        quant("chan.weight", (6, 5), "chan", density=0.7),
        quant("solo.weight", (7,), "solo"),
        quant("empty.weight", (0, 4), "net"),
        quant("dead.weight", (5, 5), "net", density=1e-9),  # fully pruned
    ]
    raws = [
        TensorEntry.raw_tensor("r.f32", rng.normal(size=(3, 2)).astype(np.float32)),
        TensorEntry.raw_tensor("r.f16", rng.normal(size=3).astype(np.float16)),
        TensorEntry.raw_tensor("r.f64", rng.normal(size=2)),
        TensorEntry.raw_tensor("r.i64", np.array([7, -3, 2**40], np.int64)),
        TensorEntry.raw_tensor("r.i32", np.arange(-2, 2, dtype=np.int32)),
        TensorEntry.raw_tensor("r.i16", np.array([-5, 5], np.int16)),
        TensorEntry.raw_tensor("r.i8", np.array([-128, 127], np.int8)),
        TensorEntry.raw_tensor("r.u8", np.arange(4, dtype=np.uint8)),
        TensorEntry.raw_tensor("r.bool", np.array([True, False, True])),
        TensorEntry.raw_tensor("r.scalar", np.array(1.5, np.float32)),
        TensorEntry.raw_tensor("r.empty", np.zeros((0, 3), np.float32)),
        TensorEntry.raw_tensor("r.bf16", np.array([0x3F80, 0xC000], np.uint16), dtype="bfloat16"),
    ]
    # Three kept weights in 300,000: the writer codes the long gaps with escape symbols.
    mask = np.zeros(300_000, bool)
    mask[[0, 5, 299_999]] = True
    sparse = [
        TensorEntry.quantized("sparse.weight", (300_000,), np.array([0, 2, 1]), "solo",
                              mask=mask),
        quant("dense.weight", (9,), "solo"),
    ]
    # Per-row fp16 codebooks stored ragged, indices ordered by the rows' level counts, one
    # table per level count (a language model's layout); a channel and a group tensor.
    rowcb = np.sort(rng.normal(size=(8, 6)), axis=1).astype(np.float16).astype(np.float32)
    levels = np.array([1, 3, 6, 2, 3, 6, 1, 4])
    per_row = np.concatenate([rng.integers(0, L, 10) for L in levels])
    cbs["rows"], cbs["groups"] = rowcb, np.repeat(rowcb, 2, axis=0)
    ragged = [TensorEntry.quantized("lm.q", (8, 10), per_row, "rows", dtype="bfloat16"),
              TensorEntry.quantized("lm.g", (8, 10), np.repeat(per_row.reshape(8, 10)[:, :5], 2,
                                                                axis=0).reshape(-1), "groups",
                                    dtype="float16"),
              raws[0]]
    specs = {
        "ragged-levels": (ragged, {"codebook_dtype": "float16", "chunk_symbols": 16}),
        "mixed-network": (quantized + raws, {"code_sharing": "network", "chunk_symbols": 64}),
        "mixed-tensor-fixed": (quantized[:8] + raws[:4], {"code_sharing": "tensor",
                                                         "fixed_length": True,
                                                         "chunk_symbols": 50}),
        "raw-only": (raws, {}),
        "sparse-escapes": (sparse, {"chunk_symbols": 300}),
        # Version 2: rANS tables (gap symbols with escapes too), context-coded masks and
        # indices in several chunks each, per-level rANS tables.
        "v2-context": (quantized + sparse + raws[:2],
                       {"coder": "ans", "positions": "context", "indices": "context",
                        "chunk_symbols": 64}),
        "v2-ans-tensor": (quantized[:8] + sparse, {"coder": "ans", "code_sharing": "tensor",
                                                   "chunk_symbols": 300}),
        "v2-ragged-ans": (ragged, {"codebook_dtype": "float16", "chunk_symbols": 16,
                                   "coder": "ans", "positions": "context"}),
    }
    out = {}
    for name, (ents, kw) in specs.items():
        used = {e.codebook for e in ents if e.codebook}
        path = folder / f"{name}.hwq"
        write_hwq(path, ents, {k: v for k, v in cbs.items() if k in used}, metadata={"n": name},
                  **kw)  # fmt: skip
        out[name] = path.read_bytes()
    return out


def zlib_bomb(inflated: int = 900 << 20, piece: int = 16 << 20) -> bytes:
    """A zlib stream of a valid-looking header JSON whose metadata string is ``inflated``
    spaces (~1000:1). Built from one compressed piece repeated: after a full flush the
    compressor starts afresh, so the same input gives the same bytes. Adler-32 is right."""
    head = b'{"format":"hwq","version":1,"payload_bytes":0,"code_sharing":"network",' \
           b'"fixed_length":false,"codebooks":[],"code_tables":[],"tensors":[],' \
           b'"metadata":{"pad":"'
    tail = b'"}}'
    spaces = b" " * piece
    n = max(1, inflated // piece)
    c = zlib.compressobj(9)
    first = c.compress(head) + c.flush(zlib.Z_FULL_FLUSH)
    mid = c.compress(spaces) + c.flush(zlib.Z_FULL_FLUSH)
    again = c.compress(spaces) + c.flush(zlib.Z_FULL_FLUSH)
    assert again == mid
    end = c.compress(tail) + c.flush()
    adler = zlib.adler32(head)
    for _ in range(n):
        adler = zlib.adler32(spaces, adler)
    adler = zlib.adler32(tail, adler)
    return first + mid * n + end[:-4] + struct.pack(">I", adler)


def bombs(ok: bytes) -> dict[str, tuple[bytes, dict]]:
    """Hostile files with right checksums, from the "mixed-network" base file: name ->
    (file bytes, extra reader keyword arguments). Every one must be refused quickly."""
    h, payload = split(ok)
    out: dict[str, tuple[bytes, dict]] = {}

    def make(name, fn, kw=None, compressed=False):
        hh = copy.deepcopy(h)
        fn(hh)
        out[name] = (join(hh, payload, compressed=compressed), kw or {})

    def many(n, shape, dtype="float32"):
        def fn(hh):
            dead = tensor(hh, "dead.weight")
            for i in range(n):
                hh["tensors"].append(dict(dead, name=f"dead{i}", shape=shape, dtype=dtype))
        return fn

    # A pruned tensor's trailing zeros cost nothing: declare 2 GiB, 16 GiB of them.
    make("pruned-2GiB", lambda hh: tensor(hh, "fc1.weight").update(shape=[1 << 29]))
    make("pruned-16GiB", lambda hh: tensor(hh, "fc1.weight").update(shape=[1 << 32]))
    make("pruned-16GiB-f64", lambda hh: tensor(hh, "conv1.weight").update(
        shape=[1 << 31], dtype="float64"))
    make("8x2GiB", many(8, [1 << 29]))
    make("40x60MiB", many(40, [15 << 20]))  # each under the 64 MiB floor, not together
    make("10x-just-under-tensor-cap", many(10, [(1 << 28) - 1]),
         {"max_tensor_bytes": 1 << 30, "max_output_bytes": 9 << 30})
    make("2GiB-compressed-header", lambda hh: tensor(hh, "fc1.weight").update(shape=[1 << 29]),
         compressed=True)
    make("numel-2^60", lambda hh: tensor(hh, "dead.weight").update(shape=[1 << 30, 1 << 30]))

    def huge_symbols(hh):
        tensor(hh, "fc2.weight")["indices"]["chunks"][0][2] = 10**12
    make("chunk-10^12-symbols", huge_symbols)

    def huge_dense(hh):
        t = tensor(hh, "fc2.weight")
        t.update(shape=[1 << 30], n_kept=1 << 30)
        t["indices"]["chunks"][0][2] = 1 << 30
    make("dense-2^30-symbols", huge_dense)

    def overlap(hh):  # two 24-byte raw tensors on the same bytes (and a gap elsewhere)
        a, b = tensor(hh, "r.f32"), tensor(hh, "r.i64")
        b.update(offset=a["offset"], length=a["length"], crc32=a["crc32"])
    make("overlapping-sections", overlap)
    make("offset-past-payload", lambda hh: tensor(hh, "r.f32").update(offset=1 << 40))

    # Headers: nested deeply, too large stored, inflating past the limit.
    deep = b"[" * 200_000 + b"]" * 200_000
    out["deep-json"] = (header_file(deep, payload), {})
    out["deep-json-compressed"] = (header_file(zlib.compress(deep), payload, compressed=True), {})
    objs = b'{"a":' * 100_000 + b"1" + b"}" * 100_000
    out["deep-objects"] = (header_file(objs, payload), {})
    out["huge-int"] = (header_file(b'{"format":"hwq","version":' + b"9" * 5000 + b"}"), {})
    big = json.dumps(dict(h, metadata={"pad": " " * (17 << 20)})).encode()
    out["header-17MiB"] = (header_file(big, payload), {})
    out["zlib-bomb-900MiB"] = (header_file(zlib_bomb(), payload, compressed=True), {})
    out["zlib-bomb-just-over"] = (
        header_file(zlib_bomb(16 << 20, 1 << 20), payload, compressed=True), {})

    # A 2^24-symbol code table no stream uses: its decoder would take ~1 GB to build.
    def unused_table(hh):
        hh["code_tables"].append({"kind": "huffman", "alphabet": 1 << 24, "width": 1,
                                  "fixed_length": None, "offset": len(payload),
                                  "length": 1 << 21, "crc32": zlib.crc32(bytes(1 << 21))})
    hh = copy.deepcopy(h)
    unused_table(hh)
    out["unused-2^24-table"] = (join(hh, bytes(payload) + bytes(1 << 21)), {})
    return out


# ---------------------------------------------------------------------------------------------
# memory bombs: small files whose decoding once needed far more memory than their output


def level_table_file(folder: Path, *, rows: int = 32, cols: int = 32, prob_bits: int = 20,
                     alphabet: int = 2, seed: int = 0) -> bytes:
    """A level-ordered tensor (ragged codebook) whose every chunk is one symbol coded with
    its own rANS table of ``alphabet`` symbols at ``prob_bits``, each table different (so no
    sharing). With prob_bits 20 and 1024 chunks (~100 KB of file, 2 KiB of output) a reader
    that builds and keeps each table's 2**20-slot decoder needs ~9.4 GB; at 16 bits ~330 MB.
    Checksums right; every chunk a valid stream."""
    from pipeline.encode.ans import ans_encode
    from pipeline.encode.ans_table import AnsTable

    rng = np.random.default_rng(seed)
    k = alphabet
    cb = np.sort(rng.normal(size=(rows, k)), axis=1).astype(np.float16).astype(np.float32)
    codes = rng.integers(0, k, (rows, cols))
    codes[:, 0] = k - 1  # every row uses all k levels: the level order is the row order
    path = folder / f"level-tables-{prob_bits}.hwq"
    write_hwq(path, [TensorEntry.quantized("lm.q", (rows, cols), codes.reshape(-1), "rows",
                                           dtype="bfloat16")],
              {"rows": cb}, codebook_dtype="float16", coder="ans")  # fmt: skip
    h, payload = split(path.read_bytes())
    c = h["codebooks"][0]
    assert c["offset"] == 0
    payload = bytearray(payload[: c["length"]])
    m = 1 << prob_bits
    tables, chunks = [], []

    def add(blob: bytes) -> tuple[int, int, int]:
        off = len(payload)
        payload.extend(blob)
        return off, len(blob), zlib.crc32(blob)

    for j, s in enumerate(codes.reshape(-1)):
        f = np.full(k, m // k, np.int64)
        f[0] += m - int(f.sum())
        # A different table for every chunk (some frequency moved from a symbol to symbol 0).
        delta, at = (1 + j, 1) if k == 2 else (1, 1 + j % (k - 1))
        f[0] += delta
        f[at] -= delta
        table = AnsTable(f.astype(np.uint32), prob_bits)
        off, n, crc = add(table.pack())
        tables.append({"kind": "rans", "alphabet": k, "offset": off, "length": n, "crc32": crc})
        off, n, crc = add(ans_encode(np.array([s]), table))
        chunks.append([off, n, 1, crc, j])
    h["code_tables"] = tables
    tensor(h, "lm.q")["indices"]["chunks"] = chunks
    return join(h, payload)


def context_index_file(folder: Path, *, rows: int = 2048, cols: int = 2048) -> bytes:
    """A dense float16 tensor of rows × cols zeros, its indices context-coded (k = 2) in one
    chunk: ~1 KB of file, 2 bytes of output a weight. A reader that builds int64 row and code
    arrays for it needs ~40 bytes a weight (2.6 GB for 64 M weights: 20× the output)."""
    path = folder / f"context-{rows}x{cols}.hwq"
    write_hwq(path, [TensorEntry.quantized("w", (rows, cols), np.zeros(rows * cols, np.int64),
                                           "c", dtype="float16")],
              {"c": np.array([0.0, 1.0], np.float32)}, indices="context", coder="ans",
              chunk_symbols=rows * cols)  # fmt: skip
    return path.read_bytes()


def wide_ragged_codebook_file(folder: Path, *, k: int = 1 << 22) -> bytes:
    """A ragged codebook declared [16, k]: its stored bytes are its rows' few levels, its
    dense form 16 · k float32 (256 MiB for k = 2**22) plus the masks that expand it."""
    h, payload = split(level_table_file(folder, rows=16, cols=4, prob_bits=16))
    c = h["codebooks"][0]
    # Stored as a writer would for k > 255: uint16 level counts (2 a row), then the levels.
    levels = np.sort(np.random.default_rng(1).normal(size=(16, 2)), axis=1)
    sec = np.full(16, 2, "<u2").tobytes() + levels.astype("<f2").tobytes()
    delta = len(sec) - c["length"]
    c.update(shape=[16, k], length=len(sec), crc32=zlib.crc32(sec))
    for t in h["code_tables"]:
        t["offset"] += delta
    for ch in tensor(h, "lm.q")["indices"]["chunks"]:
        ch[0] += delta
    return join(h, sec + bytes(payload[c["offset"] + len(sec) - delta :]))


def memory_bombs(folder: Path) -> dict[str, tuple[bytes, bool]]:
    """name -> (file, must be refused): the crafted files of the decoder's memory bound, at
    fuzz-case sizes (each decodes or is refused in well under a second)."""
    return {
        "level-tables-pb20": (level_table_file(folder, rows=16, cols=16), True),
        "level-tables-pb16": (level_table_file(folder, rows=16, cols=16, prob_bits=16), False),
        "level-tables-pb17-wide": (level_table_file(folder, rows=2, cols=16, prob_bits=17,
                                                    alphabet=1 << 14 | 1), False),
        "context-indices-1M": (context_index_file(folder, rows=1024, cols=1024), False),
        "ragged-codebook-16x2^22": (wide_ragged_codebook_file(folder), True),
    }
