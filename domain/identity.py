"""Users, projects, members and roles, agents, and project API keys."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

from domain.base import ROLE_RANK, Actor, Page, PageRequest, Role, new_id, utcnow
from domain.catalog import PLATFORM_PROJECT
from domain.errors import Conflict, Forbidden, InvalidRequest, NotFound, Unauthorized
from domain.policies import Window

if TYPE_CHECKING:
    from domain.scope import Deps, Scope

Email = Annotated[str, Meta(pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$", max_length=320,
                            description="an email address such as ada@example.com")]
Name = Annotated[str, Meta(min_length=1, max_length=200)]
Password = Annotated[str, Meta(min_length=8, max_length=256)]
KEY_PREFIX = "sk-"

# What a key may read beyond its baseline. Every key, whatever its scopes, may call the gateway
# (/v1/…, POST /api/v1/requests), list the models, and read its OWN spend requests and usage; a scope
# widens that to the project's. A route no scope names (writes, members, the chat assistant…) needs a
# user token. Each REST route declares the scope a key needs (server/http.py RouteSpec.key_scope).
OWN = "own"  # the route's baseline: every key, limited to what the key itself did
KEY_SCOPES: dict[str, str] = {
    "gateway": "the gateway and POST /api/v1/requests (every key holds it; naming it changes nothing)",
    "requests:read": "every spend request of the project, not only the key's own",
    "usage:read": "the project's whole usage report, not only the key's own",
    "audit:read": "the audit log and its verification, and the project's live events over Socket.IO",
    "budgets:read": "the project's budgets",
    "wallet:read": "the wallet and its ledger",
    "payments:read": "payments, deposits and the deposit address",
    "policy:read": "the project policy and its versions",
    "project:read": "the project itself, its members, agents and keys (metadata)",
}
ModelId = Annotated[str, Meta(min_length=3, max_length=200)]


# ---------------------------------------------------------------- entities
class User(msgspec.Struct, kw_only=True):
    id: str
    email: str
    name: str
    created_at: datetime


class Project(msgspec.Struct, kw_only=True):
    id: str
    name: str
    description: str
    status: str
    settlement: str
    owner_id: str
    created_at: datetime
    updated_at: datetime
    role: str | None = None  # the caller's role, when listed for a caller


class Member(msgspec.Struct, kw_only=True):
    project_id: str
    user_id: str
    role: str
    created_at: datetime
    email: str = ""
    name: str = ""


class Agent(msgspec.Struct, kw_only=True):
    id: str
    project_id: str
    name: str
    status: str
    created_at: datetime


class ApiKey(msgspec.Struct, kw_only=True):
    id: str
    project_id: str
    agent_id: str | None
    name: str
    prefix: str
    created_by: str
    created_at: datetime
    last_used_at: datetime | None = None
    use_count: int = 0
    revoked_at: datetime | None = None
    expires_at: datetime | None = None
    allowed_models: list[str] | None = None  # "provider/model" ids; null: every model the policy allows
    scopes: list[str] = []
    rate_limits: Window = msgspec.field(default_factory=Window)

    def __post_init__(self) -> None:
        if isinstance(self.rate_limits, dict):  # as stored (JSON)
            self.rate_limits = msgspec.convert(self.rate_limits, Window)


class CreatedKey(ApiKey, kw_only=True):
    key: str  # the secret, shown once


class KeyPrincipal(msgspec.Struct, frozen=True):
    key_id: str
    project_id: str
    agent_id: str | None
    project_status: str
    scopes: frozenset[str] = frozenset()
    expires_at: datetime | None = None


# ---------------------------------------------------------------- commands
class Register(msgspec.Struct, forbid_unknown_fields=True):
    email: Email
    password: Password
    name: Name


class Login(msgspec.Struct):
    email: str
    password: str


class ProjectCreate(msgspec.Struct, forbid_unknown_fields=True):
    name: Name
    description: Annotated[str, Meta(max_length=2000)] = ""


class ProjectUpdate(msgspec.Struct, forbid_unknown_fields=True):
    name: Name | UnsetType = UNSET
    description: Annotated[str, Meta(max_length=2000)] | UnsetType = UNSET
    settlement: Literal["ledger", "onchain"] | UnsetType = UNSET
    status: Literal["active", "suspended"] | UnsetType = UNSET


class MemberAdd(msgspec.Struct, forbid_unknown_fields=True):
    email: Email
    role: Role = "member"


class MemberUpdate(msgspec.Struct, forbid_unknown_fields=True):
    role: Role


class AgentCreate(msgspec.Struct, forbid_unknown_fields=True):
    name: Name


class KeyCreate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: Name
    agent_id: str | None = None
    expires_at: datetime | None = None  # RFC 3339 with a zone, in the future
    allowed_models: Annotated[list[ModelId], Meta(max_length=200)] | None = None
    scopes: Annotated[list[str], Meta(max_length=len(KEY_SCOPES))] = []
    rate_limits: Window = msgspec.field(default_factory=Window)  # this key's own requests per minute/hour/day


class KeyUpdate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """PATCH a key's terms (LiteLLM's key update): only the fields sent change; null clears expires_at /
    allowed_models. The secret and the agent stay."""

    name: Name | UnsetType = UNSET
    expires_at: datetime | UnsetType | None = UNSET
    allowed_models: Annotated[list[ModelId], Meta(max_length=200)] | UnsetType | None = UNSET
    scopes: Annotated[list[str], Meta(max_length=len(KEY_SCOPES))] | UnsetType = UNSET
    rate_limits: Window | UnsetType = UNSET


class AuthResult(msgspec.Struct):
    user: User
    access_token: str


class Token(msgspec.Struct):
    access_token: str
    expires_in: int
    token_type: str = "bearer"


def hash_key(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def normalise_email(email: str) -> str:
    return email.strip().lower()


async def hash_password(deps: Deps, password: str) -> str:
    """Hash a password off the event loop. Call it before opening the unit of work that stores it."""
    return await asyncio.to_thread(deps.passwords.hash, password)


async def _unknown_user_hash(deps: Deps) -> str:
    """A hash no password matches, made once per process, to verify against for unknown emails."""
    found = deps.unknown_user_hash
    if found is None:
        found = deps.unknown_user_hash = await hash_password(deps, secrets.token_urlsafe(32))
    return found


# ---------------------------------------------------------------- services
class Users:
    def __init__(self, scope: Scope) -> None:
        self.scope = scope
        self.store = scope.store

    async def register(self, cmd: Register, password_hash: str | None = None) -> AuthResult:
        """Create the user and their default project. Pass ``password_hash`` from
        :func:`hash_password`, computed before the unit of work opens: argon2 takes ~100 ms and must
        not run while the write transaction (SQLite's single write lock) is held."""
        email = normalise_email(cmd.email)
        if await self.store.users.by_email(email) is not None:
            raise Conflict("a user with this email already exists", {"email": email})
        if password_hash is None:
            password_hash = await hash_password(self.scope.deps, cmd.password)
        user = User(id=new_id("usr"), email=email, name=cmd.name, created_at=utcnow())
        await self.store.users.add(user, password_hash)
        self.scope.actor = Actor(kind="user", id=user.id, user_id=user.id, email=email)
        await self.scope.projects.create(ProjectCreate(name="Default project"))
        return AuthResult(user=user, access_token=self.scope.deps.tokens.issue(user.id))

    async def login(self, cmd: Login) -> Token:
        found = await self.store.users.credentials(normalise_email(cmd.email))
        # An unknown email costs the same argon2 verify as a wrong password: timing tells nothing.
        stored = found[1] if found is not None else await _unknown_user_hash(self.scope.deps)
        ok = await asyncio.to_thread(self.scope.deps.passwords.verify, stored, cmd.password)
        if not ok or found is None:
            raise Unauthorized("email or password is wrong")
        return Token(access_token=self.scope.deps.tokens.issue(found[0].id),
                     expires_in=self.scope.deps.tokens.ttl_seconds)

    async def me(self) -> User:
        user = await self.store.users.get(self.scope.require_user())
        if user is None:
            raise Unauthorized("the user of this token no longer exists")
        return user


class Projects:
    def __init__(self, scope: Scope) -> None:
        self.scope = scope
        self.store = scope.store

    async def require(self, project_id: str, role: Role = "viewer") -> str:
        """The caller's role in the project; NotFound if they cannot see it, Forbidden if too low."""
        actor = self.scope.actor
        if actor.kind == "system":
            return "owner"
        if actor.kind == "key":
            have = "member" if actor.project_id == project_id else None
        elif project_id == PLATFORM_PROJECT:
            # The platform log (catalog prices, system policy) is readable by platform admins only.
            have = "viewer" if actor.platform_admin else None
        else:
            have = await self.store.members.role(project_id, actor.user_id or "")
        if have is None:
            raise NotFound("project not found", {"project_id": project_id})
        if ROLE_RANK[have] < ROLE_RANK[role]:
            raise Forbidden(f"this needs the {role} role; you are {have}",
                            {"project_id": project_id, "required_role": role, "role": have})
        return have

    async def create(self, cmd: ProjectCreate) -> Project:
        user_id = self.scope.require_user()
        now = utcnow()
        project = Project(id=new_id("prj"), name=cmd.name, description=cmd.description, status="active",
                          settlement="ledger", owner_id=user_id, created_at=now, updated_at=now)
        await self.store.projects.insert(project)
        await self.store.events.create_head(project.id)
        await self.store.members.add(Member(project_id=project.id, user_id=user_id, role="owner",
                                            created_at=now))
        for hook in self.scope.deps.project_created_hooks:
            await hook(self.scope, project)
        self.scope.emit(project.id, "project.created", {"project": msgspec.to_builtins(project)})
        project.role = "owner"
        return project

    async def list_mine(self, page: PageRequest) -> Page[Project]:
        actor = self.scope.actor
        if actor.kind == "key":
            project = await self.get(actor.project_id or "")
            return Page(items=[project])
        return await self.store.projects.for_user(self.scope.require_user(), page)

    async def get(self, project_id: str) -> Project:
        role = await self.require(project_id, "viewer")
        project = await self.store.projects.get(project_id)
        if project is None or project.status == "deleted":
            raise NotFound("project not found", {"project_id": project_id})
        project.role = role
        return project

    async def update(self, project_id: str, cmd: ProjectUpdate) -> Project:
        await self.require(project_id, "admin")
        changes = {k: v for k, v in msgspec.structs.asdict(cmd).items() if v is not UNSET}
        if not changes:
            raise InvalidRequest("nothing to change: send at least one field")
        await self._live(project_id)  # a racing delete wins: no update (or reactivation) after it
        project = await self.store.projects.update(project_id, **changes, updated_at=utcnow())
        if project is None:
            raise NotFound("project not found", {"project_id": project_id})
        self.scope.emit(project_id, "project.updated", {"project": msgspec.to_builtins(project),
                                                         "changes": sorted(changes)})
        return project

    async def delete(self, project_id: str) -> None:
        await self.require(project_id, "owner")
        await self._live(project_id)  # one of two racing deletes wins
        now = utcnow()
        await self.store.projects.update(project_id, status="deleted", deleted_at=now, updated_at=now)
        await self.store.keys.revoke_all(project_id, now)
        self.scope.emit(project_id, "project.deleted", {"project_id": project_id})

    async def _live(self, project_id: str) -> Project:
        """The project row, locked until commit (PostgreSQL); NotFound once it is deleted."""
        project = await self.store.projects.get(project_id, for_update=True)
        if project is None or project.status == "deleted":
            raise NotFound("project not found", {"project_id": project_id})
        return project

    # --- members
    async def members(self, project_id: str, page: PageRequest) -> Page[Member]:
        await self.require(project_id, "viewer")
        return await self.store.members.list(project_id, page)

    async def add_member(self, project_id: str, cmd: MemberAdd) -> Member:
        mine = await self.require(project_id, "admin")
        self._check_grant(mine, cmd.role)
        user = await self.store.users.by_email(normalise_email(cmd.email))
        if user is None:
            raise NotFound("no user has this email; they must register first", {"email": cmd.email})
        if await self.store.members.role(project_id, user.id) is not None:
            raise Conflict("this user is already a member", {"user_id": user.id})
        member = Member(project_id=project_id, user_id=user.id, role=cmd.role, created_at=utcnow(),
                        email=user.email, name=user.name)
        await self.store.members.add(member)
        self.scope.emit(project_id, "member.added", {"member": msgspec.to_builtins(member)})
        return member

    async def update_member(self, project_id: str, user_id: str, cmd: MemberUpdate) -> Member:
        mine = await self.require(project_id, "admin")
        current = await self._member(project_id, user_id)
        self._check_grant(mine, current.role)
        self._check_grant(mine, cmd.role)
        await self._keep_an_owner(project_id, current, cmd.role)
        member = await self.store.members.set_role(project_id, user_id, cmd.role)
        self.scope.emit(project_id, "member.updated", {"member": msgspec.to_builtins(member)})
        return member

    async def remove_member(self, project_id: str, user_id: str) -> None:
        mine = await self.require(project_id, "viewer")
        current = await self._member(project_id, user_id)
        leaving = user_id == self.scope.actor.user_id
        if not leaving:
            if ROLE_RANK[mine] < ROLE_RANK["admin"]:
                raise Forbidden("this needs the admin role", {"required_role": "admin", "role": mine})
            self._check_grant(mine, current.role)
        await self._keep_an_owner(project_id, current, None)
        await self.store.members.remove(project_id, user_id)
        self.scope.emit(project_id, "member.removed", {"user_id": user_id, "role": current.role})

    async def _member(self, project_id: str, user_id: str) -> Member:
        member = await self.store.members.get(project_id, user_id)
        if member is None:
            raise NotFound("member not found", {"user_id": user_id})
        return member

    @staticmethod
    def _check_grant(mine: str, role: str) -> None:
        """Admins manage members and viewers; only owners manage admins and owners."""
        if ROLE_RANK[role] >= ROLE_RANK["admin"] and mine != "owner":
            raise Forbidden("only an owner can manage admins and owners",
                            {"required_role": "owner", "role": mine})

    async def _keep_an_owner(self, project_id: str, member: Member, new_role: str | None) -> None:
        if member.role == "owner" and new_role != "owner" and await self.store.members.count_owners(
                project_id) <= 1:
            raise Conflict("a project must keep at least one owner")


class Agents:
    def __init__(self, scope: Scope) -> None:
        self.scope = scope
        self.store = scope.store

    async def create(self, project_id: str, cmd: AgentCreate) -> Agent:
        await self.scope.projects.require(project_id, "admin")
        if await self.store.agents.by_name(project_id, cmd.name) is not None:
            raise Conflict("an agent with this name exists in the project", {"name": cmd.name})
        agent = Agent(id=new_id("agt"), project_id=project_id, name=cmd.name, status="active",
                      created_at=utcnow())
        await self.store.agents.insert(agent)
        self.scope.emit(project_id, "agent.created", {"agent": msgspec.to_builtins(agent)})
        return agent

    async def list(self, project_id: str, page: PageRequest) -> Page[Agent]:
        await self.scope.projects.require(project_id, "viewer")
        return await self.store.agents.list(project_id, page)

    async def get(self, project_id: str, agent_id: str) -> Agent:
        await self.scope.projects.require(project_id, "viewer")
        agent = await self.store.agents.get(agent_id)
        if agent is None or agent.project_id != project_id:
            raise NotFound("agent not found", {"agent_id": agent_id})
        return agent


class Keys:
    def __init__(self, scope: Scope) -> None:
        self.scope = scope
        self.store = scope.store

    async def create(self, project_id: str, cmd: KeyCreate) -> CreatedKey:
        await self.scope.projects.require(project_id, "admin")
        if cmd.agent_id is not None:
            await self.scope.agents.get(project_id, cmd.agent_id)
        now = utcnow()
        _check_key_terms(now, cmd.expires_at, cmd.allowed_models, cmd.scopes)
        raw = KEY_PREFIX + secrets.token_urlsafe(32)
        key = CreatedKey(id=new_id("key"), project_id=project_id, agent_id=cmd.agent_id, name=cmd.name,
                         prefix=raw[:11], created_by=self.scope.actor.label, created_at=now, key=raw,
                         expires_at=cmd.expires_at,
                         allowed_models=None if cmd.allowed_models is None else list(dict.fromkeys(cmd.allowed_models)),
                         scopes=sorted(set(cmd.scopes)), rate_limits=cmd.rate_limits)
        await self.store.keys.add(key, hash_key(raw))
        public = msgspec.structs.asdict(key)
        public.pop("key")
        self.scope.emit(project_id, "key.created", {"key": msgspec.to_builtins(public)})
        return key

    async def list(self, project_id: str, page: PageRequest) -> Page[ApiKey]:
        await self.scope.projects.require(project_id, "viewer")
        return await self.store.keys.list(project_id, page)

    async def get(self, project_id: str, key_id: str) -> ApiKey:
        await self.scope.projects.require(project_id, "viewer")
        key = await self.store.keys.get(key_id)
        if key is None or key.project_id != project_id:
            raise NotFound("key not found", {"key_id": key_id})
        return key

    async def update(self, project_id: str, key_id: str, cmd: KeyUpdate) -> ApiKey:
        await self.scope.projects.require(project_id, "admin")
        changes = {k: v for k, v in msgspec.structs.asdict(cmd).items() if v is not UNSET}
        if not changes:
            raise InvalidRequest("nothing to change: send name, expires_at, allowed_models, scopes or rate_limits")
        _check_key_terms(utcnow(), changes.get("expires_at"), changes.get("allowed_models"), changes.get("scopes", ()))
        key = await self.store.keys.get(key_id, for_update=True)
        if key is None or key.project_id != project_id:
            raise NotFound("key not found", {"key_id": key_id})
        if key.revoked_at is not None:
            raise Conflict("the key is revoked: its terms can no longer change", {"key_id": key_id})
        if "allowed_models" in changes and changes["allowed_models"] is not None:
            changes["allowed_models"] = list(dict.fromkeys(changes["allowed_models"]))
        if "scopes" in changes:
            changes["scopes"] = sorted(set(changes["scopes"]))
        if "rate_limits" in changes:
            changes["rate_limits"] = msgspec.to_builtins(changes["rate_limits"])
        updated = await self.store.keys.update(key_id, **changes)
        if updated is None:  # the row is locked above: only a deleted project's cascade could get here
            raise NotFound("key not found", {"key_id": key_id})
        # The event drops the gateway's cached copies of the project's keys on every process.
        self.scope.emit(project_id, "key.updated", {"key": msgspec.to_builtins(updated), "changes": sorted(changes)})
        return updated

    async def authenticate(self, raw: str, *, count_use: bool = True) -> KeyPrincipal:
        """Resolve a presented key; counts the use (unless ``count_use`` is false: a read, e.g. a socket connect).
        A revoked, expired or unknown key fails at once."""
        key_hash = parse_key(raw)
        principal = (await self.store.keys.use(key_hash, utcnow()) if count_use
                     else await self.store.keys.principal(key_hash, utcnow()))
        if principal is None or principal.project_status != "active":
            raise Unauthorized("the API key is unknown, revoked or expired, or its project is not active")
        return principal

    async def revoke(self, project_id: str, key_id: str) -> ApiKey:
        await self.scope.projects.require(project_id, "admin")
        key = await self.store.keys.get(key_id, for_update=True)  # two racing revokes: one event
        if key is None or key.project_id != project_id:
            raise NotFound("key not found", {"key_id": key_id})
        if key.revoked_at is None:
            key = await self.store.keys.update(key_id, revoked_at=utcnow())
            assert key is not None  # locked above
            self.scope.emit(project_id, "key.revoked", {"key_id": key_id, "prefix": key.prefix})
        return key


def _check_key_terms(now: datetime, expires_at: datetime | None, allowed_models: list[str] | None,
                     scopes: Sequence[str]) -> None:
    if expires_at is not None:
        if expires_at.tzinfo is None:
            raise InvalidRequest("expires_at must be an RFC 3339 time with a zone (e.g. 2027-01-01T00:00:00Z)",
                                 {"field": "expires_at"})
        if expires_at <= now:
            raise InvalidRequest("expires_at must be in the future", {"field": "expires_at",
                                                                      "expires_at": expires_at.isoformat()})
    for model in allowed_models or ():
        provider, _, name = model.partition("/")
        if not provider or not name:
            raise InvalidRequest(f"allowed_models holds catalog ids written provider/model; {model!r} is not one",
                                 {"field": "allowed_models", "model": model})
    unknown = sorted(set(scopes) - KEY_SCOPES.keys())
    if unknown:
        raise InvalidRequest(f"unknown scope {unknown[0]!r}; scopes are {', '.join(KEY_SCOPES)}",
                             {"field": "scopes", "unknown": unknown, "scopes": list(KEY_SCOPES)})


def require_key_scope(actor: Actor, scope: str | None) -> None:
    """A key may use a route iff the route names a scope the key holds, or is part of every key's baseline."""
    if actor.kind != "key" or scope == OWN or (scope is not None and scope in actor.scopes):
        return
    if scope is None:
        raise Forbidden("an API key cannot use this route: it needs a user access token",
                        {"key_id": actor.id, "scopes": sorted(actor.scopes)})
    raise Forbidden(f"this API key lacks the {scope!r} scope ({KEY_SCOPES[scope]})",
                    {"key_id": actor.id, "required_scope": scope, "scopes": sorted(actor.scopes)})


def parse_key(raw: str) -> str:
    """Validate the shape of a presented key and return its hash."""
    if not raw.startswith(KEY_PREFIX):
        raise Unauthorized("API keys start with sk-")
    if len(raw) < 20:  # shaped like a key, but no key this server issued: say so, not how keys look
        raise Unauthorized("the API key is unknown, revoked, or its project is not active")
    return hash_key(raw)

