"""PostgreSQL connections: the brain's read-only transaction, and recovery from a connection the
server closed while it sat in the pool (no pre-ping round trip; the checkout hook replaces it)."""

from __future__ import annotations

import asyncio

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError

from storage.db import Database
from tests.conftest import PG_URL

pytestmark = pytest.mark.skipif(not PG_URL, reason="PostgreSQL only: SMARTSPACE_TEST_DATABASE_URL is not set")


@pytest.fixture
def backend() -> str:
    """These tests are about PostgreSQL connections: no SQLite variant (the conftest one is parametrised)."""
    return "postgresql"


async def test_the_read_only_transaction_refuses_writes_and_does_not_leak_into_the_pool(db):
    async with db.read_only() as conn:
        assert (await conn.execute(sa.text("SHOW transaction_read_only"))).scalar_one() == "on"
        with pytest.raises(DBAPIError):
            await conn.execute(sa.text("CREATE TEMPORARY TABLE t_nope (x int)"))
    for _ in range(3):  # every pooled connection is writable again for the next unit of work
        async with db.write() as conn:
            assert (await conn.execute(sa.text("SHOW transaction_read_only"))).scalar_one() == "off"


async def test_a_pooled_connection_the_server_closed_is_replaced_at_checkout(db):
    async with db.read() as conn:
        pid = (await conn.execute(sa.text("SELECT pg_backend_pid()"))).scalar_one()
        raw = (await conn.get_raw_connection()).driver_connection
    other = Database(db.engine.url.render_as_string(hide_password=False), pool_size=1)
    try:
        async with other.read() as conn:
            await conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    finally:
        await other.dispose()
    for _ in range(250):  # until the event loop has seen the socket close
        if raw.is_closed():
            break
        await asyncio.sleep(0.02)
    assert raw.is_closed()
    for _ in range(3):
        async with db.read() as conn:
            assert (await conn.execute(sa.text("SELECT pg_backend_pid()"))).scalar_one() != pid
