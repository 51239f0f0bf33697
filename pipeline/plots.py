"""Rate–accuracy plots and the sweep's markdown page.

`rate_accuracy_png`: the paper's Figure 1 — accuracy against the average codeword length of
the indices (bits per weight) per method, in four panels: fixed-length codes, fixed-length +
fine-tuning, Huffman codes, Huffman + fine-tuning. `ratio_accuracy_png`: accuracy against the
compression ratio from the file size (the pruned-model comparison).
"""

from __future__ import annotations

import io
import math
from typing import Any

__all__ = ["rate_accuracy_png", "ratio_accuracy_png", "rate_metric_png", "sweep_markdown",
           "method_label", "fixed_length_bits"]

METHOD_STYLE = {"kmeans": ("k-means", "o"), "hw_kmeans": ("Hessian-weighted k-means", "s"),
                "uniform": ("uniform", "^"), "ecsq": ("iterative ECSQ", "D"),
                "deep_compression": ("Deep Compression (per layer)", "x")}


def method_label(run: dict[str, Any]) -> str:
    q = run["metrics"].get("quantize", {})
    if q.get("scope") == "layer" and q.get("method") == "kmeans":
        return "deep_compression"
    return q.get("method", "?")


def fixed_length_bits(run: dict[str, Any]) -> float | None:
    """Fixed-length index bits per weight: ceil(log2 k) of the codebook(s) actually used."""
    k = run["metrics"].get("quantize", {}).get("k")
    if isinstance(k, dict):
        return None
    return max(1, math.ceil(math.log2(k))) if k else None


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def _series(runs, x_of, y_key):
    out: dict[str, list[tuple[float, float]]] = {}
    for r in runs:
        x, y = x_of(r), r["metrics"].get(y_key)
        if x is not None and y is not None:
            out.setdefault(method_label(r), []).append((x, 100 * y))
    return {m: sorted(v) for m, v in out.items()}


def rate_accuracy_png(runs: list[dict[str, Any]], title: str = "") -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharey=True, constrained_layout=True)
    huff = lambda r: r["metrics"].get("encode", {}).get("index_bits_per_weight")  # noqa: E731
    coders = {r["metrics"].get("encode", {}).get("coders", {}).get("static", "huffman")
              for r in runs}
    coded = {"huffman": "Huffman coding", "ans": "rANS coding"}.get(
        coders.pop() if len(coders) == 1 else "", "entropy coding")
    panels = [("fixed-length coding", fixed_length_bits, "quantized_accuracy"),
              ("fixed-length coding + fine-tuning", fixed_length_bits, "finetuned_accuracy"),
              (coded, huff, "quantized_accuracy"),
              (f"{coded} + fine-tuning", huff, "finetuned_accuracy")]
    base = next((r["metrics"].get("pruned_accuracy") or r["metrics"].get("baseline_accuracy")
                 for r in runs), None)
    for ax, (name, x_of, y_key) in zip(axes.flat, panels, strict=True):
        for m, pts in _series(runs, x_of, y_key).items():
            label, marker = METHOD_STYLE.get(m, (m, "."))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=label)
        if base is not None:
            ax.axhline(100 * base, color="grey", ls=":", lw=1, label="unquantized")
        ax.set_title(name)
        ax.set_xlabel("average codeword length (bits per weight)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    if axes.flat[0].get_legend_handles_labels()[0]:
        axes.flat[0].legend(fontsize=8, loc="lower right")
    if title:
        fig.suptitle(title)
    return _png(fig)


def ratio_accuracy_png(runs: list[dict[str, Any]], pruned_accuracy: float | None,
                       title: str = "") -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    ratio = lambda r: r["metrics"].get("encode", {}).get("compression_ratio")  # noqa: E731
    key = "finetuned_accuracy" if any("finetuned_accuracy" in r["metrics"] for r in runs) \
        else "quantized_accuracy"
    for m, pts in _series(runs, ratio, key).items():
        label, marker = METHOD_STYLE.get(m, (m, "."))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=label)
    if pruned_accuracy is not None:
        ax.axhline(100 * pruned_accuracy, color="grey", ls=":", lw=1, label="pruned model")
        ax.axhline(100 * pruned_accuracy - 0.1, color="red", ls="--", lw=1,
                   label="iso-accuracy (−0.1 point)")
    ax.set_xlabel("compression ratio (from the .hwq file size)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return _png(fig)


def rate_metric_png(runs: list[dict[str, Any]], metric: str, title: str = "") -> bytes:
    """A metric other than accuracy (perplexity: log scale) against the all-in bits per
    weight of the .hwq file, one series per method, before and after fine-tuning."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    bits = lambda r: r["metrics"].get("bits_per_weight")  # noqa: E731
    for stage, ls in (("quantized", "-"), ("finetuned", "--")):
        series: dict[str, list[tuple[float, float]]] = {}
        for r in runs:
            x, y = bits(r), r["metrics"].get(f"{stage}_{metric}")
            if x is not None and y is not None:
                series.setdefault(method_label(r), []).append((x, y))
        for m, pts in sorted(series.items()):
            pts.sort()
            label, marker = METHOD_STYLE.get(m, (m, "."))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], ls=ls, marker=marker,
                    label=label + (" + fine-tuning" if stage == "finetuned" else ""))
    base = next((r["metrics"].get(f"baseline_{metric}") for r in runs), None)
    if base is not None:
        ax.axhline(base, color="grey", ls=":", lw=1, label="unquantized")
    if metric == "perplexity":
        ax.set_yscale("log")
    ax.set_xlabel("bits per weight, all-in (from the .hwq file)")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return _png(fig)


def _metric_markdown(result: dict[str, Any], metric: str, store, prefix: str) -> list[str]:
    runs = result["runs"]
    lines = ["", f"| run | method | bits/weight (file) | quantized {metric} | fine-tuned {metric} "
             "| decoded {metric} |", "|---|---|---|---|---|---|"]
    fmt = lambda v: f"{v:.4g}" if isinstance(v, (int, float)) else "–"  # noqa: E731
    for r in runs:
        m = r["metrics"]
        lines.append(f"| {r['run']} | {method_label(r)} | {fmt(m.get('bits_per_weight'))} | "
                     f"{fmt(m.get(f'quantized_{metric}'))} | {fmt(m.get(f'finetuned_{metric}'))} "
                     f"| {fmt(m.get(f'decoded_{metric}'))} |")
    if store is not None and runs:
        store.write_bytes(f"{prefix}/rate_{metric}.png",
                          rate_metric_png(runs, metric, result["name"]))
        lines += ["", f"![{metric} vs bits per weight](rate_{metric}.png)"]
    return lines


def _pct(v) -> str:
    return f"{100 * v:.2f}" if isinstance(v, (int, float)) else "–"


def sweep_markdown(result: dict[str, Any], store=None, prefix: str = "") -> str:
    """The sweep's page: runs table, cache use, plots (written beside it when `store`)."""
    runs = result["runs"]
    lines = [f"# sweep {result['name']}", "",
             f"{len(runs)} runs in {result['seconds']:.1f} s.", "",
             "| stage | runs | distinct keys | cache hits |", "|---|---|---|---|"]
    for st, c in result["stage_counts"].items():
        lines.append(f"| {st} | {c['runs']} | {c['distinct']} | "
                     f"{c['runs'] - c['distinct'] + c['cached']} |")
    metric = (runs[0].get("metric") or {}).get("name", "accuracy") if runs else "accuracy"
    if metric != "accuracy":
        return "\n".join(lines + _metric_markdown(result, metric, store, prefix)) + "\n"
    lines += ["", "| run | method | k | index bits (H / coded) | quantized % | fine-tuned % | "
              "ratio |", "|---|---|---|---|---|---|---|"]
    for r in runs:
        m = r["metrics"]
        q, e = m.get("quantize", {}), m.get("encode", {})
        k = q.get("k")
        k = "per layer" if isinstance(k, dict) else k
        bits = (f"{q.get('index_entropy_bits', float('nan')):.3f} / "
                f"{e.get('index_bits_per_weight', float('nan')):.3f}")
        ratio = f"{e['compression_ratio']:.2f}×" if "compression_ratio" in e else "–"
        lines.append(f"| {r['run']} | {method_label(r)} | {k} | {bits} | "
                     f"{_pct(m.get('quantized_accuracy'))} | "
                     f"{_pct(m.get('finetuned_accuracy'))} | {ratio} |")
    if store is not None and runs:
        pruned = any("pruned_accuracy" in r["metrics"] for r in runs)
        store.write_bytes(f"{prefix}/rate_accuracy.png", rate_accuracy_png(runs, result["name"]))
        lines += ["", "![accuracy vs bits per weight](rate_accuracy.png)"]
        if pruned and any("encode" in r["metrics"] for r in runs):
            acc = runs[0]["metrics"].get("pruned_accuracy")
            store.write_bytes(f"{prefix}/ratio_accuracy.png",
                              ratio_accuracy_png(runs, acc, result["name"]))
            lines += ["", "![accuracy vs compression ratio](ratio_accuracy.png)"]
    return "\n".join(lines) + "\n"
