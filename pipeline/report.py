"""report.json (the contract other tools read) and report.md (for people)."""

from __future__ import annotations

from typing import Any

from pipeline.config import RunConfig, digest

__all__ = ["build_report", "render_markdown"]


def build_report(cfg: RunConfig, plans, records: dict[str, dict], seconds: float) -> dict:
    """{"config_digest", "model": {"name", "params"}, "stages": {NAME: {"key", "cached",
    "seconds", "compute_seconds"}}, "metrics": {...every stage's metrics, merged...}}.

    Accuracies are fractions in [0, 1]."""
    metrics: dict[str, Any] = {}
    for p in plans:
        metrics.update(records[p.stage.name].get("metrics", {}))
    metrics.pop("source", None)
    params = metrics.pop("params", None)
    if params is None:
        from pipeline.models import build, num_params

        params = num_params(build(cfg.model.name))
    model: dict[str, Any] = {"name": cfg.model.name, "params": params}
    if "quantized_params" in metrics:
        model["quantized_params"] = metrics.pop("quantized_params")
    if cfg.model.path:
        model["path"] = cfg.model.path
    from pipeline.workload import Workload

    metric = Workload(cfg).metric
    return {
        "name": cfg.name,
        "config_digest": digest(cfg),
        "model": model,
        "metric": {"name": metric.name, "direction": metric.direction},
        "stages": {
            p.stage.name: {"order": i, **{k: v for k, v in records[p.stage.name].items()
                                          if k in ("key", "cached", "seconds", "compute_seconds",
                                                   "verified", "memory")}}
            for i, p in enumerate(plans)
        },
        "metrics": metrics,
        "seconds": round(seconds, 3),
    }


def _pct(v: Any) -> str:
    return f"{100 * v:.2f}%" if isinstance(v, (int, float)) else "–"


def _val(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return ", ".join(f"{k}: {_val(x)}" for k, x in v.items())
    if isinstance(v, list):
        return f"({len(v)} entries in report.json)"
    return str(v)


def _finetune_lines(m: dict, metric: dict) -> list[str]:
    """What fine-tuning did, said plainly when it made things worse: the evaluation metric
    before and after an end-to-end fine-tune; a block-wise fine-tune's block output errors and
    held-out calibration perplexity (it never sees the evaluation data)."""
    name, higher = metric["name"], metric["direction"] == "higher"
    out: list[str] = []
    q, f = m.get(f"quantized_{name}"), m.get(f"finetuned_{name}")
    if isinstance(q, float) and isinstance(f, float) and (f < q if higher else f > q):
        out += ["", f"**Fine-tuning made the {name} worse**: {q:.4g} quantized, {f:.4g} after "
                "fine-tuning (it trains on the calibration/training data; fewer epochs, a "
                "lower finetune.lr or finetune.enabled=false keep the quantized model)."]
    ft = m.get("finetune")
    if isinstance(ft, dict) and ft.get("mode") == "both" and isinstance(ft.get("blockwise"),
                                                                           dict):
        out += ["", "Fine-tuning in two phases (finetune.mode=both): block-wise, then end to "
                f"end from its codebooks ({ft.get('steps')} steps)."]
        ft = ft["blockwise"]
    if isinstance(ft, dict) and ft.get("mode") == "blockwise" and ft.get("blocks"):
        split = "held-out" if ft.get("validation_windows") else "training"
        key = "val" if ft.get("validation_windows") else "train"
        errs = [(b["errors"].get(f"{key}_before"), b["errors"].get(f"{key}_after"))
                for b in ft["blocks"]]
        mean = [sum(e[i] for e in errs) / len(errs) for i in (0, 1)]
        out += ["", f"Block-wise fine-tuning: {len(errs)} blocks, {ft['steps_per_block']} steps "
                f"each; relative block output error on the {split} calibration windows "
                f"{mean[0]:.4g} → {mean[1]:.4g} (mean); {ft.get('reverted_blocks', 0)} "
                "blocks kept their quantized codebooks (training did not help them)."]
        vp = ft.get("validation_perplexity")
        if vp:
            worse = vp["finetuned"] > vp["quantized"]
            out += ["", ("**Block-wise fine-tuning made the held-out perplexity worse**: "
                         if worse else "Held-out calibration perplexity: ")
                    + f"unquantized {vp['unquantized']:.4g}, quantized {vp['quantized']:.4g}, "
                    f"fine-tuned {vp['finetuned']:.4g}."]
    return out


def _prune_lines(m: dict) -> list[str]:
    """One-shot pruning (a causal LM's, in the quantize stage), said in a line."""
    p = (m.get("quantize") or {}).get("prune") if isinstance(m.get("quantize"), dict) else None
    if not isinstance(p, dict):
        return []
    how = f"{p.get('n_m')} (N:M)" if p.get("n_m") else "the same fraction of every row"
    return ["", f"One-shot pruning ({p.get('criterion')}, {how}) of {p.get('tensors')} tensors: "
            f"{100 * p.get('kept_fraction', 1.0):.1f}% of the quantized weights kept; their "
            f"masks take {p.get('position_bits', 0.0):.3f} bits/weight of the file; the cut "
            f"weights' Hessian-weighted error (Σ h·w²) {p.get('pruned_distortion', 0.0):.4g} "
            "per weight."]


def render_markdown(report: dict) -> str:
    m = report["metrics"]
    lines = [
        f"# hwq report — {report['name']}",
        "",
        f"Model `{report['model'].get('path', report['model']['name'])}` "
        f"({report['model']['params']:,} parameters"
        + (f", {report['model']['quantized_params']:,} of them in quantized tensors"
           if "quantized_params" in report["model"] else "") + "); "
        f"config digest `{report['config_digest']}`; wall time {report['seconds']:.1f} s.",
        "",
    ]
    metric = report.get("metric", {"name": "accuracy", "direction": "higher"})
    name = metric["name"]
    fmt = _pct if name == "accuracy" else (lambda v: f"{v:.4g}" if isinstance(v, float) else "–")
    sets = next((list(m[k]) for k in m if k.endswith(f"_{name}_by_set")
                 and isinstance(m[k], dict)), [])
    lines += [f"## {name.capitalize()} ({metric['direction']} is better)", "",
              "| model state | " + " | ".join([name, *sets]) + " |",
              "|---" * (2 + len(sets)) + "|"]
    for stage, label in (("baseline", "baseline"), ("pruned", "pruned"),
                         ("quantized", "quantized"), ("finetuned", "quantized + fine-tuned"),
                         ("decoded", "decoded from the .hwq file")):
        key = f"{stage}_{name}"
        if key in m:
            by = m.get(f"{key}_by_set") or {}
            cells = [fmt(m[key])] + [fmt(by.get(s_)) for s_ in sets]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if sets and "baseline_" + name in m:
        lines += ["", "Relative to the baseline: " + ", ".join(
            f"{label} {m[f'{st}_{name}'] / m['baseline_' + name]:.3f}×"
            for st, label in (("quantized", "quantized"), ("finetuned", "fine-tuned"),
                              ("decoded", "decoded")) if f"{st}_{name}" in m) + "."]
    if isinstance(m.get("decoded_kl"), float):
        by = m.get("decoded_kl_by_set") or {}
        lines += ["", f"Mean next-token KL(unquantized ‖ decoded): {m['decoded_kl']:.4g} nats"
                  + (" (" + ", ".join(f"{k} {v:.4g}" for k, v in by.items()) + ")"
                     if by else "") + "."]
    lines += _prune_lines(m)
    lines += _finetune_lines(m, metric)
    if "kept_fraction" in m:
        lines += ["", f"Kept after pruning: {_pct(m['kept_fraction'])} of all parameters "
                      f"(per tensor: {_val(m.get('keep', {}))})."]
    enc = m.get("encode")
    if isinstance(enc, dict) and "bits_per_weight" in enc:
        lines += ["", "## Compression", "",
                  f"`{enc.get('file', 'model.hwq')}`: {enc['file_bytes']:,} bytes. "
                  f"**{enc['bits_per_weight']:.3f} bits per weight** all-in over the "
                  f"{enc['quantized_params']:,} quantized weights (indices "
                  f"{enc['index_bits_per_weight']:.3f}, codebooks "
                  f"{enc['codebook_bits_per_weight']:.3f}); the file is "
                  f"{enc['compression_ratio']:.2f}× smaller than the source "
                  f"({enc['original_bytes']:,} bytes) and {enc['compression_ratio_vs_fp32']:.2f}× "
                  "smaller than fp32. Tensors stored as they are (norms, biases, unquantized "
                  f"embeddings): {enc['raw_tensor_bytes']:,} bytes.", ""]
        if "bits_per_weight_all" in enc:
            emb = enc.get("embeddings") or {}
            lines += [f"Whole file over all {enc['params']:,} parameters: "
                      f"**{enc['bits_per_weight_all']:.3f} bits per parameter**; decoder "
                      f"Linears alone {enc['bits_per_weight_linears']:.3f} bits per weight"
                      + (f"; embeddings ({', '.join(emb['names'])}, {emb['params']:,} weights) "
                         f"{emb['bits_per_weight']:.3f} bits per weight."
                         if emb.get("params") else "; embeddings not quantized."), ""]
        lines += ["| where the bits go | bits | share |", "|---|---|---|"]
        total = sum(enc["bits"].values()) or 1
        for k, v in enc["bits"].items():
            lines.append(f"| {k} | {v:,} | {100 * v / total:.1f}% |")
    elif isinstance(enc, dict) and "compression_ratio" in enc:
        lines += ["", "## Compression", "",
                  f"`{enc.get('file', 'model.hwq')}`: {enc['file_bytes']:,} bytes; "
                  f"**{enc['compression_ratio']:.2f}×** smaller than fp32 "
                  f"({enc['original_bytes']:,} bytes); fixed-length codes would give "
                  f"{enc.get('ratio_fixed_length', 0):.2f}×.", "",
                  "| where the bits go | bits | share |", "|---|---|---|"]
        total = sum(enc["bits"].values()) or 1
        for k, v in enc["bits"].items():
            lines.append(f"| {k} | {v:,} | {100 * v / total:.1f}% |")
    if isinstance(enc, dict) and enc.get("serve"):
        sv = enc["serve"]
        lines += ["", (f"Serves at **{sv['serve_bits']} bits** per index in a lookup-table "
                       f"runtime (largest row codebook: {sv['levels']} levels, {sv['tensor']})."
                       if sv.get("serve_bits") else
                       f"Not servable by a lookup-table runtime: {sv['tensor']} has "
                       f"{sv['levels']} levels in a row (at most 256).")]
    lines += ["", "## Stages", "", "| stage | key | cached | seconds this run | compute seconds "
              "| driver peak RSS | worker peak RSS (processes) |",
              "|---|---|---|---|---|---|---|"]
    for name, s in sorted(report["stages"].items(), key=lambda kv: kv[1].get("order", 0)):
        mem = s.get("memory") or {}
        workers = mem.get("workers") or []
        drv = f"{mem['driver_peak_rss'] / 2**30:.2f} GiB" if mem.get("driver_peak_rss") else "–"
        wk = (f"{max(w['peak_rss'] for w in workers) / 2**30:.2f} GiB ({len(workers)})"
              if workers else "–")
        lines.append(f"| {name} | `{s['key']}` | {'yes' if s['cached'] else 'no'} | "
                     f"{s['seconds']:.1f} | {s['compute_seconds']:.1f} | {drv} | {wk} |")
    other = {k: v for k, v in m.items() if isinstance(v, dict) and k not in ("keep", "encode")
             and not k.endswith("_by_set")}
    if other:
        lines += ["", "## Stage details", ""]
        for k, v in other.items():
            lines.append(f"- **{k}**: {_val(v)}")
    return "\n".join(lines) + "\n"
