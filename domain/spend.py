"""Spending: create → decide (the read-only brain) → reserve → execute → settle, and approvals.

One spend request moves through these statuses::

    rejected                      the brain said no, or the reservation found no room (nothing held)
    pending_approval → approved   held for review with its reservation; an owner/admin approved it
                     → rejected   an owner/admin rejected it (reservation released)
                     → expired    nobody answered within approval_ttl_seconds (released by the sweeper)
    executing → settled           the provider answered; actual cost charged, the rest released
              → failed            the provider failed, or the reservation expired (released)

Every transition is a conditional UPDATE on the request's status (``… WHERE status = :from``), so a
settlement racing the sweeper, or two admins approving at once, resolve to exactly one winner.
Money moves in the same transaction as the transition: the wallet hold and every applicable budget
are reserved all or nothing (``domain.wallet`` / ``domain.budgets``), settled, or released.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any, Literal, Protocol

import msgspec
from msgspec import Meta

from domain import tokens
from domain.base import SYSTEM, Actor, Page, PageRequest, new_id, utcnow
from domain.catalog import MTOK
from domain.decisions import Decision, SpendInput
from domain.errors import (
    ApprovalRequired,
    BudgetExceeded,
    Conflict,
    DomainError,
    Forbidden,
    InsufficientFunds,
    InvalidRequest,
    NotFound,
    PolicyViolation,
    ProviderError,
    ProviderTimeout,
    RateLimited,
    Unauthorized,
)
from domain.events import PendingEvent
from domain.providers import Completion, ProviderCall, ProviderRegistry, Usage, conservative_usage

if TYPE_CHECKING:
    from domain.ratelimit import RateLimiter
    from domain.scope import Scope

log = logging.getLogger("smartspace.spend")

OPEN_STATUSES = ("pending_approval", "approved", "executing")
FINAL_STATUSES = ("settled", "rejected", "failed", "expired")
STATUSES = (*OPEN_STATUSES, *FINAL_STATUSES)


# ---------------------------------------------------------------- commands and results
class SpendCommand(msgspec.Struct, kw_only=True):
    model: str
    operation: str = "chat"
    messages: list[dict] | None = None
    prompt: str | None = None
    input: str | list[str] | None = None
    max_tokens: int | None = None
    agent_id: str | None = None
    metadata: dict = {}
    params: dict = {}
    stream: bool = False
    project_id: str | None = None  # needed with a user token; an API key's project otherwise


class RequestCreate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The body of POST /api/v1/requests."""

    model: Annotated[str, Meta(min_length=1, max_length=200)]
    messages: Annotated[list[dict], Meta(min_length=1, max_length=1000)] | None = None
    prompt: Annotated[str, Meta(min_length=1)] | None = None
    input: str | list[str] | None = None
    operation: Literal["chat", "embedding"] = "chat"
    max_tokens: Annotated[int, Meta(ge=1, le=1_000_000)] | None = None
    agent_id: str | None = None
    project_id: str | None = None
    metadata: dict = {}
    params: dict = {}

    def command(self) -> SpendCommand:
        return SpendCommand(model=self.model, operation=self.operation, messages=self.messages, prompt=self.prompt,
                            input=self.input, max_tokens=self.max_tokens, agent_id=self.agent_id,
                            metadata=self.metadata, params=self.params, project_id=self.project_id)


class Resolve(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The body of POST /requests/{id}/approve and /reject."""

    reason: Annotated[str, Meta(max_length=500)] | None = None


class Prepared(msgspec.Struct, kw_only=True):
    """A request whose money is reserved and that may execute now."""

    request_id: str
    project_id: str
    model: str  # "provider/model"
    provider: str
    upstream_model: str
    operation: str
    estimated_cost_micros: int
    reserved_micros: int
    input_tokens: int
    max_output_tokens: int
    input_micros_per_mtok: int
    output_micros_per_mtok: int
    budget_ids: list[str]
    actor: str
    source: str
    agent_id: str | None = None
    key_id: str | None = None
    messages: list[dict] | None = None
    input: str | list[str] | None = None
    params: dict = {}
    stream: bool = False
    decision: Decision | None = None

    def call(self) -> ProviderCall:
        return ProviderCall(provider=self.provider, model=self.upstream_model,
                            operation="embedding" if self.operation == "embedding" else "chat",
                            messages=self.messages, input=self.input, max_tokens=self.max_output_tokens or None,
                            params=self.params)

    def cost(self, usage: Usage) -> int:
        """The actual price of ``usage`` at the prices of decision time, rounded up."""
        numerator = (max(0, usage.input_tokens) * self.input_micros_per_mtok
                     + max(0, usage.output_tokens) * self.output_micros_per_mtok)
        return -(-numerator // MTOK)


class Receipt(msgspec.Struct, kw_only=True):
    request_id: str
    model: str
    input_tokens: int
    output_tokens: int
    estimated_cost_micros: int
    cost_micros: int
    settled_at: datetime
    tx_hash: str | None = None


class SpendRequest(msgspec.Struct, kw_only=True):
    """A spend request as stored and shown (GET /requests/{id})."""

    id: str
    project_id: str
    agent_id: str | None
    key_id: str | None
    actor: str
    source: str
    operation: str
    model: str
    provider: str
    status: str
    decision: dict | None
    params: dict
    metadata: dict
    estimated_cost_micros: int
    reserved_micros: int
    cost_micros: int | None
    input_tokens: int | None
    output_tokens: int | None
    risk_score: float | None
    budget_ids: list[str]
    error: dict | None
    idempotency_key: str | None
    response: dict | None
    reservation_expires_at: datetime | None
    approval_expires_at: datetime | None
    resolved_by: str | None
    tx_hash: str | None
    settlement_batch_id: str | None
    created_at: datetime
    settled_at: datetime | None
    receipt: Receipt | None = None

    def __post_init__(self) -> None:
        if self.status == "settled" and self.settled_at is not None and self.receipt is None:
            self.receipt = Receipt(request_id=self.id, model=self.model, input_tokens=self.input_tokens or 0,
                                   output_tokens=self.output_tokens or 0,
                                   estimated_cost_micros=self.estimated_cost_micros,
                                   cost_micros=self.cost_micros or 0, settled_at=self.settled_at,
                                   tx_hash=self.tx_hash)


class SpendResult(msgspec.Struct, kw_only=True):
    status_code: int  # 200 executed, 202 held for review
    request: SpendRequest


class SpendRepo(Protocol):
    async def insert(self, request: SpendRequest) -> SpendRequest: ...
    async def get(self, id_: str, *, for_update: bool = False) -> SpendRequest | None: ...
    async def transition(self, id_: str, from_statuses: tuple[str, ...], **values: Any) -> SpendRequest | None: ...
    async def list(self, project_id: str, page: PageRequest, status: str | None = None) -> Page[SpendRequest]: ...
    async def stale(self, now: datetime, limit: int) -> list[SpendRequest]: ...
    async def prices(self, model_id: str) -> tuple[int, int] | None: ...
    async def by_idempotency_key(self, project_id: str, key: str) -> SpendRequest | None: ...


class Brain(Protocol):
    async def decide(self, req: SpendInput, now: datetime) -> Decision: ...


class HotPath(Protocol):
    """A faster implementation of the two transactions every spend request runs (storage/hot.py, on
    PostgreSQL): the reservation, and the closing of an executing request (settle or fail).

    Each method either does the whole job in one transaction — the same rows, the same events as
    the service's own path — and returns True, or changes nothing and returns False, and the service
    runs its own path (any unusual case: a budget to roll into a new period, no room, a row in an
    unexpected state, a database error). The events it is given are appended around the money events
    it builds itself (``domain.wallet.wallet_updated``, ``domain.budgets.budget_updated`` …)."""

    async def reserve(self, row: SpendRequest, actor: str, before: list[PendingEvent],
                      after: list[PendingEvent], now: datetime) -> bool: ...

    async def close(self, request: Prepared, from_statuses: tuple[str, ...], values: CloseValues, actor: str,
                    after: list[PendingEvent], now: datetime) -> bool: ...


class CloseValues(msgspec.Struct, kw_only=True):
    """What closing an executing request writes on it (settle or fail)."""

    status: str
    cost_micros: int
    input_tokens: int | None
    output_tokens: int | None
    response: dict | None = None
    error: dict | None = None
    settled_at: datetime | None = None


class ApprovalRejected(PolicyViolation):
    """A held request an owner/admin rejected (the gateway's waiting caller gets this)."""


class ApprovalExpired(PolicyViolation):
    """A held request nobody answered in time."""


_REJECTIONS: dict[str, type[DomainError]] = {
    "policy_violation": PolicyViolation, "budget_exceeded": BudgetExceeded,
    "insufficient_funds": InsufficientFunds, "invalid_request": InvalidRequest, "not_found": NotFound,
    "rate_limited": RateLimited, "forbidden": Forbidden, "unauthorized": Unauthorized,
}


def rejection_error(decision: Decision, request_id: str) -> DomainError:
    details = {"request_id": request_id, "outcome": decision.outcome,
               "reasons": [msgspec.to_builtins(r) for r in decision.reasons],
               "risk_score": decision.risk_score, "estimated_cost_micros": decision.estimated_cost_micros}
    cls = _REJECTIONS.get(decision.error_code or "policy_violation", PolicyViolation)
    if cls is RateLimited:
        return RateLimited(decision.message, retry_after=decision.retry_after_seconds or 1, details=details)
    return cls(decision.message, details)


def _actor_from_label(label: str) -> Actor:
    kind, _, id_ = label.partition(":")
    if kind not in ("user", "key", "system") or not id_:
        return SYSTEM
    return Actor(kind=kind, id=id_, user_id=id_ if kind == "user" else None)  # type: ignore[arg-type]


def _error_json(error: DomainError) -> dict:
    return {"code": error.code, "message": error.message, "details": error.details}


def _decision_json(decision: Decision) -> dict:
    return {"outcome": decision.outcome, "reasons": msgspec.to_builtins(decision.reasons),
            "risk_score": decision.risk_score, "risk_factors": msgspec.to_builtins(decision.risk_factors),
            "estimated_cost_micros": decision.estimated_cost_micros, "model": decision.model, "tier": decision.tier,
            "error_code": decision.error_code, "policy_version": decision.policy_version}


def _created(row: SpendRequest) -> list[PendingEvent]:
    decision = row.decision or {}
    return [
        PendingEvent(row.project_id, "request.created", {
            "request_id": row.id, "model": row.model, "operation": row.operation, "agent_id": row.agent_id,
            "key_id": row.key_id, "source": row.source, "actor": row.actor}),
        PendingEvent(row.project_id, "request.decided", {
            "request_id": row.id, "outcome": decision.get("outcome"), "reasons": decision.get("reasons", []),
            "risk_score": decision.get("risk_score"), "risk_factors": decision.get("risk_factors", []),
            "estimated_cost_micros": row.estimated_cost_micros, "tier": decision.get("tier"),
            "error_code": decision.get("error_code"), "status": row.status, "error": row.error}),
    ]


def _approval_requested(row: SpendRequest, decision: Decision) -> list[PendingEvent]:
    return [PendingEvent(row.project_id, "approval.requested", {
        "request_id": row.id, "model": row.model, "agent_id": row.agent_id, "actor": row.actor,
        "estimated_cost_micros": row.reserved_micros, "risk_score": decision.risk_score,
        "reasons": msgspec.to_builtins(decision.reasons),
        "expires_at": row.approval_expires_at.isoformat() if row.approval_expires_at else None})]


def _settled(row: SpendRequest | Prepared, receipt: Receipt) -> PendingEvent:
    cost = receipt.cost_micros
    return PendingEvent(row.project_id, "request.settled", {
        "request_id": receipt.request_id, "receipt": msgspec.to_builtins(receipt), "agent_id": row.agent_id,
        "variance_micros": row.estimated_cost_micros - cost, "released_micros": row.reserved_micros - cost})


def _failed(project_id: str, request_id: str, error: dict, cost: int) -> PendingEvent:
    return PendingEvent(project_id, "request.failed", {"request_id": request_id, "error": error, "cost_micros": cost})


def output_text(body: dict) -> str:
    try:
        return str(body["choices"][0]["message"].get("content") or "")
    except (KeyError, IndexError, TypeError, AttributeError):
        return ""


# ---------------------------------------------------------------- the service
UowFactory = Callable[[Actor], contextlib.AbstractAsyncContextManager["Scope"]]


class Spending:
    """``container.spending``. Built once by the container; every method opens its own units of work."""

    def __init__(self, *, uow: UowFactory, reader: UowFactory, brain: Brain, providers: ProviderRegistry,
                 limiter: RateLimiter | None = None, reservation_ttl_seconds: int = 600,
                 approval_ttl_seconds: int = 3600, provider_timeout_seconds: float = 60.0,
                 default_output_tokens: int = 1024, clock: Callable[[], datetime] = utcnow,
                 hot: HotPath | None = None) -> None:
        self.uow = uow
        self.hot = hot
        self.reader = reader
        self.brain = brain
        self.providers = providers
        self.limiter = limiter
        self.reservation_ttl = timedelta(seconds=reservation_ttl_seconds)
        self.approval_ttl = timedelta(seconds=approval_ttl_seconds)
        self.provider_timeout = provider_timeout_seconds
        self.default_output_tokens = default_output_tokens
        self.clock = clock
        self.approval_poll_seconds = 0.2

    # ------------------------------------------------------------ prepare
    async def prepare(self, actor: Actor, cmd: SpendCommand, *, source: str = "api",
                      idempotency_key: str | None = None) -> Prepared:
        """Create, decide and reserve. Raises the rejection's DomainError (details.request_id), or
        ApprovalRequired (403, details.request_id) when the request is held for review."""
        project_id, agent_id, messages, input_tokens = await self._validate(actor, cmd)
        now = self.clock()
        if idempotency_key:
            async with self.reader(actor) as scope:
                existing = await scope.store.spend_requests.by_idempotency_key(project_id, idempotency_key)
            if existing is not None:
                raise Conflict("a spend request with this Idempotency-Key exists",
                               {"request_id": existing.id, "status": existing.status})
        request_id = new_id("req")
        spend_input = SpendInput(project_id=project_id, key_id=actor.id if actor.kind == "key" else None,
                                 agent_id=agent_id, actor=actor.label, model=cmd.model, operation=cmd.operation,
                                 input_tokens=input_tokens, max_output_tokens=cmd.max_tokens,
                                 metadata=cmd.metadata)
        decision = await self.brain.decide(spend_input, now)
        provider, upstream = self._names(cmd.model, decision)
        row = SpendRequest(
            id=request_id, project_id=project_id, agent_id=agent_id, key_id=spend_input.key_id, actor=actor.label,
            source=source, operation=cmd.operation, model=decision.model or cmd.model, provider=provider,
            status="rejected", decision=_decision_json(decision),
            params={"messages": messages, "input": cmd.input, "params": cmd.params, "stream": cmd.stream,
                    "upstream_model": upstream, "input_tokens": input_tokens,
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
            if self.hot is None or row.reserved_micros <= 0 or not priced or not await self.hot.reserve(
                    row, actor.label, _created(row), _approval_requested(row, decision) if held else [], now):
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

    async def _validate(self, actor: Actor, cmd: SpendCommand) -> tuple[str, str | None, list[dict] | None, int]:
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
        scope.pending.extend(_created(row))
        if amount > 0:
            # Reads and the request's own row first, then the contended row locks, as late as possible and
            # in the same order on every path: wallet, budgets by id, event head (appended at commit) —
            # short lock windows, no deadlocks between processes. A failed hold rolls the insert back too.
            applicable = await scope.budgets.applicable(row.project_id, row.agent_id)
            row.budget_ids = sorted(b.id for b in applicable)
            await scope.store.spend_requests.insert(row)
            await scope.wallets.hold(row.project_id, amount, ref=row.id)
            budgets = await scope.budgets.reserve_all(row.project_id, row.agent_id, amount, ref=row.id, now=now,
                                                      budgets=applicable)
            reserved_on = [b.id for b in budgets]
            if reserved_on != row.budget_ids:  # a budget was deleted since it was read: it no longer applies
                row.budget_ids = reserved_on
                await scope.store.spend_requests.update(row.id, budget_ids=reserved_on)
        else:
            await scope.store.spend_requests.insert(row)
        if held:
            scope.pending.extend(_approval_requested(row, decision))
        return row

    async def _record_rejection(self, actor: Actor, row: SpendRequest, decision: Decision,
                                error: DomainError) -> None:
        row.status = "rejected"
        row.reserved_micros = 0
        row.budget_ids = []
        row.reservation_expires_at = row.approval_expires_at = None
        row.error = _error_json(error)
        async with self.uow(actor) as scope:
            await scope.store.spend_requests.insert(row)
            scope.pending.extend(_created(row))

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
            stream=bool(p.get("stream")), decision=decision)

    # ------------------------------------------------------------ settle / fail
    async def settle(self, prepared: Prepared, usage: Usage, response: dict | None = None) -> Receipt:
        """Charge the actual cost of ``usage`` (never more than reserved), release the rest, receipt."""
        cost = actual = prepared.cost(usage)
        if cost > prepared.reserved_micros:
            log.warning("actual cost above the reservation; charging the reservation",
                        extra={"request_id": prepared.request_id, "cost_micros": cost,
                               "reserved_micros": prepared.reserved_micros})
            cost = prepared.reserved_micros
        now = self.clock()
        values = CloseValues(status="settled", cost_micros=cost, input_tokens=usage.input_tokens,
                             output_tokens=usage.output_tokens, response=response, settled_at=now)
        receipt = Receipt(request_id=prepared.request_id, model=prepared.model, input_tokens=usage.input_tokens,
                          output_tokens=usage.output_tokens, estimated_cost_micros=prepared.estimated_cost_micros,
                          cost_micros=cost, settled_at=now)
        overrun = actual > cost  # issue 11: settled on the generic path, with record_overrun below
        if not overrun and prepared.reserved_micros > 0 and self.hot is not None and await self.hot.close(
                prepared, ("executing",), values, prepared.actor, [_settled(prepared, receipt)], now):
            return receipt
        async with self.uow(_actor_from_label(prepared.actor)) as scope:
            row = await self._close(scope, prepared.request_id, ("executing",), values)
            if row is None:
                current = await scope.store.spend_requests.get(prepared.request_id)
                raise Conflict("the request is no longer executing (its reservation expired or it was settled)",
                               {"request_id": prepared.request_id, "status": current.status if current else None})
            receipt = row.receipt
            assert receipt is not None
            scope.pending.append(_settled(row, receipt))
            if overrun:  # issue 11: the uncharged rest on the platform's ledger + a cost_overrun insight
                await scope.insights.record_overrun(
                    project_id=row.project_id, request_id=row.id, model=row.model, agent_id=row.agent_id,
                    reserved_micros=prepared.reserved_micros, actual_micros=actual)
        return receipt

    async def fail(self, prepared: Prepared, error: DomainError, usage: Usage | None = None) -> None:
        """The call failed after reserving: charge what was consumed (if the upstream reported usage),
        release the rest."""
        cost = min(prepared.cost(usage), prepared.reserved_micros) if usage is not None else 0
        now = self.clock()
        values = CloseValues(status="failed", cost_micros=cost, error=_error_json(error),
                             input_tokens=usage.input_tokens if usage else None,
                             output_tokens=usage.output_tokens if usage else None, settled_at=now if cost else None)
        failed = _failed(prepared.project_id, prepared.request_id, values.error or {}, cost)
        if prepared.reserved_micros > 0 and self.hot is not None and await self.hot.close(
                prepared, ("executing", "approved"), values, prepared.actor, [failed], now):
            return
        async with self.uow(_actor_from_label(prepared.actor)) as scope:
            row = await self._close(scope, prepared.request_id, ("executing", "approved"), values)
            if row is None:
                return  # already released (expired by the sweeper, or failed before)
            scope.pending.append(failed)

    async def _close(self, scope: Scope, request_id: str, from_statuses: tuple[str, ...],
                     values: CloseValues) -> SpendRequest | None:
        row = await scope.store.spend_requests.transition(request_id, from_statuses, reservation_expires_at=None,
                                                          **msgspec.structs.asdict(values))
        if row is not None:
            await self._move_money(scope, row, values.cost_micros)
        return row

    async def _move_money(self, scope: Scope, row: SpendRequest, cost: int) -> None:
        """Charge ``cost`` of the request's reservation and release the rest (wallet + its budgets)."""
        reserved = row.reserved_micros
        if reserved <= 0:
            return
        await scope.wallets.capture(row.project_id, cost, kind="spend", ref=row.id, memo=row.model,
                                    release_micros=reserved - cost)
        await scope.budgets.settle_all(row.budget_ids, reserved, cost, ref=row.id)

    async def _release(self, scope: Scope, row: SpendRequest) -> None:
        if row.reserved_micros > 0:
            await scope.wallets.release(row.project_id, row.reserved_micros, ref=row.id)
            await scope.budgets.release_all(row.budget_ids, row.reserved_micros, ref=row.id)

    # ------------------------------------------------------------ execute (REST path)
    async def execute(self, prepared: Prepared) -> Completion:
        """Call the provider for a prepared request (non-streaming); release on failure."""
        try:
            provider = self.providers.get(prepared.provider)
            async with asyncio.timeout(self.provider_timeout):
                if prepared.operation == "embedding":
                    return await provider.embed(prepared.call())
                return await provider.complete(prepared.call())
        except DomainError as exc:
            exc.details = {**exc.details, "request_id": prepared.request_id}
            await self.fail(prepared, exc)
            raise
        except asyncio.CancelledError:  # the caller went away: give the money back, then stop
            await asyncio.shield(self.fail(prepared, ProviderError("the call was cancelled",
                                                                   {"request_id": prepared.request_id})))
            raise
        except TimeoutError:
            error = ProviderTimeout(f"the provider did not answer within {self.provider_timeout:g}s",
                                    {"request_id": prepared.request_id})
            await self.fail(prepared, error)
            raise error from None
        except Exception as exc:
            log.exception("provider call failed", extra={"request_id": prepared.request_id})
            error = ProviderError(f"the provider call failed: {type(exc).__name__}",
                                  {"request_id": prepared.request_id})
            await self.fail(prepared, error)
            raise error from None

    async def _execute_and_settle(self, prepared: Prepared) -> None:
        completion = await self.execute(prepared)
        call = prepared.call()
        usage = conservative_usage(call, output_text(completion.body), completion.usage) \
            if prepared.operation == "chat" else (completion.usage or conservative_usage(call, ""))
        try:
            await asyncio.shield(self.settle(prepared, usage, completion.body))  # settle even if cancelled
        except Conflict:
            raise
        except Exception as exc:  # never leave the reservation behind
            await self.fail(prepared, ProviderError(f"settlement failed: {type(exc).__name__}"), usage)
            raise

    async def run(self, actor: Actor, cmd: SpendCommand, idempotency_key: str | None = None) -> SpendResult:
        """POST /api/v1/requests: prepare → call the provider → settle. 200 executed, 202 held."""
        try:
            prepared = await self.prepare(actor, cmd, source="api", idempotency_key=idempotency_key)
        except ApprovalRequired as held:
            return SpendResult(status_code=202, request=await self.get(actor, held.details["request_id"]))
        await self._execute_and_settle(prepared)
        return SpendResult(status_code=200, request=await self.get(actor, prepared.request_id))

    # ------------------------------------------------------------ approvals
    async def approve(self, actor: Actor, request_id: str, reason: str | None = None) -> SpendRequest:
        """An owner/admin approves a held request. REST requests (source api) run at once and the
        executed request is returned; gateway requests are released to their waiting caller."""
        now = self.clock()
        async with self.uow(actor) as scope:
            row = await self._held(scope, request_id)
            run_now = row.source != "gateway"
            row = await scope.store.spend_requests.transition(
                request_id, ("pending_approval",), status="executing" if run_now else "approved",
                resolved_by=actor.label, reservation_expires_at=now + self.reservation_ttl)
            if row is None:
                raise Conflict("the request was resolved meanwhile", {"request_id": request_id})
            scope.emit(row.project_id, "approval.resolved", {
                "request_id": request_id, "resolution": "approved", "by": actor.label, "reason": reason})
        if run_now:
            with contextlib.suppress(DomainError):  # a failed run is recorded on the request, shown below
                await self._execute_and_settle(self._prepared(row))
        return await self.get(actor, request_id)

    async def reject(self, actor: Actor, request_id: str, reason: str | None = None) -> SpendRequest:
        async with self.uow(actor) as scope:
            await self._held(scope, request_id)
            error = ApprovalRejected(f"rejected by {actor.label}" + (f": {reason}" if reason else ""),
                                     {"request_id": request_id, "reason": reason})
            row = await scope.store.spend_requests.transition(
                request_id, ("pending_approval",), status="rejected", resolved_by=actor.label,
                error=_error_json(error), reservation_expires_at=None)
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

    # ------------------------------------------------------------ reads
    async def get(self, actor: Actor, request_id: str) -> SpendRequest:
        async with self.reader(actor) as scope:
            return await get_request(scope, request_id)

    # ------------------------------------------------------------ sweeper
    async def sweep(self, limit: int = 100) -> int:
        """Release reservations whose time is up: unanswered approvals → expired, executing/approved
        requests abandoned past reservation_expires_at → failed. Returns how many were released."""
        now = self.clock()
        async with self.uow(SYSTEM) as scope:
            stale = await scope.store.spend_requests.stale(now, limit)
            for row in stale:
                expired = row.status in ("pending_approval", "approved")
                error = {"code": "approval_expired" if row.status == "pending_approval" else "reservation_expired",
                         "message": "nobody approved the request in time" if row.status == "pending_approval"
                         else "the reservation expired before the request settled", "details": {}}
                done = await scope.store.spend_requests.transition(
                    row.id, (row.status,), status="expired" if expired else "failed", error=error,
                    reservation_expires_at=None)
                if done is None:
                    continue
                await self._release(scope, done)
                if row.status == "pending_approval":
                    scope.emit(row.project_id, "approval.resolved", {
                        "request_id": row.id, "resolution": "expired", "by": SYSTEM.label, "reason": None})
                else:
                    scope.emit(row.project_id, "request.failed", {"request_id": row.id, "error": error,
                                                                  "cost_micros": 0})
        return len(stale)

    @contextlib.asynccontextmanager
    async def sweeper(self, interval_seconds: float) -> AsyncIterator[asyncio.Task]:
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


async def get_request(scope: Scope, request_id: str) -> SpendRequest:
    row = await scope.store.spend_requests.get(request_id)
    if row is None:
        raise NotFound("request not found", {"request_id": request_id})
    try:
        await scope.projects.require(row.project_id, "viewer")
    except Forbidden:
        raise NotFound("request not found", {"request_id": request_id}) from None
    return row


async def list_requests(scope: Scope, project_id: str, page: PageRequest, status: str | None) -> Page[SpendRequest]:
    await scope.projects.require(project_id, "viewer")
    if status is not None and status not in STATUSES:
        raise InvalidRequest(f"status must be one of {', '.join(STATUSES)}", {"status": status})
    return await scope.store.spend_requests.list(project_id, page, status)
