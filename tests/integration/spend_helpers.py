"""Helpers shared by the spend-control tests: a platform admin, funding, budgets, spend calls, and the
ledger invariant (balance == sum of ledger entries; spent + reserved <= limit) checked in the database."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from storage.models import budgets, ledger_entries, wallets
from tests.factories import UserHandle, register

ADMIN_EMAIL = "admin@smartspace.test"  # listed in the test settings' admin_emails
MESSAGES = [{"role": "user", "content": "hi"}]


async def platform_admin(client) -> UserHandle:
    return await register(client, email=ADMIN_EMAIL, name="Platform Admin")


async def fund(client, admin: UserHandle, project_id: str, amount: int, key: str | None = None) -> dict[str, Any]:
    headers = {**admin.headers, **({"Idempotency-Key": key} if key else {})}
    resp = await client.post(f"/api/v1/admin/projects/{project_id}/credits",
                             json={"amount_micros": amount, "reason": "test top-up"}, headers=headers)
    assert resp.status == 201, await resp.text()
    return await resp.json()


async def wallet(client, user: UserHandle, project_id: str | None = None) -> dict[str, Any]:
    resp = await client.get(f"/api/v1/projects/{project_id or user.project_id}/wallet", headers=user.headers)
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def get_budget(client, user: UserHandle, budget_id: str) -> dict[str, Any]:
    resp = await client.get(f"/api/v1/projects/{user.project_id}/budgets/{budget_id}", headers=user.headers)
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def create_budget(client, user: UserHandle, limit: int, period: str = "total", **extra: Any) -> dict[str, Any]:
    resp = await client.post(f"/api/v1/projects/{user.project_id}/budgets",
                             json={"name": f"{period} budget", "limit_micros": limit, "period": period, **extra},
                             headers=user.headers)
    assert resp.status == 201, await resp.text()
    return await resp.json()


async def set_policy(client, user: UserHandle, **rules: Any) -> dict[str, Any]:
    resp = await client.put(f"/api/v1/projects/{user.project_id}/policy", json=rules, headers=user.headers)
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def spend(client, headers: dict[str, str], body: dict[str, Any] | None = None, **extra: Any):
    """POST /api/v1/requests; returns (status, json)."""
    payload = {"model": "local/echo-1", "messages": MESSAGES, "max_tokens": 1, **(body or {}), **extra}
    resp = await client.post("/api/v1/requests", json=payload, headers=headers)
    return resp.status, await resp.json()


async def assert_books_balance(db, project_id: str) -> dict[str, int]:
    """The invariants, read straight from the database."""
    async with db.engine.connect() as conn:
        w = (await conn.execute(sa.select(wallets).where(wallets.c.project_id == project_id))).first()
        total = (await conn.execute(sa.select(sa.func.coalesce(sa.func.sum(ledger_entries.c.amount_micros), 0))
                                    .where(ledger_entries.c.project_id == project_id))).scalar_one()
        rows = (await conn.execute(sa.select(budgets).where(budgets.c.project_id == project_id))).all()
    assert w is not None, "the project has no wallet"
    assert w.balance_micros == int(total), (w.balance_micros, total)
    assert 0 <= w.reserved_micros <= w.balance_micros
    for b in rows:
        assert 0 <= b.spent_micros and 0 <= b.reserved_micros
        assert b.spent_micros + b.reserved_micros <= b.limit_micros
    return {"balance": w.balance_micros, "reserved": w.reserved_micros}


# With these prices a request of MESSAGES (8 input tokens) and max_tokens=1 (the local model then
# answers exactly 1 token) costs exactly COST, estimate and actual alike.
IN_PRICE = 1_000_000_000  # micro-USDC per million tokens = 1000 per token
OUT_PRICE = 2_000_000_000
COST = 8 * 1000 + 1 * 2000


async def fix_prices(client, admin: UserHandle, model: str = "local/echo-1", input_price: int = IN_PRICE,
                     output_price: int = OUT_PRICE) -> None:
    resp = await client.patch(f"/api/v1/admin/models/{model}", headers=admin.headers,
                              json={"input_micros_per_mtok": input_price, "output_micros_per_mtok": output_price})
    assert resp.status == 200, await resp.text()


async def funded_project(client, balance: int = 1_000_000, admin: UserHandle | None = None
                         ) -> tuple[UserHandle, UserHandle]:
    """(platform admin, owner of a project funded with ``balance``), local/echo-1 priced at COST a call."""
    if admin is None:
        admin = await platform_admin(client)
        await fix_prices(client, admin)
    owner = await register(client)
    if balance:
        await fund(client, admin, owner.project_id, balance)
    return admin, owner


async def events(client, user: UserHandle, type_: str, project_id: str | None = None) -> list[dict[str, Any]]:
    """The project's events of one type, oldest first."""
    resp = await client.get(f"/api/v1/projects/{project_id or user.project_id}/audit?type={type_}&limit=200",
                            headers=user.headers)
    assert resp.status == 200, await resp.text()
    return list(reversed((await resp.json())["items"]))


async def own_spend(client, user: UserHandle, **extra: Any):
    return await spend(client, user.headers, project_id=user.project_id, **extra)
