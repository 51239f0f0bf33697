"""A lease per stage folder, so two runs on one store never write the same stage at once.

Two runs of one config (a resubmitted job beside the original, two batches over one store)
plan the same stage keys. Without a lease the second deletes the folder the first is writing
(the driver clears a stage folder before computing it) and both write a manifest. With it:

- before computing stage `<name>-<key>`, the driver takes `stages/<name>-<key>.lease`, a small
  JSON file naming its holder and when it expires;
- the holder renews it every ttl/4 seconds from a thread, and removes it when the stage's
  manifest is written (or the stage fails);
- another run finding a live lease waits: if the holder finishes, the stage is a cache hit;
  if the holder died (kill -9, a lost node), the lease expires within `ttl` and the waiter
  takes it over; if it is still held after `wait` seconds, the waiter stops with a message
  naming the holder.

Taking a lease works on any store, S3 included (which has no create-if-absent here): read it;
if free or expired, write ours, wait `settle` seconds and read it back. Of several runs that
wrote in that window, the last write wins and every other run sees a lease that is not its
own. Clocks of the runs' machines are assumed to agree to well under `ttl`. On a local store
a free lease is taken by creating the file exclusively (O_EXCL): of runs that found it free,
exactly one creates it, however long any of them was delayed between its read and its write
(a racer delayed beyond `settle` could otherwise overwrite a lease already won, and both
runs would compute the stage). Taking over an expired or malformed lease uses the write,
settle and read-back on every store.

The lease file is read from the store, so it is untrusted: one that is not well-formed (not a
JSON object of the five fields, of their types), whose times are not plausible (not finite,
acquired after it expires, or expiring more than `ttl` beyond a holder's `now + ttl`: runs
sharing a store use one `executor.lease_ttl_s`), or that is not a regular file (a folder, a
link) is ignored with a warning and replaced, as a dead holder's lease is. The holder's host
is printed with control characters removed.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from pipeline.errors import UserError, printable
from pipeline.store import ArtifactError, Store

__all__ = ["StageBusy", "LeaseLost", "StageLease"]

log = logging.getLogger("hwq")

_MAX_LEASE_BYTES = 4096
_MAX_NAME_CHARS = 256  # owner and host: hwq writes "<host>:<pid>:<12 hex>" and a host name
_LAST_TIME = 1e11  # seconds since 1970 (year 5138): beyond, time.gmtime overflows or worse


class StageBusy(UserError, RuntimeError):
    """Another run holds the stage's lease and did not finish while this one waited."""


class LeaseLost(UserError, RuntimeError):
    """This run's lease was taken over (it was not renewed in time): its work is not kept."""


@dataclass
class Holder:
    owner: str
    host: str
    pid: int
    expires: float
    acquired: float

    def describe(self) -> str:
        since = time.strftime("%H:%M:%S", time.gmtime(self.acquired))
        host = " ".join(printable(self.host).split())  # one line: no control characters
        return f"{host} pid {self.pid} (since {since} UTC)"


def _parse(data: bytes) -> Holder | str:
    """The lease's holder, or why `data` is not a well-formed lease (it is then treated as
    free: a garbage file must not block a stage)."""
    try:
        d = json.loads(data)
    except (ValueError, RecursionError):
        return "not JSON"
    if not isinstance(d, dict) or not {"owner", "host", "pid", "expires", "acquired"} <= set(d):
        return "not an object of owner, host, pid, acquired and expires"
    if not all(isinstance(d[k], str) and 0 < len(d[k]) <= _MAX_NAME_CHARS
               for k in ("owner", "host")):
        return "owner or host is not a short text"
    if type(d["pid"]) is not int or not 0 <= d["pid"] < 2**31:
        return "pid is not a process id"
    if not all(type(d[k]) in (int, float) and 0 <= d[k] <= _LAST_TIME
               for k in ("expires", "acquired")):  # NaN and infinity compare false
        return "acquired or expires is not a time"
    return Holder(owner=d["owner"], host=d["host"], pid=d["pid"], expires=float(d["expires"]),
                  acquired=float(d["acquired"]))


def _implausible(h: Holder, now: float, ttl: float) -> str | None:
    """Why a waiter must not believe `h` (None: it may). A holder writes expires = its
    now + ttl, and its clock may be ahead of ours by up to ttl: a later expiry (1e18) is no
    holder's, and would make the waiter wait lease_wait_s for nobody."""
    if h.expires > now + 2 * ttl:
        return (f"it expires in {h.expires - now:.3g} s, and a holder's lease expires within "
                f"executor.lease_ttl_s={ttl:.0f} s")
    if h.acquired > h.expires:
        return "it was acquired after it expires"
    return None


class StageLease:
    """The lease of one stage folder. Use `acquire(done)` then `release()`."""

    def __init__(self, store: Store, prefix: str, *, ttl: float = 60.0, wait: float = 300.0,
                 settle: float | None = None, poll: float | None = None):
        self.store = store
        self.rel = f"{prefix}.lease"
        self.ttl = float(ttl)
        self.wait = float(wait)
        # A local rename is visible at once; an S3 write within a round trip or two.
        self.settle = settle if settle is not None else (0.2 if store.is_local else 1.0)
        self.poll = poll if poll is not None else min(5.0, max(0.5, self.ttl / 10))
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self.acquired = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: str | None = None
        self._ignored: bytes | None = None  # the last ignored content: warned about once

    # -- reading and writing the lease file ------------------------------------------------
    def _read(self, waiting: bool = False) -> Holder | None:
        """The holder, expired or not; None when the lease is free or is not a well-formed lease
        (warned once per content; a folder or link at its name is removed, so that the lease
        can be written). waiting: also None for a lease whose times are implausible (see
        `_implausible`); a holder checking its own lease sees any other owner's."""
        try:
            data = self.store.read_bytes(self.rel, _MAX_LEASE_BYTES)
        except ArtifactError as e:  # missing, too large, not a regular file
            if not self.store.exists(self.rel):
                return None
            self._ignore(f"it is not a lease file ({e})", b"")
            self.store.remove(self.rel)  # links are removed, not followed
            return None
        got = _parse(data)
        why = got if isinstance(got, str) else (
            _implausible(got, time.time(), self.ttl) if waiting and got.owner != self.owner
            else None)
        if why is not None:
            self._ignore(why, data)
            return None
        return got

    def _ignore(self, why: str, data: bytes) -> None:
        if data != self._ignored:
            log.warning("%s: ignoring the lease there: %s; taking it over",
                        self.store.full_url(self.rel), printable(why))
            self._ignored = data

    def _record(self) -> dict[str, Any]:
        """This run's lease as written: holder, acquired, and expiry ttl from now."""
        now = time.time()
        return {"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
                "acquired": self.acquired or now, "expires": now + self.ttl}

    def _write(self) -> None:
        self.store.write_json(self.rel, self._record())

    def _still_ignored(self) -> bool:
        """Whether the lease file still holds the content `_read` ignored (garbage to replace),
        not a lease another run has written since."""
        try:
            return self.store.read_bytes(self.rel, _MAX_LEASE_BYTES) == self._ignored
        except ArtifactError:
            return False

    def _create_exclusive(self) -> bool | None:
        """Local store: put the lease file in place only if none exists; False if one does,
        None if the file system cannot hard-link. Written whole to a temporary name, then
        hard-linked to the lease's name (link fails if the name exists), so no reader ever
        sees a partly written lease."""
        path = self.store.path(self.rel)
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        data = json.dumps(self._record()).encode()
        tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:12]}")
        with open(tmp, "xb") as f:
            f.write(data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:  # EPERM, ENOTSUP: no hard links here
            return None
        finally:
            os.unlink(tmp)
        return True

    # -- the protocol -----------------------------------------------------------------------
    def acquire(self, done=lambda: False) -> bool:
        """Take the lease, waiting for a live holder; returns False if `done()` became true
        while waiting (the holder finished the stage: nothing to compute). StageBusy if a
        live holder still holds it after `wait` seconds."""
        deadline = time.monotonic() + self.wait
        announced = False
        while True:
            cur = self._read(waiting=True)
            if cur is None and self.store.is_local:
                if not self.store.exists(self.rel):
                    self.acquired = time.time()
                    made = self._create_exclusive()
                    if made:
                        self._start_renewing()
                        return True
                    if made is False:
                        continue  # another run created it first: wait for it like any holder
                    # None: this file system has no hard links; the write-and-read-back below
                elif not self._still_ignored():
                    continue  # a lease appeared since the read: read it again
            if cur is None or cur.owner == self.owner or cur.expires <= time.time():
                if cur is not None and cur.owner != self.owner:
                    log.warning("%s: the lease of %s expired (its run stopped without "
                                "releasing it); taking it over", self.rel, cur.describe())
                self.acquired = time.time()
                self._write()
                time.sleep(self.settle)
                back = self._read(waiting=True)
                if back is not None and back.owner == self.owner:
                    self._start_renewing()
                    return True
                continue  # another run wrote after us: it won; wait for it like any holder
            if done():
                return False
            if time.monotonic() > deadline:
                raise StageBusy(
                    f"{self.store.full_url(self.rel)}: another run ({cur.describe()}) is "
                    f"computing this stage; waited {self.wait:.0f} s. Rerun when it has "
                    "finished (its result will be a cache hit), or wait longer with "
                    "--set executor.lease_wait_s=SECONDS")
            if not announced:
                log.info("%s: held by another run (%s); waiting for it (up to %.0f s)",
                         self.rel, cur.describe(), self.wait)
                announced = True
            time.sleep(min(self.poll, max(0.05, cur.expires - time.time() + 0.05)))

    def _start_renewing(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew, name="hwq-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        every = self.ttl / 4
        while not self._stop.wait(every):
            try:
                cur = self._read()
                if cur is not None and cur.owner != self.owner:
                    self.lost = f"taken over by {cur.describe()}"
                    return
                self._write()
            except Exception as e:  # noqa: BLE001 - a transient store error: try again
                log.warning("%s: could not renew the lease (%s)", self.rel, e)

    def check(self) -> None:
        """LeaseLost if another run took the lease over (this run's work must not land)."""
        if self.lost is None:
            cur = self._read()
            if cur is not None and cur.owner != self.owner:
                self.lost = f"taken over by {cur.describe()}"
        if self.lost:
            raise LeaseLost(f"{self.store.full_url(self.rel)}: this run's lease was "
                            f"{self.lost} (not renewed within {self.ttl:.0f} s); its stage "
                            "output is not kept. Rerun to resume.")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        try:
            cur = self._read()
            if cur is not None and cur.owner == self.owner:
                self.store.remove(self.rel)
        except Exception as e:  # noqa: BLE001 - it expires on its own
            log.warning("%s: could not remove the lease (%s); it expires in %.0f s",
                        self.rel, e, self.ttl)

    def info(self) -> dict[str, Any]:
        return {"owner": self.owner, "ttl": self.ttl}
