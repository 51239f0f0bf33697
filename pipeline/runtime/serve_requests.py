"""Validation of `hwq serve`'s request bodies (OpenAI's completions and chat schemas).

Each parser returns a plain dict with every setting filled in, or raises `RequestError` (a
400 naming the field). Fields OpenAI clients commonly send are accepted (``model``, ``user``,
``seed``, ``stream_options`` ...); the ones this server cannot honour are accepted only at
their neutral value (``n`` = 1, penalties 0, no logprobs); any other field is refused by name,
so a typo never silently changes nothing.
"""

from __future__ import annotations

from typing import Any

__all__ = ["RequestError", "parse_completion", "parse_chat"]

_COMMON = {
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "stop",
    "stream",
    "stream_options",
    "seed",
    "n",
    "user",
    "frequency_penalty",
    "presence_penalty",
    "logprobs",
}
_COMPLETION = _COMMON | {"prompt", "echo"}
_CHAT = _COMMON | {"messages", "max_completion_tokens", "top_logprobs"}
_ROLES = ("system", "user", "assistant", "developer", "tool")


class RequestError(ValueError):
    """A request this server refuses: HTTP ``status`` with a message naming the field."""

    def __init__(self, message: str, *, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.param = param
        self.status = status


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _common(body: Any, allowed: set[str], limits, default_max: int) -> dict:
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise RequestError(
            f"unknown field {unknown[0]!r} (this server takes: {', '.join(sorted(allowed))})",
            param=unknown[0],
        )
    b = {k: v for k, v in body.items() if v is not None}  # null: the default, as OpenAI's

    def need(name: str, ok: bool, what: str) -> None:
        if name in b and not ok:
            raise RequestError(f"{name} must be {what}, got {json_type(b[name])}", param=name)

    need("model", isinstance(b.get("model"), str), "a string")
    need("user", isinstance(b.get("user"), str), "a string")
    need("stream", isinstance(b.get("stream"), bool), "true or false")
    need("seed", _is_int(b.get("seed")), "an integer")
    need(
        "temperature",
        _is_num(b.get("temperature")) and 0 <= b.get("temperature", 0) <= 2,
        "a number in [0, 2]",
    )
    need("top_p", _is_num(b.get("top_p")) and 0 < b.get("top_p", 1) <= 1, "a number in (0, 1]")
    need("n", _is_int(b.get("n")), "an integer")
    if b.get("n", 1) != 1:
        raise RequestError("n must be 1 (this server returns one choice per request)", param="n")
    for name in ("frequency_penalty", "presence_penalty"):
        need(name, _is_num(b.get(name)), "a number")
        if b.get(name, 0) != 0:
            raise RequestError(f"{name} is not supported (only 0)", param=name)
    so = b.get("stream_options", {})
    if (
        not isinstance(so, dict)
        or set(so) - {"include_usage"}
        or not isinstance(so.get("include_usage", False), bool)
    ):
        raise RequestError(
            'stream_options must be {"include_usage": true|false}', param="stream_options"
        )
    stop = b.get("stop", [])
    stop = [stop] if isinstance(stop, str) else stop
    if (
        not isinstance(stop, list)
        or len(stop) > 4
        or not all(isinstance(s, str) and s for s in stop)
    ):
        raise RequestError(
            "stop must be a non-empty string or a list of at most 4 of them", param="stop"
        )
    mt_name = "max_completion_tokens" if "max_completion_tokens" in b else "max_tokens"
    mt = b.get(mt_name, default_max)
    if not _is_int(mt) or mt < 1:
        raise RequestError(f"{mt_name} must be a positive integer", param=mt_name)
    if mt > limits.max_tokens:
        raise RequestError(
            f"{mt_name}={mt} is above this server's limit of {limits.max_tokens}", param=mt_name
        )
    return {
        "max_tokens": mt,
        "temperature": float(b.get("temperature", 1.0)),
        "top_p": float(b.get("top_p", 1.0)),
        "stop": stop,
        "stream": bool(b.get("stream", False)),
        "include_usage": bool(so.get("include_usage", False)),
        "seed": b.get("seed"),
        "stop_hit": False,
        "_body": b,
    }


def json_type(v: Any) -> str:
    """The JSON name of a value's type, for messages."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    return {
        int: "a number",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "an object",
    }.get(type(v), type(v).__name__)


def parse_completion(body: Any, limits) -> dict:
    """A /v1/completions body → settings; ``prompt`` is a string or a list of token ids."""
    req = _common(body, _COMPLETION, limits, min(limits.default_max_tokens, limits.max_tokens))
    b = req.pop("_body")
    if b.get("echo", False) is not False:
        raise RequestError("echo is not supported (only false)", param="echo")
    if b.get("logprobs") not in (None, 0):
        raise RequestError("logprobs is not supported", param="logprobs")
    if "prompt" not in b:
        raise RequestError("prompt is required", param="prompt")
    p = b["prompt"]
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]  # a batch of one
    if isinstance(p, list) and p and all(_is_int(t) and t >= 0 for t in p):
        req["prompt"] = p
    elif isinstance(p, str):
        req["prompt"] = p
    else:
        raise RequestError(
            "prompt must be a string, a list of token ids, or a list of one "
            "of those (batches of several prompts are not supported)",
            param="prompt",
        )
    return req


def parse_chat(body: Any, limits) -> dict:
    """A /v1/chat/completions body → settings with ``messages`` as [{role, content: str}]."""
    req = _common(body, _CHAT, limits, limits.max_tokens)
    b = req.pop("_body")
    if b.get("logprobs", False) is not False or "top_logprobs" in b:
        raise RequestError("logprobs is not supported", param="logprobs")
    msgs = b.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise RequestError("messages must be a non-empty array", param="messages")
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or set(m) - {"role", "content", "name"}:
            raise RequestError(f"{where} must be an object with role and content", param="messages")
        if m.get("role") not in _ROLES:
            raise RequestError(f"{where}.role must be one of {', '.join(_ROLES)}", param="messages")
        c = m.get("content")
        if isinstance(c, list):  # content parts: text only
            if not all(
                isinstance(x, dict) and x.get("type") == "text" and isinstance(x.get("text"), str)
                for x in c
            ):
                raise RequestError(
                    f'{where}.content parts must be text parts ({{"type": "text", "text": ...}})',
                    param="messages",
                )
            c = "".join(x["text"] for x in c)
        if not isinstance(c, str):
            raise RequestError(f"{where}.content must be a string", param="messages")
        out.append({"role": m["role"], "content": c})
    req["messages"] = out
    return req
