"""hwq against the weight-only quantizers its users would otherwise pick, on one causal LM.

    make bench-llm                        # SmolLM2-135M (configs/smollm2_135m.yaml)
    python benchmarks/llm_peers.py --only hwq --fresh

Same model, same calibration windows, same evaluation windows for every row (the windows the
hwq run's load stage cut; see docs/LANGUAGE_MODELS.md for the protocol):

- the unquantized model;
- RTN group 128 (asymmetric min-max, fp16 scale and zero), 3 and 4 bits;
- HQQ group 128 (the `hqq` package), 3 and 4 bits;
- GPTQ (llm-compressor's `oneshot`), 3 and 4 bits, group 128 or the nearest it accepts;
- hwq per-channel: iterative ECSQ and uniform under one global λ at 3.25 and 4.25 bits (what
  the group-128 peers spend at 3 and 4 bits) and Hessian-weighted k-means (k = 8, 16), each
  without and with fine-tuning, through the real pipeline (embedded Ray, DeepSpeed); bits
  from the .hwq file.

Bits per weight are all-in over the quantized weights (codes + scales/zeros or codebooks +
code tables). Each row's seconds are its own compute (hwq: the stages that row ran, the shared
load and Hessian counted in every row that needs them). Rows are kept in
benchmarks/results/llm_peers.json and reused by a later invocation with the same settings
unless --fresh (so an interrupted benchmark resumes); the table, the plot and the JSON are
rewritten after every row. The load average is recorded beside the numbers.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

RESULTS = HERE / "results"

HWQ_ROWS = [  # (row id, label, quantize overrides), in the order they run
    # the lower budgets (issue: 2.0, 2.5 and 3.0 bits/weight all-in)
    ("hwq-ecsq-2.0", "hwq ECSQ, global λ, 2.0 bits", {"method": "ecsq", "target_bits": 2.0}),
    ("hwq-ecsq-2.5", "hwq ECSQ, global λ, 2.5 bits", {"method": "ecsq", "target_bits": 2.5}),
    ("hwq-ecsq-3.0", "hwq ECSQ, global λ, 3.0 bits", {"method": "ecsq", "target_bits": 3.0}),
    # the indices in rANS instead of Huffman (encode.coder=ans; the rate loop prices them so)
    ("hwq-ecsq-2.0-ans", "hwq ECSQ + rANS, global λ, 2.0 bits",
     {"method": "ecsq", "target_bits": 2.0}),
    ("hwq-ecsq-2.5-ans", "hwq ECSQ + rANS, global λ, 2.5 bits",
     {"method": "ecsq", "target_bits": 2.5}),
    ("hwq-ecsq-3.25", "hwq ECSQ, global λ, 3.25 bits",
     {"method": "ecsq", "target_bits": 3.25}),
    # error feedback across each Linear's input columns (quantize.feedback=ldl)
    ("hwq-ecsq-3.25-ldl", "hwq ECSQ + error feedback, global λ, 3.25 bits",
     {"method": "ecsq", "target_bits": 3.25, "feedback": "ldl"}),
    ("hwq-ecsq-4.25", "hwq ECSQ, global λ, 4.25 bits",
     {"method": "ecsq", "target_bits": 4.25}),
    # one-shot pruning (OBD with the Fisher) + ECSQ at the same all-in bits as the rows
    # above: does pruning pay for its masks on a language model? (ROW_PRUNE)
    ("hwq-ecsq-3.25-2of4", "hwq 2:4 OBD pruning + ECSQ, 3.25 bits",
     {"method": "ecsq", "target_bits": 3.25}),
    ("hwq-ecsq-3.25-keep0.9", "hwq 10% OBD pruning + ECSQ, 3.25 bits",
     {"method": "ecsq", "target_bits": 3.25}),
    ("hwq-ecsq-3.25-keep0.75", "hwq 25% OBD pruning + ECSQ, 3.25 bits",
     {"method": "ecsq", "target_bits": 3.25}),
    ("hwq-ecsq-4.25-2of4", "hwq 2:4 OBD pruning + ECSQ, 4.25 bits",
     {"method": "ecsq", "target_bits": 4.25}),
    # the same with rANS (encode.coder=ans): a Huffman code spends at least a bit a symbol,
    # so gap-coded masks of 75-90% kept weights cost a bit a weight; rANS costs their entropy
    ("hwq-ecsq-3.25-ans", "hwq ECSQ + rANS, global λ, 3.25 bits",
     {"method": "ecsq", "target_bits": 3.25}),
    ("hwq-ecsq-3.25-keep0.9-ans", "hwq 10% OBD pruning + ECSQ + rANS, 3.25 bits",
     {"method": "ecsq", "target_bits": 3.25}),
    ("hwq-ecsq-3.25-keep0.75-ans", "hwq 25% OBD pruning + ECSQ + rANS, 3.25 bits",
     {"method": "ecsq", "target_bits": 3.25}),
    ("hwq-ecsq-3.25-2of4-ans", "hwq 2:4 OBD pruning + ECSQ + rANS, 3.25 bits",
     {"method": "ecsq", "target_bits": 3.25}),
    # incoherence processing (quantize.rotate=hadamard), alone and with error feedback, at
    # each budget, rANS-coded: does a rotation help entropy-coded scalar quantization?
    ("hwq-ecsq-2.0-rot-ans", "hwq Hadamard rotation + ECSQ + rANS, 2.0 bits",
     {"method": "ecsq", "target_bits": 2.0, "rotate": "hadamard"}),
    ("hwq-ecsq-2.5-rot-ans", "hwq Hadamard rotation + ECSQ + rANS, 2.5 bits",
     {"method": "ecsq", "target_bits": 2.5, "rotate": "hadamard"}),
    ("hwq-ecsq-3.25-rot-ans", "hwq Hadamard rotation + ECSQ + rANS, 3.25 bits",
     {"method": "ecsq", "target_bits": 3.25, "rotate": "hadamard"}),
    ("hwq-ecsq-3.25-rot-ldl-ans", "hwq rotation + ECSQ + error feedback + rANS, 3.25 bits",
     {"method": "ecsq", "target_bits": 3.25, "rotate": "hadamard", "feedback": "ldl"}),
    ("hwq-ecsq-3.25-ldl-ans", "hwq ECSQ + error feedback + rANS, 3.25 bits",
     {"method": "ecsq", "target_bits": 3.25, "feedback": "ldl"}),
    ("hwq-uniform-3.25", "hwq uniform, global λ, 3.25 bits",
     {"method": "uniform", "target_bits": 3.25}),
    ("hwq-uniform-4.25", "hwq uniform, global λ, 4.25 bits",
     {"method": "uniform", "target_bits": 4.25}),
    ("hwq-hwkmeans-k8", "hwq Fisher k-means per channel, k=8",
     {"method": "hw_kmeans", "k": 8, "target_bits": None}),
    ("hwq-hwkmeans-k16", "hwq Fisher k-means per channel, k=16",
     {"method": "hw_kmeans", "k": 16, "target_bits": None}),
]
ROW_ENCODE = {r: {"coder": "ans"} for r in (
    "hwq-ecsq-2.0-ans", "hwq-ecsq-2.5-ans", "hwq-ecsq-3.25-ans", "hwq-ecsq-3.25-keep0.9-ans",
    "hwq-ecsq-3.25-keep0.75-ans", "hwq-ecsq-3.25-2of4-ans", "hwq-ecsq-2.0-rot-ans",
    "hwq-ecsq-2.5-rot-ans", "hwq-ecsq-3.25-rot-ans", "hwq-ecsq-3.25-rot-ldl-ans",
    "hwq-ecsq-3.25-ldl-ans")}
ROW_PRUNE = {  # prune settings of the one-shot pruning rows (every decoder Linear)
    "hwq-ecsq-3.25-2of4": {"enabled": True, "n_m": "2:4", "criterion": "obd"},
    "hwq-ecsq-3.25-keep0.9": {"enabled": True, "keep": {"*": 0.9}, "criterion": "obd"},
    "hwq-ecsq-3.25-keep0.75": {"enabled": True, "keep": {"*": 0.75}, "criterion": "obd"},
    "hwq-ecsq-4.25-2of4": {"enabled": True, "n_m": "2:4", "criterion": "obd"},
}
ROW_PRUNE.update({r + "-ans": ROW_PRUNE[r] for r in (
    "hwq-ecsq-3.25-keep0.9", "hwq-ecsq-3.25-keep0.75", "hwq-ecsq-3.25-2of4")})

# Rows also run with block-wise fine-tuning (finetune.mode=blockwise: a Ray task per decoder
# block, its codebooks against the unquantized hidden states) beside the end-to-end one.
BLOCKWISE_ROWS = ("hwq-ecsq-3.25", "hwq-ecsq-4.25", "hwq-ecsq-3.25-ans",
                  "hwq-ecsq-3.25-rot-ans")
# Rows whose settings only the per-tensor stages run (a rotation): no end-to-end fine-tune.
PER_TENSOR_ROWS = ("hwq-ecsq-2.0-rot-ans", "hwq-ecsq-2.5-rot-ans", "hwq-ecsq-3.25-rot-ans",
                   "hwq-ecsq-3.25-rot-ldl-ans")


def _same_settings(old, new, top: bool = True) -> bool:
    """Whether rows measured under config `old` hold under `new`: every setting `old` has is
    the same, except where the run went (store, executor) and quantize.target_bits (each row
    sets its own); settings added to hwq since (at their defaults, which keep the old
    behaviour, e.g. finetune.mode=auto → end_to_end for this resident model) are not
    compared."""
    if isinstance(old, dict) and isinstance(new, dict):
        if top:
            old = {k: v for k, v in old.items() if k not in ("store", "executor")}
            old["quantize"] = {k: v for k, v in old.get("quantize", {}).items()
                               if k != "target_bits"}
        return all(k in new and _same_settings(v, new[k], False) for k, v in old.items())
    return old == new


def _finetune_variants(rid: str, no_finetune: bool, block: dict | None = None
                       ) -> list[tuple[str, dict]]:
    """(row-id suffix, finetune settings) of an hwq row: none, end to end, block-wise (with
    `block` settings other than the defaults, e.g. {"block_lr": 1e-3}: a row of its own)."""
    out = [("", {"enabled": False})]
    if not no_finetune:
        if rid not in PER_TENSOR_ROWS:
            out.append(("+ft", {"enabled": True, "mode": "end_to_end"}))
        if rid in BLOCKWISE_ROWS:
            tag = "".join(f"-{k.removeprefix('block_')}{v:g}" for k, v in (block or {}).items())
            out.append(("+bw" + tag, {"enabled": True, "mode": "blockwise", **(block or {})}))
            # block-wise, then end to end from its codebooks (finetune.mode=both)
            if rid not in PER_TENSOR_ROWS:
                out.append(("+both" + tag, {"enabled": True, "mode": "both", **(block or {})}))
    return out


PEER_ROWS = [("awq", 3), ("awq", 4), ("gptq", 2), ("awq", 2), ("rtn", 3), ("hqq", 3),
             ("gptq", 3), ("rtn", 4), ("hqq", 4), ("gptq", 4),
             # llama.cpp file types with an importance matrix (benchmarks/llm_peer_llamacpp.py)
             ("llamacpp", "Q2_K"), ("llamacpp", "IQ3_XXS"), ("llamacpp", "Q3_K_S"),
             ("llamacpp", "Q3_K_M"), ("llamacpp", "Q4_K_M"), ("llamacpp", "IQ4_NL"),
             ("llamacpp", "Q4_0")]  # in the order they run
FAMILIES = {"rtn": "RTN g128", "hqq": "HQQ g128", "gptq": "GPTQ (llm-compressor)",
            "awq": "AWQ (llm-compressor)", "llamacpp": "llama.cpp + imatrix"}


def _load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _rows_file(out: Path) -> Path:
    return out / "llm_peers.json"


def _save(out: Path, doc: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = _rows_file(out).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    tmp.replace(_rows_file(out))
    (out / "llm_peers.md").write_text(markdown(doc))
    try:
        (out / "llm_peers.png").write_bytes(plot(doc))
    except Exception as e:  # noqa: BLE001 - a plot failure must not lose the numbers
        print(f"plot not written: {e}", flush=True)


def markdown(doc: dict) -> str:
    rows = doc["rows"]
    base = next((r for r in rows if r["id"] == "unquantized"), None)
    sets = list(base["perplexity"]) if base else []
    lines = [f"# {doc['model']}: hwq against RTN, HQQ, GPTQ, AWQ and llama.cpp", "",
             f"Calibration: {doc['calibration']}. Evaluation: {doc['evaluation']}. "
             f"Machine: {doc['machine']}.", "",
             "| method | bits/weight (all-in) | " + " | ".join(f"ppl {s}" for s in sets)
             + " | " + " | ".join(f"× unquantized ({s})" for s in sets)
             + " | " + " | ".join(f"KL {s}" for s in sets) + " | seconds | note |",
             "|---" * (4 + 3 * len(sets)) + "|"]
    for r in sorted(rows, key=lambda r: (r["bits_per_weight"] or 99, r["id"])):
        ppl = [r["perplexity"].get(s) for s in sets]
        rel = [p / base["perplexity"][s] if (p and base) else None for p, s in zip(ppl, sets, strict=True)]
        bits = f"{r['bits_per_weight']:.3f}" if r["bits_per_weight"] else (
            "–" if r["id"] != "unquantized" else f"{doc.get('source_bits', 32)} (source)")
        lines.append(f"| {r['label']} | {bits} | "
                     + " | ".join(f"{p:.3f}" if p else "–" for p in ppl) + " | "
                     + " | ".join(f"{x:.3f}" if x else "–" for x in rel) + " | "
                     + " | ".join(f"{r['kl'][s]:.4f}" if s in r.get("kl", {}) else "–"
                                  for s in sets)
                     + f" | {r['seconds']:.0f} | {r.get('note', '')} |")
    lines += ["", "![perplexity against bits per weight](llm_peers.png)", ""]
    with_budget = [r for r in rows if r.get("budget")]
    if with_budget:
        cats = sorted({c for r in with_budget for c in r["budget"]})
        lines += ["## Where hwq's bits go", "",
                  "Bits per quantized weight by category of the .hwq file (indices: the "
                  "entropy-coded codes; codebooks: the per-row levels, fp16; code_tables: "
                  "the Huffman/rANS tables; positions: pruned positions; header: the "
                  "quantized tensors' share of the JSON header). They sum to the all-in "
                  "figure; the unquantized tensors (embedding, norms) are outside it.", "",
                  "| row | all-in | " + " | ".join(cats) + " |",
                  "|---" * (2 + len(cats)) + "|"]
        for r in sorted(with_budget, key=lambda r: (r["bits_per_weight"], r["id"])):
            lines.append(f"| {r['label']} | {r['bits_per_weight']:.3f} | "
                         + " | ".join(f"{r['budget'].get(c, 0):.3f}" for c in cats) + " |")
        lines.append("")
    return "\n".join(lines)


def budget(m: dict) -> dict[str, float]:
    """{category: bits per quantized weight} of a run's .hwq: the file's indices, codebooks,
    code tables and pruned positions over the quantized weights, and `header` the rest of
    bits_per_weight (the quantized tensors' share of the header); they sum to it. Raw
    tensors (here the embedding and the norms, which the all-in figure leaves out, as the
    peers' do) are not in it."""
    e = m.get("encode", {})
    bits, q, bpw = e.get("bits") or {}, e.get("quantized_params"), m.get("bits_per_weight")
    if not bits or not q or not bpw:
        return {}
    out = {k: bits.get(k, 0) / q for k in ("indices", "codebooks", "code_tables", "positions")}
    out["header"] = max(0.0, bpw - sum(out.values()))
    return out


def plot(doc: dict) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["rows"]
    base = next(r for r in rows if r["id"] == "unquantized")
    sets = list(base["perplexity"])
    fig, axes = plt.subplots(1, len(sets), figsize=(6 * len(sets), 4.5), constrained_layout=True)
    axes = [axes] if len(sets) == 1 else list(axes)
    families = {}
    for r in rows:
        if r["bits_per_weight"]:
            families.setdefault(r["family"], []).append(r)
    for ax, s in zip(axes, sets, strict=True):
        for fam, rs in sorted(families.items()):
            rs = sorted(rs, key=lambda r: r["bits_per_weight"])
            ax.plot([r["bits_per_weight"] for r in rs],
                    [r["perplexity"][s] / base["perplexity"][s] for r in rs],
                    marker="o", label=fam)
        ax.axhline(1.0, color="grey", ls=":", lw=1)
        ax.set_yscale("log")
        ax.set_xlabel("bits per weight, all-in")
        ax.set_ylabel("perplexity / unquantized")
        ax.set_title(f"{doc['model']} — {s}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _evaluate(wl, model, load) -> dict:
    ev = wl.evaluate(model, load)
    return ev["by_set"]


def _peer_kl(wl, base_model, model, load, batch: int = 2) -> dict[str, float]:
    """Mean next-token KL(unquantized ‖ peer) per evaluation set, nats: both models in memory,
    the same windows and positions as perplexity (pipeline.evaluate.kl's measure)."""
    import torch

    from pipeline.evaluate.kl import chunk_kl

    out = {}
    with torch.no_grad():
        for name, windows in wl.eval_sets(load).items():
            total, positions = 0.0, 0
            for a in range(0, windows.shape[0], batch):
                w = windows[a:a + batch]
                kl = chunk_kl(base_model(w).logits[:, :-1], model(w).logits[:, :-1])
                total += float(kl.sum())
                positions += w.shape[0] * (w.shape[1] - 1)
            out[name] = total / max(positions, 1)
    return out


def _llamacpp(wl, model, names, file_type: str, calib, imatrix):
    """(the llama.cpp row's summary, the importance matrix): the matrix is computed on the
    first llama.cpp row (its seconds count in that row) and reused by the others. The model
    must come from a GGUF file: llama.cpp quantizes that file."""
    import llm_peer_llamacpp as lc

    from pipeline.executor import cache_dir

    folder, name = wl.adapter.resolve()
    if not str(name).endswith(".gguf"):
        raise ValueError("the llama.cpp rows quantize the model's GGUF file; this model "
                         f"is {name!r}")
    shared = 0.0
    if imatrix is None:
        t = time.perf_counter()
        imatrix = lc.importance_matrix(model, names, calib)
        shared = time.perf_counter() - t
    info = lc.llamacpp(model, names, file_type, Path(folder) / name, imatrix,
                       threads=os.cpu_count() or 1, workdir=cache_dir())
    info["shared_seconds"] = shared
    return info, imatrix


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "smollm2_135m.yaml"))
    ap.add_argument("--store", default=str(ROOT / ".cache" / "bench-llm"),
                    help="hwq's stage cache for the hwq rows (default .cache/bench-llm)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--only", choices=["all", "peers", "hwq"], default="all")
    ap.add_argument("--fresh", action="store_true", help="recompute rows already in the JSON")
    ap.add_argument("--no-finetune", action="store_true", help="skip the fine-tuned hwq rows")
    ap.add_argument("--block-lr", type=float, help="block-wise rows: finetune.block_lr (a "
                    "value other than the default is a row of its own)")
    ap.add_argument("--block-steps", type=int, help="block-wise rows: finetune.block_steps")
    ap.add_argument("--rows", help="only these hwq rows, comma-separated (e.g. hwq-ecsq-3.25)")
    ap.add_argument("--peers", help="only these peer rows, comma-separated row ids or methods "
                    "(e.g. llamacpp or gptq-2,awq-4; default: every peer row not yet run)")
    ap.add_argument("--variants", help="only these fine-tune variants of the hwq rows, "
                    "comma-separated: none, ft, bw, both (default: every one the row has)")
    args = ap.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.INFO, datefmt="%H:%M:%S",
                        format="%(asctime)s %(levelname).1s %(name)s: %(message)s")
    for noisy in ("fsspec", "s3fs", "botocore", "aiobotocore", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    import torch

    from pipeline import driver
    from pipeline.api import compress, to_config
    from pipeline.executor import init_ray, shutdown_ray
    from pipeline.graph import plan
    from pipeline.models.source import resolve_residency
    from pipeline.stages import default_stages
    from pipeline.store import StageDir
    from pipeline.workload import Workload

    out = Path(args.out)
    # Like the peers, the decoder Linears only: the embedding and the norms as stored (the
    # recorded stage keys; benchmarks/llm_embeddings.py measures the whole model compressed).
    cfg = to_config(args.config, store=args.store, quantize={"embeddings": "keep"},
                    encode={"raw_dtype": "keep"})
    doc = {"model": cfg.model.path, "rows": [], "machine": ""}
    if _rows_file(out).exists() and not args.fresh:
        old = json.loads(_rows_file(out).read_text())
        if _same_settings(old.get("config"), cfg.resolved()):
            doc = old
    doc.update(config=cfg.resolved(), model=Path(cfg.model.path or "").name or cfg.model.name,
               calibration=f"{cfg.data.calibration_windows} windows of {cfg.data.seq_len} "
               "tokens of Python standard-library source (seed "
               f"{cfg.seed})" if cfg.data.calibration == ["{stdlib}/*.py"] else
               f"{cfg.data.calibration_windows} × {cfg.data.seq_len} tokens",
               evaluation=", ".join(f"{k} ({v})" for k, v in cfg.data.eval.items())
               + f", non-overlapping {cfg.data.seq_len}-token windows",
               machine=f"{platform.machine()}, {os.cpu_count()} CPUs, torch "
               f"{torch.__version__}, torch threads {torch.get_num_threads()}")
    done = {r["id"] for r in doc["rows"]}
    if args.peers:  # the rows not asked for count as done
        wanted_peers = set(args.peers.split(","))
        done |= {f"{m}-{b}" for m, b in PEER_ROWS
                 if m not in wanted_peers and f"{m}-{b}" not in wanted_peers}

    def keep(row: dict) -> None:
        row["load_avg"] = _load_avg()
        doc["rows"] = [r for r in doc["rows"] if r["id"] != row["id"]] + [row]
        _save(out, doc)
        print(json.dumps({k: row[k] for k in ("id", "bits_per_weight", "perplexity",
                                              "seconds")}), flush=True)

    init_ray(cfg.executor.address, cfg.executor.num_cpus)
    try:
        t0 = time.perf_counter()
        rec = driver.run(cfg, until="load", init_executor=False)["stages"]["load"]
        # planned as the driver plans it: with model.residency resolved (a stage key input)
        load_plan = next(p for p in plan(resolve_residency(cfg), default_stages())
                         if p.stage.name == "load")
        assert load_plan.key == rec["key"], (load_plan.key, rec["key"])
        load = StageDir(driver.open_store(cfg), "load", load_plan.key)
        load.outputs = driver._read_manifest(load.store, load, load_plan,
                                             cfg)[0].model_dump()["outputs"]
        wl = Workload(cfg)
        names = load.read_json("model.json")["quantizable"]
        dtype = load.read_json("model.json").get("dtype") or "float32"
        doc["source_bits"] = {"float32": 32, "bfloat16": 16, "float16": 16}.get(dtype, 32)
        needs_model = "unquantized" not in done or (
            args.only in ("all", "peers") and any(f"{m}-{b}" not in done for m, b in PEER_ROWS))
        base_model = wl.model_from(load) if needs_model else None
        if "unquantized" not in done:
            t = time.perf_counter()
            ppl = _evaluate(wl, base_model, load)
            keep({"id": "unquantized", "label": "unquantized (the weights as loaded)",
                  "family": "unquantized", "bits_per_weight": None, "perplexity": ppl,
                  "seconds": time.perf_counter() - t + rec["compute_seconds"]})
        if args.only in ("all", "peers"):
            import llm_peer_methods as peers

            calib = wl.calibration(load)
            imatrix = None  # llama.cpp's importance matrix, computed once for its rows
            for method, bits in PEER_ROWS:
                rid = f"{method}-{bits}"
                if rid in done:
                    continue
                model = copy.deepcopy(base_model)
                t = time.perf_counter()
                label = (f"llama.cpp {bits} + imatrix" if method == "llamacpp"
                         else f"{method.upper()} {bits}-bit")
                try:
                    if method == "llamacpp":
                        info, imatrix = _llamacpp(wl, model, names, bits, calib, imatrix)
                    elif method in ("gptq", "awq"):
                        info = getattr(peers, method)(model, names, bits, 128, calib)
                    else:
                        info = getattr(peers, method)(model, names, bits, 128)
                except Exception as e:  # noqa: BLE001 - a peer that fails is a row that says so
                    keep({"id": rid, "label": label, "family": FAMILIES[method],
                          "bits_per_weight": None, "perplexity": {}, "seconds": 0.0,
                          "note": f"failed: {type(e).__name__}: {str(e).splitlines()[0]}"})
                    continue
                seconds = time.perf_counter() - t + info.pop("shared_seconds", 0.0)
                ppl = _evaluate(wl, model, load)
                if method != "llamacpp":
                    label = f"{method.upper()} g{info['group']} {bits}-bit"
                keep({"id": rid, "label": label, "family": FAMILIES[method],
                      "bits_per_weight": info["bits_per_weight"], "perplexity": ppl,
                      "kl": _peer_kl(wl, base_model, model, load),
                      "seconds": seconds, "note": info.get("note", ""),
                      **{k: info[k] for k in ("file_bits_per_weight", "tensor_types")
                         if k in info}})
                del model
        del base_model  # the hwq rows run in Ray workers: keep this process small
        import gc

        gc.collect()
        if args.only in ("all", "hwq"):
            wanted = args.rows.split(",") if args.rows else None
            rows = HWQ_ROWS if wanted is None else sorted(
                (r for r in HWQ_ROWS if r[0] in wanted), key=lambda r: wanted.index(r[0]))
            for rid, label, quant in rows:  # --rows: in the order given
                block = {k: v for k, v in (("block_lr", args.block_lr),
                                           ("block_steps", args.block_steps)) if v is not None}
                variants = args.variants.split(",") if args.variants else None
                for suffix, ft in _finetune_variants(rid, args.no_finetune, block):
                    row_id = rid + suffix
                    kind = suffix.lstrip("+").split("-")[0] or "none"
                    if row_id in done or (variants is not None and kind not in variants):
                        continue
                    enc = {"encode": ROW_ENCODE[rid]} if rid in ROW_ENCODE else {}
                    if rid in ROW_PRUNE:
                        enc["prune"] = ROW_PRUNE[rid]
                    rep = compress(cfg, quantize=quant, finetune=ft, keep_ray=True, **enc)
                    m = rep["metrics"]
                    secs = sum(s["compute_seconds"] for s in rep["stages"].values())
                    fam = label.split(",")[0].replace(", k=8", "").replace(", k=16", "")
                    more = {"+ft": (" + fine-tuning", " + FT")}.get(suffix, ("", ""))
                    if suffix.startswith("+both"):
                        more = (" + block-wise, then end-to-end fine-tuning", " + BW+FT")
                    elif suffix.startswith("+bw"):
                        more = (" + block-wise fine-tuning" + "".join(
                            f", {k} {v:g}" for k, v in block.items()), " + BW FT")
                    keep({"id": row_id, "label": label + more[0],
                          "family": (fam.rsplit(" k=", 1)[0] if "k-means" in fam else fam)
                          + more[1],
                          "bits_per_weight": m["bits_per_weight"],
                          "perplexity": m["decoded_perplexity_by_set"], "seconds": secs,
                          # mean next-token KL(unquantized ‖ decoded) per set, nats
                          "kl": m.get("decoded_kl_by_set", {}),
                          "feedback": {
                              "second_moment_seconds": m["hessian"].get(
                                  "second_moment", {}).get("seconds"),
                              **m["quantize"].get("feedback", {})},
                          "budget": budget(m),
                          "prune": m["quantize"].get("prune"),
                          "note": f"file {m['encode']['file_bytes']:,} bytes; "
                                  f"{m['encode']['compression_ratio_vs_fp32']:.1f}× vs fp32"})
        print(f"done in {time.perf_counter() - t0:.0f} s; {out / 'llm_peers.md'}", flush=True)
    finally:
        shutdown_ray()
    return 0


if __name__ == "__main__":
    sys.exit(main())
