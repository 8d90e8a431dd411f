"""Alembic environment: runs on the connection poller hands in (see poller.store.migrate).

No logging.config.fileConfig() here: it would disable the application's loggers.
"""

from __future__ import annotations

from alembic import context

from poller.schema import metadata

config = context.config
connection = config.attributes.get("connection")

if connection is None:
    # The alembic command line would open a plain engine: on SQLite its DDL autocommits (a kill then
    # leaves a half-applied revision), and neither the foreign-key pragma nor PostgreSQL's migration
    # lock would be taken. poller.store.migrate does all three.
    raise SystemExit(
        "run poller's migrations with `poller db upgrade` (or by starting the daemon), not the alembic "
        "command: they need poller's transaction and lock settings"
    )
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True, transactional_ddl=True)
with context.begin_transaction():
    context.run_migrations()
