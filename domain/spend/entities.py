"""Spend requests: statuses, commands, what is stored and shown, receipts, the events each
transition raises, and the errors particular to spending."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal, Protocol

import msgspec
from msgspec import Meta

from domain.base import SYSTEM, Actor
from domain.catalog import MTOK
from domain.decisions import Decision
from domain.errors import (
    BudgetExceeded,
    DomainError,
    Forbidden,
    InsufficientFunds,
    InvalidRequest,
    NotFound,
    PolicyViolation,
    RateLimited,
    Unauthorized,
)
from domain.events import PendingEvent
from domain.providers import ProviderCall, Usage

if TYPE_CHECKING:
    pass

log = logging.getLogger("smartspace.spend")


BPS = 10_000  # basis points in one whole


def fee_micros(cost_micros: int, fee_bps: int) -> int:
    """The platform's fee on a cost: ``fee_bps`` basis points of it, rounded UP to the next micro-USDC (like
    costs). The one place the fee is computed (the brain's worst case, settle, fail)."""
    if cost_micros <= 0 or fee_bps <= 0:
        return 0
    return -(-cost_micros * fee_bps // BPS)


def with_fee(cost_micros: int, fee_bps: int) -> int:
    """What a cost costs the project: the cost and its fee."""
    return cost_micros + fee_micros(cost_micros, fee_bps)


OPEN_STATUSES = ("pending_approval", "approved", "executing")
FINAL_STATUSES = ("settled", "rejected", "failed", "expired")
STATUSES = (*OPEN_STATUSES, *FINAL_STATUSES)


# ---------------------------------------------------------------- commands and results
class SpendCommand(msgspec.Struct, kw_only=True):
    model: str
    operation: str = "chat"
    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    input: str | list[str] | None = None
    max_tokens: int | None = None
    agent_id: str | None = None
    metadata: dict[str, Any] = {}
    params: dict[str, Any] = {}
    stream: bool = False
    project_id: str | None = None  # needed with a user token; an API key's project otherwise


class RequestCreate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The body of POST /api/v1/requests."""

    model: Annotated[str, Meta(min_length=1, max_length=200)]
    messages: Annotated[list[dict[str, Any]], Meta(min_length=1, max_length=1000)] | None = None
    prompt: Annotated[str, Meta(min_length=1)] | None = None
    input: str | list[str] | None = None
    operation: Literal["chat", "embedding"] = "chat"
    max_tokens: Annotated[int, Meta(ge=1, le=1_000_000)] | None = None
    agent_id: str | None = None
    project_id: str | None = None
    metadata: dict[str, Any] = {}
    params: dict[str, Any] = {}

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
    messages: list[dict[str, Any]] | None = None
    input: str | list[str] | None = None
    params: dict[str, Any] = {}
    stream: bool = False
    decision: Decision | None = None
    fee_bps: int = 0  # the platform fee rate at decision time

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

    def charge(self, usage: Usage) -> tuple[int, int]:
        """(cost, fee) for ``usage``; together never more than reserved (an actual cost above the worst case
        is charged the reservation, split between cost and fee at the fee rate)."""
        cost = self.cost(usage)
        fee = fee_micros(cost, self.fee_bps)
        if cost + fee <= self.reserved_micros:
            return cost, fee
        cost = self.reserved_micros * BPS // (BPS + max(0, self.fee_bps))
        return cost, self.reserved_micros - cost


class Receipt(msgspec.Struct, kw_only=True):
    request_id: str
    model: str
    input_tokens: int
    output_tokens: int
    estimated_cost_micros: int  # the worst case reserved: cost and fee
    cost_micros: int  # the provider's price of the usage
    settled_at: datetime
    tx_hash: str | None = None
    fee_micros: int = 0  # the platform fee (SMARTSPACE_PLATFORM_FEE_BPS); the wallet paid cost + fee


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
    decision: dict[str, Any] | None
    params: dict[str, Any]
    metadata: dict[str, Any]
    estimated_cost_micros: int
    reserved_micros: int
    cost_micros: int | None
    input_tokens: int | None
    output_tokens: int | None
    risk_score: float | None
    budget_ids: list[str]
    error: dict[str, Any] | None
    idempotency_key: str | None
    response: dict[str, Any] | None
    reservation_expires_at: datetime | None
    approval_expires_at: datetime | None
    resolved_by: str | None
    tx_hash: str | None
    settlement_batch_id: str | None
    created_at: datetime
    settled_at: datetime | None
    receipt: Receipt | None = None
    fee_micros: int | None = None

    def __post_init__(self) -> None:
        if self.status == "settled" and self.settled_at is not None and self.receipt is None:
            self.receipt = Receipt(request_id=self.id, model=self.model, input_tokens=self.input_tokens or 0,
                                   output_tokens=self.output_tokens or 0,
                                   estimated_cost_micros=self.estimated_cost_micros,
                                   cost_micros=self.cost_micros or 0, settled_at=self.settled_at,
                                   tx_hash=self.tx_hash, fee_micros=self.fee_micros or 0)


class SpendResult(msgspec.Struct, kw_only=True):
    status_code: int  # 200 executed, 202 held for review
    request: SpendRequest


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
    response: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    settled_at: datetime | None = None
    fee_micros: int = 0  # charged on top of cost_micros (wallet and budgets pay both)


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


def actor_from_label(label: str) -> Actor:
    kind, _, id_ = label.partition(":")
    if kind not in ("user", "key", "system") or not id_:
        return SYSTEM
    return Actor(kind=kind, id=id_, user_id=id_ if kind == "user" else None)  # type: ignore[arg-type]


def decision_json(decision: Decision) -> dict[str, Any]:
    return {"outcome": decision.outcome, "reasons": msgspec.to_builtins(decision.reasons),
            "risk_score": decision.risk_score, "risk_factors": msgspec.to_builtins(decision.risk_factors),
            "estimated_cost_micros": decision.estimated_cost_micros, "model": decision.model, "tier": decision.tier,
            "error_code": decision.error_code, "policy_version": decision.policy_version}


def created_events(row: SpendRequest) -> list[PendingEvent]:
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


def approval_requested_events(row: SpendRequest, decision: Decision) -> list[PendingEvent]:
    return [PendingEvent(row.project_id, "approval.requested", {
        "request_id": row.id, "model": row.model, "agent_id": row.agent_id, "actor": row.actor,
        "estimated_cost_micros": row.reserved_micros, "risk_score": decision.risk_score,
        "reasons": msgspec.to_builtins(decision.reasons),
        "expires_at": row.approval_expires_at.isoformat() if row.approval_expires_at else None})]


def settled_event(row: SpendRequest | Prepared, receipt: Receipt) -> PendingEvent:
    cost = receipt.cost_micros + receipt.fee_micros
    return PendingEvent(row.project_id, "request.settled", {
        "request_id": receipt.request_id, "receipt": msgspec.to_builtins(receipt), "agent_id": row.agent_id,
        "variance_micros": row.estimated_cost_micros - cost, "released_micros": row.reserved_micros - cost})


def failed_event(project_id: str, request_id: str, error: dict[str, Any], cost: int, fee: int = 0) -> PendingEvent:
    data: dict[str, Any] = {"request_id": request_id, "error": error, "cost_micros": cost}
    if fee:
        data["fee_micros"] = fee
    return PendingEvent(project_id, "request.failed", data)
