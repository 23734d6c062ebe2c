"""The unit of work as the domain sees it: one store, one actor, the events it raises.

The container in ``server/`` opens a transaction, builds a :class:`Scope` over it, and after the
block commits it appends ``pending`` to the event log in the same transaction, commits, then runs
``after_commit`` callbacks and publishes the events. Services reach each other through the scope
(``scope.projects.require(...)``) so one unit of work spans them all.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import cached_property
from typing import TYPE_CHECKING, Any, Protocol

from domain import budgets, catalog, identity, insights, policies, usage, wallet
from domain.audit import Audit
from domain.base import SYSTEM, Actor
from domain.errors import Unauthorized
from domain.events import PendingEvent
from domain.payments import Payments
from domain.ports import Store

if TYPE_CHECKING:
    from domain.chain import Chain
    from domain.insights import AlertSink


class PasswordHasher(Protocol):
    def hash(self, password: str) -> str: ...
    def verify(self, password_hash: str, password: str) -> bool: ...


class TokenIssuer(Protocol):
    ttl_seconds: int

    def issue(self, user_id: str) -> str: ...


class Waker(Protocol):
    def wake(self) -> None: ...


class ChainLink(Protocol):
    """The chain as the payments service finds it. The server opens it lazily (the devnet on first use,
    an RPC node at start-up), so both are None until then."""

    @property
    def chain(self) -> Chain | None: ...

    @property
    def worker(self) -> Waker | None:
        """The payment worker, woken after a payout is stored."""
        ...


class Deps:
    """What services need beyond the store; built once by the container, shared by all scopes."""

    def __init__(self, *, passwords: PasswordHasher, tokens: TokenIssuer, confirmations: int = 1,
                 chain: ChainLink | None = None) -> None:
        self.passwords = passwords
        self.tokens = tokens
        self.confirmations = confirmations  # before a deposit or payout counts
        self.chain_link = chain
        # Called inside the unit of work that creates a project (e.g. to open its wallet).
        self.project_created_hooks: list[Callable[[Scope, identity.Project], Awaitable[None]]] = []
        self.unknown_user_hash: str | None = None  # login's constant-time stand-in, computed once
        self.alerts: AlertSink | None = None  # outbound alerts for new warning/critical insights (optional)

    @property
    def chain(self) -> Chain | None:
        return self.chain_link.chain if self.chain_link is not None else None

    @property
    def payment_worker(self) -> Waker | None:
        return self.chain_link.worker if self.chain_link is not None else None


class Scope:
    def __init__(self, store: Store, deps: Deps, actor: Actor = SYSTEM) -> None:
        self.store = store
        self.deps = deps
        self.actor = actor
        self.pending: list[PendingEvent] = []
        self.after_commit: list[Callable[[], Awaitable[None]]] = []

    def emit(self, project_id: str, type_: str, data: dict[str, Any]) -> None:
        self.pending.append(PendingEvent(project_id=project_id, type=type_, data=data))

    def require_user(self) -> str:
        if self.actor.kind != "user" or not self.actor.user_id:
            raise Unauthorized("this needs a user access token, not an API key")
        return self.actor.user_id

    @cached_property
    def users(self) -> identity.Users:
        return identity.Users(self)

    @cached_property
    def projects(self) -> identity.Projects:
        return identity.Projects(self)

    @cached_property
    def agents(self) -> identity.Agents:
        return identity.Agents(self)

    @cached_property
    def keys(self) -> identity.Keys:
        return identity.Keys(self)

    @cached_property
    def audit(self) -> Audit:
        return Audit(self)

    @cached_property
    def catalog(self) -> catalog.Catalog:
        return catalog.Catalog(self)

    @cached_property
    def policies(self) -> policies.Policies:
        return policies.Policies(self)

    @cached_property
    def wallets(self) -> wallet.Wallets:
        return wallet.Wallets(self)

    @cached_property
    def budgets(self) -> budgets.Budgets:
        return budgets.Budgets(self)

    @cached_property
    def payments(self) -> Payments:
        return Payments(self)

    @cached_property
    def usage(self) -> usage.Usage:
        return usage.Usage(self)

    @cached_property
    def insights(self) -> insights.Insights:
        return insights.Insights(self)
