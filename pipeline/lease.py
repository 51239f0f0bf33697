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
own. Clocks of the runs' machines are assumed to agree to well under `ttl`.
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

from pipeline.errors import UserError
from pipeline.store import ArtifactError, Store

__all__ = ["StageBusy", "LeaseLost", "StageLease"]

log = logging.getLogger("hwq")

_MAX_LEASE_BYTES = 4096


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
        return f"{self.host} pid {self.pid} (since {since} UTC)"


def _parse(data: bytes) -> Holder | None:
    """The lease's holder, or None for anything that is not a lease (treated as free: a
    garbage file must not block a stage forever)."""
    try:
        d = json.loads(data)
        return Holder(owner=str(d["owner"]), host=str(d["host"]), pid=int(d["pid"]),
                      expires=float(d["expires"]), acquired=float(d["acquired"]))
    except (ValueError, KeyError, TypeError):
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

    # -- reading and writing the lease file ------------------------------------------------
    def _read(self) -> Holder | None:
        try:
            return _parse(self.store.read_bytes(self.rel, _MAX_LEASE_BYTES))
        except ArtifactError:  # missing, too large, not a regular file
            return None

    def _write(self) -> None:
        now = time.time()
        self.store.write_json(self.rel, {"owner": self.owner, "host": socket.gethostname(),
                                         "pid": os.getpid(), "acquired": self.acquired or now,
                                         "expires": now + self.ttl})

    # -- the protocol -----------------------------------------------------------------------
    def acquire(self, done=lambda: False) -> bool:
        """Take the lease, waiting for a live holder; returns False if `done()` became true
        while waiting (the holder finished the stage: nothing to compute). StageBusy if a
        live holder still holds it after `wait` seconds."""
        deadline = time.monotonic() + self.wait
        announced = False
        while True:
            cur = self._read()
            if cur is None or cur.owner == self.owner or cur.expires <= time.time():
                if cur is not None and cur.owner != self.owner:
                    log.warning("%s: the lease of %s expired (its run stopped without "
                                "releasing it); taking it over", self.rel, cur.describe())
                self.acquired = time.time()
                self._write()
                time.sleep(self.settle)
                back = self._read()
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
