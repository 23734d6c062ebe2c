"""Things every area shares: ids, the clock, the acting principal, pages and roles."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime
from typing import Generic, Literal, TypeVar

import msgspec

T = TypeVar("T")

Role = Literal["owner", "admin", "member", "viewer"]
ROLE_RANK: dict[str, int] = {"viewer": 0, "member": 1, "admin": 2, "owner": 3}


def new_id(prefix: str) -> str:
    """A prefixed id that sorts by creation time (ms) and is unique across processes."""
    return f"{prefix}_{time.time_ns() // 1_000_000:012x}{os.urandom(6).hex()}"


def utcnow() -> datetime:
    return datetime.now(UTC)


class Actor(msgspec.Struct, frozen=True, kw_only=True):
    """Who is acting: a logged-in user, a project API key (an agent), or the system itself."""

    kind: Literal["user", "key", "system"]
    id: str
    user_id: str | None = None
    project_id: str | None = None  # keys are bound to one project
    agent_id: str | None = None
    email: str | None = None
    platform_admin: bool = False
    # A key's grants beyond the gateway and its own requests and usage (domain.identity.KEY_SCOPES),
    # and the instant it stops authenticating.
    scopes: frozenset[str] = frozenset()
    expires_at: datetime | None = None

    def may(self, scope: str) -> bool:
        """Whether the actor may read what ``scope`` names: users (by their role) and the system always,
        a key only if it was granted the scope."""
        return self.kind != "key" or scope in self.scopes

    @property
    def label(self) -> str:
        """How the actor is written in the event log."""
        return f"{self.kind}:{self.id}"


SYSTEM = Actor(kind="system", id="smartspace")


class Page(msgspec.Struct, Generic[T]):
    items: list[T]
    next_cursor: str | None = None


class PageRequest(msgspec.Struct, frozen=True):
    limit: int = 50
    cursor: str | None = None
