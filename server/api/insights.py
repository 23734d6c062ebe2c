"""Insights (API.md "Insights"): list, get, acknowledge, dismiss."""

from __future__ import annotations

from aiohttp import web

from domain.base import Page
from domain.insights import Insight, InsightAction
from server.http import PAGE_QUERY, actor, decode_body, json_response, page_request, routes
from server.http import container as _c

P = "/api/v1/projects/{project_id}/insights"


@routes.get(P, summary="The project's insights, newest first", tag="insights", response=Page[Insight],
            query={**PAGE_QUERY, "status": "open (default), acknowledged, dismissed, resolved or all",
                   "kind": "only this kind (budget_forecast, wallet_runway, cost_spike, …)"},
            errors=(401, 404, 422))
async def list_insights(request: web.Request) -> web.Response:
    page = page_request(request)
    status, kind = request.query.get("status") or "open", request.query.get("kind") or None
    async with _c(request).reader(actor(request)) as uow:
        return json_response(await uow.insights.list(request.match_info["project_id"], page, status, kind))


@routes.get(P + "/{insight_id}", summary="One insight", tag="insights", response=Insight, errors=(401, 404))
async def get_insight(request: web.Request) -> web.Response:
    async with _c(request).reader(actor(request)) as uow:
        return json_response(await uow.insights.get(request.match_info["project_id"],
                                                    request.match_info["insight_id"]))


async def _act(request: web.Request, verb: str) -> web.Response:
    raw = await request.read()
    action = decode_body(raw, InsightAction) if raw.strip() else InsightAction()  # the body is optional
    async with _c(request).uow(actor(request)) as uow:
        act = uow.insights.acknowledge if verb == "acknowledge" else uow.insights.dismiss
        insight = await act(request.match_info["project_id"], request.match_info["insight_id"], action)
    return json_response(insight)


@routes.post(P + "/{insight_id}/acknowledge", summary="Acknowledge an insight (any member but a viewer)",
             tag="insights", body=InsightAction, response=Insight, errors=(401, 403, 404, 409, 422))
async def acknowledge_insight(request: web.Request) -> web.Response:
    return await _act(request, "acknowledge")


@routes.post(P + "/{insight_id}/dismiss", summary="Dismiss an insight: not raised again until its condition "
             "clears and comes back (any member but a viewer)", tag="insights", body=InsightAction, response=Insight,
             errors=(401, 403, 404, 409, 422))
async def dismiss_insight(request: web.Request) -> web.Response:
    return await _act(request, "dismiss")
