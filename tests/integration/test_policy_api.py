"""Project policies (versioned, with history) and the system policy over REST."""

from __future__ import annotations

import sqlalchemy as sa

from domain.catalog import PLATFORM_PROJECT
from storage.models import events
from tests.factories import add_member, create_key, register

RULES = {"allowed_providers": ["openai", "local"], "max_per_request_micros": 2_000_000,
         "require_approval_above_micros": 1_000_000, "allowed_hours": [8, 9, 10, 11],
         "rate_limits": {"key": {"per_minute": 10}}, "max_risk_score": 6}


def path(project_id: str) -> str:
    return f"/api/v1/projects/{project_id}/policy"


async def test_a_new_project_has_the_default_policy_at_version_zero(client):
    owner = await register(client)
    resp = await client.get(path(owner.project_id), headers=owner.headers)
    assert resp.status == 200
    body = await resp.json()
    assert body["version"] == 0 and body["project_id"] == owner.project_id
    assert body["max_per_request_micros"] == 10_000_000 and body["max_risk_score"] == 7.0


async def test_put_replaces_the_policy_bumps_the_version_and_emits_an_event(client, container):
    owner = await register(client)
    resp = await client.put(path(owner.project_id), json=RULES, headers=owner.headers)
    assert resp.status == 200, await resp.text()
    first = await resp.json()
    assert first["version"] == 1 and first["allowed_hours"] == [8, 9, 10, 11]
    assert first["created_by"] == f"user:{owner.id}"
    resp = await client.put(path(owner.project_id), json={"max_risk_score": 5}, headers=owner.headers)
    second = await resp.json()
    assert second["version"] == 2
    assert second["allowed_providers"] is None  # replaced, not merged
    current = await (await client.get(path(owner.project_id), headers=owner.headers)).json()
    assert current["version"] == 2 and current["max_risk_score"] == 5
    async with container.db.read() as conn:
        rows = (await conn.execute(sa.select(events.c.data).where(
            events.c.project_id == owner.project_id, events.c.type == "policy.updated").order_by(events.c.seq))).all()
    assert [r.data["version"] for r in rows] == [1, 2]
    assert rows[0].data["policy"]["max_per_request_micros"] == 2_000_000


async def test_history_keeps_every_version_newest_first(client):
    owner = await register(client)
    for risk in (6, 5, 4):
        assert (await client.put(path(owner.project_id), json={"max_risk_score": risk},
                                 headers=owner.headers)).status == 200
    resp = await client.get(path(owner.project_id) + "/versions?limit=2", headers=owner.headers)
    page = await resp.json()
    assert [p["version"] for p in page["items"]] == [3, 2] and page["next_cursor"]
    resp = await client.get(path(owner.project_id) + f"/versions?limit=2&cursor={page['next_cursor']}",
                            headers=owner.headers)
    page = await resp.json()
    assert [(p["version"], p["max_risk_score"]) for p in page["items"]] == [(1, 6)]
    assert page["next_cursor"] is None


async def test_invalid_policies_are_refused_with_field_errors_and_change_nothing(client):
    owner = await register(client)
    cases = [({"allowed_hours": [25]}, "allowed_hours[0]"), ({"allowed_days": []}, "allowed_days"),
             ({"max_risk_score": -1}, "max_risk_score"), ({"blocked_models": ["nope"]}, "blocked_models[0]"),
             ({"rate_limits": {"key": {"per_minute": 10, "per_hour": 5}}}, "rate_limits.key.per_minute"),
             ({"unknown_rule": 1}, "unknown_rule")]
    for body, field in cases:
        resp = await client.put(path(owner.project_id), json=body, headers=owner.headers)
        assert resp.status == 422, body
        error = (await resp.json())["error"]
        assert error["code"] == "invalid_request" and error["details"]["field"] == field, error
        assert field in {e["field"] for e in error["details"]["errors"]}
    resp = await client.put(path(owner.project_id), data=b"{oops", headers=owner.headers)
    assert resp.status in (400, 422)
    resp = await client.put(path(owner.project_id), data=b"", headers=owner.headers)
    assert resp.status == 422
    assert (await (await client.get(path(owner.project_id), headers=owner.headers)).json())["version"] == 0


async def test_unauthenticated_requests_are_401(client):
    owner = await register(client)
    assert (await client.get(path(owner.project_id))).status == 401
    assert (await client.put(path(owner.project_id), json=RULES)).status == 401


async def test_viewers_read_members_and_viewers_cannot_write(client):
    owner = await register(client)
    viewer, member, admin = await register(client), await register(client), await register(client)
    await add_member(client, owner, viewer, "viewer")
    await add_member(client, owner, member, "member")
    await add_member(client, owner, admin, "admin")
    assert (await client.get(path(owner.project_id), headers=viewer.headers)).status == 200
    for who in (viewer, member):
        resp = await client.put(path(owner.project_id), json=RULES, headers=who.headers)
        assert resp.status == 403 and (await resp.json())["error"]["code"] == "forbidden"
    key = await create_key(client, owner)
    resp = await client.put(path(owner.project_id), json=RULES, headers={"X-API-Key": key["key"]})
    assert resp.status == 403
    resp = await client.put(path(owner.project_id), json=RULES, headers=admin.headers)
    assert resp.status == 200 and (await resp.json())["version"] == 1


async def test_outsiders_do_not_see_the_policy(client):
    owner, stranger = await register(client), await register(client)
    assert (await client.get(path(owner.project_id), headers=stranger.headers)).status == 404
    assert (await client.put(path(owner.project_id), json=RULES, headers=stranger.headers)).status == 404


async def test_the_system_policy_is_for_platform_admins_and_audited(client, container):
    admin = await register(client, email="admin@smartspace.test")
    user = await register(client)
    assert (await client.get("/api/v1/admin/policy", headers=user.headers)).status == 403
    assert (await client.put("/api/v1/admin/policy", json={}, headers=user.headers)).status == 403
    body = await (await client.get("/api/v1/admin/policy", headers=admin.headers)).json()
    assert body["version"] == 0 and body["max_per_request_micros"] == 100_000_000
    resp = await client.put("/api/v1/admin/policy", headers=admin.headers,
                            json={"blocked_providers": ["anthropic"], "max_rate_per_minute": 50})
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["version"] == 1
    resp = await client.put("/api/v1/admin/policy", headers=admin.headers, json={"blocked_models": ["bad"]})
    assert resp.status == 422 and (await resp.json())["error"]["details"]["field"] == "blocked_models[0]"
    async with container.db.read() as conn:
        types = (await conn.execute(sa.select(events.c.type).where(
            events.c.project_id == PLATFORM_PROJECT))).scalars().all()
    assert types == ["policy.updated"]


async def test_concurrent_puts_never_share_a_version(client):
    import asyncio

    owner = await register(client)

    async def put(risk: int) -> int:
        resp = await client.put(path(owner.project_id), json={"max_risk_score": risk}, headers=owner.headers)
        assert resp.status in (200, 409), await resp.text()
        return (await resp.json())["version"] if resp.status == 200 else 0

    versions = [v for v in await asyncio.gather(*(put(r) for r in range(1, 9))) if v]
    assert versions and len(set(versions)) == len(versions)
    history = await (await client.get(path(owner.project_id) + "/versions", headers=owner.headers)).json()
    assert sorted(p["version"] for p in history["items"]) == sorted(versions) == list(range(1, len(versions) + 1))
