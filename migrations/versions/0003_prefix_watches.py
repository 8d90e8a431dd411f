"""Prefix watches: watches.kind ("key" or "prefix"; for a prefix watch, watches.key holds the prefix).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A plain ADD COLUMN with a constant default: no table rebuild, existing rows become "key".
    op.add_column("watches", sa.Column("kind", sa.String(8), nullable=False, server_default="key"))


def downgrade() -> None:
    with op.batch_alter_table("watches") as batch:
        batch.drop_column("kind")
