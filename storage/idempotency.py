"""Stored first responses for ``Idempotency-Key`` (the ``idempotency_keys`` table)."""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from storage.models import idempotency_keys
from storage.wallet import insert_ignore

k = idempotency_keys.c
IN_PROGRESS = 0


class IdempotencyKeys:
    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn

    async def claim(self, scope: str, key: str, request_hash: str, now: datetime) -> tuple[str, int, bytes] | None:
        """Insert an in-progress marker. None: claimed (run the request). Else the stored
        (request_hash, status, body) — status 0 while the first request is still running."""
        result = await self.conn.execute(insert_ignore(self.conn, idempotency_keys, ["scope", "key"]).values(
            scope=scope, key=key, request_hash=request_hash, status=IN_PROGRESS, body=b"", created_at=now))
        if result.rowcount == 1:
            return None
        row = (await self.conn.execute(sa.select(k.request_hash, k.status, k.body).where(
            k.scope == scope, k.key == key))).first()
        if row is None:  # released between our insert and read: treat as claimed by someone else
            return request_hash, IN_PROGRESS, b""
        return row.request_hash, row.status, bytes(row.body)

    async def complete(self, scope: str, key: str, status: int, body: bytes) -> None:
        await self.conn.execute(sa.update(idempotency_keys).where(k.scope == scope, k.key == key).values(
            status=status, body=body))

    async def release(self, scope: str, key: str) -> None:
        await self.conn.execute(sa.delete(idempotency_keys).where(
            k.scope == scope, k.key == key, k.status == IN_PROGRESS))
