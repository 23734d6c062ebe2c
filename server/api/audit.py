"""The audit API: the project's event log, filtered and paginated, and chain verification."""

from __future__ import annotations

from datetime import datetime

from aiohttp import web

from domain.audit import AuditFilter, Verification
from domain.base import Page
from domain.events import Event
from server.http import PAGE_QUERY, actor, container, json_response, page_request, query_value, routes

P = "/api/v1/projects/{project_id}"


@routes.get(P + "/audit", summary="The project's event log, newest first", tag="audit",
            response=Page[Event], errors=(401, 404, 422), query={
                **PAGE_QUERY, "type": "event type; a trailing * matches a prefix (budget.*)",
                "actor": "e.g. user:usr_… or key:key_…", "since": "RFC 3339 time, inclusive",
                "until": "RFC 3339 time, exclusive"}, key_scope="audit:read")
async def list_audit(request: web.Request) -> web.Response:
    filters = AuditFilter(type=query_value(request, "type", str), actor=query_value(request, "actor", str),
                          since=query_value(request, "since", datetime),
                          until=query_value(request, "until", datetime))
    page = page_request(request)
    async with container(request).reader(actor(request)) as uow:
        return json_response(await uow.audit.list(request.match_info["project_id"], filters, page))


@routes.get(P + "/audit/verify", summary="Recompute the hash chain; name the first bad seq", tag="audit",
            response=Verification, errors=(401, 404), key_scope="audit:read")
async def verify_audit(request: web.Request) -> web.Response:
    async with container(request).reader(actor(request)) as uow:
        return json_response(await uow.audit.verify(request.match_info["project_id"]))
