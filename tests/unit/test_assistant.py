"""The built-in assistant's pure parts: exact money, UTC periods, and what a question is understood to ask."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from agentic.assistant import _pieces
from agentic.intents import understand
from agentic.tools import Toolbox, UnknownPeriod, for_model, period_of, usd
from server.settings import Settings, SettingsError

NOW = datetime(2026, 12, 3, 14, 30, tzinfo=UTC)  # a Thursday
NAMES = {"models": {"openai/gpt-4o-mini": "gpt-4o-mini", "local/echo-1": "echo-1"},
         "agents": {"agt_1": "scraper", "agt_2": "writer"}, "keys": {"key_1": "ci key"},
         "budgets": {"bud_1": "Research", "bud_2": "Ops monthly"}}


@pytest.mark.parametrize(("micros", "text"), [
    (42, "$0.000042"), (0, "$0.00"), (1, "$0.000001"), (10_000, "$0.01"), (1_500_000, "$1.50"),
    (1_234_567, "$1.234567"), (12_345_000_000, "$12,345.00"), (-250, "-$0.00025")])
def test_money_is_exact_to_the_micro(micros, text):
    assert usd(micros) == text


def test_the_model_sees_each_amount_formatted_beside_it():
    assert for_model({"total_micros": 42, "rows": [{"cost_micros": 7, "requests": 3}], "ok": True}) == {
        "total_micros": 42, "total_usd": "$0.000042", "ok": True,
        "rows": [{"cost_micros": 7, "cost_usd": "$0.000007", "requests": 3}]}


@pytest.mark.parametrize(("name", "since", "until"), [
    ("today", datetime(2026, 12, 3, tzinfo=UTC), NOW),
    ("yesterday", datetime(2026, 12, 2, tzinfo=UTC), datetime(2026, 12, 3, tzinfo=UTC)),
    ("this_week", datetime(2026, 11, 30, tzinfo=UTC), NOW),  # Monday 00:00 UTC, like the week budgets
    ("last_week", datetime(2026, 11, 23, tzinfo=UTC), datetime(2026, 11, 30, tzinfo=UTC)),
    ("this_month", datetime(2026, 12, 1, tzinfo=UTC), NOW),
    ("last_month", datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC)),
    ("last_7_days", datetime(2026, 11, 26, 14, 30, tzinfo=UTC), NOW),
    ("march", datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 4, 1, tzinfo=UTC)),
    ("december", datetime(2026, 12, 1, tzinfo=UTC), NOW),
])
def test_periods_are_utc_windows(name, since, until):
    period = period_of(name, NOW)
    assert (period.since, period.until) == (since, until)


def test_a_month_still_to_come_means_last_years():
    assert period_of("march", datetime(2026, 2, 10, tzinfo=UTC)).since == datetime(2025, 3, 1, tzinfo=UTC)


def test_an_unknown_period_is_refused():
    with pytest.raises(UnknownPeriod):
        period_of("next tuesday", NOW)


@pytest.mark.parametrize(("question", "tool", "args"), [
    ("How much did we spend today?", "spend", {"period": "today"}),
    ("what did we spend yesterday by model", "spend", {"period": "yesterday", "by": "model"}),
    ("spend this week per agent", "spend", {"period": "this_week", "by": "agent"}),
    ("costs in the last 7 days by key", "spend", {"period": "last_7_days", "by": "key"}),
    ("what did gpt-4o-mini cost in March?", "spend", {"period": "march", "model": "openai/gpt-4o-mini"}),
    ("how much did the scraper spend this month", "spend", {"period": "this_month", "agent": "scraper"}),
    ("How much is left in the Research budget?", "budgets", {"name": "bud_1"}),
    ("will the ops monthly budget run out?", "budgets", {"name": "bud_2"}),
    ("what's my wallet balance and runway", "wallet", {}),
    ("why was req_0192abc refused?", "request", {"request_id": "req_0192abc"}),
    ("why was my last request rejected", "request", {}),
    ("which requests are waiting for approval?", "approvals", {}),
    ("show recent deposits and payouts", "payments", {}),
    ("any insights or anomalies?", "insights", {}),
    ("what did prj_0abc spend today", "spend", {"period": "today", "project_id": "prj_0abc"}),
    ("help", "help", {}),
    ("write me a poem about the sea", None, {}),
])
def test_questions_are_understood(question, tool, args):
    intent = understand(question, NAMES)
    assert (intent.tool, intent.args) == (tool, args)


def test_a_follow_up_keeps_the_previous_intent_with_new_slots():
    first = understand("how much did we spend today by agent?", NAMES)
    follow = understand("and yesterday?", NAMES, first)
    assert (follow.tool, follow.args) == ("spend", {"period": "yesterday", "by": "agent"})
    assert understand("and a poem?", NAMES, first).tool is None


@pytest.mark.parametrize("text", ["", "one", "Default project spent $0.000036 today, over 5 requests.",
                                  "  leading and trailing  spaces  "])
def test_the_deltas_join_back_to_exactly_the_answer(text):
    assert "".join(_pieces(text)) == text


def test_a_budget_forecast_runs_at_the_periods_average_burn():
    from domain.budgets import Budget

    start = datetime(2026, 12, 1, tzinfo=UTC)
    budget = Budget(id="bud_1", project_id="prj_1", agent_id=None, name="Research", period="month",
                    limit_micros=1_000_000, spent_micros=300_000, reserved_micros=50_000, period_start=start,
                    alert_thresholds=[], alerted=[], active=True, created_at=start, updated_at=start)
    toolbox = Toolbox(None, "usr_1", "prj_1", lambda: NOW)  # type: ignore[arg-type]
    line = toolbox._budget(budget, {})
    elapsed = int((NOW - start).total_seconds())  # 2 days 14.5 h
    left = int((datetime(2027, 1, 1, tzinfo=UTC) - NOW).total_seconds())
    assert line["remaining_micros"] == 650_000
    assert line["burn_micros_per_hour"] == 300_000 * 3600 // elapsed
    assert line["forecast_spent_micros"] == 300_000 + -(-300_000 * left // elapsed)  # well over the limit
    exhausts = NOW + timedelta(seconds=650_000 * elapsed // 300_000)
    assert line["exhausts_at"] == exhausts.isoformat().replace("+00:00", "Z")
    assert line["runs_out_before_period_end"] is True


def test_the_assistant_model_setting_must_name_a_catalog_model():
    with pytest.raises(SettingsError, match="SMARTSPACE_ASSISTANT_MODEL"):
        Settings(assistant_model="gpt-4o-mini")
    assert Settings(assistant_model="openai/gpt-4o-mini").assistant_model == "openai/gpt-4o-mini"
