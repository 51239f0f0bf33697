"""The pipeline for a model larger than memory: every stage streams tensors.

The model is a safetensors folder (local or ``s3://``) that no process ever reads whole.
Four stages, each a Ray task (the quantize stage a task per tensor), outputs under one work
folder (local or ``s3://``), a manifest per stage written last:

``hessian``   `StreamedLM` runs the calibration windows one decoder block at a time (the
              activation estimator, forward only, or the block-wise Fisher) and writes the
              values tensor by tensor into ``hessian.parquet`` (a row group per tensor).
``quantize``  one λ for every row of every tensor (the paper's single multiplier, per
              channel): λ is found on every s-th row of each tensor (a sample small enough for
              one process), then each tensor is quantized by its own task, which range-reads
              only that tensor and its Hessian row group and writes ``codes/<i>.safetensors``
              (indices and per-row codebook); the driver keeps per-tensor sums only.
``encode``    `write_hwq` with lazily loaded entries: codes and raw tensors are read one at a
              time, the payload spools to disk and is uploaded in parts.
              The model's config, generation config and tokenizer files go to ``hf/``
              beside it (as `hwq run`'s encode stage writes them), so `hwq decode --hf-out`
              needs no ``--hf-files``.
``decode``    `decode_to_folder`: the .hwq back to a sharded bf16/fp32 folder, tensor by
              tensor, with the config, generation config and tokenizer files beside it.

Every manifest records the stage's seconds, weights per second, the bytes it read, the peak
RSS of the driver and of every worker process that ran it (and the GPU allocator's peak where
there is a GPU), and each output's bytes and sha256 computed while it was written. The work
folder is untrusted (pipeline/stream_work.py): a rerun whose stage key (settings + the inputs'
digests) matches a valid manifest is a cache hit only after every output re-hashes to its
recorded sha256, and every read of another stage's output is checked against the digest that
stage's manifest recorded (whole files read once, hashed and parsed from those bytes; the
Hessian table tensor by tensor).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from pipeline.executor import private_subdir
from pipeline.memory import peak_rss, process_peaks, release_memory
from pipeline.models.weights import INDEX, WeightsFolder
from pipeline.store import ArtifactError
from pipeline.stream_work import WorkFolder, manifest_rel

__all__ = ["StreamSettings", "run_streamed", "stage_hessian", "stage_quantize", "stage_encode",
           "stage_decode", "block_targets", "one_tensor_decode"]

log = logging.getLogger(__name__)
HESSIAN = "hessian.parquet"
HWQ = "model.hwq"
DECODED = "decoded"
HF = "hf"  # config and tokenizer files beside model.hwq, as `hwq run`'s encode stage writes


@dataclass
class StreamSettings:
    estimator: str = "activation"  # or "fisher"
    windows: int = 4
    seq_len: int = 64
    seed: int = 0
    method: str = "uniform"  # or "ecsq"
    target_bits: float = 3.0
    sample_weights: int = 8_000_000  # rows sampled for the λ search, about this many weights
    slab_rows: int = 1024  # rows quantized at once inside a task
    k_max: int = 64
    coder: str = "huffman"
    cache_bytes: int = 256 << 20  # Fisher: block inputs kept in memory up to this
    threads: int = 1  # numba threads per quantize task


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _model_digest(w: WeightsFolder) -> str:
    """The model's identity without reading its weights: per-tensor digests when the folder
    has them, else names, dtypes, shapes and byte offsets."""
    return _digest({n: (t.sha256 or [t.dtype, t.shape, t.file, t.start, t.end])
                    for n, t in w.tensors.items()})


_Work = WorkFolder  # the name benchmarks/scale_memory.py imports


def _cached(work: WorkFolder, stage: str, key: str, need: tuple[str, ...] = ()) -> dict | None:
    """The stage's manifest, as a dict, if it is valid for `key`, has the fields `need`, and
    every output it lists re-hashes to its recorded sha256; else None (recompute)."""
    m, why = work.manifest(stage, key)
    if m is not None and any(getattr(m, f, None) is None for f in need):
        m, why = None, f"its manifest has no {', '.join(need)}"
    if m is not None:
        why = work.check(m.outputs)
        if why is None:
            log.info("%s: cache hit (every output re-hashed to its manifest's sha256)", stage)
            d = m.model_dump(exclude_none=True)
            d["cached"] = True
            return d
    if why not in ("no manifest", "settings or inputs changed"):
        log.warning("%s: recomputing: %s", stage, why)  # the folder was changed behind hwq
    return None


def _finish(work: WorkFolder, stage: str, key: str, t0: float, outputs: dict, workers: list,
            **figures: Any) -> dict:
    m = {"stage": stage, "key": key, "seconds": time.perf_counter() - t0,
         "outputs": outputs, "verified": "sha256 computed while writing",
         "memory": {"driver_peak_rss": peak_rss(), "workers": workers,
                    "workers_peak_rss": max((w["peak_rss"] for w in workers), default=0)},
         **figures}
    if m.get("weights"):
        m["weights_per_s"] = m["weights"] / max(m["seconds"], 1e-9)
    work.write_bytes(manifest_rel(stage), json.dumps(m, indent=1).encode())
    m["cached"] = False
    return m


def block_targets(w: WeightsFolder) -> list[str]:
    """The 2-D ``.weight`` tensors inside decoder blocks (``…layers.<i>.…``), in file order."""
    import re

    pat = re.compile(r"(^|\.)(layers|h|blocks)\.\d+\.")
    return [n for n, t in w.tensors.items()
            if n.endswith(".weight") and len(t.shape) == 2 and pat.search(n)]


def random_windows(vocab: int, n: int, seq_len: int, seed: int) -> torch.Tensor:
    """Seeded token windows (a synthetic model has no tokenizer; real text can be passed
    instead through `run_streamed(windows=...)`)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seq_len), generator=g)


# ---------------------------------------------------------------------------------------------
# stages (the task bodies are plain functions: Ray runs them, tests may call them directly)


def _hessian_task(model_url: str, work_url: str, s: dict, windows: torch.Tensor | None,
                  storage_options: dict | None) -> dict:
    from pipeline.hessian.stream import activation_streamed, fisher_streamed
    from pipeline.hessian.table import TensorTableWriter
    from pipeline.models.stream import StreamedLM

    st = StreamSettings(**s)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    # Forward-only statistics run in the checkpoint's 16-bit dtype (sums in float64); the
    # Fisher's gradients in float32.
    lm = StreamedLM(model_url, storage_options,
                    dtype="stored" if st.estimator == "activation" else torch.float32)
    names = block_targets(lm.weights)
    if windows is None:
        windows = random_windows(int(lm.config.vocab_size), st.windows, st.seq_len, st.seed)
    work = WorkFolder(work_url, storage_options)
    with TensorTableWriter(work.sub(HESSIAN), storage_options,
                           metadata={"estimator": st.estimator}) as table:
        def emit(name: str, sums: np.ndarray, n: int) -> None:
            table.add(name, sums / n)

        if st.estimator == "activation":
            activation_streamed(lm, windows, names, emit)
        elif st.estimator == "fisher":
            fisher_streamed(lm, windows, names, emit, cache_bytes=st.cache_bytes,
                            spill_dir=str(private_subdir("spill")))
        else:
            raise ValueError(f"estimator must be 'activation' or 'fisher', got {st.estimator!r}")
        out = table.close()
    weights = sum(lm.weights.tensors[n].numel for n in names)
    return {"outputs": {HESSIAN: out}, "weights": weights, "tensors": len(names),
            "tensor_sha256": table.tensor_sha256, "bytes_read": lm.weights.bytes_read,
            "process": process_peaks()}


def _h_rows(h: np.ndarray, shape: tuple[int, int], rows: slice | np.ndarray) -> np.ndarray:
    """Hessian rows of a tensor: an activation [in] vector broadcast, or a full [out, in]."""
    R, C = shape
    if h.size == C:
        n = len(range(*rows.indices(R))) if isinstance(rows, slice) else len(rows)
        return np.broadcast_to(h.reshape(1, C), (n, C))
    return h.reshape(R, C)[rows]


def _hessian_values(hess_url: str, name: str, shape: tuple[int, int], digest: str,
                    storage_options: dict | None) -> np.ndarray:
    """One tensor's Hessian values: an activation [in] vector or a full [out·in], bounded
    by the tensor's shape before decoding and checked against the manifest's digest."""
    from pipeline.hessian.table import TensorTable

    R, C = shape
    t = TensorTable(hess_url, storage_options)
    try:
        return t.read(name, sizes=(C, R * C), sha256=digest)
    finally:
        t.close()


def _sample_task(model_url: str, hess_url: str, name: str, every: int, offset: int,
                 digest: str, storage_options: dict | None):
    from pipeline.quantize.rate import RowBlock

    w = WeightsFolder(model_url, storage_options)
    info = w.info(name)
    R, C = info.shape
    rows = np.arange(0, R, every)
    W = w.read(name, torch.float32).numpy()[rows]
    H = _h_rows(_hessian_values(hess_url, name, (R, C), digest, storage_options), (R, C), rows)
    return RowBlock(np.ascontiguousarray(W), np.ascontiguousarray(H), offset)


def _quantize_task(model_url: str, hess_url: str, work_url: str, name: str, index: int,
                   lam: float, s: dict, row_offset: int, digest: str,
                   storage_options: dict | None) -> dict:
    from safetensors.torch import save

    from pipeline.quantize.rate import RowBlock, solve_rows_at

    st = StreamSettings(**s)
    w = WeightsFolder(model_url, storage_options)
    info = w.info(name)
    R, C = info.shape
    Wt = w.read(name)  # stored dtype (bf16: half the bytes of float32)
    h = _hessian_values(hess_url, name, (R, C), digest, storage_options)
    opts = {"k_max": st.k_max, "threads": st.threads}
    results = []
    for a in range(0, R, st.slab_rows):
        b = min(R, a + st.slab_rows)
        W = Wt[a:b].to(torch.float32).numpy()
        H = np.ascontiguousarray(_h_rows(h, (R, C), slice(a, b)))
        (res,) = solve_rows_at([RowBlock(W, H, row_offset + a)], lam, st.method, **opts)
        results.append(res)
    K = max(int(r.levels.max(initial=1)) for r in results)
    codebooks = np.concatenate([_pad_levels(r.codebooks, K) for r in results])
    indices = np.concatenate([r.indices for r in results]).astype(np.uint8 if K <= 256
                                                                  else np.int16)
    index_bits = float(sum(float((r.entropy * C).sum()) for r in results))
    levels = int(sum(int(r.levels.sum()) for r in results))
    distortion = float(sum(float(r.distortion.sum()) for r in results))
    del results, Wt
    release_memory()
    blob = save({"indices": torch.from_numpy(indices),
                 "codebooks": torch.from_numpy(codebooks.astype(np.float32))},
                metadata={"tensor": name, "dtype": info.dtype, "lam": repr(lam)})
    rel = f"codes/{index:05d}.safetensors"
    out = WorkFolder(work_url, storage_options).write_bytes(rel, blob)
    return {"name": name, "rel": rel, "output": out, "weights": R * C, "rows": R,
            "index_bits": index_bits, "levels": levels, "distortion": distortion,
            "bytes_read": w.bytes_read, "process": process_peaks()}


def _pad_levels(cb: np.ndarray, K: int) -> np.ndarray:
    """[R, k] codebook rows to K slots (padding repeats the last level, never referenced)."""
    if cb.shape[1] >= K:
        return cb[:, :K]
    return np.concatenate([cb, np.repeat(cb[:, -1:], K - cb.shape[1], axis=1)], axis=1)


_HWQ_DTYPE = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64",
              "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
              "BOOL": "bool"}
_NP_RAW = {"bfloat16": np.uint16, "bool": np.bool_}


def _codes(work: WorkFolder, rel: str, digest: dict, shape: tuple[int, ...]
           ) -> tuple[np.ndarray, np.ndarray]:
    """(indices uint8/int16 [R, C], codebooks float32 [R, K]) of one tensor: its codes file read
    once, checked against the quantize manifest's digest, parsed from those bytes."""
    from safetensors.numpy import load

    data = work.verified_bytes(rel, digest)
    try:
        t = load(data)
        idx, cb = t["indices"], t["codebooks"]
    except Exception as e:  # noqa: BLE001 - safetensors raises its own types on bad input
        raise ArtifactError(f"{work.sub(rel)} is not a codes file ({type(e).__name__}); "
                            "rerun `hwq stream` to recompute it") from None
    if (len(shape) != 2 or idx.shape != tuple(shape) or idx.dtype not in (np.uint8, np.int16)
            or cb.dtype != np.float32 or cb.ndim != 2 or cb.shape[0] != shape[0]
            or not 1 <= cb.shape[1] <= 1 << 15 or (idx.size and not 0 <= idx.min() <= idx.max()
                                                   < cb.shape[1])):
        raise ArtifactError(f"{work.sub(rel)} does not hold codes of a {list(shape)} tensor; "
                            "rerun `hwq stream` to recompute it")
    return idx, cb


def _encode_task(model_url: str, work_url: str, codes: dict[str, str], digests: dict[str, dict],
                 hf: dict[str, bytes], s: dict, storage_options: dict | None) -> dict:
    """codes: tensor -> codes file; digests: codes file -> {"bytes", "sha256"} (the quantize
    manifest's); hf: the model's config and tokenizer files, written to hf/."""
    from pipeline.encode.container import TensorEntry, write_hwq

    st = StreamSettings(**s)
    work = WorkFolder(work_url, storage_options)
    w = WeightsFolder(model_url, storage_options)
    codebooks: dict[str, np.ndarray] = {}
    read = 0
    for name, rel in codes.items():
        codebooks[name] = _codes(work, rel, digests[rel], w.info(name).shape)[1]
        read += digests[rel]["bytes"]

    def quantized(name: str) -> TensorEntry:
        nonlocal read
        release_memory()  # what the previous tensor's encoding freed
        info = w.info(name)
        idx = _codes(work, codes[name], digests[codes[name]], info.shape)[0].reshape(-1)
        read += digests[codes[name]]["bytes"]
        return TensorEntry.quantized(name, info.shape, idx, name, dtype=_HWQ_DTYPE[info.dtype])

    def raw(name: str) -> TensorEntry:
        release_memory()
        info = w.info(name)
        dt = _HWQ_DTYPE[info.dtype]
        a = np.frombuffer(w.read_bytes(name), dtype=_NP_RAW.get(dt, dt)).reshape(info.shape)
        return TensorEntry.raw_tensor(name, a, dt)

    entries = [(lambda n=n: quantized(n)) if n in codes else (lambda n=n: raw(n))
               for n in w.names]

    # float16 codebooks: rows store only the levels they use (the quantizer's values are
    # fp16-exact), and their codes go by level count: what the rate search charged for.
    acct = write_hwq(work.sub(HWQ), entries, codebooks, coder=st.coder,
                     codebook_dtype="float16", spool_bytes=16 << 20,
                     stream_symbols=16 << 20,
                     storage_options=storage_options, spill_dir=str(private_subdir("spill")),
                     metadata={"source": model_url, "method": st.method,
                               "target_bits": st.target_bits})
    # The digest of the published file, read back once right after writing it.
    h = hashlib.sha256()
    size = work.size(HWQ)
    for a in range(0, size, 64 << 20):
        h.update(work.files.read(HWQ, a, min(size, a + (64 << 20))))
    outputs = {HWQ: {"bytes": size, "sha256": h.hexdigest()}}
    for n, data in sorted(hf.items()):  # beside the .hwq, as `hwq run`'s encode stage
        outputs[f"{HF}/{n}"] = work.write_bytes(f"{HF}/{n}", data)
    weights = sum(w.info(n).numel for n in codes)
    return {"outputs": outputs, "weights": weights, "accounting": acct,
            "bytes_read": w.bytes_read + read, "process": process_peaks()}


def _decode_task(work_url: str, enc_outputs: dict[str, dict], storage_options: dict | None
                 ) -> dict:
    """The .hwq (copied privately while its sha256 is checked) back to a sharded folder, with
    the hf/ files (each checked) beside it."""
    import shutil
    import tempfile

    from pipeline.encode.folder import decode_to_folder

    work = WorkFolder(work_url, storage_options)
    tmp = tempfile.mkdtemp(dir=private_subdir("spill"))
    try:
        local = work.verified_copy(HWQ, enc_outputs[HWQ], tmp)
        out = decode_to_folder(local, work.sub(DECODED), storage_options=storage_options)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    outputs = {}
    for rel, digest in sorted(enc_outputs.items()):
        if rel.startswith(f"{HF}/"):
            data = work.verified_bytes(rel, digest)
            outputs[f"{DECODED}/{rel[len(HF) + 1:]}"] = work.write_bytes(
                f"{DECODED}/{rel[len(HF) + 1:]}", data)
    # The index this task just wrote, read back once: its digest, and the shards' it records.
    raw = work.store.read_bytes(f"{DECODED}/{INDEX}")
    index = json.loads(raw)
    for shard, digest in index["metadata"]["hwq_shard_sha256"].items():
        rel = f"{DECODED}/{shard}"
        outputs[rel] = {"bytes": work.size(rel), "sha256": digest}
    outputs[f"{DECODED}/{INDEX}"] = {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    return {"outputs": outputs, "weights": out["elements"], "tensors": out["tensors"],
            "tensor_sha256": index["metadata"]["hwq_tensor_sha256"],
            "bytes_read": out["bytes_read"], "bytes_written": out["bytes_written"],
            "process": process_peaks()}


def _evaluate_task(model_url: str, work_url: str, windows: torch.Tensor, dec: dict,
                   storage_options: dict | None) -> dict:
    """dec: the decode manifest; the decoded folder's config is checked against it and every
    decoded tensor read against the digests it recorded."""
    from pipeline.executor import task_threads
    from pipeline.models.stream import StreamedLM

    task_threads()
    work = WorkFolder(work_url, storage_options)
    work.verified_bytes(f"{DECODED}/config.json", dec["outputs"][f"{DECODED}/config.json"])
    out, shapes = {}, {}
    for label, url in (("original", model_url), ("decoded", work.sub(DECODED))):
        lm = StreamedLM(url, storage_options, dtype=torch.float32)
        got = {n: (t.dtype, t.shape) for n, t in lm.weights.tensors.items()}
        if label == "decoded" and (got != shapes or dec["tensor_sha256"] != {
                n: t.sha256 for n, t in lm.weights.tensors.items()}):
            raise ArtifactError(f"{work.sub(DECODED)} is not the folder the decode stage wrote "
                                "(its index differs from the manifest); rerun `hwq stream`")
        shapes = got
        out[f"{label}_perplexity"] = lm.perplexity(windows)
        out[f"{label}_bytes_read"] = lm.weights.bytes_read
    blob = json.dumps(out, indent=1).encode()
    return {"outputs": {"evaluate.json": work.write_bytes("evaluate.json", blob)},
            "figures": out, "process": process_peaks()}


# ---------------------------------------------------------------------------------------------
# the driver


def _remote(fn, cpus: int = 1):
    from pipeline.executor import remote

    return remote(fn, cpus=cpus)


def _get(refs):
    """ray.get, with a file-system error of a task (a folder planted where hwq writes a file)
    as one line naming the path instead of Ray's traceback."""
    import ray
    from ray.exceptions import RayTaskError

    try:
        return ray.get(refs)
    except RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, OSError) and not isinstance(cause, (FileNotFoundError,
                                                                  PermissionError)):
            where = f"{cause.filename}: " if cause.filename else ""
            raise ArtifactError(f"{where}{cause.strerror or cause} (hwq writes a regular file "
                                "there: remove what is in the way and rerun)") from None
        raise


def stage_hessian(model_url, work: WorkFolder, st: StreamSettings, model_key: str,
                  windows=None, cpus: int = 2, names: list[str] | None = None) -> dict:
    """names: the tensors the table must hold values of (default: the model's targets)."""

    key = _digest({"model": model_key, "estimator": st.estimator, "windows": st.windows,
                   "seq_len": st.seq_len, "seed": st.seed,
                   "custom_windows": None if windows is None else _digest(windows.tolist())})
    hit = _cached(work, "hessian", key, need=("tensor_sha256",))
    if names is None:
        names = block_targets(WeightsFolder(model_url, work.storage_options))
    if hit and set(hit["tensor_sha256"]) != set(names):
        log.warning("hessian: recomputing: its manifest lists other tensors than the model's")
        hit = None
    if hit:
        return hit
    t0 = time.perf_counter()
    r = _get(_remote(_hessian_task, cpus).remote(model_url, work.url, asdict(st), windows,
                                                  work.storage_options))
    return _finish(work, "hessian", key, t0, r["outputs"], [r["process"]],
                   weights=r["weights"], tensors=r["tensors"], bytes_read=r["bytes_read"],
                   tensor_sha256=r["tensor_sha256"])


def stage_quantize(model_url, work: WorkFolder, st: StreamSettings, hess: dict,
                   progress: Callable[[str], object] | None = None) -> dict:
    import ray

    from pipeline.quantize.rate import solve_rows_global_rate

    key = _digest({"hessian": hess["outputs"][HESSIAN]["sha256"], "method": st.method,
                   "target_bits": st.target_bits, "sample_weights": st.sample_weights,
                   "k_max": st.k_max, "slab_rows": st.slab_rows, "model": hess["key"]})
    w = WeightsFolder(model_url, work.storage_options)
    names = block_targets(w)
    # The codes files are named by the driver, never taken from a manifest.
    codes = {n: f"codes/{i:05d}.safetensors" for i, n in enumerate(names)}
    hit = _cached(work, "quantize", key, need=("codes",))
    if hit and (hit["codes"] != codes or set(hit["outputs"]) != set(codes.values())):
        log.warning("quantize: recomputing: its manifest names other codes files")
        hit = None
    if hit:
        return hit
    t0 = time.perf_counter()
    digests = hess["tensor_sha256"]
    total = sum(w.info(n).numel for n in names)
    every = max(1, math.ceil(total / max(st.sample_weights, 1)))
    offsets, at = {}, 0
    for n in names:
        offsets[n] = at
        at += w.info(n).shape[0]
    hess_url = work.sub(HESSIAN)
    sample = _remote(_sample_task)
    blocks = _get([sample.remote(model_url, hess_url, n, every, offsets[n], digests[n],
                                 work.storage_options) for n in names])
    t_search = time.perf_counter()
    opts = {"k_max": st.k_max}
    found = solve_rows_global_rate(blocks, st.target_bits, st.method, **opts)
    lam = float(found.lam)
    del blocks, found
    release_memory()
    t_search = time.perf_counter() - t_search
    log.info("quantize: λ = %.4g from every %d-th row (%.1f s); quantizing %d tensors", lam,
             every, t_search, len(names))
    task = _remote(_quantize_task, max(1, st.threads))
    refs = [task.remote(model_url, hess_url, work.url, n, i, lam, asdict(st), offsets[n],
                        digests[n], work.storage_options) for i, n in enumerate(names)]
    parts, pending = [], list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        r = _get(done[0])
        parts.append(r)
        if progress:
            progress(r["name"])
    parts.sort(key=lambda r: r["rel"])
    side = 20.0  # bits per level: a 16-bit codebook value + 4 bits of code table (the solver's)
    weights = sum(r["weights"] for r in parts)
    rate = (math.fsum(r["index_bits"] for r in parts)
            + side * sum(r["levels"] for r in parts)) / weights
    workers = _per_process([r["process"] for r in parts])
    return _finish(work, "quantize", key, t0, {r["rel"]: r["output"] for r in parts}, workers,
                   weights=weights, tensors=len(parts), lam=lam, sample_every=every,
                   search_seconds=t_search, rate_bits=rate,
                   distortion=math.fsum(r["distortion"] for r in parts),
                   bytes_read=sum(r["bytes_read"] for r in parts),
                   codes={r["name"]: r["rel"] for r in parts})


def _per_process(procs: list[dict]) -> list[dict]:
    by: dict[int, dict] = {}
    for p in procs:
        cur = by.get(p["pid"])
        if cur is None or p["peak_rss"] > cur["peak_rss"]:
            by[p["pid"]] = p
    return sorted(by.values(), key=lambda p: p["pid"])


def stage_encode(model_url, work: WorkFolder, st: StreamSettings, quant: dict,
                 hf: dict[str, bytes], cpus: int = 2) -> dict:
    """hf: the config and tokenizer files written to hf/ beside the .hwq (name -> bytes)."""
    key = _digest({"quantize": quant["key"], "coder": st.coder,
                   "codes": {n: (r, quant["outputs"][r]["sha256"])
                             for n, r in quant["codes"].items()},
                   "hf": {n: hashlib.sha256(b).hexdigest() for n, b in hf.items()}})
    hit = _cached(work, "encode", key)
    if hit and set(hit["outputs"]) != {HWQ, *(f"{HF}/{n}" for n in hf)}:
        log.warning("encode: recomputing: its manifest lists other outputs")
        hit = None
    if hit:
        return hit
    t0 = time.perf_counter()
    r = _get(_remote(_encode_task, cpus).remote(model_url, work.url, quant["codes"],
                                                 quant["outputs"], hf, asdict(st),
                                                 work.storage_options))
    return _finish(work, "encode", key, t0, r["outputs"], [r["process"]], weights=r["weights"],
                   accounting=r["accounting"], bytes_read=r["bytes_read"])


def stage_decode(model_url, work: WorkFolder, enc: dict, cpus: int = 2) -> dict:
    key = _digest({"encode": {r: d["sha256"] for r, d in enc["outputs"].items()}})
    hit = _cached(work, "decode", key, need=("tensor_sha256",))
    if hit:
        return hit
    t0 = time.perf_counter()
    r = _get(_remote(_decode_task, cpus).remote(work.url, enc["outputs"], work.storage_options))
    return _finish(work, "decode", key, t0, r["outputs"], [r["process"]], weights=r["weights"],
                   tensors=r["tensors"], bytes_read=r["bytes_read"],
                   bytes_written=r["bytes_written"], tensor_sha256=r["tensor_sha256"])


def stage_evaluate(model_url, work: WorkFolder, dec: dict, windows: torch.Tensor, cpus: int = 2
                   ) -> dict:
    """Perplexity of the original and of the decoded folder on `windows`, both streamed one
    block at a time in float32 (GPTQ's protocol: exp of the mean NLL of every predicted
    token)."""
    key = _digest({"decode": {r: d["sha256"] for r, d in dec["outputs"].items()},
                   "windows": _digest(windows.tolist())})
    hit = _cached(work, "evaluate", key)
    if hit:
        return hit
    t0 = time.perf_counter()
    r = _get(_remote(_evaluate_task, cpus).remote(model_url, work.url, windows, dec,
                                                   work.storage_options))
    f = r["figures"]
    return _finish(work, "evaluate", key, t0, r["outputs"], [r["process"]],
                   windows=list(windows.shape), **f,
                   perplexity_ratio=f["decoded_perplexity"] / f["original_perplexity"],
                   bytes_read=f["original_bytes_read"] + f["decoded_bytes_read"])


def one_tensor_decode(work: WorkFolder, name: str) -> dict:
    """Decode one tensor of the .hwq by range reads; bytes read beside what it needs."""
    from pipeline.encode.container import HwqReader

    t0 = time.perf_counter()
    r = HwqReader(work.sub(HWQ), storage_options=work.storage_options)
    header_bytes = r.bytes_read
    t = r.header["tensors"]
    d = next(x for x in t if x["name"] == name)
    own = sum(c[1] for s in ("indices", "positions") if d.get(s) for c in d[s]["chunks"])
    cb = next(c for c in r.header["codebooks"] if c["name"] == d.get("codebook"))
    tables = {c[4] if len(c) > 4 else d[s].get("code_table")
              for s in ("indices", "positions") if d.get(s) for c in d[s]["chunks"]}
    table_bytes = sum(r.header["code_tables"][i]["length"] for i in tables if i is not None)
    a = r.read([name])[name]
    return {"tensor": name, "shape": list(a.shape), "seconds": time.perf_counter() - t0,
            "bytes_read": r.bytes_read, "header_bytes": header_bytes,
            "tensor_section_bytes": own + cb["length"] + table_bytes,
            "file_bytes": r.file_bytes}


def run_streamed(model_url: str, work_url: str, settings: StreamSettings | None = None, *,
                 storage_options: dict | None = None, windows: torch.Tensor | None = None,
                 stages: tuple[str, ...] = ("hessian", "quantize", "encode", "decode"),
                 on_stage: Callable[[str, dict], object] | None = None,
                 progress: Callable[[str], object] | None = None,
                 eval_windows: torch.Tensor | None = None,
                 hf_files: dict[str, bytes] | None = None) -> dict[str, dict]:
    """Run the streamed stages in order (Ray must be initialised); returns their manifests.
    With `eval_windows` (int64 [m, L]) and the decode stage, an evaluate stage follows:
    perplexity of the original and the decoded model, both streamed.
    hf_files: config and tokenizer files (name -> bytes) for hf/ and the decoded folder;
    default: those in the model folder (`stream_inputs.hf_files`)."""
    from pipeline.executor import _smallest_node_cpus
    from pipeline.stream_inputs import hf_files as model_hf_files

    st = settings or StreamSettings()
    work = WorkFolder(work_url, storage_options)
    model = WeightsFolder(model_url, storage_options)
    model_key = _model_digest(model)
    # A whole-stage task asks for 2 CPUs, or fewer on a smaller node (more would never run).
    cpus = max(1, min(2, _smallest_node_cpus()))
    out: dict[str, dict] = {}
    out["hessian"] = stage_hessian(model_url, work, st, model_key, windows, cpus,
                                   block_targets(model))
    if on_stage:
        on_stage("hessian", out["hessian"])
    if "quantize" in stages:
        out["quantize"] = stage_quantize(model_url, work, st, out["hessian"], progress)
        if on_stage:
            on_stage("quantize", out["quantize"])
    if "encode" in stages:
        hf = model_hf_files(model_url, storage_options) if hf_files is None else hf_files
        out["encode"] = stage_encode(model_url, work, st, out["quantize"], hf, cpus)
        if on_stage:
            on_stage("encode", out["encode"])
    if "decode" in stages:
        out["decode"] = stage_decode(model_url, work, out["encode"], cpus)
        if on_stage:
            on_stage("decode", out["decode"])
        if eval_windows is not None:
            out["evaluate"] = stage_evaluate(model_url, work, out["decode"], eval_windows,
                                             cpus)
            if on_stage:
                on_stage("evaluate", out["evaluate"])
    return out
