"""The risk formula factor by factor: each one fires on one side of its threshold and not on the other."""

from __future__ import annotations

import pytest

from agentic import risk
from domain.catalog import SEED
from domain.decisions import Activity
from tests.unit.brain_fakes import NOW, USDC

MODEL = next(m for m in SEED if m.id == "openai/gpt-4o-mini")
AVG = 1000


def baseline(samples: int = 10, **overrides) -> Activity:
    values = dict(samples=samples, avg_cost_micros=AVG, avg_requests_per_day=samples / 30, providers=["openai"],
                  models=["openai/gpt-4o-mini"], hours=[NOW.hour], agents=["agt_1"])
    values.update(overrides)
    return Activity(**values)


def score(activity: Activity, cost: int = AVG, agent_id: str | None = "agt_1", usage: float | None = None,
          now=NOW):
    total, factors = risk.assess(activity, cost_micros=cost, model=MODEL, agent_id=agent_id, now=now,
                                 daily_budget_usage=usage)
    return total, {f.type: f.contribution for f in factors}


def test_a_typical_request_scores_the_base_one():
    assert score(baseline()) == (1.0, {})


def test_cost_above_ten_dollars_without_baseline():
    assert score(Activity(), cost=10 * USDC) == (1.0, {})
    assert score(Activity(), cost=10 * USDC + 1) == (3.0, {"cost": 2.0})


def test_cost_more_than_four_times_the_average_adds_three():
    assert score(baseline(), cost=4 * AVG + 1)[1] == {"cost": 3.0}
    assert score(baseline(), cost=4 * AVG)[1] == {"cost": 1.5}  # d = 3: only the "> 2" band


def test_cost_more_than_three_times_the_average_adds_one_and_a_half():
    assert score(baseline(), cost=3 * AVG + 1)[1] == {"cost": 1.5}
    assert score(baseline(), cost=3 * AVG)[1] == {}


def test_the_baseline_is_ignored_under_ten_samples():
    # 10 samples: the typical-behaviour factors apply; 9: they do not, and the absolute cost rule does.
    unusual = dict(providers=["anthropic"], models=["anthropic/claude-3-haiku"], hours=[3], agents=["agt_9"])
    total, factors = score(baseline(10, **unusual), cost=5 * AVG)
    assert set(factors) == {"cost", "provider", "model", "hour", "agent"}
    assert total == 1 + 3 + 1 + 0.5 + 0.5 + 1.5
    assert score(baseline(9, **unusual), cost=5 * AVG) == (1.0, {})


def test_an_unusual_provider_model_hour_and_agent_each_add_their_weight():
    assert score(baseline(providers=["anthropic"]))[1] == {"provider": 1.0}
    assert score(baseline(models=["openai/gpt-4o"]))[1] == {"model": 0.5}
    assert score(baseline(models=["gpt-4o-mini"]))[1] == {}  # the upstream name counts as the same model
    assert score(baseline(hours=[(NOW.hour + 1) % 24]))[1] == {"hour": 0.5}
    assert score(baseline(), agent_id="agt_new")[1] == {"agent": 1.5}
    assert score(baseline(), agent_id=None)[1] == {}


def test_a_busy_day_adds_two():
    assert score(Activity(requests_today=101))[1] == {"rate": 2.0}
    assert score(Activity(requests_today=100))[1] == {}
    # with a baseline: only when also more than 3x the daily average
    assert score(baseline(samples=1200, requests_today=121, avg_requests_per_day=40))[1] == {"rate": 2.0}
    assert score(baseline(samples=1200, requests_today=120, avg_requests_per_day=40))[1] == {}


@pytest.mark.parametrize("rejections,added", [(2, None), (3, 1.0), (4, 1.0), (5, 2.0), (9, 2.0)])
def test_recent_rejections(rejections, added):
    factors = score(Activity(recent_rejections=rejections))[1]
    assert factors == ({} if added is None else {"rejections": added})


def test_budget_exhaustion_needs_both_high_usage_and_many_requests():
    assert score(Activity(requests_today=51), usage=0.91)[1] == {"budget_exhaustion": 1.5}
    assert score(Activity(requests_today=51), usage=0.9)[1] == {}
    assert score(Activity(requests_today=50), usage=0.99)[1] == {}
    assert score(Activity(requests_today=51), usage=None)[1] == {}


def test_the_score_is_capped_at_ten():
    activity = baseline(providers=["x"], models=["x/y"], hours=[], agents=[], requests_today=500,
                        recent_rejections=9)
    total, factors = score(activity, cost=100 * AVG, agent_id="agt_new", usage=1.0)
    assert sum(factors.values()) + 1 > 10
    assert total == 10.0


@pytest.mark.parametrize("value,level", [(2.0, "very_low"), (2.01, "low"), (4.0, "low"), (6.0, "medium"),
                                         (6.5, "high"), (8.0, "high"), (8.01, "critical")])
def test_levels(value, level):
    assert risk.level(value) == level
