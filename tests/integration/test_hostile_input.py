"""Hostile input at the edge (issue 9 items 1, 2, 11), on both engines: a sweep over every route of the route
table and every Socket.IO event with deeply nested JSON and with NUL characters. Each must be a 4xx with a code
(or, for a Socket.IO packet that does not decode, a closed connection), and nothing may change: every table's
row count and every event log head are compared before and after. Gateway message content is the one place a
NUL is passed on (to the provider, unchanged) and stored safely.

The process-killing sizes (30 000 brackets) are sent to a real ``smartspace serve`` in
tests/e2e/test_hostile_edge.py: a crash here would take the test run with it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
from typing import Any

import aiohttp
import msgspec
import pytest
import socketio
import sqlalchemy as sa
from aiohttp import web

from channels.hub import HUB
from domain.errors import Unavailable
from domain.events import NAMESPACES
from domain.inputs import MAX_DEPTH, SocketJson, depth_exceeds
from server.chain import open_chain
from server.http import routes
from storage.models import metadata, spend_requests
from tests.factories import create_agent, create_key, register
from tests.fakes.gateway import start_gateway
from tests.live import WAIT, LiveClient

ADMIN_EMAIL = "admin@smartspace.test"  # conftest's settings make this user a platform admin
DEEP = b"[" * 3000 + b"]" * 3000  # deep enough to tell the limit from a validation error; small enough to parse
DEEP_IN_OBJECT = b'{"metadata": ' + b'{"a": ' * (MAX_DEPTH + 1) + b"1" + b"}" * (MAX_DEPTH + 1) + b"}"
NUL = "a\x00b"
_PARAM = re.compile(r"\{(\w+)(?::[^}]*)?\}")


# ---------------------------------------------------------------- the depth scan itself
def _depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    return 0


def _nest(levels: int, leaf: Any = "x") -> Any:
    value = leaf
    for i in range(levels):
        value = [value, "]]}"] if i % 2 else {"k[{": value, '"\\': "[["}
    return value


@pytest.mark.parametrize("levels", [0, 1, MAX_DEPTH - 1, MAX_DEPTH, MAX_DEPTH + 1, 2 * MAX_DEPTH, 3 * MAX_DEPTH])
def test_depth_scan_agrees_with_the_parsed_depth(levels):
    text = json.dumps(_nest(levels))
    assert _depth(json.loads(text)) == levels
    assert depth_exceeds(text.encode()) is (levels > MAX_DEPTH)
    assert depth_exceeds(text) is (levels > MAX_DEPTH)


@pytest.mark.parametrize("raw", [
    b"[" * 100_000,  # never closed: a parser recurses before it meets the end
    b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1),
    b"[{" * 40 + b"}]" * 40,
    (b"[" * MAX_DEPTH + b"]" * MAX_DEPTH + b",") * 50 + b"[" * (MAX_DEPTH + 1),
    b'["\\\\"' + b"," + b"[" * 70 + b"]" * 70 + b"]",  # an escaped backslash ends its string
])
def test_depth_scan_refuses(raw):
    assert depth_exceeds(raw)


@pytest.mark.parametrize("raw", [
    b'["' + b"[" * 100_000 + b'"]',  # brackets inside a string are text
    b'["\\"' + b"[" * 100 + b'"]',  # an escaped quote does not end the string
    b"[" + b"[[]]," * 10_000 + b"[]]",  # many brackets, shallow
    b"",
])
def test_depth_scan_accepts(raw):
    assert not depth_exceeds(raw)


def test_socket_json_refuses_deep_packets_with_a_value_error():
    with pytest.raises(ValueError):
        SocketJson.loads('["subscribe",' + "[" * 5000 + "]" * 5000 + "]")
    assert SocketJson.loads('["subscribe",{"project_id":"p"}]') == ["subscribe", {"project_id": "p"}]


# ---------------------------------------------------------------- the world the sweep runs in
class World:
    def __init__(self, gw, admin, other, ids: dict[str, str]) -> None:
        self.gw, self.client, self.container, self.key = gw, gw.client, gw.container, gw.key
        self.admin, self.other, self.ids = admin, other, ids

    def headers(self, spec) -> dict[str, str]:
        if spec.path.startswith("/v1/"):
            return {"Authorization": f"Bearer {self.key['key']}"}
        return dict(self.admin.headers)

    def path(self, spec, raw: dict[str, str] | None = None) -> str:
        def value(m: re.Match) -> str:
            name = m.group(1)
            if raw and name in raw:
                return raw[name]
            return self.ids.get(name, "x")

        return _PARAM.sub(value, spec.path)

    async def state(self) -> dict[str, Any]:
        """Every table's row count, and every project's event log head."""
        counts = {}
        async with self.container.db.read() as conn:
            for table in metadata.sorted_tables:
                counts[table.name] = (await conn.execute(sa.select(sa.func.count()).select_from(table))).scalar()
            heads = (await conn.execute(sa.text("SELECT project_id, seq, hash FROM event_heads"))).all()
        return {"counts": counts, "heads": sorted(tuple(h) for h in heads)}


@pytest.fixture
async def world(aiohttp_client, settings, db, metrics):
    gw = await start_gateway(aiohttp_client, settings, db, metrics)
    client = gw.client
    admin = await register(client, email=ADMIN_EMAIL)
    other = await register(client)
    agent = await create_agent(client, admin)
    key = await create_key(client, admin)
    resp = await client.post(f"/api/v1/projects/{admin.project_id}/budgets", headers=admin.headers,
                             json={"name": "b", "limit_micros": 1_000_000, "period": "month"})
    assert resp.status == 201, await resp.text()
    budget = await resp.json()
    ids = {"project_id": admin.project_id, "user_id": other.id, "agent_id": agent["id"], "key_id": key["id"],
           "budget_id": budget["id"], "request_id": "req_missing", "deposit_id": "dep_missing",
           "payment_id": "pay_missing", "provider": "openai", "model": "gpt-4o-mini"}
    resp = await client.post(f"/api/v1/projects/{admin.project_id}/members", headers=admin.headers,
                             json={"email": other.email, "role": "viewer"})
    assert resp.status == 201, await resp.text()
    yield World(gw, admin, other, ids)
    await gw.close()


def _error(status: int, body: Any, where: str) -> dict:
    assert 400 <= status < 500, f"{where}: {status} {body}"
    error = body["error"]
    assert isinstance(error["code"], str) and error["code"], f"{where}: {body}"
    return error


async def _send(world: World, spec, *, path: str | None = None, body: bytes | None = None):
    headers = world.headers(spec)
    if body is not None:
        headers["Content-Type"] = "application/json"
    async with world.client.request(spec.method, path or world.path(spec), data=body, headers=headers) as resp:
        text = await resp.text()
        try:
            return resp.status, json.loads(text)
        except ValueError:
            return resp.status, {"raw": text[:300]}


def _invalid(path: str) -> int:
    """The status of an invalid request: 422 on REST, OpenAI's 400 under /v1/ (the gateway)."""
    return 400 if path.startswith("/v1/") else 422


def _body_specs():
    return [s for s in routes.specs if s.method in ("POST", "PUT", "PATCH")]


def _fields(spec) -> list[str]:
    if spec.key_auth:  # the gateway: its own fields, read from the body as plain JSON (spec.body describes it)
        return ["model", "metadata", "user", "stop", "encoding_format"]
    return [f.encode_name for f in msgspec.structs.fields(spec.body)]


# ---------------------------------------------------------------- the HTTP sweep
async def test_deep_bodies_are_refused_on_every_route_and_change_nothing(world):
    before = await world.state()
    tried = 0
    for spec in _body_specs():
        for body in (DEEP, DEEP_IN_OBJECT):
            status, answer = await _send(world, spec, body=body)
            where = f"{spec.method} {spec.path}"
            error = _error(status, answer, where)
            assert status == 400 and error["code"] == "invalid_request", f"{where}: {status} {answer}"
            assert error["details"]["max_depth"] == MAX_DEPTH, f"{where}: {answer}"
            tried += 1
    assert tried == 2 * len(_body_specs()) >= 2 * 20
    assert await world.state() == before
    assert (await world.client.get("/health")).status == 200


async def test_nul_in_any_body_field_is_a_422_naming_it_and_changes_nothing(world):
    before = await world.state()
    tried = 0
    for spec in _body_specs():
        gateway = spec.path.startswith("/v1/")
        for name in _fields(spec):
            for value, field in ((NUL, name), ({"k": ["ok", NUL]}, f"{name}.k[1]"), ({NUL: 1}, f"{name}.{NUL}")):
                status, answer = await _send(world, spec, body=json.dumps({name: value}).encode())
                where = f"{spec.method} {spec.path} {field!r}"
                error = _error(status, answer, where)
                assert status == _invalid(spec.path), f"{where}: {status} {answer}"
                assert error["code"] == "invalid_request", f"{where}: {answer}"
                assert error["details"]["param" if gateway else "field"] == field, f"{where}: {answer}"
                assert "NUL" in error["message"]
                tried += 1
    assert tried >= 3 * 60
    assert await world.state() == before


async def test_nul_in_any_path_or_query_parameter_is_a_422_naming_it_and_changes_nothing(world):
    before = await world.state()
    tried = 0
    for spec in routes.specs:
        where = f"{spec.method} {spec.path}"
        for name in _PARAM.findall(spec.path):
            status, answer = await _send(world, spec, path=world.path(spec, {name: "a%00b"}))
            error = _error(status, answer, f"{where} path {name}")
            assert status == _invalid(spec.path) and error["code"] == "invalid_request", f"{where} {name}: {answer}"
            assert error["details"] == {"field": name, "in": "path"}, f"{where}: {answer}"
            tried += 1
        for name in [*spec.query, "search"]:
            status, answer = await _send(world, spec, path=f"{world.path(spec)}?{name}=%00")
            error = _error(status, answer, f"{where} query {name}")
            assert status == _invalid(spec.path) and error["details"] == {"field": name, "in": "query"}, \
                f"{where}: {answer}"
            tried += 1
    # Named in the issue: a search, an audit type filter, a request id.
    audit = f"/api/v1/projects/{world.ids['project_id']}/audit?type=%00"
    status, answer = await _send(world, routes.specs[0], path=audit)
    assert status == 422 and answer["error"]["details"]["field"] == "type"
    assert tried >= 100
    assert await world.state() == before


async def test_a_raw_nul_byte_in_a_header_is_refused_by_the_http_parser(world):
    url = world.client.make_url("/api/v1/me")
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        writer.write(b"POST /api/v1/projects HTTP/1.1\r\nHost: x\r\nIdempotency-Key: a\x00b\r\n"
                     b"Authorization: Bearer " + world.admin.token.encode() + b"\r\nContent-Length: 2\r\n\r\n{}")
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), WAIT)
    finally:
        writer.close()
    assert b" 400 " in status_line
    assert (await world.client.get("/health")).status == 200


async def test_gateway_content_with_nul_reaches_the_provider_unchanged_and_is_stored(world, backend):
    gw_headers = {"Authorization": f"Bearer {world.key['key']}"}
    content = "before\x00after"
    resp = await world.client.post("/v1/chat/completions", headers=gw_headers, json={
        "model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": content}], "max_tokens": 20})
    assert resp.status == 200, await resp.text()
    request_id = resp.headers["x-smartspace-request-id"]
    resp = await world.client.post("/v1/embeddings", headers=gw_headers,
                                   json={"model": "openai/text-embedding-3-small", "input": ["x\x00y"]})
    assert resp.status == 200, await resp.text()
    # A NUL in a message's role (not content) is refused, naming it.
    resp = await world.client.post("/v1/chat/completions", headers=gw_headers, json={
        "model": "openai/gpt-4o-mini", "messages": [{"role": "us\x00er", "content": "hi"}]})
    assert resp.status == 400 and (await resp.json())["error"]["details"]["param"] == "messages[0].role"
    resp = await world.client.get(f"/api/v1/requests/{request_id}", headers=world.gw.owner.headers)
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["status"] == "settled"
    async with world.container.db.read() as conn:
        stored = (await conn.execute(sa.select(spend_requests.c.params)
                                     .where(spend_requests.c.id == request_id))).scalar()
    assert stored["messages"][0]["content"] == "before\ufffdafter"  # the same on both engines


async def test_gateway_sends_the_exact_content_to_the_provider(aiohttp_client, settings, db, metrics):
    gw = await start_gateway(aiohttp_client, settings, db, metrics)
    try:
        parts = [{"type": "text", "text": "a\x00"}]
        body = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": parts}]}
        resp = await gw.client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {gw.key['key']}"},
                                    json=body)
        assert resp.status == 200, await resp.text()
        assert gw.fake.received[-1].body["messages"][0]["content"] == [{"type": "text", "text": "a\x00"}]
    finally:
        await gw.close()


# ---------------------------------------------------------------- the Socket.IO sweep
def _socket_events(world: World) -> dict[str, list[str]]:
    """Every namespace's event handlers, as registered on the server."""
    hub = world.client.app[HUB]
    return {ns: sorted(name[3:] for name in dir(handler) if name.startswith("on_")
                       and name not in ("on_connect", "on_disconnect"))
            for ns, handler in hub.sio.namespace_handlers.items()}


async def _raw_socket(world: World, namespace: str, token: str):
    """A websocket speaking Engine.IO/Socket.IO by hand, connected to ``namespace``."""
    session = aiohttp.ClientSession()
    ws = await session.ws_connect(world.client.make_url("/socket.io/?EIO=4&transport=websocket"))
    opened = await ws.receive_str(timeout=WAIT)
    assert opened.startswith("0")
    await ws.send_str(f"40{namespace}," + json.dumps({"token": token}))
    while True:
        msg = await ws.receive_str(timeout=WAIT)
        if msg.startswith(f"40{namespace},"):
            return session, ws


async def test_every_socket_event_refuses_nul_and_bad_since_with_invalid_request(world):
    events = _socket_events(world)
    assert set(events) == set(NAMESPACES) and all({"subscribe", "unsubscribe"} <= set(e) for e in events.values())
    before = await world.state()
    pid = world.ids["project_id"]
    with_nul = [{"project_id": NUL}, {"project_id": pid + "\x00"}, {"project_id": pid, "text": NUL},
                {"project_id": pid, "conversation_id": NUL, "text": "hi"}, {"project_id": pid, "since": NUL},
                {NUL: pid}, NUL, [NUL], {"project_id": pid, "x": [{"y": NUL}]}]
    bad_since = [{"project_id": pid, "since": s} for s in (2**63, 10**100, -1, 1.5, True, False, "0", "")]
    tried = 0
    for namespace, names in events.items():
        live = LiveClient(str(world.client.make_url("/")), world.admin.token, namespace)
        await live.connect()
        try:
            for event in names:
                for payload in with_nul + (bad_since if event == "subscribe" else []):
                    ack = await live.call(event, payload)
                    assert ack["ok"] is False, (namespace, event, payload, ack)
                    assert ack["error"]["code"] == "invalid_request", (namespace, event, payload, ack)
                    tried += 1
            ack = await live.subscribe(pid, since=2**63 - 1)
            assert ack["ok"] is True, ack  # the largest seq is fine; the socket still works
        finally:
            await live.disconnect()
    assert tried == sum(len(with_nul) * len(names) + len(bad_since) for names in events.values())
    assert await world.state() == before


@pytest.mark.parametrize("frame", [
    lambda ns: f"42{ns},1" + '["subscribe",' + "[" * 3000 + "]" * 3000 + "]",
    lambda ns: f"42{ns},1" + '["subscribe",' + '{"project_id":' * (MAX_DEPTH + 1) + '"x"' + "}" * (MAX_DEPTH + 1) + "]",
    lambda ns: "4" + "[" * 3000 + "]" * 3000,  # engine.io message that is itself JSON
])
async def test_a_deep_socket_packet_closes_its_connection_and_nothing_else(world, frame):
    before = await world.state()
    for namespace in NAMESPACES:
        bystander = LiveClient(str(world.client.make_url("/")), world.other.token, namespace)
        await bystander.connect()
        session, ws = await _raw_socket(world, namespace, world.admin.token)
        try:
            await ws.send_str(frame(namespace))
            # Refused: Engine.IO's close packet, then the server closes the websocket. No ack ever comes.
            seen = []
            while True:
                msg = await ws.receive(timeout=WAIT)
                if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
                    break
                assert msg.type == aiohttp.WSMsgType.TEXT, msg
                seen.append(msg.data)
                assert not msg.data.startswith(f"43{namespace},"), msg.data  # an ack
            assert seen == ["1"], seen
            ack = await bystander.subscribe(world.ids["project_id"])
            assert ack["ok"] is True, ack
        finally:
            await ws.close()
            await session.close()
            await bystander.disconnect()
    assert await world.state() == before


@pytest.mark.parametrize("token", ["\x00", "sk-" + "\x00" * 40, "x" * 10 + "\x00"])
async def test_a_nul_token_is_refused_on_connect(world, token):
    sio = socketio.AsyncClient(reconnection=False)
    with pytest.raises(socketio.exceptions.ConnectionError):
        await sio.connect(str(world.client.make_url("/")), auth={"token": token}, namespaces=["/budgets"],
                          transports=["websocket"], wait_timeout=WAIT)
    await sio.disconnect()


# ---------------------------------------------------------------- JSON inside strings, and other decoders
async def test_a_cursor_that_decodes_to_a_nul_is_refused(world):
    cursor = base64.urlsafe_b64encode(b"evt\x00x").decode().rstrip("=")
    for path in (f"/api/v1/projects/{world.ids['project_id']}/audit", "/api/v1/projects",
                 f"/api/v1/projects/{world.ids['project_id']}/wallet/ledger"):
        resp = await world.client.get(f"{path}?cursor={cursor}", headers=world.admin.headers)
        assert resp.status == 422, await resp.text()
        assert (await resp.json())["error"]["code"] == "invalid_request"


async def test_deep_tool_call_arguments_are_refused_not_parsed(world):
    deep = "[" * 3000 + "]" * 3000  # JSON inside a string: the body scan cannot see it, the adapter's decode must
    resp = await world.client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {world.key['key']}"},
                                   json={"model": "anthropic/claude-3-5-haiku", "max_tokens": 5, "messages": [
                                       {"role": "user", "content": "call it"},
                                       {"role": "assistant", "content": None, "tool_calls": [
                                           {"id": "c1", "type": "function",
                                            "function": {"name": "f", "arguments": deep}}]},
                                       {"role": "tool", "tool_call_id": "c1", "content": "done"}]})
    assert resp.status in (400, 422), await resp.text()
    assert (await resp.json())["error"]["code"] == "invalid_request"


async def test_a_deep_json_rpc_answer_is_a_failing_node_not_a_crash(aiohttp_server, settings):
    async def rpc(request: web.Request) -> web.Response:
        call = await request.json()
        if call["method"] == "eth_chainId":
            return web.json_response({"jsonrpc": "2.0", "id": call["id"], "result": "0x539"})
        deep = f'{{"jsonrpc": "2.0", "id": {call["id"]}, "result": ' + "[" * 3000 + "]" * 3000 + "}"
        return web.Response(text=deep, content_type="application/json")

    app = web.Application()
    app.router.add_post("/", rpc)
    node = await aiohttp_server(app)
    chain, devnet = await open_chain(msgspec.structs.replace(
        settings, chain="rpc", chain_rpc_url=str(node.make_url("/")), treasury_private_key="0x" + "11" * 32,
        usdc_address="0x" + "22" * 20))
    try:
        assert devnet is None and chain.chain_id == 1337
        with pytest.raises(Unavailable):
            await chain.head()
    finally:
        await chain.close()
