"""Spend export for finance: ?format=csv on the usage report and the request list, parsed with the csv module
and compared with the JSON answers figure by figure."""

from __future__ import annotations

import csv
import io
import json
from datetime import datetime, timedelta

from domain.base import utcnow
from server.csvexport import REQUEST_COLUMNS, USAGE_COLUMNS
from tests.factories import add_member, bearer, create_agent, create_key, register
from tests.integration.spend_helpers import funded_project, own_spend, spend

TRICKY = {"cost_center": "R&D, \"labs\"", "note": "line one\nline two"}  # commas, quotes, a newline


def parse(text: str) -> tuple[list[str], list[dict[str, str]]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    return list(reader.fieldnames or []), list(reader)


async def get_csv(client, path: str, headers: dict[str, str]):
    resp = await client.get(path, headers=headers)
    assert resp.status == 200, await resp.text()
    assert resp.content_type == "text/csv"
    assert resp.headers["Content-Disposition"].startswith("attachment; filename=")
    return resp, await resp.text()


async def spent_project(client):
    _, alice = await funded_project(client, 5_000_000)
    agent = await create_agent(client, alice, name="reporter")
    agent_key = await create_key(client, alice, agent_id=agent["id"])
    for _ in range(2):
        assert (await own_spend(client, alice, metadata=TRICKY))[0] == 200
    assert (await spend(client, bearer(agent_key["key"]), max_tokens=40))[0] == 200
    assert (await own_spend(client, alice, model="local/nope"))[0] == 404  # a rejected request
    return alice, agent


def is_rfc3339(value: str) -> bool:
    return "T" in value and datetime.fromisoformat(value.replace("Z", "+00:00")).tzinfo is not None


async def test_usage_csv_has_the_json_figures(client, db):
    alice, agent = await spent_project(client)
    since = (utcnow() - timedelta(days=1)).replace(microsecond=0)
    until = since + timedelta(days=2)
    window = f"since={since.strftime('%Y-%m-%dT%H:%M:%SZ')}&until={until.strftime('%Y-%m-%dT%H:%M:%SZ')}"
    base = f"/api/v1/projects/{alice.project_id}/usage?{window}"
    report = await (await client.get(base, headers=alice.headers)).json()
    _, text = await get_csv(client, base + "&format=csv", alice.headers)
    assert text.startswith(",".join(USAGE_COLUMNS) + "\r\n")
    columns, rows = parse(text)
    assert columns == list(USAGE_COLUMNS)
    groups = {g: [r for r in rows if r["group"] == g] for g in ("total", "model", "agent", "day")}
    assert len(rows) == 1 + len(report["by_model"]) + len(report["by_agent"]) + len(report["by_day"])
    for group, items in (("total", [report["totals"]]), ("model", report["by_model"]),
                         ("agent", report["by_agent"]), ("day", report["by_day"])):
        by_key = {r["key"]: r for r in groups[group]}
        for item in items:
            row = by_key["" if item["key"] is None else item["key"]]
            for field in ("requests", "input_tokens", "output_tokens", "cost_micros", "estimated_cost_micros",
                          "variance_micros"):
                assert row[field] == str(item[field])  # a plain integer, as in the JSON
    total = groups["total"][0]
    assert int(total["requests"]) == 3 and int(total["cost_micros"]) > 0
    assert total["since"] == report["since"] == since.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert total["until"] == report["until"]
    assert is_rfc3339(total["since"])
    assert {r["key"] for r in groups["agent"]} == {agent["id"], ""}


async def test_request_list_csv_quotes_metadata_and_matches_json(client, db):
    alice, _ = await spent_project(client)
    path = f"/api/v1/projects/{alice.project_id}/requests"
    listed = (await (await client.get(path + "?limit=10", headers=alice.headers)).json())["items"]
    resp, text = await get_csv(client, path + "?format=csv&limit=10", alice.headers)
    columns, rows = parse(text)
    assert columns == list(REQUEST_COLUMNS)
    assert [r["id"] for r in rows] == [r["id"] for r in listed] and len(rows) == 4
    for row, item in zip(rows, listed, strict=True):
        assert row["status"] == item["status"] and row["model"] == item["model"]
        assert row["created_at"] == item["created_at"] and is_rfc3339(row["created_at"])
        assert row["settled_at"] == (item["settled_at"] or "")
        for field in ("estimated_cost_micros", "reserved_micros"):
            assert int(row[field]) == item[field]
        assert row["cost_micros"] == ("" if item["cost_micros"] is None else str(item["cost_micros"]))
        assert row["error_code"] == ((item["error"] or {}).get("code") or "")
    tricky = [r for r in rows if r["metadata"]]
    assert len(tricky) == 2
    assert json.loads(tricky[0]["metadata"]) == TRICKY  # one field, commas, quotes and the newline intact
    assert "X-SmartSpace-Next-Cursor" not in resp.headers

    _, first = await get_csv(client, path + "?format=csv&limit=3&status=settled", alice.headers)
    resp, _ = await get_csv(client, path + "?format=csv&limit=2&status=settled", alice.headers)
    cursor = resp.headers["X-SmartSpace-Next-Cursor"]
    _, rest = await get_csv(client, path + f"?format=csv&limit=2&status=settled&cursor={cursor}", alice.headers)
    assert [r["id"] for r in parse(first)[1]][2:] == [r["id"] for r in parse(rest)[1]]
    assert {r["status"] for r in parse(first)[1]} == {"settled"}


async def test_csv_export_has_the_json_routes_access_rules(client, db):
    alice, _ = await spent_project(client)
    viewer, stranger = await register(client), await register(client)
    await add_member(client, alice, viewer, "viewer")
    for path in (f"/api/v1/projects/{alice.project_id}/usage?format=csv",
                 f"/api/v1/projects/{alice.project_id}/requests?format=csv"):
        assert (await client.get(path, headers=viewer.headers)).status == 200
        assert (await client.get(path, headers=stranger.headers)).status == 404
        assert (await client.get(path)).status == 401
    bad = await client.get(f"/api/v1/projects/{alice.project_id}/usage?format=xlsx", headers=alice.headers)
    assert bad.status == 422
    body = await bad.json()
    assert body["error"]["code"] == "invalid_request" and "format" in body["error"]["message"]
    too_many = await client.get(f"/api/v1/projects/{alice.project_id}/requests?format=csv&limit=10001",
                                headers=alice.headers)
    assert too_many.status == 422


async def test_openapi_documents_the_format_parameter_and_the_csv_answer(client):
    doc = await (await client.get("/api/v1/openapi.json")).json()
    for path in ("/api/v1/projects/{project_id}/usage", "/api/v1/projects/{project_id}/requests"):
        op = doc["paths"][path]["get"]
        param = next(p for p in op["parameters"] if p["name"] == "format")
        assert param["in"] == "query" and param["schema"]["enum"] == ["json", "csv"]
        assert set(op["responses"]["200"]["content"]) == {"application/json", "text/csv"}
