"""Insights: the agentic brain's findings (forecasts, anomalies, advice), persisted and pushed live.

``agentic/insights.py`` turns a read-only :class:`ProjectActivity` into :class:`Finding` s and never
writes. This module persists them through the unit of work: a finding with no open insight of its kind
and subject raises one (``insight.created``), a persisting one updates it (``insight.updated``), and an
open insight whose condition cleared is resolved (``insight.resolved``) — events appended in the same
transaction, published after commit. "One open insight per kind and subject" is a partial unique index
(storage/models.py), so the insert is ``… ON CONFLICT DO NOTHING``, never a check-then-insert.
A dismissed insight keeps its slot until its condition clears, so it is not raised again meanwhile.

:class:`InsightRunner` decides when a project is evaluated: after the events that can change a
conclusion (debounced per project), and on a schedule for the time-based kinds. On PostgreSQL the
evaluation runs under a per-project advisory lock taken first, so exactly one process evaluates a
project at a time, and a process that heard an event another one already covered skips it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any, Literal, Protocol

import msgspec
from msgspec import Meta

from domain.base import SYSTEM, Actor, Page, PageRequest, new_id, utcnow
from domain.catalog import PLATFORM_PROJECT, CatalogModel
from domain.errors import Conflict, InvalidRequest, NotFound
from domain.events import Event

if TYPE_CHECKING:
    from domain.scope import Scope

log = logging.getLogger("smartspace.insights")

KINDS = ("budget_forecast", "wallet_runway", "cost_spike", "request_spike", "rejection_burst", "cost_overrun",
         "unusual_model", "cheaper_model", "idle_key")
EVALUATED_KINDS = frozenset(KINDS) - {"cost_overrun"}  # cost_overrun is recorded at settle, never "clears"
STATUSES = ("open", "acknowledged", "dismissed", "resolved")
Severity = Literal["info", "warning", "critical"]
ALERTED = ("warning", "critical")

# The events after which a project's conclusions may have changed.
TRIGGERS = frozenset({"request.decided", "request.settled", "request.failed", "approval.resolved",
                      "budget.updated", "budget.threshold", "wallet.updated", "deposit.credited",
                      "key.created", "key.revoked"})


# ---------------------------------------------------------------- what the brain reads and returns
class Thresholds(msgspec.Struct, frozen=True, kw_only=True):
    """When each kind fires (SMARTSPACE_INSIGHT_*; API.md's defaults)."""

    runway_hours: float = 72.0
    spike_ratio: float = 3.0
    spike_min_requests: int = 10
    baseline_days: int = 30
    rejection_count: int = 10
    rejection_window_seconds: int = 600
    idle_key_days: int = 30
    cheaper_window_days: int = 7
    cheaper_min_saving_micros: int = 10_000
    cheaper_min_saving_ratio: float = 0.2


BURN_BUCKETS = 6  # the burn rate: the last hour in 10-minute buckets, the busiest one left out
BUCKET_SECONDS = 600
BASELINE_MIN_HOURS = 24.0  # a baseline "exists" once it covers a day
RECENT_MODEL_HOURS = 24  # unusual_model: used in the last day, absent from the 30 days before


class BudgetFigures(msgspec.Struct, kw_only=True):
    id: str
    name: str
    agent_id: str | None
    period: str
    limit_micros: int
    spent_micros: int
    reserved_micros: int
    period_end: datetime | None


class ModelUsage(msgspec.Struct, kw_only=True):
    """One model's requests in the baseline window, summed in SQL."""

    model: str
    provider: str
    operation: str
    first_at: datetime
    base_requests: int  # [baseline start, an hour ago)
    base_cost_micros: int
    hour_requests: int  # the last hour
    hour_cost_micros: int
    before_recent_requests: int  # [baseline start, a day ago)
    recent_requests: int  # the last day
    recent_cost_micros: int
    week_input_tokens: int  # the cheaper-model window, requests that were charged
    week_output_tokens: int
    week_cost_micros: int


class Rejections(msgspec.Struct, kw_only=True):
    agent_id: str | None
    key_id: str | None
    count: int
    top_reason: str
    top_message: str


class KeyUse(msgspec.Struct, kw_only=True):
    key_id: str
    name: str
    prefix: str
    created_at: datetime
    last_used_at: datetime | None


class ProjectActivity(msgspec.Struct, kw_only=True):
    """Everything the evaluator needs about one project at ``now``; bounded in size whatever the traffic."""

    project_id: str
    now: datetime
    active: bool
    available_micros: int
    budgets: list[BudgetFigures]
    burn: dict[str, list[int]]  # agent id ("" = no agent) -> cost per 10-minute bucket, oldest first
    models: list[ModelUsage]
    rejections: list[Rejections]
    idle_keys: list[KeyUse]
    catalog: list[CatalogModel]  # active models of the providers used in the cheaper-model window
    found: bool = True  # False: no such project in this database (an event from another deployment's bus)


class Subject(msgspec.Struct, kw_only=True, omit_defaults=True):
    budget_id: str | None = None
    agent_id: str | None = None
    key_id: str | None = None
    model: str | None = None
    request_id: str | None = None

    def key(self) -> str:
        """Canonical: the same subject always gives the same slot."""
        return "|".join(f"{f}={v}" for f in self.__struct_fields__ if (v := getattr(self, f)) is not None)


class Finding(msgspec.Struct, kw_only=True):
    kind: str
    severity: Severity
    title: str
    message: str
    evidence: dict[str, Any]
    subject: Subject


# ---------------------------------------------------------------- what is stored and shown
class Insight(msgspec.Struct, kw_only=True):
    id: str
    project_id: str
    kind: str
    severity: str
    title: str
    message: str
    evidence: dict[str, Any]
    subject: dict[str, Any]
    status: str
    created_at: datetime
    updated_at: datetime
    resolved_at: datetime | None = None
    note: str | None = None
    acted_by: str | None = None


class InsightAction(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The body of POST …/acknowledge and …/dismiss (optional)."""

    note: Annotated[str, Meta(max_length=500)] | None = None


class InsightRepo(Protocol):
    async def active(self, project_id: str) -> list[tuple[Insight, str]]: ...
    async def insert(self, insight: Insight, subject_key: str) -> bool: ...
    async def update(self, id_: str, **values: Any) -> Insight | None: ...
    async def get(self, id_: str) -> Insight | None: ...
    async def list(self, project_id: str, page: PageRequest, status: str | None, kind: str | None) -> Page[Insight]: ...
    async def try_lock(self, project_id: str) -> bool: ...
    async def last_evaluated(self, project_id: str) -> datetime | None: ...
    async def mark_evaluated(self, project_id: str, at: datetime) -> None: ...
    async def absorb(self, project_id: str, amount_micros: int, ref: str, memo: str, actor: str,
                     now: datetime) -> str: ...


class AlertSink(Protocol):
    """Outbound alerts (server/alerts.py): queued, never blocking the caller."""

    def send(self, insight: Insight) -> None: ...


def usd(micros: int) -> str:
    """Exact to the micro-USDC: 42 -> "$0.000042" (AI calls cost fractions of a cent)."""
    sign = "-" if micros < 0 else ""
    micros = abs(micros)
    return f"{sign}${micros // 1_000_000}.{micros % 1_000_000:06d}"


def insight_data(insight: Insight) -> dict[str, Any]:
    data: dict[str, Any] = msgspec.to_builtins(insight)
    return data


# ---------------------------------------------------------------- the service (scope.insights)
class Insights:
    def __init__(self, scope: Scope) -> None:
        self.scope = scope
        self.repo: InsightRepo = scope.store.insights  # type: ignore[attr-defined]

    # ------------------------------------------------------------ people
    async def list(self, project_id: str, page: PageRequest, status: str = "open",
                   kind: str | None = None) -> Page[Insight]:
        await self.scope.projects.require(project_id, "viewer")
        if status not in (*STATUSES, "all"):
            raise InvalidRequest(f"status must be one of {', '.join((*STATUSES, 'all'))}", {"status": status})
        if kind is not None and kind not in KINDS:
            raise InvalidRequest(f"kind must be one of {', '.join(KINDS)}", {"kind": kind})
        return await self.repo.list(project_id, page, None if status == "all" else status, kind)

    async def get(self, project_id: str, insight_id: str) -> Insight:
        await self.scope.projects.require(project_id, "viewer")
        insight = await self.repo.get(insight_id)
        if insight is None or insight.project_id != project_id:
            raise NotFound("insight not found", {"insight_id": insight_id})
        return insight

    async def acknowledge(self, project_id: str, insight_id: str, action: InsightAction) -> Insight:
        return await self._act(project_id, insight_id, "acknowledged", ("open",), action)

    async def dismiss(self, project_id: str, insight_id: str, action: InsightAction) -> Insight:
        return await self._act(project_id, insight_id, "dismissed", ("open", "acknowledged"), action)

    async def _act(self, project_id: str, insight_id: str, status: str, from_statuses: tuple[str, ...],
                   action: InsightAction) -> Insight:
        await self.scope.projects.require(project_id, "member")
        insight = await self.get(project_id, insight_id)
        if insight.status == status:
            return insight
        if insight.status not in from_statuses:
            raise Conflict(f"the insight is {insight.status}; it cannot be {status}",
                           {"insight_id": insight_id, "status": insight.status})
        updated = await self.repo.update(insight_id, status=status, note=action.note,
                                         acted_by=self.scope.actor.label, updated_at=utcnow())
        assert updated is not None
        self.scope.emit(project_id, "insight.updated", insight_data(updated))
        return updated

    # ------------------------------------------------------------ the brain's findings
    async def apply(self, project_id: str, findings: Sequence[Finding], now: datetime,
                    update_after: timedelta = timedelta(seconds=60)) -> None:
        """Raise, update and resolve the project's evaluated insights to match ``findings``."""
        active = {(i.kind, key): i for i, key in await self.repo.active(project_id)}
        seen: set[tuple[str, str]] = set()
        for finding in findings:
            slot = (finding.kind, finding.subject.key())
            seen.add(slot)
            current = active.get(slot)
            if current is None:
                await self._raise(project_id, finding, slot[1], now)
            elif current.status != "dismissed" and (
                    current.severity != finding.severity
                    or (current.message != finding.message and now - current.updated_at >= update_after)):
                updated = await self.repo.update(current.id, severity=finding.severity, title=finding.title,
                                                 message=finding.message, evidence=finding.evidence, updated_at=now)
                if updated is not None:
                    self.scope.emit(project_id, "insight.updated", insight_data(updated))
        for slot, current in active.items():
            if slot not in seen and current.kind in EVALUATED_KINDS:
                resolved = await self.repo.update(current.id, status="resolved", resolved_at=now, updated_at=now)
                if resolved is not None:
                    self.scope.emit(project_id, "insight.resolved", insight_data(resolved))

    async def _raise(self, project_id: str, finding: Finding, subject_key: str, now: datetime) -> Insight | None:
        insight = Insight(id=new_id("ins"), project_id=project_id, kind=finding.kind, severity=finding.severity,
                          title=finding.title, message=finding.message, evidence=finding.evidence,
                          subject=msgspec.to_builtins(finding.subject), status="open", created_at=now,
                          updated_at=now)
        if not await self.repo.insert(insight, subject_key):
            return None  # the slot is taken: another evaluation raised it first
        self.scope.emit(project_id, "insight.created", insight_data(insight))
        alerts = self.scope.deps.alerts
        if alerts is not None and insight.severity in ALERTED:
            self.scope.after_commit.append(_alert(alerts, insight))
        return insight

    # ------------------------------------------------------------ at settle
    async def record_overrun(self, *, project_id: str, request_id: str, model: str, agent_id: str | None,
                             reserved_micros: int, actual_micros: int) -> Insight | None:
        """A request cost more than was reserved and was charged only the reservation: book the
        uncharged rest on the platform's own ledger and raise ``cost_overrun`` — in the settling
        transaction, so the books balance at every commit."""
        uncharged = actual_micros - reserved_micros
        if uncharged <= 0:
            return None
        now = utcnow()
        entry_id = await self.repo.absorb(project_id, -uncharged, request_id, f"cost overrun on {model}"[:500],
                                          self.scope.actor.label, now)
        finding = Finding(
            kind="cost_overrun", severity="warning", title=f"A request on {model} cost more than was reserved",
            message=(f"Request {request_id} on {model} cost {usd(actual_micros)} but only {usd(reserved_micros)} "
                     f"was reserved, so {usd(uncharged)} was not charged to the project. Check the model's "
                     f"catalog prices and max_tokens: the estimate should cover the worst case."),
            evidence={"request_id": request_id, "reserved_micros": reserved_micros, "actual_micros": actual_micros,
                      "uncharged_micros": uncharged, "platform_entry_id": entry_id},
            subject=Subject(request_id=request_id, model=model, agent_id=agent_id))
        return await self._raise(project_id, finding, finding.subject.key(), now)


def _alert(alerts: AlertSink, insight: Insight) -> Callable[[], Awaitable[None]]:
    async def send() -> None:
        alerts.send(insight)

    return send


# ---------------------------------------------------------------- when the brain runs
ReadActivity = Callable[[str, datetime], Awaitable[ProjectActivity]]
Evaluate = Callable[[ProjectActivity, Thresholds], list[Finding]]
UowFactory = Callable[[Actor], contextlib.AbstractAsyncContextManager["Scope"]]
DueProjects = Callable[[datetime, int], Awaitable[list[str]]]
COVERED_MARGIN = timedelta(seconds=0.5)  # clock tolerance when skipping an event another process covered


class InsightRunner:
    """Evaluates projects after their events (debounced) and on a schedule. ``lock_first``: take the
    database lock before reading (PostgreSQL, several processes); SQLite reads first, then writes
    (one writer; this runner already evaluates a project one at a time in its process)."""

    def __init__(self, *, uow: UowFactory, read: ReadActivity, evaluate: Evaluate, thresholds: Thresholds,
                 due: DueProjects, debounce_seconds: float = 1.0, schedule_seconds: float = 60.0,
                 update_seconds: float = 60.0, lock_first: bool = True,
                 clock: Callable[[], datetime] = utcnow) -> None:
        self.uow = uow
        self.read = read
        self.evaluate_fn = evaluate
        self.thresholds = thresholds
        self.due = due
        self.debounce = debounce_seconds
        self.schedule = schedule_seconds
        self.update_after = timedelta(seconds=update_seconds)
        self.lock_first = lock_first
        self.clock = clock
        self._heard: dict[str, datetime] = {}  # project -> when the newest unevaluated trigger was heard
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._loop_task: asyncio.Task[None] | None = None
        self.evaluations = 0  # evaluations that ran to the end in this process (tests, metrics)

    # ------------------------------------------------------------ triggers
    async def on_event(self, event: Event) -> None:
        """The bus listener. Heard only between ``start`` and ``close`` (the app's lifetime), so no
        evaluation outlives the app and its database."""
        if self._loop_task is not None and event.type in TRIGGERS and event.project_id != PLATFORM_PROJECT:
            self.poke(event.project_id)

    async def on_resync(self) -> None:
        """Events may have been missed: the schedule covers it soon; nothing to drop here."""

    def poke(self, project_id: str, delay: float | None = None) -> None:
        """Evaluate ``project_id`` after the debounce (one pending evaluation per project)."""
        if self._loop_task is None:
            return  # not started, or closed
        self._heard[project_id] = self.clock()
        if project_id in self._tasks:
            return
        self._tasks[project_id] = asyncio.create_task(self._later(project_id, self.debounce if delay is None
                                                                  else delay), name=f"insights:{project_id}")

    async def _later(self, project_id: str, delay: float) -> None:
        retry = None
        try:
            await asyncio.sleep(delay)
            heard = self._heard.pop(project_id, None)
            try:
                if await self.evaluate(project_id, heard) is False:
                    retry = self.debounce  # another process holds the project: look again after it
            except Exception:
                log.exception("insight evaluation failed", extra={"project_id": project_id})
                retry = max(self.debounce, 5.0)
            if retry is not None and heard is not None:
                self._heard.setdefault(project_id, heard)
        finally:
            self._tasks.pop(project_id, None)
        if project_id in self._heard:
            self.poke(project_id, retry)

    # ------------------------------------------------------------ one evaluation
    async def evaluate(self, project_id: str, heard: datetime | None = None) -> bool | None:
        """Evaluate one project now. True: evaluated; None: skipped (another process already covered
        what was heard); False: another process is evaluating it right now."""
        async with self._locks.setdefault(project_id, asyncio.Lock()):  # one evaluation per project here
            return await self._evaluate(project_id, heard)

    async def _evaluate(self, project_id: str, heard: datetime | None) -> bool | None:
        findings: list[Finding] | None = None
        started = self.clock()
        if not self.lock_first:
            activity = await self.read(project_id, started)
            if not activity.found:
                return None
            findings = self.evaluate_fn(activity, self.thresholds)
        async with self.uow(SYSTEM) as scope:
            repo: InsightRepo = scope.store.insights  # type: ignore[attr-defined]
            if not await repo.try_lock(project_id):
                return False
            last = await repo.last_evaluated(project_id)
            if heard is not None and last is not None and last > heard + COVERED_MARGIN:
                return None
            if findings is None:
                started = self.clock()  # the snapshot starts after the lock: it sees every earlier evaluation
                activity = await self.read(project_id, started)
                if not activity.found:
                    return None
                findings = self.evaluate_fn(activity, self.thresholds)
            await repo.mark_evaluated(project_id, started)
            await scope.insights.apply(project_id, findings, started, self.update_after)
        self.evaluations += 1
        return True

    # ------------------------------------------------------------ the schedule
    async def run_schedule_once(self, limit: int = 100) -> int:
        """Evaluate projects not evaluated for a schedule interval (time alone changes forecasts, windows)."""
        cutoff = self.clock() - timedelta(seconds=self.schedule)
        done = 0
        for project_id in await self.due(cutoff, limit):
            if project_id not in self._tasks and await self.evaluate(project_id) is not False:
                done += 1
        return done

    async def _schedule_forever(self) -> None:
        while True:
            await asyncio.sleep(self.schedule)
            try:
                await self.run_schedule_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("scheduled insight evaluation failed")

    def start(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.create_task(self._schedule_forever(), name="insights-schedule")

    async def close(self) -> None:
        tasks = [t for t in (self._loop_task, *self._tasks.values()) if t is not None]
        self._loop_task = None
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
