"""Budgets: spending limits per project, per agent or per API key, over a UTC calendar period, with alerts.

Periods are ``day`` (00:00 UTC), ``week`` (Monday 00:00 UTC), ``month`` (the 1st, 00:00 UTC) and
``total`` (never resets). A budget whose ``period_start`` lies before the current period is rolled
forward lazily — by the next reservation, or by anyone reading it — with one conditional UPDATE:
``spent`` and the alerts start again at zero, open reservations carry over (they were made against
the budget and are settled against it).

Every reservation is one conditional UPDATE per budget row: ``reserved += n WHERE spent + reserved
+ n <= limit``; the table's CHECK constraint says the same, so no path can overspend.
``budget.threshold`` is emitted once per threshold per period, when settled spending crosses it.
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any, Literal, Protocol

import msgspec
from msgspec import UNSET, Meta, UnsetType

from domain.base import Page, PageRequest, new_id, utcnow
from domain.errors import BudgetExceeded, Conflict, InvalidRequest, NotFound

if TYPE_CHECKING:
    from domain.scope import Scope

Period = Literal["day", "week", "month", "total"]
Threshold = Annotated[int, Meta(ge=1, le=100)]
Micros = Annotated[int, Meta(gt=0, le=10**15)]
DEFAULT_THRESHOLDS = [50, 80, 100]


def period_start(period: str, now: datetime) -> datetime | None:
    """Start of the period containing ``now`` (UTC calendar); None for ``total``."""
    now = now.astimezone(UTC)
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        return midnight
    if period == "week":
        return midnight - timedelta(days=midnight.weekday())
    if period == "month":
        return midnight.replace(day=1)
    return None


def period_end(period: str, start: datetime) -> datetime | None:
    """When the period that began at ``start`` ends (= the next one starts)."""
    if period == "day":
        return start + timedelta(days=1)
    if period == "week":
        return start + timedelta(days=7)
    if period == "month":
        return start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(
            month=start.month + 1)
    return None


def needs_roll(period: str, start: datetime, now: datetime) -> datetime | None:
    """The new period_start if the budget's period is over, else None."""
    current = period_start(period, now)
    return current if current is not None and start < current else None


class Budget(msgspec.Struct, kw_only=True):
    id: str
    project_id: str
    agent_id: str | None
    key_id: str | None = None  # a budget of one API key's requests
    name: str
    period: str
    limit_micros: int
    spent_micros: int
    reserved_micros: int
    period_start: datetime
    alert_thresholds: list[int]
    alerted: list[int]
    active: bool
    created_at: datetime
    updated_at: datetime
    available_micros: int = 0
    period_end: datetime | None = None

    def __post_init__(self) -> None:
        self.available_micros = self.limit_micros - self.spent_micros - self.reserved_micros
        self.period_end = period_end(self.period, self.period_start)

    def as_rolled(self, now: datetime) -> Budget:
        """How the budget reads at ``now`` (a read may see a period that has ended but not rolled yet)."""
        start = needs_roll(self.period, self.period_start, now)
        if start is None:
            return self
        return msgspec.structs.replace(self, period_start=start, spent_micros=0, alerted=[])


class BudgetCreate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: Annotated[str, Meta(min_length=1, max_length=200)]
    limit_micros: Micros
    period: Period
    agent_id: str | None = None
    key_id: str | None = None  # the budget caps one API key's requests (a virtual key's own budget)
    alert_thresholds: Annotated[list[Threshold], Meta(max_length=10)] = msgspec.field(
        default_factory=lambda: list(DEFAULT_THRESHOLDS))


class BudgetUpdate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: Annotated[str, Meta(min_length=1, max_length=200)] | UnsetType = UNSET
    limit_micros: Micros | UnsetType = UNSET
    alert_thresholds: Annotated[list[Threshold], Meta(max_length=10)] | UnsetType = UNSET


class BudgetRepo(Protocol):
    async def insert(self, budget: Budget) -> Budget: ...
    async def get(self, id_: str) -> Budget | None: ...
    async def list(self, project_id: str, page: PageRequest, agent_id: str | None = None) -> Page[Budget]: ...
    async def applicable(self, project_id: str, agent_id: str | None,
                         key_id: str | None = None) -> builtins.list[Budget]: ...
    async def by_ids(self, ids: builtins.list[str]) -> builtins.list[Budget]: ...
    async def roll(self, id_: str, new_start: datetime, now: datetime) -> Budget | None: ...
    async def reserve(self, id_: str, amount: int, now: datetime) -> Budget | None: ...
    async def release(self, id_: str, amount: int, now: datetime) -> Budget | None: ...
    async def settle(self, id_: str, held: int, cost: int, now: datetime) -> Budget | None: ...
    async def set_limit(self, id_: str, limit: int, now: datetime) -> Budget | None: ...
    async def update(self, id_: str, **values: Any) -> Budget | None: ...


def _figures(budget: Budget) -> dict[str, Any]:
    figures: dict[str, Any] = msgspec.to_builtins(budget)
    return figures


class Budgets:
    """``scope.budgets``: CRUD for admins (viewers read), and the reservation primitives spend uses."""

    def __init__(self, scope: Scope) -> None:
        self.scope = scope
        self.repo: BudgetRepo = scope.store.budgets

    # ------------------------------------------------------------ CRUD
    async def create(self, project_id: str, cmd: BudgetCreate) -> Budget:
        await self.scope.projects.require(project_id, "admin")
        if cmd.agent_id is not None and cmd.key_id is not None:
            raise InvalidRequest("a budget is scoped to an agent or to a key, not both (a key's budget applies "
                                 "to its agent's requests made with it)", {"field": "key_id"})
        if cmd.agent_id is not None:
            await self.scope.agents.get(project_id, cmd.agent_id)
        if cmd.key_id is not None:
            key = await self.scope.keys.get(project_id, cmd.key_id)
            if key.revoked_at is not None:
                raise InvalidRequest("the key is revoked: a budget for it would never apply",
                                     {"field": "key_id", "key_id": cmd.key_id})
        now = utcnow()
        budget = Budget(id=new_id("bud"), project_id=project_id, agent_id=cmd.agent_id, key_id=cmd.key_id,
                        name=cmd.name,
                        period=cmd.period, limit_micros=cmd.limit_micros, spent_micros=0, reserved_micros=0,
                        period_start=period_start(cmd.period, now) or now,
                        alert_thresholds=sorted(set(cmd.alert_thresholds)), alerted=[], active=True,
                        created_at=now, updated_at=now)
        await self.repo.insert(budget)
        self._updated(budget, "created")
        return budget

    async def list(self, project_id: str, page: PageRequest, agent_id: str | None = None) -> Page[Budget]:
        await self.scope.projects.require(project_id, "viewer")
        result = await self.repo.list(project_id, page, agent_id)
        now = utcnow()
        result.items = [b.as_rolled(now) for b in result.items]
        return result

    async def get(self, project_id: str, budget_id: str) -> Budget:
        await self.scope.projects.require(project_id, "viewer")
        return (await self._budget(project_id, budget_id)).as_rolled(utcnow())

    async def update(self, project_id: str, budget_id: str, cmd: BudgetUpdate) -> Budget:
        await self.scope.projects.require(project_id, "admin")
        budget = await self._budget(project_id, budget_id)
        now = utcnow()
        changes: dict[str, Any] = {}
        if cmd.name is not UNSET:
            changes["name"] = cmd.name
        if cmd.alert_thresholds is not UNSET:
            changes["alert_thresholds"] = sorted(set(cmd.alert_thresholds))
        if cmd.limit_micros is UNSET and not changes:
            raise InvalidRequest("nothing to change: send name, limit_micros or alert_thresholds")
        await self.roll(budget, now)
        if cmd.limit_micros is not UNSET:
            rows = await self.repo.set_limit(budget_id, cmd.limit_micros, now)
            if rows is None:
                current = await self.repo.get(budget_id)
                assert current is not None  # found above, in this transaction
                raise Conflict("the new limit is below what is already spent and reserved this period",
                               {"limit_micros": cmd.limit_micros, "spent_micros": current.spent_micros,
                                "reserved_micros": current.reserved_micros})
        changed = await self.repo.update(budget_id, **changes, updated_at=now) if changes else \
            await self.repo.get(budget_id)
        assert changed is not None
        self._updated(changed, "updated")
        await self.check_thresholds(changed)
        final = await self.repo.get(budget_id)
        assert final is not None
        return final

    async def delete(self, project_id: str, budget_id: str) -> None:
        """Deactivate: it stops applying at once; open reservations against it still settle/release."""
        await self.scope.projects.require(project_id, "admin")
        await self._budget(project_id, budget_id)
        budget = await self.repo.update(budget_id, active=False, updated_at=utcnow())
        assert budget is not None
        self._updated(budget, "deleted")

    async def _budget(self, project_id: str, budget_id: str) -> Budget:
        budget = await self.repo.get(budget_id)
        if budget is None or budget.project_id != project_id or not budget.active:
            raise NotFound("budget not found", {"budget_id": budget_id})
        return budget

    # ------------------------------------------------------------ reservation primitives
    async def roll(self, budget: Budget, now: datetime) -> Budget:
        start = needs_roll(budget.period, budget.period_start, now)
        if start is None:
            return budget
        rolled = await self.repo.roll(budget.id, start, now)
        if rolled is None:  # someone rolled it first
            return await self.repo.get(budget.id) or budget
        self.scope.emit(budget.project_id, "budget.reset", {"budget_id": budget.id, "period": budget.period,
                                                            "period_start": start.isoformat()})
        self._updated(rolled, "reset")
        return rolled

    async def applicable(self, project_id: str, agent_id: str | None,
                         key_id: str | None = None) -> builtins.list[Budget]:
        """Active budgets that apply to a request of ``agent_id`` made with ``key_id`` (project-wide, the
        agent's, the key's), by id."""
        return await self.repo.applicable(project_id, agent_id, key_id)

    async def remaining(self, budget_ids: Sequence[str]) -> int | None:
        """What the tightest of these (active) budgets has left now, ``limit - spent - reserved`` in this
        period; None when none applies. The gateway's ``x-smartspace-budget-remaining-micros``."""
        if not budget_ids:
            return None
        now = utcnow()
        return min((b.as_rolled(now).available_micros for b in await self.repo.by_ids(list(budget_ids))),
                   default=None)

    async def reserve_all(self, project_id: str, agent_id: str | None, amount: int, *, ref: str,
                          now: datetime, budgets: builtins.list[Budget] | None = None,
                          key_id: str | None = None) -> builtins.list[Budget]:
        """Reserve ``amount`` on every active budget that applies (project-wide, this agent's, this key's), in id
        order (consistent lock order across processes). Raises BudgetExceeded on the first that has
        no room — the caller's transaction then rolls back every hold it made. ``budgets``: the
        applicable list if the caller read it already (before taking the wallet's row lock)."""
        if budgets is None:
            budgets = await self.repo.applicable(project_id, agent_id, key_id)
        held: list[Budget] = []
        for budget in sorted(budgets, key=lambda b: b.id):
            budget = await self.roll(budget, now)
            after = await self.repo.reserve(budget.id, amount, now)
            if after is None:
                current = await self.repo.get(budget.id) or budget
                if not current.active:  # deleted since it was read: it no longer applies
                    continue
                raise BudgetExceeded(
                    f"the budget {current.name!r} has {max(0, current.available_micros)} micro-USDC left "
                    f"this period; this request needs {amount}",
                    {"budget_id": current.id, "budget_name": current.name, "period": current.period,
                     "limit_micros": current.limit_micros, "spent_micros": current.spent_micros,
                     "reserved_micros": current.reserved_micros, "requested_micros": amount, "ref": ref})
            held.append(after)
            self._updated(after, "reserved", amount=amount, ref=ref)
        return held

    async def release_all(self, budget_ids: Sequence[str], amount: int, *, ref: str) -> None:
        if amount <= 0:
            return
        now = utcnow()
        for budget_id in sorted(budget_ids):
            after = await self.repo.release(budget_id, amount, now)
            if after is not None:
                self._updated(after, "released", amount=amount, ref=ref)

    async def settle_all(self, budget_ids: Sequence[str], held: int, cost: int, *, ref: str) -> None:
        """reserved -= held, spent += cost (cost <= held) on each budget; then threshold alerts."""
        assert 0 <= cost <= held
        if held == 0:
            return
        now = utcnow()
        for budget_id in sorted(budget_ids):
            after = await self.repo.settle(budget_id, held, cost, now)
            if after is None:
                continue
            self._updated(after, "settled", amount=cost, released_micros=held - cost, ref=ref)
            await self.check_thresholds(after)

    async def check_thresholds(self, budget: Budget) -> None:
        """Emit budget.threshold for each threshold the settled spending has reached and that was not
        alerted yet this period. The row is locked by the caller's UPDATE, so this cannot double-fire."""
        crossed = crossed_thresholds(budget)
        if not crossed:
            return
        await self.repo.update(budget.id, alerted=sorted({*budget.alerted, *crossed}))
        for threshold in crossed:
            self.scope.emit(budget.project_id, "budget.threshold", threshold_reached(budget, threshold))

    def _updated(self, budget: Budget, change: str, **extra: Any) -> None:
        self.scope.emit(budget.project_id, "budget.updated", budget_updated(budget, change, **extra))


# ---------------------------------------------------------------- event data (shared by every money path)
def budget_updated(budget: Budget, change: str, **extra: Any) -> dict[str, Any]:
    return {"budget": _figures(budget), "change": {"kind": change, **extra}}


def crossed_thresholds(budget: Budget) -> list[int]:
    """Alert thresholds (percent) the settled spending has reached and that were not alerted this period."""
    if budget.limit_micros <= 0:
        return []
    return [t for t in budget.alert_thresholds
            if t not in budget.alerted and budget.spent_micros * 100 >= t * budget.limit_micros]


def threshold_reached(budget: Budget, threshold: int) -> dict[str, Any]:
    return {"budget_id": budget.id, "name": budget.name, "agent_id": budget.agent_id, "key_id": budget.key_id,
            "threshold": threshold, "period": budget.period,
            "period_start": budget.period_start.isoformat(), "limit_micros": budget.limit_micros,
            "spent_micros": budget.spent_micros, "reserved_micros": budget.reserved_micros,
            "percent_used": round(budget.spent_micros * 100 / budget.limit_micros, 2)}
