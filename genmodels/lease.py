"""Exclusive, expiring leases in the platform storage: one holder at a time per name, across
processes and machines that share the storage (the CLI, Prefect workers, Ray nodes).

A lease on ``name`` is a series of generations ``leases/<name>/<generation:012d>.json``, each
created with an exclusive create (a file hard-linked into place; an S3 ``PUT`` with
``If-None-Match: *``), so of two processes taking the same generation exactly one succeeds.
The newest generation is held while it is neither released nor expired; a holder renews it
(rewrites its expiry) from a background thread, and whoever finds it released or expired takes
the next generation. A holder whose generation was superseded (it stalled past its expiry) learns
so at its next renewal: :attr:`Lease.lost` is set and :meth:`Lease.check` raises.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from typing import Any

from genmodels.storage import Storage, open_storage

__all__ = ["Lease", "LeaseBusy", "LeaseLost"]

PREFIX = "leases/"

logger = logging.getLogger(__name__)


class LeaseBusy(RuntimeError):
    """Another holder has the lease."""


class LeaseLost(RuntimeError):
    """The lease expired and someone else took it while we thought we held it."""


class Lease:
    """``with Lease(storage, "retrain/fashion-mnist/vae"):`` holds the lease for the block or raises
    :class:`LeaseBusy` (after waiting up to ``wait_s``). ``ttl_s``: how long a holder that stopped
    renewing (killed, partitioned) keeps others out; renewed every ``ttl_s / 4``. Leaving the block
    never raises for the release itself: a release the storage refuses is logged and the lease
    expires by its TTL (an explicit :meth:`release` call still raises)."""

    def __init__(self, storage: Storage | str, name: str, *, ttl_s: float = 300.0, wait_s: float = 0.0,
                 owner: str | None = None, poll_s: float = 0.2) -> None:
        self.storage = open_storage(storage) if isinstance(storage, str) else storage
        self.name, self.ttl_s, self.wait_s, self.poll_s = name.strip("/"), float(ttl_s), float(wait_s), poll_s
        self.owner = owner or f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.generation: int | None = None
        self.lost = threading.Event()
        self._stop = threading.Event()
        # Held across a renewal's check and write, and the release's: a renewal still writing when
        # the block ends lands before the release, never after it (it would mark the lease held
        # again, for a whole TTL, by a process that has left the block).
        self._writing = threading.Lock()
        self._renewer: threading.Thread | None = None

    def _key(self, generation: int) -> str:
        return f"{PREFIX}{self.name}/{generation:012d}.json"

    def _newest(self) -> tuple[int, dict[str, Any] | None]:
        keys = [k for k in self.storage.list(f"{PREFIX}{self.name}/") if k.endswith(".json")
                and k.rsplit("/", 1)[-1][:-5].isdigit()]
        if not keys:
            return 0, None
        key = max(keys, key=lambda k: int(k.rsplit("/", 1)[-1][:-5]))
        try:
            return int(key.rsplit("/", 1)[-1][:-5]), self.storage.get_json(key)
        except (FileNotFoundError, ValueError):
            return int(key.rsplit("/", 1)[-1][:-5]), {"released": True}  # unreadable: not held

    def _body(self, released: bool = False) -> bytes:
        return json.dumps({"owner": self.owner, "expires_at": time.time() + self.ttl_s, "released": released,
                           "ttl_s": self.ttl_s}).encode()

    def holder(self) -> dict[str, Any] | None:
        """The current holder's record, or None when the lease is free."""
        _, record = self._newest()
        if record is None or record.get("released") or float(record.get("expires_at", 0)) < time.time():
            return None
        return record

    def acquire(self) -> Lease:
        deadline = time.monotonic() + self.wait_s
        while True:
            generation, record = self._newest()
            free = record is None or record.get("released") or float(record.get("expires_at", 0)) < time.time()
            if free and self.storage.create_exclusive(self._key(generation + 1), self._body()):
                # Stalled since it listed, this acquirer may have re-created a generation that later
                # holders removed as old (below): it holds the lease only if that one is the newest.
                newest, newest_record = self._newest()
                if newest == generation + 1:
                    self.generation = generation + 1
                    for old in range(max(1, generation - 8), generation):  # keep the listing short; best effort
                        try:
                            self.storage.delete(self._key(old))
                        except Exception:  # noqa: BLE001 - an old generation left behind is harmless
                            pass
                    # A Lease taken again after its release: renewals and its loss start afresh.
                    self._stop.clear()
                    self.lost.clear()
                    self._renewer = threading.Thread(target=self._renew_loop, daemon=True,
                                                     name=f"lease-{self.name}")
                    self._renewer.start()
                    return self
                record = newest_record
            elif free:
                # Another acquirer created that generation first: the refusal names it, not the
                # holder before it (who had released the lease).
                _, record = self._newest()
            if time.monotonic() >= deadline:
                holder = (record or {}).get("owner", "another process")
                raise LeaseBusy(f"lease {self.name!r} is held by {holder} (until "
                                f"{time.strftime('%H:%M:%S', time.gmtime(float((record or {}).get('expires_at', 0))))}"
                                " UTC unless renewed)")
            time.sleep(self.poll_s)

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                self.renew()
            except LeaseLost:
                return
            except Exception:  # noqa: BLE001 - storage hiccup: try again at the next tick
                continue

    def renew(self) -> None:
        with self._writing:
            if self._stop.is_set():
                return  # released (or being released): a renewal now would mark it held again
            generation, _ = self._newest()
            if generation != self.generation:
                self.lost.set()
                raise LeaseLost(f"lease {self.name!r} was taken over (generation {generation} > {self.generation})")
            self.storage.put_bytes(self._key(self.generation), self._body())

    def check(self) -> None:
        """Raise :class:`LeaseLost` if the lease is no longer ours (call before acting on it)."""
        if self.generation is None or self.lost.is_set() or self._newest()[0] != self.generation:
            self.lost.set()
            raise LeaseLost(f"lease {self.name!r} is no longer held by {self.owner}")

    def release(self) -> None:
        self._stop.set()
        with self._writing:  # waits for a renewal in flight, however slow its write
            if self.generation is not None and not self.lost.is_set() and self._newest()[0] == self.generation:
                self.storage.put_bytes(self._key(self.generation), self._body(released=True))
            self.generation = None
        if self._renewer is not None:
            self._renewer.join(5)

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        # When the block ends, its work is done (an alias moved, a model trained) or its own error
        # is on its way out: a release that fails on a storage fault must replace neither, or a
        # retry redoes finished work and reports it wrongly (a promotion read back as "already the
        # champion"). Nobody is kept out for long: renewals have stopped, so the generation expires
        # ttl_s after its last renewal and the next holder takes it then.
        try:
            self.release()
        except Exception as err:  # noqa: BLE001
            logger.warning("lease %r: could not release it (%r); it expires within %.0f s", self.name, err,
                           self.ttl_s)
