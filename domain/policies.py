"""Policies: the platform-wide system policy and each project's versioned policy.

Every rule of the original (reference/original-system.md §1-2) is here; the brain enforces them
(``agentic/pipeline.py``). A PUT replaces the whole policy and bumps the version; older versions are
kept. Invalid policies are refused with field-level errors: ``details = {"field": <first bad
field>, "errors": [{"field", "message"}, ...]}``.
"""

from __future__ import annotations

import fnmatch
import itertools
import re
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, Protocol, overload

import msgspec
from msgspec import Meta

from domain.base import Page, PageRequest, utcnow
from domain.catalog import PLATFORM_PROJECT
from domain.chain import normalize_address
from domain.errors import Forbidden, InvalidRequest
from domain.ratelimit import WINDOWS, RateLimit

if TYPE_CHECKING:
    from domain.scope import Scope

SYSTEM_POLICY_ID = "*"  # the policies row key of the system policy
Micros = Annotated[int, Meta(ge=0, le=10**15)]
Count = Annotated[int, Meta(ge=1, le=10**9)]
Name = Annotated[str, Meta(min_length=1, max_length=200)]
_PROVIDER = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


class Window(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=False):
    """Requests allowed per sliding minute / hour / day; null = no limit."""

    per_minute: Count | None = None
    per_hour: Count | None = None
    per_day: Count | None = None


class RateLimitRules(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    key: Window = msgspec.field(default_factory=Window)  # per API key
    agent: Window = msgspec.field(default_factory=Window)  # per agent
    project: Window = msgspec.field(default_factory=Window)  # the whole project


class ProjectPolicy(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    is_active: bool = True  # an inactive policy rejects every request (a kill switch)
    allowed_providers: list[Name] | None = None  # null: every provider; []: none
    blocked_providers: list[Name] = []
    allowed_models: list[Name] | None = None  # "provider/model" ids; null: every model
    blocked_models: list[Name] = []
    # "provider.model.operation", shell-style wildcards allowed: "openai.*.embedding", "*.gpt-4.chat"
    forbidden_operations: list[Name] = []
    max_per_request_micros: Micros | None = 10_000_000  # the original's per-request limit: 10 USDC
    require_approval_above_micros: Micros | None = 5_000_000  # cost >= this is held for review
    rate_limits: RateLimitRules = msgspec.field(default_factory=RateLimitRules)
    allowed_hours: list[Annotated[int, Meta(ge=0, le=23)]] | None = None  # UTC hours; null: any
    allowed_days: list[Annotated[int, Meta(ge=0, le=6)]] | None = None  # 0 = Monday; null: any
    max_risk_score: Annotated[float, Meta(ge=0, le=10)] = 7.0  # risk above this is rejected
    # the "high" band: risk above this (and not above max_risk_score) is held for review
    review_risk_above: Annotated[float, Meta(ge=0, le=10)] = 6.0
    fallback_models: list[Name] = []  # tried in order on 429/5xx/timeouts (domain/spend/execute.py)
    # payout addresses (empty: any); a withdrawal elsewhere is refused. Any case; mixed case must be EIP-55
    allowed_recipients: list[Name] = []


class SystemPolicy(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    blocked_providers: list[Name] = []
    blocked_models: list[Name] = []
    # plain operation names ("image") or "provider.model.operation" patterns
    blocked_operations: list[Name] = []
    max_per_request_micros: Micros = 100_000_000  # 100 USDC
    max_per_day_micros: Micros = 10_000_000_000  # per project: 10,000 USDC
    max_rate_per_minute: Count | None = 1000  # per project
    max_tokens_per_request: Count = 1_000_000
    # payout addresses for every project (empty: any); a project's own list narrows it further
    allowed_recipients: list[Name] = []


class PolicyRecord(ProjectPolicy, kw_only=True):
    """A project policy as stored and returned: the rules plus who set which version when."""

    project_id: str
    version: int  # 0: the defaults, never saved
    created_at: datetime | None = None
    created_by: str | None = None


class SystemPolicyRecord(SystemPolicy, kw_only=True):
    version: int
    created_at: datetime | None = None
    created_by: str | None = None


class PolicyRepo(Protocol):
    async def current(self, project_id: str) -> tuple[dict[str, Any], int, datetime, str] | None: ...
    async def add(self, project_id: str, rules: dict[str, Any], created_by: str, now: datetime) -> int: ...
    async def history(self, project_id: str, page: PageRequest) -> Page[tuple[dict[str, Any], int, datetime, str]]:
        ...


# ---------------------------------------------------------------- validation
class FieldError(msgspec.Struct):
    field: str
    message: str


def _field_of(exc: msgspec.ValidationError) -> str:
    match = re.search(r"at `\$\.?([^`]*)`", str(exc))
    path = match.group(1) if match else ""
    unknown = re.search(r"unknown field `([^`]*)`", str(exc))
    if unknown:
        path = f"{path}.{unknown.group(1)}" if path else unknown.group(1)
    return path or "$"


def policy_error(errors: list[FieldError]) -> InvalidRequest:
    first = errors[0]
    return InvalidRequest(f"the policy is invalid: {first.field}: {first.message}",
                          {"field": first.field, "errors": [msgspec.to_builtins(e) for e in errors]})


@overload
def parse(raw: bytes | dict[str, Any], type_: type[ProjectPolicy] = ...) -> ProjectPolicy: ...
@overload
def parse(raw: bytes | dict[str, Any], type_: type[SystemPolicy]) -> SystemPolicy: ...
def parse(raw: bytes | dict[str, Any], type_: type[ProjectPolicy] | type[SystemPolicy] = ProjectPolicy
          ) -> ProjectPolicy | SystemPolicy:
    """Decode and validate a policy body; every problem is reported with its field."""
    try:
        policy = (msgspec.json.decode(raw, type=type_) if isinstance(raw, bytes | bytearray)
                  else msgspec.convert(raw, type_))
    except msgspec.ValidationError as exc:
        message = str(exc).split(" - at `")[0]
        raise policy_error([FieldError(_field_of(exc), message)]) from None
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"the body is not valid JSON: {exc}") from None
    errors = validate(policy)
    if errors:
        raise policy_error(errors)
    return policy


def _check_names(errors: list[FieldError], field: str, values: list[str] | None, model_ids: bool) -> None:
    for i, value in enumerate(values or []):
        if model_ids:
            provider, sep, name = value.partition("/")
            if not sep or not provider or not name:
                errors.append(FieldError(f"{field}[{i}]", f"{value!r} is not a 'provider/model' id"))
        elif not _PROVIDER.match(value):
            errors.append(FieldError(f"{field}[{i}]", f"{value!r} is not a provider name (lowercase, no spaces)"))
    if values and len(set(values)) != len(values):
        errors.append(FieldError(field, "lists each entry once"))


def _check_addresses(errors: list[FieldError], field: str, values: list[str]) -> None:
    seen: set[str] = set()
    for i, value in enumerate(values):
        try:
            address = normalize_address(value, f"{field}[{i}]")
        except InvalidRequest as exc:
            errors.append(FieldError(f"{field}[{i}]", exc.message))
            continue
        if address in seen:
            errors.append(FieldError(f"{field}[{i}]", f"{address} is listed twice (spelling does not make "
                                                          "it another address)"))
        seen.add(address)


def validate(policy: ProjectPolicy | SystemPolicy) -> list[FieldError]:
    errors: list[FieldError] = []
    _check_names(errors, "blocked_providers", policy.blocked_providers, False)
    _check_names(errors, "blocked_models", policy.blocked_models, True)
    _check_addresses(errors, "allowed_recipients", policy.allowed_recipients)
    if isinstance(policy, SystemPolicy):
        return errors
    _check_names(errors, "allowed_providers", policy.allowed_providers, False)
    _check_names(errors, "allowed_models", policy.allowed_models, True)
    _check_names(errors, "fallback_models", policy.fallback_models, True)
    for i, pattern in enumerate(policy.forbidden_operations):
        if pattern.count(".") < 2:
            errors.append(FieldError(f"forbidden_operations[{i}]",
                                     f"{pattern!r} is not 'provider.model.operation' (wildcards: *)"))
    for field in ("allowed_hours", "allowed_days"):
        values = getattr(policy, field)
        if values is not None and not values:
            errors.append(FieldError(field, "an empty list would refuse every request: use null to allow all"))
        elif values and len(set(values)) != len(values):
            errors.append(FieldError(field, "lists each entry once"))
    for scope in ("key", "agent", "project"):
        w: Window = getattr(policy.rate_limits, scope)
        pairs = [("per_minute", w.per_minute), ("per_hour", w.per_hour), ("per_day", w.per_day)]
        set_ = [(n, v) for n, v in pairs if v is not None]
        for (small, a), (big, b) in itertools.pairwise(set_):
            if a > b:
                errors.append(FieldError(f"rate_limits.{scope}.{small}",
                                         f"{small} ({a}) cannot exceed {big} ({b})"))
    if (policy.max_per_request_micros is not None and policy.require_approval_above_micros is not None
            and policy.require_approval_above_micros > policy.max_per_request_micros):
        errors.append(FieldError("require_approval_above_micros",
                                 "above max_per_request_micros: no request could ever need approval"))
    return errors


# ---------------------------------------------------------------- rule helpers the brain uses
def operation_matches(patterns: list[str], provider: str, name: str, operation: str) -> str | None:
    """The first pattern matching ``provider.name.operation`` (a bare op name matches that op)."""
    subject = f"{provider}.{name}.{operation}"
    for pattern in patterns:
        if ("." not in pattern and pattern == operation) or fnmatch.fnmatchcase(subject, pattern):
            return pattern
    return None


class RecipientRefusal(msgspec.Struct, frozen=True):
    scope: str  # "project" | "system": whose list leaves the address out
    message: str


def _listed(entries: list[str], address: str) -> bool:
    for entry in entries:
        try:
            if normalize_address(entry) == address:
                return True
        except InvalidRequest:  # stored before addresses were validated: it names no address
            continue
    return False


def recipient_refusal(policy: ProjectPolicy, system: SystemPolicy, address: str) -> RecipientRefusal | None:
    """Why a payout to ``address`` (normalised) is refused, or None. Like every other rule, the system
    policy applies to every project and the project's narrows it: each non-empty list must name it."""
    for scope, entries in (("system", system.allowed_recipients), ("project", policy.allowed_recipients)):
        if entries and not _listed(entries, address):
            owner = "the platform's" if scope == "system" else "the project's"
            return RecipientRefusal(scope, f"{address} is not in {owner} allowed_recipients")
    return None


def record(policy: ProjectPolicy, project_id: str, version: int, created_at: datetime | None,
           created_by: str | None) -> PolicyRecord:
    return PolicyRecord(**msgspec.structs.asdict(policy), project_id=project_id, version=version,
                        created_at=created_at, created_by=created_by)


@overload
def load(rules: dict[str, Any], type_: type[ProjectPolicy] = ...) -> ProjectPolicy: ...
@overload
def load(rules: dict[str, Any], type_: type[SystemPolicy]) -> SystemPolicy: ...
def load(rules: dict[str, Any], type_: type[ProjectPolicy] | type[SystemPolicy] = ProjectPolicy
         ) -> ProjectPolicy | SystemPolicy:
    """A stored policy → its Struct. Stored rules were validated when written; unknown keys from a
    newer version are dropped rather than failing every request."""
    known = {k: v for k, v in rules.items() if k in type_.__struct_fields__}
    return msgspec.convert(known, type_)


# ---------------------------------------------------------------- the service
class Policies:
    def __init__(self, scope: Scope) -> None:
        self.scope = scope
        self.repo: PolicyRepo = scope.store.policies

    async def get(self, project_id: str) -> PolicyRecord:
        await self.scope.projects.require(project_id, "viewer")
        return await self.current(project_id)

    async def current(self, project_id: str) -> PolicyRecord:
        found = await self.repo.current(project_id)
        if found is None:
            return record(ProjectPolicy(), project_id, 0, None, None)
        rules, version, created_at, created_by = found
        return record(load(rules), project_id, version, created_at, created_by)

    async def put(self, project_id: str, policy: ProjectPolicy) -> PolicyRecord:
        await self.scope.projects.require(project_id, "admin")
        now = utcnow()
        rules = msgspec.to_builtins(policy)
        version = await self.repo.add(project_id, rules, self.scope.actor.label, now)
        self.scope.emit(project_id, "policy.updated", {"project_id": project_id, "version": version,
                                                       "policy": rules})
        return record(policy, project_id, version, now, self.scope.actor.label)

    async def history(self, project_id: str, page: PageRequest) -> Page[PolicyRecord]:
        await self.scope.projects.require(project_id, "viewer")
        found = await self.repo.history(project_id, page)
        return Page(items=[record(load(r), project_id, v, at, by) for r, v, at, by in found.items],
                    next_cursor=found.next_cursor)

    # --- the system policy (platform admins)
    def _require_platform_admin(self) -> None:
        if not self.scope.actor.platform_admin:
            raise Forbidden("this needs a platform admin (SMARTSPACE_ADMIN_EMAILS)")

    async def system(self) -> SystemPolicyRecord:
        self._require_platform_admin()
        return await self.current_system()

    async def current_system(self) -> SystemPolicyRecord:
        found = await self.repo.current(SYSTEM_POLICY_ID)
        if found is None:
            return SystemPolicyRecord(**msgspec.structs.asdict(SystemPolicy()), version=0)
        rules, version, created_at, created_by = found
        return SystemPolicyRecord(**msgspec.structs.asdict(load(rules, SystemPolicy)), version=version,
                                  created_at=created_at, created_by=created_by)

    async def put_system(self, policy: SystemPolicy) -> SystemPolicyRecord:
        self._require_platform_admin()
        now = utcnow()
        rules = msgspec.to_builtins(policy)
        version = await self.repo.add(SYSTEM_POLICY_ID, rules, self.scope.actor.label, now)
        await self.scope.store.catalog.ensure_platform_log()
        self.scope.emit(PLATFORM_PROJECT, "policy.updated", {"scope": "system", "version": version,
                                                             "policy": rules})
        return SystemPolicyRecord(**msgspec.structs.asdict(policy), version=version, created_at=now,
                                  created_by=self.scope.actor.label)


def rate_limits_for(policy: ProjectPolicy, system: SystemPolicy, project_id: str, key_id: str | None,
                    agent_id: str | None, key_own: dict[str, int | None] | None = None) -> list[RateLimit]:
    """Every window a request of this key/agent/project counts in. ``key_own``: the key's own
    ``rate_limits``; where both it and the policy's per-key window set a limit, the lower one holds
    (one counter per window either way)."""
    out: list[RateLimit] = []
    scopes = (("key", key_id), ("agent", agent_id), ("project", project_id))
    for scope, ident in scopes:
        if not ident:
            continue
        window: Window = getattr(policy.rate_limits, scope)
        for field, seconds in WINDOWS.items():
            limit = getattr(window, field)
            source = "project_policy"
            own = (key_own or {}).get(field) if scope == "key" else None
            if own is not None and (limit is None or own < limit):
                limit, source = own, "key"
            if limit is not None:
                out.append(RateLimit(key=f"{scope}:{ident}", window_seconds=seconds, limit=limit, source=source))
    if system.max_rate_per_minute is not None:
        out.append(RateLimit(key=f"system:project:{project_id}", window_seconds=60, limit=system.max_rate_per_minute,
                             source="system_policy"))
    return out
