"""Table definitions (design.md section 4): the public schema users query with SQL.

The Alembic revisions in ``migrations/`` create and evolve these tables; this module is the
SQLAlchemy Core view the code queries through.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
    TypeDecorator,
    text,
)
from sqlalchemy.dialects.postgresql import TIMESTAMP
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeEngine

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)


def to_text(value: datetime) -> str:
    """ISO-8601 in UTC with offset and fixed precision, so text order is time order."""
    if value.tzinfo is not UTC:
        if value.tzinfo is None:
            raise ValueError("naive datetime: poller stores only timezone-aware UTC times")
        value = value.astimezone(UTC)
    # isoformat(timespec="microseconds")'s text, formatted directly: 40% less CPU, and the writer
    # formats several times a poll (up to 35% of its time at 80 ms of latency: py-spy).
    return "%04d-%02d-%02dT%02d:%02d:%02d.%06d+00:00" % (  # noqa: UP031 (faster than an f-string here)
        value.year,
        value.month,
        value.day,
        value.hour,
        value.minute,
        value.second,
        value.microsecond,
    )


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime: ``timestamptz`` on PostgreSQL, ISO-8601 text elsewhere.

    The text form keeps SQLite files readable with plain sqlite3, and its fixed format sorts as time.
    """

    impl = String(32)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(TIMESTAMP(timezone=True))
        return dialect.type_descriptor(String(32))

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> str | datetime | None:
        if value is None:
            return None
        if dialect.name == "postgresql":
            if value.tzinfo is None:
                raise ValueError("naive datetime: poller stores only timezone-aware UTC times")
            return value.astimezone(UTC)
        return to_text(value)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        return from_stored(value)


def from_stored(value: Any) -> datetime | None:
    """A stored time as an aware UTC datetime: ISO text (SQLite) or a timestamptz value (PostgreSQL)."""
    if value is None:
        return None
    if isinstance(value, datetime):  # timestamptz: aware, in the session's time zone
        return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
    parsed = datetime.fromisoformat(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


# 64-bit on PostgreSQL (a busy daemon exhausts a 32-bit polls.id in weeks; objects reach 2 GiB).
# SQLite's INTEGER is already 64-bit, and an INTEGER PRIMARY KEY must stay INTEGER to alias the rowid.
BigInt = BigInteger().with_variant(Integer(), "sqlite")


watches = Table(
    "watches",
    metadata,
    Column("id", BigInt, primary_key=True),
    Column("name", Text, nullable=False, unique=True),
    Column("bucket", Text, nullable=False),
    Column("key", Text, nullable=False),  # the object key, or the prefix of a prefix watch
    Column("kind", String(8), nullable=False, server_default="key"),  # key | prefix
    Column("interval_seconds", Float),
    Column("cron", Text),
    Column("active", Boolean, nullable=False, default=True),
    Column("created_at", UTCDateTime, nullable=False),
)

object_state = Table(
    "object_state",
    metadata,
    Column("watch_id", BigInt, ForeignKey("watches.id"), primary_key=True),
    Column("key", Text, primary_key=True),
    Column("etag", Text),
    Column("last_modified", UTCDateTime),
    Column("observed_server_date", UTCDateTime),
    Column("version_id", Text),
    Column("size", BigInt),
    Column("present", Boolean),
    Column("last_polled_at", UTCDateTime),
    Column("last_outcome", String(16)),
    Column("consecutive_errors", Integer, nullable=False, default=0),
    Column("last_error", Text),
    Column("last_changed_at", UTCDateTime),
    # How many changes of this key etag_history holds; a change commits only if the stored state is
    # the one its poll conditioned on (compare-and-set), and its history row takes seq + 1.
    Column("seq", BigInt, nullable=False, server_default="0", default=0),
    Column("run_id", BigInteger),  # this key's open row of poll_runs
    Column("error_since", UTCDateTime),  # when the current (or latest) error streak began
    # A prefix watch's own row: every include/exclude its list passes used since it took this prefix,
    # as JSON, so that a key a reload's wider filters let in is first seen, not created (poller.listing).
    Column("listed_filter", Text),
)

# The run-length poll log (poller.runs): consecutive polls of one key with the same outcome, status,
# ETag, Last-Modified and error are one row. Times are epoch milliseconds, durations microseconds;
# the views ``polls`` and ``poll_samples_view`` present them as before (ISO text / timestamptz).
poll_runs = Table(
    "poll_runs",
    metadata,
    Column("id", BigInt, primary_key=True),
    Column("watch_id", BigInt, ForeignKey("watches.id"), nullable=False),
    Column("key", Text),  # NULL: the watch's key (filled in if the watch is re-pointed)
    Column("outcome", SmallInteger, nullable=False),  # 0 unchanged, 1 modified, 2 missing, 3 error
    Column("http_status", Integer),
    Column("etag", Text),
    Column("last_modified", BigInteger),  # epoch ms
    Column("error", Text),
    Column("first_at", BigInteger, nullable=False),  # epoch ms of the run's first poll
    Column("last_at", BigInteger, nullable=False),  # epoch ms of its latest poll
    # last_at once the run is over (the key's next run began); NULL while it is the key's open run.
    # Indexed instead of last_at: extending an open run then changes no indexed column, so it costs
    # one row write (PostgreSQL: a HOT update) rather than an entry in every index.
    Column("ended_at", BigInteger),
    Column("count", BigInteger, nullable=False),
    Column("duration_min_us", BigInteger, nullable=False),
    Column("duration_sum_us", BigInteger, nullable=False),
    Column("duration_max_us", BigInteger, nullable=False),
    Index("ix_poll_runs_watch_id_first_at", "watch_id", "first_at"),
    Index("ix_poll_runs_ended_at", "ended_at"),
    # The open runs (one per watched key with a poll): what `history` reads besides the ended ones.
    Index(
        "ix_poll_runs_open",
        "watch_id",
        sqlite_where=text("ended_at IS NULL"),
        postgresql_where=text("ended_at IS NULL"),
    ),
)

# Every poll's exact time and duration, for a short window (database.sample_retention).
poll_samples = Table(
    "poll_samples",
    metadata,
    Column("id", BigInt, primary_key=True),
    Column("run_id", BigInteger, nullable=False),
    Column("polled_at", BigInteger, nullable=False),  # epoch ms
    Column("duration_us", BigInteger, nullable=False),
)

# The per-poll table of revisions 0001-0006, renamed by 0007 and folded into poll_runs in chunks
# (Store.convert_legacy_polls), then dropped.
polls_legacy = Table(
    "polls_legacy",
    MetaData(),
    Column("id", BigInt, primary_key=True),
    Column("watch_id", BigInt, nullable=False),
    Column("key", Text, nullable=False),
    Column("polled_at", UTCDateTime, nullable=False),
    Column("outcome", String(16), nullable=False),
    Column("http_status", Integer),
    Column("etag", Text),
    Column("last_modified", UTCDateTime),
    Column("duration_ms", Float),
    Column("error", Text),
)

etag_history = Table(
    "etag_history",
    metadata,
    Column("id", BigInt, primary_key=True),
    Column("watch_id", BigInt, ForeignKey("watches.id"), nullable=False),
    Column("key", Text, nullable=False),
    Column("detected_at", UTCDateTime, nullable=False),
    Column("event", String(16), nullable=False),
    Column("etag", Text),
    Column("previous_etag", Text),
    Column("last_modified", UTCDateTime),
    Column("version_id", Text),
    Column("size", BigInt),
    # The change's place in its key's history (1, 2, ...): unique, so the database itself refuses to
    # record one transition twice, whichever daemon tries.
    Column("seq", BigInt, nullable=False, server_default="0"),
    Index("ix_etag_history_watch_id_detected_at", "watch_id", "detected_at"),
    Index("ix_etag_history_detected_at", "detected_at"),
    Index("uq_etag_history_watch_id_key_seq", "watch_id", "key", "seq", unique=True),
)

# Signals about a watch over time (poller.signals): stale, fresh, settled, failing, recovered,
# access_lost. ``dedup`` names the occurrence (a deadline, a burst's last change, a streak's start):
# unique per watch and event, so no daemon records one signal twice.
watch_events = Table(
    "watch_events",
    metadata,
    Column("id", BigInt, primary_key=True),
    Column("watch_id", BigInt, ForeignKey("watches.id"), nullable=False),
    Column("key", Text, nullable=False),
    Column("event", String(16), nullable=False),
    Column("detected_at", UTCDateTime, nullable=False),
    Column("etag", Text),
    Column("error", Text),
    Column("detail", Text),  # a JSON object (poller.signals)
    Column("dedup", Text, nullable=False),
    Index("uq_watch_events_watch_id_event_dedup", "watch_id", "event", "dedup", unique=True),
    Index("ix_watch_events_watch_id_detected_at", "watch_id", "detected_at"),
    Index("ix_watch_events_detected_at", "detected_at"),
)

# Each checked watch's time-driven signal state, as its daemon last computed it (poller.signalcheck),
# for `poller status` and plain SQL: the next deadline, stale since, a burst settling since.
watch_signals = Table(
    "watch_signals",
    metadata,
    Column("watch_id", BigInt, ForeignKey("watches.id"), primary_key=True, autoincrement=False),
    Column("deadline_at", UTCDateTime),
    Column("stale_since", UTCDateTime),
    Column("settling_since", UTCDateTime),
)

notifications = Table(
    "notifications",
    metadata,
    Column("id", BigInt, primary_key=True),
    # The event delivered: a change (history_id) or a signal (event_id); exactly one is set.
    Column("history_id", BigInt, ForeignKey("etag_history.id")),
    Column("event_id", BigInt, ForeignKey("watch_events.id")),
    Column("sink", Text, nullable=False),
    Column("status", String(16), nullable=False),  # pending | delivered | failed
    Column("created_at", UTCDateTime, nullable=False),
    Column("queued_at", UTCDateTime, nullable=False),  # max_age counts from here; `notify retry` resets it
    Column("next_attempt_at", UTCDateTime, nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("last_error", Text),
    Column("delivered_at", UTCDateTime),
    # Several daemons (PostgreSQL): the instance delivering this row, until when (design.md section 6).
    Column("claimed_by", BigInt),
    Column("claimed_until", UTCDateTime),
    Index("ix_notifications_status_next_attempt_at", "status", "next_attempt_at"),
)

# What calibration learned about a server's conditional requests (design.md section 1, rule 3).
# bucket "" holds the endpoint-wide answer; a row per bucket where one differs.
server_semantics = Table(
    "server_semantics",
    metadata,
    Column("endpoint", Text, primary_key=True),
    Column("bucket", Text, primary_key=True),
    # rfc: If-None-Match wins over If-Modified-Since (RFC 9110); either: a 304 when either condition
    # says "not modified"; ims_ignored: If-Modified-Since is never honoured; inm_ignored: If-None-Match
    # is never honoured; inm_broken: a non-matching If-None-Match answers 304; unknown: not measured yet
    Column("precedence", String(16), nullable=False),
    Column("etag_on_304", Boolean),  # every 304 of the calibration carried the current ETag
    Column("version_id_on_404", Boolean),  # learned from the first deletion of a versioned object
    # the conditional mode in use: both | etag | timestamp | none (unconditional) | unknown (not measured)
    Column("mode", String(16), nullable=False),
    Column("learned_at", UTCDateTime, nullable=False),
    Column("detail", Text),
)

# Several daemons on one PostgreSQL database (design.md section 6); unused on SQLite (one daemon).
# A live instance renews heartbeat_at and its shard leases every heartbeat.
instances = Table(
    "instances",
    metadata,
    Column("id", BigInt, primary_key=True),
    Column("host", Text, nullable=False),
    Column("pid", Integer, nullable=False),
    Column("started_at", UTCDateTime, nullable=False),
    Column("heartbeat_at", UTCDateTime, nullable=False),
)

# One row per shard (a watch's shard is a hash of its name): who polls it, until when, and the
# epoch, bumped at every claim, that a commit checks in its own transaction (fencing).
shard_leases = Table(
    "shard_leases",
    metadata,
    Column("shard", Integer, primary_key=True, autoincrement=False),
    Column("instance_id", BigInt),
    Column("epoch", BigInt, nullable=False, server_default="0"),
    Column("expires_at", UTCDateTime),
    Index("ix_shard_leases_instance_id", "instance_id"),
)
