"""The sweeper: release reservations whose time is up."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import datetime
from typing import TYPE_CHECKING, Any

from domain.base import SYSTEM
from domain.spend.close import Closing

if TYPE_CHECKING:
    from domain.scope import Scope
    from domain.spend.entities import SpendRequest

log = logging.getLogger("smartspace.spend")


class Sweeping(Closing):
    """Releasing reservations whose time is up (``sweep``, the ``sweeper`` task)."""

    async def sweep(self, limit: int = 100) -> int:
        """Release reservations whose time is up: unanswered approvals → expired, executing/approved
        requests abandoned past reservation_expires_at → failed. Returns how many were released."""
        now = self.clock()
        async with self.uow(SYSTEM) as scope:
            stale = await scope.store.spend_requests.stale(now, limit)
            for row in stale:
                await self._expire(scope, row)
        return len(stale)

    async def _expire(self, scope: Scope, row: SpendRequest) -> None:
        """Release an open request whose time is up (or whose process died), if it is still open."""
        expired = row.status in ("pending_approval", "approved")
        held = row.status == "pending_approval"
        error: dict[str, Any] = {
            "code": "approval_expired" if held else "reservation_expired",
            "message": "nobody approved the request in time" if held
            else "the reservation expired before the request settled", "details": {}}
        done = await scope.store.spend_requests.transition(
            row.id, (row.status,), status="expired" if expired else "failed", error=error,
            reservation_expires_at=None)
        if done is None:
            return
        await self._release(scope, done)
        if held:
            scope.emit(row.project_id, "approval.resolved", {
                "request_id": row.id, "resolution": "expired", "by": SYSTEM.label, "reason": None})
        else:
            scope.emit(row.project_id, "request.failed", {"request_id": row.id, "error": error, "cost_micros": 0})

    async def recover(self, project_id: str, idempotency_key: str, since: datetime) -> SpendRequest | None:
        """An Idempotency-Key's first request died (its claim's lease lapsed): what it left behind decides
        the retry. Its request settled, or is held for review → that request is the answer. Still
        executing → released now, as the sweeper would (should its process be alive after all, its late
        settle finds the request closed and charges nothing), and None: run anew. Nothing, or closed
        without a charge → None."""
        async with self.uow(SYSTEM) as scope:
            row = await scope.store.spend_requests.by_idempotency_key(project_id, idempotency_key, since)
            if row is None or row.status in ("settled", "pending_approval"):
                return row
            if row.status in ("executing", "approved"):
                await self._expire(scope, row)
        return None

    @contextlib.asynccontextmanager
    async def sweeper(self, interval_seconds: float) -> AsyncIterator[asyncio.Task[None]]:
        """Run :meth:`sweep` every ``interval_seconds`` until the block exits (an app cleanup_ctx)."""

        async def loop() -> None:
            while True:
                try:
                    while await self.sweep() > 0:
                        pass
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("reservation sweep failed")
                await asyncio.sleep(interval_seconds)

        task = asyncio.create_task(loop(), name="smartspace-reservation-sweeper")
        try:
            yield task
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
