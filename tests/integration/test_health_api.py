"""Operations surface: /health, /ready, /metrics, request ids, error bodies, OpenAPI and the docs page."""

from __future__ import annotations

import re
from typing import Any

import msgspec
import pytest
from aiohttp import web
from openapi_spec_validator import OpenAPIV31SpecValidator
from prometheus_client.parser import text_string_to_metric_families

from server.api.examples import example_for
from server.api.openapi import _PATH_PARAM
from server.app import create_app
from server.container import Container
from server.http import routes
from server.metrics import Metrics
from tests.conftest import redis_bus
from tests.factories import create_agent, quick_user, register


async def test_health_answers_without_auth(client):
    resp = await client.get("/health")
    assert (resp.status, await resp.json()) == (200, {"status": "ok"})


async def test_ready_checks_the_database(client):
    resp = await client.get("/ready")
    assert resp.status == 200
    assert await resp.json() == {"status": "ok", "checks": {"database": "ok"}}


async def test_ready_reports_redis_when_it_is_configured(aiohttp_client, settings, db, redis_url):
    metrics = Metrics()
    container = Container(settings, db, redis_bus(redis_url, metrics), metrics=metrics)
    client = await aiohttp_client(create_app(settings, container=container))
    resp = await client.get("/ready")
    assert resp.status == 200
    assert await resp.json() == {"status": "ok", "checks": {"database": "ok", "redis": "ok"}}


async def test_ready_is_200_degraded_when_redis_does_not_answer(aiohttp_client, settings, db):
    # Redis only fans out events and shares rate-limit counts: the process still serves and spends safely.
    metrics = Metrics()
    dead = redis_bus("redis://127.0.0.1:1/0", metrics)  # nothing listens on port 1
    client = await aiohttp_client(create_app(settings, container=Container(settings, db, dead, metrics=metrics)))
    resp = await client.get("/ready")
    assert resp.status == 200
    body = await resp.json()
    assert body["status"] == "degraded"
    assert body["checks"]["database"] == "ok"
    assert body["checks"]["redis"].startswith("degraded")
    assert (await client.get("/health")).status == 200  # liveness is not readiness


def _samples(text: str) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(text):
        out.setdefault(family.name, []).extend(family.samples)
    return out


async def test_metrics_count_requests_by_route_and_status_with_latency_and_bus_counters(client):
    owner = await register(client)  # publishes project.created
    await create_agent(client, owner, "bot")  # publishes agent.created
    path = f"/api/v1/projects/{owner.project_id}"
    assert (await client.get(path, headers=owner.headers)).status == 200
    assert (await client.get("/api/v1/projects/prj_nope", headers=owner.headers)).status == 404
    assert (await client.get("/no/such/route")).status == 404
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    text = await resp.text()
    samples = _samples(text)
    requests = {(s.labels["method"], s.labels["route"], s.labels["status"]): s.value
                for s in samples["smartspace_http_requests"] if s.name.endswith("_total")}
    assert requests[("GET", "/api/v1/projects/{project_id}", "200")] == 1
    assert requests[("GET", "/api/v1/projects/{project_id}", "404")] == 1
    assert requests[("POST", "/api/v1/auth/register", "201")] == 1
    assert ("GET", "unmatched", "404") in requests  # unknown paths share one label: no cardinality blow-up
    latency = [s for s in samples["smartspace_http_request_duration_seconds"]
               if s.labels.get("route") == "/api/v1/projects/{project_id}"]
    assert {s.name for s in latency} >= {"smartspace_http_request_duration_seconds_bucket",
                                         "smartspace_http_request_duration_seconds_count",
                                         "smartspace_http_request_duration_seconds_sum"}
    count = [s.value for s in latency if s.name.endswith("_count")]
    assert count == [2]
    published = [s.value for s in samples["smartspace_events_published"] if s.name.endswith("_total")]
    assert len(published) == 1 and published[0] >= 2  # at least project.created and agent.created
    for family in ("smartspace_socket_connections", "smartspace_events_replayed_total",
                   "smartspace_events_delivered_total"):
        assert re.search(rf"^# TYPE {family.removesuffix('_total')}(_total)? (gauge|counter)$", text, re.M), family


# ---------------------------------------------------------------- request id and error bodies
async def test_a_given_request_id_is_echoed(client):
    for path in ("/health", "/api/v1/me", "/no/such/route"):
        resp = await client.get(path, headers={"X-Request-ID": "req-abc.123:x"})
        assert resp.headers["X-Request-ID"] == "req-abc.123:x"


async def test_a_request_id_is_generated_when_missing_or_unusable(client):
    seen = set()
    for headers in ({}, {"X-Request-ID": "has spaces"}, {"X-Request-ID": "x" * 129},
                    {"X-Request-ID": "line\\nbreak"}):
        resp = await client.get("/health", headers=headers)
        rid = resp.headers["X-Request-ID"]
        assert re.fullmatch(r"[0-9a-f]{32}", rid)
        seen.add(rid)
    assert len(seen) == 4


async def test_unknown_routes_and_methods_use_the_error_shape(client):
    resp = await client.get("/api/v1/nothing-here")
    assert resp.status == 404
    assert (await resp.json())["error"]["code"] == "not_found"
    resp = await client.put("/api/v1/projects", json={})
    assert resp.status == 405
    assert (await resp.json())["error"]["code"] == "method_not_allowed"


async def test_credentials_are_checked_only_on_routes_that_need_them(client):
    bad = {"Authorization": "Bearer garbage"}
    assert (await client.get("/health", headers=bad)).status == 200
    assert (await client.get("/api/v1/openapi.json", headers=bad)).status == 200
    assert (await client.get("/no/such/route", headers=bad)).status == 404
    # Socket.IO authenticates in its connect handler; the HTTP handshake is not the middleware's to refuse.
    resp = await client.get("/socket.io/", params={"EIO": "4", "transport": "polling"}, headers=bad)
    assert resp.status == 200, await resp.text()


async def test_an_unhandled_error_is_a_500_without_a_stack_trace(aiohttp_client, settings, container):
    app = create_app(settings, container=container)

    async def explode(request: web.Request) -> web.Response:
        raise RuntimeError("secret internal detail /etc/passwd")

    app.router.add_get("/test-only/explode", explode)
    client = await aiohttp_client(app)
    resp = await client.get("/test-only/explode", headers={"X-Request-ID": "trace-me"})
    assert resp.status == 500
    assert resp.headers["X-Request-ID"] == "trace-me"
    text = await resp.text()
    assert "Traceback" not in text and "secret internal detail" not in text and "RuntimeError" not in text
    error = (await resp.json())["error"]
    assert error["code"] == "internal_error"
    assert "trace-me" in error["message"]  # so a user can quote it and an operator can find the log line


async def test_an_oversized_body_is_413_not_500(client, container):
    owner = await quick_user(container)
    resp = await client.post("/api/v1/projects", data=b"{" + b" " * (9 * 1024 * 1024) + b"}",
                             headers={**owner.headers, "Content-Type": "application/json"})
    assert resp.status == 413
    assert (await resp.json())["error"]["code"] == "invalid_request"


# ---------------------------------------------------------------- OpenAPI and docs
@pytest.fixture
async def openapi(client) -> dict[str, Any]:
    resp = await client.get("/api/v1/openapi.json")
    assert resp.status == 200
    assert resp.content_type == "application/json"
    return await resp.json()


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def _resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


async def test_openapi_is_a_valid_3_1_document(openapi):
    assert openapi["openapi"].startswith("3.1")
    OpenAPIV31SpecValidator(openapi).validate()


async def test_openapi_lists_every_registered_route_with_its_parameters(openapi):
    assert routes.specs
    for spec in routes.specs:
        path = _PATH_PARAM.sub(r"{\1}", spec.path)
        op = openapi["paths"][path][spec.method.lower()]
        assert op["summary"] == spec.summary
        assert str(spec.status) in op["responses"]
        declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
        assert declared == set(_PATH_PARAM.findall(spec.path))
        if spec.body is not None:
            assert "$ref" in op["requestBody"]["content"]["application/json"]["schema"]
        if spec.auth:
            assert "401" in op["responses"]
            assert op["security"]
    operations = [(p, m) for p, item in openapi["paths"].items() for m in item]
    assert len(operations) == len(routes.specs)
    ids = [item[m]["operationId"] for p, item in openapi["paths"].items() for m in item]
    assert len(ids) == len(set(ids))


async def test_every_ref_resolves_into_components(openapi):
    refs = _refs(openapi)
    assert refs
    for ref in refs:
        assert ref.startswith("#/components/schemas/"), ref
        assert isinstance(_resolve(openapi, ref), dict), ref
    for scheme in {name for p in openapi["paths"].values() for op in p.values()
                   for requirement in op.get("security", []) for name in requirement}:
        assert scheme in openapi["components"]["securitySchemes"]


async def test_openapi_schemas_come_from_the_msgspec_types(openapi):
    schemas = openapi["components"]["schemas"]
    register_op = openapi["paths"]["/api/v1/auth/register"]["post"]
    body = _resolve(openapi, register_op["requestBody"]["content"]["application/json"]["schema"]["$ref"])
    assert set(body["required"]) == {"email", "password", "name"}
    assert body["properties"]["password"]["minLength"] == 8
    assert "key" in schemas["CreatedKey"]["properties"]
    assert "key" not in schemas["ApiKey"]["properties"]
    audit_op = openapi["paths"]["/api/v1/projects/{project_id}/audit"]["get"]
    audit = {p["name"]: p["schema"] for p in audit_op["parameters"]}
    assert audit["limit"]["type"] == "integer" and audit["since"]["format"] == "date-time"
    assert audit["project_id"] == {"type": "string"}


async def test_the_docs_page_is_the_bundled_reference_under_a_strict_policy(client):
    resp = await client.get("/api/docs")
    assert resp.status == 200
    assert resp.content_type == "text/html"
    csp = resp.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "unsafe-eval" not in csp
    html = await resp.text()
    scripts = re.findall(r'<script[^>]*src="(/assets/[^"]+\.js)"', html)
    assert scripts and "<script>" not in html  # no inline script: the page's code is a bundled asset
    bundle = "".join([await (await client.get(src)).text() for src in scripts])
    assert "/api/v1/openapi.json" in bundle


def test_openapi_handles_regex_path_params_and_reused_handler_names():
    from domain.identity import AgentCreate
    from server.api.openapi import build_openapi
    from server.http import RouteSpec

    async def get_thing(request):  # two route modules may both name a handler like this
        raise NotImplementedError

    specs = [RouteSpec("GET", "/v1/models/{model:.+}", get_thing, "a model", "gateway"),
             RouteSpec("POST", "/a/{id:[0-9]{2}}/things", get_thing, "make", "things", body=AgentCreate),
             RouteSpec("GET", "/b/{id}", get_thing, "other", "things")]
    doc = build_openapi(specs)
    OpenAPIV31SpecValidator(doc).validate()
    assert set(doc["paths"]) == {"/v1/models/{model}", "/a/{id}/things", "/b/{id}"}
    assert [p["name"] for p in doc["paths"]["/v1/models/{model}"]["get"]["parameters"]] == ["model"]
    ids = [op["operationId"] for item in doc["paths"].values() for op in item.values()]
    assert len(set(ids)) == 3


async def test_the_access_log_is_one_json_object_per_request_without_credentials(aiohttp_client, settings,
                                                                                  container, caplog):
    import json
    import logging

    import msgspec

    from server.logs import JsonFormatter
    from tests.factories import create_key

    logged = msgspec.structs.replace(settings, access_log=True)
    client = await aiohttp_client(create_app(logged, container=container))
    owner = await quick_user(container)
    key = await create_key(client, owner, scopes=["project:read"])
    caplog.set_level(logging.INFO, logger="smartspace.access")
    caplog.clear()
    resp = await client.get(f"/api/v1/projects/{owner.project_id}/agents",
                            headers={"X-API-Key": key["key"], "X-Request-ID": "log-me-1"})
    assert resp.status == 200
    [record] = [r for r in caplog.records if r.name == "smartspace.access"]
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["request_id"] == "log-me-1"
    assert (entry["method"], entry["route"], entry["status"]) == ("GET", "/api/v1/projects/{project_id}/agents", 200)
    assert entry["actor"] == f"key:{key['id']}"
    assert isinstance(entry["duration_ms"], float)
    assert key["key"] not in line and owner.token not in line


async def test_every_request_example_is_a_valid_body_of_its_route(openapi):
    """The examples /api/docs shows (and schemathesis's examples phase sends) decode as their route's body."""
    with_example = {s.body for s in routes.specs if s.body is not None and example_for(s.body) is not None}
    assert len(with_example) >= 15
    for body in with_example:
        msgspec.json.decode(msgspec.json.encode(example_for(body)), type=body)  # raises if it is not valid
    examples = [m["example"] for p in openapi["paths"].values() for op in p.values()
                for m in op.get("requestBody", {}).get("content", {}).values() if "example" in m]
    assert len(examples) >= len(with_example)


async def test_the_gateway_routes_document_their_key_auth_and_openai_bodies(openapi):
    chat = openapi["paths"]["/v1/chat/completions"]["post"]
    embeddings = openapi["paths"]["/v1/embeddings"]["post"]
    for op in (chat, embeddings, openapi["paths"]["/v1/models"]["get"]):
        assert op["security"] == [{"bearer": []}, {"apiKey": []}] and "401" in op["responses"]
    body = chat["requestBody"]["content"]["application/json"]
    schemas = openapi["components"]["schemas"]
    assert {"model", "messages"} <= set(schemas["ChatCompletionRequest"]["required"])
    assert body["example"]["model"] == "local/echo-1"
    assert "cost_micros" in schemas["Usage"]["properties"]
    assert "EmbeddingRequest" in embeddings["requestBody"]["content"]["application/json"]["schema"]["$ref"]
