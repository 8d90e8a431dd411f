"""Initial schema: watches, object_state, polls, etag_history.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TS = sa.String(32)  # ISO-8601 UTC text with offset (poller.schema.UTCDateTime)


def upgrade() -> None:
    op.create_table(
        "watches",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("bucket", sa.Text, nullable=False),
        sa.Column("key", sa.Text, nullable=False),
        sa.Column("interval_seconds", sa.Float),
        sa.Column("cron", sa.Text),
        sa.Column("active", sa.Boolean, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_watches"),
        sa.UniqueConstraint("name", name="uq_watches_name"),
    )
    op.create_table(
        "object_state",
        sa.Column("watch_id", sa.Integer, nullable=False),
        sa.Column("key", sa.Text, nullable=False),
        sa.Column("etag", sa.Text),
        sa.Column("last_modified", TS),
        sa.Column("observed_server_date", TS),
        sa.Column("version_id", sa.Text),
        sa.Column("size", sa.Integer),
        sa.Column("present", sa.Boolean),
        sa.Column("last_polled_at", TS),
        sa.Column("last_outcome", sa.String(16)),
        sa.Column("consecutive_errors", sa.Integer, nullable=False),
        sa.Column("last_error", sa.Text),
        sa.Column("last_changed_at", TS),
        sa.PrimaryKeyConstraint("watch_id", "key", name="pk_object_state"),
        sa.ForeignKeyConstraint(["watch_id"], ["watches.id"], name="fk_object_state_watch_id_watches"),
    )
    op.create_table(
        "polls",
        sa.Column("id", sa.Integer, nullable=False),
        sa.Column("watch_id", sa.Integer, nullable=False),
        sa.Column("key", sa.Text, nullable=False),
        sa.Column("polled_at", TS, nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("http_status", sa.Integer),
        sa.Column("etag", sa.Text),
        sa.Column("last_modified", TS),
        sa.Column("duration_ms", sa.Float),
        sa.Column("error", sa.Text),
        sa.PrimaryKeyConstraint("id", name="pk_polls"),
        sa.ForeignKeyConstraint(["watch_id"], ["watches.id"], name="fk_polls_watch_id_watches"),
    )
    op.create_index("ix_polls_watch_id_polled_at", "polls", ["watch_id", "polled_at"])
    op.create_index("ix_polls_polled_at", "polls", ["polled_at"])
    op.create_table(
        "etag_history",
        sa.Column("id", sa.Integer, nullable=False),
        sa.Column("watch_id", sa.Integer, nullable=False),
        sa.Column("key", sa.Text, nullable=False),
        sa.Column("detected_at", TS, nullable=False),
        sa.Column("event", sa.String(16), nullable=False),
        sa.Column("etag", sa.Text),
        sa.Column("previous_etag", sa.Text),
        sa.Column("last_modified", TS),
        sa.Column("version_id", sa.Text),
        sa.Column("size", sa.Integer),
        sa.PrimaryKeyConstraint("id", name="pk_etag_history"),
        sa.ForeignKeyConstraint(["watch_id"], ["watches.id"], name="fk_etag_history_watch_id_watches"),
    )
    op.create_index("ix_etag_history_watch_id_detected_at", "etag_history", ["watch_id", "detected_at"])
    op.create_index("ix_etag_history_detected_at", "etag_history", ["detected_at"])


def downgrade() -> None:
    op.drop_table("etag_history")
    op.drop_table("polls")
    op.drop_table("object_state")
    op.drop_table("watches")
