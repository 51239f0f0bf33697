"""A bounded load generator for `hwq serve`: 1,000 requests, 64 at a time, against a server
started here (`hwq serve --hf-dir FOLDER --port 0` in its own process) on the tiny Llama of
testkit/models.py (or a given folder); every response is checked against this process's own
greedy `model.generate`, and the server's resident memory (psutil) is sampled before, during
and after.

    python benchmarks/serve_load.py                      # tiny Llama, 1000 requests, 64 at once
    python benchmarks/serve_load.py --hwq                # the tiny Llama as a .hwq file, served
                                                         # by the lookup-table runtime
    python benchmarks/serve_load.py --hwq FILE.hwq --requests 200 --max-tokens 16
    python benchmarks/serve_load.py --hf-dir FOLDER --requests 200 --max-tokens 16

Prints a table and writes benchmarks/results/serve_load.json. The issue's target: every
response correct and no growth in RSS across the 1,000 requests (measured after a warm-up of
one round of 64, so the allocator's first-use growth is not counted).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = [
    "the quick brown fox",
    "hessian weighted quantization",
    "a lazy dog while",
    "the file small",
    "every layer keeps",
    "jumps over the",
    "low and the",
    "of every layer",
    "the loss low",
    "quick brown",
    "weighted of",
    "dog jumps",
    "keeps the file",
    "over a lazy",
    "the quick",
    "while hessian",
]


def _start(folder: Path | None, args) -> tuple[subprocess.Popen, str]:
    what = [str(args.hwq)] if folder is None else ["--hf-dir", str(folder)]
    cmd = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "serve",
        *what,
        "--port",
        "0",
        "--threads",
        str(args.threads),
        "--max-concurrency",
        str(args.concurrency),
        "--max-tokens",
        str(max(args.max_tokens, 16)),
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)},
    )
    line = proc.stdout.readline()
    m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
    if not m:
        proc.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    return proc, f"http://127.0.0.1:{m.group(1)}"


def _expected(folder: Path | None, max_tokens: int, hwq: Path | None = None) -> dict[str, str]:
    """Each prompt's greedy completion, computed here: by transformers from `folder`, or by
    the runtime (fast mode, as the server runs it) from the .hwq file `hwq`."""
    import torch

    if hwq is not None:
        from pipeline.runtime import load

        model, tok = load(str(hwq), mode="fast", threads=1)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
    out = {}
    for p in PROMPTS:
        ids = tok(p, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            g = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=tok.eos_token_id,
            )
        out[p] = tok.decode(g[0, ids.shape[1] :].tolist(), skip_special_tokens=True)
    return out


async def _load(
    url: str, n: int, concurrency: int, max_tokens: int, want: dict[str, str], rss, start: int = 0
) -> dict:
    import aiohttp

    sem = asyncio.Semaphore(concurrency)
    lat: list[float] = []
    bad: list[str] = []
    codes: dict[int, int] = {}
    samples: list[tuple[int, int]] = []
    done = 0
    tokens = 0

    async def one(session, i: int) -> None:
        nonlocal done, tokens
        p = PROMPTS[(start + i) % len(PROMPTS)]
        async with sem:
            t0 = time.perf_counter()
            async with session.post(
                url + "/v1/completions",
                json={"prompt": p, "max_tokens": max_tokens, "temperature": 0},
            ) as r:
                body = await r.json()
                codes[r.status] = codes.get(r.status, 0) + 1
            lat.append(time.perf_counter() - t0)
        if r.status != 200:
            bad.append(f"request {i}: HTTP {r.status}: {body}")
        elif body["choices"][0]["text"] != want[p]:
            bad.append(f"request {i}: {body['choices'][0]['text']!r} != {want[p]!r}")
        else:
            tokens += body["usage"]["completion_tokens"]
        done += 1
        if done % 100 == 0:
            samples.append((done, rss()))

    timeout = aiohttp.ClientTimeout(total=600)
    conn = aiohttp.TCPConnector(limit=concurrency)
    t0 = time.perf_counter()
    async with aiohttp.ClientSession(timeout=timeout, connector=conn) as session:
        await asyncio.gather(*(one(session, i) for i in range(n)))
    wall = time.perf_counter() - t0
    lat.sort()
    return {
        "requests": n,
        "wall_s": wall,
        "requests_per_s": n / wall,
        "tokens_per_s": tokens / wall,
        "p50_s": lat[len(lat) // 2],
        "p95_s": lat[int(len(lat) * 0.95)],
        "max_s": lat[-1],
        "status": codes,
        "wrong": len(bad),
        "first_wrong": bad[:3],
        "rss_samples": samples,
    }


def main() -> None:
    import psutil

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hf-dir", type=Path, help="a model folder (default: the tiny Llama)")
    ap.add_argument("--hwq", nargs="?", const="tiny", default=None, metavar="FILE",
                    help="serve a .hwq file through the lookup-table runtime (no FILE: the "
                         "tiny Llama written as one, testkit/hwq_models.py)")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/serve_load.json")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.hf_dir
        if args.hwq is not None:
            folder = None
            if args.hwq == "tiny":
                from testkit.hwq_models import tiny_llama_hwq

                args.hwq = tiny_llama_hwq(Path(tmp) / "tiny-hwq")
            args.hwq = Path(args.hwq)
        elif folder is None:
            from testkit.models import tiny_llama_folder

            folder = tiny_llama_folder(Path(tmp) / "tiny-llama")
        want = _expected(folder, args.max_tokens, args.hwq)
        proc, url = _start(folder, args)
        try:
            ps = psutil.Process(proc.pid)

            def rss() -> int:
                return ps.memory_info().rss

            rss_start = rss()
            warm = asyncio.run(
                _load(url, args.concurrency, args.concurrency, args.max_tokens, want, rss)
            )
            rss_before = rss()
            run = asyncio.run(
                _load(url, args.requests, args.concurrency, args.max_tokens, want, rss, start=7)
            )
            rss_after = rss()
        finally:
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=60)
    result = {
        "model": (f"{'tiny Llama as a .hwq' if args.hwq and 'tiny-hwq' in str(args.hwq) else args.hwq}"
                  " (hwq runtime)" if args.hwq else
                  str(args.hf_dir or "tiny Llama (testkit/models.py)")),
        "requests": args.requests,
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "server_threads": args.threads,
        "warmup": {k: warm[k] for k in ("requests", "wrong", "status")},
        **run,
        "rss_at_start": rss_start,
        "rss_before": rss_before,
        "rss_after": rss_after,
        "rss_growth": rss_after - rss_before,
        "server_exit_status": rc,
        "machine": {
            "cpus": os.cpu_count(),
            "load_avg": os.getloadavg(),
            "python": platform.python_version(),
        },
    }
    MiB = 1 << 20
    rows = [
        (f"requests (after a warm-up of {args.concurrency})", f"{args.requests}"),
        ("concurrent", f"{args.concurrency}"),
        ("HTTP status", ", ".join(f"{k}: {v}" for k, v in sorted(run["status"].items()))),
        ("wrong responses", f"{run['wrong']}"),
        ("wall", f"{run['wall_s']:.1f} s"),
        ("requests/s", f"{run['requests_per_s']:.1f}"),
        ("generated tokens/s", f"{run['tokens_per_s']:.1f}"),
        (
            "latency p50 / p95 / max",
            f"{run['p50_s']:.2f} / {run['p95_s']:.2f} / {run['max_s']:.2f} s",
        ),
        ("server RSS at start", f"{rss_start / MiB:.1f} MiB"),
        (
            "server RSS before → after",
            f"{rss_before / MiB:.1f} → {rss_after / MiB:.1f} MiB "
            f"({(rss_after - rss_before) / MiB:+.1f} MiB)",
        ),
        (
            "server RSS every 100 requests",
            " ".join(f"{r / MiB:.1f}" for _, r in run["rss_samples"]),
        ),
        ("server exit status (SIGTERM)", f"{rc}"),
    ]
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    if run["wrong"] or warm["wrong"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
