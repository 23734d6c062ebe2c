"""Approvals: approve, reject, and waiting for an admin's decision."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from domain.base import SYSTEM, Actor
from domain.errors import (
    ApprovalRequired,
    Conflict,
    NotFound,
)
from domain.spend.close import Closing
from domain.spend.entities import ApprovalExpired, ApprovalRejected, Prepared, SpendRequest

if TYPE_CHECKING:
    from domain.scope import Scope

log = logging.getLogger("smartspace.spend")


class Approving(Closing):
    """Held requests: approving (the call itself is ``Executing.approve``), ``reject``, ``wait_for_approval``."""

    async def _approve(self, actor: Actor, request_id: str, reason: str | None) -> SpendRequest:
        """Resolve a held request as approved: a REST one (source api) goes straight to executing, to run
        at once; a gateway one to approved, for its waiting caller to claim."""
        now = self.clock()
        async with self.uow(actor) as scope:
            held = await self._held(scope, request_id)
            run_now = held.source != "gateway"
            row = await scope.store.spend_requests.transition(
                request_id, ("pending_approval",), status="executing" if run_now else "approved",
                resolved_by=actor.label, reservation_expires_at=now + self.reservation_ttl)
            if row is None:
                raise Conflict("the request was resolved meanwhile", {"request_id": request_id})
            scope.emit(row.project_id, "approval.resolved", {
                "request_id": request_id, "resolution": "approved", "by": actor.label, "reason": reason})
        return row

    async def reject(self, actor: Actor, request_id: str, reason: str | None = None) -> SpendRequest:
        async with self.uow(actor) as scope:
            await self._held(scope, request_id)
            error = ApprovalRejected(f"rejected by {actor.label}" + (f": {reason}" if reason else ""),
                                     {"request_id": request_id, "reason": reason})
            row = await scope.store.spend_requests.transition(
                request_id, ("pending_approval",), status="rejected", resolved_by=actor.label,
                error=error.to_dict(), reservation_expires_at=None)
            if row is None:
                raise Conflict("the request was resolved meanwhile", {"request_id": request_id})
            await self._release(scope, row)
            scope.emit(row.project_id, "approval.resolved", {
                "request_id": request_id, "resolution": "rejected", "by": actor.label, "reason": reason})
        return await self.get(actor, request_id)

    async def _held(self, scope: Scope, request_id: str) -> SpendRequest:
        row = await scope.store.spend_requests.get(request_id)
        if row is None:
            raise NotFound("request not found", {"request_id": request_id})
        await scope.projects.require(row.project_id, "admin")
        if row.status != "pending_approval":
            raise Conflict(f"the request is {row.status}, not waiting for approval",
                           {"request_id": request_id, "status": row.status})
        return row

    async def wait_for_approval(self, request_id: str, timeout_seconds: float) -> Prepared:
        """Wait (polling the database, so any process's decision counts) until an admin decides.
        Approved → claims the request (approved → executing) and returns it, ready to execute.
        Rejected/expired → ApprovalRejected/ApprovalExpired. Still waiting at the timeout → ApprovalRequired."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout_seconds)
        while True:
            async with self.reader(SYSTEM) as scope:
                row = await scope.store.spend_requests.get(request_id)
            if row is None:
                raise NotFound("request not found", {"request_id": request_id})
            if row.status == "approved":
                async with self.uow(SYSTEM) as scope:
                    claimed = await scope.store.spend_requests.transition(
                        request_id, ("approved",), status="executing",
                        reservation_expires_at=self.clock() + self.reservation_ttl)
                if claimed is not None:
                    return self._prepared(claimed)
                continue
            if row.status == "executing" and row.resolved_by:
                raise Conflict("the approved request is already executing elsewhere", {"request_id": request_id})
            if row.status in ("rejected", "failed"):
                error = row.error or {}
                raise ApprovalRejected(error.get("message") or "the request was rejected",
                                       {"request_id": request_id, "status": row.status})
            if row.status == "expired":
                raise ApprovalExpired("nobody approved the request in time", {"request_id": request_id})
            if row.status != "pending_approval":
                raise Conflict(f"the request is {row.status}", {"request_id": request_id, "status": row.status})
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise ApprovalRequired("still waiting for an owner's or admin's approval",
                                       {"request_id": request_id})
            await asyncio.sleep(min(self.approval_poll_seconds, remaining))
