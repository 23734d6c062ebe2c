"""CSV for finance: the usage report and the per-request list (``?format=csv`` on their GET routes).

One header row; money in integer micro-USDC columns (``*_micros``); times in RFC 3339, exactly as the
JSON answer writes them; quoting by the csv module (a model, agent or metadata value with a comma, a
quote or a newline stays one field). Sent as ``text/csv`` with ``Content-Disposition: attachment``.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

import msgspec
from aiohttp import web

from domain.errors import InvalidRequest
from domain.spend import SpendRequest
from domain.usage import UsageReport, UsageRow

FORMAT_QUERY = {"format": "json (default) or csv: the same figures as a CSV file (text/csv, one header row, "
                          "integer micro-USDC columns, RFC 3339 times) for finance; the request list then takes "
                          "limit up to 10000 and sends the next page's cursor in X-SmartSpace-Next-Cursor"}

USAGE_COLUMNS = ("project_id", "since", "until", "group", "key", "requests", "input_tokens", "output_tokens",
                 "cost_micros", "estimated_cost_micros", "variance_micros")
REQUEST_COLUMNS = ("id", "created_at", "settled_at", "status", "project_id", "agent_id", "key_id", "actor", "source",
                   "operation", "model", "provider", "estimated_cost_micros", "reserved_micros", "cost_micros",
                   "input_tokens", "output_tokens", "error_code", "tx_hash", "settlement_batch_id", "metadata")


def wants_csv(request: web.Request) -> bool:
    """``?format=csv`` → True; absent or ``json`` → False; anything else is a 422 naming the parameter."""
    value = request.query.get("format", "json").strip().lower() or "json"
    if value not in ("json", "csv"):
        raise InvalidRequest("query parameter 'format' must be json or csv", {"format": request.query["format"]})
    return value == "csv"


def rfc3339(value: datetime | None) -> str:
    """The time as the JSON answers write it (msgspec: RFC 3339, ``Z`` for UTC); empty for none."""
    return "" if value is None else msgspec.json.encode(value).decode().strip('"')


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return rfc3339(value)
    if isinstance(value, dict | list):
        return msgspec.json.encode(value).decode() if value else ""
    return value


def render(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")  # RFC 4180 line ends
    writer.writerow(columns)
    writer.writerows([_cell(v) for v in row] for row in rows)
    return out.getvalue()


def usage_csv(report: UsageReport) -> str:
    def rows(group: str, items: list[UsageRow]) -> Iterable[list[Any]]:
        for r in items:
            yield [report.project_id, report.since, report.until, group, r.key, r.requests, r.input_tokens,
                   r.output_tokens, r.cost_micros, r.estimated_cost_micros, r.variance_micros]

    return render(USAGE_COLUMNS, [*rows("total", [report.totals]), *rows("model", report.by_model),
                                  *rows("agent", report.by_agent), *rows("day", report.by_day)])


def requests_csv(items: list[SpendRequest]) -> str:
    return render(REQUEST_COLUMNS, ([r.id, r.created_at, r.settled_at, r.status, r.project_id, r.agent_id, r.key_id,
                                     r.actor, r.source, r.operation, r.model, r.provider, r.estimated_cost_micros,
                                     r.reserved_micros, r.cost_micros, r.input_tokens, r.output_tokens,
                                     (r.error or {}).get("code"), r.tx_hash, r.settlement_batch_id, r.metadata]
                                    for r in items))


def csv_response(text: str, filename: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(text=text, content_type="text/csv", charset="utf-8", headers={
        "Content-Disposition": f'attachment; filename="{filename}"', **(headers or {})})
