"""The event log (DESIGN.md §5) on SQLite and PostgreSQL: one event per state change in the same
transaction, gap-free per-project seqs under concurrent writers, a hash chain that exposes tampering."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import sqlalchemy as sa

from domain.audit import VERIFY_CHUNK
from domain.base import SYSTEM, PageRequest
from domain.events import GENESIS_HASH, Event, chain_hash
from domain.identity import AgentCreate, Register
from storage import models
from tests.factories import add_member, create_agent, create_key, quick_user


async def new_project(container) -> tuple[str, object]:
    """A user and their default project through the domain (a dummy hash: no argon2 cost here)."""
    email = f"log-{uuid.uuid4().hex[:10]}@example.com"
    async with container.uow() as scope:
        result = await scope.users.register(Register(email=email, password="correct horse", name="L"),
                                            password_hash="$argon2id$not-used-by-these-tests")
        project = (await scope.projects.list_mine(PageRequest())).items[0]
    return project.id, container.user_actor(result.user.id, email)


async def all_events(container, project_id: str) -> list[Event]:
    async with container.reader() as scope:
        return await scope.store.events.since(project_id, 0, 100_000)


async def verify(container, project_id: str):
    async with container.reader() as scope:
        return await scope.audit.verify(project_id)


def assert_chain(events: list[Event]) -> None:
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    prev = GENESIS_HASH
    for e in events:
        assert e.prev_hash == prev
        prev = e.hash
    assert [e.ts for e in events] == sorted(e.ts for e in events)


async def test_every_state_change_appends_its_event(client, container):
    owner, other = await asyncio.gather(quick_user(container), quick_user(container))
    p = f"/api/v1/projects/{owner.project_id}"
    await add_member(client, owner, other, "member")
    await client.patch(p + f"/members/{other.id}", json={"role": "viewer"}, headers=owner.headers)
    agent = await create_agent(client, owner, "bot")
    key = await create_key(client, owner, agent_id=agent["id"])
    await client.delete(p + f"/keys/{key['id']}", headers=owner.headers)
    await client.patch(p, json={"name": "renamed"}, headers=owner.headers)
    await client.delete(p + f"/members/{other.id}", headers=owner.headers)
    assert (await client.delete(p, headers=owner.headers)).status == 204
    events = await all_events(container, owner.project_id)
    assert [e.type for e in events] == [
        "project.created", "member.added", "member.updated", "agent.created", "key.created", "key.revoked",
        "project.updated", "member.removed", "project.deleted"]
    assert {e.actor for e in events} == {f"user:{owner.id}"}
    assert_chain(events)
    assert "key" not in events[4].data["key"] and key["key"] not in str(events[4].data)
    assert events[6].data["changes"] == ["name"]
    assert (await verify(container, owner.project_id)).ok


async def test_a_failed_request_appends_nothing(client, container):
    owner = await quick_user(container)
    await create_agent(client, owner, "taken")
    before = await all_events(container, owner.project_id)
    p = f"/api/v1/projects/{owner.project_id}"
    assert (await client.post(p + "/agents", json={"name": "taken"}, headers=owner.headers)).status == 409
    assert (await client.post(p + "/agents", json={"name": ""}, headers=owner.headers)).status == 422
    assert (await client.patch(p, json={}, headers=owner.headers)).status == 422
    assert (await client.delete(p + f"/members/{owner.id}", headers=owner.headers)).status == 409
    assert await all_events(container, owner.project_id) == before


async def test_an_aborted_unit_of_work_leaves_no_row_no_event_and_publishes_nothing(container):
    project_id, _ = await new_project(container)
    heard: list[Event] = []

    async def listener(event: Event) -> None:
        heard.append(event)

    container.bus.listen(listener)
    before = await all_events(container, project_id)
    with pytest.raises(RuntimeError):
        async with container.uow(SYSTEM) as scope:
            await scope.agents.create(project_id, AgentCreate(name="doomed"))
            assert scope.pending
            raise RuntimeError("boom after the change")
    assert await all_events(container, project_id) == before
    async with container.db.read() as conn:
        assert (await conn.execute(sa.select(sa.func.count()).select_from(models.agents))).scalar_one() == 0
        head = (await conn.execute(sa.select(models.event_heads.c.seq).where(
            models.event_heads.c.project_id == project_id))).scalar_one()
    assert head == len(before)
    assert heard == []
    # The next write continues the sequence without a gap.
    async with container.uow(SYSTEM) as scope:
        await scope.agents.create(project_id, AgentCreate(name="survivor"))
    events = await all_events(container, project_id)
    assert_chain(events)
    assert [e.seq for e in heard] == [events[-1].seq]


async def test_committed_events_are_published_in_order_after_commit(container):
    project_id, actor = await new_project(container)
    heard: list[Event] = []

    async def listener(event: Event) -> None:
        # Published after commit: the event is already readable from a separate connection.
        async with container.reader() as scope:
            stored = await scope.store.events.since(project_id, event.seq - 1, 1)
        assert stored == [event]
        heard.append(event)

    container.bus.listen(listener)
    async with container.uow(actor) as scope:
        for i in range(3):
            await scope.agents.create(project_id, AgentCreate(name=f"a{i}"))
    assert [(e.seq, e.type, e.actor) for e in heard] == [(s, "agent.created", actor.label) for s in (2, 3, 4)]


async def test_twenty_concurrent_units_of_work_leave_a_gap_free_verified_chain(container):
    project_id, actor = await new_project(container)

    async def writer(i: int) -> None:
        async with container.uow(actor) as scope:
            await scope.agents.create(project_id, AgentCreate(name=f"agent-{i}"))

    await asyncio.gather(*(writer(i) for i in range(20)))
    events = await all_events(container, project_id)
    assert len(events) == 21
    assert_chain(events)
    assert sorted(e.data["agent"]["name"] for e in events[1:]) == sorted(f"agent-{i}" for i in range(20))
    result = await verify(container, project_id)
    assert (result.ok, result.checked, result.first_bad_seq) == (True, 21, None)


async def test_twenty_concurrent_rest_calls_leave_a_gap_free_verified_chain(client, container):
    owner = await quick_user(container)
    p = f"/api/v1/projects/{owner.project_id}"
    responses = await asyncio.gather(*(client.post(p + "/agents", json={"name": f"r{i}"}, headers=owner.headers)
                                       for i in range(20)))
    assert [r.status for r in responses] == [201] * 20
    events = await all_events(container, owner.project_id)
    assert len(events) == 21
    assert_chain(events)
    verified = await (await client.get(p + "/audit/verify", headers=owner.headers)).json()
    assert verified == {"ok": True, "checked": 21, "first_bad_seq": None}


async def test_concurrent_writers_to_two_projects_in_one_unit_of_work_do_not_deadlock(container):
    (a, _), (b, _) = await asyncio.gather(new_project(container), new_project(container))

    async def writer(i: int) -> None:
        first, second = (a, b) if i % 2 else (b, a)
        async with container.uow(SYSTEM) as scope:
            scope.emit(first, "test.touched", {"i": i})
            scope.emit(second, "test.touched", {"i": i})

    await asyncio.wait_for(asyncio.gather(*(writer(i) for i in range(10))), 60)
    for project_id in (a, b):
        events = await all_events(container, project_id)
        assert len(events) == 11
        assert_chain(events)
        assert (await verify(container, project_id)).ok


async def test_the_hash_survives_the_json_round_trip_of_either_database(container):
    project_id, actor = await new_project(container)
    data = {"z": 1, "a": {"y": [3, 2, 1], "b": None, "x": True}, "price": 0.1, "big": 2**53 + 1,
            "text": "héllo \u2603 \"quoted\" \\ back", "empty": {}, "list": [{"k": "v", "a": 1.5}]}
    async with container.uow(actor) as scope:
        scope.emit(project_id, "test.data", data)
    [stored] = (await all_events(container, project_id))[-1:]
    assert stored.data == data
    assert (await verify(container, project_id)).ok


async def set_event(container, project_id: str, seq: int, **values) -> None:
    async with container.db.write() as conn:
        await conn.execute(sa.update(models.events).where(
            models.events.c.project_id == project_id, models.events.c.seq == seq).values(**values))


async def delete_event(container, project_id: str, seq: int) -> None:
    async with container.db.write() as conn:
        await conn.execute(sa.delete(models.events).where(
            models.events.c.project_id == project_id, models.events.c.seq == seq))


@pytest.fixture
async def ten_events(container) -> str:
    project_id, actor = await new_project(container)
    for i in range(9):
        async with container.uow(actor) as scope:
            await scope.agents.create(project_id, AgentCreate(name=f"agent-{i}"))
    assert (await verify(container, project_id)).ok
    return project_id


@pytest.mark.parametrize("seq", [1, 5, 10])
async def test_altering_a_rows_data_is_detected_at_that_seq(container, ten_events, seq):
    await set_event(container, ten_events, seq, data={"agent": {"name": "forged"}})
    result = await verify(container, ten_events)
    assert (result.ok, result.first_bad_seq, result.checked) == (False, seq, seq - 1)


@pytest.mark.parametrize(("column", "value"), [("type", "agent.deleted"), ("actor", "user:usr_mallory"),
                                               ("ts", "2020-01-01T00:00:00.000000Z")])
async def test_altering_any_hashed_column_is_detected(container, ten_events, column, value):
    await set_event(container, ten_events, 4, **{column: value})
    result = await verify(container, ten_events)
    assert (result.ok, result.first_bad_seq) == (False, 4)


async def test_rehashing_an_altered_row_still_breaks_the_next_link(container, ten_events):
    events = await all_events(container, ten_events)
    forged = events[5]
    new_hash = chain_hash(forged.prev_hash, forged.project_id, forged.seq, forged.type, forged.ts, forged.actor,
                          {"agent": {"name": "forged"}})
    await set_event(container, ten_events, forged.seq, data={"agent": {"name": "forged"}}, hash=new_hash)
    result = await verify(container, ten_events)
    assert (result.ok, result.first_bad_seq) == (False, forged.seq + 1)


async def test_deleting_the_last_row_is_detected(container, ten_events):
    await delete_event(container, ten_events, 10)
    result = await verify(container, ten_events)
    assert (result.ok, result.first_bad_seq, result.checked) == (False, 10, 9)


async def test_deleting_a_middle_row_names_the_missing_seq(container, ten_events):
    await delete_event(container, ten_events, 6)
    result = await verify(container, ten_events)
    assert (result.ok, result.first_bad_seq) == (False, 6)


async def test_verify_walks_the_log_in_chunks(container):
    project_id, actor = await new_project(container)
    async with container.uow(actor) as scope:
        for i in range(VERIFY_CHUNK + 4):
            scope.emit(project_id, "test.bulk", {"i": i})
    total = VERIFY_CHUNK + 5
    result = await verify(container, project_id)
    assert (result.ok, result.checked) == (True, total)
    bad = VERIFY_CHUNK + 2  # in the second chunk
    await set_event(container, project_id, bad, data={"i": -1})
    result = await verify(container, project_id)
    assert (result.ok, result.first_bad_seq, result.checked) == (False, bad, bad - 1)


async def test_verify_while_writers_append_never_reports_a_false_alarm(container):
    project_id, actor = await new_project(container)
    done = asyncio.Event()

    async def writer(i: int) -> None:
        async with container.uow(actor) as scope:
            for j in range(5):
                scope.emit(project_id, "test.busy", {"i": i, "j": j})

    async def writers() -> None:
        try:
            for burst in range(10):
                await asyncio.gather(*(writer(burst * 10 + i) for i in range(10)))
        finally:
            done.set()

    async def verifier() -> list:
        results = []
        while not done.is_set():
            results.append(await verify(container, project_id))
        return results

    _, results = await asyncio.gather(writers(), verifier())
    assert results
    assert [r for r in results if not r.ok] == []
    final = await verify(container, project_id)
    assert (final.ok, final.checked) == (True, 1 + 100 * 5)


async def test_a_tail_rewritten_with_valid_hashes_is_caught_by_the_head(container, ten_events):
    events = await all_events(container, ten_events)
    prev = events[5].prev_hash
    for e in events[5:]:  # seqs 6..10 re-chained over forged data, head row left alone
        data = {"forged": e.seq}
        digest = chain_hash(prev, e.project_id, e.seq, e.type, e.ts, e.actor, data)
        await set_event(container, ten_events, e.seq, data=data, prev_hash=prev, hash=digest)
        prev = digest
    result = await verify(container, ten_events)
    assert (result.ok, result.first_bad_seq, result.checked) == (False, 10, 10)
