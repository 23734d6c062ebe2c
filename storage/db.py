"""Engine set-up for SQLite and PostgreSQL, and the three kinds of session the app opens.

- ``write()``: a unit of work that will change rows. On SQLite it takes the process-wide write
  lock and ``BEGIN IMMEDIATE`` (SQLite has one writer; DESIGN.md §9), on PostgreSQL a plain
  transaction whose conditional UPDATEs take row locks.
- ``read()``: a plain read transaction, no lock.
- ``read_only()``: the agentic brain's view — PostgreSQL ``BEGIN … READ ONLY``, SQLite
  ``PRAGMA query_only``. Any write through it fails in the database itself.

On PostgreSQL the spend hot path also talks to asyncpg directly (``raw()`` / ``raw(read_only=True)``:
two small pools beside SQLAlchemy's, same server settings and schema): a handful of fixed statements
run per request there, and SQLAlchemy's per-execute overhead was most of the request's CPU
(bench/README.md). The read-only pool's sessions default to ``default_transaction_read_only``, so
the brain's reads through it cannot write either.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from domain.inputs import storable_json


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


# The hot path's writer runs at most two transactions at a time (storage/hot.py group-commits the rest).
RAW_WRITE_CONNECTIONS = 4


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
        # JSON columns on both engines alike: a NUL (only gateway content and provider answers can still hold
        # one) is stored as U+FFFD, which PostgreSQL's jsonb accepts (domain/inputs.py).
        kwargs: dict[str, Any] = {"echo": echo, "json_serializer": _sa_json_text}
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
            self._server_settings = server_settings
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
        self._pool_size = pool_size
        self._raw_pools: dict[bool, asyncio.Task[asyncpg.Pool]] = {}

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

    async def _raw_pool(self, read_only: bool) -> asyncpg.Pool:
        if self.is_sqlite:
            raise RuntimeError("raw asyncpg pools exist on PostgreSQL only")
        task = self._raw_pools.get(read_only)
        if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
            settings = dict(self._server_settings, application_name="smartspace-hot")
            if read_only:
                settings["default_transaction_read_only"] = "on"
            url = self.url.set(drivername="postgresql").render_as_string(hide_password=False)
            task = self._raw_pools[read_only] = asyncio.ensure_future(asyncpg.create_pool(
                url, min_size=1, max_size=self._pool_size if read_only else RAW_WRITE_CONNECTIONS,
                server_settings=settings, init=_raw_init,
                reset=_keep_session, max_inactive_connection_lifetime=0))  # no idle timer per acquire
        return await asyncio.shield(task)

    def raw(self, *, read_only: bool = False) -> Any:
        """A pooled asyncpg connection (``async with db.raw() as conn``); PostgreSQL only."""
        return _RawAcquire(self, read_only)

    async def ping(self) -> None:
        async with self.engine.connect() as conn:
            await conn.execute(sa.text("SELECT 1"))

    async def dispose(self) -> None:
        pools, self._raw_pools = list(self._raw_pools.values()), {}
        for task in pools:
            if task.done() and not task.cancelled() and task.exception() is None:
                await task.result().close()
            else:
                task.cancel()
        await self.engine.dispose()


class _RawAcquire:
    """``async with db.raw() as conn``: the pool is created on first use."""

    __slots__ = ("conn", "db", "pool", "read_only")

    def __init__(self, db: Database, read_only: bool) -> None:
        self.db = db
        self.read_only = read_only

    async def __aenter__(self) -> asyncpg.Connection:
        self.pool = await self.db._raw_pool(self.read_only)
        self.conn = await self.pool.acquire()
        return self.conn

    async def __aexit__(self, *exc: object) -> None:
        await self.pool.release(self.conn)


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Release without asyncpg's default reset query (UNLISTEN, RESET ALL …: a round trip per use).
    Nothing here changes session state — no SET, LISTEN or advisory locks — and asyncpg still rolls
    back a transaction left open before this runs."""


def _json_text(value: Any) -> str:
    return storable_json(msgspec.json.encode(value).decode())


def _sa_json_text(value: Any) -> str:
    return storable_json(json.dumps(value))  # SQLAlchemy's default serializer, made storable


async def _raw_init(conn: asyncpg.Connection) -> None:
    # json / jsonb in and out as Python values, like SQLAlchemy's JSON type.
    for name in ("json", "jsonb"):
        await conn.set_type_codec(name, encoder=_json_text, decoder=msgspec.json.decode, schema="pg_catalog")
