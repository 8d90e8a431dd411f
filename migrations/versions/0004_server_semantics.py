"""server_semantics: what calibration learned about each endpoint's conditional requests.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "server_semantics",
        sa.Column("endpoint", sa.Text(), nullable=False),
        sa.Column("bucket", sa.Text(), nullable=False),
        sa.Column("precedence", sa.String(16), nullable=False),
        sa.Column("etag_on_304", sa.Boolean()),
        sa.Column("version_id_on_404", sa.Boolean()),
        sa.Column("mode", sa.String(16), nullable=False),
        sa.Column("learned_at", sa.String(32), nullable=False),
        sa.Column("detail", sa.Text()),
        sa.PrimaryKeyConstraint("endpoint", "bucket", name="pk_server_semantics"),
    )


def downgrade() -> None:
    op.drop_table("server_semantics")
