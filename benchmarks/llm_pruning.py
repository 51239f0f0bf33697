"""What one-shot pruning alone costs a causal LM: perplexity of the pruned, unquantized model.

    python benchmarks/llm_pruning.py            # SmolLM2-135M (configs/smollm2_135m.yaml)

The masks are the ones hwq's quantize stage computes (`pipeline.quantize.sparsity`: every row
keeps the same count, or N:M), by OBD with the run's Fisher (h·w²) at 10% and 25% of every
decoder Linear and 2:4, and by magnitude (w²) at 25%; the pruned weights are set to 0 and nothing else
changes. Beside `make bench-llm`'s pruning rows (pruning + ECSQ at the same all-in bits as
ECSQ alone) this separates what the cut costs from what the rate left to the kept weights
costs. Reuses the load and Hessian stages of `make bench-llm`'s store (.cache/bench-llm).
Prints a table and writes benchmarks/results/llm_pruning.{json,md} with the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

SETTINGS = [  # (id, criterion, keep, n_m): the bench-llm pruning rows' cuts, and magnitude
    ("obd-keep0.9", "obd", 0.9, None),
    ("obd-keep0.75", "obd", 0.75, None),
    ("obd-2of4", "obd", None, (2, 4)),
    ("magnitude-keep0.75", "magnitude", 0.75, None),
]


def _stage(cfg, name: str):
    from pipeline import driver
    from pipeline.graph import plan
    from pipeline.models.source import resolve_residency
    from pipeline.stages import default_stages
    from pipeline.store import StageDir

    p = next(p for p in plan(resolve_residency(cfg), default_stages()) if p.stage.name == name)
    sd = StageDir(driver.open_store(cfg), name, p.key)
    sd.outputs = driver._read_manifest(sd.store, sd, p, cfg)[0].model_dump()["outputs"]
    return sd


def markdown(doc: dict) -> str:
    base = doc["unquantized"]
    sets = sorted(base)
    lines = ["# One-shot pruning alone (no quantization): SmolLM2-135M", "",
             f"Load average {doc['load_avg'][0]} → {doc['load_avg'][1]}; every decoder Linear "
             "pruned, the embedding and head kept; perplexity on the bench-llm evaluation "
             "windows.", "",
             "| pruning | " + " | ".join(f"ppl {s} | × unpruned" for s in sets) + " |",
             "|---" * (1 + 2 * len(sets)) + "|",
             "| none | " + " | ".join(f"{base[s]:.3f} | 1.000" for s in sets) + " |"]
    for r in doc["rows"]:
        lines.append(f"| {r['id']} | " + " | ".join(
            f"{r['perplexity'][s]:.3f} | {r['perplexity'][s] / base[s]:.3f}" for s in sets) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "smollm2_135m.yaml"))
    ap.add_argument("--store", default=str(ROOT / ".cache" / "bench-llm"))
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    from pipeline import driver
    from pipeline.api import to_config
    from pipeline.executor import init_ray, shutdown_ray
    from pipeline.hessian.streamed_stage import read_tensor_hessian
    from pipeline.quantize.sparsity import row_mask, saliency
    from pipeline.quantize.tensors_stage import _h_rows
    from pipeline.workload import MODEL_JSON, Workload

    cfg = to_config(args.config, store=args.store, quantize={"embeddings": "keep"},
                    encode={"raw_dtype": "keep"}, finetune={"enabled": False})
    load_avg = [round(os.getloadavg()[0], 2)]
    init_ray(cfg.executor.address, cfg.executor.num_cpus)
    try:
        driver.run(cfg, until="hessian", init_executor=False)  # cached after bench-llm
        load, hess = _stage(cfg, "load"), _stage(cfg, "hessian")
        meta = load.read_json(MODEL_JSON)
        emb = set(meta.get("embeddings", []))
        names = [n for n in meta["quantizable"] if n not in emb]
        wl = Workload(cfg)
        model = wl.model_from(load)
        params = dict(model.named_parameters())
        dense = {n: params[n].detach().clone() for n in names}
        H = {}
        for n in names:
            R = dense[n].shape[0]
            shape = (R, dense[n].numel() // R)
            H[n] = np.ascontiguousarray(_h_rows(read_tensor_hessian(hess, n, shape), shape,
                                                slice(0, R)))
        t0 = time.perf_counter()
        doc = {"model": cfg.model.path, "unquantized": wl.evaluate(model, load)["by_set"],
               "rows": [], "tensors": len(names)}
        print(json.dumps({"unquantized": doc["unquantized"]}), flush=True)
        for rid, crit, keep, n_m in SETTINGS:
            t = time.perf_counter()
            kept = total = 0
            with torch.no_grad():
                for n in names:
                    W = dense[n].float().reshape(dense[n].shape[0], -1).numpy()
                    m = row_mask(saliency(W, H[n], crit), keep=keep, n_m=n_m)
                    kept, total = kept + int(m.sum()), total + m.size
                    params[n].copy_(torch.from_numpy(np.where(m, W, 0.0)).reshape(
                        dense[n].shape).to(params[n].dtype))
            ppl = wl.evaluate(model, load)["by_set"]
            row = {"id": rid, "criterion": crit, "keep": keep, "n_m": n_m,
                   "kept_fraction": kept / total, "perplexity": ppl,
                   "seconds": round(time.perf_counter() - t, 1)}
            doc["rows"].append(row)
            print(json.dumps(row), flush=True)
            with torch.no_grad():
                for n in names:
                    params[n].copy_(dense[n])
        doc["seconds"] = round(time.perf_counter() - t0, 1)
    finally:
        shutdown_ray()
    doc["load_avg"] = load_avg + [round(os.getloadavg()[0], 2)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "llm_pruning.json").write_text(json.dumps(doc, indent=1) + "\n")
    text = markdown(doc)
    (out / "llm_pruning.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
