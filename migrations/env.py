"""Alembic environment: runs on the connection poller hands in (see poller.store.migrate).

No logging.config.fileConfig() here: it would disable the application's loggers.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from poller.schema import metadata

config = context.config
connection = config.attributes.get("connection")

if connection is None:
    # Plain `alembic -x url=...` use, outside poller: open our own connection.
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit("set the database URL with: alembic -x url=sqlite:///poller.db upgrade head")
    with create_engine(url).connect() as own, own.begin():
        context.configure(connection=own, target_metadata=metadata, render_as_batch=True, transactional_ddl=True)
        context.run_migrations()
else:
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True, transactional_ddl=True)
    with context.begin_transaction():
        context.run_migrations()
