"""Prometheus metrics, served only when `[metrics] listen` is set (127.0.0.1 by default)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from poller.targets import fallback_counts

if TYPE_CHECKING:
    from poller.model import PollResult

log = logging.getLogger(__name__)

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
LATENESS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300)


def error_kind(result: PollResult) -> str:
    """A small, fixed set of labels for errors (the text itself is too varied for a label)."""
    text = result.error or ""
    status = result.http_status or 0
    if "bucket not found" in text:
        return "bucket_missing"
    if status == 403:
        return "access_denied"
    if status >= 500 or "throttled" in text:
        return "server"
    if 400 <= status < 500:
        return "client"
    if "timeout" in text:
        return "timeout"
    if "connect" in text:
        return "connection"
    return "other"


class _Gauges(Collector):
    """Gauges computed at scrape time from live state (watches by outcome, notification backlog)."""

    def __init__(self, outcomes: Callable[[], dict[str, int]], backlog: Callable[[], dict[str, int]]) -> None:
        self._outcomes = outcomes
        self._backlog = backlog

    def collect(self) -> Iterator[GaugeMetricFamily]:
        watches = GaugeMetricFamily("poller_watches", "Watches by the outcome of their last poll", labels=["state"])
        for state, n in sorted(self._outcomes().items()):
            watches.add_metric([state], n)
        yield watches
        backlog = GaugeMetricFamily("poller_notifications", "Notification deliveries by status", labels=["status"])
        try:
            counts = self._backlog()
        except Exception as exc:  # a locked database must not break the scrape
            log.warning("metrics: cannot read the notification backlog: %s", exc)
            counts = {}
        for status, n in sorted(counts.items()):
            backlog.add_metric([status], n)
        yield backlog


class _Signals(Collector):
    """Watches in each signal state, and the watch signals recorded by this process, by event."""

    def __init__(self, states: Callable[[], dict[str, int]], recorded: Callable[[], dict[str, int]]) -> None:
        self._states = states
        self._recorded = recorded

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        try:
            states = self._states()
        except Exception as exc:  # a locked database must not break the scrape
            log.warning("metrics: cannot read the watch signals: %s", exc)
            states = {}
        for state, help_ in (
            ("stale", "Watches whose expected change is overdue (stale, not yet fresh)"),
            ("failing", "Watches failing (alert_after reached) or with access lost, not yet recovered"),
            ("settling", "Watches with a burst of changes not yet settled"),
        ):
            yield GaugeMetricFamily(f"poller_{state}_watches", help_, value=states.get(state, 0))
        family = CounterMetricFamily(
            "poller_watch_events", "Watch signals recorded (stale, fresh, settled, failing, ...)", labels=["event"]
        )
        for event, n in sorted(self._recorded().items()):
            family.add_metric([event], n)
        yield family


class _LeanFallbacks(Collector):
    """Buckets whose HEADs boto3 sends instead of the lean path, by reason (counted in poller.targets)."""

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "poller_lean_fallbacks", "Buckets handed from the lean HEAD path to boto3, by reason", labels=["reason"]
        )
        for reason, n in sorted(fallback_counts().items()):
            family.add_metric([reason], n)
        yield family


class _KeepAliveDisabled(Collector):
    """Times an endpoint's stray bytes turned keep-alive to it off for a while (counted in poller.lean)."""

    def collect(self) -> Iterator[CounterMetricFamily]:
        from poller.lean import keepalive_disabled_count  # the HTTP client only where metrics are served

        yield CounterMetricFamily(
            "poller_keepalive_disabled",
            "Times an endpoint sent bytes nobody asked for; a new connection per request to it for 10 minutes",
            value=keepalive_disabled_count(),
        )


class Metrics:
    """The counters and histograms poller updates, on a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.polls = Counter("poller_polls", "Polls by outcome", ["outcome"], registry=self.registry)
        self.duration = Histogram(
            "poller_poll_duration_seconds",
            "Time one poll took, retries included",
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.changes = Counter("poller_changes", "ETag history events by kind", ["event"], registry=self.registry)
        self.errors = Counter("poller_errors", "Failed polls by kind", ["kind"], registry=self.registry)
        self.skipped = Counter(
            "poller_skipped_polls",
            "Scheduled polls skipped because the previous one had not run yet (overload)",
            registry=self.registry,
        )
        self.lateness = Histogram(
            "poller_schedule_lateness_seconds",
            "Actual start of a poll minus its scheduled time",
            buckets=LATENESS_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_LeanFallbacks())
        self.registry.register(_KeepAliveDisabled())
        self._server: Any = None

    def observe(self, result: PollResult) -> None:
        """Count one committed poll result."""
        self.polls.labels(result.outcome).inc()
        self.duration.observe(result.duration_ms / 1000)
        if result.event:
            self.changes.labels(result.event).inc()
        for change in result.changes:  # a prefix watch's keys, each recorded as its own event
            if change.event:
                self.changes.labels(change.event).inc()
        if result.outcome == "error":
            self.errors.labels(error_kind(result)).inc()

    def observe_unrecorded(self) -> None:
        self.errors.labels("database").inc()

    def add_gauges(self, outcomes: Callable[[], dict[str, int]], backlog: Callable[[], dict[str, int]]) -> None:
        self.registry.register(_Gauges(outcomes, backlog))

    def add_signal_gauges(self, states: Callable[[], dict[str, int]], recorded: Callable[[], dict[str, int]]) -> None:
        self.registry.register(_Signals(states, recorded))

    def serve(self, listen: str) -> None:
        """Serve /metrics on ``host:port``."""
        host, _, port = listen.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        self._server, _thread = start_http_server(int(port), addr=host, registry=self.registry)
        log.info("metrics on http://%s:%s/metrics", host, port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
