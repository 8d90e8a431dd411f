"""Watch signals (stale, fresh, settled, failing, recovered, access_lost) and their outbox rows.

``watch_events`` holds facts about a watch over time (poller.signals); its unique
(watch_id, event, dedup) lets the database refuse a signal recorded twice, by a restarted daemon or
by a second one. The outbox now carries either a change (``history_id``) or a signal (``event_id``).
``object_state.error_since`` is when a key's current error streak began; ``watch_signals`` holds
each checked watch's next deadline and whether it is stale or settling (for ``poller status``).

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pg = op.get_bind().dialect.name == "postgresql"
    # Frozen types as of this revision: timestamptz and bigint on PostgreSQL, text times on SQLite.
    time = sa.TIMESTAMP(timezone=True) if pg else sa.String(32)
    big = sa.BigInteger() if pg else sa.Integer()
    op.create_table(
        "watch_events",
        sa.Column("id", big, nullable=False),
        sa.Column(
            "watch_id", big, sa.ForeignKey("watches.id", name="fk_watch_events_watch_id_watches"), nullable=False
        ),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("event", sa.String(16), nullable=False),
        sa.Column("detected_at", time, nullable=False),
        sa.Column("etag", sa.Text()),
        sa.Column("error", sa.Text()),
        sa.Column("detail", sa.Text()),
        sa.Column("dedup", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_watch_events"),
    )
    op.create_index("uq_watch_events_watch_id_event_dedup", "watch_events", ["watch_id", "event", "dedup"], unique=True)
    op.create_index("ix_watch_events_watch_id_detected_at", "watch_events", ["watch_id", "detected_at"])
    op.create_index("ix_watch_events_detected_at", "watch_events", ["detected_at"])
    op.create_table(
        "watch_signals",
        sa.Column(
            "watch_id", big, sa.ForeignKey("watches.id", name="fk_watch_signals_watch_id_watches"), nullable=False
        ),
        sa.Column("deadline_at", time),
        sa.Column("stale_since", time),
        sa.Column("settling_since", time),
        sa.PrimaryKeyConstraint("watch_id", name="pk_watch_signals"),
    )
    op.add_column("object_state", sa.Column("error_since", time))
    # A streak already running when this revision lands began no later than the last poll.
    op.execute("UPDATE object_state SET error_since = last_polled_at WHERE consecutive_errors > 0")
    with op.batch_alter_table("notifications") as batch:
        batch.alter_column("history_id", existing_type=big, nullable=True)
        batch.add_column(sa.Column("event_id", big))
        batch.create_foreign_key("fk_notifications_event_id_watch_events", "watch_events", ["event_id"], ["id"])


def downgrade() -> None:
    op.execute("DELETE FROM notifications WHERE history_id IS NULL")
    with op.batch_alter_table("notifications") as batch:
        batch.drop_constraint("fk_notifications_event_id_watch_events", type_="foreignkey")
        batch.drop_column("event_id")
        batch.alter_column("history_id", existing_type=big_type(), nullable=False)
    op.drop_column("object_state", "error_since")
    op.drop_table("watch_signals")
    op.drop_table("watch_events")


def big_type() -> sa.types.TypeEngine[int]:
    return sa.BigInteger() if op.get_bind().dialect.name == "postgresql" else sa.Integer()
