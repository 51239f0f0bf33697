"""`hwq serve`: an OpenAI-style HTTP server over a (transformers causal LM, tokenizer) pair.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (the tokenizer's chat
template; 400 if it has none), ``GET /v1/models``, ``GET /health``. ``"stream": true`` answers
with server-sent events (``data: {...}`` chunks, then ``data: [DONE]``) as OpenAI does.

Bounded by `ServeLimits`: request body bytes (413), prompt tokens and max_tokens (400), the
requests admitted at once (running + waiting; beyond it 503 with Retry-After) and a deadline
per request (504; generation stops at the next token). Generation runs in a small thread pool
(one thread by default: one ``generate`` at a time), off the event loop, so the server keeps
answering /health and refusing what it cannot take while a request generates. A bad request
is a 4xx with an OpenAI-style ``{"error": {"message": ...}}``; an exception inside generation
is a 500 for that request only. SIGINT/SIGTERM stop accepting, cancel running generations at
their next token and close the server.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pipeline.runtime.serve_requests import (
    RequestError,
    parse_chat,
    parse_completion,
)

from .cli import NO_CACHE_HELP as _NO_CACHE

__all__ = ["ServeLimits", "Server", "ServerThread", "serve_forever", "add_commands"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeLimits:
    """What one server takes: sizes in bytes and tokens, times in seconds."""

    max_body_bytes: int = 1 << 20
    max_tokens: int = 512  # the largest max_tokens a request may ask for
    default_max_tokens: int = 16  # /v1/completions without max_tokens (OpenAI's default)
    max_prompt_tokens: int = 4096
    max_concurrency: int = 16  # requests admitted at once, running or waiting
    workers: int = 1  # generation threads
    timeout_s: float = 300.0  # per request, from admission to the last token


class _Job:
    """One generation: the prompt's ids, the sampling settings, and a cancel flag the
    stopping criterion reads between tokens (a deadline or a client that went away)."""

    def __init__(self, ids: list[int], req: dict, deadline: float) -> None:
        self.ids = ids
        self.req = req
        self.deadline = deadline
        self.cancel = threading.Event()
        self.timed_out = False


@dataclass
class _Result:
    ids: list[int]  # generated token ids (the EOS token included when it ended the text)
    finish: str  # "stop" | "length"
    timed_out: bool = False
    extra: dict = field(default_factory=dict)


class Server:
    """The aiohttp application around ``model`` (a transformers causal LM in eval mode) and
    ``tokenizer``. ``start(host, port)`` binds (port 0: any free port; returns the port)."""

    def __init__(
        self, model, tokenizer, *, name: str = "hwq", limits: ServeLimits | None = None
    ) -> None:
        self.model = model
        self.tok = tokenizer
        self.name = name
        self.limits = limits or ServeLimits()
        self.created = int(time.time())
        self._pool = ThreadPoolExecutor(
            max_workers=self.limits.workers, thread_name_prefix="hwq-generate"
        )
        self._active = 0
        self._jobs: set[_Job] = set()
        self._runner = None
        cfg = getattr(model, "config", None)
        self._context = int(getattr(cfg, "max_position_embeddings", 0) or 0)
        gc = getattr(model, "generation_config", None)
        eos = getattr(gc, "eos_token_id", None)
        if eos is None:
            eos = tokenizer.eos_token_id
        self._eos = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        pad = tokenizer.pad_token_id
        self._pad = pad if pad is not None else (min(self._eos) if self._eos else 0)

    # -- the application ---------------------------------------------------------------------

    def app(self):
        from aiohttp import web

        app = web.Application(
            client_max_size=self.limits.max_body_bytes, middlewares=[self._errors]
        )
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        from aiohttp import web

        self._runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=5.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        return site._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop accepting, cancel running generations at their next token, close."""
        for job in list(self._jobs):
            job.cancel.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await asyncio.get_running_loop().run_in_executor(None, self._pool.shutdown, True)

    # -- handlers ----------------------------------------------------------------------------

    @staticmethod
    def _error(
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        headers: dict | None = None,
    ):
        from aiohttp import web

        return web.json_response(
            {"error": {"message": message, "type": kind, "param": param, "code": None}},
            status=status,
            headers=headers,
        )

    @property
    def _errors(self):
        from aiohttp import web

        @web.middleware
        async def errors(request, handler):
            try:
                return await handler(request)
            except RequestError as e:
                return self._error(e.status, str(e), param=e.param)
            except web.HTTPException as e:
                if e.status < 400:
                    raise
                return self._error(
                    e.status,
                    e.reason
                    if e.status != 413
                    else f"request body is larger than the server's limit of "
                    f"{self.limits.max_body_bytes:,} bytes",
                )
            except (asyncio.CancelledError, ConnectionResetError):
                raise
            except Exception as e:  # noqa: BLE001 - one request's failure, not the server's
                log.exception("hwq serve: %s %s failed", request.method, request.path)
                return self._error(
                    500, f"internal error: {type(e).__name__}: {e}", kind="server_error"
                )

        return errors

    async def _health(self, request):
        from aiohttp import web

        return web.json_response({"status": "ok", "active": self._active})

    async def _models(self, request):
        from aiohttp import web

        return web.json_response(
            {
                "object": "list",
                "data": [
                    {"id": self.name, "object": "model", "created": self.created, "owned_by": "hwq"}
                ],
            }
        )

    async def _body(self, request) -> Any:
        from aiohttp import web

        if (request.content_length or 0) > self.limits.max_body_bytes:
            raise web.HTTPRequestEntityTooLarge(
                max_size=self.limits.max_body_bytes, actual_size=request.content_length
            )
        raw = await request.read()
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RequestError(f"the body is not valid JSON: {e}") from None

    async def _completions(self, request):
        body = await self._body(request)
        req = parse_completion(body, self.limits)
        prompt = req["prompt"]
        if isinstance(prompt, str):
            ids = self.tok(prompt)["input_ids"]
        else:
            vocab = len(self.tok)
            if any(t >= vocab for t in prompt):
                raise RequestError(
                    f"prompt token ids must be below the vocabulary size {vocab}", param="prompt"
                )
            ids = list(prompt)
        return await self._generate(request, req, ids, chat=False)

    async def _chat(self, request):
        body = await self._body(request)
        req = parse_chat(body, self.limits)
        if not getattr(self.tok, "chat_template", None):
            raise RequestError(
                f"model {self.name} has no chat template (its tokenizer "
                "defines none); use /v1/completions with a plain prompt"
            )
        text = self.tok.apply_chat_template(
            req["messages"], add_generation_prompt=True, tokenize=False
        )
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        return await self._generate(request, req, ids, chat=True)

    # -- generation --------------------------------------------------------------------------

    def _check_prompt(self, ids: list[int], req: dict) -> None:
        lim = self.limits
        if not ids:
            raise RequestError("the prompt is empty (no tokens)", param="prompt")
        if len(ids) > lim.max_prompt_tokens:
            raise RequestError(
                f"the prompt has {len(ids):,} tokens; this server takes at most "
                f"{lim.max_prompt_tokens:,}",
                param="prompt",
            )
        if self._context and len(ids) + req["max_tokens"] > self._context:
            raise RequestError(
                f"prompt ({len(ids)} tokens) + max_tokens ({req['max_tokens']}) "
                f"exceeds the model's context of {self._context} tokens",
                param="max_tokens",
            )

    async def _generate(self, request, req: dict, ids: list[int], *, chat: bool):
        self._check_prompt(ids, req)
        if self._active >= self.limits.max_concurrency:
            return self._error(
                503,
                f"server busy: {self._active} requests in progress (limit "
                f"{self.limits.max_concurrency}); retry later",
                kind="server_busy",
                headers={"Retry-After": "1"},
            )
        self._active += 1
        job = _Job(ids, req, time.monotonic() + self.limits.timeout_s)
        self._jobs.add(job)
        try:
            if req["stream"]:
                return await self._stream(request, job, chat)
            return await self._complete(job, chat)
        finally:
            job.cancel.set()  # a client gone mid-request: the worker stops at the next token
            self._jobs.discard(job)
            self._active -= 1

    def _text(self, gen: list[int], stops: list[str]) -> tuple[str, bool]:
        """The text of generated ids, cut at the first stop string; (text, stopped)."""
        text = self.tok.decode(gen, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
        return (text[:cut], True) if cut >= 0 else (text, False)

    def _usage(self, job: _Job, res: _Result) -> dict:
        n = len(res.ids)
        return {
            "prompt_tokens": len(job.ids),
            "completion_tokens": n,
            "total_tokens": len(job.ids) + n,
        }

    def _head(self, chat: bool, rid: str, chunk: bool) -> dict:
        obj = (
            ("chat.completion.chunk" if chunk else "chat.completion") if chat else "text_completion"
        )
        return {"id": rid, "object": obj, "created": int(time.time()), "model": self.name}

    async def _complete(self, job: _Job, chat: bool):
        from aiohttp import web

        loop = asyncio.get_running_loop()
        res = await loop.run_in_executor(self._pool, self._run, job, None)
        if res.timed_out:
            return self._error(
                504,
                f"generation did not finish within the server's "
                f"{self.limits.timeout_s:g} s per request",
                kind="timeout",
            )
        text, stopped = self._text(res.ids, job.req["stop"])
        finish = "stop" if stopped else res.finish
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return web.json_response(
            {**self._head(chat, rid, False), "choices": [choice], "usage": self._usage(job, res)}
        )

    async def _stream(self, request, job: _Job, chat: bool):
        from aiohttp import web

        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def post(kind: str, value: Any) -> None:  # from the worker thread
            loop.call_soon_threadsafe(events.put_nowait, (kind, value))

        def run() -> None:
            try:
                post("end", self._run(job, lambda t: post("tok", t)))
            except BaseException as e:  # noqa: BLE001 - reported on the stream
                post("err", e)

        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await resp.prepare(request)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        stops = job.req["stop"]
        hold = max((len(s) for s in stops), default=1) - 1

        async def send(
            delta: str | None, finish: str | None, role: bool = False, usage: dict | None = None
        ) -> None:
            if chat:
                d: dict[str, Any] = {"role": "assistant"} if role else {}
                if delta:
                    d["content"] = delta
                choice = {"index": 0, "delta": d, "finish_reason": finish, "logprobs": None}
            else:
                choice = {
                    "index": 0,
                    "text": delta or "",
                    "finish_reason": finish,
                    "logprobs": None,
                }
            msg = {**self._head(chat, rid, True), "choices": [choice]}
            if usage is not None:
                msg["usage"] = usage
            await resp.write(b"data: " + json.dumps(msg).encode() + b"\n\n")

        fut = loop.run_in_executor(self._pool, run)
        gen: list[int] = []
        sent = 0
        try:
            if chat:
                await send(None, None, role=True)
            while True:
                kind, value = await events.get()
                if kind == "tok":
                    gen.extend(value)
                    text, stopped = self._text(gen, stops)
                    if stopped:
                        job.cancel.set()
                        safe = len(text)
                    else:
                        # Hold back a possible start of a stop string and a partial UTF-8
                        # character (decoded as U+FFFD until its last byte arrives).
                        safe = len(text) - (hold if stops else 0)
                        while safe > sent and text[safe - 1] == "\ufffd":
                            safe -= 1
                    if safe > sent:
                        await send(text[sent:safe], None)
                        sent = safe
                    continue
                if kind == "err":
                    raise value
                res: _Result = value
                if res.timed_out:
                    err = {
                        "error": {
                            "message": f"generation did not finish within the "
                            f"server's {self.limits.timeout_s:g} s per request",
                            "type": "timeout",
                            "param": None,
                            "code": None,
                        }
                    }
                    await resp.write(b"data: " + json.dumps(err).encode() + b"\n\n")
                    break
                text, stopped = self._text(res.ids, stops)
                if len(text) > sent:
                    await send(text[sent:], None)
                usage = self._usage(job, res) if job.req["include_usage"] else None
                await send(None, "stop" if stopped else res.finish, usage=usage)
                break
            await resp.write(b"data: [DONE]\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            job.cancel.set()
            raise
        except Exception as e:  # noqa: BLE001 - the headers are sent: report on the stream
            log.exception("hwq serve: streamed generation failed")
            err = {
                "error": {
                    "message": f"internal error: {type(e).__name__}: {e}",
                    "type": "server_error",
                    "param": None,
                    "code": None,
                }
            }
            await resp.write(b"data: " + json.dumps(err).encode() + b"\n\n")
        finally:
            job.cancel.set()
            if not fut.done():  # the worker stops at its next token; wait so the bound holds
                await asyncio.shield(fut)
        await resp.write_eof()
        return resp

    def _run(self, job: _Job, on_tokens) -> _Result:
        """Generate for ``job`` in a worker thread; ``on_tokens(list[int])`` gets new ids."""
        import torch
        from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        req = job.req
        n0 = len(job.ids)
        stops = req["stop"]
        tok = self.tok

        class Stop(StoppingCriteria):
            def __call__(self, input_ids, scores, **kw):
                done = job.cancel.is_set()
                if not done and time.monotonic() > job.deadline:
                    job.timed_out = done = True
                if not done and stops:
                    text = tok.decode(input_ids[0, n0:].tolist(), skip_special_tokens=True)
                    done = any(s in text for s in stops)
                    req["stop_hit"] = done
                return torch.full(
                    (input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device
                )

        class Stream(BaseStreamer):
            def __init__(self) -> None:
                self.first = True

            def put(self, value) -> None:
                if self.first:  # generate() passes the prompt first
                    self.first = False
                    return
                on_tokens(value.reshape(-1).tolist())

            def end(self) -> None:
                pass

        if time.monotonic() > job.deadline:  # waited past its deadline in the queue
            return _Result([], "length", timed_out=True)
        sample = req["temperature"] > 0
        gc = GenerationConfig(
            max_new_tokens=req["max_tokens"],
            do_sample=sample,
            temperature=req["temperature"] if sample else None,
            top_p=req["top_p"] if sample else None,
            top_k=None if sample else None,
            eos_token_id=sorted(self._eos) or None,
            pad_token_id=self._pad,
        )
        if sample and req["seed"] is not None:
            torch.manual_seed(req["seed"])  # one worker thread by default: deterministic
        x = torch.tensor([job.ids], dtype=torch.long, device=self.model.device)
        with torch.inference_mode():
            out = self.model.generate(
                x,
                attention_mask=torch.ones_like(x),
                generation_config=gc,
                stopping_criteria=StoppingCriteriaList([Stop()]),
                streamer=Stream() if on_tokens is not None else None,
            )
        gen = out[0, n0:].tolist()
        ended = bool(gen) and gen[-1] in self._eos
        if job.timed_out:
            return _Result(gen, "length", timed_out=True)
        return _Result(gen, "stop" if ended or req["stop_hit"] else "length")


class ServerThread:
    """A server on its own event loop in a background thread (tests, benchmarks):
    ``with ServerThread(model, tok, port=0) as s: s.port``."""

    def __init__(self, model, tokenizer, *, host: str = "127.0.0.1", port: int = 0, **kw) -> None:
        self.server = Server(model, tokenizer, **kw)
        self.host = host
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, daemon=True, name="hwq-serve"
        )
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(
            self.server.start(host, port), self._loop
        ).result(timeout=30)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def close(self) -> None:
        if self._loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(self.server.stop(), self._loop).result(timeout=60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop.close()

    def __enter__(self) -> ServerThread:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def serve_forever(
    model,
    tokenizer,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    name: str = "hwq",
    limits: ServeLimits | None = None,
) -> None:
    """Serve until SIGINT or SIGTERM; prints the URL once listening (port 0: the real one)."""
    import signal

    async def main() -> None:
        server = Server(model, tokenizer, name=name, limits=limits)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        bound = await server.start(host, port)
        print(f"hwq serve: {name} on http://{host}:{bound} (Ctrl-C to stop)", flush=True)
        await stop.wait()
        print("hwq serve: stopping", flush=True)
        await server.stop()

    asyncio.run(main())


# -- the command line --------------------------------------------------------------------------


def _serve_cmd(args) -> int:
    import os
    import sys

    import torch

    if (args.file is None) == (args.hf_dir is None):
        raise ValueError("give exactly one of FILE (a .hwq file) and --hf-dir FOLDER")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"hwq serve: warning: listening on {args.host}, not loopback: anyone who can "
            "reach this address can use the model (there is no authentication)",
            file=sys.stderr,
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.hf_dir is not None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not os.path.isfile(os.path.join(args.hf_dir, "config.json")):
            raise FileNotFoundError(
                f"--hf-dir {args.hf_dir}: no config.json there (give a Hugging Face model folder)"
            )
        tok = AutoTokenizer.from_pretrained(args.hf_dir, local_files_only=True,
                                            trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(
            args.hf_dir, local_files_only=True, trust_remote_code=False).eval()
        name = args.name or os.path.basename(os.path.normpath(args.hf_dir))
    else:
        from pipeline.runtime import load  # the lookup-table runtime

        opts = {"client_kwargs": {"endpoint_url": args.endpoint_url}} if args.endpoint_url else None
        model, tok = load(args.file, threads=args.threads, storage_options=opts,
                          cache=not args.no_cache)
        if tok is None:
            raise ValueError(f"{args.file}: its hf/ folder has no tokenizer files to serve text")
        name = args.name or os.path.basename(args.file.rstrip("/"))
    limits = ServeLimits(
        max_body_bytes=args.max_body_bytes,
        max_tokens=args.max_tokens,
        max_prompt_tokens=args.max_prompt_tokens,
        max_concurrency=args.max_concurrency,
        workers=args.workers,
        timeout_s=args.timeout,
    )
    serve_forever(model, tok, host=args.host, port=args.port, name=name, limits=limits)
    return 0


def add_commands(sub) -> None:
    from pipeline.encode.cli import parse_size
    from pipeline.runtime.cli import _positive as positive

    d = ServeLimits()
    s = sub.add_parser(
        "serve",
        help="serve a .hwq file over an OpenAI-style HTTP API",
        description="Load a .hwq file with the lookup-table runtime (or a dense "
        "Hugging Face folder with --hf-dir) and answer POST /v1/completions and "
        "/v1/chat/completions (streaming too), GET /v1/models and /health. "
        "Listens on loopback unless --host says otherwise; there is no "
        "authentication. Ctrl-C or SIGTERM stops it.",
    )
    s.add_argument("file", nargs="?", help="a .hwq file or s3:// URL")
    s.add_argument(
        "--hf-dir",
        metavar="FOLDER",
        help="serve this Hugging Face model folder instead (dense, for comparisons)",
    )
    s.add_argument(
        "--port", type=int, default=8000, help="TCP port (0: any free one; default 8000)"
    )
    s.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1; another prints a warning)",
    )
    s.add_argument("--threads", type=positive, help="torch threads (default: torch's)")
    s.add_argument("--name", help="the model id /v1/models reports (default: the file name)")
    s.add_argument(
        "--max-concurrency",
        type=positive,
        default=d.max_concurrency,
        metavar="N",
        help=f"requests admitted at once, running or waiting; more get "
        f"503 (default {d.max_concurrency})",
    )
    s.add_argument(
        "--workers",
        type=positive,
        default=d.workers,
        metavar="N",
        help=f"generations running at once (default {d.workers})",
    )
    s.add_argument(
        "--max-tokens",
        type=positive,
        default=d.max_tokens,
        metavar="N",
        help=f"the largest max_tokens a request may ask for (default {d.max_tokens})",
    )
    s.add_argument(
        "--max-prompt-tokens",
        type=positive,
        default=d.max_prompt_tokens,
        metavar="N",
        help=f"longest prompt in tokens (default {d.max_prompt_tokens})",
    )
    s.add_argument(
        "--max-body-bytes",
        type=parse_size,
        default=d.max_body_bytes,
        metavar="SIZE",
        help="largest request body (default 1M)",
    )
    s.add_argument(
        "--timeout",
        type=float,
        default=d.timeout_s,
        metavar="SECONDS",
        help=f"per-request limit (default {d.timeout_s:g})",
    )
    s.add_argument("--no-cache", action="store_true", help=_NO_CACHE)
    s.add_argument("--endpoint-url", metavar="URL", help="S3-compatible endpoint for an s3:// file")
    s.set_defaults(func=_serve_cmd)
