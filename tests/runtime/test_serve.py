"""`hwq serve`'s HTTP server on the tiny Llama: answers equal model.generate, chat, streaming,
a bounded burst of concurrent requests, bad requests (4xx with a message) and a failing
generation (500) that leave the server serving. The server listens on a loopback port the
test picks (0 → a free one) and is shut down by the test."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from pipeline.runtime.serve import ServeLimits, ServerThread
from testkit.models import tiny_llama, tiny_tokenizer

PROMPTS = ["the quick brown fox", "hessian weighted", "a lazy dog while", "the file small"]
TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)


@pytest.fixture(scope="module")
def pair():
    model, tok = tiny_llama(), tiny_tokenizer()
    tok.chat_template = TEMPLATE
    return model, tok


@pytest.fixture(scope="module")
def server(pair):
    model, tok = pair
    with ServerThread(
        model,
        tok,
        name="tiny",
        limits=ServeLimits(max_concurrency=64, max_body_bytes=64 << 10, max_tokens=64),
    ) as s:
        yield s


def _greedy(model, tok, ids: list[int], n: int) -> tuple[str, int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=tok.eos_token_id
        )
    gen = out[0, len(ids) :].tolist()
    return tok.decode(gen, skip_special_tokens=True), len(gen)


def _post(url: str, body, raw: bytes | None = None) -> tuple[int, dict, bytes]:
    import urllib.error
    import urllib.request

    data = raw if raw is not None else json.dumps(body).encode()
    rq = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(rq, timeout=60) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def _get(url: str) -> dict:
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def test_completion_equals_greedy_generate_and_reports_usage(server, pair):
    model, tok = pair
    for p in PROMPTS[:2]:
        st, _, body = _post(
            server.url + "/v1/completions",
            {"model": "tiny", "prompt": p, "max_tokens": 8, "temperature": 0},
        )
        assert st == 200, body
        r = json.loads(body)
        want, n = _greedy(model, tok, tok(p)["input_ids"], 8)
        assert r["choices"][0]["text"] == want
        assert r["choices"][0]["finish_reason"] == "length"
        assert r["usage"] == {
            "prompt_tokens": len(tok(p)["input_ids"]),
            "completion_tokens": n,
            "total_tokens": len(tok(p)["input_ids"]) + n,
        }
    assert _get(server.url + "/v1/models")["data"][0]["id"] == "tiny"
    assert _get(server.url + "/health")["status"] == "ok"


def test_stop_string_cuts_the_text(server, pair):
    model, tok = pair
    want, _ = _greedy(model, tok, tok(PROMPTS[0])["input_ids"], 16)
    stop = want.strip()[:3]
    st, _, body = _post(
        server.url + "/v1/completions",
        {"prompt": PROMPTS[0], "max_tokens": 16, "temperature": 0, "stop": [stop]},
    )
    r = json.loads(body)
    assert st == 200 and r["choices"][0]["finish_reason"] == "stop"
    assert r["choices"][0]["text"] == want[: want.find(stop)]


def test_chat_uses_the_template(server, pair):
    model, tok = pair
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the fox"}]
    st, _, body = _post(
        server.url + "/v1/chat/completions", {"messages": msgs, "max_tokens": 6, "temperature": 0}
    )
    assert st == 200, body
    r = json.loads(body)
    ids = tok(
        tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False),
        add_special_tokens=False,
    )["input_ids"]
    assert r["object"] == "chat.completion"
    assert r["choices"][0]["message"] == {
        "role": "assistant",
        "content": _greedy(model, tok, ids, 6)[0],
    }


def test_chat_without_a_template_is_a_400(pair):
    model, _ = pair
    with ServerThread(model, tiny_tokenizer()) as s:
        st, _, body = _post(
            s.url + "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}
        )
        assert st == 400 and "chat template" in json.loads(body)["error"]["message"]


def _events(raw: bytes) -> list:
    out = []
    for block in raw.decode().split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            out.append(block[6:])
    return out


def test_streaming_sends_the_same_text_as_events(server, pair):
    model, tok = pair
    want, n = _greedy(model, tok, tok(PROMPTS[2])["input_ids"], 10)
    st, headers, raw = _post(
        server.url + "/v1/completions",
        {
            "prompt": PROMPTS[2],
            "max_tokens": 10,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert st == 200 and headers["Content-Type"].startswith("text/event-stream")
    ev = _events(raw)
    assert ev[-1] == "[DONE]"
    chunks = [json.loads(e) for e in ev[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == want
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == n
    # chat streaming: a role delta first, then content deltas
    st, _, raw = _post(
        server.url + "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "the dog"}],
            "max_tokens": 5,
            "temperature": 0,
            "stream": True,
        },
    )
    chunks = [json.loads(e) for e in _events(raw)[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert chunks[0]["object"] == "chat.completion.chunk"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_64_concurrent_requests_are_answered_or_refused_with_503(pair):
    """A bound of 8 admitted requests and generation held until the rest are answered:
    of 64 simultaneous requests exactly 8 get the right text and 56 a 503 with Retry-After;
    the server is idle and healthy afterwards."""
    model, tok = pair
    want = {p: _greedy(model, tok, tok(p)["input_ids"], 4)[0] for p in PROMPTS}
    release, done = threading.Event(), threading.Semaphore(0)
    real = model.generate

    def held(*a, **kw):
        release.wait(60)
        return real(*a, **kw)

    with ServerThread(model, tok, limits=ServeLimits(max_concurrency=8)) as s:
        model.generate = held
        try:
            results: list = [None] * 64

            def one(i: int) -> None:
                p = PROMPTS[i % len(PROMPTS)]
                st, h, body = _post(
                    s.url + "/v1/completions", {"prompt": p, "max_tokens": 4, "temperature": 0}
                )
                results[i] = (st, h, json.loads(body), p)
                done.release()

            threads = [threading.Thread(target=one, args=(i,)) for i in range(64)]
            for t in threads:
                t.start()
            for _ in range(56):  # the refused ones answer while 8 are held
                assert done.acquire(timeout=60)
            release.set()
            for t in threads:
                t.join(timeout=120)
        finally:
            release.set()
            del model.generate
        codes = [r[0] for r in results]
        assert sorted(codes) == [200] * 8 + [503] * 56, codes
        for st, h, body, p in results:
            if st == 200:
                assert body["choices"][0]["text"] == want[p]
            else:
                assert h["Retry-After"] == "1" and "busy" in body["error"]["message"]
        assert _get(s.url + "/health") == {"status": "ok", "active": 0}


@pytest.mark.parametrize(
    "body,raw,status,words",
    [
        (None, b'{"prompt": "the', 400, "not valid JSON"),
        (None, b"[1, 2]", 400, "JSON object"),
        ({"prompt": "x" * (65 << 10)}, None, 413, "larger than"),
        ({"prompt": "the", "frobnicate": 1}, None, 400, "'frobnicate'"),
        ({"prompt": "the", "n": 2}, None, 400, "n must be 1"),
        ({"prompt": "the", "max_tokens": "8"}, None, 400, "max_tokens"),
        ({"prompt": "the", "max_tokens": 10_000}, None, 400, "limit of 64"),
        ({"prompt": "the", "temperature": -1}, None, 400, "temperature"),
        ({"prompt": ["a", "b"]}, None, 400, "batches"),
        ({"prompt": [10**9]}, None, 400, "vocabulary"),
        ({"prompt": ""}, None, 400, "empty"),
        ({"max_tokens": 4}, None, 400, "prompt is required"),
        ({"prompt": "the", "stream": "yes"}, None, 400, "stream"),
    ],
)
def test_bad_requests_get_4xx_with_a_message_and_the_server_keeps_serving(
    server, pair, body, raw, status, words
):
    st, _, out = _post(server.url + "/v1/completions", body, raw)
    assert st == status, out
    assert words in json.loads(out)["error"]["message"]
    st, _, out = _post(server.url + "/v1/completions", {"prompt": "the", "max_tokens": 2})
    assert st == 200, out


def test_bad_chat_messages_and_unknown_paths(server):
    for msgs in ([], [{"role": "wizard", "content": "x"}], [{"role": "user", "content": 3}]):
        st, _, out = _post(server.url + "/v1/chat/completions", {"messages": msgs})
        assert st == 400 and "messages" in json.loads(out)["error"]["message"]
    st, _, out = _post(server.url + "/v1/nothing", {})
    assert st == 404 and json.loads(out)["error"]["message"]


def test_an_exception_in_generation_is_a_500_and_the_server_keeps_serving(pair):
    model, tok = pair
    calls = {"n": 0}
    real = model.generate

    def flaky(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("kernel exploded")
        return real(*a, **kw)

    with ServerThread(model, tok) as s:
        model.generate = flaky
        try:
            st, _, out = _post(s.url + "/v1/completions", {"prompt": "the", "max_tokens": 2})
            assert st == 500 and "kernel exploded" in json.loads(out)["error"]["message"]
            st, _, out = _post(s.url + "/v1/completions", {"prompt": "the", "max_tokens": 2})
            assert st == 200
        finally:
            del model.generate


def test_a_request_past_its_deadline_is_a_504(pair):
    import time

    model, tok = pair
    real = model.generate

    def slow(*a, **kw):
        time.sleep(0.6)  # past the deadline before the first token is checked
        return real(*a, **kw)

    with ServerThread(model, tok, limits=ServeLimits(timeout_s=0.3)) as s:
        model.generate = slow
        try:
            st, _, out = _post(s.url + "/v1/completions", {"prompt": "the", "max_tokens": 8})
        finally:
            del model.generate
        assert st == 504 and "within" in json.loads(out)["error"]["message"]
        st, _, out = _post(s.url + "/v1/completions", {"prompt": "the", "max_tokens": 2})
        assert st == 200


# (the dense folder is the slow one: the same command line, a server process more)
@pytest.mark.parametrize("source", [pytest.param("hf-dir", marks=pytest.mark.slow), "hwq"])
def test_hwq_serve_end_to_end_stops_on_sigterm(tmp_path, source):
    """The command line: a dense folder (--hf-dir) or a .hwq file through the lookup-table
    runtime served on a port the server picks, one request answered with the greedy
    completion, then SIGTERM ends it with status 0."""
    import os
    import re
    import signal
    import subprocess
    import sys

    from testkit.hwq_models import tiny_llama_hwq
    from testkit.models import tiny_llama_folder

    if source == "hwq":
        from pipeline.runtime import load

        what = [str(tiny_llama_hwq(tmp_path / "tiny"))]
        model, tok = load(what[0], mode="fast", threads=1)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = tiny_llama_folder(tmp_path / "tiny")
        what = ["--hf-dir", str(folder)]
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        tok = AutoTokenizer.from_pretrained(folder)
    want, _ = _greedy(model, tok, tok("the fox")["input_ids"], 3)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "serve", *what, "--port", "0", "--threads", "1",
         "--name", "tiny"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        line = proc.stdout.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        assert m, (line, proc.stderr.read() if proc.poll() is not None else "")
        url = f"http://127.0.0.1:{m.group(1)}"
        st, _, out = _post(url + "/v1/completions",
                           {"prompt": "the fox", "max_tokens": 3, "temperature": 0})
        assert json.loads(out)["choices"][0]["text"] == want
        assert st == 200 and json.loads(out)["model"] == "tiny"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
