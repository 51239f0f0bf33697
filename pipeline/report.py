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
    return {
        "name": cfg.name,
        "config_digest": digest(cfg),
        "model": {"name": cfg.model.name, "params": params},
        "stages": {
            p.stage.name: {"order": i, **{k: records[p.stage.name][k]
                                          for k in ("key", "cached", "seconds", "compute_seconds")}}
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
    return str(v)


def render_markdown(report: dict) -> str:
    m = report["metrics"]
    lines = [
        f"# hwq report — {report['name']}",
        "",
        f"Model `{report['model']['name']}` ({report['model']['params']:,} parameters); "
        f"config digest `{report['config_digest']}`; wall time {report['seconds']:.1f} s.",
        "",
        "## Accuracy",
        "",
        "| model state | test accuracy |",
        "|---|---|",
    ]
    for key, label in (("baseline_accuracy", "baseline"), ("pruned_accuracy", "pruned"),
                       ("quantized_accuracy", "quantized"),
                       ("finetuned_accuracy", "quantized + fine-tuned"),
                       ("decoded_accuracy", "decoded from the .hwq file")):
        if key in m:
            lines.append(f"| {label} | {_pct(m[key])} |")
    if "kept_fraction" in m:
        lines += ["", f"Kept after pruning: {_pct(m['kept_fraction'])} of all parameters "
                      f"(per tensor: {_val(m.get('keep', {}))})."]
    enc = m.get("encode")
    if isinstance(enc, dict) and "compression_ratio" in enc:
        lines += ["", "## Compression", "",
                  f"`{enc.get('file', 'model.hwq')}`: {enc['file_bytes']:,} bytes; "
                  f"**{enc['compression_ratio']:.2f}×** smaller than fp32 "
                  f"({enc['original_bytes']:,} bytes); fixed-length codes would give "
                  f"{enc.get('ratio_fixed_length', 0):.2f}×.", "",
                  "| where the bits go | bits | share |", "|---|---|---|"]
        total = sum(enc["bits"].values()) or 1
        for k, v in enc["bits"].items():
            lines.append(f"| {k} | {v:,} | {100 * v / total:.1f}% |")
    lines += ["", "## Stages", "", "| stage | key | cached | seconds this run | compute seconds |",
              "|---|---|---|---|---|"]
    for name, s in sorted(report["stages"].items(), key=lambda kv: kv[1].get("order", 0)):
        lines.append(f"| {name} | `{s['key']}` | {'yes' if s['cached'] else 'no'} | "
                     f"{s['seconds']:.1f} | {s['compute_seconds']:.1f} |")
    other = {k: v for k, v in m.items() if isinstance(v, dict) and k not in ("keep", "encode")}
    if other:
        lines += ["", "## Stage details", ""]
        for k, v in other.items():
            lines.append(f"- **{k}**: {_val(v)}")
    return "\n".join(lines) + "\n"
