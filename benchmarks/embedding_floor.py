"""What the embedding's per-row Fisher floor does on SmolLM2, the embedding alone quantized.

    python benchmarks/llm_embeddings.py --only quantize    # first: the store's load + Fisher
    python benchmarks/embedding_floor.py --lam 1.326e-11 --floors 0.01 0.1 1.0

Reads the load and Hessian stages of configs/smollm2_135m.yaml's run in the bench store,
quantizes only the token embedding (tied with the head) per row with ECSQ at the given λ
(the λ a run found; the decoder Linears stay unquantized) with each row's Fisher raised to
`floor` × the tensor's mean (`quantize.embedding_floor`), and scores the model on the
evaluation texts. Prints the Fisher's row-mean quantiles (relative to the mean) and, per floor,
the embedding's all-in bits per weight (the rate model), its mean level count and the
perplexity; writes benchmarks/results/embedding_floor.json (with the load average).
No Ray; one process.
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "smollm2_135m.yaml"))
    ap.add_argument("--store", default=str(ROOT / ".cache" / "bench-llm"))
    ap.add_argument("--lam", type=float, required=True, help="λ (a run's quantize.lambda)")
    ap.add_argument("--floors", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    ap.add_argument("--out", default=str(HERE / "results" / "embedding_floor.json"))
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    from pipeline.api import to_config
    from pipeline.graph import plan
    from pipeline.hessian.stage import read_hessian
    from pipeline.quantize.rate import RowBlock, solve_rows_at
    from pipeline.quantize.rows import RowsResult, floor_hessian, rate
    from pipeline.quantize.rows_stage import embedding_floor, frequency_ranked
    from pipeline.store import StageDir, Store
    from pipeline.workload import Workload

    cfg = to_config(args.config, store=args.store)
    keys = {p.stage.name: p.key for p in plan(cfg)}
    store = Store(args.store, create=False)
    load, hess = StageDir(store, "load", keys["load"]), StageDir(store, "hessian", keys["hessian"])
    wl = Workload(cfg)
    model = wl.model_from(load)
    name = load.read_json("model.json")["embeddings"][0]
    W0 = model.get_parameter(name).detach().clone()
    H = floor_hessian(np.asarray(read_hessian(hess, {name: tuple(W0.shape)}, names=[name])[name],
                                 np.float32).reshape(W0.shape), cfg.quantize.hessian_floor)
    q = [0.01, 0.1, 0.5, 0.9, 0.99]
    rel = np.quantile(H.mean(1), q) / float(H.mean(dtype=np.float64))
    doc = {"command": "python benchmarks/embedding_floor.py " + " ".join(argv or sys.argv[1:]),
           "tensor": name, "lam": args.lam,
           "fisher_row_mean_quantiles_over_mean": dict(zip(map(str, q), rel.tolist(), strict=True)),
           "rows": []}
    print(f"{name}: Fisher row means / tensor mean at quantiles {q}: "
          + ", ".join(f"{x:.3g}" for x in rel), flush=True)

    def score() -> dict:
        r = wl.evaluate(model, load)
        return {"perplexity": r["value"], "by_set": r["by_set"]}

    doc["unquantized"] = score()
    W = W0.numpy()
    for f in args.floors:
        Hf = embedding_floor(H, f)
        blocks = [RowBlock(np.ascontiguousarray(W[a:a + 2048]), np.ascontiguousarray(Hf[a:a + 2048]),
                           a) for a in range(0, W.shape[0], 2048)]
        t = time.perf_counter()
        res = RowsResult.concat(solve_rows_at(blocks, args.lam, "ecsq", k_max=cfg.quantize.k_max,
                                              iters=cfg.quantize.iters, seed=cfg.seed))
        cb, idx = frequency_ranked(res)
        with torch.no_grad():
            model.get_parameter(name).copy_(torch.from_numpy(np.take_along_axis(cb, idx, 1)))
        row = {"floor": f, "all_in_bits": rate(res), "mean_levels": float(res.levels.mean()),
               "one_level_rows": int((res.levels == 1).sum()), **score(),
               "seconds": round(time.perf_counter() - t, 1),
               "load_avg": [round(x, 2) for x in os.getloadavg()]}
        row["ratio"] = row["perplexity"] / doc["unquantized"]["perplexity"]
        doc["rows"].append(row)
        print(json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2))
    print("| floor | embedding bits/weight | mean levels | perplexity | × unquantized |")
    print("|---|---|---|---|---|")
    for r in doc["rows"]:
        print(f"| {r['floor']} | {r['all_in_bits']:.3f} | {r['mean_levels']:.2f} "
              f"| {r['perplexity']:.3f} | {r['ratio']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
