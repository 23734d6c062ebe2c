"""OpenAPI 3.1, generated from the route table and the msgspec schemas — never written by hand."""

from __future__ import annotations

import re
from typing import Any

import msgspec
from aiohttp import web

from domain.identity import OWN
from server.api.dashboard import static_page
from server.api.examples import example_for
from server.http import RouteSpec, routes

_STATUS_TEXT = {
    400: "Malformed request", 401: "Missing or invalid credentials", 402: "Not enough money",
    403: "Not allowed", 404: "Not found", 409: "Conflict", 422: "Validation failed",
    429: "Rate limited", 502: "Provider error", 503: "Unavailable", 504: "Provider timeout",
}
_ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["code", "message"], "properties": {
        "code": {"type": "string"}, "message": {"type": "string"}, "details": {"type": "object"}}}},
}


_QUERY_SCHEMAS = {"limit": {"type": "integer", "minimum": 1}, "since": {"type": "string", "format": "date-time"},
                  "until": {"type": "string", "format": "date-time"},
                  "format": {"type": "string", "enum": ["json", "csv"], "default": "json"}}
_PATH_PARAM = re.compile(r"{(\w+)(?::[^{}]*(?:{[^{}]*}[^{}]*)*)?}")


def _operation_id(spec: RouteSpec, taken: set[str]) -> str:
    """The handler's name; qualified by its module when two route modules reuse a name."""
    candidates = (spec.handler.__name__, f"{spec.handler.__module__.rsplit('.', 1)[-1]}_{spec.handler.__name__}",
                  f"{spec.method.lower()}_{spec.handler.__name__}")
    for name in candidates:
        if name not in taken:
            break
    else:
        name = f"{candidates[1]}_{len(taken)}"
    taken.add(name)
    return name


def build_openapi(specs: list[RouteSpec], version: str = "0.1.0") -> dict[str, Any]:
    types = [t for s in specs for t in (s.body, s.response) if t is not None]
    schemas, components = msgspec.json.schema_components(
        types, ref_template="#/components/schemas/{name}")
    by_type = dict(zip(types, schemas, strict=True))
    components["Error"] = _ERROR_SCHEMA
    paths: dict[str, dict[str, Any]] = {}
    operation_ids: set[str] = set()
    for spec in specs:
        op: dict[str, Any] = {"summary": spec.summary, "tags": [spec.tag],
                              "operationId": _operation_id(spec, operation_ids), "responses": {}}
        path = _PATH_PARAM.sub(r"{\1}", spec.path)  # aiohttp's {name:regex} -> OpenAPI's {name}
        params = [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}}
                  for n in _PATH_PARAM.findall(spec.path)]
        params += [{"name": n, "in": "query", "required": False, "description": d,
                    "schema": _QUERY_SCHEMAS.get(n, {"type": "string"})} for n, d in spec.query.items()]
        if params:
            op["parameters"] = params
        if spec.body is not None:
            media: dict[str, Any] = {"schema": by_type[spec.body]}
            if (example := example_for(spec.body)) is not None:
                media["example"] = example
            op["requestBody"] = {"required": True, "content": {"application/json": media}}
        ok: dict[str, Any] = {"description": "OK"}
        if spec.response is not None:
            ok["content"] = {"application/json": {"schema": by_type[spec.response]}}
            if "format" in spec.query:  # ?format=csv (server/csvexport.py)
                ok["content"]["text/csv"] = {"schema": {"type": "string"}}
        op["responses"][str(spec.status)] = ok
        secured = spec.auth or spec.key_auth
        decoded_here = spec.body is not None and not spec.key_auth  # the gateway answers 400, OpenAI-style
        # A key without the route's scope is refused with 403 (domain.identity.require_key_scope).
        refused = {403} if spec.auth and spec.key_scope != OWN else set()
        errors = set(spec.errors) | ({401} if secured else set()) | ({422} if decoded_here else set()) | refused
        for status in sorted(errors):
            op["responses"][str(status)] = {
                "description": _STATUS_TEXT.get(status, "Error"),
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
        if secured:
            op["security"] = [{"bearer": []}, {"apiKey": []}]
            op["x-smartspace-key-scope"] = spec.key_scope  # "own": every key; null: user tokens only
        paths.setdefault(path, {})[spec.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "SmartSpace API", "version": version,
                 "description": "Real-time spend control plane and pay-per-use gateway for AI agents. "
                                "Money is integer micro-USDC in fields ending _micros."},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer",
                           "description": "A user access token (JWT) or a project API key (sk-…)"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            },
        },
    }


_cache: dict[str, bytes] = {}


@routes.get("/api/v1/openapi.json", summary="This document", tag="docs", auth=False)
async def openapi(request: web.Request) -> web.Response:
    if "doc" not in _cache:
        _cache["doc"] = msgspec.json.encode(build_openapi(routes.specs))
    return web.Response(body=_cache["doc"], content_type="application/json")


@routes.get("/api/docs", summary="The API reference: Swagger UI over this document, to read and try calls",
            tag="docs", auth=False)
async def docs(request: web.Request) -> web.StreamResponse:
    return static_page(request, "docs.html")
