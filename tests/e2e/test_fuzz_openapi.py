"""Schemathesis over the whole OpenAPI document of a real ``smartspace serve``: every operation, the
examples, coverage, fuzzing and stateful phases, once with a user's access token and once with a
project's ``sk-`` key, on SQLite and (when SMARTSPACE_TEST_DATABASE_URL is set) on PostgreSQL.

The server must never answer 5xx, never log an unhandled error, and its books must still hold after
thousands of hostile requests: the audit chain verifies and the wallet's balance is the sum of its ledger.

``make test`` runs a bounded form (SMARTSPACE_FUZZ_EXAMPLES, default 15 per operation and phase);
``make fuzz`` runs the same with more examples. The figures (cases generated, failures, events appended)
are printed for the record.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from domain.identity import KEY_SCOPES
from tests.e2e.procs import Server, fresh_database, server_env

PG_URL = os.environ.get("SMARTSPACE_TEST_DATABASE_URL", "")
EXAMPLES = int(os.environ.get("SMARTSPACE_FUZZ_EXAMPLES", "15"))
SEED = os.environ.get("SMARTSPACE_FUZZ_SEED", "")
ADMIN = "fuzz-admin@smartspace.test"
SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")
BACKENDS = ["sqlite"] + (["postgresql"] if PG_URL.startswith("postgresql") else [])

pytestmark = [pytest.mark.e2e, pytest.mark.fuzz]


class Api:
    def __init__(self, server: Server, http: aiohttp.ClientSession) -> None:
        self.server, self.http = server, http

    async def call(self, method: str, path: str, token: str | None = None, **kw) -> tuple[int, dict]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with self.http.request(method, self.server.url + path, headers=headers, **kw) as resp:
            return resp.status, await resp.json(content_type=None)


def schemathesis(url: str, token: str, report: Path) -> tuple[int, str]:
    """Run the schemathesis CLI against ``url`` with ``token``; its exit code and output."""
    args = [str(SCHEMATHESIS), "run", f"{url}/api/v1/openapi.json", "--url", url,
            "--header", f"Authorization: Bearer {token}",
            "--checks", "not_a_server_error",
            "--phases", "examples,coverage,fuzzing,stateful",
            "--max-examples", str(EXAMPLES), "--continue-on-failure", "--no-color",
            "--request-timeout", "30", "--report", "junit", "--report-dir", str(report)]
    if SEED:
        args += ["--seed", SEED]
    # cwd: schemathesis keeps its crash cache in .schemathesis/ of the working directory, not in the repo
    done = subprocess.run(args, cwd=report.parent, capture_output=True, text=True, timeout=900)
    return done.returncode, done.stdout + done.stderr


def figures(output: str) -> str:
    found = re.search(r"Test cases:\s*\n\s*(.+)", output)
    return found.group(1).strip() if found else "no summary"


async def _books_hold(api: Api, token: str, project_id: str) -> int:
    status, verify = await api.call("GET", f"/api/v1/projects/{project_id}/audit/verify", token)
    assert status == 200 and verify["ok"], verify
    status, wallet = await api.call("GET", f"/api/v1/projects/{project_id}/wallet", token)
    assert status == 200, wallet
    assert wallet["available_micros"] == wallet["balance_micros"] - wallet["reserved_micros"]
    assert wallet["balance_micros"] >= 0 and wallet["reserved_micros"] >= 0
    return verify["checked"]


@pytest.mark.parametrize("backend", BACKENDS)
async def test_no_operation_answers_5xx_to_generated_requests(backend: str, tmp_path: Path) -> None:
    if not SCHEMATHESIS.exists():
        pytest.fail(f"{SCHEMATHESIS} is missing: run `make install` (schemathesis is a dev dependency)")
    database = f"sqlite+aiosqlite:///{tmp_path / 'fuzz.db'}" if backend == "sqlite" else None
    async with aiohttp.ClientSession() as http:
        if database is None:
            async with fresh_database(PG_URL, prefix="smartspace_fuzz_") as url:
                await _fuzz(http, str(url.render_as_string(hide_password=False)), tmp_path, backend)
        else:
            await _fuzz(http, database, tmp_path, backend)


async def _fuzz(http: aiohttp.ClientSession, database: str, tmp_path: Path, backend: str) -> None:
    env = server_env(database, tmp_path / "data", admin_emails=ADMIN, access_log="false", log_level="WARNING")
    server = Server(f"fuzz-{backend}", env, tmp_path)
    try:
        await server.ready(http)
        api = Api(server, http)
        status, registered = await api.call("POST", "/api/v1/auth/register",
                                            json={"email": ADMIN, "password": "correct horse", "name": "Fuzz"})
        assert status == 201, registered
        token = registered["access_token"]
        _, projects = await api.call("GET", "/api/v1/projects", token)
        project_id = projects["items"][0]["id"]
        # Every read scope, so the key's run reaches what a key can reach at most.
        status, key = await api.call("POST", f"/api/v1/projects/{project_id}/keys", token,
                                     json={"name": "fuzz", "scopes": list(KEY_SCOPES)})
        assert status == 201, key
        status, _ = await api.call("POST", f"/api/v1/admin/projects/{project_id}/credits", token,
                                   json={"amount_micros": 50_000_000, "reason": "fuzz"})
        assert status == 201
        before = await _books_hold(api, token, project_id)

        report: list[str] = []
        for who, credential in (("user token", token), ("sk- key", key["key"])):
            code, output = schemathesis(server.url, credential, tmp_path / who.replace(" ", "_"))
            report.append(f"{backend}, {who}: {figures(output)}")
            assert "Server error" not in output, output[-6000:]
            assert code == 0, output[-6000:]
            assert server.proc.poll() is None, f"the server died:\n{server.tail()}"

        status, health = await api.call("GET", "/health")
        assert status == 200, health
        # The user may have been renamed or its project deleted by the run; log in again to read the books.
        status, login = await api.call("POST", "/api/v1/auth/token", json={"email": ADMIN, "password": "correct horse"})
        if status == 200:
            token = login["access_token"]
        status, _ = await api.call("GET", f"/api/v1/projects/{project_id}", token)
        if status == 200:
            after = await _books_hold(api, token, project_id)
            books = f"audit events {before} -> {after}, chain verified, wallet consistent"
        else:  # the stateful phase may delete the project it was given
            books = f"the first project was deleted by the run (answer {status})"
        log = server.log_path.read_text(errors="replace")
        assert "unhandled error" not in log, log[-6000:]
        print("\n".join(report) + f"\n{backend}: {books}", file=sys.stderr)
    finally:
        server.stop()
