"""The `encode` stage of a streamed model: the .hwq written tensor by tensor, then checked.

One Ray task writes ``model.hwq`` with lazily loaded entries (`write_hwq` takes callables): a
quantized tensor's codes are read from the quantize stage (each file checked against its
manifest's sha256), a tensor stored as is is range-read from the model's folder (cast by
encode.raw_dtype), and the payload spools to disk and is uploaded in parts — at no point is
the model, or its codes, in memory. The codebooks of every row (float32 [R, K] each, about
1/C of the model) are the only thing held for the whole write.

Then the file is decoded tensor by tensor by range reads (`HwqReader`) and every tensor is
compared bit for bit with what it must be: the codebook values at the indices, in the tensor's
dtype, and the raw tensors as cast. With eval texts, the decoded model is written to a private
scratch folder and its perplexity measured block by block (as the load stage measured the
original's), and the folder removed.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from pipeline.config import RunConfig
from pipeline.encode import rotation
from pipeline.encode.entries import quantized_bits, raw_array, raw_cast
from pipeline.executor import call, task_threads
from pipeline.graph import StageContext

__all__ = ["run_encode_streamed"]

FILE = "model.hwq"
_HWQ_DTYPE = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64",
              "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
              "BOOL": "bool"}
_TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}


def _expected(w, name: str, codes: tuple | None, raw_dtype: str,
              rotate: int | None = None) -> np.ndarray:
    """What tensor `name` must decode to, as the reader returns it (bf16 as uint16 bits).
    codes: (indices, codebooks, mask or None) of a quantized tensor; rotate: the seed of its
    rotation (`quantize.rotate`), undone on the float32 rows before the cast."""
    if codes is not None:
        idx, cb, mask = codes
        dense = np.take_along_axis(cb, idx.astype(np.int64), axis=1)
        if mask is not None:
            dense = np.where(mask, dense, np.float32(0))
        if rotate is not None:
            dense = rotation.inverse(dense, rotate)
        dense = torch.from_numpy(dense)
        dt = _TORCH.get(_HWQ_DTYPE[w.info(name).dtype], torch.float32)
        return raw_array(dense.to(dt))[0]
    return raw_array(raw_cast(w.read(name), raw_dtype))[0]


def _check_decoded(path: str, opts: dict | None, w, names: list[str], codes,
                   raw_dtype: str) -> int:
    """Decode every tensor of the file just written and compare it bit for bit; returns the
    bytes read."""
    from pipeline.encode.container import HwqReader
    from pipeline.memory import release_memory

    r = HwqReader(path, storage_options=opts)
    for name in names:
        got = np.asarray(r.read([name])[name])
        c = codes.read_masked(name) if name in codes.codes else None
        want = _expected(w, name, c, raw_dtype, codes.rotation(name) if c is not None else None)
        if got.shape != want.shape or got.dtype != want.dtype or not np.array_equal(
                got.view(np.uint8), want.view(np.uint8)):
            raise RuntimeError(f"{path}: tensor {name} does not decode to the quantized "
                               "weights; the encoder is broken")
        del got, want, c
        release_memory()
    return r.bytes_read


def _encode_task(cfg: RunConfig, out, url: str, opts: dict | None, tc,
                 tied: dict[str, str]) -> dict:
    """Write and check model.hwq. tied: {alias: tensor} of the model (its head tied to the
    embedding): the alias is left out (a checkpoint may hold a copy; the resident load never
    does), so the tensor is stored once and the decoded model ties it again.
    tc: the run's `TensorCodes` (indices from quantize, codebooks from a block-wise
    fine-tune where it ran)."""
    from pipeline.encode.container import TensorEntry, write_hwq
    from pipeline.executor import private_subdir, task_attempt
    from pipeline.memory import process_peaks, release_memory
    from pipeline.models.source import tensor_order
    from pipeline.models.weights import WeightsFolder

    task_threads()
    e = cfg.encode
    w = WeightsFolder(url, opts)
    codes, shapes = tc.codes, tc.shapes
    codebooks = {n: tc.read(n)[1] for n in codes}

    def quantized(name: str) -> TensorEntry:
        release_memory()  # what the previous tensor's encoding freed
        idx, _, mask = tc.read_masked(name)
        if mask is not None:  # the kept weights' codes; the mask codes their positions
            mask = mask.reshape(-1)
            idx = idx.reshape(-1)[mask]
        return TensorEntry.quantized(name, shapes[name], idx.reshape(-1), name, mask=mask,
                                     dtype=_HWQ_DTYPE[w.info(name).dtype],
                                     rotate=tc.rotation(name))

    def raw(name: str) -> TensorEntry:
        release_memory()
        a, dt = raw_array(raw_cast(w.read(name), e.raw_dtype))
        return TensorEntry.raw_tensor(name, a, dt)

    names = [n for n in tensor_order(w.names) if n not in tied]  # a tied alias: stored once
    entries = [(lambda n=n: quantized(n)) if n in codes else (lambda n=n: raw(n))
               for n in names]
    path = out.url(FILE)
    sopts = out.store.storage_options or None
    acct = write_hwq(path, entries, codebooks, coder=e.coder, code_sharing=e.code_sharing,
                     chunk_symbols=e.chunk_symbols, codebook_dtype="float16",
                     spool_bytes=16 << 20, stream_symbols=16 << 20, storage_options=sopts,
                     spill_dir=str(private_subdir("spill")),
                     metadata={"model": cfg.model.name, "scope": cfg.quantize.scope,
                               "method": cfg.quantize.method, "source": cfg.model.path,
                               "tied": tied})
    del codebooks
    release_memory()
    file_bytes = out.store.size(out.rel(FILE))
    if file_bytes != acct["file_bytes"] or sum(acct["bits"].values()) != 8 * file_bytes:
        raise RuntimeError(f"accounting of {path} does not add up to its size")
    t_check = time.perf_counter()
    checked_bytes = _check_decoded(path, sopts, w, names, tc, e.raw_dtype)
    n_all = sum(w.info(n).numel for n in names)
    return {"acct": acct, "file_bytes": file_bytes, "entries": len(names),
            "params": n_all, "original_bytes": sum(w.info(n).nbytes for n in names),
            "check_seconds": time.perf_counter() - t_check, "check_bytes_read": checked_bytes,
            "bytes_read": w.bytes_read, "process": process_peaks(), "attempt": task_attempt()}


def _evaluate_task(cfg: RunConfig, out, sets: dict[str, torch.Tensor], hf: list[str],
                   ref_url: str, ref_opts: dict | None) -> dict:
    """Perplexity of the decoded file's model, decoded to a private scratch folder first, and
    its mean next-token KL from the unquantized model at `ref_url` (evaluate/kl.py)."""
    import shutil
    import tempfile

    from pipeline.encode.folder import decode_to_folder
    from pipeline.evaluate.kl import streamed_perplexity_kl
    from pipeline.executor import private_subdir

    task_threads()
    tmp = tempfile.mkdtemp(dir=private_subdir("spill"))
    try:
        decode_to_folder(out.url(FILE), tmp, storage_options=out.store.storage_options or None)
        for rel in hf:
            with open(f"{tmp}/{rel.rsplit('/', 1)[-1]}", "wb") as f:
                f.write(out.read_bytes(rel))
        return streamed_perplexity_kl(tmp, None, ref_url, ref_opts, sets,
                                      cfg.evaluate.batch_size)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _embedding_bits(out, names: list[str], shapes: dict[str, tuple[int, int]]) -> dict:
    """What the quantized embedding (and head) cost in the file, as the resident encode
    stage counts it (`encode.stage.embedding_bits`): their index streams and codebooks."""
    from pipeline.encode.container import HwqReader

    if not names:
        return {"names": [], "params": 0, "bits": 0, "bits_per_weight": None}
    rows = HwqReader(out.url(FILE), storage_options=out.store.storage_options or None).inspect()
    want = set(names)
    bits = 8 * sum(r["bytes"] for r in rows
                   if r["kind"] in ("quantized", "codebook") and r["name"] in want)
    params = sum(shapes[n][0] * shapes[n][1] for n in names)
    return {"names": list(names), "params": params, "bits": bits,
            "bits_per_weight": bits / max(params, 1)}


def run_encode_streamed(ctx: StageContext) -> dict[str, Any]:
    from pipeline.models.source import source_url
    from pipeline.quantize.codes import TensorCodes
    from pipeline.workload import MODEL_JSON, WINDOWS, Workload

    cfg, out = ctx.cfg, ctx.out
    t0 = time.perf_counter()
    load, quant = ctx.inputs["load"], ctx.inputs["quantize"]
    url, opts = source_url(cfg, load)
    q = quant.read_json("codes.json")
    codes = q["codes"]
    shapes = {n: tuple(s) for n, s in q["shapes"].items()}
    meta = load.read_json(MODEL_JSON)
    if set(codes) != set(meta["quantizable"]):
        raise RuntimeError("the quantize stage's codes do not list the load stage's tensors")
    # What `hwq decode --hf-out` puts beside the weights (not part of the file's bits).
    hf = sorted(rel for rel in (load.outputs or {}) if rel.startswith("hf/"))
    for rel in hf:
        out.write_bytes(rel, load.read_bytes(rel))
    tc = TensorCodes(quant, ctx.inputs.get("finetune"))
    r = call(_encode_task, cfg, out, url, opts, tc, meta.get("tied", {}), cpus="worker")
    acct, file_bytes = r["acct"], r["file_bytes"]
    n_q = sum(a * b for a, b in shapes.values())
    qbits = quantized_bits(acct, len(codes), r["entries"])
    emb = _embedding_bits(out, [n for n in meta.get("embeddings", []) if n in codes], shapes)
    metrics: dict[str, Any] = {
        "bits_per_weight": qbits / max(n_q, 1),
        "bits_per_weight_all": 8 * file_bytes / max(r["params"], 1),
    }
    target = cfg.quantize.target_bits
    if target is not None and not target - 0.015 <= qbits / max(n_q, 1) <= target:
        # the quantize stage aims the file from each tensor's coded size; a model of few,
        # small tensors pays a header share that estimate misses
        ctx.log.warning("encode: the file spends %.4f bits per quantized weight, outside "
                        "[%.3f, %.3f] (quantize.target_bits %.3f)", qbits / max(n_q, 1),
                        target - 0.015, target, target)
    windows = load.read_safetensors(WINDOWS)
    sets = {k.removeprefix("eval/"): v for k, v in windows.items() if k.startswith("eval/")}
    if sets:
        ev = call(_evaluate_task, cfg, out, sets, hf, url, opts, cpus="worker")
        metrics.update(Workload(cfg).metric_fields("decoded", ev))
        # KL(P_unquantized ‖ P_decoded) per predicted token, nats (llama.cpp's measure)
        metrics.update(decoded_kl=ev["kl"], decoded_kl_by_set=ev["kl_by_set"])
    metrics["encode"] = {
        "file": out.url(FILE), "file_bytes": file_bytes, "residency": cfg.model.residency,
        "quantized_params": n_q, "params": r["params"],
        "bits_per_weight": qbits / max(n_q, 1),
        "bits_per_weight_all": 8 * file_bytes / max(r["params"], 1),
        "bits_per_weight_linears": (qbits - emb["bits"]) / max(n_q - emb["params"], 1),
        "embeddings": emb,
        "index_bits_per_weight": acct["bits"]["indices"] / max(n_q, 1),
        "codebook_bits_per_weight": acct["bits"]["codebooks"] / max(n_q, 1),
        "raw_tensor_bytes": acct["bits"]["raw_tensors"] // 8,
        "original_bytes": r["original_bytes"],
        "compression_ratio": r["original_bytes"] / file_bytes,
        "compression_ratio_vs_fp32": 4 * r["params"] / file_bytes,
        "bits": acct["bits"], "index_entropy_bits": acct["index_entropy_bits"],
        "decode_check": {"tensors": r["entries"], "seconds": round(r["check_seconds"], 3),
                         "bytes_read": r["check_bytes_read"]},
        "bytes_read": r["bytes_read"],
        # Ray's retries of the encode task (its worker killed mid-write or mid-check)
        "retried": r["attempt"],
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return metrics
