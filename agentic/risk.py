"""The risk score: the original's additive formula (reference/original-system.md §1, "Risk score").

Start at 1.0, add each factor that fires, cap at 10. The 30-day baseline (settled requests) is
ignored below 10 samples; the factors that compare with "typical" behaviour (provider, model, hour,
agent, cost relative to average) then do not fire, and the absolute cost rule applies instead.
Money comparisons are exact integer arithmetic on micro-USDC.
"""

from __future__ import annotations

from datetime import datetime

from domain.catalog import CatalogModel
from domain.decisions import Activity, RiskFactor

BASE_SCORE = 1.0
MAX_SCORE = 10.0
MIN_BASELINE_SAMPLES = 10
NO_BASELINE_COST_MICROS = 10_000_000  # $10
BUSY_DAY_REQUESTS = 100
EXHAUSTION_REQUESTS = 50
EXHAUSTION_SHARE = 0.9

# Levels of the original (upper bounds, inclusive).
LEVELS = ((2.0, "very_low"), (4.0, "low"), (6.0, "medium"), (8.0, "high"), (MAX_SCORE, "critical"))


def level(score: float) -> str:
    for bound, name in LEVELS:
        if score <= bound:
            return name
    return "critical"


def has_baseline(activity: Activity) -> bool:
    return activity.samples >= MIN_BASELINE_SAMPLES


def assess(activity: Activity, *, cost_micros: int, model: CatalogModel, agent_id: str | None, now: datetime,
           daily_budget_usage: float | None) -> tuple[float, list[RiskFactor]]:
    """Score one request against the project's recent behaviour. ``daily_budget_usage`` is the
    highest (spent + reserved) / limit among the day budgets that apply, or None without one."""
    factors: list[RiskFactor] = []

    def add(type_: str, description: str, contribution: float, severity: str) -> None:
        factors.append(RiskFactor(type=type_, description=description, contribution=contribution,
                                  severity=severity))

    baseline = has_baseline(activity)
    avg = activity.avg_cost_micros
    if not baseline or avg <= 0:
        if cost_micros > NO_BASELINE_COST_MICROS:
            add("cost", f"estimated cost {cost_micros} µUSDC is above $10 with no baseline to compare", 2.0, "high")
    elif cost_micros - avg > 3 * avg:  # d = (cost - avg) / avg > 3
        add("cost", f"estimated cost is {cost_micros / avg:.1f}× the 30-day average ({avg} µUSDC)",
            min(3.0, (cost_micros - avg) / avg), "high")
    elif cost_micros - avg > 2 * avg:
        add("cost", f"estimated cost is {cost_micros / avg:.1f}× the 30-day average ({avg} µUSDC)", 1.5, "medium")

    if activity.requests_today > BUSY_DAY_REQUESTS and (
            not baseline or activity.requests_today > 3 * activity.avg_requests_per_day):
        add("rate", f"{activity.requests_today} requests today, above the usual pace", 2.0, "high")

    if baseline:
        if model.provider not in activity.providers:
            add("provider", f"provider {model.provider!r} is not one this project usually uses", 1.0, "medium")
        if model.id not in activity.models and model.name not in activity.models:
            add("model", f"model {model.id!r} is not one this project usually uses", 0.5, "low")
        if now.hour not in activity.hours:
            add("hour", f"{now.hour:02d}:00 UTC is outside this project's usual hours", 0.5, "low")
        if agent_id and agent_id not in activity.agents:
            add("agent", f"agent {agent_id} has no requests in the 30-day baseline", 1.5, "medium")

    if activity.recent_rejections >= 5:
        add("rejections", f"{activity.recent_rejections} rejected requests in the last 24 hours", 2.0, "high")
    elif activity.recent_rejections >= 3:
        add("rejections", f"{activity.recent_rejections} rejected requests in the last 24 hours", 1.0, "medium")

    if (daily_budget_usage is not None and daily_budget_usage > EXHAUSTION_SHARE
            and activity.requests_today > EXHAUSTION_REQUESTS):
        add("budget_exhaustion", f"daily budget {daily_budget_usage:.0%} used after "
            f"{activity.requests_today} requests today", 1.5, "medium")

    score = min(MAX_SCORE, BASE_SCORE + sum(f.contribution for f in factors))
    return round(score, 4), factors
