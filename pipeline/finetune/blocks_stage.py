"""The `finetune` stage of a per-tensor run: block-wise codebook fine-tuning, a Ray task per
decoder block, in either residency.

Block b's task reads block b from the model's source (one block resident), computes the
unquantized model's output of the block from the unquantized chain's input (the target), and
trains the block's codebooks so that the quantized block maps the quantized chain's input to
that target (`pipeline.finetune.blockwise.train_block`). It returns both chains' outputs
(and the per-block arguments the model passes its blocks), which the driver hands to the task
of block b + 1 through Ray's object store: 2 × windows × tokens × hidden floats (16 MB for
8 windows of 128 tokens at hidden 4096), never recomputed while the run lives. The blocks run
in order: block b + 1's input depends on block b's fine-tuned codebooks.

Outputs (stage folder):

- ``codebooks/b<b>.safetensors`` per block with quantized tensors: the fine-tuned codebooks
  (float32 [R, K], fp16-exact), keyed by the full tensor names; the indices stay the quantize
  stage's. Tensors outside the blocks (a quantized embedding or head) keep the quantize
  stage's codebooks.
- ``codebooks.json``: {"codebooks": {tensor: file}} for every fine-tuned tensor; the encode
  stage reads a tensor's codebooks there, its indices from the quantize stage
  (`pipeline.quantize.codes.TensorCodes`).
- ``units/b<b>.json``: block b's record (its file's digest, its errors before and after, and
  whether the trained values were reverted to the quantize stage's for not helping).

Resume. A killed run keeps the blocks whose records verify. The first task of the rerun
starts from the embeddings and replays the finished blocks forward with their recorded
codebooks (no training: b forwards over the windows, once), then trains on; a block that
finished is never trained again.

Report. Per block: the relative output error ‖out − y‖² / ‖y‖² on the training and held-out
windows before and after, whether it was kept; and the perplexity of the held-out windows
through the unquantized model, the quantized model as the quantize stage left it, and the
fine-tuned one (held-out calibration windows, never the evaluation texts), so a fine-tune
that made the model worse shows.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch

from pipeline.config import RunConfig
from pipeline.executor import call, task_threads
from pipeline.graph import StageContext

__all__ = ["run_finetune_blockwise", "FILES"]

FILES = "codebooks.json"
_BATCH = 4  # windows per forward outside training (no-grad chains)


def _block_rel(b: int) -> str:
    return f"codebooks/b{b:05d}.safetensors"


def _check_fields(b: int, names: list[str]):
    def check(f: dict) -> str | None:
        if f.get("block") != b or f.get("tensors") != names:
            return f"it is not the record of block {b} and its tensors"
        errs = f.get("errors")
        if not isinstance(errs, dict) or not all(
                type(v) in (int, float) and math.isfinite(v) for v in errs.values()):
            return "its errors are not finite numbers"
        if type(f.get("reverted")) is not bool or type(f.get("steps")) is not int:
            return "it has no reverted flag or step count"
        return None

    return check


def _block_codes(codes, names: list[str]) -> dict[str, tuple]:
    """(indices, codebooks, mask or None, rotation seed or None) of a block's tensors as the
    quantize stage wrote them."""
    return {n: (*codes.read_masked(n), codes.rotation(n)) for n in names}


def _with(given: dict, books: dict[str, np.ndarray]) -> dict:
    """`given`'s indices (and masks) with the codebooks `books` (a block file of this stage,
    its rows checked by `read_tuned`, its bytes by the unit record's digest)."""
    return {n: (idx, books[n], *rest) for n, (idx, _, *rest) in given.items()}


def _relative(lm, b: int, codes: dict) -> dict:
    p = lm.block_prefix(b)
    return {n[len(p):]: v for n, v in codes.items()}


def _block_task(cfg: RunConfig, out, url: str, opts, codes, plan: list[list[str]],
                windows: torch.Tensor, n_val: int, b: int, state, done: dict[int, str]):
    """Fine-tune block b; returns (the state for block b + 1, block b's record)."""
    from safetensors.torch import save

    from pipeline.finetune.blockwise import run_quantized, train_block
    from pipeline.memory import process_peaks
    from pipeline.models.stream import StreamedLM
    from pipeline.quantize.codes import read_tuned
    from pipeline.store import canonical_safetensors
    from pipeline.units import Units

    task_threads()
    ft = cfg.finetune
    # float32 compute; the Linears keep a 16-bit checkpoint's weights (the targets y are the
    # same products, and the quantized forward replaces those weights anyway)
    lm = StreamedLM(url, opts, dtype=torch.float32, stored_linears=True)
    n = int(windows.shape[0])
    t0 = time.perf_counter()
    if state is None:  # the first task of a run: from the embeddings, replaying done blocks
        hidden, calls = lm.block_inputs(windows)
        h_f, h_q, h_0 = hidden, hidden.clone(), hidden[n - n_val:].clone()
        for j in range(b):
            block = lm.block(j)
            tuned = read_tuned(out, done[j], plan[j], codes.shapes) if plan[j] else None
            h_f = lm.run_block(j, h_f, calls[j], batch=_BATCH)
            given = _block_codes(codes, plan[j])
            h_q = run_quantized(block, calls[j], h_q,
                                _relative(lm, j, _with(given, tuned) if tuned else given), _BATCH)
            h_0 = run_quantized(block, calls[j], h_0, _relative(lm, j, given), _BATCH)
            lm.unload(block)
    else:
        h_f, h_q, h_0, calls = state
    replay_s = time.perf_counter() - t0
    block = lm.block(b)
    y = lm.run_block(b, h_f, calls[b], batch=_BATCH)
    names = plan[b]
    given = _block_codes(codes, names)
    res = train_block(block, calls[b], h_q, y, _relative(lm, b, given), steps=ft.block_steps,
                      lr=ft.block_lr, batch=ft.block_batch, validation=ft.block_validation,
                      seed=cfg.seed * 1_000_003 + b)
    tuned = {lm.block_prefix(b) + k: v for k, v in res.codebooks.items()}
    h_q = run_quantized(block, calls[b], h_q, _relative(lm, b, _with(given, tuned)), _BATCH)
    h_0 = run_quantized(block, calls[b], h_0, _relative(lm, b, given), _BATCH)
    lm.unload(block)
    outputs = []
    if names:
        rel = _block_rel(b)
        out.write_bytes(rel, canonical_safetensors(save(
            {k: torch.from_numpy(v) for k, v in tuned.items()}, metadata={"block": str(b)})))
        outputs.append(rel)
    fields: dict[str, Any] = {
        "block": b, "tensors": names, "reverted": res.reverted, "steps": res.steps,
        "errors": {k: float(v) for k, v in res.errors.items()},
        "final_loss": res.losses[-1] if res.losses else None,
        "seconds": round(time.perf_counter() - t0, 3), "replay_seconds": round(replay_s, 3),
        "process": process_peaks()}
    if b == len(plan) - 1 and n_val:  # the top: held-out perplexities, for the report
        val = windows[n - n_val:]
        with torch.no_grad():
            tokens = n_val * (val.shape[1] - 1)
            fields["validation_perplexity"] = {
                k: math.exp(float(lm.window_nll(h, val).double().sum()) / tokens)
                for k, h in (("unquantized", y[n - n_val:]), ("quantized", h_0),
                             ("finetuned", h_q[n - n_val:]))}
        lm.release_head()
    rec = Units(out).record(f"b{b:05d}", outputs, **fields)
    return (y, h_q, h_0, calls), rec


def run_finetune_blockwise(ctx: StageContext, codes=None) -> dict[str, Any]:
    """Block-wise fine-tuning of the quantize stage's codes. codes: where they are read
    (default: the per-tensor stages' `TensorCodes`; `finetune.mode: both` passes a
    whole-model artifact's `ModelCodes`)."""
    from pipeline import progress
    from pipeline.finetune.blockwise import split_windows
    from pipeline.hessian.shards import block_of, num_blocks
    from pipeline.models.source import source_url
    from pipeline.models.weights import WeightsFolder
    from pipeline.quantize.codes import TensorCodes
    from pipeline.units import Units
    from pipeline.workload import WINDOWS

    cfg, out, ft = ctx.cfg, ctx.out, ctx.cfg.finetune
    t0 = time.perf_counter()
    load, quant = ctx.inputs["load"], ctx.inputs["quantize"]
    codes = codes if codes is not None else TensorCodes(quant)
    url, opts = source_url(cfg, load)
    B = num_blocks(WeightsFolder(url, opts))
    plan: list[list[str]] = [[] for _ in range(B)]
    for n in codes.codes:
        b = block_of(n)
        if b is not None and b < B:
            plan[b].append(n)
    windows = load.read_safetensors(WINDOWS)["calibration"]
    n_train, n_val = split_windows(int(windows.shape[0]), ft.block_validation)
    units = Units(out)
    done: dict[int, str] = {}
    recs: dict[int, dict] = {}
    for b in range(B):  # the finished prefix: block b's input needs every block before it
        rec = units.done(f"b{b:05d}", [_block_rel(b)] if plan[b] else [],
                         _check_fields(b, plan[b]))
        if rec is None:
            break
        recs[b] = rec
        done[b] = _block_rel(b)
    start = len(recs)
    ctx.log.info("finetune: block-wise, %d blocks (%d with quantized tensors), %d calibration "
                 "windows (%d held out), %d steps of %d windows per block; %d blocks reused",
                 B, sum(1 for p in plan if p), windows.shape[0], n_val, ft.block_steps,
                 ft.block_batch, start)
    bar = progress.bar(B - start, "finetune blocks", unit="block")
    state, retried = None, 0
    try:
        for b in range(start, B):
            state, rec = call(_block_task, cfg, out, url, opts, codes, plan, windows, n_val, b,
                              state, done, cpus="worker", gpus="task")
            recs[b], done[b] = rec, _block_rel(b)
            retried += rec.get("attempt", 0)
            e = rec["fields"]["errors"]
            ctx.log.info("finetune: block %d: output error %s → %s%s", b,
                         _fmt(e.get("val_before", e["train_before"])),
                         _fmt(e.get("val_after", e["train_after"])),
                         " (reverted: the trained values did not help)" if rec["fields"]["reverted"]
                         else "")
            bar.update(1)
    finally:
        bar.close()
    del state
    files = {n: _block_rel(b) for b in range(B) for n in plan[b]}
    out.write_json(FILES, {"codebooks": files})
    blocks = [{"block": b, "tensors": len(plan[b]), "reverted": recs[b]["fields"]["reverted"],
               "errors": recs[b]["fields"]["errors"], "steps": recs[b]["fields"]["steps"],
               "seconds": recs[b]["fields"]["seconds"]} for b in range(B)]
    top = recs[B - 1]["fields"].get("validation_perplexity") if B else None
    metrics: dict[str, Any] = {"finetune": {
        "mode": "blockwise", "residency": cfg.model.residency, "blocks": blocks,
        "windows": int(windows.shape[0]), "validation_windows": n_val,
        "steps_per_block": ft.block_steps, "lr": ft.block_lr, "batch": ft.block_batch,
        "reverted_blocks": sum(1 for x in blocks if x["reverted"]),
        "validation_perplexity": top,
        "units": {"total": B, "reused": start, "computed": B - start, "retried": retried},
        "seconds": round(time.perf_counter() - t0, 3)}}
    if top:
        metrics["finetuned_validation_perplexity"] = top["finetuned"]
        if top["finetuned"] > top["quantized"]:
            ctx.log.warning("finetune: the fine-tuned model's perplexity on the held-out "
                            "calibration windows (%.4g) is above the quantized model's (%.4g)",
                            top["finetuned"], top["quantized"])
    return metrics


def _fmt(v: float) -> str:
    return f"{v:.4g}"
