"""`poller run`: schedule one job per watch, reload on SIGHUP, stop cleanly on SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import math
import random
import signal
import threading
import time
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType

from apscheduler.events import EVENT_JOB_EXECUTED, EVENT_JOB_MAX_INSTANCES, JobExecutionEvent, JobSubmissionEvent
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger

from poller.config import ConfigError, Settings, format_duration, load_settings
from poller.metrics import Metrics
from poller.notify import Dispatcher, make_route
from poller.pipeline import prepare
from poller.probe import PollResult, Watch, prober_for
from poller.sdnotify import Notifier, watchdog_interval
from poller.store import Store, describe_db_error, open_engine
from poller.watchlist import WatchSpec, diff_watch_lists, specs_from_settings

log = logging.getLogger(__name__)

EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
PRUNE_EVERY = 3600.0
STATUS_EVERY = 10.0


def phase_of(name: str, interval: float) -> float:
    """A stable offset in [0, interval) per watch name, so first runs spread out and survive reloads."""
    return (zlib.crc32(name.encode("utf-8", "surrogatepass")) / 2**32) * interval


class PhasedIntervalTrigger(BaseTrigger):  # type: ignore[misc]
    """Fires at ``EPOCH + phase + k*interval``, plus an optional jitter that never accumulates.

    APScheduler's IntervalTrigger adds jitter to a fire time that already holds jitter, so the
    schedule drifts (design.md section 7); here every run is anchored to the unjittered grid.
    """

    __slots__ = ("anchor", "interval", "jitter")

    def __init__(self, interval: float, phase: float, jitter: float = 0.0) -> None:
        self.interval = interval
        self.anchor = EPOCH + timedelta(seconds=phase)
        self.jitter = min(jitter, interval * 0.5)

    def get_next_fire_time(self, previous_fire_time: datetime | None, now: datetime) -> datetime:
        if previous_fire_time is None:
            slot = math.ceil((now - self.anchor).total_seconds() / self.interval)
        else:
            slot = math.floor((previous_fire_time - self.anchor).total_seconds() / self.interval) + 1
        base = self.anchor + timedelta(seconds=slot * self.interval)
        return base + timedelta(seconds=random.uniform(0, self.jitter)) if self.jitter else base

    def __str__(self) -> str:
        return f"every {format_duration(self.interval)}"


def job_id(name: str) -> str:
    """The scheduler job id of a watch (its name, in a namespace apart from internal jobs)."""
    return f"watch:{name}"


def trigger_for(spec: WatchSpec, jitter: float) -> BaseTrigger:
    """The APScheduler trigger of a watch: phased interval, or crontab in UTC."""
    if spec.cron is not None:
        return CronTrigger.from_crontab(spec.cron, timezone=UTC)
    assert spec.interval_seconds is not None
    return PhasedIntervalTrigger(spec.interval_seconds, phase_of(spec.name, spec.interval_seconds), jitter)


@dataclass
class _Running:
    settings: Settings
    specs: dict[str, WatchSpec]
    watches: dict[str, Watch]


class Daemon:
    """The long-running process; signals only set flags, the main thread does the work."""

    def __init__(
        self, config_path: Path, settings: Settings, notifier: Notifier | None = None, *, signals: bool = False
    ) -> None:
        self.config_path = config_path
        self.notifier = notifier or Notifier()
        self._wake = threading.Event()
        self._stop = False
        self._reload = False
        self._status_note = ""
        if signals:
            # Before the slow start-up (migrations, watch sync): a SIGTERM then still ends cleanly.
            self._install_signals()
        self.store = Store(open_engine(settings.database.url))
        self.service, specs, synced = prepare(settings, self.store)
        self.recorder = self.service.recorder
        self.dispatcher = Dispatcher(self.store, settings.notify, settings.database.url)
        self.recorder.on_events = self.dispatcher.wake
        self.metrics: Metrics | None = None
        if settings.metrics.listen:
            self.metrics = Metrics()
            self.metrics.add_gauges(self._watch_outcomes, self.store.notification_counts)
            self.service.metrics = self.metrics
        self.current = _Running(settings, specs, synced.watches)
        self.scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(settings.schedule.concurrency)},
            # misfire_grace_time=None: a busy pool runs a late poll instead of silently skipping it.
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
            timezone=UTC,
        )

    # --- lifecycle ------------------------------------------------------------------

    def start(self, *, paused: bool = False) -> None:
        """Schedule every watch and the pruning job, then start the scheduler."""
        for name, watch in self.current.watches.items():
            self._add_job(self.current.specs[name], watch)
        self.scheduler.add_job(
            self._prune,
            PhasedIntervalTrigger(PRUNE_EVERY, phase_of("prune", 60.0)),
            id="__prune__",
            name="prune old polls",
            next_run_time=datetime.now(UTC) + timedelta(seconds=5),
        )
        self.scheduler.add_listener(self._on_skipped, EVENT_JOB_MAX_INSTANCES)
        self.scheduler.start(paused=paused)
        if not paused:
            self.dispatcher.start()
            if self.metrics is not None:
                self.scheduler.add_listener(self._on_executed, EVENT_JOB_EXECUTED)
                self.metrics.serve(self.current.settings.metrics.listen)

    def run(self) -> int:
        """Poll until SIGTERM/SIGINT; return the exit code."""
        self.start()
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
            self.shutdown()
        return 0

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
        if skipped:
            log.warning(
                "overloaded: %d polls skipped in the last minute because the watch's previous poll had not "
                "run yet; raise [schedule] concurrency or the intervals",
                skipped,
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
            if self._reload:
                self._reload = False
                self.reload()
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
        self.scheduler.shutdown(wait=True)
        self.recorder.close()
        self.dispatcher.stop()
        if self.metrics is not None:
            self.metrics.close()
        self.store.close()
        log.info("stopped")

    # --- jobs -----------------------------------------------------------------------

    def _on_skipped(self, event: JobSubmissionEvent) -> None:
        # A watch's previous poll is still queued or running: the pool is overloaded.
        self.service.stats.add("skipped")
        if self.metrics is not None:
            self.metrics.skipped.inc()

    def _on_executed(self, event: JobExecutionEvent) -> None:
        result = event.retval
        if self.metrics is not None and isinstance(result, PollResult):
            self.metrics.lateness.observe(max((result.polled_at - event.scheduled_run_time).total_seconds(), 0.0))

    def _watch_outcomes(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for watch in self.current.watches.values():
            state = self.service.last_outcome.get(watch.id, "unpolled")
            counts[state] = counts.get(state, 0) + 1
        return counts

    def _add_job(self, spec: WatchSpec, watch: Watch) -> None:
        self.scheduler.add_job(
            self.service.poll,
            trigger_for(spec, self.current.settings.schedule.jitter),
            args=[watch],
            id=job_id(spec.name),
            name=spec.name,
            replace_existing=True,
        )

    def _prune(self) -> None:
        cutoff = datetime.now(UTC) - timedelta(seconds=self.current.settings.database.poll_retention)
        try:
            removed = self.store.prune_polls(cutoff)
        except Exception as exc:
            log.error("pruning polls older than %s failed: %s", cutoff.isoformat(), describe_db_error(exc, ""))
            return
        if removed:
            log.info("pruned %d poll rows older than %s", removed, cutoff.strftime("%Y-%m-%dT%H:%M:%SZ"))

    # --- reload ---------------------------------------------------------------------

    def reload(self) -> bool:
        """Re-read the config; apply watch-list changes, or keep the running list if it is invalid."""
        self.notifier.reloading()
        try:
            new = load_settings(self.config_path)
        except ConfigError as exc:
            self._status_note = "reload failed, old watch list kept: " + str(exc)
            log.error("reload failed, keeping the running watch list: %s", exc)
            self.notifier.ready(self.status_line())
            return False
        old = self.current
        specs = specs_from_settings(new)
        diff = diff_watch_lists(old.specs, specs)
        try:
            synced = self.store.sync_watches(list(specs.values()), datetime.now(UTC))
        except Exception as exc:
            self._status_note = "reload failed: " + describe_db_error(exc, new.database.url)
            log.error("reload failed, keeping the running watch list: %s", self._status_note)
            self.notifier.ready(self.status_line())
            return False
        self._warn_restart_only(old.settings, new)
        if new.s3 != old.settings.s3:
            self.service.prober = prober_for(new.s3, old.settings.schedule.concurrency)
            log.info("reload: [s3] settings changed; new client in use")
        self.current = _Running(new, specs, synced.watches)
        self.recorder.route = make_route(new.notify) if new.notify else None
        self.dispatcher.set_sinks(new.notify)
        for name in diff.removed:
            self.scheduler.remove_job(job_id(name))
            self.service.forget(old.watches[name].id)
        for name in diff.retargeted:
            watch = synced.watches[name]
            if watch.id in synced.retargeted:  # another object or prefix: the store dropped its state
                self.service.forget(watch.id)
            self.scheduler.modify_job(job_id(name), args=[watch])
        for name in diff.rescheduled:
            self.scheduler.reschedule_job(job_id(name), trigger=trigger_for(specs[name], new.schedule.jitter))
        if new.schedule.jitter != old.settings.schedule.jitter:
            for name, spec in specs.items():
                if name not in diff.added and name not in diff.rescheduled and spec.cron is None:
                    self.scheduler.reschedule_job(job_id(name), trigger=trigger_for(spec, new.schedule.jitter))
        for name in diff.added:
            self._add_job(specs[name], synced.watches[name])
        self._status_note = ""
        log.info("reloaded %s: %s; watching %d keys", self.config_path, diff.summary(), len(specs))
        self.notifier.ready(self.status_line())
        return True

    def _warn_restart_only(self, old: Settings, new: Settings) -> None:
        if new.database != old.database:
            log.warning("reload: [database] changes take effect only after a restart")
        if new.metrics != old.metrics:
            log.warning("reload: [metrics] changes take effect only after a restart")
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
                f"; {counts['skipped']} polls skipped: more due than {self.current.settings.schedule.concurrency} "
                "workers can run (raise concurrency or intervals)"
            )
        if self._status_note:
            line += f"; {self._status_note}"
        elif counts["error"] and self.service.stats.last_error:
            line += f"; last error: {self.service.stats.last_error}"
        return line[:1000]


def run_daemon(config_path: Path, settings: Settings) -> int:
    """Entry point of `poller run`."""
    return Daemon(config_path, settings, signals=True).run()
