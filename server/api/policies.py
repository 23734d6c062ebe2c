"""Project policies (versioned) and the system policy (API.md "Money controls")."""

from __future__ import annotations

from aiohttp import web

from domain import policies as pol
from domain.base import Page
from server.http import PAGE_QUERY, actor, json_response, page_request, read_body, refuse_nul_in, routes
from server.http import container as _c

P = "/api/v1/projects/{project_id}/policy"


@routes.get(P, summary="The project's policy in force (version 0 = the defaults)", tag="policies",
            response=pol.PolicyRecord, errors=(401, 404), key_scope="policy:read")
async def get_policy(request: web.Request) -> web.Response:
    async with _c(request).reader(actor(request)) as uow:
        return json_response(await uow.policies.get(request.match_info["project_id"]))


@routes.put(P, summary="Replace the project's policy (admin); the version goes up, old versions are kept",
            tag="policies", body=pol.ProjectPolicy, response=pol.PolicyRecord, errors=(401, 403, 404, 409, 422))
async def put_policy(request: web.Request) -> web.Response:
    body = await read_body(request)
    refuse_nul_in(body)
    policy = pol.parse(body, pol.ProjectPolicy)
    async with _c(request).uow(actor(request)) as uow:
        result = await uow.policies.put(request.match_info["project_id"], policy)
    return json_response(result)


@routes.get(P + "/versions", summary="Every version of the project's policy, newest first", tag="policies",
            response=Page[pol.PolicyRecord], query=PAGE_QUERY, errors=(401, 404), key_scope="policy:read")
async def policy_history(request: web.Request) -> web.Response:
    page = page_request(request)
    async with _c(request).reader(actor(request)) as uow:
        return json_response(await uow.policies.history(request.match_info["project_id"], page))


@routes.get("/api/v1/admin/policy", summary="The system-wide policy (platform admins)", tag="policies",
            response=pol.SystemPolicyRecord, errors=(401, 403))
async def get_system_policy(request: web.Request) -> web.Response:
    async with _c(request).reader(actor(request)) as uow:
        return json_response(await uow.policies.system())


@routes.put("/api/v1/admin/policy", summary="Replace the system-wide policy (platform admins; audited)",
            tag="policies", body=pol.SystemPolicy, response=pol.SystemPolicyRecord, errors=(401, 403, 409, 422))
async def put_system_policy(request: web.Request) -> web.Response:
    body = await read_body(request)
    refuse_nul_in(body)
    policy = pol.parse(body, pol.SystemPolicy)
    async with _c(request).uow(actor(request)) as uow:
        result = await uow.policies.put_system(policy)
    return json_response(result)
