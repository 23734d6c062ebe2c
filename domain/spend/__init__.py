"""Spending: create → decide (the read-only brain) → reserve → execute → settle, and approvals.

One spend request moves through these statuses::

    rejected                      the brain said no, or the reservation found no room (nothing held)
    pending_approval → approved   held for review with its reservation; an owner/admin approved it
                     → rejected   an owner/admin rejected it (reservation released)
                     → expired    nobody answered within approval_ttl_seconds (released by the sweeper)
    executing → settled           the provider answered; actual cost charged, the rest released
              → failed            the provider failed, or the reservation expired (released)

Every transition is a conditional UPDATE on the request's status (``… WHERE status = :from``), so a
settlement racing the sweeper, or two admins approving at once, resolve to exactly one winner.
Money moves in the same transaction as the transition: the wallet hold and every applicable budget
are reserved all or nothing (``domain.wallet`` / ``domain.budgets``), settled, or released.

The package, by concern: ``entities`` (commands, rows, receipts, events), ``core`` (the collaborators
and the reads), ``prepare`` (validate → decide → reserve), ``execute`` (the provider call → usage →
settle or fail, with fallbacks; ``stream`` for SSE), ``close`` (settle / fail / release), ``approvals``
and ``sweeper``. :class:`Spending` is all of them; the container builds one.
"""

from __future__ import annotations

from domain.decisions import Brain
from domain.ports import SpendRepo, UowFactory
from domain.spend.core import get_request, list_requests
from domain.spend.entities import (
    FINAL_STATUSES,
    OPEN_STATUSES,
    STATUSES,
    ApprovalExpired,
    ApprovalRejected,
    CloseValues,
    HotPath,
    Prepared,
    Receipt,
    RequestCreate,
    Resolve,
    SpendCommand,
    SpendRequest,
    SpendResult,
    rejection_error,
)
from domain.spend.execute import Executing, Laps, Outcome, fallback_worthy
from domain.spend.stream import SpendStream
from domain.spend.sweeper import Sweeping

__all__ = [
    "FINAL_STATUSES",
    "OPEN_STATUSES",
    "STATUSES",
    "ApprovalExpired",
    "ApprovalRejected",
    "Brain",
    "CloseValues",
    "HotPath",
    "Laps",
    "Outcome",
    "Prepared",
    "Receipt",
    "RequestCreate",
    "Resolve",
    "SpendCommand",
    "SpendRepo",
    "SpendRequest",
    "SpendResult",
    "SpendStream",
    "Spending",
    "UowFactory",
    "fallback_worthy",
    "get_request",
    "list_requests",
    "rejection_error",
]


class Spending(Executing, Sweeping):
    """``container.spending``. Built once by the container; every method opens its own units of work."""
