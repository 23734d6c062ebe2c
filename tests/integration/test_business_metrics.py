"""/metrics' business series, driven by real gateway traffic (the official openai client against the app on a
real socket, a fake upstream speaking the providers' wire formats) and read with prometheus_client's parser."""

from __future__ import annotations

import asyncio

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.app import create_app
from server.container import Container
from server.http import CONTAINER
from server.metrics import Metrics
from server.providers import Providers, Upstream
from storage.bus import RedisBus
from tests.conftest import redis_bus
from tests.factories import create_key, register
from tests.fakes.gateway import OPENAI_KEY, start_gateway
from tests.fakes.upstream import Behavior, FakeUpstream

USER = [{"role": "user", "content": "count my money please"}]
MINI, HAIKU = "openai/gpt-4o-mini", "anthropic/claude-3-5-haiku"


class Scrape:
    def __init__(self, text: str) -> None:
        self.values = {(s.name, frozenset(s.labels.items())): s.value
                       for family in text_string_to_metric_families(text) for s in family.samples}

    def get(self, name: str, **labels: str) -> float:
        return self.values.get((name, frozenset(labels.items())), 0.0)

    def total(self, name: str) -> float:
        return sum(v for (n, _), v in self.values.items() if n == name)


async def scrape(client) -> Scrape:
    resp = await client.get("/metrics")
    assert resp.status == 200
    return Scrape(await resp.text())


@pytest.fixture
async def gw(aiohttp_client, settings, db, metrics):
    env = await start_gateway(aiohttp_client, settings, db, metrics)
    yield env
    await env.close()


async def call(gw, model: str, **kw) -> int:
    raw = await gw.oai.chat.completions.with_raw_response.create(model=model, messages=USER, max_tokens=30, **kw)
    return int(raw.headers["x-smartspace-cost-micros"])


async def test_spend_tokens_requests_and_durations_by_provider_model_and_outcome(gw):
    costs = [await call(gw, MINI), await call(gw, MINI), await call(gw, HAIKU)]
    mini_reported = [r for r in gw.fake.reported if r.model == "gpt-4o-mini"]
    assert len(mini_reported) == 2

    gw.fake.plan(Behavior(status=500))  # the upstream fails: the request fails, nothing is charged
    with pytest.raises(openai.APIStatusError):
        await call(gw, MINI)
    with pytest.raises(openai.NotFoundError):  # not in the catalog: one "unknown" label, whatever was typed
        await call(gw, "openai/no-such-model-7f3a")
    await gw.put_policy(blocked_models=[HAIKU])
    with pytest.raises(openai.PermissionDeniedError):
        await call(gw, HAIKU)

    m = await scrape(gw.client)
    settled = {"provider": "openai", "model": MINI, "outcome": "settled"}
    assert m.get("smartspace_spend_requests_total", **settled) == 2
    assert m.get("smartspace_spend_micros_total", **settled) == costs[0] + costs[1] > 0
    assert m.get("smartspace_spend_tokens_total", **settled, direction="input") == sum(
        r.input_tokens for r in mini_reported)
    assert m.get("smartspace_spend_tokens_total", **settled, direction="output") == sum(
        r.output_tokens for r in mini_reported)
    haiku = {"provider": "anthropic", "model": HAIKU}
    assert m.get("smartspace_spend_requests_total", **haiku, outcome="settled") == 1
    assert m.get("smartspace_spend_micros_total", **haiku, outcome="settled") == costs[2]
    assert m.get("smartspace_spend_requests_total", **haiku, outcome="rejected") == 1  # the policy said no
    assert m.get("smartspace_spend_requests_total", provider="openai", model=MINI, outcome="failed") == 1
    assert m.get("smartspace_spend_micros_total", provider="openai", model=MINI, outcome="failed") == 0
    assert m.get("smartspace_spend_requests_total", provider="unknown", model="unknown", outcome="rejected") == 1
    assert not any("no-such-model" in str(labels) for _, labels in m.values)
    assert m.get("smartspace_spend_call_duration_seconds_count", **settled) == 2
    assert m.get("smartspace_spend_call_duration_seconds_sum", **settled) > 0
    assert m.get("smartspace_spend_call_duration_seconds_count", provider="openai", model=MINI,
                 outcome="failed") == 1

    usage = await (await gw.client.get(f"/api/v1/projects/{gw.project_id}/usage", headers=gw.owner.headers)).json()
    assert m.total("smartspace_spend_micros_total") == usage["totals"]["cost_micros"] == sum(costs)
    assert m.total("smartspace_spend_requests_total") == sum(usage["requests_by_status"].values()) == 6


async def test_reservations_outstanding_follow_a_held_request(gw):
    m = await scrape(gw.client)
    assert m.get("smartspace_reservations_outstanding", status="pending_approval") == 0
    await gw.put_policy(require_approval_above_micros=1)
    with pytest.raises(openai.PermissionDeniedError) as held:
        await call(gw, MINI)
    request_id = held.value.body["details"]["request_id"]
    stored = await (await gw.client.get(f"/api/v1/requests/{request_id}", headers=gw.owner.headers)).json()

    m = await scrape(gw.client)
    assert m.get("smartspace_reservations_outstanding", status="pending_approval") == 1
    assert m.get("smartspace_reservations_outstanding_micros", status="pending_approval") == stored["reserved_micros"]
    assert m.get("smartspace_reservations_outstanding", status="executing") == 0

    resp = await gw.client.post(f"/api/v1/requests/{request_id}/reject", json={"reason": "no"},
                                headers=gw.owner.headers)
    assert resp.status == 200
    m = await scrape(gw.client)
    assert m.get("smartspace_reservations_outstanding", status="pending_approval") == 0
    assert m.get("smartspace_reservations_outstanding_micros", status="pending_approval") == 0
    assert m.get("smartspace_spend_requests_total", provider="openai", model=MINI, outcome="rejected") == 1


async def test_each_process_counts_only_what_it_committed(aiohttp_client, settings, db, redis_url):
    """Two processes on one Redis bus both hear every event; summing their series still counts each request once."""
    fake = await FakeUpstream().start()
    first = redis_bus(redis_url, Metrics())
    second = RedisBus(redis_url, Metrics(), channel=first.channel)
    heard = asyncio.Event()

    async def on_second(event) -> None:
        if event.type == "request.settled":
            heard.set()

    second.listen(on_second)
    try:
        clients = []
        for bus in (first, second):
            providers = Providers(settings, upstreams=[Upstream(provider="openai", kind="openai",
                                                                base_url=fake.base_url, api_key=OPENAI_KEY)])
            container = Container(settings, db, bus, metrics=bus.metrics, providers=providers)
            clients.append(await aiohttp_client(create_app(settings, container=container)))
        a, b = clients
        await asyncio.wait_for(second.connected.wait(), 10)
        owner = await register(a)
        key = await create_key(a, owner)
        async with a.app[CONTAINER].uow() as scope:
            await scope.wallets.credit(owner.project_id, 10_000_000, kind="admin_credit", ref=None, memo="test")
        sdk = openai.AsyncOpenAI(base_url=str(a.make_url("/v1")), api_key=key["key"], max_retries=0)
        try:
            await sdk.chat.completions.create(model=MINI, messages=USER, max_tokens=10)
        finally:
            await sdk.close()
        await asyncio.wait_for(heard.wait(), 10)  # the second process did hear the settlement
        labels = {"provider": "openai", "model": MINI, "outcome": "settled"}
        assert (await scrape(a)).get("smartspace_spend_requests_total", **labels) == 1
        assert (await scrape(b)).get("smartspace_spend_requests_total", **labels) == 0
    finally:
        await fake.stop()
