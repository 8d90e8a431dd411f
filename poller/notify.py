"""Notifications: route change events to sinks, and deliver the outbox at least once.

The outbox rows are written by the store in the same transaction as the history event they
carry. The Dispatcher thread delivers due rows with exponential backoff, records every attempt,
and gives up after the sink's ``max_age``; pending rows survive restarts. It never blocks polling.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from fnmatch import fnmatchcase
from typing import Any

from poller import __version__
from poller.config import NotifySettings, format_duration
from poller.store import Store, describe_db_error

log = logging.getLogger(__name__)

MAX_BACKOFF = 3600.0
SIGNATURE_HEADER = "X-Poller-Signature"


class DeliveryError(Exception):
    """One delivery attempt failed; the message is safe to log and store (no URLs, no secrets)."""


def make_route(sinks: Sequence[NotifySettings]) -> Callable[[str, str], list[str]]:
    """A route function for Store.record: the sinks whose watch globs and events match."""

    def route(watch: str, event: str) -> list[str]:
        return [s.name for s in sinks if event in s.events and any(fnmatchcase(watch, glob) for glob in s.watches)]

    return route


def backoff_delay(base: float, attempts: int) -> float:
    """Seconds before the next attempt after ``attempts`` failures: base, 2*base, 4*base, ... capped at 1 h."""
    return float(min(base * 2.0 ** max(attempts - 1, 0), MAX_BACKOFF))


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def event_payload(row: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON document a sink receives for one outbox row."""
    return {
        "id": row["history_id"],
        "event": row["event"],
        "watch": row["watch"],
        "bucket": row["bucket"],
        "key": row["key"],
        "etag": row["etag"],
        "previous_etag": row["previous_etag"],
        "last_modified": _iso(row["last_modified"]),
        "version_id": row["version_id"],
        "size": row["size"],
        "detected_at": _iso(row["detected_at"]),
    }


def sign(secret: str, body: bytes) -> str:
    """The webhook signature header value: ``sha256=<hex HMAC of the body>``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def deliver(sink: NotifySettings, payload: dict[str, Any]) -> None:
    """One attempt to hand ``payload`` to ``sink``; raise DeliveryError on failure."""
    body = json.dumps(payload, ensure_ascii=False).encode()
    if sink.type == "command":
        env = {
            **os.environ,
            **{
                f"POLLER_{k.upper()}": "" if v is None else str(v)
                for k, v in payload.items()
                if k in ("event", "watch", "bucket", "key", "etag", "previous_etag", "last_modified", "version_id")
            },
        }
        try:
            proc = subprocess.run(sink.command, input=body, env=env, capture_output=True, timeout=sink.timeout)
        except subprocess.TimeoutExpired:
            raise DeliveryError(f"command timed out after {sink.timeout:g}s") from None
        except OSError as exc:
            raise DeliveryError(f"cannot run {sink.command[0]!r}: {exc.strerror}") from None
        if proc.returncode != 0:
            tail = proc.stderr.decode("utf-8", "replace").strip().splitlines()[-1:]
            raise DeliveryError(f"command exited {proc.returncode}" + (f": {tail[0][:200]}" if tail else ""))
        return
    headers = {
        "Content-Type": "application/json",
        "User-Agent": f"poller/{__version__}",
        "X-Poller-Event": str(payload["event"]),
        "X-Poller-Delivery": str(payload["id"]),
    }
    if sink.secret:
        headers[SIGNATURE_HEADER] = sign(sink.secret, body)
    request = urllib.request.Request(sink.url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=sink.timeout) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        raise DeliveryError(f"webhook answered HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        # Never the URL itself: webhook URLs often carry tokens.
        reason = getattr(exc, "reason", exc)
        raise DeliveryError(f"webhook unreachable: {type(reason).__name__}: {reason}"[:300]) from None
    if not 200 <= status < 300:
        raise DeliveryError(f"webhook answered HTTP {status}")


class Dispatcher:
    """Delivers due outbox rows on its own threads; `wake()` after a commit makes it look at once."""

    def __init__(self, store: Store, sinks: Sequence[NotifySettings], url: str, workers: int = 4) -> None:
        self.store = store
        self.url = url
        self.sinks = {s.name: s for s in sinks}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="poller-notify")
        self._thread: threading.Thread | None = None

    def set_sinks(self, sinks: Sequence[NotifySettings]) -> None:
        self.sinks = {s.name: s for s in sinks}
        self.wake()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="poller-dispatcher", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        """Stop looking for work; attempts in flight finish (bounded by the sinks' timeouts)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        self._pool.shutdown(wait=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                busy = self.run_once()
            except Exception as exc:  # the database may be locked or full: try again shortly
                log.error("notification dispatch failed: %s", describe_db_error(exc, self.url))
                busy = 0
            if not busy:
                self._wake.wait(1.0)
                self._wake.clear()

    def run_once(self, now: datetime | None = None) -> int:
        """Attempt every due delivery once; return how many were attempted."""
        now = now or datetime.now(UTC)
        rows = self.store.due_notifications(now)
        futures = [self._pool.submit(self._attempt, row, now) for row in rows]
        for future in futures:
            future.result()
        return len(rows)

    def _attempt(self, row: Mapping[str, Any], now: datetime) -> None:
        label = f"{row['sink']} {row['event']} of {row['watch']} (event {row['history_id']})"
        sink = self.sinks.get(row["sink"])
        if sink is None:
            self.store.give_up(row["id"], "sink no longer configured")
            log.warning("notification %s given up: sink no longer configured", label)
            return
        # Every event gets at least one attempt, however old it is.
        if row["attempts"] and now - row["queued_at"] > timedelta(seconds=sink.max_age):
            self.store.give_up(
                row["id"],
                f"gave up after {row['attempts']} attempts: undelivered for longer than max_age "
                f"({format_duration(sink.max_age)})",
            )
            log.error("notification %s given up after %d attempts (max_age reached)", label, row["attempts"])
            return
        try:
            deliver(sink, event_payload(row))
        except DeliveryError as exc:
            retry_at = now + timedelta(seconds=backoff_delay(sink.backoff, row["attempts"] + 1))
            self.store.attempt_failed(row["id"], str(exc), retry_at)
            log.warning(
                "notification %s attempt %d failed: %s; next try %s",
                label,
                row["attempts"] + 1,
                exc,
                retry_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
            )
            return
        self.store.delivered(row["id"], datetime.now(UTC))
        log.info("notification %s delivered", label)
