"""Users, projects, members, agents and API keys (API.md "Users, projects, keys")."""

from __future__ import annotations

from aiohttp import web

from domain.base import Page
from domain.identity import (
    Agent,
    AgentCreate,
    ApiKey,
    AuthResult,
    CreatedKey,
    KeyCreate,
    KeyUpdate,
    Login,
    Member,
    MemberAdd,
    MemberUpdate,
    Project,
    ProjectCreate,
    ProjectUpdate,
    Register,
    Token,
    User,
    hash_password,
)
from server.http import PAGE_QUERY, actor, decode, json_response, page_request, routes
from server.http import container as _c

P = "/api/v1/projects/{project_id}"


@routes.post("/api/v1/auth/register", summary="Register a user (a default project is created)",
             tag="auth", body=Register, response=AuthResult, status=201, auth=False, errors=(409, 422))
async def register(request: web.Request) -> web.Response:
    cmd = await decode(request, Register)
    password_hash = await hash_password(_c(request).deps, cmd.password)  # before the write lock
    async with _c(request).uow() as uow:
        result = await uow.users.register(cmd, password_hash)
    return json_response(result, status=201)


@routes.post("/api/v1/auth/token", summary="Log in: email + password → access token", tag="auth",
             body=Login, response=Token, auth=False, errors=(401, 422))
async def token(request: web.Request) -> web.Response:
    cmd = await decode(request, Login)
    async with _c(request).reader() as uow:
        result = await uow.users.login(cmd)
    return json_response(result)


@routes.get("/api/v1/me", summary="The calling user", tag="auth", response=User, errors=(401,))
async def me(request: web.Request) -> web.Response:
    async with _c(request).reader(actor(request)) as uow:
        return json_response(await uow.users.me())


@routes.post("/api/v1/projects", summary="Create a project (the caller is its owner)", tag="projects",
             body=ProjectCreate, response=Project, status=201, errors=(401, 422))
async def create_project(request: web.Request) -> web.Response:
    cmd = await decode(request, ProjectCreate)
    async with _c(request).uow(actor(request)) as uow:
        project = await uow.projects.create(cmd)
    return json_response(project, status=201)


@routes.get("/api/v1/projects", summary="The caller's projects", tag="projects", response=Page[Project],
            query=PAGE_QUERY, errors=(401,), key_scope="project:read")
async def list_projects(request: web.Request) -> web.Response:
    page = page_request(request)
    async with _c(request).reader(actor(request)) as uow:
        return json_response(await uow.projects.list_mine(page))


@routes.get(P, summary="A project", tag="projects", response=Project, errors=(401, 404), key_scope="project:read")
async def get_project(request: web.Request) -> web.Response:
    async with _c(request).reader(actor(request)) as uow:
        return json_response(await uow.projects.get(request.match_info["project_id"]))


@routes.patch(P, summary="Update a project (admin)", tag="projects", body=ProjectUpdate, response=Project,
              errors=(401, 403, 404, 422))
async def update_project(request: web.Request) -> web.Response:
    cmd = await decode(request, ProjectUpdate)
    async with _c(request).uow(actor(request)) as uow:
        project = await uow.projects.update(request.match_info["project_id"], cmd)
    return json_response(project)


@routes.delete(P, summary="Delete a project (owner); its keys are revoked, its log is kept",
               tag="projects", status=204, errors=(401, 403, 404))
async def delete_project(request: web.Request) -> web.Response:
    async with _c(request).uow(actor(request)) as uow:
        await uow.projects.delete(request.match_info["project_id"])
    return web.Response(status=204)


@routes.post(P + "/members", summary="Add a registered user to the project (admin; owner for admins)",
             tag="members", body=MemberAdd, response=Member, status=201, errors=(401, 403, 404, 409, 422))
async def add_member(request: web.Request) -> web.Response:
    cmd = await decode(request, MemberAdd)
    async with _c(request).uow(actor(request)) as uow:
        member = await uow.projects.add_member(request.match_info["project_id"], cmd)
    return json_response(member, status=201)


@routes.get(P + "/members", summary="The project's members", tag="members", response=Page[Member],
            query=PAGE_QUERY, errors=(401, 404), key_scope="project:read")
async def list_members(request: web.Request) -> web.Response:
    page = page_request(request)
    async with _c(request).reader(actor(request)) as uow:
        return json_response(await uow.projects.members(request.match_info["project_id"], page))


@routes.patch(P + "/members/{user_id}", summary="Change a member's role", tag="members", body=MemberUpdate,
              response=Member, errors=(401, 403, 404, 409, 422))
async def update_member(request: web.Request) -> web.Response:
    cmd = await decode(request, MemberUpdate)
    async with _c(request).uow(actor(request)) as uow:
        member = await uow.projects.update_member(
            request.match_info["project_id"], request.match_info["user_id"], cmd)
    return json_response(member)


@routes.delete(P + "/members/{user_id}", summary="Remove a member (or leave the project)", tag="members",
               status=204, errors=(401, 403, 404, 409))
async def remove_member(request: web.Request) -> web.Response:
    async with _c(request).uow(actor(request)) as uow:
        await uow.projects.remove_member(request.match_info["project_id"], request.match_info["user_id"])
    return web.Response(status=204)


@routes.post(P + "/agents", summary="Create an agent (admin)", tag="agents", body=AgentCreate,
             response=Agent, status=201, errors=(401, 403, 404, 409, 422))
async def create_agent(request: web.Request) -> web.Response:
    cmd = await decode(request, AgentCreate)
    async with _c(request).uow(actor(request)) as uow:
        agent = await uow.agents.create(request.match_info["project_id"], cmd)
    return json_response(agent, status=201)


@routes.get(P + "/agents", summary="The project's agents", tag="agents", response=Page[Agent],
            query=PAGE_QUERY, errors=(401, 404), key_scope="project:read")
async def list_agents(request: web.Request) -> web.Response:
    page = page_request(request)
    async with _c(request).reader(actor(request)) as uow:
        return json_response(await uow.agents.list(request.match_info["project_id"], page))


@routes.post(P + "/keys", summary="Create an API key (admin); the key is shown once", tag="keys",
             body=KeyCreate, response=CreatedKey, status=201, errors=(401, 403, 404, 422))
async def create_key(request: web.Request) -> web.Response:
    cmd = await decode(request, KeyCreate)
    async with _c(request).uow(actor(request)) as uow:
        key = await uow.keys.create(request.match_info["project_id"], cmd)
    return json_response(key, status=201)


@routes.get(P + "/keys", summary="The project's API keys (metadata only)", tag="keys",
            response=Page[ApiKey], query=PAGE_QUERY, errors=(401, 404), key_scope="project:read")
async def list_keys(request: web.Request) -> web.Response:
    page = page_request(request)
    async with _c(request).reader(actor(request)) as uow:
        return json_response(await uow.keys.list(request.match_info["project_id"], page))


@routes.patch(P + "/keys/{key_id}", summary="Change a key's terms (admin): name, expires_at, allowed_models, "
              "scopes, rate_limits", tag="keys", body=KeyUpdate, response=ApiKey, errors=(401, 403, 404, 409, 422))
async def update_key(request: web.Request) -> web.Response:
    cmd = await decode(request, KeyUpdate)
    async with _c(request).uow(actor(request)) as uow:
        key = await uow.keys.update(request.match_info["project_id"], request.match_info["key_id"], cmd)
    return json_response(key)


@routes.delete(P + "/keys/{key_id}", summary="Revoke an API key (admin); it fails at once",
               tag="keys", response=ApiKey, errors=(401, 403, 404))
async def revoke_key(request: web.Request) -> web.Response:
    async with _c(request).uow(actor(request)) as uow:
        key = await uow.keys.revoke(request.match_info["project_id"], request.match_info["key_id"])
    return json_response(key)
