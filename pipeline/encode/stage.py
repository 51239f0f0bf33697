"""The `encode` stage: the compressed model as one `.hwq` file, and its exact accounting.

Reads the quantized-model artifact (with the fine-tuned codebooks when fine-tuning ran), the
masks and the raw tensors (biases) of the model stage, and writes `model.hwq` (docs/FORMAT.md)
through the store's URL — chunks are entropy-coded as Ray tasks (Huffman, rANS or the
context coder: encode.coder/positions/indices). It then decodes the file it
wrote, checks the weights equal the quantized model's bit for bit, and measures the accuracy
of the decoded model: the ratio reported is the one of a file that demonstrably works.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from pipeline.config import RunConfig
from pipeline.config_checks import per_tensor
from pipeline.encode.entries import dtype_of, quantized_bits, raw_array, raw_cast
from pipeline.executor import call, ray_map, task_threads
from pipeline.graph import Stage, StageContext
from pipeline.quantize.artifacts import QuantizedModel
from pipeline.store import StageDir

__all__ = ["ENCODE", "FILE", "entries_for"]

FILE = "model.hwq"


def entries_for(state: dict[str, torch.Tensor], qm: QuantizedModel,
                masks: dict[str, torch.Tensor], *, keep_dtype: bool = False,
                raw_dtype: str = "keep"):
    """TensorEntry list in model order + codebooks dict for `write_hwq`. keep_dtype: every
    tensor decodes to its own dtype (loaded models); else float32 (LeNet-5). raw_dtype: see
    :func:`raw_cast` (applies to the tensors stored as is)."""
    from pipeline.encode.container import TensorEntry

    entries = []
    for name, t in state.items():
        if name in qm.assignment:
            idx = qm.indices[name].reshape(-1).numpy().astype(np.int64)
            m = masks[name].reshape(-1).numpy() if name in masks else None
            codes = idx[m] if m is not None else idx
            k = qm.codebooks[qm.assignment[name]].shape[-1]
            entries.append(TensorEntry.quantized(
                name, tuple(t.shape), codes.astype(np.uint32 if k > 65536 else
                                                   np.uint16 if k > 256 else np.uint8),
                qm.assignment[name], mask=m,
                dtype=dtype_of(t) if keep_dtype else "float32"))
        elif keep_dtype or raw_dtype != "keep":
            a, dt = raw_array(raw_cast(t, raw_dtype))
            entries.append(TensorEntry.raw_tensor(name, a, dt))
        else:
            entries.append(TensorEntry.raw_tensor(name, t.detach().float().numpy()))
    codebooks = {k: v.float().numpy() for k, v in qm.codebooks.items()}
    return entries, codebooks


def _decoded_state(out: StageDir, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of the file this stage just wrote, each checked bit for bit (and dtype)
    against what it must decode to."""
    from pipeline.encode.container import read_hwq

    # The file was written by this stage a moment ago: allow exactly what it must decode to
    # (the default limits are for files of unknown origin, docs/SECURITY.md).
    want = sum(t.numel() * t.element_size() for t in expected.values())
    decoded = read_hwq(out.url(FILE), storage_options=out.store.storage_options,
                       max_output_bytes=want)
    state = {}
    for name, t in expected.items():
        got = torch.from_numpy(np.array(decoded[name]))
        if t.dtype == torch.bfloat16 and got.dtype != torch.bfloat16:  # bf16 comes as bits
            got = got.view(torch.int16).view(torch.bfloat16)
        if tuple(got.shape) != tuple(t.shape) or got.dtype != t.dtype or not torch.equal(got, t):
            raise RuntimeError(f"{out.url(FILE)}: tensor {name} does not decode to the "
                               "quantized weights; the encoder is broken")
        state[name] = got
    return state


def _decode_and_evaluate(cfg: RunConfig, out: StageDir, expected: dict[str, torch.Tensor]):
    from pipeline.data import load_split
    from pipeline.evaluate import accuracy_of_state

    task_threads()
    return accuracy_of_state(cfg.model.name, _decoded_state(out, expected),
                             load_split(cfg.data.root, "test"))


def _run(ctx: StageContext) -> dict:
    """The file, then the width it serves at (from its header: quantize.serve_bits' check)."""
    from pipeline.encode.container import inspect_hwq
    from pipeline.encode.inspection import serve_widths

    metrics = _write_and_check(ctx)
    enc = metrics.get("encode")
    if isinstance(enc, dict):
        enc["serve"] = serve_widths(inspect_hwq(
            ctx.out.url(FILE), storage_options=ctx.out.store.storage_options))
    return metrics


def _write_and_check(ctx: StageContext) -> dict:
    from pipeline.encode.container import write_hwq
    from pipeline.train.stage import load_masks, load_model_state, model_stage

    cfg, out, e = ctx.cfg, ctx.out, ctx.cfg.encode
    if per_tensor(cfg):
        from pipeline.encode.tensors_stage import run_encode_streamed

        return run_encode_streamed(ctx)
    if not cfg.model.trained_here:
        return _run_loaded(ctx)
    t0 = time.perf_counter()
    src = ctx.inputs[model_stage(cfg)]
    state = load_model_state(src)
    masks = load_masks(ctx.inputs.get("prune"))
    qm = QuantizedModel.read(ctx.inputs["quantize"], codebooks_from=ctx.inputs.get("finetune"))
    entries, codebooks = entries_for(state, qm, masks, raw_dtype=e.raw_dtype)
    acct = write_hwq(out.url(FILE), entries, codebooks, code_sharing=e.code_sharing,
                     fixed_length=e.fixed_length, chunk_symbols=e.chunk_symbols,
                     coder=e.coder, positions=e.positions, indices=e.indices,
                     metadata={"model": cfg.model.name, "scope": qm.scope, "method": qm.method},
                     storage_options=out.store.storage_options, map_fn=ray_map)
    file_bytes = out.store.size(out.rel(FILE))
    if file_bytes != acct["file_bytes"] or sum(acct["bits"].values()) != 8 * file_bytes:
        raise RuntimeError(f"accounting of {out.url(FILE)} does not add up to its size")
    expected = qm.dense_state(state, masks)
    expected = {n: t if n in qm.assignment else raw_cast(t, e.raw_dtype)
                for n, t in expected.items()}
    acc = call(_decode_and_evaluate, cfg, out, expected, cpus="worker", gpus="task")
    original = 4 * sum(t.numel() for t in state.values())
    # Same file with fixed-length index codes: swap the coded index bits for fixed ones.
    fixed_bits = 8 * file_bytes - acct["bits"]["indices"] + acct["fixed_length_index_bits"]
    return {
        "decoded_accuracy": acc,
        "encode": {
            "file": out.url(FILE),
            "file_bytes": file_bytes,
            "original_bytes": original,
            "compression_ratio": original / file_bytes,
            "ratio_fixed_length": 8 * original / fixed_bits,
            "fixed_length": e.fixed_length,
            "bits": acct["bits"],
            "index_entropy_bits": acct["index_entropy_bits"],
            "position_entropy_bits": acct["position_entropy_bits"],
            "gap_entropy_bits": acct["gap_entropy_bits"],
            "index_bits_per_weight": acct["index_bits_per_weight"],
            "position_bits_per_weight": acct["position_bits_per_weight"],
            "coders": {"static": e.coder, "positions": e.positions, "indices": e.indices},
            "n_kept": acct["n_kept"],
            "seconds": round(time.perf_counter() - t0, 3),
        },
    }


def _decode_and_evaluate_loaded(cfg: RunConfig, out: StageDir, src: StageDir,
                                expected: dict[str, torch.Tensor]) -> dict:
    from pipeline.workload import MODEL_JSON, Workload, load_state

    task_threads()
    state = _decoded_state(out, expected)
    wl = Workload(cfg)
    model = wl.model_from(src)
    load_state(model, state, src.read_json(MODEL_JSON).get("tied", {}))
    return wl.evaluate(model, src)


def _run_loaded(ctx: StageContext) -> dict:
    """A loaded model: tensors keep their source dtype, per-row codebooks are stored in fp16
    (ragged), and the decoded model is scored with the run's metric."""
    from pipeline.encode.container import write_hwq
    from pipeline.train.stage import load_masks, model_stage
    from pipeline.workload import MODEL_JSON, Workload

    cfg, out, e = ctx.cfg, ctx.out, ctx.cfg.encode
    t0 = time.perf_counter()
    src = ctx.inputs[model_stage(cfg)]
    state = src.read_safetensors("model.safetensors")
    masks = load_masks(ctx.inputs.get("prune"))  # a model of your own, pruned
    qm = QuantizedModel.read(ctx.inputs["quantize"], codebooks_from=ctx.inputs.get("finetune"))
    masks = qm.all_masks(masks)  # a causal LM's, chosen by one-shot pruning
    entries, codebooks = entries_for(state, qm, masks, keep_dtype=True, raw_dtype=e.raw_dtype)
    acct = write_hwq(out.url(FILE), entries, codebooks, code_sharing=e.code_sharing,
                     fixed_length=e.fixed_length, chunk_symbols=e.chunk_symbols,
                     coder=e.coder, positions=e.positions, indices=e.indices,
                     metadata={"model": cfg.model.name, "scope": qm.scope, "method": qm.method},
                     storage_options=out.store.storage_options, map_fn=ray_map,
                     # per-row codebooks are fp16-exact (their rows' bits count them so);
                     # a network or layer codebook is a few float32 values
                     codebook_dtype="float16" if qm.scope in ("channel", "group")
                     else "float32")
    file_bytes = out.store.size(out.rel(FILE))
    if file_bytes != acct["file_bytes"] or sum(acct["bits"].values()) != 8 * file_bytes:
        raise RuntimeError(f"accounting of {out.url(FILE)} does not add up to its size")
    # What `hwq decode --hf-out` puts beside the weights (not part of the file's bits).
    for rel in (src.outputs or {}):
        if rel.startswith("hf/"):
            out.write_bytes(rel, src.read_bytes(rel))
    expected = {n: raw_cast(t, e.raw_dtype) for n, t in state.items()}
    expected.update(qm.dense_state({n: state[n] for n in qm.assignment}, masks))
    ev = call(_decode_and_evaluate_loaded, cfg, out, src, expected, cpus="worker", gpus="task")
    n_q = sum(state[n].numel() for n in qm.assignment)
    qbits = quantized_bits(acct, len(qm.assignment), len(entries))
    source = sum(t.numel() * t.element_size() for t in state.values())
    n_all = sum(t.numel() for t in state.values())
    fp32 = 4 * n_all
    emb = embedding_bits(out, src.read_json(MODEL_JSON).get("embeddings", []), state)
    return {
        **Workload(cfg).metric_fields("decoded", ev),
        "bits_per_weight": qbits / max(n_q, 1),
        "bits_per_weight_all": 8 * file_bytes / max(n_all, 1),
        "encode": {
            "file": out.url(FILE),
            "file_bytes": file_bytes,
            "quantized_params": n_q,
            "params": n_all,
            "bits_per_weight": qbits / max(n_q, 1),
            # The whole file over every parameter (tied weights once), raw tensors included.
            "bits_per_weight_all": 8 * file_bytes / max(n_all, 1),
            # The decoder Linears alone (the quantized tensors less the embeddings).
            "bits_per_weight_linears": (qbits - emb["bits"]) / max(n_q - emb["params"], 1),
            "embeddings": emb,
            "index_bits_per_weight": acct["bits"]["indices"] / max(n_q, 1),
            "codebook_bits_per_weight": acct["bits"]["codebooks"] / max(n_q, 1),
            "raw_tensor_bytes": acct["bits"]["raw_tensors"] // 8,
            "original_bytes": source,
            "compression_ratio": source / file_bytes,
            "compression_ratio_vs_fp32": fp32 / file_bytes,
            "bits": acct["bits"],
            "index_entropy_bits": acct["index_entropy_bits"],
            "n_kept": acct["n_kept"],
            "seconds": round(time.perf_counter() - t0, 3),
        },
    }


def embedding_bits(out: StageDir, names: list[str], state: dict[str, torch.Tensor]) -> dict:
    """What the quantized embeddings (and head) cost in the file just written: their index
    and position streams plus their codebooks (the shared code tables are not split)."""
    from pipeline.encode.container import HwqReader

    if not names:
        return {"names": [], "params": 0, "bits": 0, "bits_per_weight": None}
    rows = HwqReader(out.url(FILE), storage_options=out.store.storage_options).inspect()
    want = set(names)
    bits = 8 * sum(r["bytes"] for r in rows
                   if r["kind"] in ("quantized", "codebook") and r["name"] in want)
    params = sum(state[n].numel() for n in names)
    return {"names": list(names), "params": params, "bits": bits,
            "bits_per_weight": bits / max(params, 1)}


def _inputs(cfg: RunConfig) -> tuple[str, ...]:
    from pipeline.train.stage import model_stage

    ins = [model_stage(cfg), "quantize"]
    if cfg.finetune.enabled:
        ins.append("finetune")
    return tuple(ins)


ENCODE = Stage(
    name="encode",
    version=2,  # 2: compressed .hwq header
    inputs=_inputs,
    sections=lambda cfg: {"encode": cfg.encode.model_dump(mode="json")},
    run=_run,
    enabled=lambda cfg: cfg.encode.enabled and cfg.quantize.enabled,
    headline=("decoded_accuracy", "decoded_perplexity", "bits_per_weight"),
    outputs=lambda cfg: ("model.hwq",),
)
