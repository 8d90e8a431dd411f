"""The include/exclude of each prefix watch's last list pass.

A reload that widens a prefix watch's filters lets in keys that may have existed for years; with
the filters of the last pass stored, those are ``first_seen`` and only keys the earlier filters
also let in are ``created``. Rows of earlier passes stay NULL: not known, every new key created,
as before this revision.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("object_state", sa.Column("listed_filter", sa.Text()))


def downgrade() -> None:
    op.drop_column("object_state", "listed_filter")
