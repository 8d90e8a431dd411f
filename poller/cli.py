"""The `poller` command: parses arguments, calls the library, maps errors to exit codes.

Exit codes: 0 success, 1 a poll or the database failed, 2 a usage or configuration error.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from itertools import chain
from pathlib import Path
from typing import Any, NoReturn

from sqlalchemy.exc import SQLAlchemyError

from poller import __version__
from poller.config import ConfigError, Settings, find_config, format_duration, load_settings, parse_duration
from poller.logs import setup_logging
from poller.safetext import iso, printable
from poller.store import StoreError

log = logging.getLogger("poller")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
# `poller db upgrade` waits this long for another one (or a `once`) to finish before it gives up.
UPGRADE_WAIT = 30.0


class UsageError(Exception):
    """A bad command line or config: exit 2 with this one-paragraph message."""


class RuntimeFailure(Exception):
    """Something outside the config failed (database, network): exit 1 with this message."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"poller: error: {message}\n")


# --- helpers --------------------------------------------------------------------------


def _settings(args: argparse.Namespace, *, watches: bool = True) -> tuple[Path, Settings]:
    """The config file's settings; ``watches=False`` for commands that read the database only (the
    watch list of a large config is most of its load time, and `poller check` is what checks it)."""
    path = find_config(args.config)
    settings = load_settings(path, watches=watches)
    args.db_url = settings.database.url  # for database errors raised later
    return path, settings


def _open_store(settings: Settings, *, readonly: bool) -> Any:
    from poller.store import Store, StoreError, describe_db_error, open_engine, safe_url

    try:
        store = Store(open_engine(settings.database.url, readonly=readonly))
        store.keep_samples = settings.database.sample_retention > 0
        if readonly and not store.has_schema():
            raise StoreError(
                f"database {safe_url(settings.database.url)} has no poller tables yet: run `poller db upgrade` "
                "or start the daemon"
            )
    except StoreError as exc:
        raise RuntimeFailure(str(exc)) from None
    except SQLAlchemyError as exc:
        raise RuntimeFailure(describe_db_error(exc, settings.database.url)) from None
    return store


def _count(text: str) -> int:
    """A --limit: a whole number, 0 or more (argparse names the option in its error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (all) or more, got {value}")
    return value


def _parse_since(text: str) -> datetime:
    try:
        return datetime.now(UTC) - timedelta(seconds=parse_duration(text))
    except ValueError as exc:
        if "out of range" in str(exc):  # a duration, too long: say so rather than "expected a duration"
            raise UsageError(
                f"--since {text!r}: at most 366 days; for older rows give a time such as 2024-01-01"
            ) from None
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(
            f"--since {text!r}: expected a duration such as 24h or 7d, or a time such as 2026-11-24T10:00:00Z"
        ) from None
    if not value.tzinfo:
        value = value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError:  # 0001-01-01T00:00:00+01:00 is before the first representable UTC time
        raise UsageError(f"--since {text!r}: out of range") from None


def _cell(value: Any, escape: bool) -> Any:
    """One output value; ``escape`` for table and CSV, where a line break in a watch name, key or
    error text would otherwise start a forged row (JSON escapes it itself)."""
    if isinstance(value, datetime):
        # isoformat, not strftime: a status of 100,000 watches formats 300,000 of these.
        if value.tzinfo is not UTC:
            value = value.astimezone(UTC)
        return value.isoformat(timespec="microseconds" if value.microsecond else "seconds")[:-6] + "Z"
    if isinstance(value, float):
        return round(value, 1)
    if escape and isinstance(value, str):
        return printable(value)
    return value


def _emit(rows: list[dict[str, Any]], columns: Sequence[str], fmt: str) -> None:
    out = sys.stdout
    if fmt == "json":
        cooked = [{c: _cell(row.get(c), False) for c in columns} for row in rows]
        json.dump(cooked, out, indent=2, ensure_ascii=False)
        out.write("\n")
        return
    _emit_text([tuple(_text_row(row, columns)) for row in rows], columns, fmt)


def _emit_text(rows: list[tuple[str, ...]], columns: Sequence[str], fmt: str) -> None:
    """Rows that are already text (''for none) as a table or CSV: one C-level format per row,
    so `poller status` of 100,000 watches prints in a fraction of a second."""
    if not "".join(chain.from_iterable(rows)).isprintable():  # escaping is the rare case
        rows = [tuple(map(printable, row)) for row in rows]
    out = sys.stdout
    if fmt == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(rows)
        return
    by_column = zip(*rows, strict=True) if rows else ([] for _ in columns)
    widths = [max([len(c), *map(len, cells)]) for c, cells in zip(columns, by_column, strict=True)]
    line = "  ".join(f"%-{w}s" for w in widths[:-1]) + "  %s"
    out.write((line % tuple(columns)).rstrip() + "\n")
    if rows:
        out.write("\n".join([(line % row).rstrip() for row in rows]) + "\n")


def _text_row(row: dict[str, Any], columns: Sequence[str]) -> list[str]:
    """A row as table or CSV text, escaped (a line break in a name, key or error would forge a row)."""
    cells = [v if type(v) is str else "" if v is None else str(_cell(v, False)) for v in map(row.get, columns)]
    # One check for the whole row: escaping is the rare case.
    return cells if "".join(cells).isprintable() else [printable(c) for c in cells]


# --- commands -------------------------------------------------------------------------


def _writer_lock(settings: Settings, command: str, wait: float = 0.0) -> Any:
    """Take the database's single-writer lock (SQLite only), or fail naming the process that holds it."""
    from poller.dblock import DatabaseInUse, acquire_writer_lock

    try:
        return acquire_writer_lock(settings.database.url, command, wait)
    except DatabaseInUse as exc:
        raise RuntimeFailure(str(exc)) from None


def cmd_run(args: argparse.Namespace) -> int:
    """Run the daemon: migrate, schedule every watch, poll until SIGTERM; SIGHUP reloads the watch list."""
    from poller.daemon import StartupError, run_daemon
    from poller.watchlist import require_watches

    # The start builds a few long-lived objects per watch and no garbage cycles: the cyclic collector
    # would walk the growing heap again and again (a third of a million watches' start-up). Resumed
    # by Daemon.run once started, with what was built frozen out of its sight.
    gc.disable()
    try:
        path, settings = _settings(args)
        require_watches(settings, str(path))
        lock = _writer_lock(settings, "poller run")
        try:
            return run_daemon(path, settings, lock)
        except StartupError as exc:
            raise RuntimeFailure(str(exc)) from None
        finally:
            if lock is not None:
                lock.release()
    finally:
        gc.enable()


def cmd_once(args: argparse.Namespace) -> int:
    """Poll every watch once, record the outcomes, print them; exit 1 if any poll failed."""
    from poller.notify import Dispatcher, make_route
    from poller.pipeline import describe_result, poll_all, prepare
    from poller.signalcheck import SignalCheck, watched_from
    from poller.watchlist import require_watches

    path, settings = _settings(args)
    require_watches(settings, str(path))
    lock = _writer_lock(settings, "poller once")
    try:
        store = _open_store(settings, readonly=False)
        try:
            _refuse_beside_daemons(store, settings)
            service, specs, synced = prepare(settings, store, log_polls=False)
            # In the config's order (the synced list is in the database's).
            results = poll_all(service, [synced.watches[name] for name in specs], settings.schedule.concurrency)
            service.recorder.close()
            # Deadlines and quiet periods too: a cron-driven `once` raises stale/fresh/settled as the daemon would.
            check = SignalCheck(store)
            check.set_watches(watched_from(synced.watches, store.rules))  # as prepare() set them
            raised = check.run_once(make_route(settings.notify) if settings.notify else None)
            if settings.notify:
                # One attempt at each due delivery; what fails stays queued for the next run or the daemon.
                dispatcher = Dispatcher(store, settings.notify, settings.database.url)
                dispatcher.run_once()
                dispatcher.stop()
        finally:
            store.close()
    finally:
        if lock is not None:
            lock.release()
    failed = 0
    for result in results:
        if result is None:
            failed += 1
            continue
        print(describe_result(result))
        failed += result.outcome == "error"
    for sig in raised:
        print(printable(f"{sig.watch} {sig.event}: {sig.key}" + (f" ({sig.error})" if sig.error else "")))
    return EXIT_FAILED if failed else EXIT_OK


def _refuse_beside_daemons(store: Any, settings: Settings) -> None:
    """PostgreSQL: no `once` while daemons poll the database (SQLite's writer lock says the same):
    it would poll their watches a second time and write states they have not seen."""
    # A daemon holding an unexpired shard lease counts too: its own lease may be longer than this config's.
    live = [d for d in store.cluster_status() if d["heartbeat_age"] < settings.cluster.lease or d["shards"]]
    if live:
        who = ", ".join(printable(f"instance {d['id']} on {d['host']} pid {d['pid']}") for d in live)
        polling = f"{len(live)} daemons poll" if len(live) > 1 else "1 daemon polls"
        raise RuntimeFailure(
            f"{polling} this database ({who}): one writer of the watches at a time. Stop them first "
            "(they already poll every watch; one killed without stopping counts until its lease runs out), "
            "or point [database] url elsewhere; `poller status` and `poller history` read it meanwhile."
        )


def describe_probe(result: Any) -> str:
    """One line for `check --probe`: what the HEAD (or listing) found, in words that claim no change."""
    from poller.pipeline import describe_result

    if result.outcome == "error":
        return str(describe_result(result))
    head = f"{result.watch.name} {result.watch.url}"
    ms = f"{result.duration_ms:.0f}ms"
    if result.watch.prefix:
        return printable(f"{head} listed ({result.note}) (not recorded) {ms}")
    if result.outcome == "missing":
        return printable(f"{head} missing ({result.http_status}) (not recorded) {ms}")
    state = result.state
    version = f" version {state.version_id}" if state.version_id else ""
    return printable(
        f"{head} present ({result.http_status}), etag {state.etag} last-modified {iso(state.last_modified)}"
        f"{version} (not recorded) {ms}"
    )


def cmd_check(args: argparse.Namespace) -> int:
    """Validate the config; with --probe also send one unconditional HEAD per watch (nothing is written)."""
    from botocore.exceptions import BotoCoreError

    from poller.pipeline import probe_all_unrecorded
    from poller.probe import prober_for
    from poller.watchlist import require_watches, specs_from_settings

    path, settings = _settings(args)
    require_watches(settings, str(path))
    print(f"{path}: configuration OK, {len(settings.watch)} watches")
    if not args.probe:
        return EXIT_OK
    try:
        prober = prober_for(settings.s3, settings.schedule.concurrency)
    except (BotoCoreError, ValueError) as exc:
        raise UsageError(f"{path}: [s3]: cannot build the S3 client: {exc}") from None
    targets = [spec.as_watch(0) for spec in specs_from_settings(settings).values()]
    results = explain_denied(prober.client, probe_all_unrecorded(prober, targets, settings.schedule.concurrency))
    for result in results:
        print(describe_probe(result))
    return EXIT_FAILED if any(r.outcome == "error" for r in results) else EXIT_OK


# Codes that mean the credentials themselves are wrong, not that they lack a permission.
_CREDENTIAL_CODES = ("SignatureDoesNotMatch", "InvalidAccessKeyId", "ExpiredToken", "InvalidToken")


def explain_denied(client: Any, results: list[Any]) -> list[Any]:
    """Tell a wrong secret from a missing permission behind a HEAD's 403 (which has no body, so no
    error code): one ListObjectsV2 per bucket answers with the code. Only for `check --probe`."""
    from dataclasses import replace

    from botocore.exceptions import BotoCoreError, ClientError

    from poller.s3client import describe_client_error

    verdicts: dict[str, str | None] = {}
    out = []
    for result in results:
        watch = result.watch
        if result.outcome != "error" or result.http_status != 403 or watch.prefix:
            out.append(result)
            continue
        if watch.bucket not in verdicts:
            verdicts[watch.bucket] = None
            try:
                client.list_objects_v2(Bucket=watch.bucket, Prefix=watch.key, MaxKeys=1)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in _CREDENTIAL_CODES:
                    verdicts[watch.bucket] = describe_client_error(exc)
            except (BotoCoreError, OSError, ValueError):
                pass
        reason = verdicts[watch.bucket]
        out.append(replace(result, error=reason) if reason else result)
    return out


def cmd_doctor(args: argparse.Namespace) -> int:
    """Measure how the endpoint answers conditional HEADs and recommend [s3] conditional.

    Writes a temporary object under .poller-doctor/ in the scratch bucket, sends it the daemon's
    calibration HEADs, overwrites it within one second, and deletes it afterwards.
    """
    from poller.calibrate import server_lines
    from poller.doctor import DoctorError, render, run_doctor
    from poller.redact import redact
    from poller.s3client import make_client

    _, settings = _settings(args, watches=False)
    client = make_client(settings.s3, 1)
    try:
        report = run_doctor(client, args.bucket, settings.s3.conditional)
    except DoctorError as exc:
        raise RuntimeFailure(str(exc)) from None
    print(render(report))
    endpoint = redact(str(client.meta.endpoint_url).rstrip("/"))
    try:  # what the daemon learned here, as `poller status` shows it (no database yet: nothing to show)
        store = _open_store(settings, readonly=True)
        try:
            learned = [row for row in store.server_semantics() if row["endpoint"] == endpoint]
        finally:
            store.close()
    except (RuntimeFailure, StoreError, SQLAlchemyError):
        learned = []
    if learned:
        print("\nthe daemon's calibration of this endpoint (poller status):")
        print("\n".join(server_lines(learned, datetime.now(UTC))))
    return EXIT_OK


STATUS_COLUMNS = (
    "name",
    "bucket",
    "key",
    "last_outcome",
    "etag",
    "last_modified",
    "last_polled_at",
    "consecutive_errors",
    "last_error",
    "signals",  # stale, settling, failing (poller.signals)
    "deadline",  # when the next change is due (expect_change_within / expect_change_by)
)
# A row of `history` is a run of identical polls: "time" is the latest, "first" the earliest.
POLL_COLUMNS = (
    "time", "first", "count", "watch", "key", "outcome", "http_status", "etag", "last_modified", "duration_ms", "error"
)  # fmt: skip
CHANGE_COLUMNS = (
    "time", "watch", "key", "event", "etag", "previous_etag", "last_modified", "version_id", "size", "error"
)  # fmt: skip


def cmd_status(args: argparse.Namespace) -> int:
    """One row per watch: last outcome, ETag, Last-Modified, last polled, consecutive errors, signals, deadline."""
    _, settings = _settings(args, watches=False)
    store = _open_store(settings, readonly=True)
    try:
        if args.format == "json":
            rows = store.status(display=True)
            names = [row["name"] for row in rows]
        else:
            cells = store.status_text()
            names = [row[0] for row in cells]
        deliveries = store.notification_counts()
        servers = store.server_semantics()
        daemons = store.cluster_status()
    finally:
        store.close()
    if args.format == "json":
        _emit(rows, STATUS_COLUMNS, args.format)
    else:
        _emit_text(cells, STATUS_COLUMNS, args.format)
    if args.format == "table" and daemons:
        print("\n" + "\n".join(cluster_lines(daemons, names, settings)))
    if args.format == "table" and servers:
        from poller.calibrate import server_lines

        print("\nservers (conditional semantics learned by calibration; `poller doctor` measures the same):")
        print("\n".join(server_lines(servers, datetime.now(UTC))))
    if args.format == "table" and any(deliveries.values()):
        hint = "; `poller notify retry` re-queues failed ones" if deliveries["failed"] else ""
        print(
            f"\nnotifications: {deliveries['pending']} pending, {deliveries['failed']} failed, "
            f"{deliveries['delivered']} delivered{hint}"
        )
    return EXIT_OK


def cluster_lines(daemons: list[dict[str, Any]], names: list[str], settings: Settings) -> list[str]:
    """The daemons sharing a PostgreSQL database: heartbeat age, and the shards and watches each polls."""
    from collections import Counter

    from poller.cluster import shard_of

    shards, lease = settings.cluster.shards, settings.cluster.lease
    per_shard = Counter(shard_of(name, shards) for name in names)
    lines = [f"daemons (PostgreSQL; {len(names)} watches in {shards} shards, lease {format_duration(lease)}):"]
    held: set[int] = set()
    for d in daemons:
        held.update(d["shards"])
        state = "" if d["heartbeat_age"] <= lease else " (no heartbeat for a lease: stopped or unreachable)"
        lines.append(
            printable(
                f"  instance {d['id']} {d['host']} pid {d['pid']} started {iso(d['started_at'])}, heartbeat "
                f"{d['heartbeat_age']:.1f}s ago{state}: {len(d['shards'])} shards, "
                f"{sum(per_shard[s] for s in d['shards'])} watches"
            )
        )
    orphans = [s for s in range(shards) if s not in held]
    if orphans:
        lines.append(
            f"  {len(orphans)} shards ({sum(per_shard[s] for s in orphans)} watches) held by no daemon now: "
            "taken over within a lease and a heartbeat while a daemon runs"
        )
    return lines


NOTIFY_COLUMNS = (
    "id",
    "sink",
    "status",
    "attempts",
    "watch",
    "event",
    "etag",
    "created_at",
    "delivered_at",
    "last_error",
)


def cmd_notify_list(args: argparse.Namespace) -> int:
    """List notification deliveries, newest first: sink, status, attempts, last error."""
    _, settings = _settings(args, watches=False)
    store = _open_store(settings, readonly=True)
    try:
        rows = store.notification_rows(args.status, args.limit or 1_000_000)
    finally:
        store.close()
    _emit(rows, NOTIFY_COLUMNS, args.format)
    return EXIT_OK


def cmd_notify_retry(args: argparse.Namespace) -> int:
    """Re-queue failed notification deliveries (all, or one sink's); the daemon delivers them."""
    _, settings = _settings(args, watches=False)
    store = _open_store(settings, readonly=False)
    try:
        count = store.retry_failed(datetime.now(UTC), args.sink)
    finally:
        store.close()
    print(f"re-queued {count} failed deliveries")
    return EXIT_OK


def cmd_history(args: argparse.Namespace) -> int:
    """Poll outcomes (or, with --changes, ETag history events), newest first."""
    _, settings = _settings(args, watches=False)
    since = _parse_since(args.since) if args.since else None
    if args.limit is None:
        args.limit = 10 if args.follow else 100
    if args.limit < 0:
        raise UsageError("--limit must be zero or more (0 means no limit)")
    if args.follow:
        return _history_follow(args, settings, since)
    if args.format == "jsonl" and not args.changes:
        raise UsageError("--format jsonl prints events as CloudEvents, one per line: add --changes")
    store = _open_store(settings, readonly=True)
    try:
        if args.watch is not None:
            _require_watch_name(store, args.watch)
        rows = store.history(watch=args.watch, since=since, changes=args.changes, limit=args.limit or None)
    finally:
        store.close()
    if args.format == "jsonl":
        from poller.events import cloudevent, unified_row

        sys.stdout.writelines(json.dumps(cloudevent(unified_row(r)), ensure_ascii=False) + "\n" for r in rows)
        return EXIT_OK
    _emit(rows, CHANGE_COLUMNS if args.changes else POLL_COLUMNS, args.format)
    return EXIT_OK


# `history --follow` as a table: rows come one at a time and cannot be measured first, so each column
# of CHANGE_COLUMNS has a fixed width; a longer value is printed whole and shifts the rest of its line.
FOLLOW_WIDTHS = (27, 16, 24, 11, 34, 34, 27, 12, 10, 0)


class _Stopped(BaseException):
    """SIGINT or SIGTERM during `history --follow` (a BaseException, like KeyboardInterrupt)."""


def _history_follow(args: argparse.Namespace, settings: Settings, since: datetime | None) -> int:
    """The last --limit events (--since, WATCH), then each new one as it is committed, flushed line by
    line, until Ctrl-C (exit 130), SIGTERM (143) or the reader leaves (`| head`: exit 0)."""
    import signal
    import threading

    from poller import follow
    from poller.store import describe_db_error

    if args.format == "json":
        raise UsageError(
            "--follow prints events as they are committed and never ends, so a JSON array would never "
            "close: use --format jsonl (one CloudEvent per line), csv or table"
        )
    header, line = _follow_lines(args.format)
    out = sys.stdout

    def write(row: dict[str, Any]) -> None:
        out.write(line(row))
        out.flush()

    def report(exc: BaseException | None) -> None:
        if exc is None:
            print("poller: the database answers again; following", file=sys.stderr, flush=True)
        else:
            text = " ".join(describe_db_error(exc, settings.database.url).split())  # one line, whatever the driver said
            print(f"poller: {text}; still following, asking again every {follow.RETRY_INTERVAL:g}s",
                  file=sys.stderr, flush=True)  # fmt: skip

    stopped: list[int] = []

    def on_signal(signum: int, _frame: Any) -> None:
        # Raised, not flagged: it must also end a database call that waits (a restarting server).
        if not stopped:
            stopped.append(signum)
            raise _Stopped

    store = _open_store(settings, readonly=True)
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        if args.watch is not None:
            _require_watch_name(store, args.watch)
        matches = follow.name_matcher(args.watch)
        grace = follow.PG_GRACE if store.engine.dialect.name == "postgresql" else 0.0
        tail = follow.Tail(store.events_after, grace=grace, match=lambda row: matches(row["watch"]))
        # The tops first, then the backlog: an event committed in between is in the backlog or comes next.
        tail.start(store.last_event_ids())
        backlog = store.history(watch=args.watch, since=since, changes=True, limit=args.limit or None)
        tail.mark(backlog)
        if header:
            out.write(header)
        for row in reversed(backlog):
            write(row)
        out.flush()

        def warn(ids: int) -> None:
            print(
                f"poller: {ids} events may be missing here: more ids than --follow tracks "
                f"({follow.IdCursor.max_gaps:,}) were in flight at once; `poller history --changes --since` "
                "lists them once committed",
                file=sys.stderr,
                flush=True,
            )

        follow.run(tail, write, threading.Event(), report=report, gone=follow.reader_gone(out), warn=warn)
    except _Stopped:
        return 128 + stopped[0]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        store.close()
    # The reader left: nothing more may reach the closed pipe, not even the flush at exit.
    os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
    return EXIT_OK


def _follow_lines(fmt: str) -> tuple[str, Callable[[dict[str, Any]], str]]:
    """The header (printed once) and one event's line, for `history --follow`."""
    if fmt == "jsonl":
        from poller.events import cloudevent, unified_row

        return "", lambda row: json.dumps(cloudevent(unified_row(row)), ensure_ascii=False) + "\n"
    if fmt == "csv":
        import io

        def csv_line(cells: Sequence[str]) -> str:
            buffer = io.StringIO()
            csv.writer(buffer, lineterminator="\n").writerow(cells)
            return buffer.getvalue()

        return csv_line(CHANGE_COLUMNS), lambda row: csv_line(_text_row(row, CHANGE_COLUMNS))

    def table_line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, FOLLOW_WIDTHS, strict=True)).rstrip() + "\n"

    return table_line(CHANGE_COLUMNS), lambda row: table_line(_text_row(row, CHANGE_COLUMNS))


def _require_watch_name(store: Any, pattern: str) -> None:
    """A WATCH argument that names no watch is an error, not an empty table (a typo looks like 'no changes')."""
    # Asked of the database (the store's own name filter), not by reading 100,000 names.
    if store.watch_names(pattern, limit=1):
        return
    names: list[str] = store.watch_names(limit=21)
    shown = ", ".join(printable(n) for n in names[:20]) + (", ..." if len(names) > 20 else "")
    what = "matches" if any(ch in pattern for ch in "*?") else "named"
    raise RuntimeFailure(
        f"no watch {what} {printable(pattern)!r} in the database (known: {shown or 'none yet'}); "
        "`poller status` lists the active watches"
    )


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    """Create or upgrade the database schema to the newest revision."""
    from poller.store import migrate, safe_url

    _, settings = _settings(args, watches=False)
    # SQLite: not under a running daemon (its commits would fail against the new schema until restarted;
    # it migrates at its own start).
    lock = _writer_lock(settings, "poller db upgrade", wait=UPGRADE_WAIT)
    try:
        store = _open_store(settings, readonly=False)
        try:
            migrate(store.engine)
            if store.has_legacy_polls():
                # Poll rows of a release before the run-length log: fold them in now, with progress.
                def progress(done: int, total: int) -> None:
                    print(f"\rconverting old poll rows into runs: {done:,} of {total:,}", end="", file=sys.stderr)

                converted = store.convert_legacy_polls(progress)
                print(f"\nconverted {converted:,} poll rows into runs", file=sys.stderr)
        finally:
            store.close()
    finally:
        if lock is not None:
            lock.release()
    print(f"database {safe_url(settings.database.url)} is up to date")
    return EXIT_OK


def cmd_db_stats(args: argparse.Namespace) -> int:
    """Rows and bytes per table, and the size the database heads for at the last day's rate."""
    _, settings = _settings(args, watches=False)
    store = _open_store(settings, readonly=True)
    try:
        stats = store.stats(datetime.now(UTC))
    finally:
        store.close()
    tables = stats["tables"]
    if args.format != "table":
        _emit(tables, ("table", "rows", "bytes"), args.format)
        return EXIT_OK
    _emit([{**t, "bytes": _size(t["bytes"])} for t in tables], ("table", "rows", "bytes"), "table")
    print(f"\ndatabase: {_size(stats['total_bytes'])} on disk, {_size(stats['used_bytes'])} in use")
    print(f"last 24 h: {stats['runs_last_day']:,} poll runs, {stats['changes_last_day']:,} changes")
    by_name = {t["table"]: t for t in tables}
    retention_days = settings.database.poll_retention / 86400
    for table, count, what in (
        ("poll_runs", stats["runs_last_day"] * retention_days, f"at poll_retention ({retention_days:g} days)"),
        ("etag_history", stats["changes_last_day"] * 365, "after a year (kept forever)"),
    ):
        row = by_name[table]
        if row["rows"]:
            per_row = row["bytes"] / row["rows"]
            print(f"projected {table}: {_size(int(count * per_row))} {what}, at {per_row:.0f} bytes per row")
    return EXIT_OK


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return f"{n} B"


# --- parser ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; each command's docstring is its help."""
    common = _Parser(add_help=False)
    common.add_argument(
        "--config",
        "-c",
        metavar="PATH",
        help="config file (default: $POLLER_CONFIG, ./poller.toml, /etc/poller/config.toml)",
    )
    common.add_argument(
        "--log-level",
        default=os.environ.get("POLLER_LOG_LEVEL", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        type=str.upper,
        help="logging threshold on stderr (default INFO; DEBUG shows every unchanged poll)",
    )
    fmt = _Parser(add_help=False)
    fmt.add_argument("--format", choices=["table", "json", "csv"], default="table", help="output format")

    parser = _Parser(prog="poller", description="Watch S3 objects for changes with conditional HEAD requests.")
    parser.add_argument("--version", action="version", version=f"poller {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def add(name: str, func: Callable[[argparse.Namespace], int], parents: list[_Parser]) -> Any:
        doc = (func.__doc__ or "").strip()
        p = sub.add_parser(name, parents=parents, help=doc.splitlines()[0], description=doc)
        p.set_defaults(func=func)
        return p

    add("run", cmd_run, [common])
    add("once", cmd_once, [common])
    check = add("check", cmd_check, [common])
    check.add_argument("--probe", action="store_true", help="also send one HEAD per watch")
    doctor = add("doctor", cmd_doctor, [common])
    doctor.add_argument("--bucket", required=True, metavar="SCRATCH", help="a bucket doctor may write to")
    add("status", cmd_status, [common, fmt])
    history = add("history", cmd_history, [common])
    history.add_argument(
        "--format",
        choices=["table", "json", "csv", "jsonl"],
        default="table",
        help="output format; jsonl (with --changes): one CloudEvent per line, as sinks receive them",
    )
    history.add_argument("watch", nargs="?", metavar="WATCH", help="watch name, or a glob such as 'app-*'")
    history.add_argument("--since", metavar="WHEN", help="only rows newer than a duration ago (24h, 7d) or a time")
    history.add_argument(
        "--changes",
        action="store_true",
        help="events only: ETag changes (first_seen, modified, deleted, created) and watch signals "
        "(stale, fresh, settled, failing, recovered, access_lost)",
    )
    history.add_argument("--limit", type=_count, help="at most this many rows (default 100, 10 with --follow; 0 = all)")
    history.add_argument(
        "--follow",
        "-f",
        action="store_true",
        help="like `tail -f`: the last --limit events (default 10; --since 0s: none), then each event as it "
        "is committed, until Ctrl-C; implies --changes; --format table, csv or jsonl",
    )
    notify = sub.add_parser("notify", help="notification deliveries", description="Notification deliveries.")
    notify_sub = notify.add_subparsers(dest="notify_command", metavar="COMMAND", parser_class=_Parser)
    notify_sub.required = True
    for name, func in (("list", cmd_notify_list), ("retry", cmd_notify_retry)):
        doc = (func.__doc__ or "").strip()
        p = notify_sub.add_parser(
            name, parents=[common, fmt] if name == "list" else [common], help=doc, description=doc
        )
        p.set_defaults(func=func)
        if name == "list":
            p.add_argument("--status", choices=["pending", "delivered", "failed"], help="only this status")
            p.add_argument("--limit", type=_count, default=100, help="at most this many rows (default 100; 0 = all)")
        else:
            p.add_argument("--sink", metavar="NAME", help="only this sink's failed deliveries")
    db = sub.add_parser("db", help="database maintenance", description="Database maintenance.")
    db_sub = db.add_subparsers(dest="db_command", metavar="COMMAND", parser_class=_Parser)
    db_sub.required = True
    up = db_sub.add_parser(
        "upgrade",
        parents=[common],
        help=(cmd_db_upgrade.__doc__ or "").strip(),
        description=(cmd_db_upgrade.__doc__ or "").strip(),
    )
    up.set_defaults(func=cmd_db_upgrade)
    stats = db_sub.add_parser(
        "stats",
        parents=[common, fmt],
        help=(cmd_db_stats.__doc__ or "").strip(),
        description=(cmd_db_stats.__doc__ or "").strip(),
    )
    stats.set_defaults(func=cmd_db_stats)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point."""
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        return int(args.func(args))
    except (ConfigError, UsageError) as exc:
        print(f"poller: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except RuntimeFailure as exc:
        print(f"poller: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except StoreError as exc:
        print(f"poller: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    except SQLAlchemyError as exc:
        from poller.store import describe_db_error

        print(f"poller: {describe_db_error(exc, getattr(args, 'db_url', ''))}", file=sys.stderr)
        return EXIT_FAILED
    except BrokenPipeError:
        # `poller history | head`: the reader left; that is not an error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Exception as exc:
        # botocore is imported lazily (`status` and `history` never need it): match its errors here.
        from botocore.exceptions import InvalidConfigError, InvalidRegionError, NoRegionError, ProfileNotFound

        if not isinstance(exc, ProfileNotFound | InvalidRegionError | InvalidConfigError | NoRegionError):
            raise
        # Config validation catches these at load; this covers an AWS config file edited since.
        print(f"poller: the AWS client cannot be built from this configuration: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
