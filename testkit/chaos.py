"""A fault-injecting HTTP reverse proxy for S3: put it between s3fs/botocore and a real S3 server.

    with ChaosProxy("http://127.0.0.1:5000", mode="throttle", every=3) as proxy:
        store = Store("s3://bucket/run", {"client_kwargs": {"endpoint_url": proxy.url}, ...})
        store.write_bytes("a.bin", data)          # every 3rd request answers 503 SlowDown
        proxy.stats()["injected"]                 # {"throttle": 1}

Every request is forwarded byte for byte: the request line, the headers in their order (the Host
header too, unchanged: SigV4 signs it, so a server that checks signatures still accepts the
request) and the body, framed the way the client framed it (Content-Length, which also covers
botocore's `aws-chunked` content encoding, or Transfer-Encoding: chunked, passed through with its
chunk framing and trailers). The upstream status, headers and body come back unchanged; only the
framing of a chunked or close-delimited response body is redone.

Fault modes (see `Fault`): `throttle` (503 SlowDown), `error500` (500 InternalError), `deny`
(403 AccessDenied, like bad credentials; `code=`/`status=` make it any other S3 error), `drop`
(the connection closes with no response, or partway through the response) and `delay` (a sleep
before the request is handled; it combines with the others). A fault fires on the requests its
schedule picks among those it matches (method, key substring): every k-th, the first N, or each
with probability p drawn from the seed and the request's number, so a run whose client sends its
requests one at a time is reproduced exactly by the same seed. A fault with no schedule fires on
every request it matches: a permanent fault.

Run standalone for a benchmark: `python -m testkit.chaos http://127.0.0.1:5000 --mode throttle
--every 3 --port 9000`.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import http.client
import random
import socket
import struct
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit
from xml.sax.saxutils import escape

__all__ = ["ChaosProxy", "Fault", "Event", "MODES"]

# mode -> (status, S3 error code, message) of the error response it sends.
_ERRORS = {
    "throttle": (503, "SlowDown", "Please reduce your request rate."),
    "error500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "deny": (403, "AccessDenied", "Access Denied"),
}
MODES = (*_ERRORS, "drop", "delay")
_PIECE = 1 << 20  # bytes per read/write when streaming a body
_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection"}


@dataclass(frozen=True)
class Fault:
    """One fault and when it fires.

    mode: one of MODES.
    Which requests it matches: `method` (a method or a tuple of them, e.g. "PUT") and `key` (a
    substring of the URL-decoded request target: the path, /bucket/key with path-style
    addressing, and the query; e.g. "manifest.json", or "?uploadId=" for the calls of a
    multipart upload). None matches all.
    Which of the matched requests it fires on (n = 1, 2, ... counts the matched requests; every
    given condition must hold; none given: all of them):
      every: n % every == 0 (every k-th);  first: n <= first;  p: a draw from (seed, fault, n)
      is below p;  max_faults: it has fired fewer times than this.
    Mode parameters:
      delay_ms: how long `delay` sleeps.
      status, code, message: override the error response of throttle/error500/deny.
      after_bytes (drop): None: the request is read and the connection closed with no response;
        an int: the request is forwarded and the response cut after that many body bytes (never
        the whole body; an empty body is cut inside the headers).
      forward (drop with after_bytes None): forward the request first (the server acts on it,
        the client never hears), instead of not at all.
      reset (drop): close with a TCP reset rather than an orderly close.
    """

    mode: str
    every: int | None = None
    p: float | None = None
    first: int | None = None
    max_faults: int | None = None
    method: str | tuple[str, ...] | None = None
    key: str | None = None
    delay_ms: float = 200.0
    status: int | None = None
    code: str | None = None
    message: str | None = None
    after_bytes: int | None = None
    forward: bool = False
    reset: bool = False

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown fault mode {self.mode!r}; one of {', '.join(MODES)}")
        if self.every is not None and self.every < 1:
            raise ValueError("every must be >= 1")
        if self.p is not None and not 0.0 <= self.p <= 1.0:
            raise ValueError("p must be within [0, 1]")
        if isinstance(self.method, str):
            object.__setattr__(self, "method", (self.method.upper(),))
        elif self.method is not None:
            object.__setattr__(self, "method", tuple(m.upper() for m in self.method))

    def matches(self, method: str, path: str) -> bool:
        return ((self.method is None or method.upper() in self.method)
                and (self.key is None or self.key in path))

    def fires(self, n: int, seed: int, index: int) -> bool:
        """Whether it fires on its n-th matched request (max_faults is checked by the proxy)."""
        if self.every is not None and n % self.every:
            return False
        if self.first is not None and n > self.first:
            return False
        if self.p is not None:
            # A function of (seed, fault, n) alone: the same whatever other faults drew.
            return random.Random(f"{seed}/{index}/{n}").random() < self.p
        return True

    def error(self) -> tuple[int, str, str]:
        status, code, message = _ERRORS.get(self.mode, (500, "InternalError", "error"))
        return self.status or status, self.code or code, self.message or message


@dataclass(frozen=True)
class Event:
    """One request as the proxy handled it: status is what the client got (None: dropped)."""

    seq: int
    method: str
    path: str
    faults: tuple[str, ...]
    status: int | None


class ChaosProxy:
    """An HTTP reverse proxy to `upstream_url` that injects faults; see the module docstring.

    mode: a mode, a list of them or "a,b": one `Fault` each, all with the schedule and
    parameters given here (every, p, first, ... as in `Fault`). faults: more `Fault`s, each with
    its own schedule. For each request the faults are tried in order: every `delay` that fires
    sleeps, and the first other one that fires decides the response.

    Counters: `requests`, `injected` ({mode: count}) and `stats()`; `events` is the log of the
    last `max_events` requests.
    """

    def __init__(self, upstream_url: str, *, mode: str | Iterable[str] | None = None,
                 faults: Iterable[Fault] = (), seed: int = 0, every: int | None = None,
                 p: float | None = None, first: int | None = None,
                 max_faults: int | None = None, method: str | tuple[str, ...] | None = None,
                 key: str | None = None, delay_ms: float = 200.0, status: int | None = None,
                 code: str | None = None, message: str | None = None,
                 after_bytes: int | None = None, forward: bool = False, reset: bool = False,
                 host: str = "127.0.0.1", port: int = 0, upstream_timeout: float = 300.0,
                 max_events: int = 100_000):
        u = urlsplit(upstream_url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"upstream {upstream_url!r} is not an http(s)://host[:port] URL")
        self.upstream_url = upstream_url
        self._upstream = (u.scheme, u.hostname, u.port or (443 if u.scheme == "https" else 80))
        self.upstream_timeout = upstream_timeout
        modes = [mode] if isinstance(mode, str) else list(mode or ())
        modes = [m.strip() for ms in modes for m in ms.split(",") if m.strip()]
        common = dict(every=every, p=p, first=first, max_faults=max_faults, method=method,
                      key=key, delay_ms=delay_ms, status=status, code=code, message=message,
                      after_bytes=after_bytes, forward=forward, reset=reset)
        self._lock = threading.Lock()
        self._host, self._port = host, port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.events: collections.deque[Event] = collections.deque(maxlen=max_events)
        self.set_faults(*[Fault(m, **common) for m in modes], *faults, seed=seed)

    # -- configuration and counters ---------------------------------------------------------
    def set_faults(self, *faults: Fault, seed: int | None = None) -> None:
        """Replace the faults (none: a plain proxy) and reset every counter."""
        with self._lock:
            self.faults = tuple(faults)
            if seed is not None:
                self.seed = seed
            self._reset_locked()

    def reset(self) -> None:
        """Zero the counters and the event log; schedules start again from request 1."""
        with self._lock:
            self._reset_locked()

    def _reset_locked(self) -> None:
        self._seq = 0
        self._forwarded = 0
        self._upstream_errors = 0
        self._bytes_out = 0  # request bodies sent to the server (uploads)
        self._bytes_in = 0  # response bodies sent back to the client (downloads)
        self._by_method: collections.Counter[str] = collections.Counter()
        self._injected: collections.Counter[str] = collections.Counter()
        self._matched = [0] * len(self.faults)
        self._fired = [0] * len(self.faults)
        self.events.clear()

    @property
    def requests(self) -> int:
        """Requests seen (each attempt of a retried call counts)."""
        return self._seq

    @property
    def injected(self) -> dict[str, int]:
        """Faults injected, by mode."""
        with self._lock:
            return dict(self._injected)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"requests": self._seq, "forwarded": self._forwarded,
                    "upstream_errors": self._upstream_errors,
                    "bytes_out": self._bytes_out, "bytes_in": self._bytes_in,
                    "by_method": dict(self._by_method), "injected": dict(self._injected),
                    "faults": [{"fault": f, "matched": m, "fired": n}
                               for f, m, n in zip(self.faults, self._matched, self._fired, strict=True)]}

    def _decide(self, method: str, target: str) -> tuple[int, list[Fault], Fault | None]:
        path = unquote(target)
        with self._lock:
            self._seq += 1
            self._by_method[method] += 1
            delays: list[Fault] = []
            decisive: Fault | None = None
            for i, f in enumerate(self.faults):
                if not f.matches(method, path):
                    continue
                self._matched[i] += 1
                if decisive is not None and f.mode != "delay":
                    continue
                if f.max_faults is not None and self._fired[i] >= f.max_faults:
                    continue
                if f.fires(self._matched[i], self.seed, i):
                    self._fired[i] += 1
                    self._injected[f.mode] += 1
                    if f.mode == "delay":
                        delays.append(f)
                    else:
                        decisive = f
            return self._seq, delays, decisive

    def _record(self, seq: int, method: str, target: str, delays: list[Fault],
                decisive: Fault | None, status: int | None) -> None:
        faults = tuple(f.mode for f in delays) + ((decisive.mode,) if decisive else ())
        with self._lock:
            self.events.append(Event(seq, method, target, faults, status))

    def _add_bytes(self, out: int = 0, back: int = 0) -> None:
        with self._lock:
            self._bytes_out += out
            self._bytes_in += back

    def _count(self, what: str) -> None:
        with self._lock:
            if what == "forwarded":
                self._forwarded += 1
            else:
                self._upstream_errors += 1

    # -- lifecycle --------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """The endpoint_url to give the S3 client."""
        if self._server is None:
            raise RuntimeError("the proxy is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> ChaosProxy:
        """Listen (on a free port unless one was given) and serve in a daemon thread."""
        if self._server is not None:
            return self
        self._server = _Server((self._host, self._port), _Handler)
        self._server.proxy = self
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.1},
                                        name=f"chaos-proxy-{self._server.server_address[1]}",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and close every open client connection."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        for conn in list(server.connections):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> ChaosProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.url if self._server is not None else "stopped"
        return f"ChaosProxy({where} -> {self.upstream_url}, faults={list(self.faults)})"

    def _connect(self) -> http.client.HTTPConnection:
        scheme, host, port = self._upstream
        cls = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
        return cls(host, port, timeout=self.upstream_timeout)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
    proxy: ChaosProxy

    def __init__(self, *args, **kwargs):
        self.connections: set[socket.socket] = set()
        super().__init__(*args, **kwargs)


class _Dropped(Exception):
    """The connection to the client is to be closed with nothing more sent."""


class _ClientGone(Exception):
    """The client's request ended early or is malformed: close its connection."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 does: clients reuse connections
    server: _Server

    def setup(self):
        super().setup()
        self.server.connections.add(self.connection)

    def finish(self):
        self.server.connections.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format, *args):  # noqa: A002 - quiet: the proxy keeps its own log
        pass

    def do_GET(self):
        self._handle()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_PATCH = do_OPTIONS = do_GET

    # -- one request ------------------------------------------------------------------------
    def _handle(self) -> None:
        proxy = self.server.proxy
        method, target = self.command, self.path
        seq, delays, fault = proxy._decide(method, target)
        recorded = False

        def record(status: int | None) -> None:
            # Before the client hears back: whoever reads the counters then sees this request.
            nonlocal recorded
            if not recorded:
                recorded = True
                proxy._record(seq, method, target, delays, fault, status)

        self._on_status = record
        try:
            for f in delays:
                time.sleep(f.delay_ms / 1000)
            body = self._request_body()
            if fault is None or (fault.mode == "drop" and (fault.forward or
                                                           fault.after_bytes is not None)):
                proxy._count("forwarded")
                try:
                    resp, conn = self._forward(body)
                except (OSError, http.client.HTTPException) as e:
                    proxy._count("upstream_error")
                    self._send_error(502, "BadGateway", f"upstream: {e}", target, seq)
                    return
                try:
                    if fault is None:
                        self._relay(resp)
                    elif fault.after_bytes is not None:
                        self._relay(resp, cut=fault.after_bytes)  # raises _Dropped
                    else:
                        raise _Dropped
                finally:
                    conn.close()
            elif fault.mode == "drop":
                for _ in body:  # read the whole request, as a server would, then hang up
                    pass
                raise _Dropped
            else:
                for _ in body:  # drained, so the connection can carry the next request
                    pass
                self._send_error(*fault.error(), target, seq)
        except _Dropped:
            record(None)
            self._hang_up(fault is not None and fault.reset)
        except (_ClientGone, OSError, http.client.HTTPException):  # the client went away
            record(None)
            self.close_connection = True
        finally:
            record(None)

    def _request_body(self) -> Iterator[bytes]:
        """The raw bytes of the request body, as the client sent them (chunk framing kept)."""
        rfile = self.rfile
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                line = rfile.readline(65537)
                if not line.endswith(b"\n"):
                    raise _ClientGone("request body ended inside a chunk header")
                yield line
                try:
                    size = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise _ClientGone("malformed chunk header") from None
                if size == 0:
                    while True:  # trailers, up to the empty line
                        line = rfile.readline(65537)
                        if not line:
                            raise _ClientGone("request body ended inside its trailers")
                        yield line
                        if line in (b"\r\n", b"\n"):
                            return
                left = size + 2  # the data and its CRLF
                while left:
                    piece = rfile.read(min(left, _PIECE))
                    if not piece:
                        raise _ClientGone("request body ended inside a chunk")
                    left -= len(piece)
                    yield piece
        else:
            left = int(self.headers.get("Content-Length") or 0)
            while left:
                piece = rfile.read(min(left, _PIECE))
                if not piece:
                    raise _ClientGone("request body shorter than its Content-Length")
                left -= len(piece)
                yield piece

    def _forward(self, body: Iterator[bytes]):
        conn = self.server.proxy._connect()
        try:
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():  # order, duplicates and Host kept
                conn.putheader(name, value)
            conn.endheaders()
            for piece in body:
                conn.send(piece)
                self.server.proxy._add_bytes(out=len(piece))
            return conn.getresponse(), conn
        except BaseException:
            conn.close()
            raise

    def _relay(self, resp: http.client.HTTPResponse, cut: int | None = None) -> None:
        """Send the upstream response to the client; with `cut`, only part of it, then raise
        _Dropped."""
        bodyless = self.command == "HEAD" or resp.status in (204, 304) or resp.status < 200
        chunked = bool(resp.chunked) and not bodyless
        length = None if bodyless or chunked else resp.length
        close_delimited = not bodyless and not chunked and length is None
        head = [f"{self.protocol_version} {resp.status} {resp.reason}\r\n".encode("latin-1")]
        for name, value in resp.getheaders():
            if name.lower() not in _HOP:
                head.append(f"{name}: {value}\r\n".encode("latin-1"))
        if chunked:
            head.append(b"Transfer-Encoding: chunked\r\n")
        if close_delimited:
            head.append(b"Connection: close\r\n")
            self.close_connection = True
        head.append(b"\r\n")
        head_bytes = b"".join(head)
        w = self.wfile
        if cut is not None:
            self._on_status(None)
            total = 0 if bodyless else (length if length is not None else None)
            if total == 0:  # nothing to cut but the head itself
                w.write(head_bytes[: len(head_bytes) // 2])
                raise _Dropped
            budget = cut if total is None else min(cut, total - 1)
            w.write(head_bytes)
            sent = 0
            while sent < budget:
                piece = resp.read(min(_PIECE, budget - sent))
                if not piece:
                    break
                w.write(piece if not chunked else b"%x\r\n%s\r\n" % (len(piece), piece))
                sent += len(piece)
            raise _Dropped
        self._on_status(resp.status)
        w.write(head_bytes)
        if bodyless:
            return
        while True:
            piece = resp.read1(_PIECE) if chunked else resp.read(_PIECE)
            if not piece:
                break
            w.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            self.server.proxy._add_bytes(back=len(piece))
        if chunked:
            w.write(b"0\r\n\r\n")
        if length is not None and resp.length:  # upstream closed early: so must we
            raise _Dropped

    def _send_error(self, status: int, code: str, message: str, target: str, seq: int) -> None:
        request_id = f"CHAOS{seq:011d}"
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{escape(code)}</Code>'
                f"<Message>{escape(message)}</Message>"
                f"<Resource>{escape(urlsplit(target).path)}</Resource>"
                f"<RequestId>{request_id}</RequestId><HostId>chaos</HostId></Error>").encode()
        self._on_status(status)
        self.send_response_only(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("x-amz-request-id", request_id)
        self.send_header("Date", self.date_time_string())
        self.send_header("Server", "ChaosProxy")
        if self.command == "HEAD":  # S3 sends no body for HEAD
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    def _hang_up(self, reset: bool) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            if reset:
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                           struct.pack("ii", 1, 0))
            else:
                self.connection.shutdown(socket.SHUT_RDWR)
            self.connection.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m testkit.chaos",
                                 description="A fault-injecting proxy in front of an S3 server.")
    ap.add_argument("upstream", help="the S3 server, e.g. http://127.0.0.1:5000")
    ap.add_argument("--mode", action="append", default=[], help=f"one of {', '.join(MODES)}")
    ap.add_argument("--every", type=int)
    ap.add_argument("--p", type=float)
    ap.add_argument("--first", type=int)
    ap.add_argument("--max-faults", type=int)
    ap.add_argument("--method")
    ap.add_argument("--key")
    ap.add_argument("--delay-ms", type=float, default=200.0)
    ap.add_argument("--after-bytes", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--port", type=int, default=0)
    a = ap.parse_args(argv)
    proxy = ChaosProxy(a.upstream, mode=a.mode, every=a.every, p=a.p, first=a.first,
                       max_faults=a.max_faults, method=a.method, key=a.key,
                       delay_ms=a.delay_ms, after_bytes=a.after_bytes, seed=a.seed, port=a.port)
    with proxy:
        print(proxy.url, flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        s = proxy.stats()
        print({k: s[k] for k in ("requests", "forwarded", "by_method", "injected")})


if __name__ == "__main__":
    main()

