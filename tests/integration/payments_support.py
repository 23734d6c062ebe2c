"""Helpers for the payments tests: the app's devnet, deposits through the real API, and driving the
payments worker tick by tick (the background loop is off in these tests, so nothing races them)."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
import sqlalchemy as sa

from server.chain.workers import CHAIN, ChainRuntime
from server.settings import Settings
from storage.models import events as events_table
from storage.models import payments
from tests.factories import UserHandle, register

USDC = 1_000_000


def payment_settings(settings: Settings, **changes: Any) -> Settings:
    return msgspec.structs.replace(settings, **{"chain_worker": False, **changes})


async def runtime(client, *, devnet: bool = True) -> ChainRuntime:
    rt: ChainRuntime = client.app[CHAIN]
    await rt.get()
    assert rt.worker is not None and (rt.devnet is not None) == devnet
    return rt


async def deposit_address(client, user: UserHandle, project_id: str | None = None) -> dict[str, Any]:
    resp = await client.get(f"/api/v1/projects/{project_id or user.project_id}/deposit-address", headers=user.headers)
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def depositor(client, *, devnet: bool = True) -> tuple[UserHandle, ChainRuntime, dict[str, Any]]:
    """A new user, the chain runtime, and the user's project's deposit address (with token and confirmations)."""
    user = await register(client)
    rt = await runtime(client, devnet=devnet)
    return user, rt, await deposit_address(client, user)


async def claim(client, user: UserHandle, tx_hash: str, project_id: str | None = None):
    resp = await client.post(f"/api/v1/projects/{project_id or user.project_id}/deposits", json={"tx_hash": tx_hash},
                             headers=user.headers)
    return resp.status, await resp.json()


async def sender_challenge(client, user: UserHandle, address: str, project_id: str | None = None):
    resp = await client.get(f"/api/v1/projects/{project_id or user.project_id}/deposit-senders/challenge",
                            params={"address": address}, headers=user.headers)
    return resp.status, await resp.json()


async def post_sender(client, user: UserHandle, address: str, signature: str, project_id: str | None = None):
    resp = await client.post(f"/api/v1/projects/{project_id or user.project_id}/deposit-senders",
                             json={"address": address, "signature": signature}, headers=user.headers)
    return resp.status, await resp.json()


async def register_sender(client, user: UserHandle, address: str, project_id: str | None = None):
    """Register a devnet account (made by ``new_account``) as the project's deposit sender the way its owner
    would: fetch the challenge, sign it with the account's key, post the signature."""
    rt = await runtime(client)
    status, challenge = await sender_challenge(client, user, address, project_id)
    assert status == 200, challenge
    return await post_sender(client, user, address, rt.devnet.sign_message(address, challenge["message"]),
                             project_id)


async def deposit(client, user: UserHandle, amount: int, project_id: str | None = None) -> dict[str, Any]:
    """A real on-chain USDC transfer to the project's deposit address, claimed and credited."""
    rt = await runtime(client)
    info = await deposit_address(client, user, project_id)
    tx_hash = await rt.devnet.pay(info["deposit_address"], amount)
    status, body = await claim(client, user, tx_hash, project_id)
    if status == 202:  # more confirmations configured: mine them and let the watcher credit it
        rt.devnet.mine(info["confirmations_required"])
        await rt.worker.tick_deposits()
        resp = await client.get(f"/api/v1/deposits/{body['id']}", headers=user.headers)
        status, body = (201 if resp.status == 200 else resp.status), await resp.json()
    assert status == 201, body
    assert body["status"] == "confirmed" and body["amount_micros"] == amount
    return body


async def funded(client, amount: int) -> tuple[UserHandle, ChainRuntime, str]:
    """A new user whose project holds ``amount`` from a real deposit, the chain runtime, and a fresh account to
    pay out to."""
    user = await register(client)
    rt = await runtime(client)
    await deposit(client, user, amount)
    return user, rt, rt.devnet.new_account()


async def withdraw(client, user: UserHandle, to_address: str, amount: int, key: str | None,
                   project_id: str | None = None):
    headers = {**user.headers, **({"Idempotency-Key": key} if key is not None else {})}
    resp = await client.post(f"/api/v1/projects/{project_id or user.project_id}/withdrawals",
                             json={"to_address": to_address, "amount_micros": amount}, headers=headers)
    return resp.status, await resp.json(), resp.headers


async def run_worker(rt: ChainRuntime, *, rounds: int = 50) -> None:
    """Tick until a pass changes nothing (bounded, never timed)."""
    for _ in range(rounds):
        changed = await rt.worker.tick_payments() + await rt.worker.tick_deposits()
        if not changed:
            return
    pytest.fail("the payments worker kept changing things")


async def payment_row(db, payment_id: str):
    async with db.engine.connect() as conn:
        return (await conn.execute(sa.select(payments).where(payments.c.id == payment_id))).first()


async def event_types(db, project_id: str) -> list[str]:
    async with db.engine.connect() as conn:
        rows = (await conn.execute(sa.select(events_table.c.type).where(events_table.c.project_id == project_id)
                                   .order_by(events_table.c.seq))).all()
    return [r.type for r in rows]


async def event_data(db, project_id: str, type_: str) -> list[dict[str, Any]]:
    async with db.engine.connect() as conn:
        rows = (await conn.execute(sa.select(events_table.c.data).where(
            events_table.c.project_id == project_id, events_table.c.type == type_).order_by(events_table.c.seq))).all()
    return [r.data for r in rows]
