"""Idempotency-Key claims and stored answers (the ``idempotency_keys`` table, one row per project and key).

A claim is an INSERT … ON CONFLICT DO NOTHING on the primary key (project_id, key): of any number of
concurrent claims of one key — from any actor, on any process — exactly one inserts. Every later write
names the claim's ``token``, so a claim whose lease lapsed and was taken over can no longer store or
release anything.
"""

from __future__ import annotations

import secrets
from datetime import datetime, timedelta
from typing import Any

import msgspec
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from storage.models import idempotency_keys
from storage.wallet import insert_ignore

k = idempotency_keys.c
IN_PROGRESS = 0


class Claimed(msgspec.Struct, frozen=True):
    """This request holds the key and runs. ``resumed_from``: the time of the earlier claim whose lease
    lapsed (its request died), whose leftovers decide what this one does; None for a fresh key."""

    token: str
    resumed_from: datetime | None = None


class Answered(msgspec.Struct, frozen=True):
    """The key's first request answered: replay it."""

    status: int
    content_type: str
    headers: dict[str, str]
    body: bytes


class Busy(msgspec.Struct, frozen=True):
    """The key's first request is still running (its lease is live)."""

    retry_after: int


class Mismatch(msgspec.Struct, frozen=True):
    """The key was used for another request: another body or route (``"body"``), or by another actor."""

    reason: str


Outcome = Claimed | Answered | Busy | Mismatch


class IdempotencyKeys:
    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn

    async def claim(self, project_id: str, key: str, actor: str, fingerprint: str, now: datetime,
                    lease: timedelta, retention: timedelta) -> Outcome:
        token = secrets.token_hex(16)
        fresh: dict[str, Any] = dict(actor=actor, fingerprint=fingerprint, token=token, status=IN_PROGRESS,
                                     content_type="", headers={}, body=b"", locked_until=now + lease,
                                     created_at=now, expires_at=now + retention)
        for _ in range(3):  # a row deleted (released) between our insert and our read: insert again
            inserted = await self.conn.execute(insert_ignore(self.conn, idempotency_keys, ["project_id", "key"])
                                               .values(project_id=project_id, key=key, **fresh))
            if inserted.rowcount == 1:
                return Claimed(token)
            row = (await self.conn.execute(sa.select(idempotency_keys).where(
                k.project_id == project_id, k.key == key))).first()
            if row is None:
                continue
            if row.expires_at <= now:  # past its retention: the key is new again
                if await self._take(project_id, key, row.token, fresh):
                    return Claimed(token)
                continue
            if row.actor != actor:
                return Mismatch("actor")
            if row.fingerprint != fingerprint:
                return Mismatch("body")
            if row.status != IN_PROGRESS:
                return Answered(row.status, row.content_type, dict(row.headers or {}), bytes(row.body))
            if row.locked_until is not None and row.locked_until > now:
                return Busy(max(1, int((row.locked_until - now).total_seconds() + 0.999)))
            # The first request's lease lapsed: it died. Take the key over, keeping its creation time so
            # the caller can find what it left behind.
            if await self._take(project_id, key, row.token, {"token": token, "locked_until": now + lease}):
                return Claimed(token, resumed_from=row.created_at)
        return Busy(1)

    async def _take(self, project_id: str, key: str, old_token: str, values: dict[str, Any]) -> bool:
        result = await self.conn.execute(sa.update(idempotency_keys).where(
            k.project_id == project_id, k.key == key, k.token == old_token).values(**values))
        return result.rowcount == 1

    async def renew(self, project_id: str, key: str, token: str, until: datetime) -> bool:
        """Extend a running claim's lease; False if the claim is no longer this one's."""
        result = await self.conn.execute(sa.update(idempotency_keys).where(
            k.project_id == project_id, k.key == key, k.token == token, k.status == IN_PROGRESS)
            .values(locked_until=until))
        return result.rowcount == 1

    async def answer(self, project_id: str, key: str, token: str, status: int, content_type: str,
                     headers: dict[str, str], body: bytes) -> None:
        await self.conn.execute(sa.update(idempotency_keys).where(
            k.project_id == project_id, k.key == key, k.token == token, k.status == IN_PROGRESS).values(
            status=status, content_type=content_type, headers=headers, body=body, locked_until=None))

    async def release(self, project_id: str, key: str, token: str) -> None:
        """Forget a claim whose request did not finish (5xx, crash, refusal): a retry runs anew."""
        await self.conn.execute(sa.delete(idempotency_keys).where(
            k.project_id == project_id, k.key == key, k.token == token, k.status == IN_PROGRESS))

    async def prune(self, now: datetime) -> int:
        """Delete the keys past their retention."""
        result = await self.conn.execute(sa.delete(idempotency_keys).where(k.expires_at <= now))
        return result.rowcount
