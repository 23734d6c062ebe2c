"""Decision-table tests: for every rule of the brain, a case that hits it and one that just misses it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import msgspec
import pytest

from agentic.pipeline import decide
from domain.budgets import period_start
from domain.decisions import Activity, AgentState, KeyState, ProjectState
from domain.policies import RateLimitRules, Window
from tests.unit.brain_fakes import NOW, PROJECT, USDC, FakeView, budget, request

COST = 750  # request(): 1000 in + 1000 out on gpt-4o-mini


def codes(decision) -> list[str]:
    return [r.code for r in decision.reasons]


async def run(view: FakeView, now: datetime = NOW, **req):
    return await decide(view, request(**req), now)


async def assert_approved(view: FakeView, now: datetime = NOW, **req):
    decision = await run(view, now, **req)
    assert decision.outcome == "APPROVED", decision.reasons
    return decision


async def assert_rejected(view: FakeView, code: str, error_code: str, now: datetime = NOW, **req):
    decision = await run(view, now, **req)
    assert decision.outcome == "REJECTED", decision.reasons
    assert decision.reasons[0].code == code, codes(decision)
    assert decision.error_code == error_code
    return decision


# ---------------------------------------------------------------- the happy path
async def test_a_plain_request_is_approved_with_its_estimate_and_reasons_in_order():
    decision = await assert_approved(FakeView())
    assert decision.estimated_cost_micros == COST
    assert decision.model == "openai/gpt-4o-mini" and decision.provider == "openai"
    assert decision.upstream_model == "gpt-4o-mini" and decision.max_output_tokens == 1000
    assert codes(decision) == ["within_policy", "risk_very_low", "cost_estimated"]
    assert [r.step for r in decision.reasons] == ["outcome", "risk", "cost"]
    assert decision.risk_score == 1.0 and decision.risk_factors == []
    assert decision.error_code is None and decision.tier == "FLASH"


# ---------------------------------------------------------------- 1. structure
async def test_unsupported_operation_is_rejected_and_chat_is_not():
    await assert_rejected(FakeView(), "operation_unsupported", "invalid_request", operation="image")
    await assert_approved(FakeView(), operation="chat")


async def test_input_tokens_must_be_between_zero_and_the_system_maximum():
    view = FakeView()
    view.set_system(max_tokens_per_request=5000)
    await assert_rejected(view, "input_tokens_out_of_range", "invalid_request", input_tokens=-1)
    await assert_approved(view, input_tokens=0)
    await assert_rejected(view, "input_tokens_out_of_range", "invalid_request", input_tokens=5001)
    await assert_approved(view, input_tokens=5000)


async def test_max_tokens_must_be_at_least_one():
    await assert_rejected(FakeView(), "max_tokens_out_of_range", "invalid_request", max_output_tokens=0)
    await assert_approved(FakeView(), max_output_tokens=1)


async def test_unknown_models_are_rejected_never_priced_at_zero():
    decision = await assert_rejected(FakeView(), "model_not_found", "not_found", model="openai/gpt-7")
    assert decision.estimated_cost_micros == 0 and decision.model is None
    await assert_rejected(FakeView(), "model_not_found", "not_found", model="openai/gpt")  # no fuzzy matching


async def test_inactive_models_are_rejected():
    view = FakeView()
    view.catalog = [msgspec.structs.replace(m, active=m.id != "openai/gpt-4o-mini") for m in view.catalog]
    await assert_rejected(view, "model_inactive", "not_found")
    await assert_approved(view, model="openai/gpt-4o")


async def test_a_bare_model_id_is_accepted_only_when_unambiguous():
    view = FakeView()
    decision = await assert_approved(view, model="gpt-4o-mini")
    assert decision.model == "openai/gpt-4o-mini"
    twin = msgspec.structs.replace(view.catalog[0], id="azure/gpt-4o-mini", provider="azure")
    view.catalog.append(twin)
    await assert_rejected(view, "model_ambiguous", "invalid_request", model="gpt-4o-mini")


async def test_an_embedding_model_cannot_serve_chat_and_embeddings_cost_no_output():
    await assert_rejected(FakeView(), "operation_mismatch", "invalid_request", model="openai/text-embedding-3-small")
    decision = await assert_approved(FakeView(), model="openai/text-embedding-3-small", operation="embedding",
                                     input_tokens=1_000_000, max_output_tokens=None)
    assert decision.estimated_cost_micros == 20_000 and decision.max_output_tokens == 0


async def test_input_beyond_the_context_window_is_rejected():
    await assert_rejected(FakeView(), "context_window_exceeded", "invalid_request", model="local/echo-1",
                          input_tokens=32_769)
    await assert_approved(FakeView(), model="local/echo-1", input_tokens=32_768)


async def test_output_estimate_uses_max_tokens_or_the_default_capped_by_the_model():
    view = FakeView(default_output_tokens=2000)
    decision = await assert_approved(view, max_output_tokens=None)
    assert decision.max_output_tokens == 2000
    assert decision.estimated_cost_micros == 150 + 1200
    decision = await assert_approved(view, model="openai/gpt-4", max_output_tokens=50_000, input_tokens=0)
    assert decision.max_output_tokens == 8192  # gpt-4's own maximum
    assert decision.estimated_cost_micros == -(-8192 * 60_000_000 // 1_000_000)


async def test_the_estimate_rounds_up_to_the_next_micro():
    decision = await assert_approved(FakeView(), input_tokens=1, max_output_tokens=1)
    assert decision.estimated_cost_micros == 1  # 0.15 + 0.6 µUSDC → 1


# ---------------------------------------------------------------- 2. identity
async def test_a_missing_project_is_not_found():
    view = FakeView()
    await assert_rejected(view, "project_not_found", "not_found", project_id="prj_other")
    view.projects[PROJECT] = ProjectState(id=PROJECT, status="deleted")
    await assert_rejected(view, "project_not_found", "not_found")


async def test_a_suspended_project_is_refused_and_an_active_one_is_not():
    view = FakeView()
    view.projects[PROJECT] = ProjectState(id=PROJECT, status="suspended")
    await assert_rejected(view, "project_inactive", "policy_violation")
    view.projects[PROJECT] = ProjectState(id=PROJECT, status="active")
    await assert_approved(view)


async def test_a_revoked_key_is_refused():
    view = FakeView()
    view.keys["key_1"] = KeyState(id="key_1", project_id=PROJECT, agent_id=None, revoked=True)
    await assert_rejected(view, "key_revoked", "policy_violation")
    view.keys["key_1"] = KeyState(id="key_1", project_id=PROJECT, agent_id=None, revoked=False)
    await assert_approved(view)


async def test_a_key_of_another_project_is_refused():
    view = FakeView()
    view.keys["key_x"] = KeyState(id="key_x", project_id="prj_other", agent_id=None, revoked=False)
    await assert_rejected(view, "key_not_found", "policy_violation", key_id="key_x")
    await assert_approved(view, key_id=None)  # a user acting directly has no key


async def test_an_agent_key_acts_for_its_agent_only():
    view = FakeView()
    view.keys["key_a"] = KeyState(id="key_a", project_id=PROJECT, agent_id="agt_1", revoked=False)
    view.budget_list = [budget(10 * USDC, agent_id="agt_1")]
    decision = await assert_approved(view, key_id="key_a")  # the agent is taken from the key
    assert decision.budget_ids == ["bud_1"]
    await assert_rejected(view, "agent_mismatch", "policy_violation", key_id="key_a", agent_id="agt_2")


async def test_an_inactive_or_foreign_agent_is_refused():
    view = FakeView()
    view.agents["agt_1"] = AgentState(id="agt_1", project_id=PROJECT, status="disabled")
    await assert_rejected(view, "agent_inactive", "policy_violation", agent_id="agt_1")
    view.agents["agt_x"] = AgentState(id="agt_x", project_id="prj_other", status="active")
    await assert_rejected(view, "agent_not_found", "not_found", agent_id="agt_x")
    await assert_approved(view, agent_id="agt_2")


# ---------------------------------------------------------------- 3. system policy
async def test_system_blocked_provider_model_and_operation():
    view = FakeView()
    view.set_system(blocked_providers=["openai"])
    await assert_rejected(view, "system_provider_blocked", "policy_violation")
    await assert_approved(view, model="anthropic/claude-3-haiku")
    view = FakeView()
    view.set_system(blocked_models=["openai/gpt-4o-mini"])
    await assert_rejected(view, "system_model_blocked", "policy_violation")
    await assert_approved(view, model="openai/gpt-4o")
    view = FakeView()
    view.set_system(blocked_operations=["embedding"])
    await assert_rejected(view, "system_operation_blocked", "policy_violation",
                          model="openai/text-embedding-3-small", operation="embedding")
    await assert_approved(view)
    view.set_system(blocked_operations=["openai.gpt-4o-*.chat"])
    await assert_rejected(view, "system_operation_blocked", "policy_violation")
    await assert_approved(view, model="openai/gpt-4o")


async def test_system_per_request_cap_at_the_limit_passes_one_micro_over_fails():
    view = FakeView()
    view.set_policy(max_per_request_micros=None, require_approval_above_micros=None)
    view.set_system(max_per_request_micros=COST)
    await assert_approved(view)
    view.set_system(max_per_request_micros=COST - 1)
    await assert_rejected(view, "system_request_cap", "policy_violation")


async def test_system_daily_cap_counts_todays_spend():
    view = FakeView(recent=Activity(spent_today_micros=1000))
    view.set_system(max_per_day_micros=1000 + COST)
    await assert_approved(view)
    view.set_system(max_per_day_micros=1000 + COST - 1)
    await assert_rejected(view, "system_daily_cap", "policy_violation")


# ---------------------------------------------------------------- 4. project policy
async def test_an_inactive_policy_refuses_everything():
    view = FakeView()
    view.set_policy(is_active=False)
    await assert_rejected(view, "policy_inactive", "policy_violation")
    view.set_policy(is_active=True)
    await assert_approved(view)


async def test_provider_allow_and_block_lists():
    view = FakeView()
    view.set_policy(blocked_providers=["openai"])
    await assert_rejected(view, "provider_blocked", "policy_violation")
    view = FakeView()
    view.set_policy(allowed_providers=["anthropic"])
    await assert_rejected(view, "provider_not_allowed", "policy_violation")
    await assert_approved(view, model="anthropic/claude-3-haiku")
    view.set_policy(allowed_providers=[])  # an empty list allows nothing (the original allowed all: a bug)
    await assert_rejected(view, "provider_not_allowed", "policy_violation", model="anthropic/claude-3-haiku")


async def test_model_allow_and_block_lists():
    view = FakeView()
    view.set_policy(blocked_models=["openai/gpt-4o-mini"])
    await assert_rejected(view, "model_blocked", "policy_violation")
    await assert_approved(view, model="openai/gpt-4o")
    view = FakeView()
    view.set_policy(allowed_models=["openai/gpt-4o"])
    await assert_rejected(view, "model_not_allowed", "policy_violation")
    await assert_approved(view, model="openai/gpt-4o")


async def test_every_violation_of_a_step_is_listed_in_order():
    view = FakeView()
    view.set_policy(is_active=False, blocked_providers=["openai"], blocked_models=["openai/gpt-4o-mini"])
    decision = await assert_rejected(view, "policy_inactive", "policy_violation")
    assert codes(decision) == ["policy_inactive", "provider_blocked", "model_blocked"]


async def test_forbidden_operations_match_provider_model_operation():
    view = FakeView()
    view.set_policy(forbidden_operations=["openai.gpt-4o-mini.chat"])
    await assert_rejected(view, "operation_forbidden", "policy_violation")
    await assert_approved(view, model="openai/gpt-4o")
    view.set_policy(forbidden_operations=["openai.*.embedding"])
    await assert_approved(view)
    await assert_rejected(view, "operation_forbidden", "policy_violation", model="openai/text-embedding-3-small",
                          operation="embedding")


async def test_per_request_maximum_at_the_limit_passes_one_micro_over_fails():
    view = FakeView()
    view.set_policy(max_per_request_micros=COST)
    await assert_approved(view)
    view.set_policy(max_per_request_micros=COST - 1)
    await assert_rejected(view, "request_limit_exceeded", "policy_violation")


# ---------------------------------------------------------------- 5. rate limits
@pytest.mark.parametrize("scope,bucket", [("key", "key:key_1"), ("agent", "agent:agt_1"),
                                          ("project", f"project:{PROJECT}")])
@pytest.mark.parametrize("window,seconds", [("per_minute", 60), ("per_hour", 3600), ("per_day", 86400)])
async def test_rate_limits_per_scope_and_window(scope, bucket, window, seconds):
    view = FakeView()
    view.set_policy(rate_limits=RateLimitRules(**{scope: Window(**{window: 5})}))
    view.counts[f"{bucket}:{seconds}"] = 4
    decision = await assert_approved(view, agent_id="agt_1")
    assert any(limit.bucket == f"{bucket}:{seconds}" and limit.limit == 5 for limit in decision.rate_limits)
    view.counts[f"{bucket}:{seconds}"] = 5
    decision = await assert_rejected(view, "rate_limited", "rate_limited", agent_id="agt_1")
    assert decision.retry_after_seconds == seconds


async def test_the_system_rate_limit_applies_per_project():
    view = FakeView()
    view.set_system(max_rate_per_minute=3)
    view.counts[f"system:project:{PROJECT}:60"] = 2
    await assert_approved(view)
    view.counts[f"system:project:{PROJECT}:60"] = 3
    await assert_rejected(view, "rate_limited", "rate_limited")


async def test_the_brain_only_peeks_at_rate_limits():
    view = FakeView()
    view.set_policy(rate_limits=RateLimitRules(key=Window(per_minute=1)))
    for _ in range(3):
        await assert_approved(view)  # a peek never counts: nothing was acquired
    assert len(view.peeked) == 3


# ---------------------------------------------------------------- 6. time windows
async def test_allowed_hours_are_utc_hours():
    view = FakeView()
    view.set_policy(allowed_hours=list(range(8, 18)))
    await assert_approved(view, now=NOW.replace(hour=8, minute=0))
    await assert_rejected(view, "outside_allowed_hours", "policy_violation", now=NOW.replace(hour=7, minute=59))
    await assert_approved(view, now=NOW.replace(hour=17, minute=59))
    await assert_rejected(view, "outside_allowed_hours", "policy_violation", now=NOW.replace(hour=18))


async def test_allowed_days_start_with_monday_as_zero():
    view = FakeView()
    view.set_policy(allowed_days=[0, 1, 2, 3, 4])
    await assert_approved(view, now=NOW)  # Wednesday
    friday, saturday = NOW + timedelta(days=2), NOW + timedelta(days=3)
    await assert_approved(view, now=friday)
    await assert_rejected(view, "outside_allowed_days", "policy_violation", now=saturday)


# ---------------------------------------------------------------- 7-8. funds
async def test_wallet_must_cover_the_estimate():
    from domain.decisions import WalletState

    view = FakeView(wallet_state=WalletState(balance_micros=COST + 100, reserved_micros=100))
    await assert_approved(view)
    view.wallet_state = WalletState(balance_micros=COST + 99, reserved_micros=100)
    await assert_rejected(view, "insufficient_funds", "insufficient_funds")
    view.wallet_state = None  # fails closed: no wallet is no money
    await assert_rejected(view, "insufficient_funds", "insufficient_funds")


async def test_a_budget_fits_exactly_or_is_exceeded_by_one_micro():
    view = FakeView()
    view.budget_list = [budget(1000 + 200 + COST, spent=1000, reserved=200)]
    decision = await assert_approved(view)
    assert decision.budget_ids == ["bud_1"]
    view.budget_list = [budget(1000 + 200 + COST - 1, spent=1000, reserved=200)]
    await assert_rejected(view, "budget_exceeded", "budget_exceeded")


async def test_every_applicable_budget_is_checked_and_other_agents_budgets_are_not():
    view = FakeView()
    view.budget_list = [budget(10 * USDC, id_="bud_project"),
                        budget(COST - 1, agent_id="agt_2", id_="bud_agent2"),
                        budget(COST, agent_id="agt_1", id_="bud_agent1")]
    decision = await assert_approved(view, agent_id="agt_1")
    assert decision.budget_ids == ["bud_project", "bud_agent1"]
    decision = await assert_rejected(view, "budget_exceeded", "budget_exceeded", agent_id="agt_2")
    assert "bud_agent2" in decision.reasons[0].message
    decision = await assert_approved(view)  # no agent: only project-wide budgets apply
    assert decision.budget_ids == ["bud_project"]


async def test_a_budget_whose_period_rolled_over_starts_from_zero():
    view = FakeView()
    yesterday = datetime(2026, 11, 24, tzinfo=UTC)
    view.budget_list = [budget(COST, spent=COST, period="day", period_start=yesterday)]
    await assert_approved(view)
    view.budget_list = [budget(COST, spent=COST, period="day", period_start=datetime(2026, 11, 25, tzinfo=UTC))]
    await assert_rejected(view, "budget_exceeded", "budget_exceeded")
    view.budget_list = [budget(COST, spent=COST, period="total", period_start=yesterday)]
    await assert_rejected(view, "budget_exceeded", "budget_exceeded")


async def test_the_brain_rolls_periods_on_utc_boundaries_whatever_the_clocks_zone():
    # 02:30 on 26 Nov in UTC+14 is still 25 Nov in UTC: a day budget spent on the 25th is still spent.
    ahead = NOW.astimezone(timezone(timedelta(hours=14)))
    assert ahead.day == 26
    view = FakeView()
    view.budget_list = [budget(COST, spent=COST, period="day", period_start=datetime(2026, 11, 25, tzinfo=UTC))]
    await assert_rejected(view, "budget_exceeded", "budget_exceeded", now=ahead)


def test_periods_follow_utc_calendar_boundaries():
    assert period_start("day", NOW) == datetime(2026, 11, 25, tzinfo=UTC)
    assert period_start("week", NOW) == datetime(2026, 11, 23, tzinfo=UTC)  # Monday
    assert period_start("month", NOW) == datetime(2026, 11, 1, tzinfo=UTC)
    assert period_start("total", NOW) is None


# ---------------------------------------------------------------- 9-10. risk and outcome
def rejections(n: int) -> Activity:
    return Activity(recent_rejections=n)


async def test_risk_above_max_risk_score_is_rejected_and_at_it_is_not():
    view = FakeView(recent=rejections(5))  # 1 + 2 = 3.0
    view.set_policy(max_risk_score=3.0, review_risk_above=3.0)
    decision = await assert_approved(view)
    assert decision.risk_score == 3.0 and [f.type for f in decision.risk_factors] == ["rejections"]
    view.set_policy(max_risk_score=2.9, review_risk_above=2.9)
    decision = await assert_rejected(view, "risk_too_high", "policy_violation")
    assert decision.risk_score == 3.0


async def test_risk_in_the_high_band_is_held_for_review():
    view = FakeView(recent=Activity(recent_rejections=5, requests_today=101))  # 1 + 2 + 2 = 5.0
    view.set_policy(review_risk_above=5.0)
    await assert_approved(view)
    view.set_policy(review_risk_above=4.9)
    decision = await run(view)
    assert decision.outcome == "REQUIRES_REVIEW" and codes(decision)[0] == "high_risk"
    assert decision.error_code is None


async def test_cost_at_the_approval_threshold_is_held_and_one_micro_below_is_not():
    view = FakeView()
    view.set_policy(require_approval_above_micros=COST)
    decision = await run(view)
    assert decision.outcome == "REQUIRES_REVIEW" and codes(decision)[0] == "approval_threshold"
    view.set_policy(require_approval_above_micros=COST + 1)
    await assert_approved(view)
    view.set_policy(require_approval_above_micros=None)
    await assert_approved(view)


async def test_the_default_policy_holds_requests_of_five_usdc_or_more():
    view = FakeView()
    big = msgspec.structs.replace(view.catalog[0], id="test/big", provider="test", name="big",
                                  input_micros_per_mtok=5 * USDC, output_micros_per_mtok=0,
                                  context_window=2_000_000)
    view.catalog.append(big)
    decision = await run(view, model="test/big", input_tokens=999_999, max_output_tokens=1)
    assert decision.estimated_cost_micros == 4_999_995 and decision.outcome == "APPROVED"
    decision = await run(view, model="test/big", input_tokens=1_000_000, max_output_tokens=1)
    assert decision.estimated_cost_micros == 5 * USDC and decision.outcome == "REQUIRES_REVIEW"
    assert codes(decision)[0] == "approval_threshold"


async def test_tier_is_flash_below_one_dollar_and_low_risk_else_pro():
    view = FakeView()
    # gpt-4.1: 2 µUSDC per input token, 8 per output token
    decision = await assert_approved(view, model="openai/gpt-4.1", input_tokens=499_995, max_output_tokens=1)
    assert decision.estimated_cost_micros == 999_998 and decision.tier == "FLASH"
    decision = await assert_approved(view, model="openai/gpt-4.1", input_tokens=499_996, max_output_tokens=1)
    assert decision.estimated_cost_micros == 1_000_000 and decision.tier == "PRO"
    view.recent = Activity(recent_rejections=5, requests_today=101)  # risk 5.0
    decision = await assert_approved(view)
    assert decision.risk_score == 5.0 and decision.tier == "PRO"
    view.recent = Activity(recent_rejections=5, requests_today=100)  # risk 3.0
    assert (await assert_approved(view)).tier == "FLASH"


async def test_a_rejection_stops_before_later_steps():
    view = FakeView()
    view.set_policy(blocked_providers=["openai"])
    view.budget_list = [budget(1)]
    decision = await assert_rejected(view, "provider_blocked", "policy_violation")
    assert codes(decision) == ["provider_blocked"]
    assert decision.risk_score == 0.0 and decision.budget_ids == []


async def test_the_decision_names_the_policy_version():
    view = FakeView(version=7)
    assert (await assert_approved(view)).policy_version == 7




async def test_an_unknown_agent_spending_over_fifty_dollars_is_escalated():
    view = FakeView(recent=Activity(samples=10, avg_cost_micros=20 * USDC, avg_requests_per_day=1,
                                    providers=["test"], models=["test/big"], hours=[NOW.hour], agents=["agt_1"]))
    view.set_policy(max_per_request_micros=None, require_approval_above_micros=None)
    big = msgspec.structs.replace(view.catalog[0], id="test/big", provider="test", name="big",
                                  input_micros_per_mtok=100 * USDC, output_micros_per_mtok=0, context_window=10**6)
    view.catalog.append(big)
    over = dict(model="test/big", input_tokens=500_001, max_output_tokens=1)  # 50.0001 USDC
    decision = await run(view, agent_id="agt_2", **over)
    assert decision.outcome == "REQUIRES_REVIEW" and codes(decision)[0] == "escalation"
    await assert_approved(view, agent_id="agt_1", **over)  # a known agent
    await assert_approved(view, agent_id="agt_2", model="test/big", input_tokens=500_000, max_output_tokens=1)
