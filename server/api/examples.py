"""Example request bodies for the OpenAPI document, by body type name: what a reader of /api/docs sees
first, and what schemathesis's examples phase sends. Each is a valid request as API.md describes it."""

from __future__ import annotations

from typing import Any

ADDRESS = "0x5B38Da6a701c568545dCfcB03FcB875f56beddC4"  # EIP-55 checksummed

EXAMPLES: dict[str, dict[str, Any]] = {
    "Register": {"email": "ada@example.com", "password": "correct horse battery", "name": "Ada"},
    "Login": {"email": "ada@example.com", "password": "correct horse battery"},
    "ProjectCreate": {"name": "Research agents", "description": "Nightly literature review"},
    "ProjectUpdate": {"name": "Research agents (prod)"},
    "MemberAdd": {"email": "grace@example.com", "role": "viewer"},
    "MemberUpdate": {"role": "admin"},
    "AgentCreate": {"name": "summariser"},
    "KeyCreate": {"name": "summariser key"},
    "BudgetCreate": {"name": "prod-daily", "limit_micros": 5_000_000, "period": "day",
                     "alert_thresholds": [50, 80, 100]},
    "BudgetUpdate": {"limit_micros": 7_500_000},
    "AdminCredit": {"amount_micros": 10_000_000, "reason": "welcome credit"},
    "ModelUpdate": {"input_micros_per_mtok": 150_000, "output_micros_per_mtok": 600_000},
    "RequestCreate": {"model": "local/echo-1", "messages": [{"role": "user", "content": "Say hello"}],
                      "max_tokens": 16},
    "Resolve": {"reason": "expected spend for the quarterly report"},
    "DepositClaim": {"tx_hash": "0x" + "ab" * 32},
    "WithdrawalCreate": {"to_address": ADDRESS, "amount_micros": 1_000_000, "memo": "monthly payout"},
    # a 65-byte personal_sign signature of the challenge message (GET .../deposit-senders/challenge)
    "SenderRegister": {"address": ADDRESS, "signature": "0x" + "1b" * 65},
    "DevFund": {"address": ADDRESS, "amount_micros": 5_000_000},
    "ChatCompletionRequest": {"model": "local/echo-1", "messages": [{"role": "user", "content": "Say hello"}],
                              "max_tokens": 16},
    "EmbeddingRequest": {"model": "local/embed-1", "input": "a sentence to embed"},
    "ChatAsk": {"message": "How much did we spend today, by model?"},
    "DevTransfer": {"to_address": ADDRESS, "amount_micros": 1_000_000},
}


def example_for(body: type | None) -> dict[str, Any] | None:
    return EXAMPLES.get(getattr(body, "__name__", ""))
