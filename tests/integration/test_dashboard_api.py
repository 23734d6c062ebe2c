"""GET / and /assets/: the dashboard bundle, served without authentication, with a strict CSP."""

from __future__ import annotations

import json

from server.api.dashboard import STATIC


def _asset(suffix: str) -> str:
    files = json.loads((STATIC / "manifest.json").read_text())["files"]
    return next(name for name in files if name.startswith("assets/") and name.endswith(suffix))


async def test_the_page_is_served_to_anyone_with_a_strict_policy(client) -> None:
    resp = await client.get("/", headers={"Authorization": "Bearer not-a-token"})
    assert resp.status == 200
    assert resp.content_type == "text/html"
    assert await resp.read() == (STATIC / "index.html").read_bytes()
    csp = resp.headers["Content-Security-Policy"]
    host = resp.url.host + (f":{resp.url.port}" if resp.url.port else "")
    assert "script-src 'self';" in csp and "default-src 'none'" in csp
    assert f"connect-src 'self' ws://{host} wss://{host};" in csp
    assert "unsafe" not in csp
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert resp.headers["X-Frame-Options"] == "DENY"


async def test_a_hostile_host_header_stays_out_of_the_policy(client) -> None:
    resp = await client.get("/", headers={"Host": "evil.test; script-src *"})
    assert resp.status == 200
    csp = resp.headers["Content-Security-Policy"]
    assert "evil" not in csp and "script-src *" not in csp


async def test_assets_are_served_with_their_type_and_kept_for_good(client) -> None:
    for suffix, kind in ((".js", "text/javascript"), (".css", "text/css")):
        name = _asset(suffix)
        resp = await client.get("/" + name)
        assert resp.status == 200, name
        assert resp.content_type == kind
        assert "immutable" in resp.headers["Cache-Control"]
        assert await resp.read() == (STATIC / name).read_bytes()


async def test_only_bundled_assets_are_served(client) -> None:
    for path in ("/assets/nope.js", "/assets/..%2Fmanifest.json", "/assets/%2E%2E%2Findex.html", "/assets/.hidden"):
        resp = await client.get(path)
        assert resp.status == 404, path
        assert (await resp.json())["error"]["code"] == "not_found"
