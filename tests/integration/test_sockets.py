"""Socket.IO over a real loopback socket: auth on connect, subscribe checks, live delivery by namespace and
project, replay after a disconnect, the replay-then-live race, and the socket metrics.

A "receives nothing" claim is checked with a barrier: a later event on the same connection that the
client must receive. The hub emits in commit-then-publish order on one event loop and a websocket keeps
order, so anything misrouted would have arrived before the barrier.
"""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack

import pytest
import socketio

from tests.factories import add_member, create_agent, create_key, register
from tests.live import WAIT, LiveClient

ENVELOPE = {"id", "project_id", "seq", "type", "ts", "actor", "data"}


def url(client) -> str:
    return str(client.make_url("/"))


async def patch(client, user, project_id: str | None = None, **body) -> dict:
    body = body or {"description": f"changed {asyncio.get_running_loop().time()}"}
    resp = await client.patch(f"/api/v1/projects/{project_id or user.project_id}", json=body, headers=user.headers)
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def head_seq(client, user, project_id: str | None = None) -> int:
    resp = await client.get(f"/api/v1/projects/{project_id or user.project_id}/audit?limit=1", headers=user.headers)
    assert resp.status == 200, await resp.text()
    return (await resp.json())["items"][0]["seq"]


async def emit_event(container, project_id: str, type_: str, data: dict | None = None) -> None:
    """Commit an event of a type no REST route of this issue raises yet (e.g. a payment), the real way."""
    async with container.uow() as scope:
        scope.emit(project_id, type_, data or {})


@pytest.fixture
async def live(client):
    """Factory of connected LiveClients, all disconnected at the end."""
    async with AsyncExitStack() as stack:
        async def make(token, namespace="/budgets") -> LiveClient:
            lc = LiveClient(url(client), token, namespace)
            await lc.connect()
            stack.push_async_callback(lc.disconnect)
            return lc

        yield make


# ---------------------------------------------------------------- connect
@pytest.mark.parametrize("auth", [None, {}, {"token": ""}, {"token": "not-a-jwt"}, {"token": "sk-nope"}, "plain"])
async def test_connect_without_a_valid_token_is_refused_unauthorized(client, auth):
    sio = socketio.AsyncClient(reconnection=False)
    errors = []
    sio.on("connect_error", lambda data=None: errors.append(data), namespace="/budgets")
    with pytest.raises(socketio.exceptions.ConnectionError):
        await sio.connect(url(client), auth=auth, namespaces=["/budgets"], transports=["websocket"],
                          wait_timeout=WAIT)
    assert errors == [{"message": "unauthorized"}]
    assert not sio.connected


async def test_a_revoked_key_is_refused_and_a_live_key_connects(client, live):
    alice = await register(client)
    key = await create_key(client, alice)
    lc = await live(key["key"])
    assert lc.sio.connected
    resp = await client.delete(f"/api/v1/projects/{alice.project_id}/keys/{key['id']}", headers=alice.headers)
    assert resp.status in (200, 204), await resp.text()
    refused = LiveClient(url(client), key["key"])
    with pytest.raises(socketio.exceptions.ConnectionError):
        await refused.connect()
    assert refused.connect_errors == [{"message": "unauthorized"}]


# ---------------------------------------------------------------- subscribe and live delivery
async def test_member_gets_live_events_with_the_envelope_and_ack_carries_the_latest_seq(client, live):
    alice = await register(client)
    lc = await live(alice.token)
    ack = await lc.subscribe(alice.project_id)
    assert ack == {"ok": True, "project_id": alice.project_id, "seq": 1}  # project.created
    await lc.until_type("project.created")  # replayed: since defaults to 0

    await patch(client, alice, name="Renamed")
    await lc.until_type("project.updated")
    event = lc.received[-1]
    assert lc.names[-1] == "project.updated"
    assert set(event) == ENVELOPE
    assert event["project_id"] == alice.project_id
    assert event["seq"] == 2
    assert event["type"] == "project.updated"
    assert event["actor"] == f"user:{alice.id}"
    assert event["data"]["project"]["name"] == "Renamed"
    assert event["ts"].endswith("Z")
    assert (await lc.subscribe(alice.project_id, since=2)) == {"ok": True, "project_id": alice.project_id,
                                                                "seq": 2}


async def test_a_non_member_is_forbidden_and_receives_nothing(client, live, container):
    alice, mallory = await register(client), await register(client)
    spy = await live(mallory.token)
    ack = await spy.subscribe(alice.project_id)
    assert ack["ok"] is False
    assert ack["error"]["code"] == "forbidden"
    assert set(ack["error"]) == {"code", "message"}
    assert (await spy.subscribe(mallory.project_id))["ok"] is True
    await spy.until_type("project.created")

    await patch(client, alice)
    await create_agent(client, alice)
    await emit_event(container, alice.project_id, "budget.updated")
    await patch(client, mallory)  # the barrier, on mallory's own project
    await spy.until_type("project.updated")
    assert {e["project_id"] for e in spy.received} == {mallory.project_id}
    assert spy.seqs() == [1, 2]


async def test_subscribe_checks_its_payload(client, live):
    alice = await register(client)
    lc = await live(alice.token)
    for bad in [None, "x", {}, {"project_id": 5}, {"project_id": alice.project_id, "since": -1},
                {"project_id": alice.project_id, "since": "3"}, {"project_id": alice.project_id, "since": True}]:
        ack = await lc.call("subscribe", bad)
        assert ack["ok"] is False and ack["error"]["code"] == "invalid_request", (bad, ack)
    ack = await lc.subscribe("prj_does_not_exist")
    assert ack["ok"] is False and ack["error"]["code"] == "forbidden"


async def test_events_go_only_to_the_owning_namespace_and_the_subscribed_project(client, live, container):
    alice = await register(client)
    resp = await client.post("/api/v1/projects", json={"name": "Second"}, headers=alice.headers)
    assert resp.status == 201
    other = (await resp.json())["id"]
    budgets, payments, chat = await live(alice.token), await live(alice.token, "/payments"), \
        await live(alice.token, "/chat")
    for lc in (budgets, payments, chat):
        assert (await lc.subscribe(alice.project_id))["ok"] is True
    await budgets.until_type("project.created")

    await patch(client, alice)  # /budgets
    await patch(client, alice, project_id=other)  # another project: nobody subscribed to it
    await emit_event(container, alice.project_id, "payment.created", {"payment_id": "pay_1"})  # /payments
    await emit_event(container, alice.project_id, "chat.message", {"text": "hi"})  # /chat
    await create_agent(client, alice)  # /budgets barrier

    await budgets.until_type("agent.created")
    await payments.until_type("payment.created")
    await chat.until_type("chat.message")
    assert [(e["type"], e["seq"]) for e in budgets.received] == [
        ("project.created", 1), ("project.updated", 2), ("agent.created", 5)]
    assert [(e["type"], e["seq"]) for e in payments.received] == [("payment.created", 3)]
    assert [(e["type"], e["seq"]) for e in chat.received] == [("chat.message", 4)]
    assert {e["project_id"] for lc in (budgets, payments, chat) for e in lc.received} == {alice.project_id}

    # a later subscriber on /payments gets the payment replayed, and nothing of /budgets
    late = await live(alice.token, "/payments")
    assert (await late.subscribe(alice.project_id)) == {"ok": True, "project_id": alice.project_id, "seq": 5}
    assert [(e["type"], e["seq"]) for e in late.received] == [("payment.created", 3)]


async def test_unsubscribe_stops_delivery(client, live):
    alice = await register(client)
    resp = await client.post("/api/v1/projects", json={"name": "Second"}, headers=alice.headers)
    other = (await resp.json())["id"]
    lc = await live(alice.token)
    await lc.subscribe(alice.project_id)
    await lc.subscribe(other)
    await patch(client, alice)
    await lc.until_type("project.updated")
    assert (await lc.unsubscribe(alice.project_id)) == {"ok": True, "project_id": alice.project_id}
    await patch(client, alice)
    await patch(client, alice, project_id=other)  # barrier
    await lc.until_type("project.updated", 2)
    assert [(e["project_id"], e["type"]) for e in lc.received if e["type"] == "project.updated"] == [
        (alice.project_id, "project.updated"), (other, "project.updated")]
    assert (await lc.unsubscribe(alice.project_id))["ok"] is True  # idempotent
    assert (await lc.call("unsubscribe", {}))["error"]["code"] == "invalid_request"


async def test_members_and_keys_see_their_project_viewers_too(client, live):
    alice, bob = await register(client), await register(client)
    await add_member(client, alice, bob, "viewer")
    key = await create_key(client, alice, scopes=["audit:read"])
    as_bob, as_key = await live(bob.token), await live(key["key"])
    assert (await as_bob.subscribe(alice.project_id))["ok"] is True
    assert (await as_key.subscribe(alice.project_id))["ok"] is True
    assert (await as_key.subscribe(bob.project_id))["error"]["code"] == "forbidden"  # a key sees one project
    await patch(client, alice)
    for lc in (as_bob, as_key):
        await lc.until_type("project.updated")
        assert [e["type"] for e in lc.received] == ["project.created", "member.added", "key.created",
                                                     "project.updated"]


async def test_a_removed_member_stops_receiving_at_once(client, live):
    alice, bob = await register(client), await register(client)
    await add_member(client, alice, bob, "member")
    lc = await live(bob.token)
    assert (await lc.subscribe(alice.project_id))["ok"] is True
    assert (await lc.subscribe(bob.project_id))["ok"] is True
    resp = await client.delete(f"/api/v1/projects/{alice.project_id}/members/{bob.id}", headers=alice.headers)
    assert resp.status in (200, 204), await resp.text()
    await lc.until_type("member.removed")  # the news itself still reaches him
    await patch(client, alice)
    await create_agent(client, alice)
    await patch(client, bob)  # barrier on his own project
    await lc.until(lambda: any(e["project_id"] == bob.project_id and e["type"] == "project.updated"
                               for e in lc.received), what="the barrier")
    assert [e["type"] for e in lc.received if e["project_id"] == alice.project_id] == [
        "project.created", "member.added", "member.removed"]
    assert (await lc.subscribe(alice.project_id))["error"]["code"] == "forbidden"


async def test_a_revoked_key_loses_its_socket_and_cannot_subscribe(client, live):
    alice = await register(client)
    subscribed_key, idle_key = (await create_key(client, alice, scopes=["audit:read"]),
                                await create_key(client, alice, scopes=["audit:read"]))
    subscribed, idle = await live(subscribed_key["key"]), await live(idle_key["key"])
    assert (await subscribed.subscribe(alice.project_id))["ok"] is True
    for key in (subscribed_key, idle_key):
        resp = await client.delete(f"/api/v1/projects/{alice.project_id}/keys/{key['id']}", headers=alice.headers)
        assert resp.status in (200, 204), await resp.text()
    await subscribed.until_type("key.revoked")
    async with asyncio.timeout(WAIT):
        while subscribed.sio.connected:  # noqa: ASYNC110 - the client exposes no event for this
            await asyncio.sleep(0.01)
    ack = await idle.subscribe(alice.project_id)  # connected before the revocation, never subscribed
    assert ack["ok"] is False and ack["error"]["code"] == "unauthorized"


# ---------------------------------------------------------------- replay
async def test_replay_after_a_disconnect_in_which_50_events_happened(client, live):
    alice = await register(client)
    first = await live(alice.token)
    await first.subscribe(alice.project_id)
    await patch(client, alice)
    await first.until_type("project.updated")
    last_seen = first.last_seq
    await first.disconnect()

    agents = [await create_agent(client, alice, name=f"agent-{i:02d}") for i in range(50)]

    again = await live(alice.token)
    ack = await again.subscribe(alice.project_id, since=last_seen)
    assert ack == {"ok": True, "project_id": alice.project_id, "seq": last_seen + 50}
    # the replay is complete when the ack arrives (the ack follows the replayed events on the socket)
    assert again.seqs() == list(range(last_seen + 1, last_seen + 51))
    assert [e["data"]["agent"]["id"] for e in again.received] == [a["id"] for a in agents]

    await patch(client, alice)  # then live, exactly once
    await again.until_seq(last_seen + 51)
    await patch(client, alice)
    await again.until_seq(last_seen + 52)
    assert again.seqs() == list(range(last_seen + 1, last_seen + 53))


async def test_events_committed_while_a_large_backlog_replays_arrive_once_in_order(client, live, container):
    alice = await register(client)
    for _ in range(3):  # a backlog of several replay pages, committed the real way
        async with container.uow() as scope:
            for i in range(400):
                scope.emit(alice.project_id, "budget.updated", {"i": i})
    backlog = await head_seq(client, alice)
    assert backlog == 1201

    lc = await live(alice.token)
    subscribing = asyncio.create_task(lc.subscribe(alice.project_id))
    await lc.until(lambda: len(lc.received) > 0, what="the replay to start")
    writes = 0
    while not subscribing.done() or writes < 20:  # concurrent writers, while the replay runs and after
        await asyncio.gather(*(patch(client, alice) for _ in range(5)))
        writes += 5
    ack = await subscribing
    assert ack["ok"] is True and ack["seq"] >= backlog
    total = backlog + writes
    await lc.until_seq(total)
    assert lc.seqs() == list(range(1, total + 1))  # every event exactly once, in seq order


async def test_two_subscribes_in_a_row_replay_each_time_and_stream_once(client, live):
    alice = await register(client)
    lc = await live(alice.token)
    await lc.subscribe(alice.project_id)
    await lc.subscribe(alice.project_id, since=0)  # an explicit full replay, e.g. a dashboard reload
    assert lc.seqs() == [1, 1]
    await patch(client, alice)
    await lc.until_seq(2)
    await patch(client, alice)
    await lc.until_seq(3)
    assert lc.seqs() == [1, 1, 2, 3]


# ---------------------------------------------------------------- metrics
def sample(metrics, name: str, **labels) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def until_metric(metrics, name: str, value: float, **labels) -> None:
    async with asyncio.timeout(WAIT):
        while sample(metrics, name, **labels) != value:  # noqa: ASYNC110 - a gauge has no event to await
            await asyncio.sleep(0.01)


async def test_socket_gauge_and_delivery_counters_move(client, live, metrics):
    alice = await register(client)
    assert sample(metrics, "smartspace_socket_connections", namespace="/budgets") == 0
    lc = await live(alice.token)
    chat = await live(alice.token, "/chat")
    await until_metric(metrics, "smartspace_socket_connections", 1, namespace="/budgets")
    assert sample(metrics, "smartspace_socket_connections", namespace="/chat") == 1

    await lc.subscribe(alice.project_id)
    assert sample(metrics, "smartspace_events_replayed_total", namespace="/budgets") == 1
    before = sample(metrics, "smartspace_events_delivered_total", namespace="/budgets")
    await patch(client, alice)
    await lc.until_type("project.updated")
    assert sample(metrics, "smartspace_events_delivered_total", namespace="/budgets") == before + 1
    assert sample(metrics, "smartspace_events_published_total") >= 2

    await lc.disconnect()
    await until_metric(metrics, "smartspace_socket_connections", 0, namespace="/budgets")
    await chat.disconnect()
    await until_metric(metrics, "smartspace_socket_connections", 0, namespace="/chat")
    body = await (await client.get("/metrics")).text()
    assert 'smartspace_socket_connections{namespace="/budgets"} 0.0' in body


# ---------------------------------------------------------------- a publisher that died after commit
@pytest.fixture
def fast_tail_checks(monkeypatch):
    import channels.hub

    monkeypatch.setattr(channels.hub, "TAIL_CHECK_SECONDS", 0.2)


async def test_an_event_committed_but_never_published_still_reaches_subscribers(fast_tail_checks, client, live,
                                                                              container):
    from domain.events import PendingEvent
    from storage.uow import SqlStore

    owner = await register(client)
    watcher = await live(owner.token)
    ack = await watcher.subscribe(owner.project_id)
    # Commit straight to the log and never publish: as if the writing process died right after commit.
    async with container.db.write() as conn:
        [event] = await SqlStore(conn).events.append(
            [PendingEvent(project_id=owner.project_id, type="project.updated", data={"changes": ["name"]})],
            "system:test")
    assert event.seq == ack["seq"] + 1
    await watcher.until_seq(event.seq)
    assert watcher.seqs(owner.project_id).count(event.seq) == 1
