"""The assistant's typed read tools: the figures every answer is built from, in both modes.

A :class:`Toolbox` is opened per answer over the read-only :class:`~domain.chat.ChatView` for one asker
and one default project. Every tool may be pointed at another project (``project_id``); a project the
asker is not a member of — or one that does not exist — is answered with the same ``not_found``, so
nothing about it leaks, not even whether it exists. Results are plain JSON: money as integer
``*_micros`` (exact), times as RFC 3339 strings. :func:`for_model` adds a ``*_usd`` string beside each
amount for the LLM to quote (``$0.000042``, never ``$0.00``).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from domain.budgets import period_end
from domain.chat import ID_PATTERN, ChatView
from domain.spend import SpendRequest

MICROS = 1_000_000
REFUSED = ("rejected", "pending_approval", "failed", "expired")
MONTHS = ("january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
          "november", "december")
PERIODS = ("today", "yesterday", "this_week", "last_week", "this_month", "last_month", "last_7_days",
           "last_30_days", "this_year")
DEFAULT_PERIOD = "this_month"


def usd(micros: int) -> str:
    """Exact to the micro-USDC: 42 → ``$0.000042``, 1_500_000 → ``$1.50``, 1_234_567 → ``$1.234567``."""
    whole, frac = divmod(abs(int(micros)), MICROS)
    decimals = f"{frac:06d}".rstrip("0").ljust(2, "0")
    return f"{'-' if micros < 0 else ''}${whole:,}.{decimals}"


def iso(value: datetime | None) -> str | None:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z") if value is not None else None


# ---------------------------------------------------------------- periods
class Period(msgspec.Struct, kw_only=True):
    name: str
    label: str
    since: datetime
    until: datetime

    def json(self) -> dict[str, Any]:
        return {"name": self.name, "label": self.label, "since": iso(self.since), "until": iso(self.until)}


class UnknownPeriod(ValueError):
    pass


def period_of(name: str, now: datetime) -> Period:
    """A named UTC period: today, yesterday, this_week (from Monday), last_week, this_month, last_month,
    this_year, last_N_days, or a month name ("march": the last March that has begun)."""
    name = name.strip().lower().replace(" ", "_").removeprefix("in_")
    now = now.astimezone(UTC)
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    week = midnight - timedelta(days=midnight.weekday())
    month = midnight.replace(day=1)
    if name == "today":
        return Period(name=name, label="today", since=midnight, until=now)
    if name == "yesterday":
        return Period(name=name, label="yesterday", since=midnight - timedelta(days=1), until=midnight)
    if name == "this_week":
        return Period(name=name, label="this week", since=week, until=now)
    if name == "last_week":
        return Period(name=name, label="last week", since=week - timedelta(days=7), until=week)
    if name == "this_month":
        return Period(name=name, label="this month", since=month, until=now)
    if name == "last_month":
        previous = (month - timedelta(days=1)).replace(day=1)
        return Period(name=name, label="last month", since=previous, until=month)
    if name == "this_year":
        return Period(name=name, label="this year", since=month.replace(month=1), until=now)
    days = re.fullmatch(r"last_(\d{1,3})_days?", name)
    if days and 1 <= int(days.group(1)) <= 366:
        n = int(days.group(1))
        return Period(name=name, label=f"in the last {n} day{'s' if n > 1 else ''}", since=now - timedelta(days=n),
                      until=now)
    for number, month_name in enumerate(MONTHS, start=1):
        if name in (month_name, month_name[:3]):
            year = now.year if number <= now.month else now.year - 1
            start = datetime(year, number, 1, tzinfo=UTC)
            end = period_end("month", start) or now
            return Period(name=month_name, label=f"in {month_name.capitalize()} {year}", since=start,
                          until=min(end, now))
    raise UnknownPeriod(f"unknown period {name!r}: use one of {', '.join(PERIODS)}, last_N_days or a month name")


# ---------------------------------------------------------------- the tools
class NotVisible(Exception):
    """The project does not exist or the asker is not a member: both answer not_found."""


OpenView = Callable[[], contextlib.AbstractAsyncContextManager[ChatView]]


class Toolbox:
    """Each call reads through its own read-only view (``open_view``): no transaction stays open while
    the LLM thinks between two calls."""

    view: ChatView

    def __init__(self, open_view: OpenView, user_id: str, project_id: str, clock: Callable[[], datetime]) -> None:
        self.open_view = open_view
        self.user_id = user_id
        self.project_id = project_id
        self.clock = clock
        self.now = clock()  # read afresh by every call: the books move while the LLM thinks
        self._visible: dict[str, bool] = {}

    async def project(self, project_id: str | None) -> str:
        """The project a tool reads: the asked one if the asker may read it (else NotVisible)."""
        project_id = str(project_id or self.project_id)
        if not re.match(ID_PATTERN, project_id):
            raise NotVisible(project_id[:40])
        if project_id not in self._visible:
            self._visible[project_id] = await self.view.role(project_id, self.user_id) is not None
        if not self._visible[project_id]:
            raise NotVisible(project_id)
        return project_id

    async def call(self, name: str, args: dict[str, Any]) -> dict[str, Any]:
        """Run tool ``name``; a refusal or bad argument is a result too (``{"error": {code, message}}``)."""
        tool = TOOLS.get(name)
        if tool is None:
            return _error("invalid_request", f"there is no tool {name!r}")
        allowed = set(tool["parameters"]["properties"])
        args = {k: v for k, v in (args or {}).items() if k in allowed and v not in (None, "")}
        self.now = self.clock()
        try:
            async with self.open_view() as self.view:
                project_id = await self.project(args.pop("project_id", None))
                answer: dict[str, Any] = await getattr(self, name)(project_id, **args)  # a tool named above
                return answer
        except NotVisible as exc:
            return _error("not_found", f"project {exc.args[0]} not found")
        except UnknownPeriod as exc:
            return _error("invalid_request", str(exc))
        except (TypeError, ValueError) as exc:
            return _error("invalid_request", f"bad arguments for {name}: {exc}")

    async def names(self, project_id: str | None = None) -> dict[str, dict[str, str]]:
        """The names a question may use about the project (agents, keys, budgets, models); NotVisible."""
        async with self.open_view() as self.view:
            return await self.view.names(await self.project(project_id))

    # -------------------------------------------------------- spend
    async def spend(self, project_id: str, period: str = DEFAULT_PERIOD, by: str = "total", model: str | None = None,
                    agent: str | None = None, key: str | None = None) -> dict[str, Any]:
        window = period_of(period, self.now)
        names = await self.view.names(project_id)
        filters = {"model": model, "agent": agent, "key": key}
        if by not in ("total", "model", "agent", "key"):
            raise ValueError("by must be total, model, agent or key")
        group = next((k for k, v in filters.items() if v), None) or by
        rows = await self.view.spend(project_id, window.since, window.until, "total" if group == "total" else group)
        lookup = {"agent": names.get("agents", {}), "key": names.get("keys", {})}.get(group, {})
        lines: list[dict[str, Any]] = [
            {"key": r.key, "name": lookup.get(r.key or "", r.key) if group != "model" else r.key,
             "cost_micros": r.cost_micros, "requests": r.requests, "input_tokens": r.input_tokens,
             "output_tokens": r.output_tokens} for r in rows]
        wanted = filters.get(group)
        if wanted:
            lines = [line for line in lines if _matches(wanted, line["key"], line["name"])]
        lines.sort(key=lambda line: (-line["cost_micros"], str(line["key"])))
        result: dict[str, Any] = {
            "project_id": project_id, "period": window.json(), "by": group,
            "total_micros": sum(line["cost_micros"] for line in lines),
            "requests": sum(line["requests"] for line in lines),
            "input_tokens": sum(line["input_tokens"] for line in lines),
            "output_tokens": sum(line["output_tokens"] for line in lines)}
        if wanted:
            result["filter"] = {group: wanted}
        if group != "total":
            result["rows"] = lines
        return result

    # -------------------------------------------------------- budgets
    async def budgets(self, project_id: str, name: str | None = None) -> dict[str, Any]:
        names = await self.view.names(project_id)
        found = [b.as_rolled(self.now) for b in await self.view.budgets(project_id)]
        if name:
            found = [b for b in found if _matches(name, b.id, b.name)]
        return {"project_id": project_id, "budgets": [self._budget(b, names.get("agents", {})) for b in found],
                **({"filter": {"name": name}} if name else {})}

    def _budget(self, b: Any, agent_names: dict[str, str]) -> dict[str, Any]:
        remaining = b.limit_micros - b.spent_micros - b.reserved_micros
        end = period_end(b.period, b.period_start)
        elapsed = max(0, int((self.now - b.period_start).total_seconds()))
        line: dict[str, Any] = {
            "id": b.id, "name": b.name, "period": b.period, "agent_id": b.agent_id,
            "agent": agent_names.get(b.agent_id or "") if b.agent_id else None,
            "limit_micros": b.limit_micros, "spent_micros": b.spent_micros, "reserved_micros": b.reserved_micros,
            "remaining_micros": remaining, "period_start": iso(b.period_start), "period_end": iso(end),
            "burn_micros_per_hour": b.spent_micros * 3600 // elapsed if elapsed else 0,
            "forecast_spent_micros": None, "exhausts_at": None, "runs_out_before_period_end": False}
        if b.spent_micros > 0 and elapsed > 0:
            if end is not None:
                left = max(0, int((end - self.now).total_seconds()))
                line["forecast_spent_micros"] = b.spent_micros + -(-b.spent_micros * left // elapsed)
            seconds = remaining * elapsed // b.spent_micros  # at the period's average burn so far
            exhausts = self.now + timedelta(seconds=seconds)
            if end is None or exhausts < end:
                line["exhausts_at"] = iso(exhausts)
                line["runs_out_before_period_end"] = end is not None
        return line

    # -------------------------------------------------------- wallet
    async def wallet(self, project_id: str) -> dict[str, Any]:
        found = await self.view.wallet(project_id)
        balance = found.balance_micros if found else 0
        reserved = found.reserved_micros if found else 0
        available = balance - reserved
        day = await self.view.spend(project_id, self.now - timedelta(days=1), self.now, "total")
        spent = day[0].cost_micros if day else 0
        result: dict[str, Any] = {
            "project_id": project_id, "balance_micros": balance, "reserved_micros": reserved,
            "available_micros": available, "spent_last_24h_micros": spent, "burn_micros_per_hour": spent // 24,
            "runway_hours": None, "exhausts_at": None,
            "deposit_address": found.deposit_address if found else None}
        if spent > 0:
            seconds = max(0, available) * 86_400 // spent
            result["runway_hours"] = round(seconds / 3600, 1)
            result["exhausts_at"] = iso(self.now + timedelta(seconds=seconds))
        return result

    # -------------------------------------------------------- requests and approvals
    async def request(self, project_id: str, request_id: str | None = None) -> dict[str, Any]:
        if request_id:
            found = await self.view.request(project_id, request_id) if re.match(ID_PATTERN, str(request_id)) else None
            if found is None:
                return _error("not_found", f"request {request_id} not found in this project")
        else:
            latest = await self.view.requests(project_id, REFUSED, 1)
            if not latest:
                return {"project_id": project_id, "request": None}
            found = latest[0]
        return {"project_id": project_id, "request": _request(found)}

    async def approvals(self, project_id: str) -> dict[str, Any]:
        held = await self.view.requests(project_id, ("pending_approval",), 50)
        return {"project_id": project_id, "count": len(held),
                "reserved_micros": sum(r.reserved_micros for r in held),
                "approvals": [{**_request(r), "approval_expires_at": iso(r.approval_expires_at)} for r in held]}

    # -------------------------------------------------------- payments
    async def payments(self, project_id: str, limit: int = 5) -> dict[str, Any]:
        limit = max(1, min(int(limit), 50))
        payments = await self.view.payments(project_id, limit)
        deposits = await self.view.deposits(project_id, limit)
        return {"project_id": project_id,
                "payments": [{"id": p.id, "kind": p.kind, "status": p.status, "amount_micros": p.amount_micros,
                              "to_address": p.to_address, "tx_hash": p.tx_hash, "created_at": iso(p.created_at)}
                             for p in payments],
                "deposits": [{"id": d.id, "status": d.status, "amount_micros": d.amount_micros,
                              "from_address": d.from_address, "tx_hash": d.tx_hash, "created_at": iso(d.created_at),
                              "credited_at": iso(d.credited_at)} for d in deposits]}

    # -------------------------------------------------------- insights
    async def insights(self, project_id: str) -> dict[str, Any]:
        found = await self.view.insights(project_id, 20)
        return {"project_id": project_id, "available": found is not None,
                "insights": [{k: iso(v) if isinstance(v, datetime) else v for k, v in i.items()}
                             for i in found or []]}


def _request(r: SpendRequest) -> dict[str, Any]:
    decision = r.decision or {}
    error = r.error or {}
    return {"id": r.id, "status": r.status, "model": r.model, "agent_id": r.agent_id, "key_id": r.key_id,
            "created_at": iso(r.created_at), "estimated_cost_micros": r.estimated_cost_micros,
            "reserved_micros": r.reserved_micros, "cost_micros": r.cost_micros, "outcome": decision.get("outcome"),
            "error": {"code": error.get("code"), "message": error.get("message")} if error else None,
            "reasons": [{"code": x.get("code"), "message": x.get("message")} for x in decision.get("reasons") or []
                        if isinstance(x, dict)]}


def _matches(wanted: str, *candidates: Any) -> bool:
    w = wanted.strip().lower()
    for c in candidates:
        if c is None:
            continue
        c = str(c).lower()
        if w == c or w == c.rpartition("/")[2]:
            return True
    return False


def _error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def for_model(result: Any) -> Any:
    """The result as the LLM sees it: beside each ``x_micros`` amount, ``x_usd`` (exact, formatted)."""
    if isinstance(result, dict):
        out: dict[str, Any] = {}
        for k, v in result.items():
            out[k] = for_model(v)
            if k.endswith("_micros") and isinstance(v, int) and not isinstance(v, bool):
                out[k.removesuffix("_micros") + "_usd"] = usd(v)
        return out
    if isinstance(result, list):
        return [for_model(v) for v in result]
    return result


# ---------------------------------------------------------------- schemas (OpenAI function tools)
_PROJECT = {"type": "string", "description": "a project id (prj_…); default: the conversation's project"}
TOOLS: dict[str, dict[str, Any]] = {
    "spend": {"description": "What the project spent in a period: the total, or by model, agent or API key.",
              "parameters": {"type": "object", "properties": {
                  "period": {"type": "string", "description": f"one of {', '.join(PERIODS)}, last_N_days, or a "
                                                              f"month name (default {DEFAULT_PERIOD})"},
                  "by": {"type": "string", "enum": ["total", "model", "agent", "key"]},
                  "model": {"type": "string", "description": "only this model (provider/model or its name)"},
                  "agent": {"type": "string", "description": "only this agent (name or id)"},
                  "key": {"type": "string", "description": "only this API key (name or id)"},
                  "project_id": _PROJECT}}},
    "budgets": {"description": "The project's budgets: limit, spent, reserved, remaining this period, and the "
                               "forecast at the period's burn rate (forecast_spent, exhausts_at).",
                "parameters": {"type": "object", "properties": {
                    "name": {"type": "string", "description": "only the budget of this name or id"},
                    "project_id": _PROJECT}}},
    "wallet": {"description": "The project's wallet: balance, reserved, available, the last 24 h burn and "
                              "the runway at that rate.",
               "parameters": {"type": "object", "properties": {"project_id": _PROJECT}}},
    "request": {"description": "One spend request and why it was refused or held (decision, reasons, error); "
                               "without request_id, the latest refused, held or failed one.",
                "parameters": {"type": "object", "properties": {
                    "request_id": {"type": "string", "description": "req_…"}, "project_id": _PROJECT}}},
    "approvals": {"description": "Requests waiting for an owner's or admin's approval.",
                  "parameters": {"type": "object", "properties": {"project_id": _PROJECT}}},
    "payments": {"description": "Recent payouts and deposits (USDC) of the project.",
                 "parameters": {"type": "object", "properties": {
                     "limit": {"type": "integer", "minimum": 1, "maximum": 50}, "project_id": _PROJECT}}},
    "insights": {"description": "The project's open insights (forecasts, anomalies, advice).",
                 "parameters": {"type": "object", "properties": {"project_id": _PROJECT}}},
}


def openai_tools() -> list[dict[str, Any]]:
    return [{"type": "function", "function": {"name": name, **spec}} for name, spec in TOOLS.items()]
