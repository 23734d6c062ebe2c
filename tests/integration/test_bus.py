"""Event buses: the in-process bus, and the Redis bus against a real Redis — fan-out between processes
(here: two buses, or two apps on one database), skipping its own messages, publishing while Redis is away,
a listener that lost Redis (cut, or deaf) resyncing from the log, and a server whose Redis is unreachable.

Redis outages are made with a TCP proxy on loopback (tests/live.py) that can be cut or frozen.
"""

from __future__ import annotations

import asyncio
import uuid
from urllib.parse import urlparse

import pytest

from domain.events import Event
from server.app import create_app
from server.container import Container
from server.metrics import Metrics
from storage.bus import LocalBus, RedisBus
from tests.conftest import redis_bus
from tests.factories import create_agent, register
from tests.live import WAIT, LiveClient, TcpProxy


def event(seq: int, project_id: str = "prj_bus", type_: str = "budget.updated") -> Event:
    return Event(id=f"evt_{uuid.uuid4().hex}", project_id=project_id, seq=seq, type=type_,
                 ts="2026-11-26T00:00:00.000000Z", actor="system", data={"n": seq}, prev_hash="0" * 64,
                 hash="0" * 64)


class Recorder:
    def __init__(self) -> None:
        self.events: list[Event] = []
        self.changed = asyncio.Event()
        self.resyncs = 0

    async def __call__(self, e: Event) -> None:
        self.events.append(e)
        self.changed.set()

    async def resynced(self) -> None:
        self.resyncs += 1
        self.changed.set()

    async def until(self, predicate, what: str = "") -> None:
        try:
            async with asyncio.timeout(WAIT):
                while not predicate():
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            raise AssertionError(f"timed out waiting for {what}; got {[e.seq for e in self.events]}") from None

    @property
    def seqs(self) -> list[int]:
        return [e.seq for e in self.events]


def errors(metrics: Metrics, op: str) -> float:
    return metrics.registry.get_sample_value("smartspace_bus_errors_total", {"op": op}) or 0.0


async def until_errors(metrics: Metrics, op: str, at_least: float = 1) -> None:
    async with asyncio.timeout(WAIT):
        while errors(metrics, op) < at_least:  # noqa: ASYNC110 - a counter has no event to await
            await asyncio.sleep(0.01)


async def connected(bus: RedisBus) -> None:
    async with asyncio.timeout(WAIT):
        await bus.connected.wait()


@pytest.fixture
async def proxy(redis_url):
    target = urlparse(redis_url)
    p = await TcpProxy(target.hostname or "127.0.0.1", target.port or 6379).start()
    yield p
    await p.close()


def through(proxy: TcpProxy, redis_url: str) -> str:
    """The test Redis URL (with its db number and credentials) via the proxy."""
    parsed = urlparse(redis_url)
    netloc = f"{parsed.username or ''}{':' + parsed.password if parsed.password else ''}"
    netloc = f"{netloc}@" if netloc else ""
    return parsed._replace(netloc=f"{netloc}127.0.0.1:{proxy.port}").geturl()


@pytest.fixture
async def buses():
    started: list[RedisBus] = []

    async def start(bus: RedisBus) -> RedisBus:
        await bus.start()
        started.append(bus)
        return bus

    yield start
    for bus in started:
        await bus.close()


# ---------------------------------------------------------------- in-process
async def test_local_bus_delivers_in_order_to_every_listener_even_if_one_fails():
    metrics = Metrics()
    bus = LocalBus(metrics)
    first, second = Recorder(), Recorder()

    async def broken(e: Event) -> None:
        raise RuntimeError("a listener bug")

    bus.listen(first)
    bus.listen(broken)
    bus.listen(second)
    await bus.publish([event(1), event(2)])
    await bus.publish([event(3)])
    assert first.seqs == second.seqs == [1, 2, 3]
    assert metrics.registry.get_sample_value("smartspace_events_published_total") == 3


class LossyBus(LocalBus):
    """The in-process bus, told to lose the next ``drop`` publishes — as pub/sub does in a Redis blip."""

    def __init__(self, metrics: Metrics) -> None:
        super().__init__(metrics)
        self.drop = 0

    async def publish(self, events) -> None:
        if self.drop:
            self.drop -= 1
            return
        await super().publish(events)


async def test_a_lost_message_is_recovered_from_the_log_and_order_is_kept(settings, db, aiohttp_client):
    metrics = Metrics()
    bus = LossyBus(metrics)
    client = await aiohttp_client(create_app(settings, container=Container(settings, db, bus, metrics=metrics)))
    alice = await register(client)
    lc = await LiveClient(str(client.make_url("/")), alice.token).connect()
    try:
        await lc.subscribe(alice.project_id)
        path = f"/api/v1/projects/{alice.project_id}"
        assert (await client.patch(path, json={"name": "two"}, headers=alice.headers)).status == 200
        await lc.until_seq(2)
        bus.drop = 1
        assert (await client.patch(path, json={"name": "three"}, headers=alice.headers)).status == 200  # lost
        assert (await client.patch(path, json={"name": "four"}, headers=alice.headers)).status == 200  # held
        await lc.until_seq(4)
        assert lc.seqs() == [1, 2, 3, 4]  # 3 read from the log once the gap outlived its grace, then 4
        assert [e["data"]["project"]["name"] for e in lc.received[1:]] == ["two", "three", "four"]
        replayed = metrics.registry.get_sample_value("smartspace_events_replayed_total", {"namespace": "/budgets"})
        assert replayed == 2  # the subscribe's replay of seq 1, and the recovered seq 3
    finally:
        await lc.disconnect()


# ---------------------------------------------------------------- redis: buses
async def test_redis_bus_fans_out_and_skips_its_own_messages(redis_url, buses):
    one = await buses(redis_bus(redis_url, Metrics()))
    two = await buses(RedisBus(redis_url, Metrics(), channel=one.channel))
    got_one, got_two = Recorder(), Recorder()
    one.listen(got_one)
    two.listen(got_two)
    await connected(one)
    await connected(two)

    await one.publish([event(1), event(2)])
    assert got_one.seqs == [1, 2]  # delivered locally at once
    await got_two.until(lambda: got_two.seqs == [1, 2], "the far bus")
    await two.publish([event(3)])  # barrier: bus one hears its own echo of 1-2 before this
    await got_one.until(lambda: 3 in got_one.seqs, "the echo barrier")
    assert got_one.seqs == [1, 2, 3]
    assert got_two.seqs == [1, 2, 3]


async def test_publish_while_redis_is_away_never_raises_and_goes_out_when_it_is_back(redis_url, proxy, buses):
    metrics = Metrics()
    sender = await buses(RedisBus(through(proxy, redis_url), metrics, channel=f"smartspace:test:{uuid.uuid4().hex}",
                                  max_backoff_seconds=0.2))
    receiver = await buses(RedisBus(redis_url, Metrics(), channel=sender.channel))
    local, far = Recorder(), Recorder()
    sender.listen(local)
    receiver.listen(far)
    await connected(sender)
    await connected(receiver)

    await proxy.cut()
    await sender.publish([event(1)])  # returns at once; Redis is unreachable
    await sender.publish([event(2)])
    assert local.seqs == [1, 2]
    await until_errors(metrics, "publish")
    assert far.seqs == []

    await proxy.restore()
    await far.until(lambda: far.seqs == [1, 2], "the queued messages, in order")


async def test_a_listener_that_lost_redis_asks_for_a_resync(redis_url, proxy, buses):
    metrics = Metrics()
    listener = await buses(RedisBus(through(proxy, redis_url), metrics, channel=f"smartspace:test:{uuid.uuid4().hex}",
                                    max_backoff_seconds=0.2))
    rec = Recorder()
    listener.on_resync(rec.resynced)
    await connected(listener)
    await proxy.cut()
    await until_errors(metrics, "listen")
    assert rec.resyncs == 0
    await proxy.restore()
    await rec.until(lambda: rec.resyncs == 1, "a resync after the reconnect")
    assert listener.connected.is_set()


async def test_a_deaf_listener_is_noticed_by_its_heartbeat(redis_url, proxy, buses):
    metrics = Metrics()
    listener = await buses(RedisBus(through(proxy, redis_url), metrics, channel=f"smartspace:test:{uuid.uuid4().hex}",
                                    heartbeat_seconds=0.2, max_backoff_seconds=0.2))
    speaker = await buses(RedisBus(redis_url, Metrics(), channel=listener.channel))
    rec = Recorder()
    listener.listen(rec)
    listener.on_resync(rec.resynced)
    await connected(listener)
    await connected(speaker)

    proxy.freeze()  # the TCP connection stays up; nothing comes through
    await speaker.publish([event(1)])
    await until_errors(metrics, "listen")  # noticed by silence alone, no socket error
    assert rec.seqs == []
    proxy.thaw()
    await rec.until(lambda: rec.resyncs >= 1, "a resync after the heartbeat reconnect")
    await speaker.publish([event(2)])
    await rec.until(lambda: 2 in rec.seqs, "live delivery again")


# ---------------------------------------------------------------- redis: two apps on one database
# ``aiohttp_client`` comes last in these signatures so the apps stop before the proxy and the database go.
async def redis_app(aiohttp_client, settings, db, url: str, channel: str, **bus_options):
    metrics = Metrics()
    bus = RedisBus(url, metrics, channel=channel, max_backoff_seconds=0.2, **bus_options)
    container = Container(settings, db, bus, metrics=metrics)
    client = await aiohttp_client(create_app(settings, container=container))
    await connected(bus)
    return client, bus, metrics


def channel() -> str:
    return f"smartspace:test:{uuid.uuid4().hex[:8]}"


async def test_an_event_committed_on_one_app_reaches_a_socket_on_the_other(settings, db, redis_url, aiohttp_client):
    name = channel()
    a, _, _ = await redis_app(aiohttp_client, settings, db, redis_url, name)
    b, _, metrics_b = await redis_app(aiohttp_client, settings, db, redis_url, name)
    alice = await register(b)
    lc = await LiveClient(str(a.make_url("/")), alice.token).connect()
    try:
        assert (await lc.subscribe(alice.project_id))["seq"] == 1
        resp = await b.patch(f"/api/v1/projects/{alice.project_id}", json={"name": "Via B"}, headers=alice.headers)
        assert resp.status == 200
        await lc.until_type("project.updated")
        assert lc.received[-1]["data"]["project"]["name"] == "Via B"
        agent = await create_agent(a, alice)  # and the other way round: caused on A, seen on A once
        await lc.until_type("agent.created")
        assert lc.received[-1]["data"]["agent"]["id"] == agent["id"]
        assert lc.seqs() == [1, 2, 3]
        assert errors(metrics_b, "publish") == 0
    finally:
        await lc.disconnect()


async def test_after_a_redis_cut_the_far_process_resyncs_its_sockets_from_the_log(settings, db, redis_url, proxy,
                                                                                   aiohttp_client):
    name = channel()
    a, bus_a, metrics_a = await redis_app(aiohttp_client, settings, db, through(proxy, redis_url), name)
    b, _, _ = await redis_app(aiohttp_client, settings, db, redis_url, name)
    alice = await register(b)
    lc = await LiveClient(str(a.make_url("/")), alice.token).connect()
    try:
        await lc.subscribe(alice.project_id)
        await proxy.cut()
        await until_errors(metrics_a, "listen")
        for i in range(5):  # committed on B while A hears nothing
            resp = await b.patch(f"/api/v1/projects/{alice.project_id}", json={"name": f"cut {i}"},
                                 headers=alice.headers)
            assert resp.status == 200
        await proxy.restore()
        await lc.until_seq(6)  # without re-subscribing: the hub read them from the log
        assert bus_a.resyncs >= 1
        await b.patch(f"/api/v1/projects/{alice.project_id}", json={"name": "after"}, headers=alice.headers)
        await lc.until_seq(7)
        assert lc.seqs() == [1, 2, 3, 4, 5, 6, 7]
        replayed = metrics_a.registry.get_sample_value("smartspace_events_replayed_total",
                                                       {"namespace": "/budgets"})
        assert replayed >= 1 + 5  # the subscribe's replay, then the catch-up
    finally:
        await lc.disconnect()


async def test_with_redis_unreachable_the_server_keeps_serving(settings, db, redis_url, proxy, aiohttp_client):
    await proxy.cut()  # nothing listens on the proxy's port now
    metrics = Metrics()
    bus = RedisBus(through(proxy, redis_url), metrics, channel=channel(), max_backoff_seconds=0.2)
    container = Container(settings, db, bus, metrics=metrics)
    client = await aiohttp_client(create_app(settings, container=container))

    alice = await register(client)
    lc = await LiveClient(str(client.make_url("/")), alice.token).connect()
    try:
        await lc.subscribe(alice.project_id)
        resp = await client.patch(f"/api/v1/projects/{alice.project_id}", json={"name": "No Redis"},
                                  headers=alice.headers)
        assert resp.status == 200
        await lc.until_type("project.updated")  # this process's own sockets still get everything
        await until_errors(metrics, "publish")
        await until_errors(metrics, "listen")
        ready = await client.get("/ready")
        assert ready.status == 200  # degraded, still serving
        body = await ready.json()
        assert body["checks"]["database"] == "ok" and body["checks"]["redis"].startswith("degraded")
        assert (await client.get("/health")).status == 200
    finally:
        await lc.disconnect()


# ---------------------------------------------------------------- deployments sharing one Redis
def test_the_channel_prefix_is_a_setting_and_the_deployment_follows_database_and_secret(settings, tmp_path):
    from server.app import build_container
    from server.settings import SettingsError, load_settings
    from storage.bus import deployment_id

    assert load_settings({}, dotenv=None).redis_channel_prefix == "smartspace"
    configured = load_settings({"SMARTSPACE_REDIS_URL": "redis://127.0.0.1:1/0",
                                "SMARTSPACE_REDIS_CHANNEL_PREFIX": "acme-prod",
                                "SMARTSPACE_DATA_DIR": str(tmp_path)}, dotenv=None)
    bus = build_container(configured, Metrics()).bus
    assert isinstance(bus, RedisBus) and bus.channel == "acme-prod:events"
    assert bus.deployment == deployment_id(str(tmp_path.resolve() / "smartspace.db"), configured.resolved_jwt_secret)
    with pytest.raises(SettingsError, match="SMARTSPACE_REDIS_CHANNEL_PREFIX"):
        load_settings({"SMARTSPACE_REDIS_CHANNEL_PREFIX": "has space"}, dotenv=None)
    with pytest.raises(SettingsError, match="SMARTSPACE_REDIS_CHANNEL_PREFIX"):
        load_settings({"SMARTSPACE_REDIS_CHANNEL_PREFIX": ""}, dotenv=None)
    # one deployment: same database, same secret; anything else is another deployment
    assert deployment_id("smartspace", "s" * 32) == deployment_id("smartspace", "s" * 32)
    assert deployment_id("smartspace", "s" * 32) != deployment_id("smartspace_b", "s" * 32)
    assert deployment_id("smartspace", "s" * 32) != deployment_id("smartspace", "t" * 32)


async def test_two_deployments_on_one_redis_channel_ignore_each_others_events(redis_url, buses):
    shared = channel()
    a = await buses(RedisBus(redis_url, Metrics(), channel=shared, deployment="deployment-a"))
    a_peer = await buses(RedisBus(redis_url, Metrics(), channel=shared, deployment="deployment-a"))
    b = await buses(RedisBus(redis_url, Metrics(), channel=shared, deployment="deployment-b"))
    b_peer = await buses(RedisBus(redis_url, Metrics(), channel=shared, deployment="deployment-b"))
    heard = {name: Recorder() for name in ("a_peer", "b", "b_peer")}
    a_peer.listen(heard["a_peer"])
    b.listen(heard["b"])
    b_peer.listen(heard["b_peer"])
    for bus in (a, a_peer, b, b_peer):
        await connected(bus)

    await a.publish([event(1, "prj_a")])
    await heard["a_peer"].until(lambda: heard["a_peer"].seqs == [1], "A's peer hears A")
    # Redis has sent A's message to every subscriber; B's own deployment speaks after it, on the same channel:
    await b_peer.publish([event(7, "prj_b")])
    await heard["b"].until(lambda: 7 in heard["b"].seqs, "B hears its peer")
    assert [(e.project_id, e.seq) for e in heard["b"].events] == [("prj_b", 7)]  # and never heard A
    assert heard["b_peer"].seqs == [7]  # its own publish, delivered locally
    assert heard["a_peer"].seqs == [1]


async def test_with_default_options_a_frozen_subscription_is_noticed_and_nothing_is_lost(settings, db, redis_url,
                                                                                         proxy, aiohttp_client):
    name = channel()
    a, bus_a, metrics_a = await redis_app(aiohttp_client, settings, db, through(proxy, redis_url), name)
    b, _, _ = await redis_app(aiohttp_client, settings, db, redis_url, name)
    assert bus_a.deaf_after_seconds <= 2  # the default heartbeat: a frozen Redis is noticed within 2 s
    alice = await register(b)
    lc = await LiveClient(str(a.make_url("/")), alice.token).connect()
    try:
        await lc.subscribe(alice.project_id)
        proxy.freeze()  # the connection stays open, nothing flows: no socket error, only silence
        for i in range(3):
            resp = await b.patch(f"/api/v1/projects/{alice.project_id}", json={"name": f"frozen {i}"},
                                 headers=alice.headers)
            assert resp.status == 200
        await until_errors(metrics_a, "listen")
        proxy.thaw()
        await lc.until_seq(4)
        assert lc.seqs() == [1, 2, 3, 4]
    finally:
        await lc.disconnect()
