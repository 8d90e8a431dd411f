"""64-bit ids and sizes and timestamptz times on PostgreSQL; stored ETags in one quoted form everywhere.

On SQLite only the ETags change: INTEGER is already 64-bit there, and times stay ISO-8601 text.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

# A frozen snapshot of the columns as of this revision (migrations never import the app's models).
BIGINT = {
    "watches": ["id"],
    "object_state": ["watch_id", "size"],
    "polls": ["id", "watch_id"],
    "etag_history": ["id", "watch_id", "size"],
    "notifications": ["id", "history_id"],
}
TIMES = {
    "watches": ["created_at"],
    "object_state": ["last_modified", "observed_server_date", "last_polled_at", "last_changed_at"],
    "polls": ["polled_at", "last_modified"],
    "etag_history": ["detected_at", "last_modified"],
    "notifications": ["created_at", "queued_at", "next_attempt_at", "delivered_at"],
    "server_semantics": ["learned_at"],
}
TABLES = ["watches", "object_state", "polls", "etag_history", "notifications", "server_semantics"]
SERIAL = [("watches", "id"), ("polls", "id"), ("etag_history", "id"), ("notifications", "id")]
ETAGS = {"object_state": ["etag"], "polls": ["etag"], "etag_history": ["etag", "previous_etag"]}
# The text form poller wrote before this revision (poller.schema.to_text): fixed width, so it sorts.
ISO_TEXT = """to_char({col} AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"')"""


def upgrade() -> None:
    # Some listing paths stored ETags without their quotes while HEAD stored them quoted, so one
    # object had two spellings. The canonical form is the header's own: "abc", or W/"abc" when weak.
    for table, columns in ETAGS.items():
        for col in columns:
            op.execute(
                f"UPDATE {table} SET {col} = '\"' || {col} || '\"' "
                f"WHERE {col} IS NOT NULL AND {col} <> '' "
                f"AND substr({col}, 1, 1) <> '\"' AND substr({col}, 1, 2) <> 'W/'"
            )
    if op.get_bind().dialect.name != "postgresql":
        return
    for table in TABLES:
        # One ALTER TABLE per table: each clause would otherwise rewrite the whole table again.
        clauses = [f"ALTER COLUMN {col} TYPE bigint" for col in BIGINT.get(table, [])]
        clauses += [f"ALTER COLUMN {col} TYPE timestamptz USING {col}::timestamptz" for col in TIMES.get(table, [])]
        op.execute(f"ALTER TABLE {table} " + ", ".join(clauses))
    for table, col in SERIAL:
        # A SERIAL's sequence is itself "AS integer": without this, ids still stop at 2**31 - 1.
        sequence = op.get_bind().exec_driver_sql(f"SELECT pg_get_serial_sequence('{table}', '{col}')").scalar()
        if sequence:
            op.execute(f"ALTER SEQUENCE {sequence} AS bigint")


def downgrade() -> None:
    # ETags stay quoted: the quoted form is valid for every reader, and which ones were bare is not known.
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, col in SERIAL:
        sequence = op.get_bind().exec_driver_sql(f"SELECT pg_get_serial_sequence('{table}', '{col}')").scalar()
        if sequence:
            op.execute(f"ALTER SEQUENCE {sequence} AS integer")
    for table in TABLES:
        clauses = [f"ALTER COLUMN {col} TYPE integer" for col in BIGINT.get(table, [])]
        clauses += [
            f"ALTER COLUMN {col} TYPE varchar(32) USING {ISO_TEXT.format(col=col)}" for col in TIMES.get(table, [])
        ]
        op.execute(f"ALTER TABLE {table} " + ", ".join(clauses))
