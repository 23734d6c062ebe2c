"""The reservation sweeper: abandoned reservations are released exactly once, by the app's own task too."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
import sqlalchemy as sa

from domain.base import Actor, utcnow
from domain.errors import Conflict
from domain.providers import Usage
from domain.spend import SpendCommand
from server.app import create_app
from server.settings import Settings
from storage.models import spend_requests
from tests.factories import create_key
from tests.integration.spend_helpers import (
    COST,
    MESSAGES,
    assert_books_balance,
    create_budget,
    events,
    funded_project,
    get_budget,
    wallet,
)


async def abandon(client, container, owner, n: int = 1) -> list:
    """Reserve ``n`` requests as the gateway would, then walk away (never settle)."""
    key = await create_key(client, owner)
    agent = Actor(kind="key", id=key["id"], project_id=owner.project_id)
    cmd = SpendCommand(model="local/echo-1", messages=MESSAGES, max_tokens=1)
    return [await container.spending.prepare(agent, cmd, source="gateway") for _ in range(n)]


async def expire_all(db) -> None:
    async with db.engine.begin() as conn:
        await conn.execute(sa.update(spend_requests).where(spend_requests.c.reservation_expires_at.is_not(None))
                           .values(reservation_expires_at=utcnow() - timedelta(seconds=1)))


async def test_an_abandoned_reservation_is_released(client, db, container):
    _, alice = await funded_project(client, 1_000_000)
    budget = await create_budget(client, alice, 10 * COST, "day")
    prepared = (await abandon(client, container, alice))[0]
    w = await wallet(client, alice)
    assert w["reserved_micros"] == COST
    assert await container.spending.sweep() == 0  # not stale yet
    await expire_all(db)
    assert await container.spending.sweep() == 1
    stored = await (await client.get(f"/api/v1/requests/{prepared.request_id}", headers=alice.headers)).json()
    assert stored["status"] == "failed" and stored["error"]["code"] == "reservation_expired"
    w = await wallet(client, alice)
    assert (w["balance_micros"], w["reserved_micros"]) == (1_000_000, 0)
    b = await get_budget(client, alice, budget["id"])
    assert b["reserved_micros"] == 0
    assert [e["data"]["request_id"] for e in await events(client, alice, "request.failed")] == [prepared.request_id]
    # The late settlement finds the reservation gone: nothing is charged.
    with pytest.raises(Conflict):
        await container.spending.settle(prepared, Usage(input_tokens=8, output_tokens=1))
    await container.spending.fail(prepared, Conflict("late"))  # a no-op now
    assert (await wallet(client, alice))["balance_micros"] == 1_000_000
    await assert_books_balance(db, alice.project_id)


async def test_concurrent_sweeps_release_each_reservation_once(client, db, container):
    _, alice = await funded_project(client, 1_000_000)
    await create_budget(client, alice, 100 * COST, "total")
    await abandon(client, container, alice, 6)
    await expire_all(db)
    counts = await asyncio.gather(*(container.spending.sweep() for _ in range(4)))
    assert sum(counts) == 6
    w = await wallet(client, alice)
    assert (w["balance_micros"], w["reserved_micros"]) == (1_000_000, 0)
    assert len(await events(client, alice, "request.failed")) == 6
    await assert_books_balance(db, alice.project_id)


async def test_the_app_runs_the_sweeper(aiohttp_client, db, metrics, tmp_path):
    from server.container import Container
    from storage.bus import LocalBus

    settings = Settings(data_dir=str(tmp_path / "d"), jwt_secret="s" * 40, access_log=False,
                        admin_emails=("admin@smartspace.test",), sweep_interval_seconds=0.05)
    container = Container(settings, db, LocalBus(metrics), metrics=metrics)
    client = await aiohttp_client(create_app(settings, container=container))
    _, alice = await funded_project(client, 1_000_000)
    await abandon(client, container, alice, 2)
    assert (await wallet(client, alice))["reserved_micros"] == 2 * COST
    await expire_all(db)
    for _ in range(400):  # the task runs on its own; wait (bounded) for it
        if (await wallet(client, alice))["reserved_micros"] == 0:
            break
        await asyncio.sleep(0.05)
    assert (await wallet(client, alice))["reserved_micros"] == 0
    await assert_books_balance(db, alice.project_id)
