"""Money controls (API.md): wallet, admin credits, budgets, spend requests, approvals, usage."""

from __future__ import annotations

from datetime import datetime

from aiohttp import web

from domain.base import Page
from domain.budgets import Budget, BudgetCreate, BudgetUpdate
from domain.identity import OWN
from domain.spend import RequestCreate, Resolve, SpendRequest, list_requests
from domain.usage import UsageReport
from domain.wallet import AdminCredit, LedgerEntry, PlatformTotals, Wallet
from server.csvexport import FORMAT_QUERY, csv_response, requests_csv, usage_csv, wants_csv
from server.http import PAGE_QUERY, actor, decode, json_response, page_request, query_value, routes
from server.http import container as _c
from server.idempotency import HEADER as IDEMPOTENCY_KEY
from server.idempotency import idempotent

P = "/api/v1/projects/{project_id}"
ERR = (401, 403, 404, 422)
CSV_MAX_ROWS = 10_000  # ?format=csv may ask for up to this many requests per page (JSON: 200)


# ---------------------------------------------------------------- wallet
@routes.get(P + "/wallet", summary="The project's wallet: balance, reserved, available", tag="wallet",
            response=Wallet, errors=(401, 404), key_scope="wallet:read")
async def get_wallet(request: web.Request) -> web.Response:
    async with _c(request).reader(actor(request)) as uow:
        return json_response(await uow.wallets.view(request.match_info["project_id"]))


@routes.get(P + "/wallet/ledger", summary="The wallet's ledger entries, newest first", tag="wallet",
            response=Page[LedgerEntry], query=PAGE_QUERY, errors=(401, 404), key_scope="wallet:read")
async def get_ledger(request: web.Request) -> web.Response:
    page = page_request(request)
    async with _c(request).reader(actor(request)) as uow:
        return json_response(await uow.wallets.ledger(request.match_info["project_id"], page))


@routes.get("/api/v1/admin/platform/ledger", summary="The platform's own ledger: the fees it earned "
            "(platform admins)", tag="wallet", response=PlatformTotals, errors=(401, 403))
async def platform_ledger(request: web.Request) -> web.Response:
    async with _c(request).reader(actor(request)) as uow:
        return json_response(await uow.wallets.platform_totals())


@routes.post("/api/v1/admin/projects/{project_id}/credits",
             summary="Credit a project's wallet (platform admins; Idempotency-Key honoured)", tag="wallet",
             body=AdminCredit, response=LedgerEntry, status=201, errors=(401, 403, 404, 409, 422))
async def admin_credit(request: web.Request) -> web.StreamResponse:
    cmd = await decode(request, AdminCredit)
    project_id = request.match_info["project_id"]

    async def run() -> web.Response:
        async with _c(request).uow(actor(request)) as uow:
            entry = await uow.wallets.admin_credit(project_id, cmd)
        return json_response(entry, status=201)

    return await idempotent(request, actor(request), project_id, cmd, run)


# ---------------------------------------------------------------- budgets
@routes.post(P + "/budgets", summary="Create a budget (admin)", tag="budgets", body=BudgetCreate, response=Budget,
             status=201, errors=ERR)
async def create_budget(request: web.Request) -> web.Response:
    cmd = await decode(request, BudgetCreate)
    async with _c(request).uow(actor(request)) as uow:
        budget = await uow.budgets.create(request.match_info["project_id"], cmd)
    return json_response(budget, status=201)


@routes.get(P + "/budgets", summary="The project's budgets (?agent_id= to filter)", tag="budgets",
            response=Page[Budget], query={**PAGE_QUERY, "agent_id": "only this agent's budgets"},
            errors=(401, 404), key_scope="budgets:read")
async def list_budgets(request: web.Request) -> web.Response:
    page = page_request(request)
    agent_id = request.query.get("agent_id") or None
    async with _c(request).reader(actor(request)) as uow:
        return json_response(await uow.budgets.list(request.match_info["project_id"], page, agent_id))


@routes.get(P + "/budgets/{budget_id}", summary="A budget with its figures for the current period", tag="budgets",
            response=Budget, errors=(401, 404), key_scope="budgets:read")
async def get_budget(request: web.Request) -> web.Response:
    async with _c(request).reader(actor(request)) as uow:
        return json_response(await uow.budgets.get(request.match_info["project_id"],
                                                   request.match_info["budget_id"]))


@routes.patch(P + "/budgets/{budget_id}", summary="Change a budget's name, limit or thresholds (admin)",
              tag="budgets", body=BudgetUpdate, response=Budget, errors=(*ERR, 409))
async def update_budget(request: web.Request) -> web.Response:
    cmd = await decode(request, BudgetUpdate)
    async with _c(request).uow(actor(request)) as uow:
        budget = await uow.budgets.update(request.match_info["project_id"], request.match_info["budget_id"], cmd)
    return json_response(budget)


@routes.delete(P + "/budgets/{budget_id}", summary="Delete a budget (admin): it stops applying at once",
               tag="budgets", status=204, errors=ERR)
async def delete_budget(request: web.Request) -> web.Response:
    async with _c(request).uow(actor(request)) as uow:
        await uow.budgets.delete(request.match_info["project_id"], request.match_info["budget_id"])
    return web.Response(status=204)


# ---------------------------------------------------------------- spend requests and approvals
@routes.post("/api/v1/requests", summary="Run a spend request through the agentic brain "
             "(200 executed, 202 held for review; Idempotency-Key honoured)", tag="requests", body=RequestCreate,
             response=SpendRequest, errors=(401, 402, 403, 404, 409, 422, 429, 502, 504), key_scope=OWN)
async def create_request(request: web.Request) -> web.StreamResponse:
    cmd = await decode(request, RequestCreate)
    who = actor(request)
    spending = _c(request).spending
    key = request.headers.get(IDEMPOTENCY_KEY)
    project_id = who.project_id if who.kind == "key" else cmd.project_id

    async def run() -> web.Response:
        result = await spending.run(who, cmd.command(), idempotency_key=key)
        return json_response(result.request, status=result.status_code)

    async def recover(since: datetime) -> web.Response | None:  # the key's first request died
        left = await spending.recover(project_id or "", key or "", since)
        return None if left is None else json_response(left, status=200 if left.status == "settled" else 202)

    return await idempotent(request, who, project_id, cmd, run, recover=recover)


@routes.get("/api/v1/requests/{request_id}", summary="A spend request", tag="requests", response=SpendRequest,
            errors=(401, 404), key_scope=OWN)
async def get_request(request: web.Request) -> web.Response:
    return json_response(await _c(request).spending.get(actor(request), request.match_info["request_id"]))


@routes.get(P + "/requests", summary="The project's spend requests, newest first (?status=; ?format=csv for "
            "finance)", tag="requests", response=Page[SpendRequest],
            query={**PAGE_QUERY, "status": "pending_approval, settled, rejected, …", **FORMAT_QUERY},
            errors=(401, 404, 422), key_scope=OWN)
async def project_requests(request: web.Request) -> web.Response:
    csv = wants_csv(request)
    page = page_request(request, max_limit=CSV_MAX_ROWS if csv else 200)
    project_id = request.match_info["project_id"]
    async with _c(request).reader(actor(request)) as uow:
        found = await list_requests(uow, project_id, page, request.query.get("status") or None)
    if not csv:
        return json_response(found)
    more = {"X-SmartSpace-Next-Cursor": found.next_cursor} if found.next_cursor else {}
    return csv_response(requests_csv(found.items), f"smartspace-requests-{project_id}.csv", more)


async def _resolve_body(request: web.Request) -> Resolve:
    return await decode(request, Resolve) if (await request.read()).strip() else Resolve()


@routes.post("/api/v1/requests/{request_id}/approve", summary="Approve a held request (owner/admin); it runs",
             tag="requests", body=Resolve, response=SpendRequest, errors=(401, 403, 404, 409))
async def approve_request(request: web.Request) -> web.Response:
    cmd = await _resolve_body(request)
    return json_response(await _c(request).spending.approve(actor(request), request.match_info["request_id"],
                                                            cmd.reason))


@routes.post("/api/v1/requests/{request_id}/reject", summary="Reject a held request (owner/admin); it is released",
             tag="requests", body=Resolve, response=SpendRequest, errors=(401, 403, 404, 409))
async def reject_request(request: web.Request) -> web.Response:
    cmd = await _resolve_body(request)
    return json_response(await _c(request).spending.reject(actor(request), request.match_info["request_id"],
                                                           cmd.reason))


# ---------------------------------------------------------------- usage
@routes.get(P + "/usage", summary="Spending totals and breakdowns by model, agent and day, with the "
            "estimate-vs-actual variance (?format=csv for finance)", tag="usage", response=UsageReport,
            query={"since": "RFC 3339 start (default: 30 days before until)", "until": "RFC 3339 end (default: now)",
                   **FORMAT_QUERY},
            errors=(401, 404, 422), key_scope=OWN)
async def usage(request: web.Request) -> web.Response:
    csv = wants_csv(request)
    since = query_value(request, "since", datetime)
    until = query_value(request, "until", datetime)
    project_id = request.match_info["project_id"]
    async with _c(request).reader(actor(request)) as uow:
        report = await uow.usage.report(project_id, since, until)
    if not csv:
        return json_response(report)
    return csv_response(usage_csv(report), f"smartspace-usage-{project_id}.csv")
