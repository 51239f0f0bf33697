"""Fault injection between s3fs/botocore and S3 (moto on loopback), through testkit.chaos.

What hwq's Store (key, secret and endpoint_url only: botocore's "legacy" retries, 5 attempts,
and s3fs's own 5 tries around each call) rides out, measured here:
  503 SlowDown   retried by botocore and again by s3fs (it matches "SlowDown"): 24 in a row pass
  dropped conn.  retried by botocore and s3fs (ConnectionClosedError): far more than 5 in a row
  500            botocore only (s3fs does not retry InternalError): the 5th in a row fails
  cut response   s3fs only (the body is read after botocore returns): the 5th in a row fails
Raising botocore's attempts (config_kwargs retries) covers the 500s; only s3fs's `retries`
attribute covers the cut bodies. Tests that count attempts patch botocore's backoff sleep to
10 ms (`fast_backoff`): the number of attempts is the same, the test is seconds shorter.
"""

from __future__ import annotations

import http.client
import os
import socket
import socketserver
import tempfile
import threading
import urllib.error
import urllib.request

import pytest

from pipeline.store import Store, StoreAccessError
from testkit.chaos import ChaosProxy, Fault

SMALL = b'{"step": 1}\n'
BIG = os.urandom(12 << 20)  # > s3fs's 5 MiB minimum part; Store puts it with one PUT (< 100 MiB)


def _opts(endpoint: str, **extra) -> dict:
    return {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": endpoint},
            **extra}


@pytest.fixture(autouse=True)
def _default_retry_config(monkeypatch, tmp_path):
    """botocore's defaults, whatever the machine's AWS config says."""
    monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)
    monkeypatch.delenv("AWS_RETRY_MODE", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))


@pytest.fixture
def proxy(s3_endpoint):
    import s3fs

    with ChaosProxy(s3_endpoint) as p:
        yield p
    s3fs.S3FileSystem.clear_instance_cache()  # its pooled connections led to this proxy


@pytest.fixture
def direct(s3_bucket):
    """The bucket's run folder, read around the proxy (to check what the server holds)."""
    url, opts = s3_bucket
    return Store(url, opts)


def _store(s3_bucket, proxy, **extra) -> Store:
    url, _ = s3_bucket
    return Store(url, _opts(proxy.url, **extra))


@pytest.fixture
def fast_backoff(monkeypatch):
    import botocore.retries.standard
    import botocore.retryhandler

    # Read when a client is made: every Store below makes a fresh one (a new endpoint).
    monkeypatch.setattr(botocore.retryhandler, "delay_exponential", lambda **kw: 0.01)
    monkeypatch.setattr(botocore.retries.standard.ExponentialBackoff, "delay_amount",
                        lambda self, context: 0.01)
    # s3fs's own retries sleep 0.1 · 1.7^i s (about 20 s over 9 tries): the same count of
    # tries, 10 ms apart.
    import asyncio
    import types

    import s3fs.core

    real_sleep = asyncio.sleep
    fast = types.SimpleNamespace(**{k: getattr(asyncio, k) for k in dir(asyncio)
                                    if not k.startswith("__")})
    fast.sleep = lambda delay, *a, **kw: real_sleep(min(delay, 0.01), *a, **kw)
    monkeypatch.setattr(s3fs.core, "asyncio", fast)


def _workout(store: Store, direct: Store) -> None:
    """Every Store operation hwq uses, checked byte for byte against the server."""
    store.check_access()
    store.write_bytes("stages/a/manifest.json", SMALL)
    store.write_bytes("stages/a/big.bin", BIG)
    assert store.exists("stages/a/big.bin") and store.size("stages/a/big.bin") == len(BIG)
    assert store.read_bytes("stages/a/manifest.json") == SMALL
    assert store.read_bytes("stages/a/big.bin") == BIG
    assert store.sha256("stages/a/big.bin")[1] == len(BIG)
    with store.open("stages/a/big.bin") as f:  # a range read
        f.seek(5_000_000)
        assert f.read(1000) == BIG[5_000_000:5_001_000]
    assert store.list("stages") == ["a/big.bin", "a/manifest.json"]
    assert direct.read_bytes("stages/a/big.bin") == BIG
    store.remove("stages/a")
    assert store.list("stages") == [] and direct.list("stages") == []


# -- a plain proxy ----------------------------------------------------------------------------


def test_passthrough_is_byte_exact(s3_bucket, proxy, direct):
    store = _store(s3_bucket, proxy)
    _workout(store, direct)
    # Multipart (s3fs uses it from 2 x 50 MiB up in put_file; forced here with 5 MiB parts),
    # a DELETE, and the server agrees on every byte.
    with tempfile.NamedTemporaryFile() as f:
        f.write(BIG)
        f.flush()
        store.fs.put_file(f.name, store.path("mp.bin"), chunksize=5 << 20)
    assert direct.read_bytes("mp.bin") == BIG
    store.fs.rm_file(store.path("mp.bin"))
    assert not direct.exists("mp.bin")
    s = proxy.stats()
    assert s["injected"] == {} and s["requests"] == s["forwarded"] and s["upstream_errors"] == 0
    assert {"GET", "HEAD", "PUT", "POST", "DELETE"} <= set(s["by_method"])
    parts = [e for e in proxy.events if e.method == "PUT" and "partNumber=" in e.path]
    assert len(parts) == 3 and all(e.status == 200 for e in parts)


class _RawUpstream(socketserver.ThreadingTCPServer):
    """Records the raw bytes of each request; answers with a chunked body and repeated headers."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self):
        self.got: list[bytes] = []
        super().__init__(("127.0.0.1", 0), _RawHandler)


class _RawHandler(socketserver.StreamRequestHandler):
    def handle(self):
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            head += self.rfile.readline()
        body = b""
        if b"chunked" in head.lower():
            while True:
                line = self.rfile.readline()
                body += line
                if int(line.split(b";")[0], 16) == 0:
                    while (line := self.rfile.readline()) not in (b"\r\n", b""):
                        body += line
                    body += line
                    break
                body += self.rfile.read(int(line.split(b";")[0], 16) + 2)
        self.server.got.append(head + body)
        self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Dup: a\r\nX-Dup: b\r\nConnection: close\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")


def test_headers_and_chunked_framing_pass_unchanged():
    upstream = _RawUpstream()
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    try:
        with ChaosProxy(f"http://127.0.0.1:{upstream.server_address[1]}") as p:
            host, port = p.url.removeprefix("http://").split(":")
            head = (b"PUT /b/k%20x?partNumber=1 HTTP/1.1\r\nHost: s3.example:9\r\n"
                    b"X-Amz-Date: 1\r\nx-amz-meta-a: 1\r\nx-amz-meta-a: 2\r\n"
                    b"Content-Encoding: aws-chunked\r\nTransfer-Encoding: chunked\r\n\r\n")
            body = b"4;chunk-signature=ab\r\nwxyz\r\n3\r\n123\r\n0\r\nx-amz-checksum-crc32: q==\r\n\r\n"
            with socket.create_connection((host, int(port))) as s:
                s.sendall(head + body)
                resp = http.client.HTTPResponse(s, method="PUT")
                resp.begin()
                assert resp.status == 200 and resp.read() == b"hello world"
                assert resp.msg.get_all("X-Dup") == ["a", "b"]
        assert upstream.got == [head + body]  # Host included: a SigV4 signature stays valid
    finally:
        upstream.shutdown()
        upstream.server_close()


# -- transient faults: retried, and the data is intact --------------------------------------------

TRANSIENT = {
    "throttle-every-3rd": [Fault("throttle", every=3)],
    "500-every-3rd": [Fault("error500", every=3)],
    "drop-every-3rd": [Fault("drop", every=3)],
    "drop-after-the-server-acted": [Fault("drop", every=3, forward=True, reset=True)],
    "cut-every-2nd-get": [Fault("drop", method="GET", every=2, after_bytes=4096)],
    "manifest-puts-throttled": [Fault("throttle", method="PUT", key="manifest.json", first=3)],
    "mixed-seeded": [Fault("delay", p=0.3, delay_ms=20), Fault("throttle", p=0.15),
                     Fault("error500", p=0.1), Fault("drop", p=0.1)],
}


@pytest.mark.parametrize("case", sorted(TRANSIENT))
def test_transient_faults_are_retried(case, s3_bucket, proxy, direct, request):
    if case != "drop-every-3rd":  # one case waits botocore's real backoff (0-1 s per retry)
        request.getfixturevalue("fast_backoff")
    proxy.set_faults(*TRANSIENT[case], seed=7)
    _workout(_store(s3_bucket, proxy), direct)
    injected = proxy.injected
    assert injected and all(n > 0 for n in injected.values()), injected
    for mode in {f.mode for f in TRANSIENT[case]} - {"delay"}:
        assert injected.get(mode, 0) > 0 or case == "mixed-seeded", (mode, injected)


def test_a_read_timeout_is_retried(s3_bucket, proxy, direct):
    direct.write_bytes("x.json", SMALL)
    proxy.set_faults(Fault("delay", method="GET", first=1, delay_ms=1500))
    store = _store(s3_bucket, proxy, config_kwargs={"read_timeout": 0.5})
    assert store.read_bytes("x.json") == SMALL
    s = proxy.stats()  # the first GET still sleeps: its event is logged when it ends
    assert s["by_method"]["GET"] == 2 and s["faults"][0]["fired"] == 1


def test_schedules_are_deterministic(proxy, s3_endpoint):
    def statuses(seed):
        proxy.set_faults(Fault("error500", p=0.3), Fault("throttle", method="GET", every=4),
                         seed=seed)
        out = []
        for _ in range(30):
            try:
                out.append(urllib.request.urlopen(proxy.url + "/", timeout=10).status)
            except urllib.error.HTTPError as e:
                out.append(e.code)
        return out

    a, b = statuses(1), statuses(1)
    assert a == b and 500 in a and 503 in a and 200 in a
    assert a != statuses(2)
    assert proxy.stats()["faults"][1]["matched"] == 30


# -- how many in a row the current Store settings ride out --------------------------------------


def _put_through(s3_bucket, proxy, fault: Fault, **extra) -> Store:
    proxy.set_faults(fault)
    store = _store(s3_bucket, proxy, **extra)
    store.write_bytes("m.json", SMALL)
    return store


def test_retry_budget_of_the_store(s3_bucket, proxy, direct, fast_backoff):
    """A Store rides out 9 consecutive 500s (botocore, standard mode, 10 attempts) and 9
    responses cut mid-body (s3fs's own tries, raised to 10); a 500 that persists fails."""
    put = {"method": "PUT", "key": "m.json"}
    _put_through(s3_bucket, proxy, Fault("throttle", first=12, **put))  # botocore x s3fs
    _put_through(s3_bucket, proxy, Fault("drop", first=12, **put))
    _put_through(s3_bucket, proxy, Fault("error500", first=9, **put))
    with pytest.raises(OSError, match="internal error"):
        _put_through(s3_bucket, proxy, Fault("error500", first=100, **put))
    # Ten attempts of the PUT (and s3fs's one more call), then the error reaches the caller.
    assert 10 <= proxy.injected["error500"] == proxy.requests <= 12, proxy.stats()

    direct.write_bytes("big.bin", BIG)
    proxy.set_faults(Fault("drop", method="GET", key="big.bin", first=9, after_bytes=1000))
    assert _store(s3_bucket, proxy).read_bytes("big.bin") == BIG


# -- permanent faults: one clear line -------------------------------------------------------------

PERMANENT = {
    "deny": (Fault("deny"), "access denied (Access Denied)"),
    "bad-key": (Fault("deny", code="InvalidAccessKeyId", message="The AWS Access Key Id you "
                      "provided does not exist in our records."), "access denied"),
    "always-500": (Fault("error500"), "internal error"),
    "always-throttled": (Fault("throttle"), "reduce your request rate"),
    "always-dropped": (Fault("drop"), "Connection was closed"),
}


@pytest.mark.parametrize("case", sorted(PERMANENT))
def test_permanent_faults_are_one_line(case, s3_bucket, proxy, fast_backoff, monkeypatch):
    import pipeline.store

    monkeypatch.setattr(pipeline.store, "S3_ATTEMPTS", 3)  # give up sooner: the same line
    fault, needle = PERMANENT[case]
    proxy.set_faults(fault)
    with pytest.raises(StoreAccessError) as e:
        _store(s3_bucket, proxy).check_access()
    msg = str(e.value)
    assert "\n" not in msg and needle in msg and s3_bucket[0] in msg, msg


def test_missing_bucket_is_one_line(proxy):
    with pytest.raises(StoreAccessError, match=r"^store s3://hwq-no-such-bucket/run: the bucket "
                                               r"or folder does not exist \(.*\); create it") as e:
        Store("s3://hwq-no-such-bucket/run", _opts(proxy.url)).check_access()
    assert "\n" not in str(e.value)


@pytest.fixture
def moto_auth(s3_endpoint):
    """moto checking credentials and SigV4 signatures (it accepts anything by default); yields
    the access key of a user allowed s3:*."""
    import json

    import boto3

    iam = boto3.client("iam", endpoint_url=s3_endpoint, region_name="us-east-1",
                       aws_access_key_id="testing", aws_secret_access_key="testing")
    name = f"hwq-{os.urandom(4).hex()}"
    iam.create_user(UserName=name)
    iam.put_user_policy(UserName=name, PolicyName="s3", PolicyDocument=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
    key = iam.create_access_key(UserName=name)["AccessKey"]

    def set_auth(count: str):
        urllib.request.urlopen(urllib.request.Request(
            f"{s3_endpoint}/moto-api/reset-auth", data=count.encode(), method="POST",
            headers={"Content-Type": "text/plain"}), timeout=10).read()

    set_auth("0")
    try:
        yield key["AccessKeyId"], key["SecretAccessKey"]
    finally:
        set_auth("inf")


def test_credentials_through_the_proxy(s3_bucket, proxy, moto_auth):
    url, _ = s3_bucket
    key, secret = moto_auth
    good = Store(url, {**_opts(proxy.url), "key": key, "secret": secret})
    good.check_access()  # the signature (over the Host header too) survived the proxy
    good.write_bytes("x.bin", BIG[:1 << 20])
    assert good.read_bytes("x.bin") == BIG[:1 << 20]
    for k, s, needle in [(key, "wrong-secret", "signature"),
                         ("AKIAHWQNOSUCHKEY0000", secret, "Access Key Id")]:
        with pytest.raises(StoreAccessError, match="access denied") as e:
            Store(url, {**_opts(proxy.url), "key": k, "secret": s}).check_access()
        assert needle in str(e.value) and "\n" not in str(e.value)
