"""Alembic migrations (async env). Run with ``smartspace migrate``."""
