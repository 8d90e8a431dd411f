"""Several daemons on one PostgreSQL database: instances, shard leases, outbox claims, per-key sequence.

``object_state.seq`` counts the changes recorded for a key and ``etag_history.seq`` numbers them;
the unique index on (watch_id, key, seq) lets the database itself refuse a second recording of one
transition. The other tables are created on SQLite too (one schema), where nothing writes them.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pg = op.get_bind().dialect.name == "postgresql"
    # Frozen types as of this revision: timestamptz and bigint on PostgreSQL, text times on SQLite.
    time = sa.TIMESTAMP(timezone=True) if pg else sa.String(32)
    big = sa.BigInteger() if pg else sa.Integer()
    op.create_table(
        "instances",
        sa.Column("id", big, nullable=False),
        sa.Column("host", sa.Text(), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("started_at", time, nullable=False),
        sa.Column("heartbeat_at", time, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_instances"),
    )
    op.create_table(
        "shard_leases",
        sa.Column("shard", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("instance_id", big),
        sa.Column("epoch", big, nullable=False, server_default="0"),
        sa.Column("expires_at", time),
        sa.PrimaryKeyConstraint("shard", name="pk_shard_leases"),
    )
    op.create_index("ix_shard_leases_instance_id", "shard_leases", ["instance_id"])
    op.add_column("notifications", sa.Column("claimed_by", big))
    op.add_column("notifications", sa.Column("claimed_until", time))
    op.add_column("object_state", sa.Column("seq", big, nullable=False, server_default="0"))
    op.add_column("etag_history", sa.Column("seq", big, nullable=False, server_default="0"))
    # Number the history already recorded, oldest first per key, and carry each key's count over.
    op.execute(
        "UPDATE etag_history SET seq = s.rn FROM (SELECT id, row_number() OVER "
        "(PARTITION BY watch_id, key ORDER BY id) AS rn FROM etag_history) AS s WHERE s.id = etag_history.id"
    )
    op.execute(
        "UPDATE object_state SET seq = COALESCE((SELECT max(h.seq) FROM etag_history h "
        "WHERE h.watch_id = object_state.watch_id AND h.key = object_state.key), 0)"
    )
    op.create_index("uq_etag_history_watch_id_key_seq", "etag_history", ["watch_id", "key", "seq"], unique=True)


def downgrade() -> None:
    op.drop_index("uq_etag_history_watch_id_key_seq", "etag_history")
    op.drop_column("etag_history", "seq")
    op.drop_column("object_state", "seq")
    op.drop_column("notifications", "claimed_until")
    op.drop_column("notifications", "claimed_by")
    op.drop_index("ix_shard_leases_instance_id", "shard_leases")
    op.drop_table("shard_leases")
    op.drop_table("instances")
