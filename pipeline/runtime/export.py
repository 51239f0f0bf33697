"""`hwq export FILE --format compressed-tensors OUT`: a .hwq file whose quantized rows are
uniform grids of at most 16 levels, as a model folder in the compressed-tensors
"pack-quantized" layout that vLLM serves with its own int4 kernels (and transformers loads on
CPU when the `compressed-tensors` package is installed).

Each quantized Linear weight [rows, cols] becomes ``weight_packed`` (int32
[rows, ceil(cols/8)]: eight 4-bit values a word, lowest bits first, each the signed int4 value
plus 8), ``weight_scale`` (float32 [rows, 1] per channel or [rows, cols/group] per group),
``weight_zero_point`` (int4 zero points, packed 8 a word along the rows: int32
[ceil(rows/8), 1 or groups]) and ``weight_shape`` (int64 [2]); dequantization is
``(q − zero_point) · scale``. config.json gains ``quantization_config`` (quant_method
compressed-tensors, format pack-quantized, 4 bits, strategy channel or group, asymmetric).
Everything else — raw tensors, and quantized tensors that are not Linear weights (a quantized
embedding) — is written dense in its stored dtype. Tokenizer files are copied.

A row is a grid when its levels are m·Δ for integers m whose span fits 16 values around a
zero point in [0, 15] (0 on the grid: hwq's uniform quantizer centres a bin on 0), within the
fp16 rounding of the stored codebook (2^-10 of the row's largest level). hwq's own uniform
levels are the Hessian-weighted means of their bins, not the bin centres, so they are near a
grid but not on one: such a row is refused unless ``--snap`` moves each level to its nearest
grid point (the largest change is printed).
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass

import numpy as np

__all__ = ["ExportError", "GridRows", "grid_rows", "pack_int4", "add_commands"]


class ExportError(ValueError):
    """The file cannot be exported in this format (a user error: one line, exit 2)."""


@dataclass
class GridRows:
    """Rows of a codebook as grids: level j of row r is ``(u[r, j] − zero[r]) · scale[r]``.

    u: uint8 [R, K] unsigned 4-bit values of each level; zero: uint8 [R]; scale: float64 [R];
    change: float64 [R], the largest |level − grid value| of each row (0 on exact grids);
    bad: int64 [B] rows that are not grids (with snap=False) or cannot be snapped."""

    u: np.ndarray
    zero: np.ndarray
    scale: np.ndarray
    change: np.ndarray
    bad: np.ndarray


def _fit(L: np.ndarray, used: np.ndarray, delta: np.ndarray):
    """Integer multiples m = round(L/Δ) and their feasibility: span ≤ 15 and a zero point
    z ∈ [0, 15] with m + z ∈ [0, 15]. Returns (m, err [R], ok [R], zero [R])."""
    d = np.where(delta > 0, delta, 1.0)[:, None]
    m = np.rint(L / d)
    err = np.where(used, np.abs(L - m * d), 0.0).max(axis=1)
    big = np.where(used, m, -np.inf).max(axis=1)
    small = np.where(used, m, np.inf).min(axis=1)
    zero = np.maximum(0.0, -small)
    ok = (big + zero <= 15) & (zero <= 15) & (delta > 0)
    return m, err, ok, zero


def grid_rows(L: np.ndarray, used: np.ndarray, *, snap: bool = False) -> GridRows:
    """Each row of ``L`` (float64 [R, K], the levels; ``used`` bool [R, K] marks the levels
    the row's codes use) as a 16-value grid through 0, exactly (within fp16 rounding) or,
    with ``snap``, at the step that moves its levels least."""
    R, K = L.shape
    L = np.where(used, L, 0.0)
    top = np.abs(L).max(axis=1)
    tol = np.maximum(top * 2.0**-10, 1e-30)
    # The step divides every gap between levels and every level (0 is on the grid): try
    # the smallest such distance over j = 1 .. 15.
    S = np.sort(np.where(used, L, np.nan), axis=1)
    gaps = np.diff(S, axis=1)
    cand = np.concatenate(
        [
            np.where(gaps > tol[:, None], gaps, np.inf),
            np.where(np.abs(L) > tol[:, None], np.abs(L), np.inf),
        ],
        axis=1,
    )
    g0 = np.nan_to_num(np.nanmin(cand, axis=1), posinf=0.0)
    g0 = np.where(g0 > 0, g0, 1.0)  # a row of zeros: any step
    best_err = np.full(R, np.inf)
    best = (np.zeros((R, K)), np.zeros(R), np.zeros(R))
    for j in range(1, 16):
        delta = g0 / j
        m, err, ok, zero = _fit(L, used, delta)
        take = ok & (err <= tol) & ~np.isfinite(best_err)
        if take.any():
            lsq = np.where(used, L * m, 0).sum(1) / np.maximum(
                np.where(used, m * m, 0).sum(1), 1e-300
            )
            delta = np.where(take & (lsq > 0), lsq, delta)  # least squares over the row
            best[0][take], best[1][take], best[2][take] = m[take], zero[take], delta[take]
            best_err[take] = err[take]
    bad = ~np.isfinite(best_err)
    if snap and bad.any():
        rows = np.flatnonzero(bad)
        Lb, ub = L[rows], used[rows]
        lo = np.where(ub, Lb, np.inf).min(1)
        hi = np.where(ub, Lb, -np.inf).max(1)
        span = np.maximum(np.maximum(hi - lo, np.abs(Lb).max(1) / 8), 1e-30)
        s_err = np.full(rows.size, np.inf)
        s_best = (np.zeros_like(Lb), np.zeros(rows.size), np.zeros(rows.size))
        for n in range(1, 16):
            for f in np.linspace(0.8, 1.2, 17):
                delta = span / n * f
                m, err, ok, zero = _fit(Lb, ub, delta)
                take = ok & (err < s_err)
                s_best[0][take], s_best[1][take], s_best[2][take] = m[take], zero[take], delta[take]
                s_err[take] = err[take]
        got = np.isfinite(s_err)
        r = rows[got]
        best[0][r], best[1][r], best[2][r] = s_best[0][got], s_best[1][got], s_best[2][got]
        best_err[r] = s_err[got]
        bad[r] = False
    m, zero, delta = best
    u = np.where(used, m + zero[:, None], 0).astype(np.uint8)
    return GridRows(
        u, zero.astype(np.uint8), delta, np.where(bad, np.inf, best_err), np.flatnonzero(bad)
    )


def pack_int4(u: np.ndarray, axis: int) -> np.ndarray:
    """Unsigned 4-bit values (uint8 [R, C], each < 16) packed eight a word along ``axis``
    (1: columns, 0: rows), the lowest bits first, zero-padded: int32 [R, ceil(C/8)] or
    [ceil(R/8), C] (compressed-tensors' pack_to_int32 of the signed values)."""
    a = u if axis == 1 else u.T
    R, C = a.shape
    pad = (-C) % 8
    a = np.pad(a.astype(np.uint32), ((0, 0), (0, pad))).reshape(R, -1, 8)
    words = (a << (4 * np.arange(8, dtype=np.uint32))).sum(axis=2, dtype=np.uint32)
    out = words.view(np.int32)
    return np.ascontiguousarray(out if axis == 1 else out.T)


def _linear_weights(config: dict) -> set[str]:
    """Names of the model's nn.Linear weights, from config.json (a model on the meta device:
    no memory, no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=False)
    return {f"{n}.weight" for n, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}


def _export_tensor(reader, name: str, snap: bool) -> tuple[dict, str, int, float]:
    """One quantized Linear weight → (packed tensors, strategy, group size, largest change)."""
    d = reader.read_codes(name)
    if d.get("rotate") is not None:
        raise ExportError(f"tensor {name}: its codes are of a rotated basis (quantize.rotate="
                          "hadamard), which compressed-tensors cannot express; export a file "
                          "quantized with quantize.rotate=none")
    shape = tuple(d["shape"])
    if len(shape) != 2:
        raise ExportError(f"tensor {name}: shape {shape} is not a 2-D Linear weight")
    rows, cols = shape
    cb = np.asarray(d["codebook"], dtype=np.float64)
    if cb.ndim != 2 or cb.shape[0] == 0 or (rows * cols) % cb.shape[0]:
        raise ExportError(
            f"tensor {name}: one codebook for the whole tensor (network or "
            "layer scope); compressed-tensors export needs per-channel or "
            "per-group codebooks (quantize.scope=channel or group)"
        )
    per = rows * cols // cb.shape[0]  # weights a codebook row covers
    if per != cols and cols % per:
        raise ExportError(f"tensor {name}: groups of {per} do not divide its {cols} columns")
    codes = np.zeros(rows * cols, dtype=np.int64)
    kept = np.ones(rows * cols, dtype=bool)
    if d["positions"] is None:
        codes[:] = d["codes"]
    else:  # pruned weights are 0, on every grid through 0: an extra level of value 0
        kept[:] = False
        kept[d["positions"]] = True
        codes[d["positions"]] = d["codes"]
    groups = codes.reshape(cb.shape[0], per)
    K = cb.shape[1]
    if d["positions"] is not None:
        cb = np.concatenate([cb, np.zeros((cb.shape[0], 1))], axis=1)
        groups = np.where(kept.reshape(groups.shape), groups, K)
    used = np.zeros(cb.shape, dtype=bool)
    np.put_along_axis(used, groups, True, axis=1)
    if cb.shape[1] > 16 + (d["positions"] is not None) and used.sum(1).max() > 16:
        r = int(np.argmax(used.sum(1)))
        raise ExportError(
            f"tensor {name}: row {r} has {int(used[r].sum())} levels; int4 "
            "holds 16 (quantize with quantize.serve_bits: 4)"
        )
    g = grid_rows(cb, used, snap=snap)
    if g.bad.size:
        r = int(g.bad[0])
        lv = np.sort(cb[r][used[r]])
        shown = ", ".join(f"{v:.6g}" for v in lv[:6]) + (", ..." if lv.size > 6 else "")
        why = (
            "its levels are not multiples of one step within fp16 rounding (hwq's uniform "
            "levels are the Hessian-weighted means of their bins: give --snap to move them "
            "to the nearest grid point)"
            if not snap
            else "no 16-value grid through 0 holds its levels"
        )
        raise ExportError(
            f"tensor {name}: codebook row {r} is not a uniform grid of at most "
            f"16 levels through 0 ({shown}): {why}; {g.bad.size} such rows"
        )
    q = np.take_along_axis(g.u, groups, axis=1).reshape(rows, cols)
    n_groups = cb.shape[0] // rows
    out = {
        "weight_packed": pack_int4(q, 1),
        "weight_scale": g.scale.reshape(rows, n_groups).astype(np.float32),
        "weight_zero_point": pack_int4(g.zero.reshape(rows, n_groups), 0),
        "weight_shape": np.array(shape, dtype=np.int64),
    }
    return out, "channel" if n_groups == 1 else "group", per, float(g.change.max())


def export_compressed_tensors(
    reader, hf_files: dict[str, bytes], out: str, *, snap: bool = False, log=print
) -> dict:
    """Write ``out`` (a new folder) from an open HwqReader and the config/tokenizer files.
    Returns a summary {"packed", "dense", "max_change", "strategies"}."""
    import json
    import shutil

    import torch
    from safetensors.torch import save_file

    meta = reader.metadata or {}
    if meta.get("method") not in (None, "uniform"):
        raise ExportError(
            f"{reader.path}: quantized with method {meta['method']}, whose "
            "levels are not uniform grids; compressed-tensors export takes files "
            "of quantize.method=uniform (with quantize.serve_bits: 4)"
        )
    if "config.json" not in hf_files:
        raise ExportError(
            "the export needs the model's config.json (the hf/ folder beside "
            "the .hwq file, or --hf-files FOLDER)"
        )
    config = json.loads(hf_files["config.json"])
    linear = _linear_weights(config)
    tensors: dict[str, torch.Tensor] = {}
    groups: dict[tuple[str, int], list[str]] = {}
    dense_q: list[str] = []
    worst = 0.0
    qnames = {r["name"] for r in reader.inspect() if r["kind"] == "quantized"}
    for name in reader.names:
        quantized = name in qnames
        if quantized and name in linear:
            packed, strategy, per, change = _export_tensor(reader, name, snap)
            worst = max(worst, change)
            mod = name[: -len(".weight")]
            for k, v in packed.items():
                tensors[f"{mod}.{k}"] = torch.from_numpy(v)
            groups.setdefault((strategy, per), []).append(mod)
            continue
        a = reader.read([name])[name]
        t = torch.from_numpy(np.ascontiguousarray(a).reshape(a.shape))
        if reader.dtype(name) == "bfloat16":
            t = t.view(torch.int16).view(torch.bfloat16)
        tensors[name] = t
        if quantized:
            dense_q.append(name)
    if not groups:
        raise ExportError(f"{reader.path}: no quantized Linear weights to pack")
    cfg_groups = {}
    for i, ((strategy, per), mods) in enumerate(sorted(groups.items())):
        cfg_groups[f"group_{i}"] = {
            "targets": sorted(mods),
            "weights": {
                "num_bits": 4,
                "type": "int",
                "symmetric": False,
                "strategy": strategy,
                "group_size": per if strategy == "group" else None,
                "dynamic": False,
                "actorder": None,
                "observer": "minmax",
            },
            "input_activations": None,
            "output_activations": None,
        }
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": cfg_groups,
        "ignore": sorted(
            n[: -len(".weight")]
            for n in linear
            if not any(n[: -len(".weight")] in m for m in groups.values())
        ),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }
    parent = os.path.dirname(os.path.abspath(out)) or "."
    tmp = os.path.join(parent, f".{os.path.basename(os.path.abspath(out))}.tmp-{uuid.uuid4().hex}")
    os.makedirs(parent, exist_ok=True)
    os.mkdir(tmp)
    try:
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        files = {**hf_files, "config.json": json.dumps(config, indent=2).encode()}
        for fname, data in files.items():
            with open(os.path.join(tmp, fname), "wb") as f:
                f.write(data)
        mask = os.umask(0)  # the umask's modes, as any folder and file the user writes
        os.umask(mask)
        for fname in os.listdir(tmp):
            os.chmod(os.path.join(tmp, fname), 0o666 & ~mask)
        os.chmod(tmp, 0o777 & ~mask)
        if os.path.isdir(out):
            os.rmdir(out)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    n_packed = sum(len(m) for m in groups.values())
    return {
        "packed": n_packed,
        "dense": dense_q,
        "max_change": worst,
        "strategies": sorted({s for s, _ in groups}),
    }


def _export_cmd(args) -> int:
    from pipeline.encode.cli import OutputError, _existing_ancestor, _hf_files, _reader

    if args.format != "compressed-tensors":
        raise ExportError(f"--format {args.format}: only compressed-tensors is supported")
    out = os.path.abspath(args.out)
    anc = _existing_ancestor(out)
    if not os.path.isdir(anc):
        raise OutputError(f"{args.out}: {anc} is not a folder")
    if os.path.lexists(out) and (not os.path.isdir(out) or os.path.islink(out) or os.listdir(out)):
        raise OutputError(f"{args.out} exists and is not an empty folder")
    reader = _reader(args)
    files = _hf_files(args)
    s = export_compressed_tensors(reader, files, out, snap=args.snap)
    note = (
        f"; {len(s['dense'])} quantized non-Linear tensors written dense ({', '.join(s['dense'])})"
        if s["dense"]
        else ""
    )
    snapped = f"; --snap moved levels by at most {s['max_change']:.3g}" if args.snap else ""
    print(
        f"{args.out}: compressed-tensors pack-quantized int4 ({'/'.join(s['strategies'])}), "
        f"{s['packed']} Linear weights packed{note}{snapped}"
    )
    return 0


def add_commands(sub) -> None:
    from pipeline.encode.cli import _limits

    e = sub.add_parser(
        "export",
        help="write a .hwq file for another serving stack",
        description="Write a .hwq file whose rows are uniform grids of at most "
        "16 levels (quantize.method=uniform, scope channel or group, "
        "quantize.serve_bits: 4) as a model folder in the compressed-tensors "
        "pack-quantized int4 layout, which vLLM serves with its own kernels. "
        "Other files are refused with the reason.",
    )
    e.add_argument("file", help="a .hwq file or URL")
    e.add_argument("out", help="the model folder to write (new or empty)")
    e.add_argument(
        "--format", required=True, choices=["compressed-tensors"], help="the output layout"
    )
    e.add_argument(
        "--snap",
        action="store_true",
        help="move levels that are near but not on a grid (hwq's uniform levels "
        "are bin means) to the nearest grid point; prints the largest change",
    )
    e.add_argument(
        "--hf-files",
        metavar="FOLDER",
        help="where config.json and the tokenizer files are (default: the hf/ "
        "folder beside the .hwq file, as the encode stage writes)",
    )
    e.add_argument("--endpoint-url", metavar="URL", help="S3-compatible endpoint for an s3:// file")
    _limits(e)
    e.set_defaults(func=_export_cmd)
