"""The live layer's fan-out path (channels/hub.py): broadcasts in steps, the lag metric, cheap connects.

Real Socket.IO clients over real sockets on a real app; every wait is "until, or fail after a timeout".
"""

from __future__ import annotations

import asyncio

import pytest

from tests.factories import create_key, register
from tests.integration import test_sockets
from tests.integration.test_sockets import patch, url
from tests.live import LiveClient

live = test_sockets.live  # the fixture: connected LiveClients, disconnected at the end


@pytest.fixture
def one_per_step(monkeypatch):
    """Broadcast one recipient per step, so every broadcast yields to the loop between recipients."""
    import channels.hub

    monkeypatch.setattr(channels.hub, "FANOUT_CHUNK", 1)


async def test_broadcasts_in_steps_reach_everyone_once_in_order_while_others_subscribe(one_per_step, client, live):
    alice = await register(client)
    early = [await live(alice.token) for _ in range(5)]
    for lc in early:
        assert (await lc.subscribe(alice.project_id))["seq"] == 1
    late = [LiveClient(url(client), alice.token) for _ in range(4)]
    for lc in late:
        await lc.connect()
    try:
        async def changes() -> None:
            for i in range(15):
                await patch(client, alice, name=f"step {i}")

        async def subscribe_late() -> list[dict]:
            acks = []
            for lc in late:  # each subscribes while broadcasts to the others are under way
                await asyncio.sleep(0)
                acks.append(await lc.subscribe(alice.project_id, since=1))
            return acks

        _, acks = await asyncio.gather(changes(), subscribe_late())
        assert all(ack["ok"] for ack in acks)
        for lc in early + late:
            await lc.until_seq(16)
        for lc in early + late:  # replayed and live without a gap or a duplicate, whenever each subscribed
            assert lc.seqs() == (list(range(1, 17)) if lc in early else list(range(2, 17)))
            assert [e["data"]["project"]["name"] for e in lc.received if e["seq"] > 1] == [
                f"step {i}" for i in range(15)]
    finally:
        for lc in late:
            await lc.disconnect()


async def test_the_wire_packet_is_the_envelope_socketio_clients_decode(client, live):
    alice = await register(client)
    lc = await live(alice.token)
    await lc.subscribe(alice.project_id)
    body = await patch(client, alice, name="Ünïcode ✓ \"quoted\"")
    await lc.until_type("project.updated")
    event = lc.received[-1]
    assert lc.names[-1] == "project.updated"
    assert set(event) == {"id", "project_id", "seq", "type", "ts", "actor", "data"}
    assert event["data"]["project"]["name"] == body["name"] == "Ünïcode ✓ \"quoted\""


async def test_the_live_lag_metric_observes_each_emitted_event(client, live, metrics):
    alice = await register(client)
    lc = await live(alice.token)
    await lc.subscribe(alice.project_id)
    before = metrics.registry.get_sample_value("smartspace_live_lag_seconds_count") or 0.0
    await patch(client, alice)
    await patch(client, alice)
    await lc.until_seq(3)
    assert metrics.registry.get_sample_value("smartspace_live_lag_seconds_count") == before + 2
    lag = metrics.registry.get_sample_value("smartspace_live_lag_seconds_sum")
    assert 0 <= lag < 60
    text = await (await client.get("/metrics")).text()
    assert 'smartspace_live_lag_seconds_bucket{le="0.01"}' in text


async def test_a_key_connects_and_subscribes_with_reads_only(client, live):
    alice = await register(client)
    key = await create_key(client, alice)
    lc = await live(key["key"])
    assert (await lc.subscribe(alice.project_id))["ok"] is True
    await patch(client, alice)
    await lc.until_seq(2)
    [meta] = (await (await client.get(f"/api/v1/projects/{alice.project_id}/keys",
                                      headers=alice.headers)).json())["items"]
    assert meta["use_count"] == 0 and meta["last_used_at"] is None  # a socket is no use of the key to count
    resp = await client.get(f"/api/v1/projects/{alice.project_id}", headers={"X-API-Key": key["key"]})
    assert resp.status == 200
    [meta] = (await (await client.get(f"/api/v1/projects/{alice.project_id}/keys",
                                      headers=alice.headers)).json())["items"]
    assert meta["use_count"] == 1  # a REST call still is


async def test_a_non_member_subscribe_gets_nothing_even_while_events_flow(client, live):
    alice, mallory = await register(client), await register(client)
    spy = await live(mallory.token)
    watcher = await live(alice.token)
    await watcher.subscribe(alice.project_id)

    async def changes() -> None:
        for i in range(5):
            await patch(client, alice, name=f"secret {i}")

    async def tries() -> list[dict]:
        return [await spy.subscribe(alice.project_id) for _ in range(5)]

    _, acks = await asyncio.gather(changes(), tries())
    assert all(ack["ok"] is False and ack["error"]["code"] == "forbidden" for ack in acks), acks
    await watcher.until_seq(6)
    assert spy.received == []
