"""Policy validation (field-level errors), defaults from the original, operation patterns, rate windows."""

from __future__ import annotations

import msgspec
import pytest

from domain.errors import InvalidRequest
from domain.policies import (
    ProjectPolicy,
    RateLimitRules,
    SystemPolicy,
    Window,
    load,
    operation_matches,
    parse,
    rate_limits_for,
    recipient_refusal,
)

A = "0x2b5ad5c4795c026514f8317c7a215e218dccd6cf"
A_EIP55 = "0x2B5AD5c4795c026514f8317c7a215E218DcCD6cF"
B = "0x0f0fc6a2617b916639f2dbbb04c0871733797afe"


def errors_of(body) -> dict[str, str]:
    with pytest.raises(InvalidRequest) as exc:
        parse(msgspec.json.encode(body) if not isinstance(body, bytes) else body)
    assert exc.value.status == 422
    details = exc.value.details
    assert details["field"] == details["errors"][0]["field"]
    return {e["field"]: e["message"] for e in details["errors"]}


def test_defaults_follow_the_original():
    p = ProjectPolicy()
    assert p.is_active and p.max_risk_score == 7.0
    assert p.max_per_request_micros == 10_000_000 and p.require_approval_above_micros == 5_000_000
    assert p.allowed_providers is None and p.allowed_hours is None
    s = SystemPolicy()
    assert s.max_per_request_micros == 100_000_000 and s.max_per_day_micros == 10_000_000_000


def test_a_full_policy_round_trips():
    body = {"allowed_providers": ["openai", "local"], "blocked_models": ["openai/gpt-4"],
            "forbidden_operations": ["openai.*.embedding"], "max_per_request_micros": 2_000_000,
            "require_approval_above_micros": 1_000_000, "allowed_hours": [8, 9, 10], "allowed_days": [0, 1, 2],
            "rate_limits": {"key": {"per_minute": 10, "per_hour": 100, "per_day": 1000}, "project": {"per_day": 5}},
            "max_risk_score": 6.5, "review_risk_above": 5, "fallback_models": ["anthropic/claude-3-haiku"]}
    policy = parse(msgspec.json.encode(body))
    assert policy.rate_limits.key.per_hour == 100 and policy.rate_limits.agent == Window()
    assert load(msgspec.to_builtins(policy)) == policy


@pytest.mark.parametrize("body,field", [
    ({"allowed_hours": [24]}, "allowed_hours[0]"),
    ({"allowed_hours": [-1]}, "allowed_hours[0]"),
    ({"allowed_days": [7]}, "allowed_days[0]"),
    ({"allowed_hours": []}, "allowed_hours"),
    ({"allowed_days": [1, 1]}, "allowed_days"),
    ({"max_risk_score": 11}, "max_risk_score"),
    ({"max_per_request_micros": -1}, "max_per_request_micros"),
    ({"max_per_request_micros": 1.5}, "max_per_request_micros"),
    ({"blocked_models": ["gpt-4"]}, "blocked_models[0]"),
    ({"allowed_providers": ["Open AI"]}, "allowed_providers[0]"),
    ({"forbidden_operations": ["chat"]}, "forbidden_operations[0]"),
    ({"rate_limits": {"key": {"per_minute": 0}}}, "rate_limits.key.per_minute"),
    ({"rate_limits": {"agent": {"per_minute": 100, "per_hour": 50}}}, "rate_limits.agent.per_minute"),
    ({"rate_limits": {"team": {}}}, "rate_limits.team"),
    ({"review_risk_above": 10.5}, "review_risk_above"),
    ({"max_per_request_micros": 10, "require_approval_above_micros": 11}, "require_approval_above_micros"),
    ({"colour": "red"}, "colour"),
    ({"allowed_recipients": [A, A_EIP55[:-1] + "f"]}, "allowed_recipients[1]"),  # fails EIP-55
    ({"allowed_recipients": [A + "\n"]}, "allowed_recipients[0]"),
    ({"allowed_recipients": [" " + A]}, "allowed_recipients[0]"),
    ({"allowed_recipients": [A[:-1]]}, "allowed_recipients[0]"),
    ({"allowed_recipients": ["vitalik.eth"]}, "allowed_recipients[0]"),
    ({"allowed_recipients": [A, B, A_EIP55]}, "allowed_recipients[2]"),  # the same address twice
    ({"allowed_recipients": [""]}, "allowed_recipients[0]"),
])
def test_invalid_policies_name_the_field(body, field):
    assert field in errors_of(body)


def test_every_error_is_reported_not_only_the_first():
    errors = errors_of({"allowed_hours": [], "blocked_models": ["x"], "forbidden_operations": ["chat"]})
    assert set(errors) == {"allowed_hours", "blocked_models[0]", "forbidden_operations[0]"}


def test_boundaries_that_are_valid():
    parse(msgspec.json.encode({"allowed_hours": [0, 23], "allowed_days": [0, 6], "max_risk_score": 10,
                               "max_per_request_micros": 0, "require_approval_above_micros": 0,
                               "rate_limits": {"key": {"per_minute": 5, "per_hour": 5}}}))


def test_not_json_is_a_400_style_error():
    with pytest.raises(InvalidRequest):
        parse(b"{nope")


def test_operation_patterns():
    assert operation_matches(["openai.gpt-4o.chat"], "openai", "gpt-4o", "chat") == "openai.gpt-4o.chat"
    assert operation_matches(["openai.gpt-4o.chat"], "openai", "gpt-4o-mini", "chat") is None
    assert operation_matches(["*.*.embedding"], "local", "embed-1", "embedding") == "*.*.embedding"
    assert operation_matches(["openai.gpt-4.1.chat"], "openai", "gpt-4.1", "chat")  # dots in model names
    assert operation_matches(["embedding"], "openai", "x", "embedding") == "embedding"  # bare operation
    assert operation_matches(["embedding"], "openai", "x", "chat") is None


def test_stored_rules_with_unknown_keys_still_load():
    assert load({"max_risk_score": 5, "from_the_future": 1}).max_risk_score == 5


def test_rate_windows_for_a_request():
    policy = ProjectPolicy(rate_limits=RateLimitRules(key=Window(per_minute=10, per_day=1000),
                                                      agent=Window(per_hour=50), project=Window(per_minute=100)))
    limits = rate_limits_for(policy, SystemPolicy(max_rate_per_minute=500), "prj", "key_1", "agt_1")
    assert [(x.bucket, x.limit) for x in limits] == [
        ("key:key_1:60", 10), ("key:key_1:86400", 1000), ("agent:agt_1:3600", 50), ("project:prj:60", 100),
        ("system:project:prj:60", 500)]
    limits = rate_limits_for(policy, SystemPolicy(max_rate_per_minute=None), "prj", None, None)
    assert [x.bucket for x in limits] == ["project:prj:60"]


def test_recipient_lists_accept_every_valid_spelling_and_keep_it():
    policy = parse(msgspec.json.encode({"allowed_recipients": [A_EIP55, "0x" + B[2:].upper()]}))
    assert policy.allowed_recipients == [A_EIP55, "0x" + B[2:].upper()]
    system = msgspec.convert({"allowed_recipients": [A]}, SystemPolicy)
    assert system.allowed_recipients == [A]
    with pytest.raises(InvalidRequest) as exc:
        parse(msgspec.json.encode({"allowed_recipients": [A + "\n"]}), SystemPolicy)
    assert exc.value.details["field"] == "allowed_recipients[0]"


@pytest.mark.parametrize("system,project,to,refused_by", [
    ([], [], A, None),  # empty everywhere: any address
    ([], [A], A, None),
    ([], [A], B, "project"),
    ([], [A_EIP55], A, None),  # spellings compare as one address
    ([], ["0x" + A[2:].upper()], A, None),
    ([B], [], A, "system"),  # the platform's list binds every project
    ([B], [], B, None),
    ([A], [B], A, "project"),  # both lists must name it
    ([A], [B], B, "system"),
    ([A, B], [A], A, None),
    ([A, B], [A], B, "project"),
    ([], ["not-an-address-stored-long-ago"], A, "project"),  # a junk entry names no one: nothing is allowed
])
def test_allowed_recipients_decision_table(system, project, to, refused_by):
    refusal = recipient_refusal(ProjectPolicy(allowed_recipients=project), SystemPolicy(allowed_recipients=system), to)
    assert (refusal.scope if refusal else None) == refused_by
    if refusal:
        assert to in refusal.message and "allowed_recipients" in refusal.message
