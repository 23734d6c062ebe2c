"""The pure part of the event log: canonical form, the hash chain, first_bad_seq, namespaces."""

from __future__ import annotations

import hashlib

import msgspec
import pytest

from domain.events import (
    BUDGETS,
    CHAT,
    GENESIS_HASH,
    PAYMENTS,
    Event,
    canonical,
    chain_hash,
    first_bad_seq,
    namespace_for,
)

TS = "2026-11-26T05:00:00.000000Z"


def chain(n: int, project_id: str = "prj_1") -> list[Event]:
    events, prev = [], GENESIS_HASH
    for seq in range(1, n + 1):
        data = {"n": seq, "nested": {"b": 2, "a": [1, {"z": None, "y": "é"}]}}
        digest = chain_hash(prev, project_id, seq, "agent.created", TS, "user:usr_1", data)
        events.append(Event(id=f"evt_{seq}", project_id=project_id, seq=seq, type="agent.created", ts=TS,
                            actor="user:usr_1", data=data, prev_hash=prev, hash=digest))
        prev = digest
    return events


def test_the_hash_is_sha256_of_the_previous_hash_and_the_canonical_event():
    expected = hashlib.sha256(GENESIS_HASH.encode() + canonical("p", 1, "t", TS, "a", {"k": 1})).hexdigest()
    assert chain_hash(GENESIS_HASH, "p", 1, "t", TS, "a", {"k": 1}) == expected


def test_the_canonical_form_is_compact_json_with_sorted_keys_at_every_depth():
    raw = canonical("prj_1", 3, "x.y", TS, "system:smartspace", {"b": {"d": 1, "c": 2}, "a": [{"f": 1, "e": 2}]})
    assert raw == (b'{"actor":"system:smartspace","data":{"a":[{"e":2,"f":1}],"b":{"c":2,"d":1}},'
                   b'"project_id":"prj_1","seq":3,"ts":"2026-11-26T05:00:00.000000Z","type":"x.y"}')


def test_key_order_does_not_change_the_hash_but_every_value_does():
    base = chain_hash(GENESIS_HASH, "p", 1, "t", TS, "a", {"x": 1, "y": [1, 2]})
    assert chain_hash(GENESIS_HASH, "p", 1, "t", TS, "a", {"y": [1, 2], "x": 1}) == base
    variants = [
        ("0" * 63 + "1", "p", 1, "t", TS, "a", {"x": 1, "y": [1, 2]}),
        (GENESIS_HASH, "q", 1, "t", TS, "a", {"x": 1, "y": [1, 2]}),
        (GENESIS_HASH, "p", 2, "t", TS, "a", {"x": 1, "y": [1, 2]}),
        (GENESIS_HASH, "p", 1, "u", TS, "a", {"x": 1, "y": [1, 2]}),
        (GENESIS_HASH, "p", 1, "t", TS.replace("05", "06"), "a", {"x": 1, "y": [1, 2]}),
        (GENESIS_HASH, "p", 1, "t", TS, "b", {"x": 1, "y": [1, 2]}),
        (GENESIS_HASH, "p", 1, "t", TS, "a", {"x": 1, "y": [2, 1]}),
        (GENESIS_HASH, "p", 1, "t", TS, "a", {"x": "1", "y": [1, 2]}),
    ]
    assert len({base, *(chain_hash(*v) for v in variants)}) == len(variants) + 1


def test_a_json_round_trip_keeps_the_chain_valid():
    events = chain(5)
    decoded = msgspec.json.decode(msgspec.json.encode(events), type=list[Event])
    assert first_bad_seq(decoded) is None


def test_an_intact_chain_has_no_bad_seq():
    assert first_bad_seq(chain(20)) is None
    assert first_bad_seq([]) is None


def test_a_chain_can_be_checked_from_the_middle():
    events = chain(10)
    assert first_bad_seq(events[4:], prev_hash=events[3].hash, expected_seq=5) is None
    assert first_bad_seq(events[4:], prev_hash=GENESIS_HASH, expected_seq=5) == 5


@pytest.mark.parametrize("seq", [1, 7, 12])
def test_altered_data_is_named_by_its_seq(seq):
    events = chain(12)
    events[seq - 1] = msgspec.structs.replace(events[seq - 1], data={"n": -1})
    assert first_bad_seq(events) == seq


def test_a_recomputed_hash_breaks_the_next_link():
    events = chain(6)
    e = events[2]
    forged = chain_hash(e.prev_hash, e.project_id, e.seq, e.type, e.ts, e.actor, {"forged": True})
    events[2] = msgspec.structs.replace(e, data={"forged": True}, hash=forged)
    assert first_bad_seq(events) == 4


def test_a_missing_row_is_named_by_the_missing_seq():
    events = chain(8)
    del events[3]  # seq 4
    assert first_bad_seq(events) == 4
    assert first_bad_seq(chain(3)[1:]) == 1


def test_a_wrong_prev_hash_is_detected():
    events = chain(4)
    events[1] = msgspec.structs.replace(events[1], prev_hash="f" * 64)
    assert first_bad_seq(events) == 2


def test_envelope_is_what_socket_clients_receive():
    envelope = chain(1)[0].envelope()
    assert set(envelope) == {"id", "project_id", "seq", "type", "ts", "actor", "data"}


@pytest.mark.parametrize(("event_type", "namespace"), [
    ("project.updated", BUDGETS), ("member.added", BUDGETS), ("member.removed", BUDGETS),
    ("agent.created", BUDGETS), ("key.created", BUDGETS), ("key.revoked", BUDGETS),
    ("payment.confirmed", PAYMENTS), ("deposit.credited", PAYMENTS), ("chat.message", CHAT),
])
def test_each_event_type_belongs_to_one_namespace(event_type, namespace):
    assert namespace_for(event_type) == namespace
