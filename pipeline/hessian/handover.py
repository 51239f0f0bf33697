"""The streamed Hessian's units: block groups hand their activations over through the work folder.

A streamed model's Hessian runs P data partitions × G groups of consecutive decoder blocks as
Ray tasks (`pipeline.hessian.streamed_stage` schedules them). A group gets its input
activations **handed over**: the unit below it writes them to the stage's work folder
(``handover/p{p}/``, float32 for the Fisher, the checkpoint's dtype for the activation
statistics) and the unit of the group reads them back, checked against the writer's unit
record. Each partition is a chain of units:

``activation``  unit A(p, g) reads the input of its first block, runs its blocks forward with
    the statistics hooks, writes its partial sums (``partials/p{p}-g{g}.parquet``) and its last
    block's output (the next group's input).
``fisher``  a forward sweep up, then a backward sweep down. F(p, g) runs its blocks forward and
    writes every block's input (``x{i}``; the last group also the top's input, ``top``).
    B(p, g) starts from the cotangent at its last block's output (the last group computes it
    at the top: the loss, the head's gradients), reloads each block, recomputes its forward
    from the stored input one window at a time, squares the window's parameter gradients into
    the partial sums and writes the cotangent at its first block's input (``dx{i}``) for the
    group below.

Each block then runs forward once and backward once per partition: 4 block passes (a forward
≈ 1, a backward with recomputation ≈ 3), against (2G + 2) when every unit recomputed its
input from the embeddings and back-propagated from the top itself. The price is the files:
a window's hidden states per block ([L, d] float32: 2 MB for 128 tokens of a 4096-wide model),
all blocks' kept until the stage ends (a partition of 4 such windows over 32 blocks: 270 MB),
and the groups of one partition run one after another (partitions run side by side).

Units and their records (pipeline/units.py; a rerun repeats only unrecorded units):
``p{p}-g{g}`` the partial sums (removed by the group's reduce), ``p{p}-g{g}-fwd`` the
forward's files, ``p{p}-g{g}-down`` the cotangent handed down. `plan_partition` decides,
from the records a rerun finds, which units must run again.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import torch

from pipeline.config import RunConfig

__all__ = ["HANDOVER", "plan_partition", "activation_unit", "fisher_forward_unit",
           "fisher_backward_unit", "forward_outputs", "segments", "x_rel", "top_rel", "dx_rel",
           "partial_rel"]

HANDOVER = "handover"


def x_rel(p: int, i: int) -> str:
    """The input of block i for partition p's windows."""
    return f"{HANDOVER}/p{p}/x{i}.safetensors"


def top_rel(p: int) -> str:
    """The last block's output (the final norm's input) for partition p's windows."""
    return f"{HANDOVER}/p{p}/top.safetensors"


def dx_rel(p: int, i: int) -> str:
    """The loss's cotangent at block i's input for partition p's windows."""
    return f"{HANDOVER}/p{p}/dx{i}.safetensors"


def partial_rel(p: int, g: int) -> str:
    return f"partials/p{p}-g{g}.parquet"


def plan_partition(need: list[bool], fwd_done: list[bool], down_done: list[bool], *,
                   fisher: bool, top_below: bool = False) -> tuple[list[bool], list[bool]]:
    """(forward units to run, backward units to run) of one partition's G groups.

    need[g]: group g's partial sums are wanted (not recorded, group not reduced);
    fwd_done[g]: the files group g's forward writes are recorded; down_done[g]: the cotangent
    at group g's first block is recorded. `top_below`: group 0's backward reads the top's
    input too (an embedding tied to the head: its head half of the gradient).

    Activation (fisher=False): the forward units are the units; one runs when its sums are
    wanted, or when a group above runs and its input is not recorded. Fisher: a backward unit
    runs when its sums are wanted or the group below runs and its cotangent is not recorded;
    a forward unit runs when its files are not recorded and a backward of its group or of the
    group above (its first input is this group's output), or the forward above, needs them."""
    G = len(need)
    if not fisher:
        run = [False] * G
        for g in reversed(range(G)):
            run[g] = need[g] or (g + 1 < G and run[g + 1] and not fwd_done[g])
        return run, [False] * G
    back = [False] * G
    for g in range(G):
        back[g] = need[g] or (g > 0 and back[g - 1] and not down_done[g])
    fwd = [False] * G
    for g in reversed(range(G)):
        wanted = (back[g] or (g + 1 < G and (back[g + 1] or fwd[g + 1]))
                  or (g == G - 1 and top_below and back[0]))
        fwd[g] = wanted and not fwd_done[g]
    return fwd, back


# -- the unit tasks (run in Ray workers) ---------------------------------------------------

def _read(out, rel: str, recorded: dict[str, dict]) -> torch.Tensor:
    """A handed-over tensor, read as a file a manifest lists: no further than the size its
    writer's unit record gives, and refused (ArtifactError) unless its sha256 is the record's."""
    if rel not in recorded:
        raise RuntimeError(f"hessian: {out.url(rel)} is read before a unit recorded it")
    return dataclasses.replace(out, outputs={rel: recorded[rel]}).read_safetensors(rel)["x"]


def _write(out, rel: str, t: torch.Tensor) -> str:
    out.write_safetensors(rel, {"x": t})
    return rel


def _table(out, rel: str, estimator: str, n: int):
    from pipeline.hessian.table import TensorTableWriter

    return TensorTableWriter(out.url(rel), out.store.storage_options or None,
                             metadata={"estimator": estimator, "n": n})


def _result(unit: str, lm, records: dict[str, dict]) -> dict:
    from pipeline.memory import process_peaks

    return {"unit": unit, "records": records, "bytes_read": lm.weights.bytes_read,
            "process": process_peaks()}


def activation_unit(cfg: RunConfig, out, url: str, opts: dict | None, windows: torch.Tensor,
                    p: int, g: int, seg: range, rng: range, names: list[str], sums: bool,
                    last: bool, recorded: dict[str, dict]) -> dict:
    """A(p, g): blocks `seg` forward from the input handed over (block 0: the embeddings),
    E[x²] sums of the tensors of blocks `rng` (and the head's) into the partial when `sums`,
    the output handed to the next group unless `last`."""
    from pipeline.executor import task_threads
    from pipeline.hessian.stream import _targets_by_block, activation_range, activation_top_names
    from pipeline.models.stream import StreamedLM
    from pipeline.units import Units

    task_threads()
    lm = StreamedLM(url, opts, dtype="stored")
    hidden, calls = lm.block_inputs(windows)
    if seg.start > 0:
        hidden = _read(out, x_rel(p, seg.start), recorded)
    n = int(windows.numel())
    by = ({i: v for i, v in _targets_by_block(lm, names).items() if i in rng} if sums else {})
    top = activation_top_names(lm, names, rng) if sums else []
    records: dict[str, dict] = {}
    with contextlib.ExitStack() as stack:  # a failed unit's partial is aborted, not published
        table = stack.enter_context(_table(out, partial_rel(p, g), "activation", n)) if sums else None
        hidden = activation_range(lm, hidden, calls, seg, by,
                                  (lambda k, v, c: table.add(k, v)) if sums else (lambda *a: None),
                                  n, top=top, need_output=not last)
        if not last:
            rel = _write(out, x_rel(p, seg.stop), hidden)
            records[f"p{p}-g{g}-fwd"] = Units(out).record(f"p{p}-g{g}-fwd", [rel])
        if table is not None:
            table.close()
            records[f"p{p}-g{g}"] = Units(out).record(
                f"p{p}-g{g}", [partial_rel(p, g)], n=n, tensor_sha256=table.tensor_sha256)
    return _result(f"p{p}-g{g}", lm, records)


def _fisher_lm(url: str, opts: dict | None):
    from pipeline.models.stream import StreamedLM

    # The Fisher's gradients in float32, from blocks whose Linears keep their 16-bit weights.
    return StreamedLM(url, opts, dtype=torch.float32, stored_linears=True)


def _check_top(lm, seg: range, last: bool) -> None:
    if seg.stop > len(lm.layers) or (last and seg.stop != len(lm.layers)):
        raise ValueError(f"the hessian stage planned blocks up to {seg.stop}, the model has "
                         f"{len(lm.layers)}: the model changed since it was loaded; rerun")


def fisher_forward_unit(cfg: RunConfig, out, url: str, opts: dict | None, windows: torch.Tensor,
                        p: int, g: int, seg: range, last: bool, recorded: dict[str, dict]) -> dict:
    """F(p, g): blocks `seg` forward (the last group: to the model's top) from the input
    handed over (block 0: the embeddings), every block's input written, and the output: the
    next group's input, or at the top the final norm's input."""
    from pipeline.executor import task_threads
    from pipeline.hessian.stream import forward_range
    from pipeline.units import Units

    task_threads()
    lm = _fisher_lm(url, opts)
    _check_top(lm, seg, last)
    hidden, calls = lm.block_inputs(windows)
    if seg.start > 0:
        hidden = _read(out, x_rel(p, seg.start), recorded)
    written: list[str] = []

    def keep(i: int, h: torch.Tensor) -> None:
        if i > seg.start or seg.start == 0:  # a later group's first input is its writer's
            written.append(_write(out, x_rel(p, i), h))

    hidden = forward_range(lm, hidden, calls, seg, keep)
    written.append(_write(out, top_rel(p) if last else x_rel(p, seg.stop), hidden))
    rec = Units(out).record(f"p{p}-g{g}-fwd", written)
    return _result(f"p{p}-g{g}-fwd", lm, {f"p{p}-g{g}-fwd": rec})


def fisher_backward_unit(cfg: RunConfig, out, url: str, opts: dict | None, windows: torch.Tensor,
                         p: int, g: int, seg: range, rng: range, names: list[str], sums: bool,
                         last: bool, recorded: dict[str, dict]) -> dict:
    """B(p, g): blocks `seg` backward from the cotangent handed down (the top: computed from
    the loss); the squared per-window gradients of the tensors of blocks `rng` (and the head's
    and the embedding's, when the group holds them) into the partial when `sums`; the
    cotangent at the first block's input handed down unless it is block 0."""
    from pipeline.executor import task_threads
    from pipeline.hessian.stream import (
        _targets_by_block,
        _TopGrads,
        embedding_roles,
        fisher_backward,
        fisher_top,
    )
    from pipeline.units import Units

    task_threads()
    lm = _fisher_lm(url, opts)
    _check_top(lm, seg, last)
    _, calls = lm.block_inputs(windows)
    n = int(windows.shape[0])
    emb, head = embedding_roles(lm, names) if sums else (None, None)
    emb = emb if seg.start == 0 else None
    head = head if last else None
    records: dict[str, dict] = {}
    with contextlib.ExitStack() as stack:  # a failed unit's partial is aborted, not published
        table = stack.enter_context(_table(out, partial_rel(p, g), "fisher", n)) if sums else None
        emit = (lambda k, v, c: table.add(k, v)) if sums else (lambda *a: None)
        top = None
        if last:
            cot, top = fisher_top(lm, windows, _read(out, top_rel(p), recorded), head,
                                  emb if lm.tied else None, emit)
        else:
            cot = _read(out, dx_rel(p, seg.stop), recorded)
            if emb is not None and lm.tied:  # the head's half of the tied weight's gradient
                _, top = fisher_top(lm, windows, _read(out, top_rel(p), recorded), None, emb, emit)
            elif emb is not None:
                top = _TopGrads(lm, windows, None, None)
        want = ({i: v for i, v in _targets_by_block(lm, names).items() if i in rng}
                if sums else {})
        down = fisher_backward(lm, calls, seg, cot, lambda i: _read(out, x_rel(p, i), recorded),
                               want, emit, pass_down=seg.start > 0 or emb is not None)
        if seg.start > 0:
            rel = _write(out, dx_rel(p, seg.start), down)
            records[f"p{p}-g{g}-down"] = Units(out).record(f"p{p}-g{g}-down", [rel])
        if emb is not None:
            emit(emb, top.embedding_sums(down).numpy(), n)
        if table is not None:
            table.close()
            records[f"p{p}-g{g}"] = Units(out).record(
                f"p{p}-g{g}", [partial_rel(p, g)], n=n, tensor_sha256=table.tensor_sha256)
    return _result(f"p{p}-g{g}", lm, records)


def segments(groups: list[tuple[range, Any]], *, top: int | None) -> list[range]:
    """The blocks each group's units run: from its first block (block 0 for the first group)
    to the next group's first block; the last group's to its range's end, or, given `top`
    (the model's block count: the Fisher's loss is at the top), to the top."""
    out = []
    for g, (rng, _) in enumerate(groups):
        start = 0 if g == 0 else rng.start
        if g + 1 < len(groups):
            out.append(range(start, groups[g + 1][0].start))
        else:
            out.append(range(start, rng.stop if top is None else top))
    return out


def forward_outputs(p: int, seg: range, last: bool, fisher: bool) -> list[str]:
    """The files the forward unit of segment `seg` writes (the list its record must hold):
    the Fisher's, every block's input (block 0's only in the first segment: a later first
    input is the writer's below) and the output; the activation unit's, its output (none at
    the top)."""
    if not fisher:
        return [] if last else [x_rel(p, seg.stop)]
    keep = [x_rel(p, i) for i in seg if i > seg.start or seg.start == 0]
    return keep + [top_rel(p) if last else x_rel(p, seg.stop)]
