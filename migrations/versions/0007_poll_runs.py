"""Run-length poll log: ``poll_runs`` and ``poll_samples`` replace the per-poll ``polls`` table.

``polls`` becomes a view over ``poll_runs`` with the old columns (plus ``first_polled_at``,
``count`` and the duration range), so queries written for it keep working. The old rows are not
converted here: the table is renamed ``polls_legacy`` and ``Store.convert_legacy_polls`` folds it
into runs in short transactions (``poller db upgrade``, or the daemon in the background), so a large
database upgrades in bounded memory, resumably, without holding the write lock for minutes.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

OUTCOME_TEXT = "CASE {col} WHEN 0 THEN 'unchanged' WHEN 1 THEN 'modified' WHEN 2 THEN 'missing' ELSE 'error' END"


def time_expr(column: str, pg: bool) -> str:
    """A column of epoch milliseconds as poller writes times: timestamptz, or ISO-8601 UTC text."""
    if pg:
        return f"to_timestamp({column} / 1000.0)"
    # strftime's %f has milliseconds; the stored text elsewhere has microseconds, so pad: equal
    # instants compare equal as text across tables.
    return f"(strftime('%Y-%m-%dT%H:%M:%f', {column} / 1000.0, 'unixepoch') || '000+00:00')"


def view_statements(pg: bool) -> list[str]:
    """CREATE VIEW statements of the compatibility views (also used by the tests)."""
    outcome = OUTCOME_TEXT.format(col="r.outcome")
    last_modified = f"CASE WHEN r.last_modified IS NULL THEN NULL ELSE {time_expr('r.last_modified', pg)} END"
    return [
        "CREATE VIEW polls AS SELECT r.id, r.watch_id, COALESCE(r.key, w.key) AS key, "
        f"{time_expr('r.last_at', pg)} AS polled_at, {outcome} AS outcome, r.http_status, r.etag, "
        f"{last_modified} AS last_modified, "
        "round(r.duration_sum_us / 1000.0 / r.count, 3) AS duration_ms, r.error, "
        f"{time_expr('r.first_at', pg)} AS first_polled_at, r.count, "
        "r.duration_min_us / 1000.0 AS duration_min_ms, r.duration_max_us / 1000.0 AS duration_max_ms "
        "FROM poll_runs r JOIN watches w ON w.id = r.watch_id",
        "CREATE VIEW poll_samples_view AS SELECT s.id, s.run_id, r.watch_id, COALESCE(r.key, w.key) AS key, "
        f"{time_expr('s.polled_at', pg)} AS polled_at, {outcome} AS outcome, r.http_status, r.etag, "
        "s.duration_us / 1000.0 AS duration_ms, r.error "
        "FROM poll_samples s JOIN poll_runs r ON r.id = s.run_id JOIN watches w ON w.id = r.watch_id",
    ]


def upgrade() -> None:
    bind = op.get_bind()
    pg = bind.dialect.name == "postgresql"
    # Frozen types as of this revision: bigint on PostgreSQL; an INTEGER PRIMARY KEY on SQLite.
    pk = sa.BigInteger() if pg else sa.Integer()
    op.rename_table("polls", "polls_legacy")
    op.create_table(
        "poll_runs",
        sa.Column("id", pk, nullable=False),
        sa.Column("watch_id", pk, nullable=False),
        sa.Column("key", sa.Text()),
        sa.Column("outcome", sa.SmallInteger(), nullable=False),
        sa.Column("http_status", sa.Integer()),
        sa.Column("etag", sa.Text()),
        sa.Column("last_modified", sa.BigInteger()),
        sa.Column("error", sa.Text()),
        sa.Column("first_at", sa.BigInteger(), nullable=False),
        sa.Column("last_at", sa.BigInteger(), nullable=False),
        sa.Column("ended_at", sa.BigInteger()),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.Column("duration_min_us", sa.BigInteger(), nullable=False),
        sa.Column("duration_sum_us", sa.BigInteger(), nullable=False),
        sa.Column("duration_max_us", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["watch_id"], ["watches.id"], name="fk_poll_runs_watch_id_watches"),
        sa.PrimaryKeyConstraint("id", name="pk_poll_runs"),
    )
    op.create_index("ix_poll_runs_watch_id_first_at", "poll_runs", ["watch_id", "first_at"])
    op.create_index("ix_poll_runs_ended_at", "poll_runs", ["ended_at"])
    open_runs = sa.text("ended_at IS NULL")
    op.create_index("ix_poll_runs_open", "poll_runs", ["watch_id"], sqlite_where=open_runs, postgresql_where=open_runs)
    if pg:
        # Room in each page for the new version of a row: an open run's extension, and a poll's
        # object_state update, are then HOT updates (no index entries written).
        op.execute("ALTER TABLE poll_runs SET (fillfactor = 70)")
        op.execute("ALTER TABLE object_state SET (fillfactor = 70)")
    op.create_table(
        "poll_samples",
        sa.Column("id", pk, nullable=False),
        sa.Column("run_id", sa.BigInteger(), nullable=False),
        sa.Column("polled_at", sa.BigInteger(), nullable=False),
        sa.Column("duration_us", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_poll_samples"),
    )
    op.add_column("object_state", sa.Column("run_id", sa.BigInteger()))
    for statement in view_statements(pg):
        op.execute(statement)
    # A database with no poll rows (a fresh one) has nothing to convert.
    if bind.execute(sa.text("SELECT 1 FROM polls_legacy LIMIT 1")).first() is None:
        op.drop_table("polls_legacy")


def downgrade() -> None:
    # Lossy by nature: one row per run comes back (its last poll's time), not one per poll.
    bind = op.get_bind()
    pg = bind.dialect.name == "postgresql"
    op.execute("CREATE TABLE polls_restored AS SELECT * FROM polls")
    op.execute("DROP VIEW poll_samples_view")
    op.execute("DROP VIEW polls")
    op.drop_column("object_state", "run_id")
    if pg:
        op.execute("ALTER TABLE object_state RESET (fillfactor)")
    op.drop_table("poll_samples")
    op.drop_index("ix_poll_runs_open", "poll_runs")
    op.drop_index("ix_poll_runs_ended_at", "poll_runs")
    op.drop_index("ix_poll_runs_watch_id_first_at", "poll_runs")
    op.drop_table("poll_runs")
    inspector = sa.inspect(bind)
    if "polls_legacy" not in inspector.get_table_names():
        time = sa.TIMESTAMP(timezone=True) if pg else sa.String(32)
        big = sa.BigInteger() if pg else sa.Integer()
        op.create_table(
            "polls_legacy",
            sa.Column("id", big, nullable=False),
            sa.Column("watch_id", big, nullable=False),
            sa.Column("key", sa.Text(), nullable=False),
            sa.Column("polled_at", time, nullable=False),
            sa.Column("outcome", sa.String(16), nullable=False),
            sa.Column("http_status", sa.Integer()),
            sa.Column("etag", sa.Text()),
            sa.Column("last_modified", time),
            sa.Column("duration_ms", sa.Float()),
            sa.Column("error", sa.Text()),
            sa.ForeignKeyConstraint(["watch_id"], ["watches.id"], name="fk_polls_watch_id_watches"),
            sa.PrimaryKeyConstraint("id", name="pk_polls"),
        )
        op.create_index("ix_polls_watch_id_polled_at", "polls_legacy", ["watch_id", "polled_at"])
        op.create_index("ix_polls_polled_at", "polls_legacy", ["polled_at"])
    op.execute(
        "INSERT INTO polls_legacy (watch_id, key, polled_at, outcome, http_status, etag, last_modified, "
        "duration_ms, error) SELECT watch_id, key, polled_at, outcome, http_status, etag, last_modified, "
        "duration_ms, error FROM polls_restored"
    )
    op.execute("DROP TABLE polls_restored")
    op.rename_table("polls_legacy", "polls")
