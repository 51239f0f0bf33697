"""Reproduce the paper's Table 1 (pruned LeNet) and Figure 1 (unpruned) on Fashion-MNIST.

Two sweeps share one store, so the model is trained, pruned and its Hessian estimated once:

- pruned: k-means and Hessian-weighted k-means at several k, uniform and iterative ECSQ at
  several target entropies (all layers together, network scope), and the Deep Compression
  recipe (per-layer k-means, 256 clusters for conv, 32 for fc) — all Huffman-coded,
  fine-tuned, written as .hwq files;
- unpruned: the four methods at several rates, for the four panels of Figure 1.

Then the sweeps run a second time (every stage a cache hit) to time the cache. Results:
benchmarks/results/paper_table.{json,md}, rate_accuracy.png, ratio_accuracy.png.

"At iso-accuracy" = the best compression ratio (from the file size) among a method's settings
whose fine-tuned accuracy is at most 0.1 point below the pruned model's.

    python benchmarks/paper_table.py                  # `make bench-paper`
    python benchmarks/paper_table.py --store runs/paper --quick
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.plots import method_label  # noqa: E402
from pipeline.sweep import sweep  # noqa: E402

CONFIG = str(ROOT / "configs/lenet5_fmnist.yaml")
DC_LAYER_K = "{conv1.weight: 256, conv2.weight: 256, fc1.weight: 32, fc2.weight: 32}"
ISO = 0.001  # 0.1 point, as a fraction


def pruned_points(quick: bool) -> list[list[str]]:
    ks = [16, 32] if quick else [8, 16, 32]
    bits = [2.5, 3.0] if quick else [2.5, 3.0, 3.5]
    pts = [[f"quantize.method={m}", f"quantize.k={k}"] for m in ("kmeans", "hw_kmeans")
           for k in ks]
    pts += [[f"quantize.method={m}", f"quantize.target_bits={b}"] for m in ("uniform", "ecsq")
            for b in bits]
    pts.append(["quantize.method=kmeans", "quantize.scope=layer", f"quantize.layer_k={DC_LAYER_K}"])
    return pts


def unpruned_points(quick: bool) -> list[list[str]]:
    ks = [4, 16] if quick else [2, 4, 8, 16]
    bits = [2.0, 4.0] if quick else [1.0, 2.0, 3.0, 4.0]
    pts = [[f"quantize.method={m}", f"quantize.k={k}"] for m in ("kmeans", "hw_kmeans")
           for k in ks]
    pts += [[f"quantize.method={m}", f"quantize.target_bits={b}"] for m in ("uniform", "ecsq")
            for b in bits]
    return pts


def best_at_iso(runs: list[dict], pruned_acc: float) -> dict[str, dict]:
    """Per method: the best-ratio run within ISO of the pruned accuracy (None if none)."""
    out: dict[str, dict] = {}
    for r in runs:
        m = method_label(r)
        acc = r["metrics"]["finetuned_accuracy"]
        ratio = r["metrics"]["encode"]["compression_ratio"]
        ok = acc >= pruned_acc - ISO - 1e-12
        cur = out.get(m)
        key = (ok, ratio if ok else acc)
        if cur is None or key > (cur["iso"], cur["ratio"] if cur["iso"] else cur["accuracy"]):
            out[m] = {"iso": ok, "ratio": ratio, "accuracy": acc, "run": r["run"],
                      "settings": r["settings"],
                      "quantized_accuracy": r["metrics"]["quantized_accuracy"],
                      "bits": r["metrics"]["encode"]["bits"],
                      "index_bits_per_weight": r["metrics"]["encode"]["index_bits_per_weight"],
                      "index_entropy_bits": r["metrics"]["encode"]["index_entropy_bits"]}
    return out


def pruned_only_ratio(run: dict) -> float:
    """The pruned model stored without quantization: 32 bits per kept weight, the same coded
    positions, raw tensors and header (estimated from a quantized file's accounting)."""
    e = run["metrics"]["encode"]
    bits = 32 * e["n_kept"] + e["bits"]["positions"] + e["bits"]["raw_tensors"] + \
        e["bits"]["header"]
    return 8 * e["original_bytes"] / bits


def render(res: dict) -> str:
    b, p = res["baseline_accuracy"], res["pruned_accuracy"]
    lines = ["| method | accuracy % | compression ratio | setting |", "|---|---|---|---|",
             f"| original | {100 * b:.2f} | – | {res['params']:,} parameters |",
             f"| pruned only | {100 * p:.2f} | {res['pruned_only_ratio']:.2f} (estimated) | "
             f"keeps {100 * res['kept_fraction']:.2f}% |"]
    names = {"kmeans": "k-means", "hw_kmeans": "Hessian-weighted k-means",
             "uniform": "uniform quantization", "ecsq": "iterative ECSQ",
             "deep_compression": "Deep Compression (per-layer k-means 256/32)"}
    for m in ("kmeans", "hw_kmeans", "uniform", "ecsq", "deep_compression"):
        r = res["best"].get(m)
        if r is None:
            continue
        setting = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in r["settings"].items()
                            if k != "quantize.layer_k")
        flag = "" if r["iso"] else " (not within 0.1 point)"
        lines.append(f"| {names[m]} | {100 * r['accuracy']:.2f}{flag} | {r['ratio']:.2f} | "
                     f"{setting} |")
    lines += ["", "Targets: " + "; ".join(f"{k}: {v}" for k, v in res["targets"].items())]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default=str(ROOT / "runs/paper"))
    ap.add_argument("--fresh", action="store_true", help="delete the store first (clean run)")
    ap.add_argument("--quick", action="store_true", help="fewer rates (a smoke run)")
    ap.add_argument("--finetune-epochs", default="0.5")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if args.fresh and Path(args.store).exists():
        shutil.rmtree(args.store)
    base = [f"store.url={args.store}", f"finetune.epochs={args.finetune_epochs}"]
    timings = {}
    t0 = time.perf_counter()
    pruned = sweep(CONFIG, pruned_points(args.quick), name="paper-pruned", base=base)
    unpruned = sweep(CONFIG, unpruned_points(args.quick), name="paper-unpruned",
                     base=base + ["prune.enabled=false"])
    timings["first_seconds"] = round(time.perf_counter() - t0, 1)
    t1 = time.perf_counter()
    sweep(CONFIG, pruned_points(args.quick), name="paper-pruned", base=base)
    sweep(CONFIG, unpruned_points(args.quick), name="paper-unpruned",
          base=base + ["prune.enabled=false"])
    timings["cached_seconds"] = round(time.perf_counter() - t1, 1)

    runs = pruned["runs"]
    m0 = runs[0]["metrics"]
    best = best_at_iso(runs, m0["pruned_accuracy"])
    ratio = {k: v["ratio"] for k, v in best.items() if v["iso"]}
    top = max(ratio.values(), default=0.0)
    targets = {
        "best ratio at iso-accuracy >= 42": f"{top:.2f} ({'met' if top >= 42 else 'missed'})"}
    if "uniform" in ratio and "kmeans" in ratio:
        x = ratio["uniform"] / ratio["kmeans"]
        targets["uniform >= 1.08 x k-means"] = f"{x:.3f} ({'met' if x >= 1.08 else 'missed'})"
    if "uniform" in ratio and "deep_compression" in ratio:
        x = ratio["uniform"] / ratio["deep_compression"]
        targets["uniform >= 1.3 x Deep Compression"] = f"{x:.3f} ({'met' if x >= 1.3 else 'missed'})"
    overhead = max(r["metrics"]["encode"]["index_bits_per_weight"] /
                   max(r["metrics"]["encode"]["index_entropy_bits"], 1e-9) - 1 for r in runs)
    targets["coded indices vs entropy (worst run)"] = f"+{100 * overhead:.2f}%"
    res = {"baseline_accuracy": m0["baseline_accuracy"], "pruned_accuracy": m0["pruned_accuracy"],
           "kept_fraction": m0["kept_fraction"], "keep": m0["keep"],
           "params": 431_080, "pruned_only_ratio": pruned_only_ratio(runs[0]),
           "best": best, "targets": targets, "timings": timings,
           "finetune_epochs": float(args.finetune_epochs),
           "runs_pruned": pruned["runs"], "runs_unpruned": unpruned["runs"]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "paper_table.json").write_text(json.dumps(res, indent=2) + "\n")
    table = render(res)
    bits = best.get("uniform", next(iter(best.values())))["bits"]
    total = sum(bits.values())
    table += "\nWhere the bits go (best uniform run): " + ", ".join(
        f"{k} {100 * v / total:.1f}%" for k, v in bits.items()) + "\n"
    table += (f"\nSweep time: {timings['first_seconds']:.0f} s from a "
              f"{'clean' if args.fresh else 'given'} store, {timings['cached_seconds']:.0f} s "
              "again with every stage a cache hit.\n")
    (out / "paper_table.md").write_text(table)
    for name, src in (("ratio_accuracy.png", "paper-pruned/ratio_accuracy.png"),
                      ("rate_accuracy.png", "paper-unpruned/rate_accuracy.png")):
        p = Path(args.store) / "sweeps" / src
        if p.exists():
            shutil.copy(p, out / name)
    print(table)


if __name__ == "__main__":
    main()
