"""Decision-table tests for a virtual key's terms in the brain: expiry, allowed models, its own rate limits, and
which budgets apply to a request made with it (one case that hits each rule, one that just misses it)."""

from __future__ import annotations

from datetime import timedelta

import msgspec

from agentic.pipeline import decide
from domain.decisions import KeyState
from domain.policies import RateLimitRules, Window
from tests.unit.brain_fakes import NOW, PROJECT, FakeView, budget, request

COST = 750  # request(): 1000 in + 1000 out on gpt-4o-mini


def with_key(view: FakeView, **terms) -> FakeView:
    view.keys["key_1"] = msgspec.structs.replace(view.keys["key_1"], **terms)
    return view


async def test_a_key_expired_at_or_before_now_is_refused_and_one_a_micro_later_is_not():
    decision = await decide(with_key(FakeView(), expires_at=NOW), request(), NOW)
    assert (decision.outcome, decision.reasons[0].code, decision.error_code) == (
        "REJECTED", "key_expired", "policy_violation")
    later = await decide(with_key(FakeView(), expires_at=NOW + timedelta(microseconds=1)), request(), NOW)
    assert later.outcome == "APPROVED", later.reasons


async def test_a_model_outside_the_keys_allowed_models_is_refused_naming_the_list():
    view = with_key(FakeView(), allowed_models=["local/echo-1", "openai/gpt-4o"])
    decision = await decide(view, request(), NOW)
    assert (decision.outcome, decision.reasons[0].code, decision.error_code) == (
        "REJECTED", "model_not_allowed_for_key", "policy_violation")
    assert "local/echo-1, openai/gpt-4o" in decision.reasons[0].message
    assert decision.budget_ids == []  # refused before the funds step
    allowed = await decide(view, request(model="openai/gpt-4o"), NOW)
    assert allowed.outcome != "REJECTED", allowed.reasons


async def test_an_empty_allowed_models_list_allows_nothing_and_none_allows_everything():
    refused = await decide(with_key(FakeView(), allowed_models=[]), request(), NOW)
    assert refused.reasons[0].code == "model_not_allowed_for_key" and "(none)" in refused.reasons[0].message
    assert (await decide(with_key(FakeView(), allowed_models=None), request(), NOW)).outcome == "APPROVED"


async def test_a_bare_model_id_is_checked_as_the_resolved_catalog_id():
    view = with_key(FakeView(), allowed_models=["openai/gpt-4o-mini"])
    assert (await decide(view, request(model="gpt-4o-mini"), NOW)).outcome == "APPROVED"


async def test_the_keys_own_rate_limit_counts_in_the_key_window():
    view = with_key(FakeView(), rate_limits={"per_minute": 2, "per_hour": None, "per_day": None})
    view.counts["key:key_1:60"] = 2
    decision = await decide(view, request(), NOW)
    assert (decision.reasons[0].code, decision.error_code, decision.retry_after_seconds) == (
        "rate_limited", "rate_limited", 60)
    assert "the key's own limit" in decision.reasons[0].message
    view.counts["key:key_1:60"] = 1
    assert (await decide(view, request(), NOW)).outcome == "APPROVED"


async def test_the_lower_of_the_policys_per_key_window_and_the_keys_own_holds():
    view = with_key(FakeView(), rate_limits={"per_minute": 10})
    view.set_policy(rate_limits=RateLimitRules(key=Window(per_minute=3)))
    decision = await decide(view, request(), NOW)
    [limit] = [r for r in decision.rate_limits if r.key == "key:key_1"]
    assert (limit.limit, limit.source) == (3, "project_policy")
    view = with_key(FakeView(), rate_limits={"per_minute": 2})
    view.set_policy(rate_limits=RateLimitRules(key=Window(per_minute=3)))
    [limit] = [r for r in (await decide(view, request(), NOW)).rate_limits if r.key == "key:key_1"]
    assert (limit.limit, limit.source) == (2, "key")


async def test_a_keys_budget_applies_to_its_requests_only():
    view = FakeView()
    view.keys["key_2"] = KeyState(id="key_2", project_id=PROJECT, agent_id=None, revoked=False)
    view.budget_list = [msgspec.structs.replace(budget(COST - 1, id_="bud_k1"), key_id="key_1"),
                        msgspec.structs.replace(budget(10 * COST, id_="bud_k2"), key_id="key_2"),
                        budget(10 * COST, id_="bud_p")]
    refused = await decide(view, request(), NOW)
    assert (refused.outcome, refused.error_code) == ("REJECTED", "budget_exceeded")
    other = await decide(view, request(key_id="key_2", actor="key:key_2"), NOW)
    assert other.outcome == "APPROVED" and other.budget_ids == ["bud_k2", "bud_p"]
    view.budget_list[0] = msgspec.structs.replace(view.budget_list[0], limit_micros=COST)
    fits = await decide(view, request(), NOW)
    assert fits.outcome == "APPROVED" and fits.budget_ids == ["bud_k1", "bud_p"]
