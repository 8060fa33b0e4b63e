"""Alembic environment: run programmatically by :meth:`RecordStore.upgrade` on a connection it hands over.

There is no alembic.ini: the store builds the Alembic config in code, so the scripts ship inside the package and
run wherever the package is installed (``anomaly db upgrade``, or the service at start-up).
"""

from alembic import context

from anomaly_service.records.models import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata)
with context.begin_transaction():
    context.run_migrations()
