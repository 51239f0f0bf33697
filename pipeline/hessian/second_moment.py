"""The full input second moment X·Xᵀ / n of every quantized decoder Linear, block by block
(``quantize.feedback: ldl``; the error feedback of pipeline/quantize/feedback.py needs it).

Computed by the streamed hessian stage beside the diagonal estimator, one Ray task (a unit)
per block group (hessian.groups, at least 2 so that two cores share the work) over every
calibration window: the task runs the blocks below its group
forward (recomputation, as the activation estimator's units do), then each block of its group
with a forward pre-hook on every named Linear that adds ``xᵀx`` of each batch (float32
products, float64 sums) to the block's matrices; at the end of the block the matrices are
divided by the tokens seen (the activation estimator's normalisation, so ``diag(X·Xᵀ/n)`` is
its h), written as float32, one safetensors file per distinct input, and freed: no process
holds more than one block's matrices.

Linears that read the same input tensor (q/k/v read the attention norm's output, gate/up the
MLP norm's) share one matrix: the hooks see the identical tensor object within one call of the
block, so the first of them owns the matrix and the others reference its file.
``second_moments.json`` maps every tensor to its file; each group's unit record lists its
files (a killed run recomputes only the groups without a record). The embedding and the head
are not Linears of a block: they get plain ECSQ (no feedback).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["SECOND_MOMENTS", "second_moments_streamed", "run_second_moments",
           "read_second_moment"]

SECOND_MOMENTS = "second_moments.json"  # {tensor: rel of its float32 [in, in] file}

EmitBlock = Callable[[int, list[tuple[list[str], np.ndarray]], int], None]


def second_moments_streamed(lm, windows: Tensor, names: Sequence[str], emit: EmitBlock, *,
                            blocks: range | None = None, batch: int = 8) -> int:
    """X·Xᵀ / n of the named Linear weights of `blocks`; returns tokens seen.

    emit(i, [(tensors sharing the input, float64 [in, in]), ...], n_tokens) once per block
    of the range that holds a named tensor, in block order."""
    from pipeline.hessian.shards import _check_range
    from pipeline.hessian.stream import _forward

    span = _check_range(blocks, len(lm.layers))
    want_all = set(names)
    hidden, calls = lm.block_inputs(windows)
    n_tokens = int(windows.numel())
    for i in range(span.start):
        hidden = _forward(lm, i, hidden, calls[i], batch)
    last = max((i for i in span if any(n in want_all for n in lm.block_params(i))),
               default=span.start - 1)
    for i in range(span.start, last + 1):
        block = lm.block(i)
        prefix = lm.block_prefix(i)
        handles, owner, sums = _hooks(block, prefix, want_all)
        try:
            hidden = lm.run_block(i, hidden, calls[i], batch=batch)
        finally:
            for h in handles:
                h.remove()
            lm.unload(block)
        groups: dict[str, list[str]] = {}
        for n in [n for n in lm.block_params(i) if n in want_all]:
            if n not in owner:
                raise ValueError(f"{n}: its Linear was not called in the block's forward")
            groups.setdefault(owner[n], []).append(n)
        if groups:
            emit(i, [(members, (sums.pop(o) / n_tokens).numpy())
                     for o, members in groups.items()], n_tokens)
        sums.clear()
    return n_tokens


def _hooks(block: nn.Module, prefix: str, want: set[str]
           ) -> tuple[list, dict[str, str], dict[str, Tensor]]:
    """(hook handles, {tensor: the tensor whose matrix it shares}, {owner: float64 sums of
    xᵀx}) of one block's named Linears. Within one call of the block, a Linear whose input is
    the very tensor an earlier one read shares that one's matrix."""
    owner: dict[str, str] = {}
    sums: dict[str, Tensor] = {}
    seen: list[tuple[Tensor, str]] = []  # inputs of the current call of the block
    handles = [block.register_forward_pre_hook(lambda m, a: seen.clear())]

    def make(full: str):
        def hook(module, inputs):
            x = inputs[0]
            same = next((n for t, n in seen if t is x), None)
            if same is not None:
                owner.setdefault(full, owner.get(same, same))
                if owner[full] != full:
                    return
            seen.append((x, full))
            owner.setdefault(full, full)
            x2 = x.detach().reshape(-1, x.shape[-1]).float()
            acc = sums.get(full)
            if acc is None:
                acc = sums[full] = torch.zeros(x2.shape[1], x2.shape[1], dtype=torch.float64)
            acc += (x2.T @ x2).double()

        return hook

    for mname, mod in block.named_modules():
        full = prefix + mname + ".weight"
        if full not in want:
            continue
        if not isinstance(mod, nn.Linear):
            raise ValueError(f"{full}: quantize.feedback=ldl covers nn.Linear weights only, "
                             f"this is a {type(mod).__name__}")
        handles.append(mod.register_forward_pre_hook(make(full)))
    return handles, owner, sums


def _group_task(cfg, out, url: str, opts: dict | None, windows: Tensor, g: int,
                blocks: range, names: list[str]) -> dict:
    """Unit x{g}: every block of the group → xtx/b<i>-<j>.safetensors; the record maps its
    tensors to their files."""
    from safetensors.torch import save

    from pipeline.executor import task_threads
    from pipeline.memory import process_peaks
    from pipeline.models.stream import StreamedLM
    from pipeline.store import canonical_safetensors
    from pipeline.units import Units

    task_threads()
    lm = StreamedLM(url, opts, dtype="stored")
    files: dict[str, str] = {}

    def emit(i: int, mats: list[tuple[list[str], np.ndarray]], n: int) -> None:
        for j, (members, m) in enumerate(mats):
            rel = f"xtx/b{i:05d}-{j}.safetensors"
            out.write_bytes(rel, canonical_safetensors(save(
                {"xtx": torch.from_numpy(m.astype(np.float32))},
                metadata={"tensors": ",".join(members), "tokens": str(n)})))
            for t in members:
                files[t] = rel

    n = second_moments_streamed(lm, windows, names, emit, blocks=blocks)
    Units(out).record(f"x{g}", sorted(set(files.values())), files=files, n=n)
    return {"files": files, "bytes_read": lm.weights.bytes_read, "process": process_peaks()}


def run_second_moments(ctx, url: str, opts: dict | None, windows: Tensor, names: list[str],
                       shapes: dict[str, list[int]], groups: int) -> dict:
    """The X·Xᵀ units of the streamed hessian stage; writes second_moments.json; returns
    its metrics."""
    import time

    from pipeline.executor import map_units, task_cpus
    from pipeline.hessian.shards import block_of, group_names
    from pipeline.units import Units

    t0 = time.perf_counter()
    out = ctx.out
    block_names = [n for n in names if block_of(n) is not None]
    plan = group_names(block_names, shapes, groups) if block_names else []
    units = Units(out)
    files: dict[str, str] = {}
    todo = []
    for g, (rng, own) in enumerate(plan):
        rec = units.done(f"x{g}", None, _check(own))
        if rec is not None:
            files.update(rec["fields"]["files"])
        else:
            todo.append((ctx.cfg, out, url, opts, windows, g, rng, own))
    for _, r in map_units(_group_task, todo, cpus=task_cpus(1), desc="X·Xᵀ units"):
        files.update(r["files"])
    out.write_json(SECOND_MOMENTS, files)
    return {"tensors": len(files), "matrices": len(set(files.values())),
            "units": {"total": len(plan), "reused": len(plan) - len(todo)},
            "seconds": round(time.perf_counter() - t0, 3)}


def _check(names: list[str]):
    def check(fields: dict) -> str | None:
        f = fields.get("files")
        if not isinstance(f, dict) or set(f) != set(names):
            return "its tensors are not the group's"
        if not all(isinstance(v, str) and v.startswith("xtx/") for v in f.values()):
            return "its files are not xtx/ files"
        return None

    return check


def read_second_moment(hess, name: str, cols: int) -> np.ndarray | None:
    """float32 [cols, cols]: tensor `name`'s X·Xᵀ / n from a hessian stage folder (its file's
    sha256 checked against the manifest), or None when the stage has none for it."""
    from safetensors.numpy import load

    if not hess.store.exists(hess.rel(SECOND_MOMENTS)):
        return None
    rel = hess.read_json(SECOND_MOMENTS).get(name)
    if rel is None:
        return None
    try:
        m = load(hess.read_bytes(rel))["xtx"]
    except Exception as e:  # noqa: BLE001 - safetensors raises its own types on bad input
        raise hess._corrupt(rel, f"not an X·Xᵀ file ({type(e).__name__})") from None
    if m.shape != (cols, cols) or m.dtype != np.float32 or not np.isfinite(m).all():
        raise hess._corrupt(rel, f"not a finite float32 [{cols}, {cols}] matrix")
    return m
