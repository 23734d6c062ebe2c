"""An in-memory BrainView: the edge of the brain, for decision-table tests."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

import msgspec

from domain.catalog import SEED, CatalogModel
from domain.decisions import (
    Activity,
    AgentState,
    BudgetState,
    KeyState,
    ProjectState,
    SpendInput,
    WalletState,
)
from domain.policies import ProjectPolicy, SystemPolicy
from domain.ratelimit import RateLimit

NOW = datetime(2026, 11, 25, 12, 30, tzinfo=UTC)  # a Wednesday (weekday 2)
PROJECT = "prj_1"
USDC = 1_000_000


@dataclass
class FakeView:
    default_output_tokens: int = 1024
    projects: dict[str, ProjectState] = field(default_factory=lambda: {PROJECT: ProjectState(id=PROJECT,
                                                                                             status="active")})
    keys: dict[str, KeyState] = field(default_factory=lambda: {
        "key_1": KeyState(id="key_1", project_id=PROJECT, agent_id=None, revoked=False)})
    agents: dict[str, AgentState] = field(default_factory=lambda: {
        "agt_1": AgentState(id="agt_1", project_id=PROJECT, status="active"),
        "agt_2": AgentState(id="agt_2", project_id=PROJECT, status="active")})
    catalog: list[CatalogModel] = field(default_factory=lambda: [msgspec.structs.replace(m) for m in SEED])
    system: SystemPolicy = field(default_factory=SystemPolicy)
    policy: ProjectPolicy = field(default_factory=ProjectPolicy)
    version: int = 0
    wallet_state: WalletState | None = field(default_factory=lambda: WalletState(balance_micros=1000 * USDC,
                                                                                 reserved_micros=0))
    budget_list: list[BudgetState] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)  # bucket -> requests already in the window
    recent: Activity = field(default_factory=Activity)
    peeked: list[list[RateLimit]] = field(default_factory=list)

    async def project(self, project_id: str) -> ProjectState | None:
        return self.projects.get(project_id)

    async def key(self, key_id: str) -> KeyState | None:
        return self.keys.get(key_id)

    async def agent(self, agent_id: str) -> AgentState | None:
        return self.agents.get(agent_id)

    async def models(self, model: str) -> list[CatalogModel]:
        exact = [m for m in self.catalog if m.id == model]
        return exact or [m for m in self.catalog if m.name == model]

    async def system_policy(self) -> SystemPolicy:
        return self.system

    async def project_policy(self, project_id: str) -> tuple[ProjectPolicy, int]:
        return self.policy, self.version

    async def wallet(self, project_id: str) -> WalletState | None:
        return self.wallet_state

    async def budgets(self, project_id: str) -> list[BudgetState]:
        return list(self.budget_list)

    async def rate_counts(self, limits: list[RateLimit], now: datetime) -> list[int]:
        self.peeked.append(list(limits))
        return [self.counts.get(limit.bucket, 0) for limit in limits]

    async def activity(self, project_id: str, now: datetime) -> Activity:
        return self.recent

    def set_policy(self, **rules) -> None:
        self.policy = msgspec.structs.replace(self.policy, **rules)

    def set_system(self, **rules) -> None:
        self.system = msgspec.structs.replace(self.system, **rules)


def request(**overrides) -> SpendInput:
    """1000 input + 1000 output tokens on gpt-4o-mini: 150 + 600 = 750 µUSDC."""
    values = dict(project_id=PROJECT, key_id="key_1", agent_id=None, actor="key:key_1",
                  model="openai/gpt-4o-mini", operation="chat", input_tokens=1000, max_output_tokens=1000,
                  metadata={})
    values.update(overrides)
    return SpendInput(**values)


def budget(limit: int, spent: int = 0, reserved: int = 0, period: str = "month", agent_id: str | None = None,
           period_start: datetime | None = None, id_: str = "bud_1") -> BudgetState:
    return BudgetState(id=id_, name=id_, agent_id=agent_id, period=period, limit_micros=limit, spent_micros=spent,
                       reserved_micros=reserved, period_start=period_start or datetime(2026, 11, 1, tzinfo=UTC))
