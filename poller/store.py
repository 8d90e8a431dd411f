"""All SQL lives here: open the database, migrate it, and a few verbs over the tables.

Verbs: sync the watch list, load object states, record poll results (one transaction per
batch, each result all-or-nothing), prune old polls, and read status and history.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
import weakref
import zlib
from collections.abc import Callable, Collection, Container, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from importlib import resources
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from sqlalchemy import (
    Column,
    Connection,
    Engine,
    MetaData,
    String,
    Table,
    Text,
    and_,
    bindparam,
    case,
    cast,
    create_engine,
    event,
    func,
    inspect,
    or_,
    select,
    text,
    true,
    tuple_,
    type_coerce,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, DisconnectionError
from sqlalchemy.sql.elements import ColumnElement

from poller.config import postgres_driver_problem
from poller.model import Filters, ObjectState, PollResult, PrefixState, Watch, object_of
from poller.redact import redact
from poller.runs import OUTCOME_CODES, OUTCOMES, Identity, Poll, Segment, from_ms, segments, to_ms
from poller.safetext import printable
from poller.schema import (
    etag_history,
    from_stored,
    instances,
    notifications,
    object_state,
    poll_runs,
    poll_samples,
    polls_legacy,
    server_semantics,
    shard_leases,
    to_text,
    watch_events,
    watch_signals,
    watches,
)
from poller.signals import BURST_EVENTS, FRESH_EVENTS, Rules, Signal, streak_signals
from poller.signals import dumps as signals_dumps
from poller.signals import loads as signals_loads
from poller.watchlist import WatchSpec
from poller.writeturns import WriteTurns

if TYPE_CHECKING:
    from poller.calibrate import Semantics

log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 5000
SYNC_CHUNK = 5000
DEFAULT_RULES = Rules()
_STATE_COLUMNS = (
    "etag",
    "last_modified",
    "observed_server_date",
    "version_id",
    "size",
    "present",
    "last_polled_at",
    "last_outcome",
    "consecutive_errors",
    "last_error",
)
# Rows deleted per pruning transaction. A run's entry in ix_poll_runs_watch_id_first_at sits on its
# own page (watches interleave), so each run deleted dirties a page: 1,000 held the write lock
# ~150 ms on a large file, 250 about a quarter of that. Samples have no secondary index.
PRUNE_CHUNK = 250
# SQLite's default: a commit that leaves the WAL this many pages long checkpoints it.
WAL_AUTOCHECKPOINT = 1000
SAMPLE_PRUNE_CHUNK = 2000
# Runs removed per step to fit max_db_size: the size is measured again after each step.
SIZE_CHUNK = 500
# Pre-0007 poll rows folded into runs per transaction: the write lock is held while they are read,
# folded and written (about 100 ms on a busy 2-core machine), so the daemon's writer waits little.
LEGACY_CHUNK = 1000
# Below this many object_state rows the staging table's two statements cost more than they save.
STAGE_MIN_ROWS = 8
# How often a lasting refusal to end a frozen holder's sessions is logged again (seconds).
REPEAT_REFUSAL_S = 600.0
_STAGE_INFO = "poller_staging_tables"
_OK_COLUMNS = ("watch_id", "key", *_STATE_COLUMNS, "last_changed_at")
_ERROR_COLUMNS = (
    "watch_id", "key", "last_polled_at", "last_outcome", "consecutive_errors", "last_error", "error_since"
)  # fmt: skip
# pg_advisory_xact_lock key serializing migrations across processes: "poller" in ASCII.
MIGRATION_LOCK = 0x706F6C6C6572
PRUNE_LOCK = MIGRATION_LOCK + 1
CONVERT_LOCK = MIGRATION_LOCK + 2
REGISTER_LOCK = MIGRATION_LOCK + 3
# Taken shared by every fenced batch before it reads the watches' targets, exclusive by a sync that
# re-points a watch: so a result of the old target commits before the sync drops its state, or
# reads the new target and is refused; never in between (an unlocked read saw the old target while
# the sync's transaction was open, and the old object's state came back as the new one's).
REPOINT_LOCK = MIGRATION_LOCK + 4
# How long a daemon may hold an outbox row it is delivering (well past any sink's timeout); a
# claim of a daemon whose heartbeat stopped lapses sooner, after one lease.
CLAIM_SECONDS = 600.0


Route = Callable[[str, str], list[str]]  # (watch name, event) -> notification sink names


class StoreError(Exception):
    """The database cannot be used; the message says what to do."""


class Fenced(Exception):
    """A result not recorded: this daemon no longer holds its watch's shard (several daemons)."""


class ShardCountChanged(StoreError):
    """The database's shard table no longer has this daemon's [cluster] shards (all daemons were
    restarted with another count while this one was paused or cut off): it must not poll."""


class Retargeted(Fenced):
    """A result of a watch's old target: another daemon's reload re-pointed the watch."""


class Superseded(Exception):
    """A change not recorded: the stored state moved on from the one its poll conditioned on."""


class _StaleRuns(Exception):
    """The cache of open runs disagrees with the database: the batch is redone without it."""


class Fence(Protocol):
    """What a daemon sharing the database with others holds (poller.cluster.Membership)."""

    instance_id: int
    lease: float

    def shard_of(self, name: str) -> int: ...

    def epochs(self) -> dict[int, int]: ...

    def epoch_of(self, name: str) -> int | None: ...


@dataclass(slots=True)
class Pruned:
    runs: int = 0
    samples: int = 0
    for_size: int = 0  # runs removed to keep the database under max_db_size


class _WatchRow(NamedTuple):
    """A row of ``watches`` as the sync compares it."""

    id: int
    name: str
    bucket: str
    key: str
    kind: str
    interval_seconds: float | None
    cron: str | None
    active: bool


@dataclass(frozen=True, slots=True)
class SyncResult:
    watches: dict[str, Watch]
    retargeted: frozenset[int]  # watch ids whose bucket or key changed: their old state was dropped


def fair_share(shards: int, live: int) -> int:
    """The most shards one of ``live`` instances holds: they split ``shards`` as evenly as they can."""
    return -(-shards // max(live, 1))


def migrations_dir() -> Path:
    """The Alembic script directory: packaged in the wheel, or ``migrations/`` beside a checkout."""
    packaged = Path(str(resources.files("poller"))) / "_migrations"
    if (packaged / "env.py").is_file():
        return packaged
    checkout = Path(__file__).resolve().parent.parent / "migrations"
    if (checkout / "env.py").is_file():
        return checkout
    raise StoreError("the database migrations are missing from this installation; reinstall poller")


# What each watch of a batch polls now, as the last reload of any daemon stored it.
_TARGETS_SQL = "SELECT id, bucket, key, kind FROM watches WHERE id = ANY(%s)"
_REPOINT_SHARED = f"SELECT pg_advisory_xact_lock_shared({REPOINT_LOCK})"
# The shards of a batch still held by this instance at an unexpired lease, locked until the commit
# against a claim (it locks FOR UPDATE: it skips them, and bumps the epoch only after). KEY SHARE, the
# weakest lock that does: this daemon's own heartbeat renews them under FOR NO KEY UPDATE meanwhile,
# so a long write never holds back its renewal and makes a live daemon look frozen.
_FENCE_SQL = (
    "SELECT shard, epoch FROM shard_leases WHERE shard = ANY(%s) AND instance_id = %s "
    "AND expires_at > clock_timestamp() ORDER BY shard FOR KEY SHARE"
)


def session_name(instance_id: int, schema: str) -> str:
    """The application_name of a cluster daemon's database sessions (PostgreSQL's pg_stat_activity):
    its instance, and a tag of the schema holding its tables (two clusters in one database)."""
    return f"poller-{zlib.crc32(schema.encode()):08x}-instance-{instance_id}"


MIN_SQLITE = (3, 35)


def open_engine(url: str, *, readonly: bool = False, idle_in_transaction: float | None = None) -> Engine:
    """An engine with poller's SQLite settings (WAL, busy timeout, foreign keys, explicit BEGIN).

    A plain ``postgresql://`` URL means psycopg 3 (the ``postgres`` extra), as
    ``postgresql+psycopg://`` does (SQLAlchemy 2.0 would look for psycopg2); no other PostgreSQL
    driver is accepted (config.postgres_driver_problem).
    ``idle_in_transaction`` (seconds, PostgreSQL): the server ends a session left idle inside a
    transaction this long, so a daemon frozen between two statements of a commit (SIGSTOP, a paused
    VM) cannot keep the row locks that fence its shards. One frozen inside a COPY or a pipeline
    counts as active: the daemon claiming its shards ends it (Store._end_frozen_holders).
    """
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        raise StoreError("[database] url is not a valid SQLAlchemy URL (e.g. sqlite:///poller.db)") from None
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    problem = postgres_driver_problem(url)
    if problem:
        raise StoreError(f"cannot use database {safe_url(url)}: {problem}")
    is_sqlite = parsed.get_backend_name() == "sqlite"
    if is_sqlite and sqlite3.sqlite_version_info < MIN_SQLITE:
        # RETURNING (3.35) and UPDATE ... FROM (3.33) would fail later as bare syntax errors.
        raise StoreError(
            f"this Python's SQLite library is {sqlite3.sqlite_version}; poller needs "
            f"{'.'.join(map(str, MIN_SQLITE))} or later (Debian 12, Ubuntu 22.04 and later have it): use a newer "
            "Python or distribution, or PostgreSQL"
        )
    if is_sqlite and parsed.database and parsed.database != ":memory:":
        path = Path(parsed.database)
        if readonly and not path.exists():
            raise StoreError(
                f"database {path} does not exist yet: start the daemon (poller run) or run "
                "`poller db upgrade` first, or point [database] url at the daemon's database"
            )
        if not path.parent.exists():
            raise StoreError(f"cannot create database {path}: directory {path.parent} does not exist")
    connect_args: dict[str, Any] = {}
    if idle_in_transaction and parsed.get_backend_name() == "postgresql":
        connect_args["options"] = f"-c idle_in_transaction_session_timeout={int(idle_in_transaction * 1000)}"
    try:
        engine = create_engine(parsed, pool_pre_ping=not is_sqlite, connect_args=connect_args)
    except ImportError as exc:
        hint = "; install it with: pip install 'poller[postgres]'" if parsed.get_backend_name() == "postgresql" else ""
        raise StoreError(f"cannot use database {safe_url(url)}: its driver is not installed ({exc}){hint}") from None
    except ArgumentError:
        raise StoreError(f"cannot use database {safe_url(url)}: not a valid SQLAlchemy URL") from None
    if is_sqlite:
        _configure_sqlite(engine, readonly=readonly)
    return engine


def _wal(dbapi_conn: sqlite3.Connection) -> None:
    """Switch to WAL. On a new file other processes may be switching or migrating at the same moment,
    and the switch can answer "database is locked" at once, without the busy timeout: try again
    for as long as that timeout would have waited."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            dbapi_conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _configure_sqlite(engine: Engine, *, readonly: bool) -> None:
    # pysqlite's own transaction handling would make DDL non-transactional and defer BEGIN;
    # take control of BEGIN (SQLAlchemy's pysqlite docs) and use IMMEDIATE for writers so a
    # busy database waits busy_timeout instead of failing on lock upgrade.
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: sqlite3.Connection, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        dbapi_conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        dbapi_conn.execute("PRAGMA foreign_keys = ON")
        if readonly:
            dbapi_conn.execute("PRAGMA query_only = ON")
        else:
            _wal(dbapi_conn)
            dbapi_conn.execute("PRAGMA synchronous = NORMAL")

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        read = readonly or conn.get_execution_options().get("poller_read", False)
        conn.exec_driver_sql("BEGIN" if read else "BEGIN IMMEDIATE")


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision (idempotent)."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    with engine.connect() as conn:
        is_sqlite = conn.dialect.name == "sqlite"
        if is_sqlite:
            # A batch migration's DROP would cascade with foreign keys on; the pragma is a no-op
            # inside a transaction, so set it on the raw connection before BEGIN.
            conn.connection.driver_connection.execute("PRAGMA foreign_keys = OFF")  # type: ignore[union-attr]
        try:
            with conn.begin():
                if conn.dialect.name == "postgresql":
                    # Two processes starting on a fresh database would both create the tables (one
                    # fails on pg_type's unique index); the second now waits, then finds head.
                    conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
                if is_sqlite:
                    broken = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                    if broken:
                        raise StoreError(f"migration left {len(broken)} rows violating foreign keys; rolled back")
        finally:
            if is_sqlite:
                conn.connection.driver_connection.execute("PRAGMA foreign_keys = ON")  # type: ignore[union-attr]


def describe_db_error(exc: BaseException, url: str) -> str:
    """Turn a database exception into a sentence for the operator."""
    text = redact(str(getattr(exc, "orig", exc)))
    where = safe_url(url)
    if "readonly database" in text or "attempt to write" in text or _read_only_dir(url):
        return (
            f"database {where} is read-only for this user ({text}): a WAL database needs write access to "
            "its directory even to read; run the command as the daemon's user (e.g. sudo -u poller) "
            "or grant the group write access to the directory"
        )
    if "database is locked" in text:
        return f"database {where} is locked by another writer ({text}); will retry"
    if "no such table" in text:
        return f"database {where} has no poller tables yet: run `poller db upgrade` (or start the daemon)"
    if "unable to open" in text:
        return f"cannot open database {where} ({text}): check the path and its directory permissions"
    if "disk" in text and ("full" in text or "I/O" in text):
        return f"database {where}: {text}; free space on the disk holding it"
    return f"database {where}: {text}"


def _read_only_dir(url: str) -> bool:
    """True when the SQLite database's directory cannot be written (WAL needs it, even to read)."""
    try:
        parsed = make_url(url)
    except Exception:
        return False
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return False
    directory = Path(parsed.database).parent
    return (directory.exists() and not os.access(directory, os.W_OK)) or _on_read_only_fs(directory)


def _on_read_only_fs(directory: Path) -> bool:
    try:
        return bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def safe_url(url: str) -> str:
    """A database URL as shown to the operator: no password, in the userinfo or the query."""
    if not url:
        return "(database)"
    try:
        return redact(make_url(url).render_as_string(hide_password=True))
    except (ArgumentError, ValueError):
        return "(unparseable URL)"


class Store:
    """The verbs the daemon and the CLI use; every SQL statement of poller is in this class."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        # SQLite writes one transaction at a time: within this process, hand the lock over exactly
        # and keep pruning behind the writer (poller/writeturns.py). PostgreSQL locks rows.
        self._turns = WriteTurns() if engine.dialect.name == "sqlite" else None
        self._insert = postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert
        # The larger of two values: SQLite's max() with two arguments is scalar.
        self._greatest = func.greatest if engine.dialect.name == "postgresql" else func.max
        self._upsert_ok, self._upsert_error = self._upserts()
        # SQLite: the writer's statements run by the driver on a tuple per row (_driver_statement). At
        # saturation SQLAlchemy's per-row parameter handling took more of the writer's time than
        # SQLite itself (py-spy); PostgreSQL has COPY and pipelines instead.
        self._on_driver = engine.dialect.name == "sqlite"
        self._driver_statements: dict[tuple[Any, tuple[str, ...]], _DriverMany] = {}
        self._plain_inserts = {table.name: table.insert() for table in (etag_history, notifications)}
        self._history_ids = etag_history.insert().returning(etag_history.c.id)
        self._cas = self._cas_statements()
        self._cas_pipelined = tuple(_NamedMany(statement, engine.dialect) for statement in self._cas)
        # The poll rows are most of what the writer writes; COPY costs a third of the client CPU
        # of psycopg's pipelined executemany (bench/store_write.py).
        self._copy = engine.dialect.name == "postgresql"  # psycopg 3: open_engine accepts no other driver
        # The object_state upserts likewise: COPY into a per-connection temporary table, then one
        # INSERT ... SELECT ... ON CONFLICT with the same guard, instead of one statement per row.
        self._stage_states = self._copy
        self._run_sql = _RunStatements(engine.dialect.name)
        # Each watch's open run (id, identity), as committed here. A run is open (ended_at IS NULL)
        # only while object_state points at it, so a cached id that is no longer open fails its
        # guard and the database is asked instead. Where this process is the only writer (SQLite: its
        # lock file sees to it) the cache is the truth: a different identity means a new run.
        self._authoritative = engine.dialect.name == "sqlite"
        self._open_runs: dict[int, tuple[int, Identity]] = {}
        # Every poll's exact time and duration go to poll_samples too (database.sample_retention > 0).
        self.keep_samples = True
        # Several daemons (PostgreSQL): this instance's sessions' name, and the schema of its tables.
        self._session_name: str | None = None
        self._schema = ""
        # The last refusal to end a frozen holder's sessions that was logged: (holders, SQLSTATE), when.
        self._refusal: tuple[tuple[frozenset[str], str], float] | None = None
        self._staged = (self._staged_upsert(error=False), self._staged_upsert(error=True))
        # Unchanged keys' staged upsert, run on the driver's cursor: its row count (how many the guard
        # let through) comes with the pipeline's results, at no extra statement.
        self._staged_ok = _NamedMany(self._staged[False][1], engine.dialect) if self._stage_states else None
        # Its parameters are constants: literals, and the default of each column the stage lacks (seq).
        self._staged_ok_params = self._staged_ok.bind([{}], object_state)[0] if self._staged_ok is not None else {}
        self._staged_first = self._staged_first_sightings()
        self._first_upsert = self._first_values()
        # Set when several daemons share this PostgreSQL database: every commit is fenced by it.
        self.fence: Fence | None = None
        # Each watch's signal rules by id (set by the daemon); a watch not here gets the defaults.
        self.rules: dict[int, Rules] = {}
        # Keys with a failing/access_lost signal not yet followed by recovered: (watch id, key) ->
        # (the streak's dedup, the signals raised). Loaded from watch_events before the first batch
        # and again after states are (re)loaded, e.g. when this daemon takes over a shard.
        self._alerting: dict[tuple[int, str], tuple[str, frozenset[str]]] | None = None
        self.signal_counts: dict[str, int] = {}

    @contextmanager
    def _tx(self, *, background: bool = False) -> Iterator[Connection]:
        """A write transaction; on SQLite it first takes this process's write turn (``background``
        work, pruning, goes only when no other writer of this process is waiting)."""
        if self._turns is None:
            with self.engine.begin() as conn:
                yield conn
            return
        if not background:
            with self._turns.turn(), self.engine.begin() as conn:
                yield conn
            return
        # A pruning chunk dirties about a page per index entry it deletes, enough for the commit
        # to cross the WAL's auto-checkpoint mark each time: checkpoint after the turn instead,
        # where the writer goes on appending meanwhile (PASSIVE blocks no writer).
        with self.engine.connect() as conn:
            raw = conn.connection.driver_connection
            with self._turns.turn(background=True):
                raw.execute("PRAGMA wal_autocheckpoint = 0")  # type: ignore[union-attr]
                try:
                    with conn.begin():
                        yield conn
                finally:
                    raw.execute(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT}")  # type: ignore[union-attr]
            raw.execute("PRAGMA wal_checkpoint(PASSIVE)")  # type: ignore[union-attr]

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        """A read-only transaction: on SQLite a plain BEGIN, so it never queues for the writer's lock."""
        with self.engine.connect() as conn:
            yield conn.execution_options(poller_read=True)

    def close(self) -> None:
        self.engine.dispose()

    # --- watch list -------------------------------------------------------------------

    def sync_watches(self, specs: Sequence[WatchSpec], now: datetime) -> SyncResult:
        """Make ``watches`` match the config: insert new, update changed, deactivate removed."""
        wanted = {spec.name: spec for spec in specs}
        retargeted: set[int] = set()
        sqlite_db = self.engine.dialect.name == "sqlite"
        # On the driver, in plain tuples: a million watches through SQLAlchemy's per-row parameter
        # handling took 20 s of a daemon's start. Several processes may start at once on one database:
        # a name another one inserted first is skipped (ON CONFLICT DO NOTHING) and its id read back below.
        mark = "?" if sqlite_db else "%s"
        insert = (
            'INSERT INTO watches (name, bucket, "key", kind, interval_seconds, cron, active, created_at) '
            f"VALUES ({', '.join([mark] * 6)}, {'1' if sqlite_db else 'TRUE'}, {mark}) ON CONFLICT (name) DO NOTHING"
        )
        created = to_text(now) if sqlite_db else now
        target = (watches.c.bucket, watches.c.key, watches.c.kind, watches.c.interval_seconds, watches.c.cron)
        with self._tx() as conn:
            # In id order, so concurrent syncs update rows in the same order and cannot deadlock.
            existing = _watch_rows(conn)
            if not sqlite_db and any(_moves(row, wanted.get(name)) for name, row in existing.items()):
                # Before any write of this transaction (REPOINT_LOCK): waits for the batches being
                # committed, and holds new ones back until this commits; a rare, short pause. Read
                # again under it: another daemon's sync of the same config may have re-pointed the
                # watches meanwhile, and batches may have stored the new targets' states since.
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": REPOINT_LOCK})
                existing = _watch_rows(conn)
            added = [s for name, s in wanted.items() if name not in existing]
            # In chunks: a million parameter tuples at once would add to the daemon's peak memory.
            for start in range(0, len(added), SYNC_CHUNK):
                conn.exec_driver_sql(
                    insert,
                    [
                        (s.name, s.bucket, s.key, s.kind, s.interval_seconds, s.cron, created)
                        for s in added[start : start + SYNC_CHUNK]
                    ],
                )
            for name, row in existing.items():
                spec = wanted.get(name)
                if spec is None:
                    if row.active:
                        conn.execute(update(watches).where(watches.c.id == row.id).values(active=False))
                    continue
                values = (spec.bucket, spec.key, spec.kind, spec.interval_seconds, spec.cron)
                if (row.bucket, row.key, row.kind, row.interval_seconds, row.cron, row.active) != (*values, True):
                    conn.execute(
                        update(watches)
                        .where(watches.c.id == row.id)
                        .values(dict(zip([c.name for c in target], values, strict=True), active=True))
                    )
                if _moves(row, spec):
                    # Another object (or prefix) now: its old state must not feed the next poll.
                    conn.execute(object_state.delete().where(object_state.c.watch_id == row.id))
                    # Runs name their key only when it is not the watch's: the old key's runs keep theirs.
                    conn.execute(
                        update(poll_runs)
                        .where(poll_runs.c.watch_id == row.id, poll_runs.c.key.is_(None))
                        .values(key=row.key)
                    )
                    conn.execute(
                        update(poll_runs)
                        .where(poll_runs.c.watch_id == row.id, poll_runs.c.ended_at.is_(None))
                        .values(ended_at=poll_runs.c.last_at)
                    )
                    retargeted.add(row.id)
                    self._open_runs.pop(row.id, None)
            # SQLAlchemy's result rows cost 4 s of a million-watch start.
            cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
            cursor.execute("SELECT id, name FROM watches")
            result = {name: spec.as_watch(id_) for id_, name in cursor if (spec := wanted.get(name)) is not None}
            cursor.close()
        return SyncResult(result, frozenset(retargeted))

    def load_states(self) -> dict[int, ObjectState]:
        """The committed state of every watched object, keyed by watch id."""
        return self._load_states(watches.c.kind == "key")[0]

    def load_prefix_states(self) -> dict[int, PrefixState]:
        """The committed per-key states of every prefix watch, keyed by watch id."""
        return self._load_states(watches.c.kind == "prefix")[1]

    def load_states_for(self, watch_ids: Sequence[int]) -> tuple[dict[int, ObjectState], dict[int, PrefixState]]:
        """The committed key states and prefix states of these watches (a watch re-added by a reload resumes
        from them, so a change made while it was out is ``modified``, not a second ``first_seen``)."""
        keyed: dict[int, ObjectState] = {}
        prefixed: dict[int, PrefixState] = {}
        self._alerting = None  # another daemon may have raised or cleared signals of these watches
        for start in range(0, len(watch_ids), SYNC_CHUNK):
            more_keyed, more_prefixed = self._load_states(watches.c.id.in_(list(watch_ids[start : start + SYNC_CHUNK])))
            keyed.update(more_keyed)
            prefixed.update(more_prefixed)
        return keyed, prefixed

    def _load_states(self, where: Any) -> tuple[dict[int, ObjectState], dict[int, PrefixState]]:
        """Key watches' states and prefix watches' listings from the object_state rows of watches ``where``."""
        s = object_state.c
        # Only the columns a state needs: a restart reads a million of these rows, each column a conversion.
        query = (
            select(
                s.watch_id,
                s.key,
                s.etag,
                s.last_modified,
                s.observed_server_date,
                s.version_id,
                s.size,
                s.present,
                s.last_outcome,
                s.listed_filter,
                watches.c.key.label("watch_key"),
                watches.c.kind,
            )
            .join(watches, watches.c.id == s.watch_id)
            .where(where)
        )
        keyed: dict[int, ObjectState] = {}
        prefixed: dict[int, PrefixState] = {}
        # The rows come from the driver as tuples, times converted as UTCDateTime does: SQLAlchemy's
        # rows and result processors took 15 s for a million keys.
        with self._read() as conn:
            for chunk in _driver_row_chunks(conn, query):
                self._add_states(chunk, keyed, prefixed)
        return keyed, prefixed

    @staticmethod
    def _add_states(rows: list[Any], keyed: dict[int, ObjectState], prefixed: dict[int, PrefixState]) -> None:
        """_load_states' reading of object_state rows (watch_id, key, ..., watch_key, kind) into states."""
        for watch_id, key, etag, modified, observed, version, size, present, outcome, filters, watch_key, kind in rows:
            if present is not None:
                present = bool(present)  # SQLite answers 0 or 1
            if kind != "prefix":
                if key == watch_key:  # a row left by an earlier target is not this watch's state
                    keyed[watch_id] = ObjectState(
                        etag, from_stored(modified), from_stored(observed), version, size, present
                    )
                continue
            entry = prefixed.setdefault(watch_id, PrefixState())
            if key == watch_key:
                # The list pass's own row: a successful pass means the prefix was listed (present
                # since this release, kept through later errors; the outcome before it).
                if present or outcome in ("unchanged", "modified"):
                    prefixed[watch_id] = PrefixState(True, entry.objects, _filters_of(filters))
                continue
            entry.objects[key] = ObjectState(etag, from_stored(modified), None, None, size, present)

    # --- recording ------------------------------------------------------------------

    def record(
        self, results: Sequence[PollResult], route: Route | None = None, epochs: Sequence[int | None] | None = None
    ) -> dict[int, Exception]:
        """Commit poll rows, object states and history events of ``results`` in one transaction.
        ``epochs`` (several daemons): by position, the lease epoch of its shard each poll was made under.

        ``route(watch_name, event)`` names the notification sinks of an event; their outbox rows
        are written in the same transaction, so a committed change is never without its delivery.
        Returns, by index, the results not (wholly) recorded: ``Fenced`` (this daemon no longer
        holds the watch's shard: nothing of it was written) or ``Superseded`` (the stored state is
        not the one the poll conditioned on: its poll row was written, its change was not).
        """
        try:
            return self._record(results, route, epochs)
        except _StaleRuns as exc:
            log.warning("recording polls: %s; asking the database instead", exc)
            self._open_runs.clear()
            return self._record(results, route, epochs)

    def _record(
        self, results: Sequence[PollResult], route: Route | None, epochs: Sequence[int | None] | None
    ) -> dict[int, Exception]:
        if not results:
            return {}
        run_polls: list[tuple[int, Poll]] = []
        # (index, state row, previous (etag, present), history row, watch name) of each changed key
        changed: list[tuple[int, dict[str, Any], tuple[str | None, bool | None], dict[str, Any], str]] = []
        ok_states: list[tuple[int, dict[str, Any]]] = []
        error_states: list[tuple[int, dict[str, Any]]] = []
        for i, r in enumerate(results):
            state = r.state
            seen = state or r.previous or ObjectState()
            run_polls.append((i, _run_poll(r, seen)))
            if state is None:
                error_states.append(
                    (
                        i,
                        {
                            "watch_id": r.watch.id,
                            "key": r.watch.key,
                            "last_polled_at": r.polled_at,
                            "last_outcome": "error",
                            "consecutive_errors": 1,
                            "last_error": r.error,
                            "error_since": r.polled_at,
                        },
                    )
                )
                continue
            # (key, event, previous, new state, outcome): one entry for a key watch; for a prefix
            # watch, the list pass's own row (keyed by the prefix) plus one per changed key.
            entries: list[tuple[str, str | None, ObjectState | None, ObjectState, str, bool]]
            if r.watch.prefix:
                entries = [(r.watch.key, None, None, state, r.outcome, any(c.event for c in r.changes))]
                entries += [
                    (c.key, c.event, c.previous, c.state, _key_outcome(c.event), c.event is not None) for c in r.changes
                ]
            else:
                entries = [(r.watch.key, r.event, r.previous, state, r.outcome, r.event is not None)]
            for key, change, previous, new, outcome, was_changed in entries:
                row = {
                    "watch_id": r.watch.id,
                    "key": key,
                    "etag": new.etag,
                    "last_modified": new.last_modified,
                    "observed_server_date": new.observed_server_date,
                    "version_id": new.version_id,
                    "size": new.size,
                    "present": new.present,
                    "last_polled_at": r.polled_at,
                    "last_outcome": outcome,
                    "consecutive_errors": 0,
                    "last_error": None,
                    "last_changed_at": r.polled_at if was_changed else None,
                }
                if not change:
                    ok_states.append((i, row))
                    continue
                history: dict[str, Any] = {
                    "watch_id": r.watch.id,
                    "key": key,
                    "detected_at": r.polled_at,
                    "event": change,
                    "etag": new.etag,
                    "previous_etag": previous.etag if previous else None,
                    "last_modified": new.last_modified,
                    "version_id": new.version_id,
                    "size": new.size,
                }
                conditioned = (previous.etag, previous.present) if previous else (None, None)
                changed.append((i, row, conditioned, history, r.watch.name))
        created: list[str] = []  # staging tables this transaction created (_write_states)
        learned: list[tuple[int, int, Identity]] = []  # (watch id, run id, identity) of open runs
        with self._tx() as conn:
            failed: dict[int, Exception] = self._fenced(conn, results, epochs) if self.fence is not None else {}
            outbox: list[dict[str, Any]] = []
            history_rows: list[dict[str, Any]] = []
            routed: list[tuple[dict[str, Any], list[str]]] = []
            first_seqs = self._first_sightings(conn, changed, failed, created)
            # Every other change is a compare-and-set of its own, so a change that another writer
            # already recorded (or that no longer follows the stored state) is refused row by row.
            cas_seqs = self._compare_and_set_all(
                conn,
                [
                    (j, row, conditioned)
                    for j, (i, row, conditioned, *_) in enumerate(changed)
                    if j not in first_seqs and i not in failed
                ],
            )
            for j, (i, _row, _conditioned, history, name) in enumerate(changed):
                if j in first_seqs:
                    # Decided with the batch: a first sighting it stored is recorded even if another
                    # change of its list pass was refused (its state row is written already).
                    seq = first_seqs[j]
                elif j in cas_seqs:
                    seq = cas_seqs[j]
                else:
                    continue
                if seq is None:
                    failed.setdefault(
                        i,
                        Superseded(
                            f"{printable(name)} {printable(history['key'])}: {history['event']} not recorded: the "
                            "stored state is no longer the one this poll started from (another writer recorded it)"
                        ),
                    )
                    continue
                history["seq"] = seq
                sinks = route(name, history["event"]) if route else []
                if sinks:
                    routed.append((history, sinks))
                else:
                    history_rows.append(history)
            if routed:
                ids = self._insert_history(conn, [history for history, _ in routed])
                for history_id, (history, sinks) in zip(ids, routed, strict=True):
                    outbox += [
                        {
                            "history_id": history_id,
                            "sink": sink,
                            "status": "pending",
                            "created_at": history["detected_at"],
                            "queued_at": history["detected_at"],
                            "next_attempt_at": history["detected_at"],
                            "attempts": 0,
                        }
                        for sink in sinks
                    ]
            if history_rows:
                self._insert_rows(conn, etag_history, history_rows)
            if outbox:
                self._insert_rows(conn, notifications, outbox)
            # A superseded change's poll still happened and is counted; a fenced one is not ours.
            recorded = [poll for i, poll in run_polls if not isinstance(failed.get(i), Fenced)]
            applying: list[Any] = []  # the staged upserts, sent while the polls fold into runs below
            ok_rows = [(i, row) for i, row in ok_states if i not in failed]
            written = (
                self._write_states(conn, [row for _, row in ok_rows], created, applying, error=False) if ok_rows else 0
            )
            rows = [row for i, row in error_states if i not in failed]
            if rows:
                self._write_states(conn, rows, created, applying, error=True)
            with _driver_cursor(conn, "the unchanged keys' states") as staged_ok:
                with _pipelined(conn, bool(applying)):
                    for statement in applying:
                        if self._staged_ok is not None and statement is self._staged_ok.statement:
                            staged_ok.execute(self._staged_ok.sql, self._staged_ok_params)
                        else:
                            conn.execute(statement)
                    folded = segments(recorded)
                if written is None:
                    written = int(staged_ok.rowcount)  # known once the pipeline is through
            # An unchanged poll's state the guard kept (it was not the stored one: another writer,
            # such as `poller once`, recorded a change): refused, so the daemon reads the stored
            # state back and its next poll compares against it; taken as written, the change back
            # to what this poll saw would never be recorded.
            kept = self._kept_states(conn, [row for _, row in ok_rows]) if written < len(ok_rows) else set()
            for i, upserted in ok_rows:
                if (upserted["watch_id"], upserted["key"]) in kept:
                    failed[i] = Superseded(
                        f"{printable(results[i].watch.name)} {printable(upserted['key'])}: unchanged, but not against "
                        "the stored state (another writer recorded a change since this daemon read it)"
                    )
            # A pass's filters with its keys' states (a Superseded pass's are written too: every key it
            # listed has its row), so that its next diff tells a key they let in from one they did not.
            passes = [
                {"b_watch": r.watch.id, "b_key": r.watch.key, "b_filters": _filters_text(r.filters)}
                for i, r in enumerate(results)
                if r.filters is not None and r.state is not None and not isinstance(failed.get(i), Fenced)
            ]
            if passes:
                conn.execute(_SET_LISTED_FILTER, passes)
            signals = self._streak_signals(conn, results, ok_states, error_states, changed, failed)
            raised = self._insert_signals(conn, signals, route) if signals else []
            # After the states: a key's open run is found through its object_state row.
            self._write_runs(conn, folded, created, learned)
            info = conn.info
        if created:
            info.setdefault(_STAGE_INFO, set()).update(created)
        if learned:
            # Committed: the next polls of these watches extend their open runs by id.
            self._open_runs.update((watch_id, (run_id, identity)) for watch_id, run_id, identity in learned)
        if signals:
            self._signals_committed(signals, raised)
        return failed

    def _streak_signals(
        self,
        conn: Connection,
        results: Sequence[PollResult],
        ok_states: list[tuple[int, dict[str, Any]]],
        error_states: list[tuple[int, dict[str, Any]]],
        changed: list[tuple[int, dict[str, Any], Any, dict[str, Any], str]],
        failed: dict[int, Exception],
    ) -> list[Signal]:
        """failing / access_lost for this batch's error streaks, recovered for keys back to success.

        Errors are rare next to polls: their keys' streaks are read back after the upsert (one
        query per batch with errors); successes only look up the small set of alerting keys.
        """
        alerting = self._load_alerting(conn)
        out: list[Signal] = []
        recovered: set[tuple[int, str]] = set()
        for i, row in [*ok_states, *((i, row) for i, row, *_ in changed)]:
            ident = (row["watch_id"], row["key"])
            if i in failed or ident not in alerting or ident in recovered:
                continue
            recovered.add(ident)
            dedup, raised = alerting[ident]
            detail = signals_dumps({"since": dedup, "signals": sorted(raised)})
            r = results[i]
            out.append(
                Signal(r.watch.id, r.watch.name, row["key"], "recovered", r.polled_at, dedup, row["etag"], None, detail)
            )
        errors = {(row["watch_id"], row["key"]): i for i, row in error_states if i not in failed}
        if not errors:
            return out
        c = object_state.c
        query = select(c.watch_id, c.key, c.consecutive_errors, c.error_since, c.last_error, c.present, c.etag)
        for start in range(0, len(errors), SYNC_CHUNK):
            chunk = list(errors)[start : start + SYNC_CHUNK]
            for state in conn.execute(query.where(tuple_(c.watch_id, c.key).in_(chunk))):
                r = results[errors[(state.watch_id, state.key)]]
                out += streak_signals(
                    self.rules.get(r.watch.id, DEFAULT_RULES),
                    watch_id=r.watch.id,
                    watch=r.watch.name,
                    key=state.key,
                    now=r.polled_at,
                    consecutive_errors=state.consecutive_errors,
                    error_since=state.error_since,
                    last_error=state.last_error,
                    http_status=r.http_status,
                    was_present=state.present,
                    etag=state.etag,
                )
        return out

    def _load_alerting(self, conn: Connection) -> dict[tuple[int, str], tuple[str, frozenset[str]]]:
        if self._alerting is not None:
            return self._alerting
        e = watch_events.c
        rows = conn.execute(
            select(e.watch_id, e.key, e.event, e.dedup).where(e.event.in_(("failing", "access_lost", "recovered")))
        )
        raised: dict[tuple[int, str, str], set[str]] = {}
        for row in rows:
            raised.setdefault((row.watch_id, row.key, row.dedup), set()).add(row.event)
        self._alerting = {
            (watch_id, key): (dedup, frozenset(events))
            for (watch_id, key, dedup), events in raised.items()
            if "recovered" not in events
        }
        return self._alerting

    def _insert_signals(self, conn: Connection, signals: Sequence[Signal], route: Route | None) -> list[bool]:
        """Insert each signal unless its (watch, event, dedup) is recorded already; queue its deliveries.
        Returns, per signal, whether it was new."""
        e = watch_events
        statement = (
            self._insert(e)
            .on_conflict_do_nothing(index_elements=[e.c.watch_id, e.c.event, e.c.dedup])
            .returning(e.c.id)
        )
        new: list[bool] = []
        outbox: list[dict[str, Any]] = []
        for sig in signals:
            pk = conn.execute(
                statement.values(
                    watch_id=sig.watch_id,
                    key=sig.key,
                    event=sig.event,
                    detected_at=sig.detected_at,
                    etag=sig.etag,
                    error=sig.error,
                    detail=sig.detail,
                    dedup=sig.dedup,
                )
            ).scalar()
            new.append(pk is not None)
            if pk is None or route is None:
                continue
            outbox += [
                {
                    "event_id": pk,
                    "sink": sink,
                    "status": "pending",
                    "created_at": sig.detected_at,
                    "queued_at": sig.detected_at,
                    "next_attempt_at": sig.detected_at,
                    "attempts": 0,
                }
                for sink in route(sig.watch, sig.event)
            ]
        if outbox:
            conn.execute(notifications.insert(), outbox)
        return new

    def _signals_committed(self, signals: Sequence[Signal], new: Sequence[bool]) -> None:
        """After commit: the alerting keys as the database now has them, and the counts for metrics."""
        alerting = self._alerting
        for sig, fresh in zip(signals, new, strict=True):
            ident = (sig.watch_id, sig.key)
            if fresh:
                self.signal_counts[sig.event] = self.signal_counts.get(sig.event, 0) + 1
                log.log(
                    logging.INFO if sig.event in ("recovered", "fresh", "settled") else logging.WARNING,
                    "%s %s: %s%s",
                    printable(sig.watch),
                    sig.event,
                    printable(sig.key),
                    f" ({printable(sig.error)})" if sig.error else "",
                )
            if alerting is None:
                continue
            if sig.event == "recovered":
                alerting.pop(ident, None)
            elif sig.event in ("failing", "access_lost"):
                dedup, raised = alerting.get(ident, (sig.dedup, frozenset()))
                if dedup == sig.dedup:
                    alerting[ident] = (dedup, raised | {sig.event})

    def record_signals(self, signals: Sequence[Signal], route: Route | None = None) -> list[Signal]:
        """Record time-driven signals (stale, fresh, settled) once each; returns the ones that were new."""
        if not signals:
            return []
        with self._tx() as conn:
            new = self._insert_signals(conn, signals, route)
        self._signals_committed(signals, new)
        return [sig for sig, fresh in zip(signals, new, strict=True) if fresh]

    # --- time-driven signals (poller.signalcheck) ---------------------------------------

    def signal_inputs(self, watch_ids: Sequence[int]) -> dict[int, dict[str, Any]]:
        """Per watch: when it was created, and its own key's (or prefix's) last change, poll and outcome."""
        state = object_state.c
        query = (
            select(
                watches.c.id,
                watches.c.created_at,
                state.last_changed_at,
                state.last_polled_at,
                state.last_outcome,
                state.etag,
            )
            .select_from(watches)
            .outerjoin(object_state, and_(state.watch_id == watches.c.id, state.key == watches.c.key))
        )
        out: dict[int, dict[str, Any]] = {}
        with self._read() as conn:
            for start in range(0, len(watch_ids), SYNC_CHUNK):
                chunk = list(watch_ids[start : start + SYNC_CHUNK])
                out.update((row.id, dict(row._mapping)) for row in conn.execute(query.where(watches.c.id.in_(chunk))))
        return out

    def last_fresh_change(self, watch_id: int, before: datetime | None = None) -> tuple[datetime, str | None] | None:
        """The latest delivery of a watch (``modified``/``created``: time, ETag), detected before
        ``before`` if given; failing that, the newest object it first saw (by Last-Modified); None if
        it has seen nothing."""
        h = etag_history.c
        query = (
            select(h.event, h.detected_at, h.last_modified, h.etag)
            .where(h.watch_id == watch_id, h.event.in_((*FRESH_EVENTS, "first_seen")))
            .order_by(h.detected_at.desc(), h.id.desc())
        )
        if before is not None:
            query = query.where(h.detected_at < before)
        first: tuple[datetime, str | None] | None = None
        with self._read() as conn:
            for row in conn.execute(query.limit(1000)):
                if row.event in FRESH_EVENTS:
                    return row.detected_at, row.etag
                at = min(row.last_modified or row.detected_at, row.detected_at)
                if first is None or at > first[0]:
                    first = (at, row.etag)
        return first

    def fresh_changes_since(self, since: datetime) -> list[tuple[int, datetime, str | None]]:
        """Deliveries (``modified``/``created``) detected since ``since``: (watch id, time, ETag)."""
        h = etag_history.c
        query = select(h.watch_id, h.detected_at, h.etag).where(h.detected_at >= since, h.event.in_(FRESH_EVENTS))
        with self._read() as conn:
            return [(row.watch_id, row.detected_at, row.etag) for row in conn.execute(query)]

    def burst(self, watch_id: int, after: datetime, until: datetime) -> list[tuple[str, datetime]]:
        """The changes (modified, created, deleted) of a watch in (after, until]: (key, time), oldest first."""
        h = etag_history.c
        query = (
            select(h.key, h.detected_at)
            .where(h.watch_id == watch_id, h.detected_at > after, h.detected_at <= until, h.event.in_(BURST_EVENTS))
            .order_by(h.detected_at, h.id)
        )
        with self._read() as conn:
            return [(row.key, row.detected_at) for row in conn.execute(query)]

    def timed_signals(self) -> tuple[dict[int, tuple[str, datetime]], dict[int, str]]:
        """What watch_events says now: each watch's stale signal not yet followed by fresh (dedup, when
        raised), and the dedup of each watch's latest settled signal (the burst's last change)."""
        e = watch_events.c
        stale: dict[int, tuple[str, datetime]] = {}
        fresh: set[tuple[int, str]] = set()
        settled: dict[int, str] = {}
        query = select(e.watch_id, e.event, e.dedup, e.detected_at).where(e.event.in_(("stale", "fresh", "settled")))
        with self._read() as conn:
            for row in conn.execute(query):
                if row.event == "stale":
                    if row.watch_id not in stale or row.dedup > stale[row.watch_id][0]:
                        stale[row.watch_id] = (row.dedup, row.detected_at)
                elif row.event == "fresh":
                    fresh.add((row.watch_id, row.dedup))
                elif row.dedup > settled.get(row.watch_id, ""):
                    settled[row.watch_id] = row.dedup
        return {w: v for w, v in stale.items() if (w, v[0]) not in fresh}, settled

    def saved_deadlines(self) -> dict[int, datetime]:
        """The deadline each watch's last check saw in force (watch_signals.deadline_at)."""
        query = select(watch_signals.c.watch_id, watch_signals.c.deadline_at).where(
            watch_signals.c.deadline_at.is_not(None)
        )
        with self._read() as conn:
            return {row.watch_id: row.deadline_at for row in conn.execute(query)}

    def save_watch_signals(self, rows: Sequence[dict[str, Any]]) -> None:
        """Upsert watch_signals rows (watch_id, deadline_at, stale_since, settling_since)."""
        if not rows:
            return
        statement = self._insert(watch_signals)
        statement = statement.on_conflict_do_update(
            index_elements=[watch_signals.c.watch_id],
            set_={c: statement.excluded[c] for c in ("deadline_at", "stale_since", "settling_since")},
        )
        with self._tx() as conn:
            conn.execute(statement, list(rows))

    def alerting_watches(self, among: Container[int] | None = None) -> int:
        """How many watches (of ``among``) have a failing or access_lost signal not yet followed by recovered."""
        alerting = self._alerting
        if alerting is None:
            with self._read() as conn:
                alerting = self._load_alerting(conn)
        ids = {watch_id for watch_id, _key in list(alerting)}  # list(): one atomic copy under the GIL
        return len(ids) if among is None else sum(1 for watch_id in ids if watch_id in among)

    def _write_states(
        self, conn: Connection, rows: list[dict[str, Any]], created: list[str], applying: list[Any], *, error: bool
    ) -> int | None:
        """Upsert the object_state rows of unchanged keys (or of errors), in batch order; a staged
        batch (PostgreSQL) is COPYed here, and the upsert that applies it appended to ``applying``.
        Returns how many rows the upsert wrote, or None when it runs later (staged)."""
        if self._on_driver:
            upsert, columns = (self._upsert_error, _ERROR_COLUMNS) if error else (self._upsert_ok, _OK_COLUMNS)
            return self._driver_statement(upsert, columns).run(conn, rows)
        if not self._stage_states or len(rows) < STAGE_MIN_ROWS:
            return int(conn.execute(self._upsert_error if error else self._upsert_ok, rows).rowcount)
        if error:
            # Errors of one key add up (consecutive_errors + 1 each); the last one's text stays.
            rows = _fold_errors(rows)
        elif len({(row["watch_id"], row["key"]) for row in rows}) < len(rows):
            # One key twice: row by row, each against what the one before it left (the guard, and
            # last_changed_at kept from an earlier row); one INSERT ... SELECT cannot touch a row twice.
            return int(conn.execute(self._upsert_ok, rows).rowcount)
        stage, upsert = self._staged[error]
        _stage_rows(conn, stage, rows, created)
        applying.append(upsert)
        return None

    def _kept_states(self, conn: Connection, rows: list[dict[str, Any]]) -> set[tuple[int, str]]:
        """Of unchanged keys' upserted ``rows``, those whose stored state the guard kept (another
        writer recorded a change the poll's state had not seen): ETag or presence differs."""
        state = object_state.c
        query = select(state.watch_id, state.key, state.etag, state.present).where(
            state.watch_id.in_(sorted({row["watch_id"] for row in rows}))
        )
        stored = {(w, k): (e, p) for w, k, e, p in conn.execute(query)}
        return {
            (row["watch_id"], row["key"])
            for row in rows
            if stored.get((row["watch_id"], row["key"])) != (row["etag"], row["present"])
        }

    def _write_runs(
        self, conn: Connection, folded: list[Segment], created: list[str], learned: list[tuple[int, int, Identity]]
    ) -> None:
        """Extend each key's open run, or open a new one, and write the samples (poller.runs).

        ``learned`` receives (watch id, run id, identity) of the runs open after this batch, for
        the cache of open runs once the transaction has committed.
        """
        if not folded:
            return
        sql = self._run_sql
        sampled: set[int] = set()  # segments whose one sample the staged UPDATE wrote itself
        with _driver_cursor(conn, "poll_runs") as cursor:
            if self._copy and len(folded) >= STAGE_MIN_ROWS:
                run_ids = self._extend_staged(conn, cursor, folded, created, learned, sampled)
            else:
                run_ids = self._extend_rows(cursor, folded, learned)
            opened: list[tuple[int, int, str]] = []
            samples: list[tuple[int, int, int]] = []
            # The runs a batch opens (every key's first polls after a start, every change).
            new = [n for n in range(len(folded)) if n not in run_ids]
            ids = _each_returning(cursor, sql.insert, [_run_row(folded[n]) for n in new], self._copy)
            inserted = dict(zip(new, ids, strict=True))
            for n, seg in enumerate(folded):
                run_id = run_ids.get(n)
                if run_id is None:
                    run_id = inserted[n]
                    if seg.opens:
                        opened.append((run_id, seg.watch_id, seg.state_key))
                        if seg.run_key is None:
                            learned.append((seg.watch_id, run_id, seg.identity))
                if self.keep_samples and n not in sampled:
                    samples += [(run_id, at, duration) for at, duration in seg.samples]
            if opened and self._copy:
                cursor.executemany(sql.close_and_open, [(w, key, run_id, w, key) for run_id, w, key in opened])
            elif opened:
                cursor.executemany(sql.close, [(watch_id, key) for _, watch_id, key in opened])
                cursor.executemany(sql.open, opened)
            if samples and self._copy:
                _copy_in(cursor, "poll_samples", ("run_id", "polled_at", "duration_us"), samples)
            elif samples:
                cursor.executemany(sql.sample, samples)

    def _extend_rows(
        self, cursor: Any, folded: list[Segment], learned: list[tuple[int, int, Identity]]
    ) -> dict[int, int]:
        """Extend open runs: by cached id in one executemany where this process is the only writer,
        else (and for a watch not cached yet) row by row through object_state.run_id."""
        sql = self._run_sql
        run_ids: dict[int, int] = {}
        known: list[tuple[Any, ...]] = []
        cached = self._open_runs
        for n, seg in enumerate(folded):
            if not seg.may_extend:
                continue
            open_run = cached.get(seg.watch_id) if seg.run_key is None else None
            if open_run is not None and open_run[1] == seg.identity:
                run_ids[n] = open_run[0]
                known.append((*_run_totals(seg), open_run[0], seg.watch_id, *seg.identity))
                continue
            if open_run is not None and self._authoritative:
                continue  # a different identity: the cache knows the open run cannot be extended
            cursor.execute(sql.extend, (*_run_totals(seg), seg.watch_id, seg.state_key, *seg.identity))
            row = cursor.fetchone()
            if row is not None:
                run_ids[n] = row[0]
                if seg.opens and seg.run_key is None:
                    learned.append((seg.watch_id, row[0], seg.identity))
        if known:
            cursor.executemany(sql.extend_known, known)
            if cursor.rowcount != len(known):
                # The cache disagrees with the database (say, an open run pruned): redo the batch
                # without it (record() rolls back and retries once).
                raise _StaleRuns(f"{len(known) - cursor.rowcount} cached open runs no longer match")
        return run_ids

    def _extend_staged(
        self,
        conn: Connection,
        cursor: Any,
        folded: list[Segment],
        created: list[str],
        learned: list[tuple[int, int, Identity]],
        sampled: set[int],
    ) -> dict[int, int]:
        """PostgreSQL: extend the open runs of a batch in one UPDATE ... FROM a COPY-staged table,
        by cached id where there is one (a primary-key join), else through object_state.run_id.
        ``sampled`` receives the segments of one poll whose sample that UPDATE wrote as well."""
        if _RUN_STAGE not in conn.info.get(_STAGE_INFO, ()):
            cursor.execute(
                f"CREATE TEMPORARY TABLE IF NOT EXISTS {_RUN_STAGE} (n integer, run_id bigint, watch_id bigint, "
                "state_key text, outcome smallint, http_status integer, etag text, last_modified bigint, "
                "error text, last_at bigint, count bigint, dmin bigint, dsum bigint, dmax bigint) "
                "ON COMMIT DELETE ROWS"
            )
            created.append(_RUN_STAGE)
        cached = self._open_runs
        guessed: set[int] = set()
        asked: list[int] = []
        staged: list[tuple[Any, ...]] = []
        for n, seg in enumerate(folded):
            if not seg.may_extend:
                continue
            open_run = cached.get(seg.watch_id) if seg.run_key is None else None
            if open_run is None or open_run[1] != seg.identity:
                asked.append(n)  # after a change, a restart or a handover: object_state knows
                continue
            guessed.add(n)
            staged.append((n, open_run[0], seg.watch_id, seg.state_key, *seg.identity, *_run_totals(seg)))
        if staged:
            _copy_in(cursor, _RUN_STAGE, _RUN_STAGE_COLUMNS, staged)
        run_ids: dict[int, int] = {}
        if guessed:
            # Joined by primary key only, so the plan stays a few index lookups per row however
            # many open runs there are (through object_state it hashed every open run).
            # A segment of one poll (nearly all: a key is polled once per batch) is its own sample:
            # written from the staged row by the server, not encoded and sent again by this one.
            if self.keep_samples:
                cursor.execute(self._run_sql.extend_staged_sampled)
                for n, run_id, count in cursor.fetchall():
                    run_ids[n] = run_id
                    if count == 1:
                        sampled.add(n)
            else:
                cursor.execute(self._run_sql.extend_staged)
                run_ids.update(cursor.fetchall())
        # Not cached, or the cached run is over (another daemon held the key meanwhile), or cached
        # with another identity (every key's second poll after a start): object_state knows.
        todo = [*asked, *sorted(guessed - run_ids.keys())]
        params = [(*_run_totals(seg), seg.watch_id, seg.state_key, *seg.identity) for seg in (folded[n] for n in todo)]
        for n, run_id in zip(todo, _each_returning(cursor, self._run_sql.extend, params, pipelined=True), strict=True):
            if run_id is not None:
                run_ids[n] = run_id
        for n, run_id in run_ids.items():
            seg = folded[n]
            if seg.opens and seg.run_key is None and n not in guessed:
                learned.append((seg.watch_id, run_id, seg.identity))
        return run_ids

    def _staged_upsert(self, *, error: bool) -> tuple[Table, Any]:
        """A temporary staging table and the upsert from it that equals the row-by-row one."""
        columns = list(_ERROR_COLUMNS if error else _OK_COLUMNS)
        stage = Table(
            "poller_stage_error" if error else "poller_stage_ok",
            MetaData(),
            *[Column(c, object_state.c[c].type) for c in columns],
        )
        statement = postgresql.insert(object_state).from_select(columns, select(*stage.columns))
        if error:
            set_: dict[str, Any] = {
                "last_polled_at": statement.excluded.last_polled_at,
                "last_outcome": statement.excluded.last_outcome,
                "last_error": statement.excluded.last_error,
                # A staged row carries the count of its key's errors in the batch (_fold_errors).
                "consecutive_errors": object_state.c.consecutive_errors + statement.excluded.consecutive_errors,
                "error_since": _streak_start(statement.excluded),
            }
            where = None
        else:
            set_ = {
                **{c: statement.excluded[c] for c in _STATE_COLUMNS},
                "last_changed_at": func.coalesce(statement.excluded.last_changed_at, object_state.c.last_changed_at),
            }
            where = _unchanged_guard(statement.excluded)
        return stage, statement.on_conflict_do_update(
            index_elements=[object_state.c.watch_id, object_state.c.key], set_=set_, where=where
        )

    def _insert_rows(self, conn: Connection, table: Table, rows: list[dict[str, Any]]) -> None:
        """Insert a batch's rows (all with the same columns): by COPY on psycopg (first sightings of
        12,000 keys: ~40 µs of client CPU per row less than its pipelined executemany), else executemany."""
        if self._copy and len(rows) >= STAGE_MIN_ROWS:
            _copy_rows(conn, table, rows)
        elif self._on_driver:
            self._driver_statement(self._plain_inserts[table.name], list(rows[0])).run(conn, rows)
        else:
            conn.execute(table.insert(), rows)

    def _driver_statement(self, statement: Any, columns: Sequence[str]) -> _DriverMany:
        """``statement`` (one built once: it is the cache key) compiled for the driver once per set
        of row columns (SQLite)."""
        key = (statement, tuple(columns))
        driver = self._driver_statements.get(key)
        if driver is None:
            driver = self._driver_statements[key] = _DriverMany(statement, self.engine.dialect, columns)
        return driver

    def _insert_history(self, conn: Connection, rows: list[dict[str, Any]]) -> list[int]:
        """Insert history rows (all with the same columns); their ids, in order."""
        if self._copy:
            # One pipelined executemany: through SQLAlchemy's insertmanyvalues, psycopg parsed the
            # batch's long multi-row statement anew each time (~0.1 ms per row).
            columns = list(rows[0])
            sql = (
                f"INSERT INTO etag_history ({', '.join(columns)}) "
                f"VALUES ({', '.join(['%s'] * len(columns))}) RETURNING id"
            )
            with _driver_cursor(conn, sql) as cursor:
                params = [tuple(row[c] for c in columns) for row in rows]
                return [int(i) for i in _each_returning(cursor, sql, params, pipelined=True)]
        # Row by row on the driver: SQLAlchemy's multi-row VALUES spent more on each row's parameters
        # than SQLite on inserting it (a list pass over a new prefix routes thousands at once).
        driver = self._driver_statement(self._history_ids, list(rows[0]))
        return [int(i) for (i,) in driver.returning(conn, rows)]

    def _first_sightings(
        self,
        conn: Connection,
        changed: list[tuple[int, dict[str, Any], tuple[str | None, bool | None], dict[str, Any], str]],
        failed: dict[int, Exception],
        created: list[str],
    ) -> dict[int, int | None]:
        """Compare-and-set a batch's first sightings in one statement (a daemon's start, or a list
        pass over a new prefix, is all first sightings: row by row each cost two statements, on
        PostgreSQL two round trips). By position in ``changed``, the change's sequence number, or None
        where another writer saw the key first; a position not returned goes row by row."""
        keys: dict[tuple[int, str], int] = {}
        for _, row, *_ in changed:
            ident = (row["watch_id"], row["key"])
            keys[ident] = keys.get(ident, 0) + 1
        # A key with another change in the batch goes row by row, in order: one INSERT ... SELECT
        # cannot touch a row twice, and its later change is conditioned on this one. Keys are
        # independent of each other, so a list pass's new keys are batched like key watches'.
        firsts = {
            (row["watch_id"], row["key"]): (j, row)
            for j, (i, row, conditioned, *_) in enumerate(changed)
            if i not in failed and conditioned == (None, None) and keys[(row["watch_id"], row["key"])] == 1
        }
        if len(firsts) < (STAGE_MIN_ROWS if self._stage_states else 2):
            return {}
        rows = [row for _, row in firsts.values()]
        stored: Iterable[Any]
        if self._stage_states:
            stage, statement = self._staged_first
            _stage_rows(conn, stage, rows, created)
            stored = conn.execute(statement)
        else:
            # The same upsert a row at a time on the driver (SQLite: no round trips to save, and
            # SQLAlchemy's multi-row VALUES spent more on each row's parameters than SQLite did).
            stored = self._driver_statement(self._first_upsert, _OK_COLUMNS).returning(conn, rows)
        seqs: dict[int, int | None] = dict.fromkeys((j for j, _ in firsts.values()), None)
        for watch_id, key, seq in stored:
            seqs[firsts[(watch_id, key)][0]] = int(seq)
        return seqs

    def _staged_first_sightings(self) -> tuple[Table, Any]:
        """The staging table of first sightings (PostgreSQL) and the upsert of first sightings from it."""
        columns = list(_OK_COLUMNS)
        stage = Table("poller_stage_first", MetaData(), *[Column(c, object_state.c[c].type) for c in columns])
        recorded = _recorded_seq(stage.c.watch_id, stage.c.key)
        statement = postgresql.insert(object_state).from_select([*columns, "seq"], select(*stage.columns, recorded + 1))
        return stage, self._first_sighted(statement)

    def _first_values(self) -> Any:
        """The upsert of first sightings from one VALUES row each (bound by column name)."""
        params = {c: bindparam(c, type_=object_state.c[c].type) for c in _OK_COLUMNS}
        recorded = _recorded_seq(params["watch_id"], params["key"])
        return self._first_sighted(self._insert(object_state).values({**params, "seq": recorded + 1}))

    def _first_sighted(self, statement: Any) -> Any:
        """``statement`` (an INSERT of first sightings numbered past every recorded change) made equal to
        ``_cas_statements``'s UPDATE-then-INSERT for a key never stored: insert it, or take over a row
        that never held an object (errors only); a key another writer saw is left alone (not returned)."""
        return statement.on_conflict_do_update(
            index_elements=[object_state.c.watch_id, object_state.c.key],
            set_={
                **{c: statement.excluded[c] for c in _OK_COLUMNS[2:]},
                # As the row-by-row UPDATE: greatest(stored seq, recorded) + 1.
                "seq": self._greatest(object_state.c.seq + 1, statement.excluded.seq),
            },
            where=and_(object_state.c.etag.is_(None), object_state.c.present.is_(None)),
        ).returning(object_state.c.watch_id, object_state.c.key, object_state.c.seq)

    def _fenced(
        self, conn: Connection, results: Sequence[PollResult], epochs: Sequence[int | None] | None
    ) -> dict[int, Exception]:
        """The results whose shard this instance no longer holds at the epoch it claimed, checked (and
        locked against a claim, until commit) in the committing transaction. A result polled under
        an earlier epoch (``epochs``, by position) is refused too: between its poll and now another
        daemon may have held the shard and recorded changes, which a compare-and-set on the ETag
        alone cannot always tell (a key deleted and re-created meanwhile)."""
        fence = self.fence
        assert fence is not None
        shards = {i: fence.shard_of(r.watch.name) for i, r in enumerate(results)}
        # On the driver, one fixed statement: built with SQLAlchemy, its IN list was rendered anew for
        # every batch, 8% of a PostgreSQL daemon's interpreter time at 500 polls/s (py-spy --gil).
        with _driver_cursor(conn, "the shard fence") as cursor:
            cursor.execute(_REPOINT_SHARED)  # before the targets' snapshot below (REPOINT_LOCK)
            cursor.execute(_FENCE_SQL, (sorted(set(shards.values())), fence.instance_id))
            leases = cursor.fetchall()
            cursor.execute(_TARGETS_SQL, (sorted({r.watch.id for r in results}),))
            targets = {watch_id: (bucket, key, kind == "prefix") for watch_id, bucket, key, kind in cursor.fetchall()}
        held = fence.epochs()
        valid = {shard: epoch for shard, epoch in leases if held.get(shard) == epoch}
        refused: dict[int, Exception] = {}
        for i, shard in shards.items():
            epoch = valid.get(shard)
            if epoch is None:
                refused[i] = Fenced(f"shard {shard} is no longer held by this daemon (lease lost or handed over)")
            elif epochs is not None and epochs[i] is not None and epochs[i] != epoch:
                refused[i] = Fenced(
                    f"shard {shard} was handed over and claimed back since this poll was made (epoch "
                    f"{epochs[i]}, now {epoch}): its result may be older than what was recorded meanwhile"
                )
            else:
                watch = results[i].watch
                if targets.get(watch.id) != object_of(watch):
                    # Another daemon's reload re-pointed it (and dropped the old object's state): a
                    # result of the old target would be stored as the new one's, until this one reloads.
                    refused[i] = Retargeted(
                        "the watch was re-pointed by another daemon's reload; this daemon polls its old target "
                        "until it reloads the same config"
                    )
        return refused

    def _compare_and_set_all(
        self, conn: Connection, changes: list[tuple[int, dict[str, Any], tuple[str | None, bool | None]]]
    ) -> dict[int, int | None]:
        """Compare-and-set each of ``changes`` (position, state row, conditioned state), in order; by
        position, the change's sequence number or None. On PostgreSQL the batch's UPDATEs go in one
        pipeline (at 1% changes a round trip each was a tenth of the writer's wall time, py-spy)."""
        keys = {(row["watch_id"], row["key"]) for _, row, _ in changes}
        if self._on_driver or len(changes) < 2 or len(keys) < len(changes):
            # A key changed twice in the batch: its second change is conditioned on the first one's
            # outcome, so each runs after the one before it has answered.
            return {j: self._compare_and_set(conn, row, conditioned) for j, row, conditioned in changes}
        update_cas, insert_cas = self._cas_pipelined
        params = [_cas_params(row, conditioned) for _, row, conditioned in changes]
        with _driver_cursor(conn, "compare-and-set") as cursor:
            seqs = _each_returning(cursor, update_cas.sql, update_cas.bind(params), pipelined=True)
            # Never stored (the first writer's row wins, a second one inserts nothing): rare outside
            # the batched first sightings, e.g. a key whose first poll was an error.
            retry = [n for n, seq in enumerate(seqs) if seq is None and changes[n][2] == (None, None)]
            if retry:
                inserted = _each_returning(
                    cursor, insert_cas.sql, insert_cas.bind([params[n] for n in retry]), pipelined=True
                )
                for n, seq in zip(retry, inserted, strict=True):
                    seqs[n] = seq
        return {j: None if seq is None else int(seq) for (j, _, _), seq in zip(changes, seqs, strict=True)}

    def _compare_and_set(
        self, conn: Connection, row: dict[str, Any], conditioned: tuple[str | None, bool | None]
    ) -> int | None:
        """Store a changed key's new state if the stored one is what its poll conditioned on; return
        the change's sequence number, or None when another writer got there first."""
        update_cas, insert_cas = self._cas
        params = _cas_params(row, conditioned)

        def run(statement: Any) -> Any:
            if not self._on_driver:
                return conn.execute(statement, params).scalar()
            # SQLite, on the driver: a list pass that rewrote thousands of keys is as many of these.
            returned = self._driver_statement(statement, list(params)).returning(conn, [params])
            return returned[0][0] if returned else None

        seq = run(update_cas)
        if seq is None and conditioned == (None, None):
            # Never stored: the first writer's row wins, a second one inserts nothing.
            seq = run(insert_cas)
        return None if seq is None else int(seq)

    def _cas_statements(self) -> tuple[Any, Any]:
        """The compare-and-set UPDATE and first-insert of a changed key, built once (bound by name)."""
        columns = ("watch_id", "key", *_STATE_COLUMNS, "last_changed_at")
        watch_id = bindparam("v_watch_id", type_=object_state.c.watch_id.type)
        key = bindparam("v_key", type_=object_state.c.key.type)
        # Past every recorded number even if the state row was dropped (a watch retargeted and back).
        recorded = _recorded_seq(watch_id, key)
        update_cas = (
            update(object_state)
            .where(
                object_state.c.watch_id == watch_id,
                object_state.c.key == key,
                object_state.c.etag.is_not_distinct_from(bindparam("p_etag", type_=object_state.c.etag.type)),
                object_state.c.present.is_not_distinct_from(bindparam("p_present", type_=object_state.c.present.type)),
            )
            .values(
                {
                    **{c: bindparam(f"v_{c}", type_=object_state.c[c].type) for c in columns[2:]},
                    "seq": self._greatest(object_state.c.seq, recorded) + 1,
                }
            )
            .returning(object_state.c.seq)
        )
        insert_cas = (
            self._insert(object_state)
            .values({**{c: bindparam(f"v_{c}", type_=object_state.c[c].type) for c in columns}, "seq": recorded + 1})
            .on_conflict_do_nothing(index_elements=[object_state.c.watch_id, object_state.c.key])
            .returning(object_state.c.seq)
        )
        return update_cas, insert_cas

    def _upserts(self) -> tuple[Any, Any]:
        """The two object_state upserts, built once: building ``excluded`` costs more than the rows."""
        ok = self._insert(object_state)
        ok = ok.on_conflict_do_update(
            index_elements=[object_state.c.watch_id, object_state.c.key],
            set_={
                **{c: ok.excluded[c] for c in _STATE_COLUMNS},
                "last_changed_at": func.coalesce(ok.excluded.last_changed_at, object_state.c.last_changed_at),
            },
            where=_unchanged_guard(ok.excluded),
        )
        error = self._insert(object_state)
        # An error touches only the bookkeeping columns: the object's state stays as committed.
        error = error.on_conflict_do_update(
            index_elements=[object_state.c.watch_id, object_state.c.key],
            set_={
                "last_polled_at": error.excluded.last_polled_at,
                "last_outcome": error.excluded.last_outcome,
                "last_error": error.excluded.last_error,
                "consecutive_errors": object_state.c.consecutive_errors + 1,
                "error_since": _streak_start(error.excluded),
            },
        )
        return ok, error

    def prune_polls(
        self, before: datetime, samples_before: datetime | None = None, max_bytes: int | None = None
    ) -> Pruned:
        """Delete poll runs that ended before ``before`` and samples older than ``samples_before``,
        then, with ``max_bytes``, the oldest runs until the database's used size fits; in short
        transactions (PRUNE_CHUNK / SAMPLE_PRUNE_CHUNK rows each, so the writer never waits long).

        On PostgreSQL one process at a time prunes (a session advisory lock): the others skip.
        """
        if self.engine.dialect.name != "postgresql":
            return self._prune(before, samples_before, max_bytes)
        with self.engine.connect() as conn:
            if not conn.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": PRUNE_LOCK}).scalar():
                conn.rollback()
                return Pruned()
            conn.commit()
            try:
                return self._prune(before, samples_before, max_bytes)
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": PRUNE_LOCK})
                conn.commit()

    def _prune(self, before: datetime, samples_before: datetime | None, max_bytes: int | None) -> Pruned:
        done = Pruned()
        done.samples = self._prune_samples(to_ms(samples_before or before))
        done.runs = self._prune_runs(to_ms(before))
        if max_bytes is not None:
            done.for_size = self._prune_for_size(max_bytes)
            done.runs += done.for_size
        return done

    def stats(self, now: datetime) -> dict[str, Any]:
        """Rows and bytes per table, and what the last 24 hours added (for `poller db stats`)."""
        tables = [t.name for t in (watches, object_state, poll_runs, poll_samples, etag_history, notifications)]
        with self._read() as conn:
            if inspect(conn).has_table(polls_legacy.name):
                tables.append(polls_legacy.name)
            rows = {t: int(conn.exec_driver_sql(f"SELECT count(*) FROM {t}").scalar() or 0) for t in tables}
            if self.engine.dialect.name == "sqlite":
                # dbstat reads every page once: seconds on a large file, fine for a maintenance command.
                sizes: dict[str, int] = {}
                for name, size in conn.exec_driver_sql(
                    "SELECT m.tbl_name, sum(d.pgsize) FROM dbstat d JOIN sqlite_master m ON m.name = d.name "
                    "GROUP BY m.tbl_name"
                ):
                    sizes[name] = int(size)
                total = sum(sizes.values())
            else:
                sizes = {
                    t: int(conn.exec_driver_sql(f"SELECT pg_total_relation_size('{t}')").scalar() or 0) for t in tables
                }
                total = int(conn.exec_driver_sql("SELECT pg_database_size(current_database())").scalar() or 0)
            day_ms = to_ms(now - timedelta(days=1))
            runs_day = self._rows_since(conn, poll_runs, poll_runs.c.first_at, day_ms)
            changes_day = self._rows_since(conn, etag_history, etag_history.c.detected_at, now - timedelta(days=1))
        return {
            "tables": [{"table": t, "rows": rows[t], "bytes": sizes.get(t, 0)} for t in tables],
            "total_bytes": total,
            "used_bytes": self.used_bytes(),
            "runs_last_day": runs_day,
            "changes_last_day": changes_day,
        }

    @staticmethod
    def _rows_since(conn: Connection, table: Table, column: Any, since: Any) -> int:
        """Rows added since ``since``: ids grow with time, so binary-search the first id (log n lookups)."""
        lo, hi = conn.execute(select(func.min(table.c.id), func.max(table.c.id))).one()
        if lo is None:
            return 0
        last = hi
        while lo < hi:
            mid = (lo + hi) // 2
            # The first row at or after mid (ids may have gaps).
            row = conn.execute(select(table.c.id, column).where(table.c.id >= mid).order_by(table.c.id).limit(1)).one()
            if row[1] >= since:
                hi = mid
            else:
                lo = row[0] + 1
        return int(last - lo + 1) if lo <= last else 0

    def has_legacy_polls(self) -> bool:
        """Whether per-poll rows from before revision 0007 are still waiting to become runs."""
        with self._read() as conn:
            return inspect(conn).has_table(polls_legacy.name)

    def convert_legacy_polls(
        self, progress: Callable[[int, int], None] | None = None, chunk: int = LEGACY_CHUNK
    ) -> int:
        """Fold the pre-0007 ``polls_legacy`` rows into poll_runs, ``chunk`` rows per transaction,
        then drop the table; return how many rows went. Resumable: each chunk commits its runs and
        deletes its rows together, so a kill leaves nothing half done and the next call goes on."""
        if not self.has_legacy_polls():
            return 0
        with self._read() as conn:
            left = int(conn.execute(select(func.count()).select_from(polls_legacy)).scalar() or 0)
            keys = {row.id: row.key for row in conn.execute(select(watches.c.id, watches.c.key))}
        order = (polls_legacy.c.watch_id, polls_legacy.c.polled_at, polls_legacy.c.id)
        done = 0
        while True:
            with self._tx(background=True) as conn:
                if conn.dialect.name == "postgresql":
                    # Two converters (a daemon and `poller db upgrade`) take turns, chunk by chunk.
                    conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": CONVERT_LOCK})
                if not inspect(conn).has_table(polls_legacy.name):
                    break  # another process finished it
                rows = conn.execute(select(polls_legacy).order_by(*order).limit(chunk)).all()
                if not rows:
                    conn.execute(text(f"DROP TABLE {polls_legacy.name}"))
                    break
                polls = [
                    Poll(
                        row.watch_id,
                        row.key,
                        None if keys.get(row.watch_id) == row.key else row.key,
                        (
                            OUTCOME_CODES.get(row.outcome, OUTCOME_CODES["error"]),
                            row.http_status,
                            row.etag,
                            None if row.last_modified is None else to_ms(row.last_modified),
                            row.error,
                        ),
                        to_ms(row.polled_at),
                        max(0, round((row.duration_ms or 0.0) * 1000)),
                    )
                    for row in rows
                ]
                self._write_converted(conn, segments(polls), [row.id for row in rows])
            done += len(rows)
            if progress is not None:
                progress(done, max(left, done))
        return done

    def _write_converted(self, conn: Connection, folded: list[Segment], ids: list[int]) -> None:
        """Write the runs of one chunk of old poll rows (continuing the run an earlier chunk left
        for a key when this chunk starts with its identity) and delete the rows, in the driver's
        own terms: SQLAlchemy's per-statement overhead was most of the time."""
        sql = self._run_sql
        new: list[tuple[Any, ...]] = []
        with _driver_cursor(conn, "polls_legacy") as cursor:
            for seg in folded:
                if seg.may_extend:
                    cursor.execute(sql.latest_converted, (seg.watch_id, seg.first_at, seg.run_key))
                    latest = cursor.fetchone()
                    if latest is not None and latest[1] <= seg.first_at and tuple(latest[2:]) == seg.identity:
                        cursor.execute(sql.extend_converted, (*_run_totals(seg), seg.last_at, latest[0]))
                        if cursor.rowcount == 1:
                            continue
                        # Pruned meanwhile by another process (PostgreSQL): a run of its own, not lost.
                # Every converted run is over: the daemon opens the next one.
                new.append((seg.watch_id, seg.run_key, *seg.identity, seg.first_at, seg.last_at, *_run_totals(seg)))
            if new:
                cursor.executemany(sql.insert_plain, new)
            cursor.executemany(sql.delete_legacy, [(i,) for i in ids])

    def _prune_for_size(self, max_bytes: int) -> int:
        """Delete the oldest runs until the used size fits ``max_bytes``; return how many went."""
        total = 0
        if self.engine.dialect.name == "sqlite":
            # SQLite frees a page as soon as it empties, so the size can be measured after each chunk.
            # The per-poll samples go first (they are detail; the runs hold the accounting).
            while self.used_bytes() > max_bytes and self._prune_samples(None, chunks=1):
                pass
            while self.used_bytes() > max_bytes:
                removed = self._prune_runs(None, chunks=1, limit=SIZE_CHUNK)
                if not removed:
                    break
                total += removed
            return total
        # PostgreSQL's statistics lag the deletes: remove, once per pass, as many samples and then
        # runs as the excess is worth at each table's current bytes per row; the next pass corrects.
        excess = self.used_bytes() - max_bytes
        if excess <= 0:
            return 0
        size, rows = self._bytes_and_rows(poll_samples)
        if rows:
            wanted = min(rows, -(-excess * rows // max(size, 1)))
            removed = self._prune_samples(None, chunks=-(-wanted // SAMPLE_PRUNE_CHUNK))
            excess -= removed * size // rows
            if excess <= 0:
                return 0
        size, rows = self._bytes_and_rows(poll_runs)
        if not rows:
            return 0
        wanted = min(rows, -(-excess * rows // max(size, 1)))
        while total < wanted:
            removed = self._prune_runs(None, chunks=1, limit=min(SIZE_CHUNK, wanted - total))
            if not removed:
                break
            total += removed
        return total

    def _bytes_and_rows(self, table: Table) -> tuple[int, int]:
        """PostgreSQL: a table's bytes with its indexes, and its rows as last estimated (counted if never)."""
        with self._read() as conn:
            size, rows = conn.exec_driver_sql(
                f"SELECT pg_total_relation_size(oid), reltuples FROM pg_class WHERE oid = '{table.name}'::regclass"
            ).one()
            if rows <= 0:  # never analyzed yet, so not large: count
                rows = conn.execute(select(func.count()).select_from(table)).scalar()
        return int(size), int(rows or 0)

    def _prune_runs(self, before_ms: int | None, chunks: int | None = None, limit: int = PRUNE_CHUNK) -> int:
        """Delete runs that ended before ``before_ms`` (None: the oldest), ``limit`` per transaction;
        with ``before_ms``, also the open runs not extended since (a watch removed long ago)."""
        total = 0
        runs = poll_runs.c
        ended: ColumnElement[bool] = runs.ended_at.is_not(None)
        if before_ms is not None:
            ended = and_(ended, runs.ended_at < before_ms)
        if before_ms is not None and chunks is None:
            # Found outside the write lock (a scan of the open runs); the delete checks again.
            stale_open = and_(runs.ended_at.is_(None), runs.last_at < before_ms)
            with self._read() as conn:
                stale = conn.execute(select(runs.id, runs.watch_id).where(stale_open)).all()
            for start in range(0, len(stale), limit):
                batch = stale[start : start + limit]
                with self._tx(background=True) as conn:
                    ids = [row.id for row in batch]
                    # The key (a watch polled less often than poll_retention, or removed) opens a new
                    # run at its next poll: pointing at a deleted id, it would extend whatever run
                    # SQLite gives that id next (ids are reused there), another key's. States first,
                    # as the writer goes (states, then runs); by watch, so the key's index finds them.
                    conn.execute(
                        update(object_state)
                        .where(
                            object_state.c.watch_id.in_({row.watch_id for row in batch}),
                            object_state.c.run_id.in_(select(runs.id).where(runs.id.in_(ids), stale_open)),
                        )
                        .values(run_id=None)
                    )
                    total += conn.execute(poll_runs.delete().where(runs.id.in_(ids), stale_open)).rowcount
        while chunks is None or chunks > 0:
            chunks = None if chunks is None else chunks - 1
            # Read outside SQLite's write lock what the delete will touch: the chunk's rows and
            # their entries in the (watch_id, first_at) index. From a cold cache, reading them
            # inside held the lock 228 ms for 250 runs; now the delete finds its pages cached.
            with self._read() as conn:
                chunk = conn.execute(
                    select(runs.id, runs.watch_id, runs.first_at).where(ended).order_by(runs.ended_at).limit(limit)
                ).all()
                if chunk and self._turns is not None:  # (PostgreSQL's delete blocks no writer)
                    # A join from VALUES: SQLite searches the index for each pair (a row-value IN
                    # scans the whole index, an OR of 250 pairs takes long to plan).
                    pairs = ", ".join(["(?, ?)"] * len(chunk))
                    conn.exec_driver_sql(
                        f"SELECT count(*) FROM (VALUES {pairs}) AS v JOIN poll_runs "
                        "ON poll_runs.watch_id = v.column1 AND poll_runs.first_at = v.column2",
                        tuple(value for r in chunk for value in (r.watch_id, r.first_at)),
                    ).scalar()
            if not chunk:
                break
            with self._tx(background=True) as conn:
                total += conn.execute(poll_runs.delete().where(runs.id.in_([r.id for r in chunk]), ended)).rowcount
            if len(chunk) < limit:
                break
        return total

    def _delete_in_chunks(self, statement: Any, limit: int, chunks: int | None) -> int:
        """Run a DELETE of at most ``limit`` rows, a transaction each, until it deletes fewer (or
        ``chunks`` times); return how many rows went."""
        total = 0
        while chunks is None or chunks > 0:
            with self._tx(background=True) as conn:
                deleted = conn.execute(statement).rowcount
            total += deleted
            chunks = None if chunks is None else chunks - 1
            if deleted < limit:
                break
        return total

    def _prune_samples(self, before_ms: int | None, chunks: int | None = None) -> int:
        """Delete samples older than ``before_ms`` (None: the oldest), a chunk per transaction."""
        # Ids follow time: look only at the oldest chunk each time, and stop at the first chunk that
        # is not all old, so no transaction scans past SAMPLE_PRUNE_CHUNK rows.
        ids = select(poll_samples.c.id).order_by(poll_samples.c.id).limit(SAMPLE_PRUNE_CHUNK).scalar_subquery()
        statement = poll_samples.delete().where(poll_samples.c.id.in_(ids))
        if before_ms is not None:
            statement = statement.where(poll_samples.c.polled_at < before_ms)
        return self._delete_in_chunks(statement, SAMPLE_PRUNE_CHUNK, chunks)

    def used_bytes(self) -> int:
        """Bytes the database's rows and indexes occupy (free pages and dead rows not counted)."""
        with self._read() as conn:
            if self.engine.dialect.name == "sqlite":
                size = conn.exec_driver_sql(
                    "SELECT (SELECT page_count FROM pragma_page_count()) - (SELECT freelist_count FROM "
                    "pragma_freelist_count()), (SELECT page_size FROM pragma_page_size())"
                ).one()
                return int(size[0]) * int(size[1])
            # Deleted rows keep their space until vacuumed: count each table's live share of it.
            value = conn.exec_driver_sql(
                "SELECT COALESCE(sum(pg_total_relation_size(relid) * CASE WHEN n_live_tup + n_dead_tup > 0 "
                "THEN n_live_tup::float8 / (n_live_tup + n_dead_tup) ELSE 1 END), 0) "
                "FROM pg_stat_user_tables WHERE schemaname = current_schema()"
            ).scalar()
            return int(value or 0)

    # --- reading --------------------------------------------------------------------

    def status(self, *, display: bool = False) -> list[dict[str, Any]]:
        """One row per active watch with its latest state (the STATUS_COLUMNS, and last_changed_at);
        with ``display``, times come as the CLI shows them (``2026-11-24T10:00:00Z``)."""
        query = self._status_query(display=display, text_only=False)
        with self._read() as conn:
            result = conn.execute(query)
            keys = list(result.keys())
            rows = [dict(zip(keys, row, strict=True)) for row in result]
        return rows

    def status_text(self) -> list[tuple[str, ...]]:
        """The STATUS_COLUMNS of every active watch as display text ('' for none), by name: what
        `poller status` prints. The database formats every cell and the driver's own rows skip
        SQLAlchemy's per-row work: 100,000 watches are ~1.3 million cells."""
        query = self._status_query(display=True, text_only=True)
        with self._read() as conn:
            return _driver_rows(conn, query)

    def _status_query(self, *, display: bool, text_only: bool) -> Any:
        state = object_state.c
        sig = watch_signals.c
        times = (state.last_modified, state.last_polled_at, state.last_changed_at, sig.deadline_at)
        if display:
            times = tuple(self._display_time(t).label(t.name) for t in times)
        alert, recovered = watch_events.alias("alert"), watch_events.alias("recovered")
        # A failing/access_lost signal with no recovered of the same streak (the unique index answers both).
        alerting = (
            select(alert.c.id)
            .where(
                alert.c.watch_id == watches.c.id,
                alert.c.event.in_(("failing", "access_lost")),
                ~select(recovered.c.id)
                .where(
                    recovered.c.watch_id == alert.c.watch_id,
                    recovered.c.event == "recovered",
                    recovered.c.dedup == alert.c.dedup,
                )
                .exists(),
            )
            .exists()
        )
        # "stale,settling,failing" as they apply (poller.signals), in that order.
        signals = func.rtrim(
            case((sig.stale_since.is_not(None), "stale,"), else_="")
            + case((sig.settling_since.is_not(None), "settling,"), else_="")
            + case((alerting, "failing,"), else_=""),
            ",",
        )
        columns: dict[str, Any] = {
            "name": watches.c.name,
            "bucket": watches.c.bucket,
            "key": watches.c.key,
            "last_outcome": state.last_outcome,
            "etag": state.etag,
            "last_modified": times[0],
            "last_polled_at": times[1],
            "consecutive_errors": state.consecutive_errors,
            "last_error": state.last_error,
            "signals": signals,
            "deadline": times[3],
        }
        if text_only:
            selected = [func.coalesce(cast(c, Text), "") for c in columns.values()]
        else:
            selected = [c.label(name) for name, c in columns.items()] + [times[2].label("last_changed_at")]
        return (
            select(*selected)
            .select_from(watches)
            .outerjoin(object_state, and_(state.watch_id == watches.c.id, state.key == watches.c.key))
            .outerjoin(watch_signals, sig.watch_id == watches.c.id)
            .where(watches.c.active.is_(True))
            .order_by(watches.c.name)
        )

    def _display_time(self, column: Any) -> Any:
        """``column`` as UTC text with a Z, microseconds only when there are some (as the CLI writes)."""
        if self.engine.dialect.name == "postgresql":
            utc = func.timezone("UTC", column)
            micro = func.to_char(utc, 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
            whole = func.to_char(utc, 'YYYY-MM-DD"T"HH24:MI:SS"Z"')
            return case((func.date_trunc("second", column) == column, whole), else_=micro)
        # The stored text is fixed-width ISO-8601 with microseconds and +00:00 (schema.to_text).
        raw = type_coerce(column, String)
        return case(
            (func.substr(raw, 21, 6) == "000000", func.substr(raw, 1, 19) + "Z"),
            else_=func.substr(raw, 1, 26) + "Z",
        )

    def history(
        self,
        *,
        watch: str | None = None,
        since: datetime | None = None,
        changes: bool = False,
        limit: int | None = 100,
    ) -> list[dict[str, Any]]:
        """Poll runs (consecutive identical outcomes of a key), or ETag history events with
        ``changes``, newest first; a run is "since" a time when its latest poll is."""
        if changes:
            return self._changes(watch, since, limit)
        r = poll_runs
        base = (
            select(
                r.c.id,
                r.c.last_at,
                r.c.first_at,
                r.c.count,
                watches.c.name.label("watch"),
                watches.c.bucket,
                func.coalesce(r.c.key, watches.c.key).label("key"),
                r.c.outcome,
                r.c.http_status,
                r.c.etag,
                r.c.last_modified,
                r.c.duration_min_us,
                r.c.duration_sum_us,
                r.c.duration_max_us,
                r.c.error,
            )
            .select_from(r)
            .join(watches, watches.c.id == r.c.watch_id)
        )
        since_ms = None if since is None else to_ms(since)
        # Ended runs by their index on ended_at, open ones (one per key) by theirs; newest of both.
        ended = self._newest_first(base.where(r.c.ended_at.is_not(None)), r.c.ended_at, r.c.id, watch, since_ms, limit)
        going = self._newest_first(base.where(r.c.ended_at.is_(None)), r.c.last_at, r.c.id, watch, since_ms, limit)
        with self._read() as conn:
            rows = sorted([*conn.execute(ended), *conn.execute(going)], key=lambda row: (row.last_at, row.id))
        rows.reverse()
        if limit is not None:
            rows = rows[:limit]
        return [
            {
                "time": from_ms(row.last_at),
                "first": from_ms(row.first_at),
                "count": row.count,
                "watch": row.watch,
                "bucket": row.bucket,
                "key": row.key,
                "outcome": OUTCOMES.get(row.outcome, "error"),
                "http_status": row.http_status,
                "etag": row.etag,
                "last_modified": None if row.last_modified is None else from_ms(row.last_modified),
                "duration_ms": round(row.duration_sum_us / row.count / 1000, 3),
                "duration_min_ms": row.duration_min_us / 1000,
                "duration_max_ms": row.duration_max_us / 1000,
                "error": row.error,
            }
            for row in rows
        ]

    def _changes(self, watch: str | None, since: datetime | None, limit: int | None) -> list[dict[str, Any]]:
        """ETag history events and watch signals (the event row of poller.events), newest first."""
        h, e = etag_history, watch_events
        changes = self._newest_first(self._change_query(), h.c.detected_at, h.c.id, watch, since, limit)
        signals = self._newest_first(self._signal_query(), e.c.detected_at, e.c.id, watch, since, limit)
        with self._read() as conn:
            rows = [*map(_change_row, conn.execute(changes)), *map(_signal_row, conn.execute(signals))]
        rows.sort(key=lambda row: (row["time"], row["event_id"] or 0, row["history_id"] or 0), reverse=True)
        return rows if limit is None else rows[:limit]

    def events_after(self, history_id: int, event_id: int, limit: int = 1000) -> list[dict[str, Any]]:
        """Events committed with ids above the given ones, oldest first (for ``history --follow``).

        On PostgreSQL ids are taken before commit, so a caller tailing several writers re-asks a
        window below its cursor and drops what it has seen.
        """
        h, e = etag_history, watch_events
        changes = self._change_query().where(h.c.id > history_id).order_by(h.c.id).limit(limit)
        signals = self._signal_query().where(e.c.id > event_id).order_by(e.c.id).limit(limit)
        with self._read() as conn:
            rows = [*map(_change_row, conn.execute(changes)), *map(_signal_row, conn.execute(signals))]
        rows.sort(key=lambda row: (row["time"], row["history_id"] or 0, row["event_id"] or 0))
        return rows

    def last_event_ids(self) -> tuple[int, int]:
        """The highest committed etag_history and watch_events ids (0 for none): where a tail starts."""
        with self._read() as conn:
            changes = conn.execute(select(func.max(etag_history.c.id))).scalar()
            signals = conn.execute(select(func.max(watch_events.c.id))).scalar()
        return int(changes or 0), int(signals or 0)

    @staticmethod
    def _change_query() -> Any:
        h = etag_history
        return (
            select(
                h.c.id,
                h.c.detected_at,
                watches.c.name.label("watch"),
                watches.c.bucket,
                h.c.key,
                h.c.event,
                h.c.etag,
                h.c.previous_etag,
                h.c.last_modified,
                h.c.version_id,
                h.c.size,
                h.c.seq,
            )
            .select_from(h)
            .join(watches, watches.c.id == h.c.watch_id)
        )

    @staticmethod
    def _signal_query() -> Any:
        e = watch_events
        return (
            select(
                e.c.id,
                e.c.detected_at,
                watches.c.name.label("watch"),
                watches.c.bucket,
                e.c.key,
                e.c.event,
                e.c.etag,
                e.c.error,
                e.c.detail,
                e.c.dedup,
            )
            .select_from(e)
            .join(watches, watches.c.id == e.c.watch_id)
        )

    def _newest_first(self, query: Any, time: Any, id_: Any, watch: str | None, since: Any, limit: int | None) -> Any:
        """``query`` filtered by watch name (or glob) and ``time >= since``, newest first, at most ``limit``."""
        if watch is not None:
            query = query.where(_name_filter(watch, self.engine.dialect.name))
        if since is not None:
            query = query.where(time >= since)
        query = query.order_by(time.desc(), id_.desc())
        return query if limit is None else query.limit(limit)

    # --- notification outbox ----------------------------------------------------------

    def due_notifications(
        self, now: datetime, limit: int = 100, claim: float = CLAIM_SECONDS, sinks: Collection[str] | None = None
    ) -> list[dict[str, Any]]:
        """Pending deliveries whose next attempt is due, with the event they carry (the event row of
        poller.events plus the outbox's id, sink, attempts, queued_at), oldest first; with several
        daemons, claimed for ``claim`` seconds, of ``sinks`` only (the ones this daemon can deliver to)."""
        query = self._outbox_query().where(notifications.c.status == "pending", notifications.c.next_attempt_at <= now)
        query = query.order_by(notifications.c.next_attempt_at, notifications.c.id).limit(limit)
        if self.fence is not None:
            return self._claim_notifications(query, now, limit, claim, sinks)
        with self._read() as conn:
            return [_outbox_row(row) for row in conn.execute(query)]

    @staticmethod
    def _outbox_query() -> Any:
        """Outbox rows with their event: a change (etag_history) or a signal (watch_events)."""
        n, h, e = notifications, etag_history, watch_events
        return (
            select(
                n.c.id,
                n.c.sink,
                n.c.attempts,
                n.c.queued_at,
                n.c.history_id,
                n.c.event_id,
                func.coalesce(h.c.event, e.c.event).label("event"),
                func.coalesce(h.c.detected_at, e.c.detected_at).label("detected_at"),
                func.coalesce(h.c.key, e.c.key).label("key"),
                func.coalesce(h.c.etag, e.c.etag).label("etag"),
                h.c.previous_etag,
                h.c.last_modified,
                h.c.version_id,
                h.c.size,
                h.c.seq,
                e.c.error,
                e.c.detail,
                e.c.dedup,
                watches.c.name.label("watch"),
                watches.c.bucket,
            )
            .select_from(n)
            .outerjoin(h, h.c.id == n.c.history_id)
            .outerjoin(e, e.c.id == n.c.event_id)
            .join(watches, watches.c.id == func.coalesce(h.c.watch_id, e.c.watch_id))
        )

    def _claim_notifications(
        self, query: Any, now: datetime, limit: int, claim: float, sinks: Collection[str] | None
    ) -> list[dict[str, Any]]:
        """Several daemons: claim due rows (SKIP LOCKED, so two never take one row) for this instance;
        a claim lapses after ``claim`` seconds or once its holder's heartbeat is older than a lease.
        A sink this daemon does not know may be another's (a config being rolled out): not claimed."""
        fence = self.fence
        assert fence is not None
        clock = func.clock_timestamp()
        live = select(instances.c.id).where(instances.c.heartbeat_at > clock - timedelta(seconds=fence.lease))
        claimable = (
            select(notifications.c.id)
            .where(
                notifications.c.status == "pending",
                notifications.c.next_attempt_at <= now,
                or_(
                    notifications.c.claimed_by.is_(None),
                    notifications.c.claimed_by == fence.instance_id,
                    notifications.c.claimed_until < clock,
                    notifications.c.claimed_by.not_in(live),
                ),
                true() if sinks is None else notifications.c.sink.in_(list(sinks)),
            )
            .order_by(notifications.c.next_attempt_at, notifications.c.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        with self._tx() as conn:
            ids = (
                conn.execute(
                    update(notifications)
                    .where(notifications.c.id.in_(claimable.scalar_subquery()))
                    .values(claimed_by=fence.instance_id, claimed_until=clock + timedelta(seconds=claim))
                    .returning(notifications.c.id)
                )
                .scalars()
                .all()
            )
            if not ids:
                return []
            return [_outbox_row(row) for row in conn.execute(query.where(notifications.c.id.in_(ids)))]

    def delivered(self, notification_id: int, now: datetime) -> None:
        self.delivered_many([(notification_id, now)])

    def delivered_many(self, marks: Sequence[tuple[int, datetime]]) -> None:
        """Mark deliveries done, each (id, when it succeeded), in one transaction: a pass of the
        dispatcher commits once, not once per delivery (a commit each was 29% of a daemon's samples
        during a start with a webhook)."""
        if not marks:
            return
        values: dict[str, Any] = {
            "status": "delivered",
            "delivered_at": bindparam("b_at", type_=notifications.c.delivered_at.type),
            "attempts": notifications.c.attempts + 1,
            "last_error": None,
        }
        if self.fence is not None:
            values.update(claimed_by=None, claimed_until=None)  # attempted: the claim is done
        statement = update(notifications).where(notifications.c.id == bindparam("b_id")).values(values)
        with self._tx() as conn:
            conn.execute(statement, [{"b_id": notification_id, "b_at": at} for notification_id, at in marks])

    def attempt_failed(self, notification_id: int, error: str, retry_at: datetime | None) -> None:
        """Record a failed attempt: retry at ``retry_at``, or give up (status failed) when it is None."""
        values: dict[str, Any] = {"attempts": notifications.c.attempts + 1, "last_error": error}
        if retry_at is None:
            values["status"] = "failed"
        else:
            values["next_attempt_at"] = retry_at
        self._update_notification(notification_id, **values)

    def give_up(self, notification_id: int, error: str) -> None:
        self._update_notification(notification_id, status="failed", last_error=error)

    def _update_notification(self, notification_id: int, **values: Any) -> None:
        if self.fence is not None:
            values.update(claimed_by=None, claimed_until=None)  # attempted: the claim is done
        with self._tx() as conn:
            conn.execute(update(notifications).where(notifications.c.id == notification_id).values(**values))

    def retry_failed(self, now: datetime, sink: str | None = None) -> int:
        """Re-queue failed deliveries (all, or one sink's); max_age counts again from now."""
        stmt = update(notifications).where(notifications.c.status == "failed")
        if sink is not None:
            stmt = stmt.where(notifications.c.sink == sink)
        with self._tx() as conn:
            return int(conn.execute(stmt.values(status="pending", queued_at=now, next_attempt_at=now)).rowcount)

    def notification_counts(self) -> dict[str, int]:
        """Deliveries by status: pending, delivered, failed."""
        query = select(notifications.c.status, func.count()).group_by(notifications.c.status)
        counts = {"pending": 0, "delivered": 0, "failed": 0}
        with self._read() as conn:
            counts.update({status: int(n) for status, n in conn.execute(query)})
        return counts

    def notification_rows(self, status: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Deliveries with their event, newest first (for `poller notify list`)."""
        query = (
            select(
                notifications.c.id,
                notifications.c.sink,
                notifications.c.status,
                notifications.c.attempts,
                notifications.c.last_error,
                notifications.c.created_at,
                notifications.c.delivered_at,
                watches.c.name.label("watch"),
                func.coalesce(etag_history.c.event, watch_events.c.event).label("event"),
                func.coalesce(etag_history.c.etag, watch_events.c.etag).label("etag"),
            )
            .outerjoin(etag_history, etag_history.c.id == notifications.c.history_id)
            .outerjoin(watch_events, watch_events.c.id == notifications.c.event_id)
            .join(watches, watches.c.id == func.coalesce(etag_history.c.watch_id, watch_events.c.watch_id))
            .order_by(notifications.c.id.desc())
            .limit(limit)
        )
        if status is not None:
            query = query.where(notifications.c.status == status)
        with self._read() as conn:
            return [dict(row._mapping) for row in conn.execute(query)]

    def has_schema(self) -> bool:
        """True once migrations have created poller's tables."""
        with self._read() as conn:
            return inspect(conn).has_table("watches")

    # --- reload and CLI look-ups ------------------------------------------------------

    def watch_names(self, pattern: str | None = None, limit: int | None = None) -> list[str]:
        """Watch names in the database, active or not (history outlives a watch's removal), matching
        ``pattern`` (a name or a glob) if given, at most ``limit``."""
        query = select(watches.c.name).order_by(watches.c.name)
        if pattern is not None:
            query = query.where(_name_filter(pattern, self.engine.dialect.name))
        if limit is not None:
            query = query.limit(limit)
        with self._read() as conn:
            return [row.name for row in conn.execute(query)]

    # --- several daemons (PostgreSQL; design.md section 6) -------------------------------

    def register_instance(self, host: str, pid: int, shards: int, lease: float) -> int:
        """Create the shard rows if missing and this daemon's instance row; return its id.

        Daemons with different shard counts would each poll watches the others hold: refused.
        """
        with self._tx() as conn:
            # One at a time: two first starts with different counts must not both find no rows.
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": REGISTER_LOCK})
            existing = int(conn.execute(select(func.count()).select_from(shard_leases)).scalar_one())
            if existing and existing != shards:
                live = conn.execute(
                    select(func.count()).where(
                        instances.c.heartbeat_at > func.clock_timestamp() - timedelta(seconds=lease)
                    )
                ).scalar_one()
                if live:
                    raise StoreError(
                        f"[cluster] shards = {shards}, but the daemons running on this database ({live}) use "
                        f"{existing}: set the same number in every daemon's config (to change it, stop them all)"
                    )
            # The new rows' epochs go on from the old ones': a paused daemon's result from before the
            # change must never meet its epoch again.
            base = int(conn.execute(select(func.coalesce(func.max(shard_leases.c.epoch), 0))).scalar_one())
            if existing and existing != shards:
                conn.execute(shard_leases.delete())
            conn.execute(
                text(
                    "INSERT INTO shard_leases (shard, epoch) SELECT s, :base FROM generate_series(0, :n - 1) AS s "
                    "ON CONFLICT DO NOTHING"
                ),
                {"n": shards, "base": base},
            )
            now = func.clock_timestamp()
            stmt = instances.insert().values(host=host, pid=pid, started_at=now, heartbeat_at=now)
            instance_id = int(conn.execute(stmt.returning(instances.c.id)).scalar_one())
            self._schema = str(conn.execute(select(func.current_schema())).scalar_one())
        self._name_sessions(session_name(instance_id, self._schema))
        return instance_id

    def _name_sessions(self, name: str) -> None:
        """Give every session of this engine the instance's name (pooled ones at their next checkout),
        so another daemon can find and end them if this one freezes holding its shards' locks."""
        listening = self._session_name is not None
        self._session_name = name
        if listening:
            return

        @event.listens_for(self.engine, "checkout")
        def _named(dbapi_conn: Any, record: Any, proxy: Any) -> None:
            wanted = self._session_name  # read at each checkout: the name the store holds now
            if record.info.get("application_name") != wanted:
                try:
                    dbapi_conn.execute("SELECT set_config('application_name', %s, false)", (wanted,))
                    dbapi_conn.commit()  # a SET rolled back with its transaction would be undone
                except Exception as exc:
                    # The pool then replaces this connection and tries again (a session lost meanwhile).
                    raise DisconnectionError(f"could not name the database session: {exc}") from exc
                record.info["application_name"] = wanted

    def heartbeat(self, instance_id: int, host: str, pid: int, shards: int, lease: float) -> tuple[dict[int, int], int]:
        """Renew this instance and its leases, give back shards beyond its fair share, claim free or
        expired ones up to it; return the shards held (shard -> epoch) and the live instance count."""
        now = func.clock_timestamp()
        until = now + timedelta(seconds=lease)
        with self._tx() as conn:
            existing = int(conn.execute(select(func.count()).select_from(shard_leases)).scalar_one())
            if existing != shards:
                raise ShardCountChanged(
                    f"the daemons on this database now use {existing} shards, this one's [cluster] shards = "
                    f"{shards}: it polls nothing until restarted with the same number"
                )
            beat = update(instances).where(instances.c.id == instance_id).values(heartbeat_at=now)
            if not conn.execute(beat).rowcount:
                # Taken for dead and removed while this daemon was paused: come back under the same id.
                conn.execute(
                    instances.insert().values(id=instance_id, host=host, pid=pid, started_at=now, heartbeat_at=now)
                )
            live = int(
                conn.execute(
                    select(func.count()).where(instances.c.heartbeat_at > now - timedelta(seconds=lease))
                ).scalar_one()
            )
            mine = (
                select(shard_leases.c.shard)
                .where(shard_leases.c.instance_id == instance_id, shard_leases.c.shard < shards)
                .order_by(shard_leases.c.shard)
                .with_for_update(key_share=True)  # FOR NO KEY UPDATE: not held back by its own writer's fence
            )
            renewed = conn.execute(
                update(shard_leases)
                .where(shard_leases.c.shard.in_(mine.scalar_subquery()))
                .values(expires_at=until)
                .returning(shard_leases.c.shard, shard_leases.c.epoch)
            )
            held = {int(shard): int(epoch) for shard, epoch in renewed}
            share = fair_share(shards, live)
            if len(held) > share:
                extra = sorted(held)[share:]
                conn.execute(
                    update(shard_leases)
                    .where(shard_leases.c.shard.in_(extra), shard_leases.c.instance_id == instance_id)
                    .values(instance_id=None, expires_at=None)
                )
                for shard in extra:
                    del held[shard]
            elif len(held) < share:
                free = (
                    select(shard_leases.c.shard)
                    .where(
                        shard_leases.c.shard < shards,
                        or_(shard_leases.c.instance_id.is_(None), shard_leases.c.expires_at < now),
                    )
                    .order_by(shard_leases.c.shard)
                    .limit(share - len(held))
                    .with_for_update(skip_locked=True)
                )
                claimed = conn.execute(
                    update(shard_leases)
                    .where(shard_leases.c.shard.in_(free.scalar_subquery()))
                    .values(instance_id=instance_id, epoch=shard_leases.c.epoch + 1, expires_at=until)
                    .returning(shard_leases.c.shard, shard_leases.c.epoch)
                )
                held.update({int(shard): int(epoch) for shard, epoch in claimed})
                if len(held) < share:
                    self._end_frozen_holders(conn, instance_id, shards, now - timedelta(seconds=lease))
            # Instances dead for long are forgotten (their leases have long been taken over).
            conn.execute(instances.delete().where(instances.c.heartbeat_at < now - timedelta(seconds=lease * 20)))
        return held, live

    def _end_frozen_holders(self, conn: Connection, instance_id: int, shards: int, stale: ColumnElement[Any]) -> None:
        """Expired shards this claim skipped are row-locked by their holder's open transaction. A
        holder that has not beaten for a lease is frozen (SIGSTOP, a paused VM) inside a COPY or a
        pipeline, where no server timeout applies: end its sessions, so the next claim gets them.
        When it wakes, its commits fail and are retried under the fence, which drops them."""
        holders = conn.execute(
            select(shard_leases.c.instance_id)
            .distinct()
            .select_from(shard_leases.outerjoin(instances, instances.c.id == shard_leases.c.instance_id))
            .where(
                shard_leases.c.shard < shards,
                shard_leases.c.instance_id != instance_id,
                shard_leases.c.expires_at < func.clock_timestamp(),
                or_(instances.c.id.is_(None), instances.c.heartbeat_at < stale),
            )
        ).scalars()
        names = [session_name(int(holder), self._schema) for holder in holders]
        if not names:
            return
        try:
            with conn.begin_nested():
                ended = conn.execute(
                    text(
                        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND application_name = ANY(:names) "
                        "AND pid <> pg_backend_pid()"
                    ),
                    {"names": names},
                ).scalar_one()
        except DBAPIError as exc:
            refused = getattr(exc.orig, "sqlstate", None) == "42501"  # insufficient_privilege
            # Said once, then again every REPEAT_REFUSAL_S while it lasts: not at every heartbeat.
            said = (frozenset(names), str(getattr(exc.orig, "sqlstate", None)))
            now = time.monotonic()
            if self._refusal is not None and self._refusal[0] == said and now - self._refusal[1] < REPEAT_REFUSAL_S:
                return
            self._refusal = (said, now)
            log.error(
                "cluster: could not end the database sessions of %s, whose expired leases stay locked (%s)%s",
                ", ".join(names),
                redact(str(exc.orig)).strip(),
                "; PostgreSQL lets a role end only sessions of its own role, of roles it is a member of, or "
                "(with pg_signal_backend) of any role but a superuser: run every daemon as the same role"
                if refused
                else "; tried again at the next heartbeat",
            )
            return
        self._refusal = None
        if ended:
            log.warning(
                "cluster: ended %d database sessions of %s: it stopped beating for a lease while holding "
                "locks on its shards (frozen or paused); they are claimed at the next heartbeat",
                ended,
                ", ".join(names),
            )

    def leave(self, instance_id: int) -> None:
        """A clean stop: give back every shard and outbox claim, and remove the instance row."""
        with self._tx() as conn:
            mine = (
                select(shard_leases.c.shard)
                .where(shard_leases.c.instance_id == instance_id)
                .order_by(shard_leases.c.shard)
                .with_for_update()
            )
            conn.execute(
                update(shard_leases)
                .where(shard_leases.c.shard.in_(mine.scalar_subquery()))
                .values(instance_id=None, expires_at=None)
            )
            conn.execute(
                update(notifications)
                .where(notifications.c.claimed_by == instance_id)
                .values(claimed_by=None, claimed_until=None)
            )
            conn.execute(instances.delete().where(instances.c.id == instance_id))

    def cluster_status(self, lease: float | None = None) -> list[dict[str, Any]]:
        """The daemons sharing this database: id, host, pid, start, last heartbeat, its age in seconds
        and the shards each holds; [] on SQLite (one daemon) or before migration 0006."""
        if self.engine.dialect.name != "postgresql":
            return []
        with self._read() as conn:
            if not inspect(conn).has_table("instances"):
                return []
            now = conn.execute(select(func.clock_timestamp())).scalar_one()
            held: dict[int, list[int]] = {}
            for shard, holder in conn.execute(
                select(shard_leases.c.shard, shard_leases.c.instance_id).where(
                    shard_leases.c.instance_id.is_not(None), shard_leases.c.expires_at > now
                )
            ):
                held.setdefault(int(holder), []).append(int(shard))
            rows = []
            for row in conn.execute(select(instances).order_by(instances.c.id)):
                rows.append(
                    {
                        **row._mapping,
                        "heartbeat_age": (now - row.heartbeat_at).total_seconds(),
                        "shards": sorted(held.get(row.id, [])),
                    }
                )
            return rows

    # --- server semantics (what calibration learned) -----------------------------------

    def save_semantics(
        self, endpoint: str, bucket: str, sem: Semantics, mode: str, learned_at: datetime, detail: str
    ) -> None:
        """Record a calibration (bucket "" = endpoint-wide); a version-id observation already stored is kept."""
        stmt = self._insert(server_semantics).values(
            endpoint=endpoint,
            bucket=bucket,
            precedence=sem.precedence,
            etag_on_304=sem.etag_on_304,
            version_id_on_404=None,
            mode=mode,
            learned_at=learned_at,
            detail=detail,
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=[server_semantics.c.endpoint, server_semantics.c.bucket],
            set_={c: stmt.excluded[c] for c in ("precedence", "etag_on_304", "mode", "learned_at", "detail")},
        )
        with self._tx() as conn:
            conn.execute(stmt)

    def forget_semantics(self, endpoint: str, bucket: str) -> None:
        """Drop a bucket's own row once it behaves like the rest of its endpoint."""
        with self._tx() as conn:
            conn.execute(
                server_semantics.delete().where(
                    server_semantics.c.endpoint == endpoint, server_semantics.c.bucket == bucket
                )
            )

    def note_version_id_on_404(self, endpoint: str, value: bool, now: datetime) -> None:
        """Record whether this endpoint's 404 for a deleted versioned key names the delete marker."""
        stmt = self._insert(server_semantics).values(
            endpoint=endpoint,
            bucket="",
            precedence="unknown",
            etag_on_304=None,
            version_id_on_404=value,
            mode="unknown",
            learned_at=now,
            detail="conditional semantics not measured yet",
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=[server_semantics.c.endpoint, server_semantics.c.bucket],
            set_={"version_id_on_404": stmt.excluded.version_id_on_404},
        )
        with self._tx() as conn:
            conn.execute(stmt)

    def server_semantics(self) -> list[dict[str, Any]]:
        """Every learned server, endpoint-wide row first; empty on a database older than migration 0004."""
        query = select(server_semantics).order_by(server_semantics.c.endpoint, server_semantics.c.bucket)
        with self._read() as conn:
            if not inspect(conn).has_table("server_semantics"):
                return []
            return [dict(row._mapping) for row in conn.execute(query)]


def _change_row(row: Any) -> dict[str, Any]:
    """An etag_history row as an event row (poller.events); ``time`` is the CLI's name for detected_at."""
    return {
        "time": row.detected_at,
        "detected_at": row.detected_at,
        "history_id": row.id,
        "event_id": None,
        "watch": row.watch,
        "bucket": row.bucket,
        "key": row.key,
        "event": row.event,
        "etag": row.etag,
        "previous_etag": row.previous_etag,
        "last_modified": row.last_modified,
        "version_id": row.version_id,
        "size": row.size,
        "seq": row.seq,
        "error": None,
        "detail": None,
        "dedup": None,
    }


def _signal_row(row: Any) -> dict[str, Any]:
    """A watch_events row as an event row (poller.events)."""
    return {
        "time": row.detected_at,
        "detected_at": row.detected_at,
        "history_id": None,
        "event_id": row.id,
        "watch": row.watch,
        "bucket": row.bucket,
        "key": row.key,
        "event": row.event,
        "etag": row.etag,
        "previous_etag": None,
        "last_modified": None,
        "version_id": None,
        "size": None,
        "seq": None,
        "error": row.error,
        "detail": signals_loads(row.detail),
        "dedup": row.dedup,
    }


def _outbox_row(row: Any) -> dict[str, Any]:
    """An outbox row with its event (poller.events' event row plus id, sink, attempts, queued_at)."""
    out = dict(row._mapping)
    out["detail"] = signals_loads(out["detail"])
    return out


def _recorded_seq(watch_id: Any, key: Any) -> Any:
    """The highest change number recorded for (``watch_id``, ``key``) in etag_history, 0 for none."""
    return (
        select(func.coalesce(func.max(etag_history.c.seq), 0))
        .where(etag_history.c.watch_id == watch_id, etag_history.c.key == key)
        .scalar_subquery()
    )


def _stage_rows(conn: Connection, stage: Table, rows: list[dict[str, Any]], created: list[str]) -> None:
    """COPY ``rows`` into the temporary staging table ``stage`` (shaped like object_state), creating it
    first on a connection that has none: record() notes it only once this transaction committed (a
    rolled back CREATE leaves no table), and IF NOT EXISTS covers a commit that failed late."""
    if stage.name not in conn.info.get(_STAGE_INFO, ()):
        columns = ", ".join(c.name for c in stage.columns)
        conn.exec_driver_sql(
            f"CREATE TEMPORARY TABLE IF NOT EXISTS {stage.name} ON COMMIT DELETE ROWS "
            f"AS SELECT {columns} FROM object_state WITH NO DATA"
        )
        created.append(stage.name)
    _copy_rows(conn, stage, rows)


@contextmanager
def _driver_errors(conn: Connection, what: str) -> Iterator[None]:
    """The driver's own errors inside, raised as SQLAlchemy's (``what`` names the statement): the
    callers of Store tell a database error from a bug by SQLAlchemy's exception types."""
    dbapi = conn.dialect.loaded_dbapi
    try:
        yield
    except dbapi.Error as exc:
        raise DBAPIError.instance(what, None, exc, dbapi.Error, dialect=conn.dialect) from exc


@contextmanager
def _driver_cursor(conn: Connection, what: str) -> Iterator[Any]:
    """A cursor of the driver itself in ``conn``'s transaction, for the hot statements and the large
    reads (SQLAlchemy's per-statement or per-row work cost more than the database's); errors as
    ``_driver_errors``."""
    with _driver_errors(conn, what):
        cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        try:
            yield cursor
        finally:
            cursor.close()


def _driver_rows(conn: Connection, query: Any) -> list[Any]:
    """Every row of ``query`` as the driver's tuples (its values rendered inline), for reads of a row
    per watch or key, where SQLAlchemy's rows and result processors cost more than the database."""
    return list(chain.from_iterable(_driver_row_chunks(conn, query)))


# Rows read back per fetch: a restart reads a row per stored key, and a million of them held at once
# as the driver's tuples of strings took 0.4 GB more at the peak (load_prefix_states: 822 -> 413 MB).
READ_CHUNK = 10_000


def _driver_row_chunks(conn: Connection, query: Any) -> Iterator[list[Any]]:
    """The rows of ``query`` as the driver's tuples, READ_CHUNK at a time."""
    sql = str(query.compile(conn, compile_kwargs={"literal_binds": True, "render_postcompile": True}))
    with _driver_cursor(conn, sql) as cursor:
        cursor.execute(sql)
        while rows := cursor.fetchmany(READ_CHUNK):
            yield rows


class _DriverMany:
    """``statement`` compiled once and run by the driver's executemany on a tuple per row (SQLite):
    each value goes through its parameter's type's own bind processor (a UTCDateTime becomes its
    stored text), and parameters that are not row columns (a literal such as ``+ 1``, a column default)
    take their value."""

    def __init__(self, statement: Any, dialect: Any, columns: Sequence[str]) -> None:
        compiled = statement.compile(dialect=dialect, column_keys=list(columns))
        self.sql = str(compiled)
        table = statement.table
        self._template: list[Any] = []
        # (position, row key, the column type's bind processor or None)
        self._columns: list[tuple[int, str, Callable[[Any], Any] | None]] = []
        for position, name in enumerate(compiled.positiontup or ()):
            if name in columns:
                self._columns.append((position, name, compiled.binds[name].type.bind_processor(dialect)))
                self._template.append(None)
            elif compiled.binds[name].value is not None:
                self._template.append(compiled.binds[name].value)
            else:
                self._template.append(table.c[name].default.arg)

    def _params(self, rows: Sequence[Mapping[str, Any]]) -> list[list[Any]]:
        params = []
        for row in rows:
            values = self._template.copy()
            for position, name, process in self._columns:
                values[position] = row[name] if process is None else process(row[name])
            params.append(values)
        return params

    def run(self, conn: Connection, rows: Sequence[Mapping[str, Any]]) -> int:
        """Execute the statement once per row in ``conn``'s transaction; errors as SQLAlchemy's.
        Returns the rows it wrote."""
        with _driver_cursor(conn, self.sql) as cursor:
            cursor.executemany(self.sql, self._params(rows))
            return int(cursor.rowcount)

    def returning(self, conn: Connection, rows: Sequence[Mapping[str, Any]]) -> list[Any]:
        """Execute a statement with RETURNING once per row (executemany returns nothing); the rows
        it returned, in order."""
        out: list[Any] = []
        with _driver_cursor(conn, self.sql) as cursor:
            for values in self._params(rows):
                out += cursor.execute(self.sql, values).fetchall()
        return out


class _NamedMany:
    """``statement`` compiled once for a driver with named parameters (psycopg), and each row's
    parameters as SQLAlchemy would bind them: literals filled in, each value through its type's
    bind processor."""

    def __init__(self, statement: Any, dialect: Any) -> None:
        self.statement = statement
        self._compiled = statement.compile(dialect=dialect)
        self.sql = str(self._compiled)
        self._process = {
            name: process
            for name, bind in self._compiled.binds.items()
            if (process := bind.type.bind_processor(dialect)) is not None
        }

    def bind(self, rows: Sequence[Mapping[str, Any]], defaults: Table | None = None) -> list[dict[str, Any]]:
        """The driver's parameters of each of ``rows``; with ``defaults``, an INSERT's columns the row
        lacks take that table's scalar column defaults (as SQLAlchemy's execution fills them in)."""
        out = []
        for row in rows:
            params = self._compiled.construct_params(row)
            if defaults is not None:
                for name, value in params.items():
                    default = defaults.c[name].default if name in defaults.c else None
                    if value is None and name not in row and default is not None and default.is_scalar:
                        params[name] = default.arg
            for name, process in self._process.items():
                if name in params:
                    params[name] = process(params[name])
            out.append(params)
        return out


def _cas_params(row: Mapping[str, Any], conditioned: tuple[str | None, bool | None]) -> dict[str, Any]:
    """The compare-and-set statements' parameters: the new state row, and the state it conditions on."""
    params = {f"v_{k}": v for k, v in row.items()}
    params["p_etag"], params["p_present"] = conditioned
    return params


@contextmanager
def _pipelined(conn: Connection, on: bool) -> Iterator[None]:
    """On psycopg, statements executed inside are sent without waiting for their results (the
    server works while this thread goes on), collected on leaving; elsewhere, a plain block."""
    if not on or conn.dialect.driver != "psycopg":
        yield
        return
    with _driver_errors(conn, "pipelined statements"), conn.connection.driver_connection.pipeline():  # type: ignore[union-attr]
        yield


def _copy_rows(conn: Connection, table: Table, rows: list[dict[str, Any]]) -> None:
    """COPY ``rows`` into ``table`` in ``conn``'s transaction (psycopg 3); errors as SQLAlchemy's."""
    columns = list(rows[0])
    with _driver_cursor(conn, f"COPY {table.name}") as cursor:
        _copy_in(cursor, table.name, columns, ([row[c] for c in columns] for row in rows))


def _copy_in(cursor: Any, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """COPY ``rows`` into ``table`` in PostgreSQL's binary format, typed by the table's own columns:
    the text format had psycopg write every timestamp as text in Python (3x the client CPU a row)."""
    oids = _column_oids(cursor, table)
    with cursor.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN (FORMAT BINARY)") as copy:
        copy.set_types([oids[c] for c in columns])
        for row in rows:
            copy.write_row(row)


# By psycopg connection: conninfo (its dsn) is parsed anew each time it is read, and reading it per
# COPY took 17% of the GIL of a daemon on PostgreSQL (py-spy).
_OIDS: weakref.WeakKeyDictionary[Any, dict[str, dict[str, int]]] = weakref.WeakKeyDictionary()


def _column_oids(cursor: Any, table: str) -> dict[str, int]:
    """The type OID of each column of ``table`` (binary COPY sends exactly these), asked once per
    connection and table (a staging table is the connection's own)."""
    tables = _OIDS.setdefault(cursor.connection, {})
    oids = tables.get(table)
    if oids is None:
        cursor.execute(
            "SELECT attname, atttypid FROM pg_attribute "
            "WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped",
            (table,),
        )
        oids = tables[table] = {name: int(oid) for name, oid in cursor.fetchall()}
    return oids


def _watch_rows(conn: Connection) -> dict[str, _WatchRow]:
    """Every watch row by name, in id order, on the driver's cursor (a restart reads a million)."""
    cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.execute('SELECT id, name, bucket, "key", kind, interval_seconds, cron, active FROM watches ORDER BY id')
        return {r[1]: _WatchRow(r[0], r[1], r[2], r[3], r[4], r[5], r[6], bool(r[7])) for r in cursor}
    finally:
        cursor.close()


def _moves(row: _WatchRow, spec: WatchSpec | None) -> bool:
    """Whether the config points a stored watch at another object or prefix (its state is dropped)."""
    return spec is not None and (row.bucket, row.key, row.kind) != (spec.bucket, spec.key, spec.kind)


# Written only when it differs: most passes use the filters the pass before them stored.
_SET_LISTED_FILTER = (
    update(object_state)
    .where(
        object_state.c.watch_id == bindparam("b_watch"),
        object_state.c.key == bindparam("b_key"),
        object_state.c.listed_filter.is_distinct_from(bindparam("b_filters")),
    )
    .values(listed_filter=bindparam("b_filters"))
)


def _filters_text(filters: tuple[Filters, ...]) -> str:
    """A prefix watch's list passes' filters as stored in its own row's listed_filter."""
    return json.dumps([{"include": list(include), "exclude": list(exclude)} for include, exclude in filters])


def _filters_of(text: str | None) -> tuple[Filters, ...] | None:
    """listed_filter read back; None when not known (passes of an earlier release, or an edited row)."""
    if text is None:
        return None
    try:
        return tuple((tuple(map(str, f["include"])), tuple(map(str, f["exclude"]))) for f in json.loads(text))
    except (ValueError, TypeError, KeyError):
        return None


def _unchanged_guard(excluded: Any) -> Any:
    """A poll without a change never overwrites a state it did not see: a stale writer's
    "unchanged" must not put back the ETag another one has moved on from."""
    return or_(
        object_state.c.present.is_(None),
        and_(
            object_state.c.etag.is_not_distinct_from(excluded.etag),
            object_state.c.present.is_not_distinct_from(excluded.present),
        ),
    )


def _fold_errors(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (watch_id, key): the last error's values, ``consecutive_errors`` = how many,
    ``error_since`` the first one's time."""
    folded: dict[tuple[int, str], dict[str, Any]] = {}
    for row in rows:
        ident = (row["watch_id"], row["key"])
        before = folded.pop(ident, None)
        folded[ident] = (
            {**row, "consecutive_errors": before["consecutive_errors"] + 1, "error_since": before["error_since"]}
            if before
            else row
        )
    return list(folded.values())


def _streak_start(excluded: Any) -> Any:
    """error_since after an error: kept while a streak goes on, the new error's time when one begins."""
    c = object_state.c
    return case((or_(c.consecutive_errors == 0, c.error_since.is_(None)), excluded.error_since), else_=c.error_since)


def _key_outcome(event: str | None) -> str:
    """The last_outcome of one key of a prefix watch after a list pass."""
    return "missing" if event == "deleted" else "modified" if event else "unchanged"


def _name_filter(pattern: str, dialect: str) -> Any:
    """Exact name, or a shell-style glob (``*``, ``?``), always as a bound parameter."""
    if not any(ch in pattern for ch in "*?"):
        return watches.c.name == pattern
    if dialect == "sqlite":
        # GLOB is case-sensitive, unlike SQLite's LIKE; only "[" needs escaping.
        return watches.c.name.op("GLOB")(pattern.replace("[", "[[]"))
    escaped = pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return watches.c.name.like(escaped.replace("*", "%").replace("?", "_"), escape="\\")


_RUN_STAGE = "poller_stage_runs"
_RUN_STAGE_COLUMNS = (
    "n", "run_id", "watch_id", "state_key", "outcome", "http_status", "etag", "last_modified", "error",
    "last_at", "count", "dmin", "dsum", "dmax",
)  # fmt: skip


def _run_poll(r: PollResult, seen: ObjectState) -> Poll:
    """The run log's view of one result (poll rows carry the state the poll saw, or the stored one)."""
    identity: Identity = (
        OUTCOME_CODES[r.outcome],
        r.http_status,
        seen.etag,
        None if seen.last_modified is None else to_ms(seen.last_modified),
        r.error,
    )
    return Poll(r.watch.id, r.watch.key, None, identity, to_ms(r.polled_at), max(0, round(r.duration_ms * 1000)))


def _run_totals(seg: Segment) -> tuple[int, int, int, int, int]:
    return (seg.last_at, seg.count, seg.duration_min, seg.duration_sum, seg.duration_max)


def _each_returning(cursor: Any, sql: str, params: Sequence[Any], pipelined: bool) -> list[Any]:
    """Run ``sql`` once per parameter tuple; the first column of each one's first row (None where it
    returned none), in order. ``pipelined`` (psycopg): one executemany, not a round trip each."""
    out: list[Any] = []
    if pipelined and len(params) > 1:
        cursor.executemany(sql, params, returning=True)
        for _ in params:
            row = cursor.fetchone()
            out.append(None if row is None else row[0])
            cursor.nextset()
        return out
    for one in params:
        cursor.execute(sql, one)
        row = cursor.fetchone()
        out.append(None if row is None else row[0])
    return out


def _run_row(seg: Segment) -> tuple[Any, ...]:
    """The parameters of ``_RunStatements.insert`` for a new run (closed at once unless it stays open)."""
    ended = None if seg.opens else seg.last_at
    return (seg.watch_id, seg.run_key, *seg.identity, seg.first_at, ended, *_run_totals(seg))


class _RunStatements:
    """The run log's statements in the driver's own parameter style (the writer's hottest path
    skips SQLAlchemy's per-row parameter processing)."""

    def __init__(self, dialect: str) -> None:
        pg = dialect == "postgresql"
        same = "IS NOT DISTINCT FROM" if pg else "IS"
        least, greatest = ("least", "greatest") if pg else ("min", "max")
        mark = "%s" if pg else "?"

        def p(sql: str) -> str:
            return sql.replace("?", mark)

        totals = (
            f"last_at = {greatest}(last_at, ?), count = count + ?, duration_min_us = {least}(duration_min_us, ?), "
            f"duration_sum_us = duration_sum_us + ?, duration_max_us = {greatest}(duration_max_us, ?)"
        )
        identity = (
            f"outcome = ? AND http_status {same} ? AND etag {same} ? AND last_modified {same} ? AND error {same} ?"
        )
        open_run = "(SELECT run_id FROM object_state WHERE watch_id = ? AND key = ?)"
        self.extend = p(
            f"UPDATE poll_runs SET {totals} WHERE id = {open_run} AND ended_at IS NULL AND {identity} RETURNING id"
        )
        self.extend_known = p(
            f"UPDATE poll_runs SET {totals} WHERE id = ? AND watch_id = ? AND key IS NULL AND ended_at IS NULL "
            f"AND {identity}"
        )
        # A key's open run ends when its next run begins (before object_state points at the new one).
        self.close = p(f"UPDATE poll_runs SET ended_at = last_at WHERE id = {open_run} AND ended_at IS NULL")
        self.insert = p(
            "INSERT INTO poll_runs (watch_id, key, outcome, http_status, etag, last_modified, error, first_at, "
            "ended_at, last_at, count, duration_min_us, duration_sum_us, duration_max_us) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id"
        )
        self.open = p("UPDATE object_state SET run_id = ? WHERE watch_id = ? AND key = ?")
        # PostgreSQL: the two in one statement (different tables; the subquery reads the old run_id).
        self.close_and_open = p(
            f"WITH closed AS ({self.close}) UPDATE object_state SET run_id = ? WHERE watch_id = ? AND key = ?"
        )
        self.insert_plain = self.insert.removesuffix(" RETURNING id")
        # Folding the old per-poll table (Store.convert_legacy_polls).
        self.latest_converted = p(
            "SELECT id, last_at, outcome, http_status, etag, last_modified, error FROM poll_runs "
            f"WHERE watch_id = ? AND first_at <= ? AND key {same} ? AND ended_at IS NOT NULL "
            "ORDER BY first_at DESC, id DESC LIMIT 1"
        )
        self.extend_converted = p(f"UPDATE poll_runs SET {totals}, ended_at = {greatest}(last_at, ?) WHERE id = ?")
        self.delete_legacy = p("DELETE FROM polls_legacy WHERE id = ?")
        self.sample = p("INSERT INTO poll_samples (run_id, polled_at, duration_us) VALUES (?, ?, ?)")
        self.extend_staged = (
            "UPDATE poll_runs r SET last_at = greatest(r.last_at, s.last_at), count = r.count + s.count, "
            "duration_min_us = least(r.duration_min_us, s.dmin), duration_sum_us = r.duration_sum_us + s.dsum, "
            f"duration_max_us = greatest(r.duration_max_us, s.dmax) FROM {_RUN_STAGE} s "
            "WHERE r.id = s.run_id AND r.watch_id = s.watch_id AND r.key IS NULL AND r.ended_at IS NULL "
            "AND r.outcome = s.outcome "
            "AND r.http_status IS NOT DISTINCT FROM s.http_status "
            "AND r.etag IS NOT DISTINCT FROM s.etag AND r.last_modified IS NOT DISTINCT FROM s.last_modified "
            "AND r.error IS NOT DISTINCT FROM s.error RETURNING s.n, r.id"
        )
        # The same, writing the sample of each extended segment of one poll (its last_at and dsum are
        # that poll's time and duration) in the same statement.
        self.extend_staged_sampled = (
            f"WITH extended AS ({self.extend_staged}, s.count, s.last_at, s.dsum), "
            "sampled AS (INSERT INTO poll_samples (run_id, polled_at, duration_us) "
            "SELECT id, last_at, dsum FROM extended WHERE count = 1) "
            "SELECT n, id, count FROM extended"
        )
