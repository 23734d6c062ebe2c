"""Prepare: validate → decide (the read-only brain) → reserve, all or nothing."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import TYPE_CHECKING, Any

import msgspec

from domain import tokens
from domain.base import Actor, new_id
from domain.decisions import Decision, SpendInput
from domain.errors import (
    ApprovalRequired,
    BudgetExceeded,
    DomainError,
    Forbidden,
    InsufficientFunds,
    InvalidRequest,
    NotFound,
    RateLimited,
)
from domain.spend.core import SpendCore
from domain.spend.entities import (
    Prepared,
    SpendCommand,
    SpendRequest,
    approval_requested_events,
    created_events,
    decision_json,
    rejection_error,
)

if TYPE_CHECKING:
    from domain.scope import Scope

log = logging.getLogger("smartspace.spend")


class Preparing(SpendCore):
    """The first step of every request: create, decide, reserve (``prepare``)."""

    async def prepare(self, actor: Actor, cmd: SpendCommand, *, source: str = "api",
                      idempotency_key: str | None = None) -> Prepared:
        """Create, decide and reserve. Raises the rejection's DomainError (details.request_id), or
        ApprovalRequired (403, details.request_id) when the request is held for review."""
        project_id, agent_id, messages, input_tokens = await self._validate(actor, cmd)
        now = self.clock()
        request_id = new_id("req")
        spend_input = SpendInput(project_id=project_id, key_id=actor.id if actor.kind == "key" else None,
                                 agent_id=agent_id, actor=actor.label, model=cmd.model, operation=cmd.operation,
                                 input_tokens=input_tokens, max_output_tokens=cmd.max_tokens,
                                 metadata=cmd.metadata, fee_bps=self.fee_bps)
        decision = await self.brain.decide(spend_input, now)
        provider, upstream = self._names(cmd.model, decision)
        row = SpendRequest(
            id=request_id, project_id=project_id, agent_id=agent_id, key_id=spend_input.key_id, actor=actor.label,
            source=source, operation=cmd.operation, model=decision.model or cmd.model, provider=provider,
            status="rejected", decision=decision_json(decision),
            params={"messages": messages, "input": cmd.input, "params": cmd.params, "stream": cmd.stream,
                    "upstream_model": upstream, "input_tokens": input_tokens, "fee_bps": self.fee_bps,
                    "max_output_tokens": decision.max_output_tokens or cmd.max_tokens or 0},
            metadata=cmd.metadata, estimated_cost_micros=decision.estimated_cost_micros, reserved_micros=0,
            cost_micros=None, input_tokens=input_tokens, output_tokens=None, risk_score=decision.risk_score,
            budget_ids=[], error=None, idempotency_key=idempotency_key, response=None, reservation_expires_at=None,
            approval_expires_at=None, resolved_by=None, tx_hash=None, settlement_batch_id=None, created_at=now,
            settled_at=None)
        if decision.outcome == "REJECTED":
            error = rejection_error(decision, request_id)
            await self._record_rejection(actor, row, decision, error)
            raise error
        if self.limiter is not None and decision.rate_limits:
            try:
                await self.limiter.acquire(decision.rate_limits, now)
            except RateLimited as exc:
                exc.details = {**exc.details, "request_id": request_id}
                await self._record_rejection(actor, row, decision, exc)
                raise
        held = decision.outcome == "REQUIRES_REVIEW"
        self._plan(row, decision, held, now)
        try:
            priced = "input_micros_per_mtok" in row.params  # else the generic path reads the prices
            after = approval_requested_events(row, decision) if held else []
            if self.hot is None or row.reserved_micros <= 0 or not priced or not await self.hot.reserve(
                    row, actor.label, created_events(row), after, now):
                async with self.uow(actor) as scope:
                    row = await self._reserve(scope, row, decision, held)
        except (BudgetExceeded, InsufficientFunds) as exc:
            exc.details = {**exc.details, "request_id": request_id}
            await self._record_rejection(actor, row, decision, exc)
            raise
        if held:
            raise ApprovalRequired(
                "this request needs an owner's or admin's approval before it runs",
                {"request_id": request_id, "reasons": [msgspec.to_builtins(r) for r in decision.reasons],
                 "estimated_cost_micros": decision.estimated_cost_micros,
                 "approval_expires_at": row.approval_expires_at.isoformat() if row.approval_expires_at else None})
        return self._prepared(row, decision)

    async def _validate(self, actor: Actor,
                        cmd: SpendCommand) -> tuple[str, str | None, list[dict[str, Any]] | None, int]:
        if actor.kind == "key":
            project_id = actor.project_id or ""
            if cmd.project_id and cmd.project_id != project_id:
                raise Forbidden("an API key spends only for its own project", {"project_id": cmd.project_id})
            if actor.agent_id and cmd.agent_id and cmd.agent_id != actor.agent_id:
                raise Forbidden("this key belongs to another agent", {"agent_id": cmd.agent_id})
            agent_id = actor.agent_id or cmd.agent_id
        elif actor.kind == "user":
            if not cmd.project_id:
                raise InvalidRequest("project_id is required when spending with a user token (API keys imply it)",
                                     {"field": "project_id"})
            project_id, agent_id = cmd.project_id, cmd.agent_id
        else:
            if not cmd.project_id:
                raise InvalidRequest("project_id is required", {"field": "project_id"})
            project_id, agent_id = cmd.project_id, cmd.agent_id
        if cmd.operation not in ("chat", "embedding"):
            raise InvalidRequest("operation must be 'chat' or 'embedding'", {"operation": cmd.operation})
        messages = cmd.messages
        if cmd.operation == "chat":
            if messages and cmd.prompt:
                raise InvalidRequest("send messages or prompt, not both", {"field": "prompt"})
            if not messages:
                if not cmd.prompt:
                    raise InvalidRequest("messages (or prompt) is required", {"field": "messages"})
                messages = [{"role": "user", "content": cmd.prompt}]
            for i, message in enumerate(messages):
                if not isinstance(message, dict) or "role" not in message:
                    raise InvalidRequest("each message needs a role and content", {"field": f"messages[{i}]"})
            input_tokens = tokens.count_messages(messages)
        else:
            texts = [cmd.input] if isinstance(cmd.input, str) else list(cmd.input or [])
            if not texts:
                raise InvalidRequest("input is required for embeddings", {"field": "input"})
            input_tokens = sum(tokens.count_text(t) for t in texts)
        if cmd.max_tokens is not None and not 1 <= cmd.max_tokens <= 1_000_000:
            raise InvalidRequest("max_tokens must be between 1 and 1000000", {"max_tokens": cmd.max_tokens})
        # An API key is a member of its own project by definition (and the brain re-checks the key, the
        # project and the agent in its read-only pass): only a user, or an explicit agent, needs a lookup.
        if actor.kind == "user" or (actor.kind == "key" and agent_id is not None and actor.agent_id != agent_id):
            async with self.reader(actor) as scope:
                await scope.projects.require(project_id, "member")
                if agent_id is not None and actor.agent_id != agent_id:
                    await scope.agents.get(project_id, agent_id)
        return project_id, agent_id, messages, input_tokens

    @staticmethod
    def _names(model: str, decision: Decision) -> tuple[str, str]:
        resolved = decision.model or model
        provider, _, name = resolved.partition("/")
        return decision.provider or (provider if name else ""), decision.upstream_model or name or resolved

    def _plan(self, row: SpendRequest, decision: Decision, held: bool, now: datetime) -> None:
        """The reservation's terms on the request row: status, amount, expiry, the prices it is charged at."""
        row.status = "pending_approval" if held else "executing"
        row.reserved_micros = decision.estimated_cost_micros
        if held:
            row.approval_expires_at = now + self.approval_ttl
            row.reservation_expires_at = row.approval_expires_at
        else:
            row.reservation_expires_at = now + self.reservation_ttl
        if decision.input_micros_per_mtok is not None and decision.output_micros_per_mtok is not None:
            row.params = {**row.params, "input_micros_per_mtok": decision.input_micros_per_mtok,
                          "output_micros_per_mtok": decision.output_micros_per_mtok}

    async def _reserve(self, scope: Scope, row: SpendRequest, decision: Decision, held: bool) -> SpendRequest:
        amount = row.reserved_micros
        now = row.created_at
        if "input_micros_per_mtok" not in row.params:
            # The prices the estimate used come with the brain's catalog entry; read them only if missing.
            prices = await scope.store.spend_requests.prices(row.model)
            if prices is None:
                raise NotFound(f"the model {row.model!r} is not in the catalog", {"model": row.model})
            row.params = {**row.params, "input_micros_per_mtok": prices[0], "output_micros_per_mtok": prices[1]}
        scope.pending.extend(created_events(row))
        if amount > 0:
            # Reads and the request's own row first, then the contended row locks, as late as possible and
            # in the same order on every path: wallet, budgets by id, event head (appended at commit) —
            # short lock windows, no deadlocks between processes. A failed hold rolls the insert back too.
            applicable = await scope.budgets.applicable(row.project_id, row.agent_id, row.key_id)
            row.budget_ids = sorted(b.id for b in applicable)
            await scope.store.spend_requests.insert(row)
            await scope.wallets.hold(row.project_id, amount, ref=row.id)
            budgets = await scope.budgets.reserve_all(row.project_id, row.agent_id, amount, ref=row.id, now=now,
                                                      budgets=applicable, key_id=row.key_id)
            reserved_on = [b.id for b in budgets]
            if reserved_on != row.budget_ids:  # a budget was deleted since it was read: it no longer applies
                row.budget_ids = reserved_on
                await scope.store.spend_requests.update(row.id, budget_ids=reserved_on)
        else:
            await scope.store.spend_requests.insert(row)
        if held:
            scope.pending.extend(approval_requested_events(row, decision))
        return row

    async def _record_rejection(self, actor: Actor, row: SpendRequest, decision: Decision,
                                error: DomainError) -> None:
        row.status = "rejected"
        row.reserved_micros = 0
        row.budget_ids = []
        row.reservation_expires_at = row.approval_expires_at = None
        row.error = error.to_dict()
        async with self.uow(actor) as scope:
            await scope.store.spend_requests.insert(row)
            scope.pending.extend(created_events(row))
