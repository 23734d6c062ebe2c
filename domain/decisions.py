"""What the agentic brain takes in, what it gives back, and the read-only view it decides from.

``agentic.pipeline.decide(view, req, now)`` turns a :class:`SpendInput` into a :class:`Decision`.
It never writes: everything it knows comes through a :class:`BrainView`, which ``storage/brain.py``
implements over a read-only database session (and a rate limiter it only peeks at).
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal, Protocol

import msgspec

from domain.catalog import CatalogModel
from domain.ratelimit import RateLimit

if TYPE_CHECKING:
    from domain.policies import ProjectPolicy, SystemPolicy

Outcome = Literal["APPROVED", "REQUIRES_REVIEW", "REJECTED"]


class SpendInput(msgspec.Struct, kw_only=True):
    project_id: str
    key_id: str | None
    agent_id: str | None
    actor: str
    model: str  # as given: "provider/model" or an unambiguous bare id
    operation: str  # "chat" | "embedding"
    input_tokens: int
    max_output_tokens: int | None
    metadata: dict[str, Any] = {}
    fee_bps: int = 0  # the platform fee: the worst case (estimated_cost_micros) includes it


class Reason(msgspec.Struct, kw_only=True):
    code: str  # snake_case, stable: e.g. "provider_blocked", "budget_exceeded", "within_policy"
    message: str
    step: str  # structure | identity | system_policy | project_policy | rate_limit | time_window | cost
    # | funds | risk | outcome


class RiskFactor(msgspec.Struct, kw_only=True):
    type: str
    description: str
    contribution: float
    severity: str  # low | medium | high


class Decision(msgspec.Struct, kw_only=True):
    outcome: Outcome
    reasons: list[Reason]
    risk_score: float
    risk_factors: list[RiskFactor]
    estimated_cost_micros: int
    model: str | None  # resolved "provider/model"
    # API code for a rejection: policy_violation | budget_exceeded | insufficient_funds | rate_limited |
    # invalid_request | not_found
    error_code: str | None = None
    retry_after_seconds: int | None = None
    tier: str = "FLASH"  # FLASH | PRO
    # Additive to the contract: what the spend service needs next without re-reading.
    provider: str | None = None
    upstream_model: str | None = None
    max_output_tokens: int = 0  # the output tokens the estimate assumed
    rate_limits: list[RateLimit] = []  # the windows to acquire atomically when reserving
    budget_ids: list[str] = []  # every budget that applies to this request
    policy_version: int = 0
    # the resolved model's prices the estimate used (the spend service prices the receipt with them)
    input_micros_per_mtok: int | None = None
    output_micros_per_mtok: int | None = None

    @property
    def approved(self) -> bool:
        return self.outcome == "APPROVED"

    @property
    def message(self) -> str:
        return self.reasons[0].message if self.reasons else self.outcome.lower()


# ---------------------------------------------------------------- what the brain reads
class ProjectState(msgspec.Struct, kw_only=True):
    id: str
    status: str  # active | suspended | deleted


class KeyState(msgspec.Struct, kw_only=True):
    id: str
    project_id: str
    agent_id: str | None
    revoked: bool
    expires_at: datetime | None = None
    allowed_models: list[str] | None = None  # "provider/model"; None: every model
    rate_limits: dict[str, int | None] = {}  # the key's own {per_minute?, per_hour?, per_day?}


class AgentState(msgspec.Struct, kw_only=True):
    id: str
    project_id: str
    status: str


class WalletState(msgspec.Struct, kw_only=True):
    balance_micros: int
    reserved_micros: int

    @property
    def available_micros(self) -> int:
        return self.balance_micros - self.reserved_micros


class BudgetState(msgspec.Struct, kw_only=True):
    id: str
    name: str
    agent_id: str | None  # None: project-wide
    period: str  # day | week | month | total
    limit_micros: int
    spent_micros: int
    reserved_micros: int
    period_start: datetime
    key_id: str | None = None  # set: the budget of one API key's requests


class Activity(msgspec.Struct, kw_only=True):
    """The project's recent behaviour: the 30-day baseline plus today's counters.

    ``samples`` counts settled requests in the 30 days before ``now``; below 10 the baseline is
    ignored by the risk model (the original's rule)."""

    samples: int = 0
    avg_cost_micros: int = 0
    avg_requests_per_day: float = 0.0
    providers: list[str] = []  # seen in the baseline
    models: list[str] = []
    hours: list[int] = []  # UTC hours seen in the baseline
    agents: list[str] = []
    requests_today: int = 0  # since 00:00 UTC, any outcome
    spent_today_micros: int = 0  # settled cost + open reservations since 00:00 UTC
    recent_rejections: int = 0  # rejected in the last 24 hours


class BrainView(Protocol):
    """Everything the brain may know, read-only. Implemented by ``storage.brain.SqlBrainView``."""

    default_output_tokens: int

    async def project(self, project_id: str) -> ProjectState | None: ...
    async def key(self, key_id: str) -> KeyState | None: ...
    async def agent(self, agent_id: str) -> AgentState | None: ...
    async def models(self, model: str) -> list[CatalogModel]:
        """Catalog rows that could be meant: the exact id, else every model with that bare name."""
        ...
    async def system_policy(self) -> SystemPolicy: ...
    async def project_policy(self, project_id: str) -> tuple[ProjectPolicy, int]:
        """The current policy and its version (0 = the defaults, never saved)."""
        ...
    async def wallet(self, project_id: str) -> WalletState | None: ...
    async def budgets(self, project_id: str) -> list[BudgetState]:
        """Active budgets of the project (project-wide and per agent)."""
        ...
    async def rate_counts(self, limits: list[RateLimit], now: datetime) -> list[int]:
        """How many requests each window already holds (a peek: never counts this one)."""
        ...
    async def activity(self, project_id: str, now: datetime) -> Activity: ...


class Brain(Protocol):
    """What the spend service calls: run the brain on a read-only view (``storage.brain.SqlBrain``)."""

    async def decide(self, req: SpendInput, now: datetime) -> Decision: ...
