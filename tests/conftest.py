"""Shared fixtures. Storage-touching tests run on SQLite and, when SMARTSPACE_TEST_DATABASE_URL is set
(``make test`` and CI set it), on PostgreSQL too — each test in a fresh schema, dropped afterwards."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator

import pytest
import sqlalchemy as sa

from server.app import create_app
from server.container import Container
from server.metrics import Metrics
from server.settings import Settings
from storage.bus import LocalBus, RedisBus
from storage.db import Database
from storage.models import metadata

PG_URL = os.environ.get("SMARTSPACE_TEST_DATABASE_URL", "")
REDIS_URL = os.environ.get("SMARTSPACE_TEST_REDIS_URL", "")
BACKENDS = ["sqlite"] + (["postgresql"] if PG_URL else [])


async def make_database(backend: str, tmp_path, *, tables: bool = True) -> tuple[Database, str | None]:
    """A fresh database (SQLite file, or a new PostgreSQL schema) with the models' tables unless ``tables=False``."""
    if backend == "sqlite":
        db = Database(f"sqlite+aiosqlite:///{tmp_path / 'test.db'}")
        schema = None
    else:
        schema = f"t_{uuid.uuid4().hex[:12]}"
        admin = Database(PG_URL)
        async with admin.engine.begin() as conn:
            await conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
        await admin.dispose()
        db = Database(PG_URL, schema=schema, pool_size=30)
    if tables:
        async with db.engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
    return db, schema


async def drop_database(db: Database, schema: str | None) -> None:
    await db.dispose()
    if schema:
        admin = Database(PG_URL)
        try:
            for attempt in range(5):
                try:
                    async with admin.engine.begin() as conn:
                        await conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
                    break
                except sa.exc.DBAPIError as exc:
                    # A background task of an app still closing (a sweep, a chat answer) can hold a row lock
                    # the DROP needs: PostgreSQL then picks one side of the deadlock. Try again.
                    if "deadlock" not in str(exc) or attempt == 4:
                        raise
                    await asyncio.sleep(0.2 * (attempt + 1))
        finally:
            await admin.dispose()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
async def db(backend: str, tmp_path) -> AsyncIterator[Database]:
    database, schema = await make_database(backend, tmp_path)
    yield database
    await drop_database(database, schema)


@pytest.fixture
def settings(tmp_path) -> Settings:
    # insight_evaluator off: no evaluation runs in the background of tests that are not about insights
    # (an app outlives its test database's fixture); tests/integration/test_insights.py turns it on.
    return Settings(data_dir=str(tmp_path / "data"), jwt_secret="test-secret-" + "x" * 32, access_log=False,
                    admin_emails=("admin@smartspace.test",), insight_evaluator=False)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
async def container(settings: Settings, db: Database, metrics: Metrics) -> AsyncIterator[Container]:
    yield Container(settings, db, LocalBus(metrics), metrics=metrics)


@pytest.fixture
async def client(aiohttp_client, settings: Settings, container: Container):
    app = create_app(settings, container=container)
    return await aiohttp_client(app)


@pytest.fixture
def redis_url() -> str:
    if not REDIS_URL:
        pytest.skip("SMARTSPACE_TEST_REDIS_URL is not set")
    return REDIS_URL


def redis_bus(url: str, metrics: Metrics) -> RedisBus:
    return RedisBus(url, metrics, channel=f"smartspace:test:{uuid.uuid4().hex[:8]}")
