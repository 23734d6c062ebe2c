"""Decision tables for every insight kind: on fixed activity, each rule fires just past its threshold and
stays quiet just short of it (agentic/insights.py is pure: activity in, findings out)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from agentic.insights import burn_per_hour, evaluate
from domain.catalog import SEED
from domain.insights import BudgetFigures, KeyUse, ModelUsage, ProjectActivity, Rejections, Subject, Thresholds, usd

NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
TH = Thresholds()


def activity(**kw) -> ProjectActivity:
    base = dict(project_id="prj_1", now=NOW, active=True, available_micros=0, budgets=[], burn={}, models=[],
                rejections=[], idle_keys=[], catalog=[])
    base.update(kw)
    return ProjectActivity(**base)


def kinds(act: ProjectActivity, th: Thresholds = TH, kind: str | None = None):
    found = evaluate(act, th)
    return [f for f in found if kind is None or f.kind == kind]


def steady(per_bucket: int) -> list[int]:
    return [per_bucket] * 6


def usage(model="openai/gpt-4o", provider="openai", days_old=10.0, **kw) -> ModelUsage:
    values = dict(model=model, provider=provider, operation="chat", first_at=NOW - timedelta(days=days_old),
                  base_requests=0, base_cost_micros=0, hour_requests=0, hour_cost_micros=0, before_recent_requests=0,
                  recent_requests=0, recent_cost_micros=0, week_input_tokens=0, week_output_tokens=0,
                  week_cost_micros=0)
    values.update(kw)
    return ModelUsage(**values)


# ---------------------------------------------------------------- burn rate
def test_burn_rate_leaves_out_one_burst():
    assert burn_per_hour(steady(1000)) == 6000
    assert burn_per_hour([0, 0, 0, 0, 0, 5_000_000]) == 0  # one burst alone is no rate
    assert burn_per_hour([1000, 1000, 1000, 1000, 1000, 9_000_000]) == 6000


# ---------------------------------------------------------------- budget_forecast
def budget(limit=1_000_000, spent=0, reserved=0, agent_id=None, period_end=NOW + timedelta(hours=10)):
    return BudgetFigures(id="bud_1", name="prod-daily", agent_id=agent_id, period="day", limit_micros=limit,
                         spent_micros=spent, reserved_micros=reserved, period_end=period_end)


@pytest.mark.parametrize(("left", "burn_bucket", "fires"), [
    (999_000, 17_000, True),   # 102k/h: 9.8 h left, the period ends in 10 h
    (999_000, 16_500, False),  # 99k/h: 10.09 h left — just after the reset
    (999_000, 0, False),       # nothing spent lately
])
def test_budget_forecast_fires_when_the_budget_runs_out_before_the_period_ends(left, burn_bucket, fires):
    act = activity(budgets=[budget(spent=1_000_000 - left)], burn={"": steady(burn_bucket)})
    found = kinds(act, kind="budget_forecast")
    assert bool(found) is fires
    if fires:
        f = found[0]
        assert f.subject == Subject(budget_id="bud_1")
        ev = f.evidence
        assert ev["budget_id"] == "bud_1" and ev["limit_micros"] == 1_000_000 and ev["spent_micros"] == 1000
        assert ev["burn_micros_per_hour"] == burn_bucket * 6
        assert ev["period_end"] == "2026-12-03T22:00:00Z"
        exhausts = datetime.fromisoformat(ev["exhausts_at"])
        assert NOW < exhausts < NOW + timedelta(hours=10)
        assert "'prod-daily' budget runs out at 2026-12-03 21:" in f.message and "before it resets" in f.message


def test_an_agent_budget_burns_at_its_agent_rate_only():
    act = activity(budgets=[budget(agent_id="agt_a")], burn={"agt_a": steady(0), "agt_b": steady(1_000_000)})
    assert kinds(act, kind="budget_forecast") == []
    act = activity(budgets=[budget(agent_id="agt_a")], burn={"agt_a": steady(100_000)})
    [f] = kinds(act, kind="budget_forecast")
    assert f.subject == Subject(budget_id="bud_1", agent_id="agt_a")
    assert f.severity == "warning"  # 1.67 h left


def test_a_forecast_under_an_hour_is_critical():
    act = activity(budgets=[budget(spent=900_000)], burn={"": steady(20_000)})  # 100k left, 120k/h
    [f] = kinds(act, kind="budget_forecast")
    assert f.severity == "critical"


# ---------------------------------------------------------------- wallet_runway
@pytest.mark.parametrize(("available", "fires"), [(7_190_000, True), (7_200_000, False)])
def test_wallet_runway_fires_under_72_hours(available, fires):
    act = activity(available_micros=available, burn={"agt_a": steady(10_000), "": steady(6_666)})
    # burn: (10_000 + 6_666) * 6 = 99_996 µ/h → 72 h is 7_199_712
    found = kinds(act, kind="wallet_runway")
    assert bool(found) is fires
    if fires:
        ev = found[0].evidence
        assert ev["available_micros"] == available and ev["burn_micros_per_hour"] == 99_996
        assert found[0].subject == Subject()
        assert "$7.190000" in found[0].message


def test_wallet_runway_is_critical_under_a_day():
    [f] = kinds(activity(available_micros=100_000, burn={"": steady(10_000)}), kind="wallet_runway")
    assert f.severity == "critical"


# ---------------------------------------------------------------- spikes
def baseline(hour_requests, hour_cost, days_old=10.0, per_hour=10, cost_per_hour=1000):
    hours = days_old * 24 - 1
    return usage(days_old=days_old, base_requests=int(per_hour * hours), base_cost_micros=int(cost_per_hour * hours),
                 hour_requests=hour_requests, hour_cost_micros=hour_cost)


@pytest.mark.parametrize(("hour_requests", "fires"), [(31, True), (30, False)])
def test_request_spike_over_three_times_the_hourly_baseline(hour_requests, fires):
    found = kinds(activity(models=[baseline(hour_requests, 0)]), kind="request_spike")
    assert bool(found) is fires
    if fires:
        assert found[0].evidence == {"window_requests": 31, "baseline_per_hour": 10.0, "ratio": 3.1}


@pytest.mark.parametrize(("hour_cost", "fires"), [(3001, True), (3000, False)])
def test_cost_spike_over_three_times_the_hourly_baseline(hour_cost, fires):
    found = kinds(activity(models=[baseline(12, hour_cost)]), kind="cost_spike")
    assert bool(found) is fires
    if fires:
        assert found[0].evidence["window_micros"] == 3001 and found[0].evidence["baseline_per_hour"] == 1000


def test_no_spike_without_a_day_of_baseline_or_on_a_handful_of_requests():
    young = usage(days_old=(24 + 0.9) / 24, base_requests=1, base_cost_micros=1, hour_requests=50,
                  hour_cost_micros=50_000)
    assert kinds(activity(models=[young]), kind="request_spike") == []
    few = baseline(9, 9_000, per_hour=1, cost_per_hour=10)  # 9× the baseline, but only 9 requests
    assert kinds(activity(models=[few])) == []


# ---------------------------------------------------------------- rejection_burst
@pytest.mark.parametrize(("count", "fires"), [(10, True), (9, False)])
def test_rejection_burst_for_one_agent(count, fires):
    rejections = [Rejections(agent_id="agt_a", key_id="key_1", count=count - 3, top_reason="policy_violation",
                             top_message="model not allowed"),
                  Rejections(agent_id="agt_a", key_id="key_2", count=3, top_reason="budget_exceeded",
                             top_message=""),
                  Rejections(agent_id="agt_b", key_id="key_3", count=9, top_reason="policy_violation",
                             top_message="")]
    found = kinds(activity(rejections=rejections), kind="rejection_burst")
    assert bool(found) is fires
    if fires:
        [f] = found
        assert f.subject == Subject(agent_id="agt_a")
        assert f.evidence == {"rejections": 10, "window_seconds": 600, "top_reason": "policy_violation"}
        assert "model not allowed" in f.message


def test_rejection_burst_for_a_key_without_agent():
    r = Rejections(agent_id=None, key_id="key_1", count=12, top_reason="rate_limited", top_message="")
    [f] = kinds(activity(rejections=[r]), kind="rejection_burst")
    assert f.subject == Subject(key_id="key_1")


# ---------------------------------------------------------------- unusual_model
def test_unusual_model_once_a_baseline_exists():
    known = usage(days_old=10, before_recent_requests=500, recent_requests=50)
    new = usage(model="openai/o1", days_old=0.1, recent_requests=4, recent_cost_micros=80_000)
    [f] = kinds(activity(models=[known, new]), kind="unusual_model")
    assert f.evidence == {"model": "openai/o1", "provider": "openai", "requests": 4, "spend_micros": 80_000}
    assert f.severity == "info" and f.subject == Subject(model="openai/o1")
    other_provider = usage(model="anthropic/claude-3-opus", provider="anthropic", days_old=0.1, recent_requests=1)
    [g] = kinds(activity(models=[known, other_provider]), kind="unusual_model")
    assert g.severity == "warning"
    # just misses: the project's history covers less than a day before the recent window
    young = usage(days_old=1.9, before_recent_requests=5, recent_requests=5)
    assert kinds(activity(models=[young, new]), kind="unusual_model") == []


# ---------------------------------------------------------------- cheaper_model
def week(model, input_tokens, output_tokens):
    prices = {m.id: m for m in SEED}[model]
    cost = -(-(input_tokens * prices.input_micros_per_mtok + output_tokens * prices.output_micros_per_mtok)
             // 1_000_000)
    return usage(model=model, week_input_tokens=input_tokens, week_output_tokens=output_tokens, week_cost_micros=cost)


def test_cheaper_model_from_catalog_prices_and_real_token_counts():
    catalog = [m for m in SEED if m.provider == "openai"]
    [f] = kinds(activity(models=[week("openai/gpt-4o", 2_000_000, 500_000)], catalog=catalog), kind="cheaper_model")
    ev = f.evidence
    cheapest = min((m for m in catalog if m.kind == "chat" and m.id != "openai/gpt-4o"),
                   key=lambda m: 2_000_000 * m.input_micros_per_mtok + 500_000 * m.output_micros_per_mtok)
    assert ev["alternative"] == cheapest.id
    assert ev["alternative_micros"] == -(-(2_000_000 * cheapest.input_micros_per_mtok
                                           + 500_000 * cheapest.output_micros_per_mtok) // 1_000_000)
    assert ev["saving_micros"] == ev["spend_micros"] - ev["alternative_micros"] > 0
    assert f.subject == Subject(model="openai/gpt-4o")


def test_cheaper_model_just_misses_under_the_minimum_saving():
    catalog = [m for m in SEED if m.provider == "openai"]
    tiny = week("openai/gpt-4o", 1000, 100)  # cents: the saving is under 10 000 µUSDC
    assert kinds(activity(models=[tiny], catalog=catalog), kind="cheaper_model") == []
    th = Thresholds(cheaper_min_saving_micros=0)
    assert kinds(activity(models=[tiny], catalog=catalog), th, kind="cheaper_model") != []


def test_the_cheapest_model_gets_no_advice():
    catalog = [m for m in SEED if m.provider == "openai"]
    cheapest = min((m for m in catalog if m.kind == "chat"),
                   key=lambda m: m.input_micros_per_mtok * 4 + m.output_micros_per_mtok)
    assert kinds(activity(models=[week(cheapest.id, 4_000_000, 1_000_000)], catalog=catalog),
                 kind="cheaper_model") == []


# ---------------------------------------------------------------- idle_key
@pytest.mark.parametrize(("days", "fires"), [(30.01, True), (29.99, False)])
def test_idle_key_unused_for_30_days(days, fires):
    key = KeyUse(key_id="key_1", name="ci", prefix="sk-abc", created_at=NOW - timedelta(days=90),
                 last_used_at=NOW - timedelta(days=days))
    found = kinds(activity(idle_keys=[key]), kind="idle_key")
    assert bool(found) is fires
    if fires:
        assert found[0].evidence["key_id"] == "key_1"
        assert found[0].evidence["last_used_at"].startswith("2026-11-03")


def test_a_never_used_key_counts_from_its_creation():
    key = KeyUse(key_id="key_1", name="ci", prefix="sk-abc", created_at=NOW - timedelta(days=31), last_used_at=None)
    [f] = kinds(activity(idle_keys=[key]), kind="idle_key")
    assert f.evidence["last_used_at"] is None and "since it was created" in f.message


# ---------------------------------------------------------------- the whole
def test_a_quiet_project_has_no_insights_and_a_deleted_one_none_at_all():
    assert evaluate(activity(available_micros=10**9), TH) == []
    loud = activity(active=False, available_micros=1, burn={"": steady(10_000)})
    assert evaluate(loud, TH) == []
    assert [f.kind for f in evaluate(msgspec_replace(loud, active=True), TH)] == ["wallet_runway"]


def msgspec_replace(act, **kw):
    import msgspec

    return msgspec.structs.replace(act, **kw)


def test_money_in_messages_is_exact_to_the_micro():
    assert usd(42) == "$0.000042"
    assert usd(2_800) == "$0.002800"
    assert usd(12_345_678) == "$12.345678"


def test_subjects_have_one_canonical_key():
    assert Subject().key() == ""
    assert Subject(model="m", budget_id="b").key() == Subject(budget_id="b", model="m").key() == "budget_id=b|model=m"


def test_insight_events_go_to_the_budgets_namespace():
    from domain.events import BUDGETS, namespace_for

    assert {namespace_for(t) for t in ("insight.created", "insight.updated", "insight.resolved")} == {BUDGETS}
