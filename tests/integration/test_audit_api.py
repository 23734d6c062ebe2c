"""The audit API (API.md "Audit"): the event log listed with filters and cursor pagination, and verify."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

import pytest

from tests.factories import add_member, bearer, create_agent, create_key, quick_user

P = "/api/v1/projects/{}"


async def error(resp, status: int, code: str) -> None:
    assert resp.status == status, await resp.text()
    assert (await resp.json())["error"]["code"] == code


async def walk(client, url: str, headers, params: dict[str, str] | None = None, limit: int = 7) -> list[dict]:
    """Every item of a listing, following next_cursor."""
    items: list[dict] = []
    cursor = None
    while True:
        query = {**(params or {}), "limit": str(limit), **({"cursor": cursor} if cursor else {})}
        resp = await client.get(url, params=query, headers=headers)
        assert resp.status == 200, await resp.text()
        page = await resp.json()
        assert len(page["items"]) <= limit
        items += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            return items


@pytest.fixture
async def busy(client, container):
    """A project with events by two actors: the owner and an admin."""
    owner, admin = await asyncio.gather(quick_user(container), quick_user(container))
    await add_member(client, owner, admin, "admin")  # seq 2
    for i in range(10):  # seqs 3..12 by the owner
        await create_agent(client, owner, f"owner-{i}")
    for i in range(5):  # seqs 13..17 by the admin
        await create_agent(client, admin, f"admin-{i}", project_id=owner.project_id)
    await create_key(client, owner)  # seq 18
    return owner, admin


async def test_list_is_newest_first_with_the_full_envelope(client, busy):
    owner, _ = busy
    resp = await client.get(P.format(owner.project_id) + "/audit", headers=owner.headers)
    assert resp.status == 200
    page = await resp.json()
    assert [e["seq"] for e in page["items"]] == list(range(18, 0, -1))
    assert page["next_cursor"] is None
    first = page["items"][-1]
    assert set(first) >= {"id", "project_id", "seq", "type", "ts", "actor", "data", "hash", "prev_hash"}
    assert (first["type"], first["project_id"], first["actor"]) == ("project.created", owner.project_id,
                                                                   f"user:{owner.id}")
    datetime.fromisoformat(first["ts"])


async def test_cursor_pagination_walks_every_event_once(client, busy):
    owner, _ = busy
    url = P.format(owner.project_id) + "/audit"
    for limit in (1, 5, 7, 18, 200):
        seqs = [e["seq"] for e in await walk(client, url, owner.headers, limit=limit)]
        assert seqs == list(range(18, 0, -1)), limit


async def test_filter_by_exact_type_and_by_prefix(client, busy):
    owner, _ = busy
    url = P.format(owner.project_id) + "/audit"
    agents = await walk(client, url, owner.headers, {"type": "agent.created"}, limit=4)
    assert [e["seq"] for e in agents] == list(range(17, 2, -1))
    assert {e["type"] for e in agents} == {"agent.created"}
    prefixed = await walk(client, url, owner.headers, {"type": "agent.*"}, limit=4)
    assert prefixed == agents
    assert [e["type"] for e in await walk(client, url, owner.headers, {"type": "member.*"})] == ["member.added"]
    assert [e["type"] for e in await walk(client, url, owner.headers, {"type": "*"})][-1] == "project.created"
    assert await walk(client, url, owner.headers, {"type": "agent"}) == []
    assert await walk(client, url, owner.headers, {"type": "agent.created.*"}) == []


async def test_like_wildcards_in_a_type_filter_are_literal(client, busy):
    owner, _ = busy
    url = P.format(owner.project_id) + "/audit"
    # "_" and "%" are SQL LIKE wildcards; in a type filter they mean themselves.
    for pattern in ("agent_created", "agent_*", "agent%", "%", "_gent.*", "%.created"):
        assert await walk(client, url, owner.headers, {"type": pattern}) == [], pattern


async def test_filter_by_actor(client, busy):
    owner, admin = busy
    url = P.format(owner.project_id) + "/audit"
    by_admin = await walk(client, url, owner.headers, {"actor": f"user:{admin.id}"}, limit=2)
    assert [e["seq"] for e in by_admin] == [17, 16, 15, 14, 13]
    by_owner = await walk(client, url, owner.headers, {"actor": f"user:{owner.id}", "type": "agent.*"})
    assert len(by_owner) == 10
    assert await walk(client, url, owner.headers, {"actor": "user:usr_nobody"}) == []


async def test_filter_by_time_window(client, busy):
    owner, _ = busy
    url = P.format(owner.project_id) + "/audit"
    events = {e["seq"]: e for e in await walk(client, url, owner.headers)}
    since, until = events[5]["ts"], events[15]["ts"]
    window = await walk(client, url, owner.headers, {"since": since, "until": until}, limit=3)
    # since is inclusive, until exclusive; events of one unit of work share a ts.
    expected = [s for s in range(18, 0, -1) if since <= events[s]["ts"] < until]
    assert [e["seq"] for e in window] == expected
    assert 5 in expected and 15 not in expected
    # The same instant written with an offset selects the same events.
    moment = datetime.fromisoformat(since).astimezone(timezone(timedelta(hours=2)))
    shifted = await walk(client, url, owner.headers, {"since": moment.isoformat(), "until": until})
    assert shifted == window
    later = (datetime.fromisoformat(events[18]["ts"]) + timedelta(seconds=1)).isoformat()
    assert await walk(client, url, owner.headers, {"since": later}) == []


@pytest.mark.parametrize("params", [{"since": "yesterday"}, {"until": "2026-13-01T00:00:00Z"},
                                    {"cursor": "not-a-cursor"}, {"cursor": "YWJj"}, {"limit": "0"},
                                    {"limit": "1000"}])
async def test_bad_audit_parameters_are_422(client, container, params):
    owner = await quick_user(container)
    await error(await client.get(P.format(owner.project_id) + "/audit", params=params, headers=owner.headers),
                422, "invalid_request")


async def test_viewers_and_api_keys_may_read_the_log(client, container):
    owner, viewer = await asyncio.gather(quick_user(container), quick_user(container))
    await add_member(client, owner, viewer, "viewer")
    key = await create_key(client, owner, scopes=["audit:read"])
    p = P.format(owner.project_id)
    for headers in (viewer.headers, {"X-API-Key": key["key"]}, bearer(key["key"])):
        listed = await client.get(p + "/audit", headers=headers)
        assert listed.status == 200
        assert [e["type"] for e in (await listed.json())["items"]] == ["key.created", "member.added",
                                                                      "project.created"]
        verified = await client.get(p + "/audit/verify", headers=headers)
        assert await verified.json() == {"ok": True, "checked": 3, "first_bad_seq": None}


@pytest.mark.parametrize("route", ["/audit", "/audit/verify"])
async def test_audit_auth_failures_and_not_found(client, container, route):
    owner, stranger = await asyncio.gather(quick_user(container), quick_user(container))
    other_key = await create_key(client, stranger, scopes=["audit:read"])
    url = P.format(owner.project_id) + route
    await error(await client.get(url), 401, "unauthorized")
    await error(await client.get(url, headers=bearer("nope")), 401, "unauthorized")
    await error(await client.get(url, headers=stranger.headers), 404, "not_found")
    await error(await client.get(url, headers={"X-API-Key": other_key["key"]}), 404, "not_found")
    await error(await client.get(P.format("prj_missing") + route, headers=owner.headers), 404, "not_found")
