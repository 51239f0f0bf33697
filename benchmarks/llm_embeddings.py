"""The whole model compressed: SmolLM2-135M with its token embedding (tied with the head)
quantized under the run's one λ, against the earlier file that kept it as stored.

    python benchmarks/llm_embeddings.py                       # both variants, the config's rate
    python benchmarks/llm_embeddings.py --rates 3.25 4.25     # and another rate
    python benchmarks/llm_embeddings.py --only quantize --no-finetune

Each row is one `hwq run` of configs/smollm2_135m.yaml (embedded Ray, DeepSpeed fine-tuning as
the config has it) with `quantize.embeddings` set to

- `quantize` (the default): the embedding is quantized per row beside the decoder Linears,
  norms stored in 16 bits (`encode.raw_dtype: float16`, the config's);
- `keep` (the earlier behaviour, the earlier stage keys): the embedding and the norms stored as
  loaded (fp32), `encode.raw_dtype: keep`.

Per row: the file's bytes; bits per weight over the decoder Linears, over the embedding and
over all parameters (the whole file / every parameter, tied weights once); the embedding's
share of the file; its rows' mean level count and how many rows got one level; the decoded
model's perplexity on both evaluation texts and its ratio to the unquantized model's. Rows are
kept in benchmarks/results/llm_embeddings.json (with the load average) and reused unless
--fresh; the table is printed and written beside it as llm_embeddings.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

RESULTS = HERE / "results"
VARIANTS = {  # id: (label, overrides by section)
    "quantize": ("embedding quantized (default)",
                 {"quantize": {"embeddings": "quantize"}}),
    "keep": ("embedding kept (earlier default)",
             {"quantize": {"embeddings": "keep"}, "encode": {"raw_dtype": "keep"}}),
}


def _load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _layers(rep: dict, store: str) -> dict:
    """Per-tensor figures of the run's quantize stage (layers.json)."""
    from pipeline.store import StageDir, Store

    key = rep["stages"]["quantize"]["key"]
    return StageDir(Store(store, create=False), "quantize", key).read_json("layers.json")


def row_of(rid: str, rate: float, ft: bool, rep: dict, store: str, seconds: float) -> dict:
    m = rep["metrics"]
    e = m["encode"]
    base = m["baseline_perplexity_by_set"]
    ppl = m["decoded_perplexity_by_set"]
    emb = e.get("embeddings") or {}
    layers = _layers(rep, store)
    emb_layers = [layers[n] for n in emb.get("names", []) if n in layers]
    return {
        "id": rid, "variant": rid.split("@")[0], "label": VARIANTS[rid.split("@")[0]][0],
        "target_bits": rate, "finetune": ft,
        "file_bytes": e["file_bytes"], "params": e["params"],
        "bits_per_weight_all": e["bits_per_weight_all"],
        "bits_per_weight_quantized": e["bits_per_weight"],
        "bits_per_weight_linears": e["bits_per_weight_linears"],
        "embedding_params": emb.get("params", 0),
        "embedding_bits_per_weight": emb.get("bits_per_weight"),
        "embedding_bytes": (emb.get("bits") or 0) // 8,
        "embedding_mean_levels": emb_layers[0]["mean_levels"] if emb_layers else None,
        "embedding_one_level_rows": emb_layers[0].get("one_level_rows") if emb_layers else None,
        "raw_tensor_bytes": e["raw_tensor_bytes"],
        "baseline_perplexity": base, "perplexity": ppl,
        "ratio": {s: ppl[s] / base[s] for s in ppl},
        "seconds": round(seconds, 1), "load_avg": _load_avg(),
    }


def markdown(doc: dict) -> str:
    rows = sorted(doc["rows"], key=lambda r: (r["target_bits"], r["variant"] != "keep",
                                              r["finetune"]))
    sets = sorted({s for r in rows for s in r["perplexity"]})
    lines = [f"# {doc['model']}: the embedding quantized or kept", "",
             f"Machine: {doc['machine']}. Command: `{doc['command']}`.", "",
             "| variant | target bits | fine-tuned | file bytes | bits/param (all) "
             "| bits/weight (decoder Linears) | bits/weight (embedding) | embedding bytes "
             "| " + " | ".join(f"ppl {s} (× unquantized)" for s in sets)
             + " | seconds | load avg |",
             "|---" * (10 + len(sets)) + "|"]
    for r in rows:
        eb = r["embedding_bits_per_weight"]
        lines.append(
            f"| {r['label']} | {r['target_bits']} | {'yes' if r['finetune'] else 'no'} "
            f"| {r['file_bytes']:,} | {r['bits_per_weight_all']:.3f} "
            f"| {r['bits_per_weight_linears']:.3f} "
            f"| {'32 (fp32, as stored)' if eb is None else f'{eb:.3f}'} "
            f"| {r['embedding_bytes'] or r['embedding_params'] * 4:,} | "
            + " | ".join(f"{r['perplexity'][s]:.3f} ({r['ratio'][s]:.3f}×)" for s in sets)
            + f" | {r['seconds']:.0f} | {' '.join(map(str, r['load_avg']))} |")
    base = rows[0]["baseline_perplexity"] if rows else {}
    lines += ["", "Unquantized perplexity: "
              + ", ".join(f"{s} {base[s]:.3f}" for s in sets) + "."]
    for r in rows:
        if r["embedding_mean_levels"] is not None:
            lines.append(f"- {r['id']}: embedding rows {r['embedding_mean_levels']:.2f} levels "
                         f"on average, {r['embedding_one_level_rows']:,} rows with one level.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "smollm2_135m.yaml"))
    ap.add_argument("--store", default=str(ROOT / ".cache" / "bench-llm"),
                    help="the runs' store (shared with bench-llm: the load stage is reused)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--rates", type=float, nargs="+", default=None,
                    help="quantize.target_bits values (default: the config's)")
    ap.add_argument("--only", choices=("all", *VARIANTS), default="all")
    ap.add_argument("--no-finetune", action="store_true")
    ap.add_argument("--fresh", action="store_true", help="recompute rows already in the JSON")
    args = ap.parse_args(argv)

    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import torch

    from pipeline.api import compress, to_config
    from pipeline.executor import init_ray, shutdown_ray

    cfg = to_config(args.config, store=args.store)
    out = Path(args.out)
    path = out / "llm_embeddings.json"
    doc = {"rows": []}
    if path.exists() and not args.fresh:
        doc = json.loads(path.read_text())
    doc.update(model=Path(cfg.model.path or "").name, config=args.config,
               command="python benchmarks/llm_embeddings.py " + " ".join(argv or sys.argv[1:]),
               machine=f"{platform.machine()}, {os.cpu_count()} CPUs, torch "
               f"{torch.__version__}")
    rates = args.rates or [float(cfg.quantize.target_bits)]
    ft = cfg.finetune.enabled and not args.no_finetune
    variants = list(VARIANTS) if args.only == "all" else [args.only]
    init_ray(cfg.executor.address, cfg.executor.num_cpus)
    try:
        for rate in rates:
            for v in variants:
                rid = f"{v}@{rate}" + ("+ft" if ft else "")
                if any(r["id"] == rid for r in doc["rows"]):
                    continue
                over = {k: dict(x) for k, x in VARIANTS[v][1].items()}
                over["quantize"]["target_bits"] = rate
                over["finetune"] = {"enabled": ft}
                t = time.perf_counter()
                rep = compress(cfg, keep_ray=True, **over)
                row = row_of(rid, rate, ft, rep, args.store, time.perf_counter() - t)
                doc["rows"] = [r for r in doc["rows"] if r["id"] != rid] + [row]
                out.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(doc, indent=2))
                (out / "llm_embeddings.md").write_text(markdown(doc))
                print(json.dumps({k: row[k] for k in ("id", "file_bytes", "bits_per_weight_all",
                                                      "bits_per_weight_linears", "ratio")}),
                      flush=True)
    finally:
        shutdown_ray()
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
