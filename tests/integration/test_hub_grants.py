"""The hub's grants (channels/hub.py ``_Grants``): a warm connect + subscribe reads nothing from the database,
and every way a grant can stop being true takes effect at once — a member removed or a key revoked on another
process (through Redis), an access token that expires while its grant is kept.

Statements are counted on the database engine itself (SQLAlchemy's ``before_cursor_execute``), so "reads
nothing" means no SQL reached the driver."""

from __future__ import annotations

import asyncio
import time
from contextlib import AsyncExitStack, contextmanager

import pytest
import socketio
from sqlalchemy import event as sa_event

from tests.factories import add_member, create_key, register
from tests.integration.test_bus import channel, redis_app
from tests.integration.test_sockets import head_seq, patch, url
from tests.live import WAIT, LiveClient


@contextmanager
def statements(db):
    """The SQL statements run on ``db`` while the block runs."""
    seen: list[str] = []

    def note(conn, cursor, statement, *args) -> None:
        seen.append(statement)

    sa_event.listen(db.engine.sync_engine, "before_cursor_execute", note)
    try:
        yield seen
    finally:
        sa_event.remove(db.engine.sync_engine, "before_cursor_execute", note)


async def test_a_warm_connect_and_subscribe_runs_no_sql_and_still_gets_every_later_event(client, db):
    alice = await register(client)
    async with AsyncExitStack() as stack:
        first = await LiveClient(url(client), alice.token).connect()
        stack.push_async_callback(first.disconnect)
        assert (await first.subscribe(alice.project_id))["ok"] is True  # cold: checked, read, kept
        head = await head_seq(client, alice)
        with statements(db) as sql:
            second = await LiveClient(url(client), alice.token).connect()
            stack.push_async_callback(second.disconnect)
            ack = await second.subscribe(alice.project_id, since=head)
        assert sql == []
        assert ack == {"ok": True, "project_id": alice.project_id, "seq": head}
        await patch(client, alice)
        await second.until_seq(head + 1)
        await first.until_seq(head + 1)
        assert second.seqs() == [head + 1]
        # Something to replay is read from the log, grants or not.
        third = await LiveClient(url(client), alice.token).connect()
        stack.push_async_callback(third.disconnect)
        with statements(db) as sql:
            assert (await third.subscribe(alice.project_id, since=0))["seq"] == head + 1
        assert sql
        await third.until_seq(head + 1)
        assert third.seqs() == list(range(1, head + 2))


async def test_a_member_removed_on_another_process_is_cut_off_and_refused_there(settings, db, redis_url,
                                                                                 aiohttp_client):
    name = channel()
    a, _, _ = await redis_app(aiohttp_client, settings, db, redis_url, name)
    b, _, _ = await redis_app(aiohttp_client, settings, db, redis_url, name)
    alice, bob = await register(b), await register(b)
    await add_member(b, alice, bob, "member")
    async with AsyncExitStack() as stack:
        clients = []
        for token in (alice.token, bob.token, bob.token):  # alice keeps the project's stream alive on A
            lc = await LiveClient(url(a), token).connect()
            stack.push_async_callback(lc.disconnect)
            clients.append(lc)
        watcher, subscribed, idle = clients
        for lc in (watcher, subscribed):
            assert (await lc.subscribe(alice.project_id))["ok"] is True
        head = await head_seq(b, alice)
        with statements(db) as sql:  # bob's grants on A are warm: a subscribe there would read nothing
            assert (await idle.subscribe(alice.project_id, since=head))["ok"] is True
            await idle.call("unsubscribe", {"project_id": alice.project_id})
        assert sql == []
        resp = await b.delete(f"/api/v1/projects/{alice.project_id}/members/{bob.id}", headers=alice.headers)
        assert resp.status in (200, 204), await resp.text()
        await subscribed.until_type("member.removed")
        await watcher.until_type("member.removed")
        for lc in (subscribed, idle):
            ack = await lc.subscribe(alice.project_id, since=head + 1)
            assert ack["ok"] is False and ack["error"]["code"] == "forbidden"
        await patch(b, alice)  # alice still gets it; bob's sockets on A never do
        await watcher.until_seq(head + 2)
        await patch(b, bob)  # barrier: bob's own project, on the socket that was removed from alice's
        assert (await subscribed.subscribe(bob.project_id))["ok"] is True
        await subscribed.until(lambda: any(e["project_id"] == bob.project_id and e["type"] == "project.updated"
                                           for e in subscribed.received), what="the barrier")
        assert [e["seq"] for e in subscribed.received if e["project_id"] == alice.project_id][-1] == head + 1


async def test_a_key_revoked_on_another_process_refuses_its_warm_sockets_at_once(settings, db, redis_url,
                                                                                  aiohttp_client):
    name = channel()
    a, _, _ = await redis_app(aiohttp_client, settings, db, redis_url, name)
    b, _, _ = await redis_app(aiohttp_client, settings, db, redis_url, name)
    alice = await register(b)
    key = await create_key(b, alice, scopes=["audit:read"])  # a key sees its project's live log with audit:read
    async with AsyncExitStack() as stack:
        watcher = await LiveClient(url(a), alice.token).connect()
        stack.push_async_callback(watcher.disconnect)
        assert (await watcher.subscribe(alice.project_id))["ok"] is True
        idle = await LiveClient(url(a), key["key"]).connect()
        stack.push_async_callback(idle.disconnect)
        head = await head_seq(b, alice)
        assert (await idle.subscribe(alice.project_id, since=head))["ok"] is True  # warms the key's grants on A
        await idle.call("unsubscribe", {"project_id": alice.project_id})
        resp = await b.delete(f"/api/v1/projects/{alice.project_id}/keys/{key['id']}", headers=alice.headers)
        assert resp.status in (200, 204), await resp.text()
        await watcher.until_type("key.revoked")
        ack = await idle.subscribe(alice.project_id, since=head + 1)
        assert ack["ok"] is False and ack["error"]["code"] == "unauthorized"
        refused = LiveClient(url(a), key["key"])  # and a new connect with it, where the key was warm
        with pytest.raises(socketio.exceptions.ConnectionError):
            await refused.connect()
        assert refused.connect_errors == [{"message": "unauthorized"}]


async def test_an_access_token_that_expires_while_its_grant_is_kept_is_refused(client, container):
    alice = await register(client)
    container.tokens.ttl_seconds = 2
    token = container.tokens.issue(alice.id)
    async with AsyncExitStack() as stack:
        watcher = await LiveClient(url(client), alice.token).connect()
        stack.push_async_callback(watcher.disconnect)
        assert (await watcher.subscribe(alice.project_id))["ok"] is True
        lc = await LiveClient(url(client), token).connect()
        stack.push_async_callback(lc.disconnect)
        head = await head_seq(client, alice)
        assert (await lc.subscribe(alice.project_id, since=head))["ok"] is True
        await lc.call("unsubscribe", {"project_id": alice.project_id})
        expires = time.time() + 3  # exp is whole seconds; pyjwt refuses once now > exp
        async with asyncio.timeout(WAIT + 3):
            while time.time() < expires:  # noqa: ASYNC110 - waiting for the clock, not for an event
                await asyncio.sleep(0.1)
        ack = await lc.subscribe(alice.project_id, since=head)
        assert ack["ok"] is False and ack["error"]["code"] == "unauthorized"
