"""Real processes for the end-to-end tests (and bench/): fresh PostgreSQL databases, free ports and
``smartspace serve`` subprocesses (started in their own session, logs to a file, stopped with killpg).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import asyncpg
from sqlalchemy.engine import URL, make_url

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 90.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def asyncpg_dsn(url: URL | str) -> str:
    """A SQLAlchemy URL (any PostgreSQL driver) as a plain DSN asyncpg accepts."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def _on_server(server: URL | str, statement: str) -> None:
    admin = await asyncpg.connect(asyncpg_dsn(server))
    try:
        await admin.execute(statement)
    finally:
        await admin.close()


async def create_database(server: URL | str, name: str) -> URL:
    """Create database ``name`` on the server of ``server`` (a URL to any database there); its URL."""
    await _on_server(server, f'CREATE DATABASE "{name}"')
    return make_url(server).set(database=name)


async def drop_database(server: URL | str, name: str) -> None:
    await _on_server(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.asynccontextmanager
async def fresh_database(server: URL | str, prefix: str = "smartspace_e2e_") -> AsyncIterator[URL]:
    """A uniquely named database on the server of ``server``, dropped at the end (even if something failed)."""
    name = f"{prefix}{uuid.uuid4().hex[:12]}"
    url = await create_database(server, name)
    try:
        yield url
    finally:
        await drop_database(server, name)


def server_env(database: URL | str, data_dir: Path, **settings: str) -> dict[str, str]:
    """This process's environment without any SMARTSPACE_* variable, plus the database, a fresh JWT secret,
    the data directory and ``settings`` (``log_level="INFO"`` → ``SMARTSPACE_LOG_LEVEL=INFO``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMARTSPACE_")}
    env.update(SMARTSPACE_DATABASE_URL=make_url(database).render_as_string(hide_password=False),
               SMARTSPACE_JWT_SECRET="e2e-" + uuid.uuid4().hex * 2, SMARTSPACE_DATA_DIR=str(data_dir),
               PYTHONUNBUFFERED="1")
    env.update({f"SMARTSPACE_{k.upper()}": v for k, v in settings.items()})
    return env


async def migrate(env: dict[str, str], within: float = 120.0) -> None:
    """``smartspace migrate`` with ``env``; fails with its output if it does not succeed."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server.cli", "migrate", cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        output, _ = await asyncio.wait_for(proc.communicate(), within)
    except TimeoutError:
        proc.kill()
        raise
    assert proc.returncode == 0, output.decode(errors="replace")


class Server:
    """One ``smartspace serve`` subprocess on a free loopback port, in its own session, logging to
    ``logs/<name>.log``."""

    def __init__(self, name: str, env: dict[str, str], logs: Path, ready_path: str = "/ready",
                 port: int | None = None, *, cwd: Path = ROOT, args: tuple[str, ...] = ()) -> None:
        self.name = name
        self.ready_path = ready_path
        self.port = port or free_port()  # a given port: a restart where clients expect the same address
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = logs / f"{name}.log"
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port), *args],
            cwd=cwd, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    async def ready(self, http: aiohttp.ClientSession, within: float = START_TIMEOUT) -> None:
        """Wait until ``ready_path`` answers 200; fail with the log tail if the process exits or time runs out."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with http.get(self.url + self.ready_path, timeout=aiohttp.ClientTimeout(total=5)) as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.1)
        raise AssertionError(f"{self.name} was not ready within {within}s:\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(15)
        self._log.close()


@contextlib.asynccontextmanager
async def serving(names: list[str], env: dict[str, str], logs: Path, http: aiohttp.ClientSession,
                  ready_path: str = "/ready") -> AsyncIterator[list[Server]]:
    """Migrate, then one ready ``Server`` per name; on any failure their log tails go to stderr; all are
    stopped at the end."""
    servers: list[Server] = []
    try:
        await migrate(env)
        for name in names:
            servers.append(Server(name, env, logs, ready_path))
        for server in servers:
            await server.ready(http)
        yield servers
    except BaseException:
        for server in servers:
            print(f"----- {server.name} log tail -----\n{server.tail()}", file=sys.stderr)
        raise
    finally:
        for server in servers:
            server.stop()
