"""REST v1 identity routes (API.md "Users, projects, keys") through the real app, on SQLite and PostgreSQL:
success, authentication, roles, validation (nothing changes), malformed bodies, not-found."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import jwt
import pytest
import sqlalchemy as sa

from server.security import Tokens
from storage import models
from tests.factories import UserHandle, add_member, bearer, create_agent, create_key, quick_user, register

P = "/api/v1/projects/{}"


def _email() -> str:
    return f"user-{uuid.uuid4().hex[:10]}@example.com"


async def snapshot(container) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the identity tables and the event log, to prove a refused request changed nothing."""
    tables = (models.users, models.projects, models.memberships, models.agents, models.api_keys,
              models.event_heads, models.events)
    out: dict[str, list[tuple[Any, ...]]] = {}
    async with container.db.read() as conn:
        for table in tables:
            rows = (await conn.execute(sa.select(table))).all()
            out[table.name] = sorted(tuple(str(v) for v in row) for row in rows)
    return out


async def error(resp, status: int, code: str) -> dict[str, Any]:
    assert resp.status == status, await resp.text()
    body = await resp.json()
    assert body["error"]["code"] == code, body
    assert set(body["error"]) == {"code", "message", "details"}
    return body["error"]


class Team:
    def __init__(self, owner: UserHandle, admin: UserHandle, member: UserHandle, viewer: UserHandle,
                 outsider: UserHandle) -> None:
        self.owner, self.admin, self.member, self.viewer, self.outsider = owner, admin, member, viewer, outsider
        self.project_id = owner.project_id
        self.path = P.format(self.project_id)


@pytest.fixture
async def team(client, container) -> Team:
    # Set up through the domain with a precomputed hash; registration itself is tested above.
    owner, admin, member, viewer, outsider = await asyncio.gather(*(quick_user(container) for _ in range(5)))
    for who, role in ((admin, "admin"), (member, "member"), (viewer, "viewer")):
        await add_member(client, owner, who, role)
    return Team(owner, admin, member, viewer, outsider)


# ---------------------------------------------------------------- auth: register, token, me
async def test_register_returns_the_user_a_token_and_a_default_project(client):
    email = _email()
    resp = await client.post("/api/v1/auth/register",
                             json={"email": email.upper(), "password": "correct horse", "name": "Ada"})
    assert resp.status == 201
    body = await resp.json()
    assert body["user"]["email"] == email  # normalised
    assert body["user"]["name"] == "Ada"
    assert body["user"]["id"].startswith("usr_")
    assert "password" not in str(body)
    me = await client.get("/api/v1/me", headers=bearer(body["access_token"]))
    assert me.status == 200
    assert (await me.json())["id"] == body["user"]["id"]
    projects = await (await client.get("/api/v1/projects", headers=bearer(body["access_token"]))).json()
    assert [(p["name"], p["role"]) for p in projects["items"]] == [("Default project", "owner")]
    assert projects["next_cursor"] is None


async def test_register_stores_an_argon2_hash_not_the_password(client, container):
    alice = await register(client)
    async with container.db.read() as conn:
        stored = (await conn.execute(sa.select(models.users.c.password_hash).where(
            models.users.c.id == alice.id))).scalar_one()
    assert stored.startswith("$argon2id$")
    assert "correct horse" not in stored


async def test_register_with_a_taken_email_is_409_in_any_case(client, container):
    alice = await quick_user(container)
    before = await snapshot(container)
    resp = await client.post("/api/v1/auth/register",
                             json={"email": alice.email.upper(), "password": "another pass", "name": "B"})
    await error(resp, 409, "conflict")
    assert await snapshot(container) == before


@pytest.mark.parametrize("body", [
    {"email": "not-an-email", "password": "correct horse", "name": "A"},
    {"email": "a@example.com", "password": "short", "name": "A"},
    {"email": "a@example.com", "password": "correct horse", "name": ""},
    {"email": "a@example.com", "password": "correct horse"},
    {"email": "a@example.com", "password": "correct horse", "name": "A", "admin": True},
    {"email": 7, "password": "correct horse", "name": "A"},
    [],
])
async def test_register_validation_failures_are_422_and_change_nothing(client, container, body):
    before = await snapshot(container)
    resp = await client.post("/api/v1/auth/register", json=body)
    await error(resp, 422, "invalid_request")
    assert await snapshot(container) == before


async def test_token_login_issues_a_bearer_token_that_works(client, container):
    alice = await quick_user(container)
    resp = await client.post("/api/v1/auth/token", json={"email": alice.email.upper(), "password": "correct horse"})
    assert resp.status == 200
    body = await resp.json()
    assert body["token_type"] == "bearer"
    assert body["expires_in"] == 3600
    me = await client.get("/api/v1/me", headers=bearer(body["access_token"]))
    assert (await me.json())["email"] == alice.email


@pytest.mark.parametrize("which", ["wrong password", "unknown email"])
async def test_token_login_with_bad_credentials_is_401(client, container, which):
    alice = await quick_user(container)
    email = alice.email if which == "wrong password" else _email()
    password = "wrong horse" if which == "wrong password" else "correct horse"
    resp = await client.post("/api/v1/auth/token", json={"email": email, "password": password})
    err = await error(resp, 401, "unauthorized")
    assert err["message"] == "email or password is wrong"  # the same for both: no user enumeration


async def test_token_login_without_fields_is_422(client):
    await error(await client.post("/api/v1/auth/token", json={"email": "a@b.co"}), 422, "invalid_request")


async def test_me_without_credentials_is_401(client):
    await error(await client.get("/api/v1/me"), 401, "unauthorized")


@pytest.mark.parametrize("header", [
    {"Authorization": "Bearer not-a-jwt"},
    {"Authorization": "Bearer "},
    {"Authorization": "Basic dXNlcjpwYXNz"},
    {"Authorization": "Bearer sk-short"},
    {"Authorization": "Bearer sk-" + "x" * 43},
    {"X-API-Key": "sk-" + "y" * 43},
])
async def test_me_with_a_bad_credential_is_401(client, header):
    await error(await client.get("/api/v1/me", headers=header), 401, "unauthorized")


async def test_tokens_signed_elsewhere_or_expired_are_401(client, container, settings):
    alice = await quick_user(container)
    forged = Tokens("some-other-secret-" + "z" * 32, 3600).issue(alice.id)
    await error(await client.get("/api/v1/me", headers=bearer(forged)), 401, "unauthorized")
    expired = Tokens(settings.jwt_secret, -60).issue(alice.id)
    err = await error(await client.get("/api/v1/me", headers=bearer(expired)), 401, "unauthorized")
    assert "expired" in err["message"]
    ghost = Tokens(settings.jwt_secret, 3600).issue("usr_does_not_exist")
    await error(await client.get("/api/v1/me", headers=bearer(ghost)), 401, "unauthorized")
    unsigned = jwt.encode({"sub": alice.id, "iss": "smartspace", "exp": int(time.time()) + 600}, None,
                          algorithm="none")
    await error(await client.get("/api/v1/me", headers=bearer(unsigned)), 401, "unauthorized")
    no_expiry = jwt.encode({"sub": alice.id, "iss": "smartspace"}, settings.jwt_secret, algorithm="HS256")
    await error(await client.get("/api/v1/me", headers=bearer(no_expiry)), 401, "unauthorized")


async def test_me_with_an_api_key_is_refused(client, container):
    alice = await quick_user(container)
    key = await create_key(client, alice)
    await error(await client.get("/api/v1/me", headers={"X-API-Key": key["key"]}), 403, "forbidden")


# ---------------------------------------------------------------- malformed bodies
BODY_ROUTES = [
    ("POST", "/api/v1/auth/register"),
    ("POST", "/api/v1/auth/token"),
    ("POST", "/api/v1/projects"),
    ("PATCH", "{p}"),
    ("POST", "{p}/members"),
    ("PATCH", "{p}/members/{u}"),
    ("POST", "{p}/agents"),
    ("POST", "{p}/keys"),
]


@pytest.mark.parametrize(("method", "path"), BODY_ROUTES)
async def test_a_malformed_body_is_400_never_500(client, container, method, path):
    alice = await quick_user(container)
    url = path.format(p=P.format(alice.project_id), u=alice.id)
    before = await snapshot(container)
    # Truncated after a field the route does not know: msgspec meets the unknown field first.
    for raw in (b"{not json", b'{"name": "x"', b'{"email": "a@b.co", "zzz": 1', b"\xff\xfe\x00",
                b'{"name": "a"} trailing'):
        resp = await client.request(method, url, data=raw, headers={**alice.headers,
                                                                    "Content-Type": "application/json"})
        err = await error(resp, 400, "invalid_request")
        assert "Traceback" not in err["message"]
    assert await snapshot(container) == before


@pytest.mark.parametrize(("method", "path"), BODY_ROUTES)
async def test_an_empty_body_is_refused_with_invalid_request(client, container, method, path):
    alice = await quick_user(container)
    url = path.format(p=P.format(alice.project_id), u=alice.id)
    resp = await client.request(method, url, data=b"", headers=alice.headers)
    await error(resp, 422, "invalid_request")


# ---------------------------------------------------------------- projects
async def test_create_list_get_and_update_a_project(client, container):
    alice = await quick_user(container)
    resp = await client.post("/api/v1/projects", json={"name": "Research", "description": "agents"},
                             headers=alice.headers)
    assert resp.status == 201
    project = await resp.json()
    assert project["id"].startswith("prj_")
    assert (project["name"], project["description"], project["role"], project["owner_id"]) == (
        "Research", "agents", "owner", alice.id)
    assert (project["status"], project["settlement"]) == ("active", "ledger")
    listed = await (await client.get("/api/v1/projects", headers=alice.headers)).json()
    assert {p["id"] for p in listed["items"]} == {project["id"], alice.project_id}
    got = await (await client.get(P.format(project["id"]), headers=alice.headers)).json()
    assert got["name"] == "Research"
    resp = await client.patch(P.format(project["id"]), json={"name": "Renamed", "settlement": "onchain"},
                              headers=alice.headers)
    assert resp.status == 200
    updated = await resp.json()
    assert (updated["name"], updated["settlement"], updated["description"]) == ("Renamed", "onchain", "agents")
    got = await (await client.get(P.format(project["id"]), headers=alice.headers)).json()
    assert got["name"] == "Renamed"


async def test_projects_list_paginates_without_duplicates(client, container):
    alice = await quick_user(container)
    for i in range(4):
        resp = await client.post("/api/v1/projects", json={"name": f"p{i}"}, headers=alice.headers)
        assert resp.status == 201
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        page = await (await client.get("/api/v1/projects", params=params, headers=alice.headers)).json()
        assert len(page["items"]) <= 2
        seen += [p["id"] for p in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == 5 == len(set(seen))


@pytest.mark.parametrize("params", [{"limit": "0"}, {"limit": "201"}, {"limit": "ten"}])
async def test_bad_page_parameters_are_422(client, container, params):
    alice = await quick_user(container)
    await error(await client.get("/api/v1/projects", params=params, headers=alice.headers), 422,
                "invalid_request")


async def test_a_garbage_cursor_never_500s(client, container):
    alice = await quick_user(container)
    for cursor in ("!!!", "%%%", "////", "\u00e9t\u00e9"):
        resp = await client.get("/api/v1/projects", params={"cursor": cursor}, headers=alice.headers)
        assert resp.status in (200, 422), await resp.text()


@pytest.mark.parametrize("body", [
    {},
    {"name": ""},
    {"settlement": "cash"},
    {"status": "deleted"},
    {"name": "x" * 201},
    {"owner_id": "usr_x"},
])
async def test_project_update_validation_failures_are_422_and_change_nothing(client, container, body):
    alice = await quick_user(container)
    before = await snapshot(container)
    resp = await client.patch(P.format(alice.project_id), json=body, headers=alice.headers)
    await error(resp, 422, "invalid_request")
    assert await snapshot(container) == before


async def test_project_create_validation_is_422(client, container):
    alice = await quick_user(container)
    before = await snapshot(container)
    for body in ({}, {"name": ""}, {"name": "x", "description": "d" * 2001}, {"name": 5}):
        await error(await client.post("/api/v1/projects", json=body, headers=alice.headers), 422,
                    "invalid_request")
    assert await snapshot(container) == before


async def test_project_routes_without_credentials_are_401(client, container):
    alice = await quick_user(container)
    p = P.format(alice.project_id)
    for method, url in (("GET", "/api/v1/projects"), ("POST", "/api/v1/projects"), ("GET", p), ("PATCH", p),
                        ("DELETE", p), ("GET", p + "/members"), ("POST", p + "/members"),
                        ("PATCH", p + f"/members/{alice.id}"), ("DELETE", p + f"/members/{alice.id}"),
                        ("GET", p + "/agents"), ("POST", p + "/agents"), ("GET", p + "/keys"),
                        ("POST", p + "/keys"), ("DELETE", p + "/keys/key_x")):
        for headers in ({}, bearer("garbage")):
            resp = await client.request(method, url, json={"name": "x"}, headers=headers)
            await error(resp, 401, "unauthorized")


async def test_unknown_and_foreign_projects_are_404_on_every_route(client, team):
    stranger = team.outsider
    for pid in ("prj_unknown", team.project_id):  # unknown, and one the caller is not a member of
        p = P.format(pid)
        for method, url, body in (
            ("GET", p, None), ("PATCH", p, {"name": "x"}), ("DELETE", p, None),
            ("GET", p + "/members", None), ("POST", p + "/members", {"email": stranger.email}),
            ("PATCH", p + f"/members/{team.member.id}", {"role": "viewer"}),
            ("DELETE", p + f"/members/{team.member.id}", None),
            ("GET", p + "/agents", None), ("POST", p + "/agents", {"name": "a"}),
            ("GET", p + "/keys", None), ("POST", p + "/keys", {"name": "k"}),
            ("DELETE", p + "/keys/key_x", None),
        ):
            resp = await client.request(method, url, json=body, headers=stranger.headers)
            await error(resp, 404, "not_found")


async def test_viewers_and_members_cannot_update_a_project_admins_can(client, team):
    for who in (team.viewer, team.member):
        resp = await client.patch(team.path, json={"name": "nope"}, headers=who.headers)
        err = await error(resp, 403, "forbidden")
        assert err["details"]["required_role"] == "admin"
    resp = await client.patch(team.path, json={"description": "by admin"}, headers=team.admin.headers)
    assert resp.status == 200
    got = await (await client.get(team.path, headers=team.viewer.headers)).json()
    assert (got["description"], got["role"]) == ("by admin", "viewer")


async def test_only_the_owner_can_delete_a_project_and_it_is_gone_afterwards(client, team):
    key = await create_key(client, team.owner, team.project_id)
    for who in (team.viewer, team.member, team.admin):
        await error(await client.delete(team.path, headers=who.headers), 403, "forbidden")
    resp = await client.delete(team.path, headers=team.owner.headers)
    assert resp.status == 204
    for who in (team.owner, team.admin, team.viewer):
        await error(await client.get(team.path, headers=who.headers), 404, "not_found")
        for sub in ("/members", "/agents", "/keys", "/audit", "/audit/verify"):
            await error(await client.get(team.path + sub, headers=who.headers), 404, "not_found")
        listed = await (await client.get("/api/v1/projects", headers=who.headers)).json()
        assert team.project_id not in {p["id"] for p in listed["items"]}
    await error(await client.patch(team.path, json={"name": "zombie"}, headers=team.owner.headers), 404,
                "not_found")
    await error(await client.post(team.path + "/agents", json={"name": "zombie"}, headers=team.owner.headers),
                404, "not_found")
    await error(await client.delete(team.path, headers=team.owner.headers), 404, "not_found")
    # Its keys were revoked with it.
    await error(await client.get("/api/v1/projects", headers={"X-API-Key": key["key"]}), 401, "unauthorized")


# ---------------------------------------------------------------- members
async def test_members_list_shows_everyone_with_their_role(client, team):
    resp = await client.get(team.path + "/members", headers=team.viewer.headers)
    assert resp.status == 200
    members = {m["user_id"]: (m["role"], m["email"]) for m in (await resp.json())["items"]}
    assert members == {team.owner.id: ("owner", team.owner.email), team.admin.id: ("admin", team.admin.email),
                       team.member.id: ("member", team.member.email),
                       team.viewer.id: ("viewer", team.viewer.email)}
    page = await (await client.get(team.path + "/members", params={"limit": "3"}, headers=team.viewer.headers)
                  ).json()
    rest = await (await client.get(team.path + "/members", params={"limit": "3", "cursor": page["next_cursor"]},
                                   headers=team.viewer.headers)).json()
    assert len(page["items"]) == 3 and len(rest["items"]) == 1 and rest["next_cursor"] is None
    assert {m["user_id"] for m in page["items"] + rest["items"]} == set(members)


async def test_who_may_add_which_members(client, team, container):
    newcomer = team.outsider
    before = await snapshot(container)
    for who in (team.viewer, team.member):
        resp = await client.post(team.path + "/members", json={"email": newcomer.email}, headers=who.headers)
        await error(resp, 403, "forbidden")
    for role in ("admin", "owner"):
        resp = await client.post(team.path + "/members", json={"email": newcomer.email, "role": role},
                                 headers=team.admin.headers)
        err = await error(resp, 403, "forbidden")
        assert err["details"]["required_role"] == "owner"
    assert await snapshot(container) == before
    resp = await client.post(team.path + "/members", json={"email": newcomer.email, "role": "viewer"},
                             headers=team.admin.headers)
    assert resp.status == 201
    assert (await resp.json())["role"] == "viewer"
    resp = await client.post(team.path + "/members", json={"email": newcomer.email},
                             headers=team.admin.headers)
    await error(resp, 409, "conflict")
    other = await quick_user(container)
    resp = await client.post(team.path + "/members", json={"email": other.email, "role": "admin"},
                             headers=team.owner.headers)
    assert resp.status == 201
    assert (await resp.json())["role"] == "admin"


async def test_adding_an_unregistered_email_is_404_and_bad_roles_422(client, team, container):
    before = await snapshot(container)
    resp = await client.post(team.path + "/members", json={"email": _email()}, headers=team.owner.headers)
    await error(resp, 404, "not_found")
    for body in ({"email": team.outsider.email, "role": "god"}, {"email": "nope"}, {"role": "member"}):
        resp = await client.post(team.path + "/members", json=body, headers=team.owner.headers)
        await error(resp, 422, "invalid_request")
    assert await snapshot(container) == before


async def test_changing_roles(client, team, container):
    url = team.path + "/members/{}"
    # Admins may move members and viewers between those roles, but not grant or touch admin.
    resp = await client.patch(url.format(team.member.id), json={"role": "viewer"}, headers=team.admin.headers)
    assert (resp.status, (await resp.json())["role"]) == (200, "viewer")
    await error(await client.patch(url.format(team.member.id), json={"role": "admin"},
                                   headers=team.admin.headers), 403, "forbidden")
    await error(await client.patch(url.format(team.owner.id), json={"role": "member"},
                                   headers=team.admin.headers), 403, "forbidden")
    await error(await client.patch(url.format(team.viewer.id), json={"role": "member"},
                                   headers=team.member.headers), 403, "forbidden")
    await error(await client.patch(url.format(team.outsider.id), json={"role": "member"},
                                   headers=team.owner.headers), 404, "not_found")
    before = await snapshot(container)
    await error(await client.patch(url.format(team.viewer.id), json={"role": "boss"},
                                   headers=team.owner.headers), 422, "invalid_request")
    # The only owner cannot step down.
    await error(await client.patch(url.format(team.owner.id), json={"role": "admin"},
                                   headers=team.owner.headers), 409, "conflict")
    assert await snapshot(container) == before
    resp = await client.patch(url.format(team.admin.id), json={"role": "owner"}, headers=team.owner.headers)
    assert (resp.status, (await resp.json())["role"]) == (200, "owner")
    resp = await client.patch(url.format(team.owner.id), json={"role": "member"}, headers=team.admin.headers)
    assert (resp.status, (await resp.json())["role"]) == (200, "member")


async def test_removing_members(client, team):
    url = team.path + "/members/{}"
    # A member may not remove someone else, but may leave.
    await error(await client.delete(url.format(team.viewer.id), headers=team.member.headers), 403, "forbidden")
    assert (await client.delete(url.format(team.member.id), headers=team.member.headers)).status == 204
    await error(await client.get(team.path, headers=team.member.headers), 404, "not_found")
    await error(await client.delete(url.format(team.member.id), headers=team.owner.headers), 404, "not_found")
    # An admin removes viewers but not owners; the owner removes admins.
    await error(await client.delete(url.format(team.owner.id), headers=team.admin.headers), 403, "forbidden")
    assert (await client.delete(url.format(team.viewer.id), headers=team.admin.headers)).status == 204
    assert (await client.delete(url.format(team.admin.id), headers=team.owner.headers)).status == 204
    # The last owner cannot leave.
    await error(await client.delete(url.format(team.owner.id), headers=team.owner.headers), 409, "conflict")
    members = await (await client.get(team.path + "/members", headers=team.owner.headers)).json()
    assert [(m["user_id"], m["role"]) for m in members["items"]] == [(team.owner.id, "owner")]


async def test_an_admin_may_leave_but_not_remove_another_admin(client, team):
    second = team.outsider
    await add_member(client, team.owner, second, "admin")
    url = team.path + "/members/{}"
    await error(await client.delete(url.format(second.id), headers=team.admin.headers), 403, "forbidden")
    assert (await client.delete(url.format(team.admin.id), headers=team.admin.headers)).status == 204


# ---------------------------------------------------------------- agents
async def test_agents_create_and_list(client, team):
    resp = await client.post(team.path + "/agents", json={"name": "researcher"}, headers=team.admin.headers)
    assert resp.status == 201
    agent = await resp.json()
    assert agent["id"].startswith("agt_")
    assert (agent["name"], agent["status"], agent["project_id"]) == ("researcher", "active", team.project_id)
    await create_agent(client, team.owner, "writer")
    listed = await (await client.get(team.path + "/agents", headers=team.viewer.headers)).json()
    assert [a["name"] for a in listed["items"]] == ["writer", "researcher"]  # newest first


async def test_agent_role_failures_duplicates_and_validation(client, team, container):
    await create_agent(client, team.owner, "taken")
    before = await snapshot(container)
    for who in (team.viewer, team.member):
        await error(await client.post(team.path + "/agents", json={"name": "x"}, headers=who.headers), 403,
                    "forbidden")
    await error(await client.post(team.path + "/agents", json={"name": "taken"}, headers=team.admin.headers),
                409, "conflict")
    for body in ({}, {"name": ""}, {"name": "n" * 201}, {"name": "x", "budget": 1}):
        await error(await client.post(team.path + "/agents", json=body, headers=team.admin.headers), 422,
                    "invalid_request")
    assert await snapshot(container) == before


# ---------------------------------------------------------------- keys
async def test_a_key_is_shown_once_and_listed_as_metadata_only(client, container):
    alice = await quick_user(container)
    agent = await create_agent(client, alice, "bot")
    resp = await client.post(P.format(alice.project_id) + "/keys", json={"name": "ci", "agent_id": agent["id"]},
                             headers=alice.headers)
    assert resp.status == 201
    created = await resp.json()
    raw = created["key"]
    assert raw.startswith("sk-") and len(raw) > 40
    assert created["prefix"] == raw[:11]
    assert (created["name"], created["agent_id"], created["use_count"], created["last_used_at"]) == (
        "ci", agent["id"], 0, None)
    listed = await (await client.get(P.format(alice.project_id) + "/keys", headers=alice.headers)).json()
    [item] = listed["items"]
    assert set(item) >= {"id", "prefix", "name", "created_at", "last_used_at", "use_count"}
    assert "key" not in item and "key_hash" not in item
    assert raw not in await (await client.get(P.format(alice.project_id) + "/keys", headers=alice.headers)).text()
    async with container.db.read() as conn:
        stored = (await conn.execute(sa.select(models.api_keys))).one()._mapping
    assert raw not in {str(v) for v in stored.values()}
    assert len(stored["key_hash"]) == 64


async def test_an_api_key_authenticates_rest_calls_and_counts_its_uses(client, container):
    alice = await quick_user(container)
    key = await create_key(client, alice, scopes=["project:read"])
    p = P.format(alice.project_id)
    for headers in ({"X-API-Key": key["key"]}, bearer(key["key"])):
        resp = await client.get(p, headers=headers)
        assert resp.status == 200
        assert (await resp.json())["role"] == "member"
    listed = await (await client.get("/api/v1/projects", headers=bearer(key["key"]))).json()
    assert [x["id"] for x in listed["items"]] == [alice.project_id]
    [meta] = (await (await client.get(p + "/keys", headers=alice.headers)).json())["items"]
    assert meta["use_count"] == 3
    assert meta["last_used_at"] is not None and meta["last_used_at"] >= meta["created_at"]


async def test_an_api_key_is_a_member_of_its_own_project_only(client, container):
    alice, bob = await asyncio.gather(quick_user(container), quick_user(container))
    key = {"X-API-Key": (await create_key(client, alice, scopes=["project:read"]))["key"]}
    p = P.format(alice.project_id)
    assert (await client.get(p + "/agents", headers=key)).status == 200
    await error(await client.post(p + "/agents", json={"name": "x"}, headers=key), 403, "forbidden")
    await error(await client.post(p + "/keys", json={"name": "x"}, headers=key), 403, "forbidden")
    await error(await client.get(P.format(bob.project_id), headers=key), 404, "not_found")
    # A valid key on a route for user tokens only is refused, not unauthenticated.
    await error(await client.post("/api/v1/projects", json={"name": "x"}, headers=key), 403, "forbidden")


async def test_key_role_failures_and_validation(client, team, container):
    other = await quick_user(container)
    foreign_agent = await create_agent(client, other, "elsewhere")
    before = await snapshot(container)
    for who in (team.viewer, team.member):
        await error(await client.post(team.path + "/keys", json={"name": "k"}, headers=who.headers), 403,
                    "forbidden")
    await error(await client.post(team.path + "/keys", json={"name": "k", "agent_id": foreign_agent["id"]},
                                  headers=team.admin.headers), 404, "not_found")
    for body in ({}, {"name": ""}, {"name": "k", "agent_id": 5}, {"name": "k", "key": "sk-mine"}):
        await error(await client.post(team.path + "/keys", json=body, headers=team.admin.headers), 422,
                    "invalid_request")
    assert await snapshot(container) == before
    viewer_sees = await client.get(team.path + "/keys", headers=team.viewer.headers)
    assert viewer_sees.status == 200


async def test_a_revoked_key_fails_at_once(client, team):
    key = await create_key(client, team.owner, team.project_id, scopes=["project:read"])
    headers = {"X-API-Key": key["key"]}
    assert (await client.get(team.path, headers=headers)).status == 200
    url = team.path + f"/keys/{key['id']}"
    for who in (team.viewer, team.member):
        await error(await client.delete(url, headers=who.headers), 403, "forbidden")
    resp = await client.delete(url, headers=team.admin.headers)
    assert resp.status == 200
    revoked = await resp.json()
    assert revoked["revoked_at"] is not None and "key" not in revoked
    for h in (headers, bearer(key["key"])):
        await error(await client.get(team.path, headers=h), 401, "unauthorized")
    # Revoking again changes nothing; unknown ids are 404.
    again = await client.delete(url, headers=team.owner.headers)
    assert (again.status, (await again.json())["revoked_at"]) == (200, revoked["revoked_at"])
    await error(await client.delete(team.path + "/keys/key_nope", headers=team.owner.headers), 404, "not_found")
    revoked_events = [e for e in (await (await client.get(team.path + "/audit", params={"type": "key.revoked"},
                                                          headers=team.owner.headers)).json())["items"]]
    assert len(revoked_events) == 1


async def test_a_key_of_another_project_cannot_be_revoked_through_this_one(client, container):
    alice, bob = await asyncio.gather(quick_user(container), quick_user(container))
    bobs = await create_key(client, bob, scopes=["project:read"])
    resp = await client.delete(P.format(alice.project_id) + f"/keys/{bobs['id']}", headers=alice.headers)
    await error(resp, 404, "not_found")
    assert (await client.get(P.format(bob.project_id), headers={"X-API-Key": bobs["key"]})).status == 200


async def test_a_suspended_projects_keys_stop_working(client, container):
    alice = await quick_user(container)
    key = {"X-API-Key": (await create_key(client, alice, scopes=["project:read"]))["key"]}
    resp = await client.patch(P.format(alice.project_id), json={"status": "suspended"}, headers=alice.headers)
    assert (resp.status, (await resp.json())["status"]) == (200, "suspended")
    await error(await client.get(P.format(alice.project_id), headers=key), 401, "unauthorized")
    await client.patch(P.format(alice.project_id), json={"status": "active"}, headers=alice.headers)
    assert (await client.get(P.format(alice.project_id), headers=key)).status == 200


# ---------------------------------------------------------------- races
async def test_concurrent_registrations_of_one_email_create_one_user(client, container):
    email = _email()
    body = {"email": email, "password": "correct horse", "name": "Twin"}
    responses = await asyncio.gather(*(client.post("/api/v1/auth/register", json=body) for _ in range(5)))
    assert sorted(r.status for r in responses) == [201, 409, 409, 409, 409]
    for r in responses:
        assert (await r.json()).get("error", {}).get("code", "conflict") == "conflict"
    async with container.db.read() as conn:
        assert (await conn.execute(sa.select(sa.func.count()).select_from(models.users))).scalar_one() == 1
        assert (await conn.execute(sa.select(sa.func.count()).select_from(models.projects))).scalar_one() == 1


async def test_concurrent_creates_of_one_agent_name_make_one_agent(client, container):
    alice = await quick_user(container)
    url = P.format(alice.project_id) + "/agents"
    responses = await asyncio.gather(*(client.post(url, json={"name": "same"}, headers=alice.headers)
                                       for _ in range(5)))
    assert sorted(r.status for r in responses) == [201, 409, 409, 409, 409]
    events = await (await client.get(P.format(alice.project_id) + "/audit", params={"type": "agent.created"},
                                     headers=alice.headers)).json()
    assert len(events["items"]) == 1


async def test_concurrent_adds_of_one_member_add_them_once(client, container):
    alice, bob = await asyncio.gather(quick_user(container), quick_user(container))
    url = P.format(alice.project_id) + "/members"
    responses = await asyncio.gather(*(client.post(url, json={"email": bob.email}, headers=alice.headers)
                                       for _ in range(5)))
    assert sorted(r.status for r in responses) == [201, 409, 409, 409, 409]
    members = await (await client.get(url, headers=alice.headers)).json()
    assert len(members["items"]) == 2


async def test_two_owners_leaving_at_once_leave_one_owner(client, container):
    alice, bob = await asyncio.gather(quick_user(container), quick_user(container))
    await add_member(client, alice, bob, "owner")
    url = P.format(alice.project_id) + "/members/{}"
    responses = await asyncio.gather(client.delete(url.format(alice.id), headers=alice.headers),
                                     client.delete(url.format(bob.id), headers=bob.headers))
    assert sorted(r.status for r in responses) == [204, 409]
    survivor = bob if responses[0].status == 204 else alice
    members = await (await client.get(P.format(alice.project_id) + "/members", headers=survivor.headers)).json()
    assert [(m["user_id"], m["role"]) for m in members["items"]] == [(survivor.id, "owner")]


async def test_two_owners_demoting_each_other_at_once_leave_one_owner(client, container):
    alice, bob = await asyncio.gather(quick_user(container), quick_user(container))
    await add_member(client, alice, bob, "owner")
    url = P.format(alice.project_id) + "/members/{}"
    responses = await asyncio.gather(
        client.patch(url.format(bob.id), json={"role": "admin"}, headers=alice.headers),
        client.patch(url.format(alice.id), json={"role": "admin"}, headers=bob.headers))
    # The loser is 409 (it counted the owners after the winner committed) or 403 (it was already demoted).
    assert sorted(r.status for r in responses) in ([200, 403], [200, 409])
    members = await (await client.get(P.format(alice.project_id) + "/members", headers=alice.headers)).json()
    assert sorted(m["role"] for m in members["items"]) == ["admin", "owner"]


async def test_racing_revokes_and_deletes_each_happen_once(client, container):
    alice = await quick_user(container)
    key = await create_key(client, alice)
    p = P.format(alice.project_id)
    revokes = await asyncio.gather(*(client.delete(p + f"/keys/{key['id']}", headers=alice.headers)
                                     for _ in range(4)))
    assert [r.status for r in revokes] == [200] * 4
    assert len({(await r.json())["revoked_at"] for r in revokes}) == 1
    deletes = await asyncio.gather(*(client.delete(p, headers=alice.headers) for _ in range(4)))
    assert sorted(r.status for r in deletes) == [204, 404, 404, 404]
    async with container.reader() as scope:
        events = await scope.store.events.since(alice.project_id, 0, 100)
    assert [e.type for e in events].count("key.revoked") == 1
    assert [e.type for e in events].count("project.deleted") == 1


async def test_an_update_racing_a_delete_never_revives_the_project(client, container):
    for _ in range(3):
        alice = await quick_user(container)
        p = P.format(alice.project_id)
        patch, delete = await asyncio.gather(
            client.patch(p, json={"status": "active", "name": "revived"}, headers=alice.headers),
            client.delete(p, headers=alice.headers))
        assert delete.status == 204
        assert patch.status in (200, 404)
        await error(await client.get(p, headers=alice.headers), 404, "not_found")
        async with container.db.read() as conn:
            status = (await conn.execute(sa.select(models.projects.c.status).where(
                models.projects.c.id == alice.project_id))).scalar_one()
        assert status == "deleted"
