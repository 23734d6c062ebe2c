"""What every part of the spend service shares: its collaborators and settings, and the reads."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from domain.base import Actor, Page, PageRequest, utcnow
from domain.decisions import Brain, Decision
from domain.errors import (
    Forbidden,
    InvalidRequest,
    NotFound,
)
from domain.ports import UowFactory
from domain.providers import ProviderRegistry
from domain.spend.entities import STATUSES, HotPath, Prepared, SpendRequest

if TYPE_CHECKING:
    from domain.ratelimit import RateLimiter
    from domain.scope import Scope

log = logging.getLogger("smartspace.spend")




class SpendCore:
    """The spend service's collaborators and settings (every part of :class:`domain.spend.Spending` has them)."""

    def __init__(self, *, uow: UowFactory, reader: UowFactory, brain: Brain, providers: ProviderRegistry,
                 limiter: RateLimiter | None = None, reservation_ttl_seconds: int = 600,
                 approval_ttl_seconds: int = 3600, clock: Callable[[], datetime] = utcnow,
                 hot: HotPath | None = None, fee_bps: int = 0) -> None:
        self.uow = uow
        self.fee_bps = fee_bps  # the platform fee, basis points of each request's cost (0: resold at cost)
        self.hot = hot
        self.reader = reader
        self.brain = brain
        self.providers = providers
        self.limiter = limiter
        self.reservation_ttl = timedelta(seconds=reservation_ttl_seconds)
        self.approval_ttl = timedelta(seconds=approval_ttl_seconds)
        self.clock = clock
        self.approval_poll_seconds = 0.2

    def _prepared(self, row: SpendRequest, decision: Decision | None = None) -> Prepared:
        p = row.params
        return Prepared(
            request_id=row.id, project_id=row.project_id, model=row.model, provider=row.provider,
            upstream_model=p.get("upstream_model") or row.model.partition("/")[2], operation=row.operation,
            estimated_cost_micros=row.estimated_cost_micros, reserved_micros=row.reserved_micros,
            input_tokens=p.get("input_tokens", row.input_tokens or 0), max_output_tokens=p.get("max_output_tokens", 0),
            input_micros_per_mtok=p.get("input_micros_per_mtok", 0),
            output_micros_per_mtok=p.get("output_micros_per_mtok", 0), budget_ids=list(row.budget_ids),
            actor=row.actor, source=row.source, agent_id=row.agent_id, key_id=row.key_id,
            messages=p.get("messages"), input=p.get("input"), params=p.get("params") or {},
            stream=bool(p.get("stream")), decision=decision, fee_bps=int(p.get("fee_bps", 0)))

    async def get(self, actor: Actor, request_id: str) -> SpendRequest:
        async with self.reader(actor) as scope:
            return await get_request(scope, request_id)


def own_only(actor: Actor, scope: str) -> bool:
    """A key without ``scope`` sees only what it did itself (domain.identity.KEY_SCOPES)."""
    return not actor.may(scope)


async def get_request(scope: Scope, request_id: str) -> SpendRequest:
    row = await scope.store.spend_requests.get(request_id)
    if row is None:
        raise NotFound("request not found", {"request_id": request_id})
    try:
        await scope.projects.require(row.project_id, "viewer")
    except Forbidden:
        raise NotFound("request not found", {"request_id": request_id}) from None
    if own_only(scope.actor, "requests:read") and row.key_id != scope.actor.id:  # another key's doing
        raise NotFound("request not found", {"request_id": request_id})
    return row


async def list_requests(scope: Scope, project_id: str, page: PageRequest, status: str | None) -> Page[SpendRequest]:
    await scope.projects.require(project_id, "viewer")
    if status is not None and status not in STATUSES:
        raise InvalidRequest(f"status must be one of {', '.join(STATUSES)}", {"status": status})
    key_id = scope.actor.id if own_only(scope.actor, "requests:read") else None
    return await scope.store.spend_requests.list(project_id, page, status, key_id=key_id)
