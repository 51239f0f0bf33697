"""batch.md: the table of a batch's entries (pipeline/batch.py writes it beside batch.json).

Every cell is text from batch.json, which is read back from the store on a rerun: control
characters are removed and Markdown's table syntax escaped.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["render_markdown"]


def _cell(text: Any) -> str:
    s = "".join(c for c in str(text) if c.isprintable())
    return s.replace("\\", "\\\\").replace("|", "\\|").replace("`", "'")


def _num(v: Any, metric: str) -> str:
    if not isinstance(v, (int, float)):
        return "–"
    return f"{100 * v:.2f}%" if metric == "accuracy" else f"{v:.4g}"


def render_markdown(result: Mapping[str, Any]) -> str:
    t = result.get("totals") or {}
    lines = [
        f"# hwq batch — {_cell(result.get('name'))}",
        "",
        f"Store `{_cell(result.get('store'))}`; batch file `{_cell(result.get('batch_file'))}`; "
        f"{result.get('state')} (started {result.get('started')}, updated "
        f"{result.get('updated')}, {result.get('seconds', 0):.1f} s).",
        "",
        f"{t.get('entries', 0)} entries: {t.get('ok', 0)} ok, {t.get('cached', 0)} cached, "
        f"{t.get('failed', 0)} failed"
        + (f", {t.get('running', 0)} running" if t.get("running") else "")
        + (f", {t.get('interrupted', 0)} interrupted" if t.get("interrupted") else "")
        + (
            f", {t.get('pending', 0) + t.get('not_run', 0)} not run"
            if t.get("pending", 0) + t.get("not_run", 0)
            else ""
        )
        + f"; {t.get('stages_ran', 0)} stages computed, {t.get('stages_cached', 0)} cache hits.",
        "",
        "| entry | config | status | metric | baseline | result | bits/weight | ratio | "
        "seconds | error |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result.get("entries", []):
        metric = (r.get("metric") or {}).get("name", "")
        stage = r.get("result_stage")
        res = _num(r.get("result"), metric) + (f" ({stage})" if stage else "")
        bpw = r.get("bits_per_weight")
        ratio = r.get("compression_ratio")
        status = r["status"] + (" (earlier run)" if r.get("previous") else "")
        secs = r.get("seconds")
        lines.append(
            f"| {_cell(r['name'])} | {_cell(r.get('config', ''))} | {status} | "
            f"{_cell(metric) or '–'} | {_num(r.get('baseline'), metric)} | {res} | "
            f"{f'{bpw:.3f}' if isinstance(bpw, (int, float)) else '–'} | "
            f"{f'{ratio:.2f}×' if isinstance(ratio, (int, float)) else '–'} | "
            f"{f'{secs:.1f}' if isinstance(secs, (int, float)) else '–'} | "
            f"{_cell(r.get('error', ''))} |"
        )
    lines += [
        "",
        "Result: the metric of the last model state the run has (decoded from the "
        ".hwq file, else fine-tuned, quantized). Bits per weight: the report's "
        "`bits_per_weight` (all-in over the quantized weights), or for models without "
        "it (LeNet-5) 8 × file bytes / all parameters. Each entry's report: "
        "`<entry>/report.md` beside this file.",
    ]
    return "\n".join(lines) + "\n"
