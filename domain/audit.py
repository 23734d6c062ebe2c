"""The audit API over the event log: filtered listing and chain verification."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

import msgspec

from domain.base import Page, PageRequest
from domain.events import GENESIS_HASH, Event, first_bad_seq

if TYPE_CHECKING:
    from domain.scope import Scope

VERIFY_CHUNK = 1000


class AuditFilter(msgspec.Struct, frozen=True, kw_only=True):
    type: str | None = None
    actor: str | None = None
    since: datetime | None = None
    until: datetime | None = None


class Verification(msgspec.Struct):
    ok: bool
    checked: int
    first_bad_seq: int | None


class Audit:
    def __init__(self, scope: Scope) -> None:
        self.scope = scope

    async def list(self, project_id: str, filters: AuditFilter, page: PageRequest) -> Page[Event]:
        await self.scope.projects.require(project_id, "viewer")
        return await self.scope.store.events.list(project_id, filters, page)

    async def verify(self, project_id: str) -> Verification:
        """Recompute the chain from genesis, a chunk at a time; name the first bad seq.

        The head (seq and hash of the tip, updated in the same transaction as each append) is read
        first: every row up to it is committed, so the walk must reach it and match its hash. Rows
        committed while the walk runs are beyond it and only need to chain correctly — a busy project
        verifies without false alarms even where reads do not share one snapshot (PostgreSQL)."""
        await self.scope.projects.require(project_id, "viewer")
        head = await self.scope.store.events.head(project_id)
        prev_hash, expected, checked = GENESIS_HASH, 1, 0
        hash_at_head: str | None = None
        while True:
            chunk = await self.scope.store.events.since(project_id, expected - 1, VERIFY_CHUNK)
            if not chunk:
                break
            bad = first_bad_seq(chunk, prev_hash, expected)
            if bad is not None:
                return Verification(ok=False, checked=checked + (bad - expected), first_bad_seq=bad)
            if head is not None and chunk[0].seq <= head[0] <= chunk[-1].seq:
                hash_at_head = chunk[head[0] - chunk[0].seq].hash
            checked += len(chunk)
            prev_hash, expected = chunk[-1].hash, chunk[-1].seq + 1
        if head is not None and head[0] > 0:
            if expected - 1 < head[0]:
                # The log was truncated: the first missing seq is the bad one.
                return Verification(ok=False, checked=checked, first_bad_seq=expected)
            if hash_at_head != head[1]:
                # The rows chain, but not to the recorded tip: rewritten from somewhere up to it.
                return Verification(ok=False, checked=checked, first_bad_seq=head[0])
        return Verification(ok=True, checked=checked, first_bad_seq=None)
