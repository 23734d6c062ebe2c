"""Repositories for users, projects, memberships, agents and API keys."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import datetime

import msgspec
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from domain.base import Page, PageRequest
from domain.errors import Conflict, NotFound
from domain.identity import Agent, ApiKey, KeyPrincipal, Member, Project, User
from storage.base import Repository, decode_cursor, encode_cursor
from storage.models import agents, api_keys, memberships, projects, users


@contextlib.asynccontextmanager
async def _unique(message: str, details: dict[str, str]) -> AsyncIterator[None]:
    """The services check for duplicates first; two concurrent writers can both pass that check on
    PostgreSQL, and the unique index stops the second. That is a conflict, not a server error."""
    try:
        yield
    except sa.exc.IntegrityError:
        raise Conflict(message, details) from None


class Users(Repository[User]):
    table = users
    entity = User

    async def by_email(self, email: str) -> User | None:
        row = (await self.conn.execute(sa.select(users).where(users.c.email == email))).first()
        return self.to_entity(row) if row else None

    async def credentials(self, email: str) -> tuple[User, str] | None:
        row = (await self.conn.execute(sa.select(users).where(users.c.email == email))).first()
        return (self.to_entity(row), row.password_hash) if row else None

    async def add(self, user: User, password_hash: str) -> None:
        async with _unique("a user with this email already exists", {"email": user.email}):
            await self.conn.execute(sa.insert(users).values(
                id=user.id, email=user.email, name=user.name, password_hash=password_hash,
                created_at=user.created_at))


class Projects(Repository[Project]):
    table = projects
    entity = Project

    async def for_user(self, user_id: str, page: PageRequest) -> Page[Project]:
        stmt = (
            sa.select(projects, memberships.c.role)
            .join(memberships, memberships.c.project_id == projects.c.id)
            .where(memberships.c.user_id == user_id, projects.c.status != "deleted")
        )
        if page.cursor:
            stmt = stmt.where(projects.c.id < decode_cursor(page.cursor))
        rows = (await self.conn.execute(stmt.order_by(projects.c.id.desc()).limit(page.limit + 1))).all()
        result = self.page_of(rows, page.limit)
        for project, row in zip(result.items, rows, strict=False):
            project.role = row.role
        return result


class Members:
    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn

    _select = sa.select(memberships, users.c.email, users.c.name).join(
        users, users.c.id == memberships.c.user_id)

    @staticmethod
    def _member(row: sa.Row) -> Member:
        m = row._mapping
        return Member(project_id=m["project_id"], user_id=m["user_id"], role=m["role"],
                      created_at=m["created_at"], email=m["email"], name=m["name"])

    async def role(self, project_id: str, user_id: str) -> str | None:
        """The user's role in a live project; None if not a member or the project is deleted."""
        return (await self.conn.execute(
            sa.select(memberships.c.role)
            .join(projects, projects.c.id == memberships.c.project_id)
            .where(memberships.c.project_id == project_id, memberships.c.user_id == user_id,
                   projects.c.status != "deleted"))).scalar()

    async def get(self, project_id: str, user_id: str) -> Member | None:
        row = (await self.conn.execute(self._select.where(
            memberships.c.project_id == project_id, memberships.c.user_id == user_id))).first()
        return self._member(row) if row else None

    async def add(self, member: Member) -> None:
        async with _unique("this user is already a member", {"user_id": member.user_id}):
            await self.conn.execute(sa.insert(memberships).values(
                project_id=member.project_id, user_id=member.user_id, role=member.role,
                created_at=member.created_at))

    async def set_role(self, project_id: str, user_id: str, role: str) -> Member:
        await self.conn.execute(sa.update(memberships).where(
            memberships.c.project_id == project_id, memberships.c.user_id == user_id).values(role=role))
        member = await self.get(project_id, user_id)
        if member is None:  # removed by a concurrent request after the service looked it up
            raise NotFound("member not found", {"user_id": user_id})
        return member

    async def remove(self, project_id: str, user_id: str) -> None:
        await self.conn.execute(sa.delete(memberships).where(
            memberships.c.project_id == project_id, memberships.c.user_id == user_id))

    async def count_owners(self, project_id: str) -> int:
        """Owners of the project, counted under a lock on the project row (PostgreSQL; SQLite has one
        writer): two owners leaving or demoting each other at once must not both see the other."""
        if self.conn.dialect.name == "postgresql":
            await self.conn.execute(sa.select(projects.c.id).where(projects.c.id == project_id).with_for_update())
        return (await self.conn.execute(sa.select(sa.func.count()).where(
            memberships.c.project_id == project_id, memberships.c.role == "owner"))).scalar_one()

    async def list(self, project_id: str, page: PageRequest) -> Page[Member]:
        stmt = self._select.where(memberships.c.project_id == project_id)
        if page.cursor:
            stmt = stmt.where(memberships.c.user_id > decode_cursor(page.cursor))
        rows = (await self.conn.execute(stmt.order_by(memberships.c.user_id).limit(page.limit + 1))).all()
        items = [self._member(r) for r in rows[: page.limit]]
        cursor = encode_cursor(items[-1].user_id) if len(rows) > page.limit else None
        return Page(items=items, next_cursor=cursor)


class Agents(Repository[Agent]):
    table = agents
    entity = Agent

    async def insert(self, entity: Agent) -> Agent:
        async with _unique("an agent with this name exists in the project", {"name": entity.name}):
            return await super().insert(entity)

    async def by_name(self, project_id: str, name: str) -> Agent | None:
        row = (await self.conn.execute(sa.select(agents).where(
            agents.c.project_id == project_id, agents.c.name == name))).first()
        return self.to_entity(row) if row else None

    async def list(self, project_id: str, page: PageRequest) -> Page[Agent]:
        return await self.paginate(page, agents.c.project_id == project_id)


class Keys(Repository[ApiKey]):
    table = api_keys
    entity = ApiKey

    async def add(self, key: ApiKey, key_hash: str) -> None:
        values = {f: getattr(key, f) for f in self._fields()}
        values["rate_limits"] = msgspec.to_builtins(key.rate_limits)
        await self.conn.execute(sa.insert(api_keys).values(**values, key_hash=key_hash))

    async def use(self, key_hash: str, now: datetime) -> KeyPrincipal | None:
        # One statement authenticates and counts the use; a revoked or expired key matches nothing.
        k = api_keys.c
        stmt = (
            sa.update(api_keys)
            .where(k.key_hash == key_hash, k.revoked_at.is_(None), sa.or_(k.expires_at.is_(None), k.expires_at > now))
            .values(last_used_at=now, use_count=k.use_count + 1)
            .returning(k.id, k.project_id, k.agent_id, k.scopes, k.expires_at)
        )
        row = (await self.conn.execute(stmt)).first()
        if row is None:
            return None
        status = (await self.conn.execute(
            sa.select(projects.c.status).where(projects.c.id == row.project_id))).scalar_one()
        return KeyPrincipal(key_id=row.id, project_id=row.project_id, agent_id=row.agent_id,
                            project_status=status, scopes=frozenset(row.scopes or ()), expires_at=row.expires_at)

    async def principal(self, key_hash: str, now: datetime) -> KeyPrincipal | None:
        """What ``use`` returns, read only (nothing counted); a revoked or expired key matches nothing."""
        k = api_keys.c
        row = (await self.conn.execute(
            sa.select(k.id, k.project_id, k.agent_id, k.scopes, k.expires_at, projects.c.status)
            .join(projects, projects.c.id == k.project_id)
            .where(k.key_hash == key_hash, k.revoked_at.is_(None),
                   sa.or_(k.expires_at.is_(None), k.expires_at > now)))).first()
        if row is None:
            return None
        return KeyPrincipal(key_id=row.id, project_id=row.project_id, agent_id=row.agent_id, project_status=row.status,
                            scopes=frozenset(row.scopes or ()), expires_at=row.expires_at)

    async def revoke_all(self, project_id: str, now: datetime) -> None:
        await self.conn.execute(sa.update(api_keys).where(
            api_keys.c.project_id == project_id, api_keys.c.revoked_at.is_(None)).values(revoked_at=now))

    async def list(self, project_id: str, page: PageRequest) -> Page[ApiKey]:
        return await self.paginate(page, api_keys.c.project_id == project_id)
