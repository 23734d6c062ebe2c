"""Browser tests: Debian's chromium (/usr/bin/chromium) driven by Playwright against a real
``smartspace serve`` subprocess (tests/e2e/procs.py) on the embedded defaults (SQLite, in-process
bus, devnet). Playwright never downloads a browser here: it launches the system one.

Screenshots go to ``.smartspace-artifacts/browser/`` (not committed). Without chromium (``make test``
installs it when it can) every browser test is skipped with a message that says so.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from tests.e2e.procs import ROOT, Server, server_env

CHROMIUM = Path(os.environ.get("SMARTSPACE_TEST_CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = ROOT / ".smartspace-artifacts" / "browser"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ADMIN_EMAIL = "owner@browser.test"
PASSWORD = "correct horse battery"
WAIT_MS = 20_000


def _unavailable() -> str | None:
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing (install Debian's chromium: apt-get install -y chromium; make test does)"
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (make install)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    mine = [item for item in items if Path(str(item.fspath)).is_relative_to(Path(__file__).parent)]
    reason = _unavailable()
    for item in mine:
        item.add_marker(pytest.mark.browser)
        if reason:
            item.add_marker(pytest.mark.skip(reason=f"browser tests skipped: {reason}"))
    if reason and mine:
        banner = f"{'!' * 78}\n!! {len(mine)} BROWSER TESTS SKIPPED: {reason}\n{'!' * 78}"
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(banner, red=True, bold=True)
        else:
            print(banner, file=sys.stderr)


@dataclass
class Project:
    """A signed-up owner with a project, an agent, its gateway key, a budget and some money."""

    token: str
    project_id: str
    agent_id: str
    key: str
    budget_id: str
    email: str = ADMIN_EMAIL


@dataclass
class Dashboard:
    """The server under test and a REST helper for what the test does outside the page."""

    server: Server
    http: aiohttp.ClientSession
    env: dict[str, str]
    logs: Path
    restarts: int = 0
    last_request_id: str | None = None  # x-smartspace-request-id of the last answer
    _project: Project | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return self.server.url

    async def call(self, method: str, path: str, token: str | None = None, json: object = None,
                   headers: dict[str, str] | None = None,
                   expect: int | tuple[int, ...] | None = None) -> tuple[int, dict]:
        h = dict(headers or {})
        if token:
            h["Authorization"] = f"Bearer {token}"
        async with self.http.request(method, self.url + path, json=json, headers=h) as resp:
            body = await resp.json(content_type=None) if resp.content_length != 0 else {}
            self.last_request_id = resp.headers.get("x-smartspace-request-id")
            if expect is not None:
                allowed = expect if isinstance(expect, tuple) else (expect,)
                assert resp.status in allowed, (method, path, resp.status, body)
            return resp.status, body or {}

    async def project(self) -> Project:
        if self._project is None:
            _, reg = await self.call("POST", "/api/v1/auth/register", expect=201,
                                     json={"email": ADMIN_EMAIL, "password": PASSWORD, "name": "Owner"})
            token = reg["access_token"]
            _, projects = await self.call("GET", "/api/v1/projects", token, expect=200)
            pid = projects["items"][0]["id"]
            base = f"/api/v1/projects/{pid}"
            _, agent = await self.call("POST", f"{base}/agents", token, {"name": "researcher"}, expect=201)
            _, key = await self.call("POST", f"{base}/keys", token, {"name": "researcher key", "agent_id": agent["id"]},
                                     expect=201)
            _, budget = await self.call("POST", f"{base}/budgets", token, expect=201, json={
                "name": "daily", "limit_micros": 1_000_000, "period": "day"})
            await self.call("POST", f"/api/v1/admin/projects/{pid}/credits", token, expect=(200, 201),
                            json={"amount_micros": 5_000_000, "reason": "browser test"})
            self._project = Project(token, pid, agent["id"], key["key"], budget["id"])
        return self._project

    async def chat(self, key: str, content: str = "hello", max_tokens: int = 16,
                   headers: dict[str, str] | None = None, model: str = "local/echo-1") -> tuple[int, str | None]:
        """A gateway call with an agent's key: its status and the request id SmartSpace gave it."""
        status, _ = await self.call("POST", "/v1/chat/completions", key, headers=headers, json={
            "model": model, "max_tokens": max_tokens, "messages": [{"role": "user", "content": content}]})
        return status, self.last_request_id

    def stop(self) -> None:
        self.server.stop()

    async def start_again(self) -> None:
        """A new process on the same port and database (the page expects the same address)."""
        self.restarts += 1
        self.server = Server(f"server-{self.restarts}", self.env, self.logs, port=self.server.port)
        await self.server.ready(self.http)


_PROBES = {"needs_chat": ("POST", "/api/v1/chatbot/chat", {"message": "ping"}),
           "needs_insights": ("GET", "/api/v1/projects/{project_id}/insights", None)}


async def _skip_missing_features(request: pytest.FixtureRequest, dash: Dashboard) -> None:
    """``needs_chat`` / ``needs_insights``: skip while the feature's route answers 404 on this server."""
    for name, (method, path, body) in _PROBES.items():
        if request.node.get_closest_marker(name):
            project = await dash.project()
            status, _ = await dash.call(method, path.format(project_id=project.project_id), project.token, body)
            if status in (404, 405):
                pytest.skip(f"{name}: {path} answers {status} on this server (the feature is not merged yet)")


@pytest.fixture
async def dashboard(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Dashboard]:
    data = tmp_path / "data"
    data.mkdir()
    env = server_env(f"sqlite+aiosqlite:///{data / 'smartspace.db'}", data, access_log="false",
                     log_level="WARNING", admin_emails=ADMIN_EMAIL, sweep_interval_seconds="1")
    async with aiohttp.ClientSession() as http:
        dash = Dashboard(Server("server-0", env, tmp_path), http, env, tmp_path)
        try:
            await dash.server.ready(http)
            await _skip_missing_features(request, dash)
            yield dash
        except pytest.skip.Exception:
            raise
        except BaseException:
            print(f"----- server log tail -----\n{dash.server.tail()}", file=sys.stderr)
            raise
        finally:
            dash.stop()


@dataclass
class Browser:
    page: object  # playwright.async_api.Page
    errors: list[str]
    name: str
    failed: list[str]

    async def shot(self, step: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{self.name}-{step}.png"
        await self.page.screenshot(path=str(path), full_page=True)
        return path


@pytest.fixture
async def browser(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Browser]:
    from playwright.async_api import async_playwright, expect

    expect.set_options(timeout=WAIT_MS)  # the devnet and a restarted server can take a few seconds

    profile = tmp_path / f"chromium-{uuid.uuid4().hex[:8]}"
    async with async_playwright() as pw:
        context = await pw.chromium.launch_persistent_context(
            str(profile), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000})
        context.set_default_timeout(WAIT_MS)
        page = context.pages[0] if context.pages else await context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
        # A 404 from a route that is not merged yet (insights, chat) logs "Failed to load resource";
        # those are kept apart, by URL, in ``failed``. Every other console error is a finding.
        failed: list[str] = []
        page.on("console", lambda msg: errors.append(f"console {msg.type}: {msg.text}")
                if msg.type == "error" and not msg.text.startswith("Failed to load resource") else None)
        page.on("response", lambda resp: failed.append(f"{resp.status} {resp.url}") if resp.status >= 400 else None)
        try:
            yield Browser(page, errors, request.node.name.replace("/", "_"), failed)
        finally:
            with contextlib.suppress(Exception):
                await context.close()
            shutil.rmtree(profile, ignore_errors=True)


async def sign_in(browser: Browser, dash: Dashboard, email: str = ADMIN_EMAIL, password: str = PASSWORD) -> None:
    page = browser.page
    await page.goto(dash.url + "/")
    await page.get_by_test_id("login-email").fill(email)
    await page.get_by_test_id("login-password").fill(password)
    await page.get_by_test_id("login-submit").click()
    from playwright.async_api import expect

    await expect(page.get_by_test_id("live-status")).to_have_text("live")
