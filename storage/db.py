"""Engine set-up for SQLite and PostgreSQL, and the three kinds of session the app opens.

- ``write()``: a unit of work that will change rows. On SQLite it takes the process-wide write
  lock and ``BEGIN IMMEDIATE`` (SQLite has one writer; DESIGN.md §9), on PostgreSQL a plain
  transaction whose conditional UPDATEs take row locks.
- ``read()``: a plain read transaction, no lock.
- ``read_only()``: the agentic brain's view — PostgreSQL ``BEGIN … READ ONLY``, SQLite
  ``PRAGMA query_only``. Any write through it fails in the database itself.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine


def _sqlite_setup(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from the driver so BEGIN is ours to choose.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def on_begin(conn: sa.Connection) -> None:
        mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")


def _drop_closed(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
    """Checkout hook: a pooled asyncpg connection the server already closed (restart, idle timeout,
    pg_terminate_backend) is discarded and the pool connects afresh — no round trip, unlike pre-ping."""
    raw = getattr(dbapi_connection, "_connection", None)
    if raw is not None and raw.is_closed():
        raise sa.exc.DisconnectionError("the pooled connection was closed by the server")


class Database:
    def __init__(self, url: str, *, pool_size: int = 10, schema: str | None = None, echo: bool = False):
        self.url = make_url(url)
        self.is_sqlite = self.url.get_backend_name() == "sqlite"
        kwargs: dict[str, Any] = {"echo": echo}
        if self.is_sqlite:
            if self.url.database and self.url.database != ":memory:":
                Path(self.url.database).parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"timeout": 30}
        else:
            # No pool_pre_ping: it costs a round trip per checkout. A connection the server closed is
            # caught at checkout instead (_drop_closed, no round trip) and replaced; one that dies in
            # use fails its transaction, and SQLAlchemy then invalidates the pool's older connections.
            kwargs.update(pool_size=pool_size, max_overflow=pool_size, pool_recycle=1800)
            server_settings = {"application_name": "smartspace"}
            if schema:
                server_settings["search_path"] = schema
            kwargs["connect_args"] = {"server_settings": server_settings}
        self.engine = create_async_engine(self.url, **kwargs)
        if self.is_sqlite:
            _sqlite_setup(self.engine)
            self._write_engine = self.engine.execution_options(sqlite_begin="IMMEDIATE")
        else:
            event.listen(self.engine.sync_engine, "checkout", _drop_closed)
            self._write_engine = self.engine
            # BEGIN READ ONLY in the BEGIN itself (asyncpg), not a separate SET TRANSACTION round trip.
            self._read_only_engine = self.engine.execution_options(postgresql_readonly=True)
        # SQLite: one writer per process at a time (cross-process: BEGIN IMMEDIATE + busy_timeout).
        self._write_lock = asyncio.Lock() if self.is_sqlite else None

    @property
    def dialect(self) -> str:
        return self.url.get_backend_name()

    @contextlib.asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        lock = self._write_lock or contextlib.nullcontext()
        async with lock, self._write_engine.begin() as conn:
            yield conn

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        async with self.engine.connect() as conn:
            yield conn

    @contextlib.asynccontextmanager
    async def read_only(self) -> AsyncIterator[AsyncConnection]:
        if not self.is_sqlite:
            async with self._read_only_engine.begin() as conn:
                yield conn
            return
        async with self.engine.connect() as conn:
            try:
                async with conn.begin():
                    await conn.exec_driver_sql("PRAGMA query_only = ON")
                    yield conn
            finally:
                await conn.exec_driver_sql("PRAGMA query_only = OFF")

    async def ping(self) -> None:
        async with self.engine.connect() as conn:
            await conn.execute(sa.text("SELECT 1"))

    async def dispose(self) -> None:
        await self.engine.dispose()
