"""Alembic environment: migrations run from `db.migrate` on a connection it passes in."""

from alembic import context

from qwenstack.database import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata)
with context.begin_transaction():
    context.run_migrations()
