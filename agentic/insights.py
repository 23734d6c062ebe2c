"""The brain's second half: insights from a project's activity. Pure: a read-only
:class:`~domain.insights.ProjectActivity` in, :class:`~domain.insights.Finding` s out, nothing written
(``domain.insights`` persists them).

Burn rates are robust to one burst: the last hour in six 10-minute buckets, the busiest bucket left
out, the other five averaged (a single runaway minute neither raises a forecast nor hides a steady
drain). Spikes compare the last hour with the 30-day hourly baseline; a baseline exists once it covers
a day.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from domain.catalog import MTOK, CatalogModel
from domain.insights import (
    BASELINE_MIN_HOURS,
    BUCKET_SECONDS,
    BURN_BUCKETS,
    RECENT_MODEL_HOURS,
    Finding,
    ModelUsage,
    ProjectActivity,
    Severity,
    Subject,
    Thresholds,
    usd,
)


def evaluate(activity: ProjectActivity, th: Thresholds) -> list[Finding]:
    if not activity.active:
        return []  # a deleted project: everything it had resolves
    return [*budget_forecasts(activity, th), *wallet_runway(activity, th), *spikes(activity, th),
            *rejection_bursts(activity, th), *unusual_models(activity), *cheaper_models(activity, th),
            *idle_keys(activity, th)]


# ---------------------------------------------------------------- burn rate and forecasts
def burn_per_hour(buckets: list[int]) -> int:
    """Micro-USDC per hour from the last hour's 10-minute buckets, the busiest left out (trimmed mean)."""
    if len(buckets) < 2:
        return 0
    trimmed = sorted(buckets)[:-1]
    per_bucket = sum(trimmed) / len(trimmed)
    return int(per_bucket * 3600 / BUCKET_SECONDS)


def _project_buckets(activity: ProjectActivity) -> list[int]:
    total = [0] * BURN_BUCKETS
    for buckets in activity.burn.values():
        for i, value in enumerate(buckets):
            total[i] += value
    return total


def _when(now: datetime, hours: float) -> datetime:
    return now + timedelta(seconds=min(hours, 24 * 365 * 100) * 3600)


def _hhmm(at: datetime) -> str:
    return at.strftime("%Y-%m-%d %H:%M UTC")


def _span(hours: float) -> str:
    if hours < 1:
        return f"{max(1, round(hours * 60))} min"
    if hours < 48:
        return f"{hours:.1f} h".replace(".0 h", " h")
    return f"{hours / 24:.1f} days".replace(".0 days", " days")


def _rfc3339(at: datetime | None) -> str | None:
    return at.strftime("%Y-%m-%dT%H:%M:%SZ") if at is not None else None


def budget_forecasts(activity: ProjectActivity, th: Thresholds) -> list[Finding]:
    now = activity.now
    project_burn = burn_per_hour(_project_buckets(activity))
    out = []
    for b in activity.budgets:
        burn = project_burn if b.agent_id is None else burn_per_hour(activity.burn.get(b.agent_id, []))
        if burn <= 0:
            continue
        left = max(0, b.limit_micros - b.spent_micros - b.reserved_micros)
        hours = left / burn
        exhausts_at = _when(now, hours)
        horizon = b.period_end if b.period_end is not None else _when(now, th.runway_hours)
        if exhausts_at >= horizon:
            continue
        severity: Severity = "critical" if hours < 1 else "warning"
        before = (f"{_span((b.period_end - exhausts_at).total_seconds() / 3600)} before it resets"
                  if b.period_end is not None else "and it does not reset")
        out.append(Finding(
            kind="budget_forecast", severity=severity, title=f"Budget '{b.name}' runs out early",
            message=(f"At the last hour's rate ({usd(burn)} per hour) the '{b.name}' budget runs out at "
                     f"{_hhmm(exhausts_at)}, {before}. Raise its limit or slow the spending down."),
            evidence={"budget_id": b.id, "limit_micros": b.limit_micros, "spent_micros": b.spent_micros,
                      "reserved_micros": b.reserved_micros, "burn_micros_per_hour": burn,
                      "exhausts_at": _rfc3339(exhausts_at), "period_end": _rfc3339(b.period_end)},
            subject=Subject(budget_id=b.id, agent_id=b.agent_id)))
    return out


def wallet_runway(activity: ProjectActivity, th: Thresholds) -> list[Finding]:
    burn = burn_per_hour(_project_buckets(activity))
    if burn <= 0:
        return []
    available = max(0, activity.available_micros)
    hours = available / burn
    if hours >= th.runway_hours:
        return []
    exhausts_at = _when(activity.now, hours)
    return [Finding(
        kind="wallet_runway", severity="critical" if hours < 24 else "warning", title="The wallet is running low",
        message=(f"At the last hour's rate ({usd(burn)} per hour) the wallet's {usd(available)} lasts "
                 f"{_span(hours)}, until {_hhmm(exhausts_at)}. Deposit USDC before then or requests will be "
                 f"refused."),
        evidence={"available_micros": available, "burn_micros_per_hour": burn,
                  "exhausts_at": _rfc3339(exhausts_at)},
        subject=Subject())]


# ---------------------------------------------------------------- anomalies against the baseline
def _baseline_hours(activity: ProjectActivity, th: Thresholds) -> float:
    """Hours of history the 30-day baseline covers (from the first request in it to an hour ago)."""
    if not activity.models:
        return 0.0
    first = min(m.first_at for m in activity.models)
    start = max(first, activity.now - timedelta(days=th.baseline_days))
    return max(0.0, (activity.now - timedelta(hours=1) - start).total_seconds() / 3600)


def spikes(activity: ProjectActivity, th: Thresholds) -> list[Finding]:
    hours = _baseline_hours(activity, th)
    if hours < BASELINE_MIN_HOURS:
        return []
    base_requests = sum(m.base_requests for m in activity.models)
    base_cost = sum(m.base_cost_micros for m in activity.models)
    window_requests = sum(m.hour_requests for m in activity.models)
    window_cost = sum(m.hour_cost_micros for m in activity.models)
    if window_requests < th.spike_min_requests:
        return []
    out = []
    per_hour = base_requests / hours
    if per_hour > 0 and window_requests > th.spike_ratio * per_hour:
        ratio = window_requests / per_hour
        out.append(Finding(
            kind="request_spike", severity="warning", title="Request volume spiked",
            message=(f"{window_requests} requests in the last hour, {ratio:.1f}× the usual {per_hour:.1f} per hour "
                     f"over the last {th.baseline_days} days. Check for an agent stuck in a loop or new traffic."),
            evidence={"window_requests": window_requests, "baseline_per_hour": round(per_hour, 3),
                      "ratio": round(ratio, 2)},
            subject=Subject()))
    cost_per_hour = base_cost / hours
    if cost_per_hour > 0 and window_cost > th.spike_ratio * cost_per_hour:
        ratio = window_cost / cost_per_hour
        out.append(Finding(
            kind="cost_spike", severity="warning", title="Spend spiked",
            message=(f"{usd(window_cost)} spent in the last hour, {ratio:.1f}× the usual "
                     f"{usd(round(cost_per_hour))} per hour over the last {th.baseline_days} days. Check which "
                     f"agent or model is behind it."),
            evidence={"window_micros": window_cost, "baseline_per_hour": round(cost_per_hour),
                      "ratio": round(ratio, 2)},
            subject=Subject()))
    return out


def unusual_models(activity: ProjectActivity) -> list[Finding]:
    """A model in use in the last day that the 30 days before never used (once those cover a day)."""
    if not activity.models:
        return []
    recent_start = activity.now - timedelta(hours=RECENT_MODEL_HOURS)
    first = min(m.first_at for m in activity.models)
    if (recent_start - first).total_seconds() / 3600 < BASELINE_MIN_HOURS:
        return []
    known_providers = {m.provider for m in activity.models if m.before_recent_requests > 0}
    out = []
    for m in activity.models:
        if m.recent_requests == 0 or m.before_recent_requests > 0:
            continue
        new_provider = m.provider not in known_providers
        what = f"the provider '{m.provider}' and its model {m.model}" if new_provider else f"the model {m.model}"
        out.append(Finding(
            kind="unusual_model", severity="warning" if new_provider else "info",
            title=f"{m.model} is new to this project",
            message=(f"{m.recent_requests} requests used {what} in the last day ({usd(m.recent_cost_micros)}), "
                     f"which this project had not used before. If that was not intended, restrict models in the "
                     f"policy."),
            evidence={"model": m.model, "provider": m.provider, "requests": m.recent_requests,
                      "spend_micros": m.recent_cost_micros},
            subject=Subject(model=m.model)))
    return out


# ---------------------------------------------------------------- advice
def _cost(model: CatalogModel, input_tokens: int, output_tokens: int) -> int:
    return -(-(input_tokens * model.input_micros_per_mtok + output_tokens * model.output_micros_per_mtok) // MTOK)


def cheapest_alternative(usage: ModelUsage, catalog: list[CatalogModel]) -> tuple[CatalogModel, int] | None:
    kind = "embedding" if usage.operation == "embedding" else "chat"
    best: tuple[CatalogModel, int] | None = None
    for candidate in catalog:
        if candidate.id == usage.model or candidate.provider != usage.provider or candidate.kind != kind \
                or not candidate.active:
            continue
        cost = _cost(candidate, usage.week_input_tokens, usage.week_output_tokens)
        if best is None or cost < best[1]:
            best = (candidate, cost)
    return best


def cheaper_models(activity: ProjectActivity, th: Thresholds) -> list[Finding]:
    out = []
    for m in activity.models:
        if m.week_cost_micros <= 0:
            continue
        found = cheapest_alternative(m, activity.catalog)
        if found is None:
            continue
        alternative, alternative_cost = found
        saving = m.week_cost_micros - alternative_cost
        if saving < th.cheaper_min_saving_micros or saving < th.cheaper_min_saving_ratio * m.week_cost_micros:
            continue
        out.append(Finding(
            kind="cheaper_model", severity="info", title=f"{alternative.id} would have cost less than {m.model}",
            message=(f"The last {th.cheaper_window_days} days on {m.model} cost {usd(m.week_cost_micros)}; the same "
                     f"tokens on {alternative.id} would have cost {usd(alternative_cost)}, saving {usd(saving)}. "
                     f"Try it for the calls that do not need {m.model}."),
            evidence={"model": m.model, "alternative": alternative.id, "spend_micros": m.week_cost_micros,
                      "alternative_micros": alternative_cost, "saving_micros": saving,
                      "input_tokens": m.week_input_tokens, "output_tokens": m.week_output_tokens},
            subject=Subject(model=m.model)))
    return out


def rejection_bursts(activity: ProjectActivity, th: Thresholds) -> list[Finding]:
    """One agent (or, for keys without an agent, one key) refused again and again: likely looping."""
    groups: dict[tuple[str, str], dict[str, tuple[int, str]]] = {}
    for r in activity.rejections:
        subject = ("agent", r.agent_id) if r.agent_id else ("key", r.key_id or "")
        if not subject[1]:
            continue  # a user's own REST calls: no agent or key to point at
        reasons = groups.setdefault(subject, {})
        count, message = reasons.get(r.top_reason, (0, r.top_message))
        reasons[r.top_reason] = (count + r.count, message)
    out = []
    minutes = th.rejection_window_seconds / 60
    for (what, id_), reasons in sorted(groups.items()):
        total = sum(count for count, _ in reasons.values())
        if total < th.rejection_count:
            continue
        top, (_, top_message) = max(reasons.items(), key=lambda item: (item[1][0], item[0]))
        who = f"Agent {id_}" if what == "agent" else f"API key {id_}"
        out.append(Finding(
            kind="rejection_burst", severity="warning", title=f"{who} keeps being refused",
            message=(f"{who} had {total} requests refused in the last {minutes:g} minutes, mostly {top}"
                     f"{': ' + top_message if top_message else ''}. It may be retrying a refused call in a loop; "
                     f"stop it or change what it asks for."),
            evidence={"rejections": total, "window_seconds": th.rejection_window_seconds, "top_reason": top},
            subject=Subject(agent_id=id_) if what == "agent" else Subject(key_id=id_)))
    return out


def idle_keys(activity: ProjectActivity, th: Thresholds) -> list[Finding]:
    cutoff = activity.now - timedelta(days=th.idle_key_days)
    out = []
    for key in activity.idle_keys:
        last = key.last_used_at or key.created_at
        if last >= cutoff:
            continue
        since = f"since {last.strftime('%Y-%m-%d')}" if key.last_used_at else \
            f"since it was created on {key.created_at.strftime('%Y-%m-%d')}"
        out.append(Finding(
            kind="idle_key", severity="info", title=f"API key '{key.name}' is unused",
            message=(f"The API key '{key.name}' ({key.prefix}…) has not been used {since}. Revoke it if nothing "
                     f"needs it: an unused key is only a risk."),
            evidence={"key_id": key.key_id, "last_used_at": _rfc3339(key.last_used_at)},
            subject=Subject(key_id=key.key_id)))
    return out
