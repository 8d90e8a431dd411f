"""Several daemons on one PostgreSQL database: which watches this one polls (design.md section 6).

Watches fall into a fixed number of shards (a hash of the watch name). Each daemon heartbeats,
holds a fair share of the shards under leases in the database (claimed with ``FOR UPDATE SKIP
LOCKED``), gives back what exceeds its share when another daemon joins, and takes over the shards
of a daemon whose leases expired. Every commit is fenced: it checks, in its own transaction, that
this daemon still holds the shard at the epoch it claimed (``Store.record``).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import zlib
from collections.abc import Callable

from poller.config import ClusterSettings
from poller.store import ShardCountChanged, Store, describe_db_error

log = logging.getLogger(__name__)

# (shards gained, shards lost): called from the heartbeat thread after each change.
OnChange = Callable[[set[int], set[int]], None]


def shard_of(name: str, shards: int) -> int:
    """A watch's shard: stable across daemons and restarts, independent of its schedule phase."""
    return zlib.crc32(b"shard\0" + name.encode("utf-8", "surrogatepass")) % shards


class Membership:
    """This daemon's instance row and shard leases, renewed by a heartbeat thread."""

    def __init__(
        self, store: Store, settings: ClusterSettings, on_change: OnChange, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.store = store
        self.shards = settings.shards
        self.lease = settings.lease
        self.every = settings.heartbeat
        self.on_change = on_change
        self._clock = clock
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.instance_id = store.register_instance(self.host, self.pid, self.shards, self.lease)
        self.live = 1
        self._held: dict[int, int] = {}
        self._refused = ""  # the shard-count mismatch last logged
        # A lease is counted from before the heartbeat's transaction: the database's own expiry is later.
        self._valid_until = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- the Fence the store checks -------------------------------------------------------

    def shard_of(self, name: str) -> int:
        return shard_of(name, self.shards)

    def epochs(self) -> dict[int, int]:
        """The shards held now, with the epoch each was claimed at; none once the leases may have lapsed."""
        with self._lock:
            return dict(self._held) if self._clock() < self._valid_until else {}

    def epoch_of(self, name: str) -> int | None:
        """The epoch this daemon holds ``name``'s shard at; None if not held, or the leases may have lapsed."""
        shard = self.shard_of(name)
        with self._lock:
            return self._held.get(shard) if self._clock() < self._valid_until else None

    def holds(self, name: str) -> bool:
        with self._lock:
            return self.shard_of(name) in self._held

    # --- the heartbeat ----------------------------------------------------------------------

    def beat(self) -> None:
        """Renew, rebalance and claim once; tell the daemon which shards it gained and lost."""
        started = self._clock()
        try:
            held, live = self.store.heartbeat(self.instance_id, self.host, self.pid, self.shards, self.lease)
        except ShardCountChanged as exc:
            # Its leases are gone with the old table, and the same shard number names other watches now.
            if str(exc) != self._refused:
                log.error("cluster: %s", exc)
                self._refused = str(exc)
                try:  # counted as live meanwhile, it would shrink the others' share of the new shards
                    self.store.leave(self.instance_id)
                except Exception as left:
                    log.error("cluster: could not remove this daemon's instance row: %s", describe_db_error(left, ""))
            self._apply({})
            return
        except Exception as exc:
            log.error("cluster heartbeat failed: %s", describe_db_error(exc, ""))
            if self._clock() >= self._valid_until and self._held:
                # No renewal for a whole lease: others may be polling these watches now; stop.
                log.warning(
                    "cluster: leases of %d shards lapsed without renewal; pausing their watches", len(self._held)
                )
                self._apply({})
            return
        self.live = live
        if self._refused:
            log.info("cluster: the shard count matches this daemon's again (%d)", self.shards)
            self._refused = ""
        self._apply(held, valid_until=started + self.lease)

    def _apply(self, held: dict[int, int], valid_until: float = 0.0) -> None:
        with self._lock:
            old = self._held
            self._held = held
            self._valid_until = valid_until
        # A shard lost and claimed again in between comes back at a new epoch: reload its state too.
        lost = {s for s, e in old.items() if held.get(s) != e}
        gained = {s for s, e in held.items() if old.get(s) != e}
        if gained or lost:
            log.info(
                "cluster: instance %d holds %d of %d shards (%d live daemons; +%d -%d)",
                self.instance_id,
                len(held),
                self.shards,
                self.live,
                len(gained),
                len(lost),
            )
            self.on_change(gained, lost)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="poller-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        due = self._clock() + self.every
        while not self._stop.wait(max(due - self._clock(), 0.0)):
            due += self.every  # a fixed rhythm: a slow beat does not push the next one back
            try:
                self.beat()
            except Exception:
                log.exception("cluster heartbeat")
            due = max(due, self._clock())

    def stop(self) -> None:
        """Stop the heartbeat and give every shard back at once (the others need not wait a lease)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self.store.leave(self.instance_id)
        except Exception as exc:
            log.error("cluster: could not release this daemon's shards (they lapse in %ss): %s", self.lease, exc)
