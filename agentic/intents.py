"""The built-in assistant's understanding and phrasing: no model, just the common questions.

:func:`understand` maps a question to one read tool and its arguments — intent by keywords, slots by
extraction: periods ("today", "yesterday", "this week", "last 7 days", "in March" …), a grouping
("by model"), models, agents, keys and budgets named as the project knows them, request and project
ids. A follow-up without an intent of its own ("and yesterday?") reuses the previous turn's.
:func:`phrase` turns the tool's result into sentences; every figure in them comes from that result.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from agentic.tools import MONTHS, usd

CAPABILITIES = (
    "what was spent today, yesterday, this week, this month, in the last 7 days or in March — in total or by "
    "model, agent or key",
    "how much is left in your budgets, with the forecast",
    "the wallet's balance and runway",
    "why a request was refused or held (give its req_… id, or ask about the latest)",
    "which requests wait for approval",
    "recent payments and deposits",
    "open insights",
)

_REQUEST_ID = re.compile(r"\breq_[0-9a-z]+\b")
_PROJECT_ID = re.compile(r"\bprj_[0-9a-z]+\b")
_LAST_DAYS = re.compile(r"\b(?:last|past|previous)\s+(\d{1,3}|a|one|seven|thirty)\s+days?\b")
_WORD_NUMBERS = {"a": 1, "one": 1, "seven": 7, "thirty": 30}
_PERIOD_WORDS = (("today", "today"), ("yesterday", "yesterday"), ("this week", "this_week"),
                 ("last week", "last_week"), ("this month", "this_month"), ("last month", "last_month"),
                 ("this year", "this_year"), ("past week", "last_7_days"), ("last 24 hours", "last_1_days"))
_INTENTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("payments", ("payment", "payout", "deposit", "withdraw", "transfer")),
    ("approvals", ("approval", "approve", "awaiting review", "pending", "waiting for review", "held requests")),
    ("insights", ("insight", "anomal", "advice", "recommend", "alert")),
    ("wallet", ("wallet", "balance", "runway", "funds", "top up", "top-up")),
    ("budgets", ("budget", "left", "remaining", "limit", "forecast", "run out", "runs out")),
    ("spend", ("spend", "spent", "spending", "cost", "charged", "usage", "how much", "expensive", "bill", "paid")),
)
_WHY = re.compile(r"\b(why|what happened)\b.*\b(refus|reject|block|den|held|hold|fail|stuck)")


class Intent(msgspec.Struct, kw_only=True):
    tool: str | None  # None: not understood; "help": what the assistant can answer
    args: dict[str, Any] = {}


def understand(text: str, names: dict[str, dict[str, str]], previous: Intent | None = None) -> Intent:
    q = " ".join(text.lower().split())
    slots: dict[str, Any] = {}
    if m := _PROJECT_ID.search(q):
        slots["project_id"] = m.group(0)
    if m := _REQUEST_ID.search(q):
        return Intent(tool="request", args={**slots, "request_id": m.group(0)})
    if _WHY.search(q) or re.search(r"\b(refused|rejected|blocked|denied)\b", q):
        return Intent(tool="request", args=slots)
    period = _period(q)
    if period:
        slots["period"] = period
    for by in ("model", "agent", "key"):
        if re.search(rf"\b(by|per|each|which|what|top) {by}s?\b|\b{by}s? (used|breakdown)\b", q):
            slots["by"] = by
    slots |= _named(q, names)
    tool = next((name for name, words in _INTENTS if any(w in q for w in words)), None)
    if tool == "budgets" and "budget" not in q and not slots.get("name") and any(
            w in q for w in ("spend", "spent", "cost")) and "left" not in q and "remaining" not in q:
        tool = "spend"  # "the spend limit" … is still about a budget; "what did we spend" is not
    if tool is None and re.search(r"\b(help|what can you|which questions|what do you know)\b", q):
        return Intent(tool="help")
    if tool is None and previous is not None and previous.tool not in (None, "help") and slots:
        keep = {k: v for k, v in previous.args.items() if k not in ("request_id",)}
        return Intent(tool=previous.tool, args={**keep, **slots})  # a follow-up: "and yesterday?"
    if tool is None and ("model" in slots or "agent" in slots or "key" in slots or "by" in slots):
        tool = "spend"
    if tool is None:
        return Intent(tool=None, args=slots)
    return Intent(tool=tool, args=_args_for(tool, slots))


def _args_for(tool: str, slots: dict[str, Any]) -> dict[str, Any]:
    allowed = {"spend": ("period", "by", "model", "agent", "key", "project_id"),
               "budgets": ("name", "project_id")}.get(tool, ("project_id",))
    return {k: v for k, v in slots.items() if k in allowed}


def _period(q: str) -> str | None:
    if m := _LAST_DAYS.search(q):
        n = m.group(1)
        return f"last_{_WORD_NUMBERS.get(n) or int(n)}_days"
    for words, name in _PERIOD_WORDS:
        if words in q:
            return name
    for month in MONTHS:
        if re.search(rf"\b(in|for|during|of) {month}\b|\b{month}'?s?\b", q) and not (
                month == "may" and not re.search(r"\b(in|for|during|of) may\b", q)):
            return month
    return None


def _named(q: str, names: dict[str, dict[str, str]]) -> dict[str, str]:
    """The longest model, agent, key and budget names the question mentions (as whole words)."""
    found: dict[str, str] = {}
    for slot, kind in (("model", "models"), ("agent", "agents"), ("key", "keys"), ("name", "budgets")):
        best = ""
        for id_, name in (names.get(kind) or {}).items():
            for candidate in {id_, name} | ({name.rpartition("/")[2]} if kind == "models" else set()):
                c = candidate.lower()
                if len(c) > len(best) and re.search(rf"(?<![\w/-]){re.escape(c)}(?![\w/-])", q):
                    best = c
                    found[slot] = id_ if kind in ("models", "budgets") else name
    return found


# ---------------------------------------------------------------- phrasing
def phrase(intent: Intent, result: dict[str, Any], project_name: str) -> str:
    error = result.get("error")
    if error:
        return f"{error['message'][0].upper()}{error['message'][1:]}."
    return _PHRASES[intent.tool or ""](result, project_name)


def cannot_answer() -> str:
    return ("I can't answer that from the data I have. I can answer: " + "; ".join(CAPABILITIES) + ".")


def help_text() -> str:
    return "I answer from your project's live books. Ask me about: " + "; ".join(CAPABILITIES) + "."


def _n(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def _spend(r: dict[str, Any], project: str) -> str:
    label = r["period"]["label"]
    what = f" on {next(iter(r['filter'].values()))}" if r.get("filter") else ""
    if not r["requests"]:
        return f"{project} spent nothing{what} {label} ({usd(0)})."
    text = f"{project} spent {usd(r['total_micros'])}{what} {label}, over {_n(r['requests'], 'request')}."
    rows = r.get("rows") or []
    if rows and not r.get("filter"):
        parts = [f"{row['name'] or '(none)'}: {usd(row['cost_micros'])} ({_n(row['requests'], 'request')})"
                 for row in rows]
        text += f" By {r['by']}: " + "; ".join(parts) + "."
    return text


def _budgets(r: dict[str, Any], project: str) -> str:
    budgets = r["budgets"]
    if not budgets:
        return (f"I found no budget named {r['filter']['name']} in {project}." if r.get("filter")
                else f"{project} has no budgets.")
    lines = []
    for b in budgets:
        scope = f" for agent {b['agent'] or b['agent_id']}" if b["agent_id"] else ""
        until = f" until {b['period_end'][:10]}" if b["period_end"] else ""
        line = (f"Budget {b['name']} ({b['period']}{scope}): {usd(b['spent_micros'])} spent of "
                f"{usd(b['limit_micros'])}, {usd(b['reserved_micros'])} reserved, {usd(b['remaining_micros'])} "
                f"left{until}.")
        if b["forecast_spent_micros"] is not None:
            line += f" At this period's rate it ends the period near {usd(b['forecast_spent_micros'])}"
            line += (f" and runs out around {b['exhausts_at'][:16].replace('T', ' ')} UTC."
                     if b["runs_out_before_period_end"] else ", within its limit.")
        elif b["exhausts_at"]:
            line += f" At its rate so far it runs out around {b['exhausts_at'][:16].replace('T', ' ')} UTC."
        else:
            line += " Nothing spent this period, so no forecast yet."
        lines.append(line)
    return " ".join(lines)


def _wallet(r: dict[str, Any], project: str) -> str:
    text = (f"{project}'s wallet holds {usd(r['balance_micros'])}: {usd(r['reserved_micros'])} reserved, "
            f"{usd(r['available_micros'])} available.")
    if r["runway_hours"] is None:
        return text + " Nothing was spent in the last 24 hours, so there is no burn rate to give a runway."
    hours = r["runway_hours"]
    runway = f"{hours} hours" if hours < 72 else f"{round(hours / 24):,} days"
    return text + (f" In the last 24 hours it spent {usd(r['spent_last_24h_micros'])}; at that rate the available "
                   f"balance lasts about {runway} (until {r['exhausts_at'][:16].replace('T', ' ')} UTC).")


def _request(r: dict[str, Any], project: str) -> str:
    req = r["request"]
    if req is None:
        return f"No request of {project} was refused, held or failed."
    text = f"Request {req['id']} ({req['model']}) is {req['status'].replace('_', ' ')}."
    reasons = [x["message"] for x in req["reasons"] if x.get("message") and x.get("code") not in ("within_policy",)]
    if req["status"] == "pending_approval":
        text += (f" It waits for an owner's or admin's approval, holding {usd(req['reserved_micros'])}"
                 + (f": {'; '.join(reasons)}." if reasons else "."))
    elif req["error"]:
        text += f" Reason: {req['error']['message']} ({req['error']['code']})."
    elif req["status"] == "settled":
        text += f" It was charged {usd(req['cost_micros'] or 0)}."
    return text


def _approvals(r: dict[str, Any], project: str) -> str:
    if not r["count"]:
        return f"No request of {project} is waiting for approval."
    items = "; ".join(f"{a['id']} ({a['model']}, {usd(a['reserved_micros'])})" for a in r["approvals"])
    return (f"{_n(r['count'], 'request')} of {project} {'waits' if r['count'] == 1 else 'wait'} for approval, "
            f"holding {usd(r['reserved_micros'])}: {items}.")


def _payments(r: dict[str, Any], project: str) -> str:
    if not r["payments"] and not r["deposits"]:
        return f"{project} has no payments or deposits yet."
    parts = []
    if r["deposits"]:
        parts.append("Deposits: " + "; ".join(f"{usd(d['amount_micros'])} {d['status']} on {d['created_at'][:10]}"
                                              for d in r["deposits"]) + ".")
    if r["payments"]:
        parts.append("Payouts: " + "; ".join(f"{usd(p['amount_micros'])} to {p['to_address']} {p['status']} on "
                                             f"{p['created_at'][:10]}" for p in r["payments"]) + ".")
    return " ".join(parts)


def _insights(r: dict[str, Any], project: str) -> str:
    if not r["available"]:
        return f"There are no insights for {project}: this server does not produce insights yet."
    if not r["insights"]:
        return f"{project} has no open insights."
    return f"{_n(len(r['insights']), 'open insight')}: " + " ".join(
        f"[{i['severity']}] {i['title']}: {i['message']}" for i in r["insights"])


_PHRASES = {"spend": _spend, "budgets": _budgets, "wallet": _wallet, "request": _request,
            "approvals": _approvals, "payments": _payments, "insights": _insights}
