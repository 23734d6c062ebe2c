"""The event log's pure part: envelopes, namespaces, and the SHA-256 hash chain.

``hash = sha256(prev_hash ‖ canonical(event))`` where the canonical form is the compact JSON of
``{actor, data, project_id, seq, ts, type}`` with sorted keys. ``ts`` is the RFC 3339 string with
microseconds, exactly as stored, so verification recomputes byte-identical input.
"""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec

GENESIS_HASH = "0" * 64

BUDGETS = "/budgets"
PAYMENTS = "/payments"
CHAT = "/chat"
NAMESPACES = (BUDGETS, PAYMENTS, CHAT)

_PAYMENT_TYPES = {
    "payment.created",
    "payment.submitted",
    "payment.confirmed",
    "payment.failed",
    "deposit.credited",
}


def namespace_for(event_type: str) -> str:
    """The Socket.IO namespace that owns an event type."""
    if event_type in _PAYMENT_TYPES:
        return PAYMENTS
    if event_type.startswith("chat."):
        return CHAT
    return BUDGETS


class PendingEvent(msgspec.Struct, frozen=True):
    """An event raised by a service, appended to the log when its unit of work commits."""

    project_id: str
    type: str
    data: dict[str, Any]


class Event(msgspec.Struct, frozen=True):
    id: str
    project_id: str
    seq: int
    type: str
    ts: str
    actor: str
    data: dict[str, Any]
    prev_hash: str
    hash: str

    def envelope(self) -> dict[str, Any]:
        """What Socket.IO clients receive (API.md)."""
        return {
            "id": self.id,
            "project_id": self.project_id,
            "seq": self.seq,
            "type": self.type,
            "ts": self.ts,
            "actor": self.actor,
            "data": self.data,
        }


_encoder = msgspec.json.Encoder(order="sorted")


def canonical(project_id: str, seq: int, type_: str, ts: str, actor: str, data: dict[str, Any]) -> bytes:
    return _encoder.encode(
        {"actor": actor, "data": data, "project_id": project_id, "seq": seq, "ts": ts, "type": type_}
    )


def chain_hash(prev_hash: str, project_id: str, seq: int, type_: str, ts: str, actor: str,
               data: dict[str, Any]) -> str:
    digest = hashlib.sha256(prev_hash.encode("ascii"))
    digest.update(canonical(project_id, seq, type_, ts, actor, data))
    return digest.hexdigest()


def first_bad_seq(events: list[Event], prev_hash: str = GENESIS_HASH, expected_seq: int = 1) -> int | None:
    """Walk a run of events in seq order; return the first seq whose link or hash is wrong."""
    for event in events:
        recomputed = chain_hash(prev_hash, event.project_id, event.seq, event.type, event.ts,
                                event.actor, event.data)
        if event.seq != expected_seq:
            return expected_seq  # a missing row: the gap is the first bad seq
        if event.prev_hash != prev_hash or event.hash != recomputed:
            return event.seq
        prev_hash = event.hash
        expected_seq += 1
    return None
