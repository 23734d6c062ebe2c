"""The agentic brain: one read-only pass from a spend request to a Decision.

Steps, in order (each hard failure rejects, and the pass stops at the first step that failed, with
every violation of that step listed as a reason):

  structure → identity (project, key, agent active) → system policy → project policy → rate limits
  → time windows → cost estimate → funds (wallet, every budget that applies) → risk → outcome

Outcome (the original's "recommended rule"): hard failures → REJECTED; risk > max_risk_score →
REJECTED; cost >= require_approval_above_micros, risk in the high band (> review_risk_above), or an
escalation (an agent new to the baseline asking for more than $50) → REQUIRES_REVIEW; else APPROVED.
Tier: FLASH if cost < $1 and risk < 5, else PRO.

The estimate is worst case: the input tokens given, plus output = the request's max tokens, or the
configured default (``SMARTSPACE_DEFAULT_OUTPUT_TOKENS``), capped by the model's own maximum.
"""

from __future__ import annotations

from datetime import datetime
from typing import NoReturn

from agentic import risk
from domain import policies as pol
from domain.budgets import needs_roll
from domain.catalog import CatalogModel, cost_micros, resolve
from domain.decisions import Activity, BrainView, BudgetState, Decision, Outcome, Reason, RiskFactor, SpendInput
from domain.errors import DomainError
from domain.ratelimit import RateLimit
from domain.spend.entities import with_fee

OPERATIONS = ("chat", "embedding")
FLASH_MAX_COST_MICROS = 1_000_000  # $1
FLASH_MAX_RISK = 5.0
ESCALATE_UNKNOWN_AGENT_MICROS = 50_000_000  # the original plan: an unknown agent spending > $50 goes to a person


class _Rejected(Exception):
    def __init__(self, error_code: str, reasons: list[Reason], retry_after: int | None = None) -> None:
        self.error_code = error_code
        self.reasons = reasons
        self.retry_after = retry_after


def effective_spent(budget: BudgetState, now: datetime) -> int:
    """A budget whose period has rolled over has spent nothing in the new period yet."""
    return 0 if needs_roll(budget.period, budget.period_start, now) else budget.spent_micros


class _Pass:
    def __init__(self, view: BrainView, req: SpendInput, now: datetime) -> None:
        self.view = view
        self.req = req
        self.now = now
        self.model: CatalogModel | None = None
        self.output_tokens = 0
        self.estimate = 0
        self.agent_id = req.agent_id
        self.policy_version = 0
        self.rate_limits: list[RateLimit] = []
        self.key_limits: dict[str, int | None] = {}
        self.budget_ids: list[str] = []
        self._activity: Activity | None = None

    @staticmethod
    def fail(step: str, error_code: str, failures: list[tuple[str, str]], retry_after: int | None = None) -> None:
        """Reject with every failure of the step, if there is any."""
        if failures:
            _Pass.reject(step, error_code, failures, retry_after)

    @staticmethod
    def reject(step: str, error_code: str, failures: list[tuple[str, str]],
               retry_after: int | None = None) -> NoReturn:
        raise _Rejected(error_code, [Reason(code=c, message=m, step=step) for c, m in failures], retry_after)

    @property
    def chosen(self) -> CatalogModel:
        """The model ``structure`` resolved: every later step runs after it."""
        assert self.model is not None
        return self.model

    async def activity(self) -> Activity:
        if self._activity is None:
            self._activity = await self.view.activity(self.req.project_id, self.now)
        return self._activity

    # 1 ------------------------------------------------------------------------------------------
    async def structure(self, system: pol.SystemPolicy) -> None:
        req = self.req
        bad: list[tuple[str, str]] = []
        if not req.project_id:
            bad.append(("project_missing", "project_id is required"))
        if not req.actor:
            bad.append(("actor_missing", "the acting principal is required"))
        if req.operation not in OPERATIONS:
            bad.append(("operation_unsupported", f"operation {req.operation!r} is not one of {', '.join(OPERATIONS)}"))
        if not 0 <= req.input_tokens <= system.max_tokens_per_request:
            bad.append(("input_tokens_out_of_range",
                        f"input tokens must be between 0 and {system.max_tokens_per_request}"))
        if req.max_output_tokens is not None and not 1 <= req.max_output_tokens <= system.max_tokens_per_request:
            bad.append(("max_tokens_out_of_range",
                        f"max_tokens must be between 1 and {system.max_tokens_per_request}"))
        self.fail("structure", "invalid_request", bad)
        try:
            model = self.model = resolve(req.model, await self.view.models(req.model))
        except DomainError as exc:
            code = {"not_found": "model_not_found"}.get(exc.code, "model_ambiguous")
            if exc.details.get("active") is False:
                code = "model_inactive"
            self.reject("structure", "not_found" if exc.code == "not_found" else "invalid_request",
                        [(code, exc.message)])
        if model.kind != req.operation:
            self.reject("structure", "invalid_request", [(
                "operation_mismatch", f"{model.id} is a {model.kind} model; it cannot serve {req.operation!r}")])
        # (embedding inputs are batches: each item has its own window, so the total may be larger)
        if req.operation == "chat" and req.input_tokens > model.context_window:
            self.reject("structure", "invalid_request", [(
                "context_window_exceeded",
                f"{req.input_tokens} input tokens exceed {model.id}'s context window of {model.context_window}")])
        if req.operation == "embedding":
            self.output_tokens = 0
        else:
            wanted = req.max_output_tokens if req.max_output_tokens is not None else self.view.default_output_tokens
            self.output_tokens = max(0, min(wanted, model.max_output_tokens))
        # the worst case the project may pay: the provider's price and the platform fee on it
        self.estimate = with_fee(cost_micros(model, req.input_tokens, self.output_tokens), req.fee_bps)

    # 2 ------------------------------------------------------------------------------------------
    async def identity(self) -> None:
        req = self.req
        project = await self.view.project(req.project_id)
        if project is None or project.status == "deleted":
            self.reject("identity", "not_found", [("project_not_found", f"project {req.project_id} does not exist")])
        if project.status != "active":
            self.reject("identity", "policy_violation",
                        [("project_inactive", f"project {req.project_id} is {project.status}")])
        if req.key_id:
            key = await self.view.key(req.key_id)
            if key is None or key.project_id != req.project_id:
                self.reject("identity", "policy_violation",
                            [("key_not_found", f"API key {req.key_id} does not belong to this project")])
            if key.revoked:
                self.reject("identity", "policy_violation", [("key_revoked", f"API key {req.key_id} is revoked")])
            if key.expires_at is not None and key.expires_at <= self.now:
                self.reject("identity", "policy_violation", [(
                    "key_expired", f"API key {req.key_id} expired at {key.expires_at.isoformat()}")])
            if key.allowed_models is not None and self.chosen.id not in key.allowed_models:
                allowed = ", ".join(key.allowed_models) or "none"
                self.reject("identity", "policy_violation", [(
                    "model_not_allowed_for_key", f"model {self.chosen.id!r} is not among this key's allowed_models "
                    f"({allowed})")])
            self.key_limits = key.rate_limits
            if key.agent_id:
                if self.agent_id and self.agent_id != key.agent_id:
                    self.reject("identity", "policy_violation", [("agent_mismatch", (
                        f"API key {req.key_id} belongs to agent {key.agent_id}, not {self.agent_id}"))])
                self.agent_id = key.agent_id
        if self.agent_id:
            agent = await self.view.agent(self.agent_id)
            if agent is None or agent.project_id != req.project_id:
                self.reject("identity", "not_found",
                            [("agent_not_found", f"agent {self.agent_id} is not in this project")])
            if agent.status != "active":
                self.reject("identity", "policy_violation",
                            [("agent_inactive", f"agent {self.agent_id} is {agent.status}")])

    # 3 ------------------------------------------------------------------------------------------
    async def system_policy(self, system: pol.SystemPolicy) -> None:
        model = self.chosen
        bad: list[tuple[str, str]] = []
        if model.provider in system.blocked_providers:
            bad.append(("system_provider_blocked", f"provider {model.provider!r} is blocked platform-wide"))
        if model.id in system.blocked_models:
            bad.append(("system_model_blocked", f"model {model.id!r} is blocked platform-wide"))
        pattern = pol.operation_matches(system.blocked_operations, model.provider, model.name, self.req.operation)
        if pattern:
            bad.append(("system_operation_blocked", f"operation blocked platform-wide by {pattern!r}"))
        if self.estimate > system.max_per_request_micros:
            bad.append(("system_request_cap", f"estimated cost {self.estimate} µUSDC is above the platform "
                        f"per-request cap of {system.max_per_request_micros}"))
        spent = (await self.activity()).spent_today_micros
        if spent + self.estimate > system.max_per_day_micros:
            bad.append(("system_daily_cap", f"today's spend {spent} + {self.estimate} µUSDC would pass the "
                        f"platform daily cap of {system.max_per_day_micros}"))
        self.fail("system_policy", "policy_violation", bad)

    # 4 ------------------------------------------------------------------------------------------
    def project_policy(self, policy: pol.ProjectPolicy) -> None:
        model = self.chosen
        bad: list[tuple[str, str]] = []
        if not policy.is_active:
            bad.append(("policy_inactive", "the project's policy is inactive: every request is refused"))
        if model.provider in policy.blocked_providers:
            bad.append(("provider_blocked", f"provider {model.provider!r} is blocked by the project policy"))
        if policy.allowed_providers is not None and model.provider not in policy.allowed_providers:
            bad.append(("provider_not_allowed", f"provider {model.provider!r} is not in the project's allowed list"))
        if model.id in policy.blocked_models:
            bad.append(("model_blocked", f"model {model.id!r} is blocked by the project policy"))
        if policy.allowed_models is not None and model.id not in policy.allowed_models:
            bad.append(("model_not_allowed", f"model {model.id!r} is not in the project's allowed list"))
        pattern = pol.operation_matches(policy.forbidden_operations, model.provider, model.name, self.req.operation)
        if pattern:
            bad.append(("operation_forbidden", f"{model.provider}.{model.name}.{self.req.operation} is forbidden "
                        f"by {pattern!r}"))
        if policy.max_per_request_micros is not None and self.estimate > policy.max_per_request_micros:
            bad.append(("request_limit_exceeded", f"estimated cost {self.estimate} µUSDC is above the per-request "
                        f"maximum of {policy.max_per_request_micros}"))
        self.fail("project_policy", "policy_violation", bad)

    # 5 ------------------------------------------------------------------------------------------
    async def check_rate_limits(self, policy: pol.ProjectPolicy, system: pol.SystemPolicy) -> None:
        self.rate_limits = pol.rate_limits_for(policy, system, self.req.project_id, self.req.key_id, self.agent_id,
                                               self.key_limits)
        counts = await self.view.rate_counts(self.rate_limits, self.now)
        full = [(limit, n) for limit, n in zip(self.rate_limits, counts, strict=True) if n >= limit.limit]
        self.fail("rate_limit", "rate_limited",
                  [("rate_limited", f"rate limit reached: {limit.describe()} ({n} in the window)")
                   for limit, n in full],
                  retry_after=min((limit.window_seconds for limit, _ in full), default=None))

    # 6 ------------------------------------------------------------------------------------------
    def time_windows(self, policy: pol.ProjectPolicy) -> None:
        bad: list[tuple[str, str]] = []
        if policy.allowed_hours is not None and self.now.hour not in policy.allowed_hours:
            bad.append(("outside_allowed_hours", f"{self.now.hour:02d}:00 UTC is outside the allowed hours "
                        f"{sorted(policy.allowed_hours)}"))
        if policy.allowed_days is not None and self.now.weekday() not in policy.allowed_days:
            bad.append(("outside_allowed_days", f"day {self.now.weekday()} (0 = Monday) is outside the allowed "
                        f"days {sorted(policy.allowed_days)}"))
        self.fail("time_window", "policy_violation", bad)

    # 8 ------------------------------------------------------------------------------------------
    async def funds(self) -> float | None:
        """Checks wallet and budgets; returns the highest day-budget usage (for the risk model)."""
        wallet = await self.view.wallet(self.req.project_id)
        available = wallet.available_micros if wallet else 0
        if available < self.estimate:
            self.reject("funds", "insufficient_funds", [(
                "insufficient_funds", f"the wallet has {available} µUSDC available; the request may cost "
                f"{self.estimate}")])
        bad: list[tuple[str, str]] = []
        day_usage: float | None = None
        for budget in await self.view.budgets(self.req.project_id):
            if budget.agent_id is not None and budget.agent_id != self.agent_id:
                continue
            if budget.key_id is not None and budget.key_id != self.req.key_id:
                continue
            self.budget_ids.append(budget.id)
            used = effective_spent(budget, self.now) + budget.reserved_micros
            if used + self.estimate > budget.limit_micros:
                bad.append(("budget_exceeded", f"budget {budget.name!r} ({budget.period}) has "
                            f"{max(0, budget.limit_micros - used)} µUSDC left; the request may cost {self.estimate}"))
            if budget.period == "day" and budget.limit_micros > 0:
                share = used / budget.limit_micros
                day_usage = share if day_usage is None else max(day_usage, share)
        self.fail("funds", "budget_exceeded", bad)
        return day_usage

    def decision(self, outcome: Outcome, reasons: list[Reason], *, score: float = 0.0,
                 factors: list[RiskFactor] | None = None,
                 error_code: str | None = None, retry_after: int | None = None) -> Decision:
        model = self.model
        tier = "FLASH" if self.estimate < FLASH_MAX_COST_MICROS and score < FLASH_MAX_RISK else "PRO"
        return Decision(
            outcome=outcome, reasons=reasons, risk_score=score, risk_factors=factors or [],
            estimated_cost_micros=self.estimate, model=model.id if model else None, error_code=error_code,
            retry_after_seconds=retry_after, tier=tier, provider=model.provider if model else None,
            upstream_model=model.wire_name if model else None, max_output_tokens=self.output_tokens,
            rate_limits=self.rate_limits, budget_ids=self.budget_ids, policy_version=self.policy_version,
            input_micros_per_mtok=model.input_micros_per_mtok if model else None,
            output_micros_per_mtok=model.output_micros_per_mtok if model else None)


async def decide(view: BrainView, req: SpendInput, now: datetime) -> Decision:
    """Decide one spend request. Reads through ``view`` only; never writes."""
    run = _Pass(view, req, now)
    try:
        system = await view.system_policy()
        await run.structure(system)
        await run.identity()
        await run.system_policy(system)
        policy, run.policy_version = await view.project_policy(req.project_id)
        run.project_policy(policy)
        await run.check_rate_limits(policy, system)
        run.time_windows(policy)
        cost_reason = Reason(code="cost_estimated", step="cost", message=(
            f"{req.input_tokens} input + up to {run.output_tokens} output tokens on {run.chosen.id}: "
            f"at most {run.estimate} µUSDC"))
        day_usage = await run.funds()
    except _Rejected as rejected:
        return run.decision("REJECTED", rejected.reasons, error_code=rejected.error_code,
                            retry_after=rejected.retry_after)

    score, factors = risk.assess(await run.activity(), cost_micros=run.estimate, model=run.chosen,
                                 agent_id=run.agent_id, now=now, daily_budget_usage=day_usage)
    risk_reason = Reason(code=f"risk_{risk.level(score)}", step="risk", message=(
        f"risk {score:g}/10 ({risk.level(score)}): " + (", ".join(f.type for f in factors) or "no risk factors")))
    if score > policy.max_risk_score:
        return run.decision("REJECTED", [Reason(code="risk_too_high", step="outcome", message=(
            f"risk {score:g} is above the project's max_risk_score {policy.max_risk_score:g}")),
            risk_reason, cost_reason], score=score, factors=factors, error_code="policy_violation")
    review: list[Reason] = []
    threshold = policy.require_approval_above_micros
    if threshold is not None and run.estimate >= threshold:
        review.append(Reason(code="approval_threshold", step="outcome", message=(
            f"estimated cost {run.estimate} µUSDC is at or above the approval threshold {threshold}")))
    if run.estimate > ESCALATE_UNKNOWN_AGENT_MICROS and any(f.type == "agent" for f in factors):
        review.append(Reason(code="escalation", step="outcome", message=(
            f"an agent new to this project asks for {run.estimate} µUSDC (above $50): a person must review it")))
    if score > policy.review_risk_above:
        review.append(Reason(code="high_risk", step="outcome", message=(
            f"risk {score:g} is in the high band (above {policy.review_risk_above:g}): a person must review it")))
    if review:
        return run.decision("REQUIRES_REVIEW", [*review, risk_reason, cost_reason], score=score, factors=factors)
    return run.decision("APPROVED", [Reason(code="within_policy", step="outcome", message=(
        "every policy, limit and budget allows this request")), risk_reason, cost_reason],
        score=score, factors=factors)
