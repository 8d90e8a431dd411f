"""The include/exclude filters each prefix watch's list passes have used.

A reload that widens a prefix watch's filters lets in keys that may have existed for years. With
the filters of its passes stored (every pair used since the watch took this prefix), a key without
a row is ``created`` only if one of them let it in (it was made after that pass), else
``first_seen``. Rows of passes before this revision stay NULL until the next pass: not known,
every new key ``created``, as before.

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
