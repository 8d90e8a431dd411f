"""`poller run`: schedule every watch, reload on SIGHUP, stop cleanly on SIGTERM/SIGINT.

Watches are timed by one Timetable feeding a pool of workers; APScheduler runs the housekeeping
(pruning old polls). One APScheduler job per watch did not scale to 100,000 watches (559 MB peak,
its main loop a large share of the CPU: README "Benchmarks").
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler

from poller.cluster import Membership
from poller.config import ConfigError, Settings, load_settings
from poller.dblock import DatabaseInUse, WriterLock
from poller.metrics import Metrics
from poller.model import Watch, object_of
from poller.notify import Dispatcher, make_route
from poller.pipeline import Workers, prepare, writer_linger
from poller.probe import prober_for
from poller.redact import redact
from poller.sdnotify import Notifier, watchdog_interval
from poller.signalcheck import SignalCheck, watched_from
from poller.store import Store, describe_db_error, open_engine
from poller.timetable import PhasedIntervalTrigger, Timetable, phase_of, trigger_for
from poller.watchlist import (
    demand,
    diff_watch_lists,
    require_watches,
    rules_from_settings,
    specs_from_settings,
)

log = logging.getLogger(__name__)

# Often enough that poll_samples holds little more than sample_retention (default 1 h).
PRUNE_EVERY = 300.0
STATUS_EVERY = 10.0
# A reload whose watch list reached the database but whose state read then failed is tried again
# this long after: until it succeeds the running list is not the one stored.
RELOAD_RETRY = 10.0
RELOAD_RETRY_MAX = 300.0  # doubling up to this: a failure that does not clear must not re-parse every 10 s
# After a thread the daemon cannot run without has died, the clean stop is given the polls' own limit
# (read_timeout x max_attempts) and this much more: with the writer gone, polls waiting for its room
# would hold it forever (the database is consistent at a kill).
FAILED_STOP_MARGIN = 15.0
# Deadlines and quiet periods are checked this often (longer for many watches: a pass reads each
# checked watch's row).
SIGNALS_EVERY = 5.0


class StartupError(Exception):
    """A resource the daemon needs at start (the metrics port) cannot be had; the message says which."""


@dataclass
class _Running:
    settings: Settings
    watches: dict[str, Watch]  # each with its schedule: the config's WatchSpecs are not kept


class Daemon:
    """The long-running process; signals only set flags, the main thread does the work."""

    def __init__(
        self, config_path: Path, settings: Settings, notifier: Notifier | None = None, *, signals: bool = False
    ) -> None:
        self.config_path = config_path
        self.notifier = notifier or Notifier()
        self._wake = threading.Event()
        self._stop = False
        self.writer_lock: WriterLock | None = None  # SQLite: checked now and then (_check_writer_lock)
        self._lock_taken = False  # another process holds the lock file that replaced ours
        self._failed = ""  # the thread whose death stopped the daemon
        self._reload = False
        # The database holds a newer watch list than the running one (a reload's sync committed, its
        # state read failed): reloads are tried again, RELOAD_RETRY and doubling, until one succeeds.
        self._list_ahead = False
        # Watches that reload re-pointed in the database, held from polling until a reload succeeds:
        # a poll of the old object would commit against the re-pointed watch (its state dropped).
        self._ahead_held: set[int] = set()
        self._retry_reload_at = 0.0  # monotonic; 0: none due
        self._retry_delay = RELOAD_RETRY
        self._status_note = ""
        self._writer_waits = 0
        if signals:
            # Before the slow start-up (migrations, watch sync): a SIGTERM then still ends cleanly.
            self._install_signals()
        # Several daemons (PostgreSQL): a session frozen inside a transaction is ended by the server,
        # releasing the fencing locks on its shards (5 s at least: never a slow commit of a live one).
        idle = max(settings.cluster.lease, 5.0)
        self.store = Store(open_engine(settings.database.url, idle_in_transaction=idle))
        self.store.keep_samples = settings.database.sample_retention > 0
        self.service, _, synced = prepare(settings, self.store, daemon=True)
        self.signals = SignalCheck(self.store)
        self.signals.set_watches(watched_from(synced.watches, self.store.rules))  # as prepare() set them
        self.recorder = self.service.recorder
        self.dispatcher = Dispatcher(self.store, settings.notify, settings.database.url)
        self.recorder.on_events = self.dispatcher.wake
        self.metrics: Metrics | None = None
        if settings.metrics.listen:
            self.metrics = Metrics()
            self.metrics.add_gauges(self._watch_outcomes, self.store.notification_counts)
            self.metrics.add_signal_gauges(self._signal_states, lambda: dict(self.store.signal_counts))
            self.service.metrics = self.metrics
        self.current = _Running(settings, synced.watches)
        self.workers: Workers | None = None
        self._started_concurrency = settings.schedule.concurrency
        # On PostgreSQL, daemons sharing the database split the watches by shard (poller/cluster.py);
        # every commit is fenced by the leases held. SQLite has one daemon (poller/dblock.py).
        self.membership: Membership | None = None
        # Shard changes reported by the heartbeat thread, applied by the main thread (which also
        # reloads): the heartbeat never waits on the daemon, so a long reload cannot cost a lease.
        self._shard_changes: list[tuple[set[int], set[int]]] = []
        self._shard_changes_lock = threading.Lock()
        if self.store.engine.dialect.name == "postgresql":
            self.membership = Membership(self.store, settings.cluster, self._on_shards)
            self.store.fence = self.membership
        if self.metrics is not None:
            # Bound here, before READY=1 and before any worker starts: a port in use ends the start
            # with one clear line instead of a traceback from a running daemon.
            try:
                self.metrics.serve(settings.metrics.listen)
            except OSError as exc:
                self.recorder.close()
                if self.membership is not None:
                    # Registered already: a row left behind would count as a live daemon for a
                    # lease, and the others would give back shards that nobody then claims.
                    self.membership.stop()
                self.store.close()
                raise StartupError(
                    f"cannot serve metrics on {settings.metrics.listen} ([metrics] listen): "
                    f"{exc.strerror or exc}; stop whatever holds that port or choose another one"
                ) from None
        self.timetable = Timetable(self._submit, self._on_skipped)
        self.scheduler = BackgroundScheduler(
            # Signals on their own thread: a long pruning pass must not delay a deadline.
            executors={"default": ThreadPoolExecutor(1), "signals": ThreadPoolExecutor(1)},
            # misfire_grace_time=None: a late housekeeping run still runs (design.md section 7).
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
            timezone=UTC,
        )

    # --- lifecycle ------------------------------------------------------------------

    def start(self, *, paused: bool = False) -> None:
        """Schedule every watch and the pruning job; unless paused, start polling."""
        now = datetime.now(UTC)
        if self.membership is not None:
            self.membership.beat()  # claims a share of the shards
            self._apply_shard_changes()
        else:
            self._schedule_many(self.current.watches, now)
        self.scheduler.add_job(
            self._prune,
            PhasedIntervalTrigger(PRUNE_EVERY, phase_of("prune", 60.0)),
            id="__prune__",
            name="prune old polls",
            next_run_time=datetime.now(UTC) + timedelta(seconds=5),
        )
        every = max(SIGNALS_EVERY, min(60.0, len(self.signals.watched) / 2000))
        self.scheduler.add_job(
            self._check_signals,
            PhasedIntervalTrigger(every, phase_of("signals", every)),
            id="__signals__",
            name="check deadlines and quiet periods",
            executor="signals",
            next_run_time=datetime.now(UTC) + timedelta(seconds=1),
        )
        self.scheduler.start(paused=paused)
        if not paused:
            lateness = self.metrics.lateness.observe if self.metrics is not None else None
            self.workers = Workers(self.service, self.current.settings.schedule.concurrency, lateness)
            self.workers.demand = demand(self.current.watches.values())
            self.timetable.start()
            self.dispatcher.start()
            if self.membership is not None:
                self.membership.start()

    def run(self) -> int:
        """Poll until SIGTERM/SIGINT; return the exit code."""
        self.start()
        # The watch list lives as long as the process: the collector need never walk it (poller run
        # paused it for the start).
        gc.freeze()
        gc.enable()
        log.info(
            "watching %d keys (config %s, %d workers)",
            len(self.current.watches),
            self.config_path,
            self.current.settings.schedule.concurrency,
        )
        self.notifier.ready(self.status_line())
        try:
            self._main_loop()
        finally:
            if self._failed:
                self._stop_within(self._poll_limit() + FAILED_STOP_MARGIN)
            else:
                self.shutdown()
        return 1 if self._failed else 0

    def _check_writer_lock(self) -> None:
        """The lock file removed or replaced (an operator clearing a "stale" lock): lock the new one,
        or say loudly that another writer took it."""
        lock = self.writer_lock
        if lock is None or lock.intact():
            return
        try:
            renewed = lock.renew()
        except DatabaseInUse as exc:
            if not self._lock_taken:  # said once; tried again at every turn, to take it back when it is free
                log.critical("the writer lock file %s was replaced, and another process holds it: %s", lock.path, exc)
            self._lock_taken = True
            return
        if not renewed:
            return  # its directory is gone: opening the database will say more than this could
        self._lock_taken = False
        log.error(
            "the writer lock file %s was removed or replaced while this daemon held it; locked anew. It is "
            "never stale (it ends with its process): do not delete it, or a second writer gets in",
            lock.path,
        )

    def _vital_threads(self) -> list[threading.Thread | None]:
        """The threads without which the daemon only pretends to run (WATCHDOG=1 would still go out)."""
        threads = [self.timetable._thread, self.recorder._thread, self.dispatcher._thread]
        if self.membership is not None:
            threads.append(self.membership._thread)
        return threads

    def _dead_thread(self) -> str:
        """The name of a vital thread that has ended, or ""."""
        for thread in self._vital_threads():
            if thread is not None and not thread.is_alive():
                return thread.name
        return ""

    def _stop_within(self, seconds: float) -> None:
        stopper = threading.Thread(target=self.shutdown, name="poller-stop", daemon=True)
        stopper.start()
        stopper.join(seconds)
        if stopper.is_alive():
            log.critical("the stop did not finish in %.0f s; exiting now (the database is consistent)", seconds)
            logging.shutdown()
            os._exit(1)

    def request_stop(self) -> None:
        self._stop = True
        self._wake.set()

    def request_reload(self) -> None:
        self._reload = True
        self._wake.set()

    def _install_signals(self) -> None:
        def on_stop(signum: int, _frame: FrameType | None) -> None:
            self.request_stop()

        def on_hup(signum: int, _frame: FrameType | None) -> None:
            self.request_reload()

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_hup)

    def _warn_if_overloaded(self) -> None:
        skipped = self.service.stats.last_minute()["skipped"]
        waits, self._writer_waits = self.recorder.waits - self._writer_waits, self.recorder.waits
        if skipped:
            cause = (
                f"the database writer is the bottleneck (workers waited for it {waits} times): raise the intervals "
                "or move the database to faster storage"
                if waits
                else "raise [schedule] concurrency or the intervals"
            )
            log.warning(
                "overloaded: %d polls skipped in the last minute because the watch's previous poll had not run yet; %s",
                skipped,
                cause,
            )

    def _main_loop(self) -> None:
        ping = watchdog_interval()
        tick = min(STATUS_EVERY, ping) if ping else STATUS_EVERY
        next_overload_check = time.monotonic() + 60
        while not self._stop:
            self._wake.wait(tick)
            self._wake.clear()
            if self._stop:
                break
            dead = self._dead_thread()
            if dead:
                self._failed = dead
                log.critical(
                    "the %s thread has stopped (an error, if any, is logged above): nothing would be polled or "
                    "recorded; stopping with exit status 1 so that the service manager restarts poller",
                    dead,
                )
                self.notifier.stopping(f"stopping: the {dead} thread died")
                break
            self._check_writer_lock()
            if self._reload or (self._retry_reload_at and time.monotonic() >= self._retry_reload_at):
                self._reload = False
                self.reload()
            self._apply_shard_changes()
            if ping:
                self.notifier.watchdog()
            if time.monotonic() >= next_overload_check:
                next_overload_check = time.monotonic() + 60
                self._warn_if_overloaded()
            self.notifier.status(self.status_line())

    def shutdown(self) -> None:
        log.info("stopping: waiting for polls in flight")
        self.notifier.stopping("stopping: finishing polls in flight")
        self.service.stop()
        self.timetable.stop()
        if self.workers is not None:
            self.workers.stop()
        self.scheduler.shutdown(wait=True)
        self.recorder.close()
        self.dispatcher.stop()
        if self.membership is not None:
            self.membership.stop()  # after the last commit: its shards go to the others at once
        if self.metrics is not None:
            self.metrics.close()
        self.store.close()
        log.info("stopped")

    # --- jobs -----------------------------------------------------------------------

    def _schedule(self, name: str, now: datetime) -> None:
        """(Re)place a watch in the timetable with the running config's target, trigger and jitter."""
        if self.membership is not None and not self.membership.holds(name):
            return  # another daemon polls it
        self._schedule_many([name], now)

    def _schedule_many(self, names: Iterable[str], now: datetime) -> None:
        """Place many watches at once (a start, shards gained): what _schedule does for each."""
        current = self.current
        jitter = current.settings.schedule.jitter
        self.timetable.add_many(
            ((name, current.watches[name], trigger_for(current.watches[name], jitter)) for name in names), now
        )

    def _on_shards(self, gained: set[int], lost: set[int]) -> None:
        """Heartbeat thread: note a change of the shards held, for the main thread to apply."""
        with self._shard_changes_lock:
            self._shard_changes.append((gained, lost))
        self._wake.set()

    def _apply_shard_changes(self) -> None:
        """Stop polling the watches of shards lost; resume those of shards gained from their committed state."""
        with self._shard_changes_lock:
            changes, self._shard_changes = self._shard_changes, []
        if self.membership is None or not changes:
            return
        shard_of = self.membership.shard_of
        for index, (gained, lost) in enumerate(changes):
            for name in self.current.watches:
                if shard_of(name) in lost:
                    self.timetable.remove(name)
            taken = [name for name in self.current.watches if shard_of(name) in gained]
            try:
                # Read back after the claim committed: the previous holder's last commits are in it.
                self.service.resume([self.current.watches[name].id for name in taken])
            except Exception as exc:
                # Kept, not dropped (the shards are this daemon's: nobody else would poll them), and
                # never the end of the daemon: tried again at the next turn of the main loop.
                with self._shard_changes_lock:
                    self._shard_changes[:0] = changes[index:]
                log.error(
                    "cluster: reading the state of %d watches of shards taken over failed (%s); trying again",
                    len(taken),
                    describe_db_error(exc, self.current.settings.database.url),
                )
                return
            self.signals.taken_over(self.current.watches[name].id for name in taken)
            self._schedule_many(taken, datetime.now(UTC))

    def _submit(self, watch: Watch, scheduled: datetime) -> bool:
        assert self.workers is not None
        return self.workers.submit(watch, scheduled)

    def _on_skipped(self, count: int) -> None:
        # A watch's previous poll is still queued or running, or its slot passed: the pool is overloaded.
        self.service.stats.add("skipped", count)
        if self.metrics is not None:
            self.metrics.skipped.inc(count)

    def _watch_outcomes(self) -> dict[str, int]:
        # The watches removed by a reload drop their outcome (reload()): the rest are current.
        counts = self.service.outcome_counts()
        unpolled = len(self.current.watches) - sum(counts.values())
        return {**counts, "unpolled": unpolled} if unpolled > 0 else counts

    def _signal_states(self) -> dict[str, int]:
        """This daemon's watches in each signal state (with several daemons, each counts its own)."""
        if self.membership is None:
            failing = self.store.alerting_watches()
        else:
            holds = self.membership.holds
            failing = self.store.alerting_watches({w.id for name, w in self.current.watches.items() if holds(name)})
        return {"stale": self.signals.stale, "failing": failing, "settling": self.signals.settling}

    def _check_signals(self) -> None:
        owned = self.membership.holds if self.membership is not None else None
        try:
            raised = self.signals.run_once(self.recorder.route, owned)
        except Exception as exc:
            log.error("checking deadlines and quiet periods failed: %s; trying again", describe_db_error(exc, ""))
            return
        if raised:
            self.dispatcher.wake()

    def _prune(self) -> None:
        db = self.current.settings.database
        now = datetime.now(UTC)
        cutoff = now - timedelta(seconds=db.poll_retention)
        try:
            if self.store.has_legacy_polls():
                # Rows from before the run-length log (revision 0007): fold them in, a chunk per
                # transaction, while polling goes on.
                log.info("converting poll rows of an older poller into runs, in the background")
                converted = self.store.convert_legacy_polls(_Progress("converting old poll rows").update)
                log.info("converted %d old poll rows into runs", converted)
            pruned = self.store.prune_polls(
                cutoff, now - timedelta(seconds=db.sample_retention), db.max_db_size or None
            )
        except Exception as exc:
            log.error("pruning polls older than %s failed: %s", cutoff.isoformat(), describe_db_error(exc, ""))
            return
        if pruned.runs or pruned.samples:
            log.info(
                "pruned %d poll runs that ended before %s and %d poll samples%s",
                pruned.runs,
                cutoff.strftime("%Y-%m-%dT%H:%M:%SZ"),
                pruned.samples,
                f"; {pruned.for_size} of the runs to stay under max_db_size" if pruned.for_size else "",
            )

    # --- reload ---------------------------------------------------------------------

    def reload(self) -> bool:
        """Re-read the config and apply it, or keep the running one if any part of it cannot be used.

        Everything that can fail (parsing, validation, the empty-list rule, the new S3 client) is
        done before anything changes; the watches table is synced only once the new config is known
        good, and watches (re-)added resume from their committed state.
        """
        self.notifier.reloading()
        self._retry_reload_at = 0.0
        old = self.current
        try:
            new = load_settings(self.config_path)
            require_watches(new, str(self.config_path))
        except ConfigError as exc:
            return self._refuse(str(exc))
        except Exception as exc:  # a flaw in reading it must not end a daemon that runs well
            log.debug("reading the config for a reload failed", exc_info=True)
            return self._refuse(redact(f"{self.config_path}: cannot be read ({type(exc).__name__}: {exc})"))
        specs = specs_from_settings(new)
        diff = diff_watch_lists(old.watches, specs)
        prober = None
        if new.s3 != old.settings.s3:
            try:
                prober = prober_for(new.s3, old.settings.schedule.concurrency, sink=self.store)
            except Exception as exc:  # botocore's many errors: whatever it is, the old client stays
                return self._refuse(f"{self.config_path}: [s3]: cannot build the S3 client: {exc}")
        # A poll of a re-pointed watch's old object still in flight would commit that object's state
        # after the sync dropped it: the next poll of the new object would then compare against it.
        carried = self._ahead_held
        held = {old.watches[name].id for name in diff.retargeted if name in old.watches} - carried
        if held and self.workers is not None:
            self._alive()
            drain = time.monotonic() + self._poll_limit() + 5
            while not self.workers.hold(held, min(10.0, max(drain - time.monotonic(), 0.0))):
                if time.monotonic() >= drain:
                    self.workers.release(held)
                    return self._refuse("polls of re-pointed watches still in flight; try the reload again")
                self._alive()
        synced = None
        self._alive()
        try:
            synced = self.store.sync_watches(list(specs.values()), datetime.now(UTC))
            # Re-pointed at another object or prefix: its cached state must not condition the next
            # poll. This sync dropped the stored one, or another daemon's reload did first (then
            # synced.retargeted is empty here and the database may hold the new object's state).
            moved = [
                synced.watches[name].id
                for name in diff.retargeted
                if synced.watches[name].id in synced.retargeted
                or object_of(old.watches[name]) != object_of(synced.watches[name])
            ]
            # Re-pointed by an earlier attempt (its state dropped then), whatever this config says now.
            if carried:
                ids = {watch.id for watch in synced.watches.values()}
                moved += sorted((carried & ids) - set(moved))
            # Read before switching over: a database error here refuses the reload, never ends the daemon.
            added = [synced.watches[name].id for name in diff.added]
            self._alive()
            resumed = self.store.load_states_for(added + moved) if added or moved else ({}, {})
        except Exception as exc:
            # Even a sync that raised may have committed (the connection lost during COMMIT): the
            # database may hold the new list. The sync is idempotent: held, and tried again soon.
            self._ahead_held |= held  # stay held until a reload succeeds
            self._list_ahead = True
            if synced is None:
                return self._refuse(
                    f"saving the new watch list to the database failed: {describe_db_error(exc, new.database.url)}. "
                    f"The reload is tried again in {self._retry_delay:.0f} s"
                )
            # The database holds the new list and this process still runs the old one: added watches
            # unpolled, re-pointed ones held.
            return self._refuse(
                f"reading the stored state of the watches it adds or re-points failed: "
                f"{describe_db_error(exc, new.database.url)}. The new watch list is already in the database, "
                f"so the reload is tried again in {self._retry_delay:.0f} s"
            )
        self._warn_restart_only(old.settings, new)
        if prober is not None:
            self.service.prober = prober
            log.info("reload: [s3] settings changed; new client in use")
        else:
            self.service.prober.relearn()  # a new prober learns anew; this one measures again
        # A watch the reload left as it was keeps its object, which the timetable holds: two copies of
        # a million watches would stay after every reload otherwise.
        watches = dict(synced.watches)
        for name, watch in watches.items():
            if old.watches.get(name) == watch:
                watches[name] = old.watches[name]
        self.current = _Running(new, watches)
        rules = rules_from_settings(new)
        new.watch.clear()  # the list lives in `watches` (as at the start)
        self.store.rules = {watch.id: rules[name] for name, watch in watches.items()}
        self.signals.set_watches(watched_from(watches, self.store.rules))
        self.store.keep_samples = new.database.sample_retention > 0
        self.recorder.route = make_route(new.notify) if new.notify else None
        self.recorder.linger = writer_linger(specs.values())  # a shorter interval may have come
        self.dispatcher.set_sinks(new.notify)
        for name in diff.removed:
            self.timetable.remove(name)
            self.service.forget(old.watches[name].id)
            self.service.drop_outcome(old.watches[name].id)
        for name in diff.retargeted:
            if self.timetable.get(name) is not None:  # with several daemons, maybe another one's
                self.timetable.retarget(name, synced.watches[name])
        # A watch removed by an earlier reload and added back keeps its row and its object_state:
        # resume from that, so a change made while it was out is `modified`, not a new `first_seen`.
        # A re-pointed one resumes from what is stored of its new object (usually nothing).
        self.service.resume_from(added + moved, resumed)
        if (held or carried) and self.workers is not None:
            self.workers.release(held | carried)
        self._ahead_held = set()
        now = datetime.now(UTC)
        for name in diff.rescheduled:
            self._schedule(name, now)
        if new.schedule.jitter != old.settings.schedule.jitter:
            for name, spec in specs.items():
                if name not in diff.added and name not in diff.rescheduled and spec.cron is None:
                    self._schedule(name, now)
        for name in diff.added:
            self._schedule(name, now)
        if self.workers is not None:
            self.workers.demand = demand(specs.values())
        self._status_note = ""
        self._list_ahead = False
        self._retry_delay = RELOAD_RETRY
        log.info("reloaded %s: %s; watching %d keys", self.config_path, diff.summary(), len(specs))
        self.notifier.ready(self.status_line())
        return True

    def _poll_limit(self) -> float:
        """The longest one poll can take: every attempt's read timeout."""
        s3 = self.current.settings.s3
        return s3.read_timeout * s3.max_attempts

    def _alive(self) -> None:
        """Ping the service manager's watchdog between the steps of a reload: each may take tens of
        seconds (parsing a million watches, draining polls of re-pointed ones, the sync)."""
        if watchdog_interval() is not None:
            self.notifier.watchdog()

    def _refuse(self, reason: str) -> bool:
        """Keep the running config after a failed reload; say why in the log and in STATUS=."""
        self._status_note = "reload failed, old config kept: " + reason
        if self._list_ahead:
            self._retry_reload_at = time.monotonic() + self._retry_delay
            self._retry_delay = min(self._retry_delay * 2, RELOAD_RETRY_MAX)
        log.error("reload failed, keeping the running watch list and settings: %s", reason)
        self.notifier.ready(self.status_line())
        return False

    def _warn_restart_only(self, old: Settings, new: Settings) -> None:
        if new.database.url != old.database.url:
            # Retention and max_db_size apply at the next pruning pass; the database itself stays.
            log.warning("reload: [database] url changes take effect only after a restart")
        if new.metrics != old.metrics:
            log.warning("reload: [metrics] changes take effect only after a restart")
        if new.cluster != old.cluster:
            log.warning("reload: [cluster] changes take effect only after a restart (of every daemon, for shards)")
        if new.schedule.concurrency != old.schedule.concurrency:
            log.warning("reload: [schedule] concurrency changes take effect only after a restart")

    def status_line(self) -> str:
        """The one-line summary systemd shows in `systemctl status`."""
        counts = self.service.stats.last_minute()
        line = (
            f"watching {len(self.current.watches)} keys; last minute: {counts['unchanged']} unchanged, "
            f"{counts['modified']} modified, {counts['missing']} missing, {counts['error']} errors"
        )
        if counts["skipped"]:
            line += (
                # The pool's size as started: a reload does not resize it.
                f"; {counts['skipped']} polls skipped: more due than {self._started_concurrency} "
                "workers can run (raise concurrency or intervals)"
            )
        if self.membership is not None:
            line += (
                f"; cluster: {len(self.timetable)} of them here, {len(self.membership.epochs())} of "
                f"{self.membership.shards} shards, {self.membership.live} live daemons"
            )
        if self._status_note:
            line += f"; {self._status_note}"
        elif counts["error"] and self.service.stats.last_error:
            line += f"; last error: {self.service.stats.last_error}"
        return line[:1000]


def run_daemon(config_path: Path, settings: Settings, writer_lock: WriterLock | None = None) -> int:
    """Entry point of `poller run`; ``writer_lock``: SQLite's one-writer lock, held by the caller."""
    _raise_descriptor_limit()
    threading.excepthook = _log_thread_death
    daemon = Daemon(config_path, settings, signals=True)
    daemon.writer_lock = writer_lock
    return daemon.run()


def _log_thread_death(args: threading.ExceptHookArgs) -> None:
    """An error that ends a thread goes to the log (the journal, with its priority), not bare stderr."""
    if args.exc_type is SystemExit:
        return  # a thread's own way to end
    name = args.thread.name if args.thread is not None else "a"
    log.critical("the %s thread died", name, exc_info=args.exc_value or True)


def _raise_descriptor_limit() -> None:
    """Take the hard limit on open files as the soft one (as most servers do): each worker keeps up to
    lean.MAX_KEPT connections, and the usual soft limit of 1024 is below what 256 workers may hold."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d: %s (systemd: LimitNOFILE=)", soft, exc)


class _Progress:
    """A progress line at most every 10 s for a long chore (rows done of about how many)."""

    def __init__(self, what: str, every: float = 10.0) -> None:
        self.what = what
        self.every = every
        self.last = time.monotonic()

    def update(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.last >= self.every or done >= total:
            self.last = now
            log.info("%s: %d of %d (%.0f%%)", self.what, done, total, 100.0 * done / max(total, 1))
