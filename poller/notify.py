"""Notifications: route events to sinks, and deliver the outbox at least once.

The outbox rows are written by the store in the same transaction as the history event they
carry. The Dispatcher thread delivers due rows with exponential backoff, records every attempt,
and gives up after the sink's ``max_age``; pending rows survive restarts. It never blocks polling.
What a sink receives is its ``format``'s document (poller.events), the same for webhooks and commands.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import http.client
import json
import logging
import os
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from datetime import UTC, datetime, timedelta
from fnmatch import fnmatchcase
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit, urlunsplit

from poller import __version__
from poller.config import NotifySettings, format_duration
from poller.events import content_type, event_id, event_type, render, rfc3339
from poller.redact import redact
from poller.safetext import host_and_port, printable, redact_url, scrub
from poller.store import CLAIM_SECONDS, Store, describe_db_error

log = logging.getLogger(__name__)

MAX_BACKOFF = 3600.0
# A pass marks its successes at least this often (seconds), not only at its end.
MARK_EVERY = 5.0
# No attempt starts within this many seconds (plus the sink's timeout) of its claim's end.
CLAIM_MARGIN = 30.0
DEFERRED = "deferred"  # an attempt not started (run_once): its row waits for the next pass
SIGNATURE_HEADER = "X-Poller-Signature"

# What a command sink inherits from the daemon's environment; everything else (AWS_* credentials,
# NOTIFY_SOCKET, the daemon's own POLLER_* settings such as a database URL) stays behind.
INHERITED_ENV = ("PATH", "HOME", "LANG", "TZ")  # and every LC_* locale variable
# The POLLER_* variables of an event: row fields, plus its idempotency id and CloudEvents type.
EVENT_ENV = (
    "event", "watch", "bucket", "key", "etag", "previous_etag", "last_modified", "version_id", "event_id", "type"
)  # fmt: skip


class _Deadline:
    """The whole attempt's time limit: urllib's timeout bounds each read, so a receiver that sends its
    answer a byte at a time held the attempt (and the dispatcher's pass, and a stop) for hours. At the
    deadline the connection's socket is shut down, which ends any read, handshake or send on it."""

    def __init__(self, seconds: float) -> None:
        self.expired = False
        self._connection: http.client.HTTPConnection | None = None
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def watch(self, connection: http.client.HTTPConnection) -> None:
        self._connection = connection

    def _expire(self) -> None:
        self.expired = True
        sock = self._connection.sock if self._connection is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):  # closed meanwhile: the attempt is over
                sock.shutdown(socket.SHUT_RDWR)

    def cancel(self) -> None:
        self._timer.cancel()


class _Request(urllib.request.Request):
    deadline: _Deadline


class _Watched(http.client.HTTPConnection):
    """A connection its attempt's _Deadline can cut."""

    def __init__(self, *args: Any, deadline: _Deadline | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if deadline is not None:
            deadline.watch(self)


class _HTTPConnection(_Watched):
    pass


class _HTTPSConnection(_Watched, http.client.HTTPSConnection):
    pass


class _HTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req: _Request) -> http.client.HTTPResponse:  # type: ignore[override]
        return self.do_open(_HTTPConnection, req, deadline=req.deadline)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req: _Request) -> http.client.HTTPResponse:  # type: ignore[override]
        return self.do_open(_HTTPSConnection, req, context=self._context, deadline=req.deadline)  # type: ignore[attr-defined]


# Only http and https, and no redirect handler: a webhook receiver answering 3xx gets a failed attempt,
# never a second request (a redirected POST becomes a GET to wherever Location points, such as a
# cloud metadata address). Proxies from the environment are honoured as urllib always does.
_OPENER = urllib.request.OpenerDirector()
for _handler in (
    urllib.request.ProxyHandler(),
    _HTTPHandler(),
    _HTTPSHandler(),
    urllib.request.HTTPDefaultErrorHandler(),
    urllib.request.HTTPErrorProcessor(),
):
    _OPENER.add_handler(_handler)


def claim_seconds(sinks: Iterable[NotifySettings]) -> float:
    """How long a pass claims its rows: CLAIM_SECONDS, or long enough for two attempts of the
    slowest sink (its timeout) and the margin, so every row can start at a pass's beginning."""
    # (A timeout that is not a number, never from a validated config, fails its own attempts.)
    timeouts = [sink.timeout for sink in sinks if isinstance(sink.timeout, int | float)]
    return max([CLAIM_SECONDS, *(2 * timeout + CLAIM_MARGIN for timeout in timeouts)])


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


def document(sink: NotifySettings, row: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON document ``sink`` receives for one event row, in the sink's format."""
    return render(row, sink.format, sink=sink.name, region=sink._region)


def delivery_id(sink: NotifySettings, row: Mapping[str, Any]) -> str:
    """The X-Poller-Delivery header: the idempotency id; the etag_history id for the legacy format."""
    return str(row.get("history_id")) if sink.format == "legacy" else event_id(row)


def event_env(row: Mapping[str, Any]) -> dict[str, str]:
    """The ``POLLER_*`` variables of one event (no secret can be among them: row fields and ids only)."""
    values = {k: row.get(k) for k in EVENT_ENV}
    values["last_modified"] = rfc3339(row.get("last_modified"))
    values["event_id"] = event_id(row)
    values["type"] = event_type(row["event"])
    return {f"POLLER_{k.upper()}": "" if v is None else str(v) for k, v in values.items()}


def sign(secret: str, body: bytes) -> str:
    """The webhook signature header value: ``sha256=<hex HMAC of the body>``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def command_env(sink: NotifySettings, row: Mapping[str, Any], environ: Mapping[str, str]) -> dict[str, str]:
    """The whole environment of a command sink: the allow-list from ``environ``, the sink's ``env``
    table, and the ``POLLER_*`` variables of the event (set last, so nothing overrides them)."""
    env = {k: v for k, v in environ.items() if k in INHERITED_ENV or k.startswith("LC_")}
    env.update(sink.env)
    env.update(event_env(row))
    return env


def deliver(sink: NotifySettings, row: Mapping[str, Any]) -> None:
    """One attempt to hand the event ``row`` to ``sink`` in its format; raise DeliveryError on failure."""
    body = json.dumps(document(sink, row), ensure_ascii=False).encode()
    if sink.type == "command":
        env = command_env(sink, row, os.environ)
        try:
            proc = subprocess.run(sink.command, input=body, env=env, capture_output=True, timeout=sink.timeout)
        except subprocess.TimeoutExpired:
            raise DeliveryError(f"command timed out after {sink.timeout:g}s") from None
        except OSError as exc:
            raise DeliveryError(f"cannot run {sink.command[0]!r}: {exc.strerror}") from None
        if proc.returncode != 0:
            tail = proc.stderr.decode("utf-8", "replace").strip().splitlines()[-1:]
            # A failing hook may print what it was given (a Slack URL from its env): out before cutting.
            said = without_secrets(tail[0], sink)[:200] if tail else ""
            raise DeliveryError(f"command exited {proc.returncode}" + (f": {said}" if said else ""))
        return
    headers = {
        "Content-Type": content_type(sink.format),
        "User-Agent": f"poller/{__version__}",
        "X-Poller-Event": str(row["event"]),
        "X-Poller-Delivery": delivery_id(sink, row),
    }
    if sink.secret:
        headers[SIGNATURE_HEADER] = sign(sink.secret, body)
    url, authorization = _split_userinfo(sink.url)
    if authorization:
        headers["Authorization"] = authorization
    request = _Request(url, data=body, headers=headers, method="POST")
    request.deadline = deadline = _Deadline(sink.timeout)
    try:
        status = _send(request, sink, url)
    except DeliveryError:
        if not deadline.expired:
            raise
        status = 0
    finally:
        deadline.cancel()
    if deadline.expired:
        # Also after a status: a head cut off by the deadline reads as complete to http.client.
        raise DeliveryError(
            f"webhook did not answer within its timeout ({format_duration(sink.timeout)}): "
            "it accepted the connection but sent its answer too slowly"
        )
    if not 200 <= status < 300:
        raise DeliveryError(f"webhook answered HTTP {status}")


def _send(request: _Request, sink: NotifySettings, url: str) -> int:
    """One POST; its status, or DeliveryError saying why there is none (never quoting the URL)."""
    try:
        with _OPENER.open(request, timeout=sink.timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        exc.close()
        if 300 <= exc.code < 400:
            raise DeliveryError(
                f"webhook answered HTTP {exc.code}{_redirect_target(exc.headers.get('Location'), url)}; "
                "redirects are not followed: configure the final URL"
            ) from None
        raise DeliveryError(f"webhook answered HTTP {exc.code}") from None
    except http.client.InvalidURL as exc:  # a ValueError that quotes the URL
        raise DeliveryError(scrub(f"the HTTP client refused the webhook URL: {exc}", sink.url)[:300]) from None
    except (urllib.error.URLError, OSError) as exc:
        # Never the URL itself: webhook URLs often carry tokens.
        reason = getattr(exc, "reason", exc)
        raise DeliveryError(scrub(f"webhook unreachable: {type(reason).__name__}: {reason}", sink.url)[:300]) from None
    except http.client.HTTPException as exc:
        raise DeliveryError(
            scrub(f"webhook sent a broken HTTP answer: {type(exc).__name__}: {exc}", sink.url)[:300]
        ) from None


# Values of a command sink's env shorter than this are not taken for secrets ("1", "true", "C.UTF-8").
SHORTEST_SECRET = 6


def without_secrets(text: str, sink: NotifySettings) -> str:
    """``text`` (an error or a command's stderr) without the sink's secrets: its URL's pieces, its env
    values and signing secret, and credentials in any URL (poller.redact); escaped for one log line."""
    for value in sorted({*sink.env.values(), sink.secret}, key=len, reverse=True):
        if len(value) >= SHORTEST_SECRET:
            # A URL's pieces too (its path alone, as a hook's error may quote it), as for webhooks.
            text = scrub(text, value) if "://" in value else text.replace(value, "…")
    text = redact(text)
    return scrub(text, sink.url) if sink.url else printable(text)


def _split_userinfo(url: str) -> tuple[str, str]:
    """``https://user:pw@host/p`` -> (``https://host/p``, a Basic Authorization header value);
    urllib would otherwise take ``user:pw@host`` for the host and quote it in its error."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url, ""
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    token = base64.b64encode(f"{unquote(user)}:{unquote(password)}".encode()).decode("ascii")
    return urlunsplit(parts._replace(netloc=hostport)), f"Basic {token}"


def _redirect_target(location: str | None, base: str) -> str:
    """`` (redirect to host H)``: the Location's host only; its path and query may carry anything."""
    if not location:
        return " without a Location header"
    try:
        host = host_and_port(urljoin(base, location.strip()), "?")
    except ValueError:
        return " with an unparseable Location header"
    return printable(f" (redirect to host {host})")


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
        started = time.monotonic()
        claim = claim_seconds(self.sinks.values())
        rows = self.store.due_notifications(now, claim=claim, sinks=list(self.sinks))
        # Rows are claimed for ``claim`` seconds (several daemons): no attempt starts that could outlast it.
        budget = started + claim - CLAIM_MARGIN
        pending: set[Future[tuple[int, datetime, str] | str | None]] = {
            self._pool.submit(self._attempt, row, now, budget) for row in rows
        }
        delivered: list[tuple[int, datetime, str]] = []
        deferred = 0
        failure: Exception | None = None
        mark_failure: Exception | None = None
        next_mark = started + MARK_EVERY
        while pending:
            finished, pending = wait(pending, max(next_mark - time.monotonic(), 0.0), FIRST_COMPLETED)
            for future in finished:
                try:
                    done = future.result()
                except Exception as exc:  # recording a failed attempt failed: mark the successes first
                    failure = failure or exc
                    continue
                if done == DEFERRED:
                    deferred += 1
                elif isinstance(done, tuple):
                    delivered.append(done)
            # Successes in one transaction, after their sinks took them (a crash before the commit
            # delivers them again, same event id: never lost), at least every MARK_EVERY: a sink that
            # hangs must not hold the others' marks back until their claims lapse and another daemon
            # delivers them again.
            if pending and time.monotonic() < next_mark:
                continue
            next_mark = time.monotonic() + MARK_EVERY  # the next wait sleeps, whatever is left to mark
            if delivered and mark_failure is None:
                try:
                    self._mark(delivered)
                except Exception as exc:
                    mark_failure = exc
            delivered = []
        if mark_failure is not None:
            raise mark_failure
        if failure is not None:
            raise failure
        return len(rows) - deferred  # all deferred: nothing was attempted, the loop waits

    def _mark(self, delivered: list[tuple[int, datetime, str]]) -> None:
        self.store.delivered_many([(notification_id, at) for notification_id, at, _ in delivered])
        for _, _, label in delivered:
            log.info("notification %s delivered", label)

    def _attempt(self, row: Mapping[str, Any], now: datetime, budget: float) -> tuple[int, datetime, str] | str | None:
        """One attempt of one row: a failure or a give-up is recorded here; a success is returned as
        (id, when, label) for run_once to mark. DEFERRED, not attempted, when ``budget`` (monotonic)
        could pass during it: the row's claim would lapse meanwhile; it stays pending for the next pass."""
        history_id = row.get("history_id")
        ref = f"event {history_id}" if history_id is not None else f"watch event {row.get('event_id')}"
        label = printable(f"{row['sink']} {row['event']} of {row['watch']} ({ref})")
        sink = self.sinks.get(row["sink"])
        if sink is None:
            self.store.give_up(row["id"], "sink no longer configured")
            log.warning("notification %s given up: sink no longer configured", label)
            return None
        # Every event gets at least one attempt, however old it is.
        if row["attempts"] and now - row["queued_at"] > timedelta(seconds=sink.max_age):
            self.store.give_up(
                row["id"],
                f"gave up after {row['attempts']} attempts: undelivered for longer than max_age "
                f"({format_duration(sink.max_age)})",
            )
            log.error("notification %s given up after %d attempts (max_age reached)", label, row["attempts"])
            return None
        try:
            if time.monotonic() + sink.timeout > budget:
                log.debug("notification %s left for the next pass (its claim would lapse during the attempt)", label)
                return DEFERRED
            deliver(sink, row)
        except Exception as exc:
            # Whatever went wrong, it is this attempt's failure, recorded on the row: never a database
            # error, never a row left pending with no attempt counted.
            reason = str(exc) if isinstance(exc, DeliveryError) else f"delivery failed: {type(exc).__name__}: {exc}"
            reason = without_secrets(reason, sink)[:500]  # secrets out before cutting: a cut one would stay
            retry_at = now + timedelta(seconds=backoff_delay(sink.backoff, row["attempts"] + 1))
            self.store.attempt_failed(row["id"], reason, retry_at)
            log.warning(
                "notification %s%s attempt %d failed: %s; next try %s",
                label,
                f" to {redact_url(sink.url)}" if sink.type == "webhook" else "",
                row["attempts"] + 1,
                reason,
                retry_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
            )
            return None
        return row["id"], datetime.now(UTC), label
