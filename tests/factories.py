"""Plain factories for tests: register users, make projects, agents and keys through the real API."""

from __future__ import annotations

import uuid
from typing import Any


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class UserHandle:
    def __init__(self, user: dict[str, Any], token: str, project_id: str) -> None:
        self.user = user
        self.id = user["id"]
        self.email = user["email"]
        self.token = token
        self.headers = bearer(token)
        self.project_id = project_id  # the default project


async def register(client, email: str | None = None, name: str = "Test User") -> UserHandle:
    email = email or f"user-{uuid.uuid4().hex[:10]}@example.com"
    resp = await client.post("/api/v1/auth/register", json={"email": email, "password": "correct horse", "name": name})
    assert resp.status == 201, await resp.text()
    body = await resp.json()
    headers = bearer(body["access_token"])
    projects = await (await client.get("/api/v1/projects", headers=headers)).json()
    return UserHandle(body["user"], body["access_token"], projects["items"][0]["id"])


async def add_member(client, owner: UserHandle, member: UserHandle, role: str, project_id: str | None = None):
    resp = await client.post(f"/api/v1/projects/{project_id or owner.project_id}/members",
                             json={"email": member.email, "role": role}, headers=owner.headers)
    assert resp.status == 201, await resp.text()
    return await resp.json()


async def create_key(client, owner: UserHandle, project_id: str | None = None, agent_id: str | None = None,
                     name: str = "test key", **terms: Any) -> dict[str, Any]:
    """``terms``: the key's ``scopes``, ``allowed_models``, ``expires_at``, ``rate_limits``."""
    body: dict[str, Any] = {"name": name, **terms}
    if agent_id:
        body["agent_id"] = agent_id
    resp = await client.post(f"/api/v1/projects/{project_id or owner.project_id}/keys", json=body,
                             headers=owner.headers)
    assert resp.status == 201, await resp.text()
    return await resp.json()


async def create_agent(client, owner: UserHandle, name: str | None = None, project_id: str | None = None):
    resp = await client.post(f"/api/v1/projects/{project_id or owner.project_id}/agents",
                             json={"name": name or f"agent-{uuid.uuid4().hex[:6]}"}, headers=owner.headers)
    assert resp.status == 201, await resp.text()
    return await resp.json()


_PASSWORD_HASH: list[str] = []  # one real argon2 hash of "correct horse", made once per test process


async def quick_user(container, email: str | None = None, name: str = "Test User") -> UserHandle:
    """Like ``register`` but through the domain with a precomputed password hash: the same user,
    default project and token (login works), without ~200 ms of argon2 per user. For set-up only."""
    from domain.base import PageRequest
    from domain.identity import Register, hash_password

    if not _PASSWORD_HASH:
        _PASSWORD_HASH.append(await hash_password(container.deps, "correct horse"))
    email = email or f"user-{uuid.uuid4().hex[:10]}@example.com"
    async with container.uow() as scope:
        result = await scope.users.register(Register(email=email, password="correct horse", name=name),
                                            _PASSWORD_HASH[0])
        project = (await scope.projects.list_mine(PageRequest())).items[0]
    user = {"id": result.user.id, "email": result.user.email, "name": result.user.name}
    return UserHandle(user, result.access_token, project.id)
