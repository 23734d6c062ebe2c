"""The ``smartspace`` command: ``serve``, ``migrate`` and ``demo``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import os
import signal
import sys
from typing import NoReturn

import msgspec
from aiohttp import web

from server.settings import Settings, SettingsError, load_settings


def _settings_or_exit() -> Settings:
    try:
        return load_settings()
    except SettingsError as exc:
        _config_error(exc)


def _config_error(exc: SettingsError) -> NoReturn:
    """One line on stderr naming the variable and what it expects; exit status 2."""
    line = " ".join(str(exc).split())
    print(f"smartspace: configuration error: {line}", file=sys.stderr, flush=True)
    raise SystemExit(2) from None


def serve(args: argparse.Namespace) -> None:
    settings = _settings_or_exit()
    import storage.migrate  # noqa: F401 - before logging is set up: alembic logs its plugins at INFO on import
    from server.logs import setup_logging

    setup_logging(settings.log_level)
    host = args.host or settings.host
    port = args.port if args.port is not None else settings.port
    workers = args.workers
    if workers > 1:
        if not settings.redis_url:
            _exit("--workers needs SMARTSPACE_REDIS_URL: each worker is its own process, and events reach "
                  "the others' sockets through Redis")
        if not settings.resolved_database_url.startswith("postgresql"):
            _exit("--workers needs PostgreSQL (SMARTSPACE_DATABASE_URL): SQLite has one writer per file")
    # Printed by the (first) worker once its port is bound, never before.
    database = settings.resolved_database_url.split("://")[0]
    banner = (f"smartspace: serving on http://{host}:{port} (database {database}, "
              f"bus {'redis' if settings.redis_url else 'in-process'}{f', {workers} workers' if workers > 1 else ''})")
    if workers == 1:
        _run_worker(settings, host, port, 0, migrate_here=settings.migrate_on_start, reuse_port=False, banner=banner)
        return
    if settings.migrate_on_start:  # once, before any worker starts
        _migrate_once(settings)
    _supervise(settings, host, port, workers, banner)


def _exit(message: str, code: int = 2) -> None:
    print(f"smartspace: {message}", file=sys.stderr)
    raise SystemExit(code)


def _run_worker(settings: Settings, host: str, port: int, index: int, *, migrate_here: bool, reuse_port: bool,
                banner: str | None = None) -> None:
    from server.app import create_app
    from server.metrics import METRICS
    from storage.migrate import upgrade

    def bound(_: str) -> None:  # aiohttp calls this once every site is bound
        if banner:
            print(banner, file=sys.stderr, flush=True)

    try:
        app = create_app(settings, migrate=upgrade if migrate_here else None)
        app[METRICS].worker.labels(str(index), str(os.getpid())).set(1)
        web.run_app(app, host=host, port=port, access_log=None, print=bound, reuse_port=reuse_port or None)
    except SettingsError as exc:  # found while wiring up (SMARTSPACE_UPSTREAMS) or starting (the chain)
        _config_error(exc)
    except OSError as exc:  # the database did not answer at start-up, or the port is taken
        hint = (f"is {host}:{port} free? (SMARTSPACE_PORT / --port)" if exc.errno == errno.EADDRINUSE
                else "check SMARTSPACE_DATABASE_URL and that the database is running")
        print(f"smartspace: cannot start: {exc}; {hint}", file=sys.stderr)
        raise SystemExit(1) from None


def _migrate_once(settings: Settings) -> None:
    from storage.db import Database
    from storage.migrate import upgrade

    async def run() -> None:
        db = Database(settings.resolved_database_url)
        try:
            await upgrade(db)
        finally:
            await db.dispose()

    try:
        asyncio.run(run())
    except OSError as exc:
        _exit(f"cannot reach the database ({exc}); check SMARTSPACE_DATABASE_URL", 1)


def _supervise(settings: Settings, host: str, port: int, workers: int, banner: str) -> None:
    """Fork ``workers`` processes that each serve the same port (SO_REUSEPORT: the kernel spreads new connections
    over them), each with its own event loop, database pool and bus connection; the payments worker runs in the
    first only. SIGTERM/SIGINT go to every worker; if one dies, the others are stopped and the exit code is
    non-zero (a supervisor restarts the whole)."""
    children: dict[int, int] = {}
    for index in range(workers):
        pid = os.fork()
        if pid == 0:
            _die_with_parent()
            worker_settings = settings if index == 0 else msgspec.structs.replace(settings, chain_worker=False)
            code = 0
            try:
                _run_worker(worker_settings, host, port, index, migrate_here=False, reuse_port=True,
                            banner=banner if index == 0 else None)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                logging.getLogger("smartspace.cli").exception("worker failed")
                code = 1
            os._exit(code)
        children[pid] = index
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    failed = 0
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        worker = children.pop(pid, None)
        code = os.waitstatus_to_exitcode(status)
        if not stopping:
            print(f"smartspace: worker {worker} (pid {pid}) exited with {code}; stopping the others", file=sys.stderr)
            failed = failed or code or 1
            stop(signal.SIGTERM, None)
    raise SystemExit(failed)


def _die_with_parent() -> None:
    """Linux: a worker gets SIGTERM if the supervisor dies (no orphaned workers holding the port)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def migrate(args: argparse.Namespace) -> None:
    settings = _settings_or_exit()
    from storage.db import Database
    from storage.migrate import current, upgrade

    async def run() -> None:
        db = Database(settings.resolved_database_url)
        try:
            print(f"smartspace: migrating {db.url.render_as_string(hide_password=True)} …", file=sys.stderr)
            await upgrade(db, args.revision)
            print(f"smartspace: database at revision {await current(db)}", file=sys.stderr)
        except OSError as exc:
            print(f"smartspace: cannot reach the database ({exc}); check SMARTSPACE_DATABASE_URL",
                  file=sys.stderr)
            raise SystemExit(1) from None
        finally:
            await db.dispose()

    logging.basicConfig(level=logging.WARNING)
    asyncio.run(run())


def demo(args: argparse.Namespace) -> None:
    from server.demo import DemoError, run

    url = args.url
    if url is None:
        settings = _settings_or_exit()
        url = f"http://{settings.host}:{settings.port}"
    try:
        raise SystemExit(asyncio.run(run(url, args.duration, serve=not args.no_serve,
                                         keep_serving=not args.exit, seed=args.seed,
                                         approval_wait=args.approval_wait)))
    except DemoError as exc:
        print(f"\nsmartspace demo: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        print("\nsmartspace demo: stopped", file=sys.stderr)
        raise SystemExit(130) from None


def _within(cast: type, low: float, high: float, what: str):
    """An argparse type: ``cast(raw)`` between ``low`` and ``high``, else a message naming ``what``."""

    def parse(raw: str):
        try:
            value = cast(raw)
        except ValueError:
            value = low - 1
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{raw!r} is not {what} between {low} and {high}")
        return value

    return parse


_port = _within(int, 1, 65535, "a TCP port")
_seconds = _within(float, 1, 86_400, "a number of seconds")
_wait = _within(int, 0, 300, "a number of seconds")


def _workers(raw: str) -> int:
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if not 1 <= n <= 64:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a number of workers between 1 and 64")
    return n


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="smartspace", description="SmartSpace spend control plane")
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser("serve", help="run the HTTP + Socket.IO server")
    p_serve.add_argument("--host", default=None, help="bind address (default SMARTSPACE_HOST or 127.0.0.1)")
    p_serve.add_argument("--port", type=_port, default=None, help="port (default SMARTSPACE_PORT or 8080)")
    p_serve.add_argument("--workers", type=_workers, default=1,
                         help="worker processes sharing the port (SO_REUSEPORT; needs PostgreSQL and Redis)")
    p_serve.set_defaults(func=serve)
    p_migrate = sub.add_parser("migrate", help="apply database migrations")
    p_migrate.add_argument("revision", nargs="?", default="head")
    p_migrate.set_defaults(func=migrate)
    p_demo = sub.add_parser("demo", help="a demo project with simulated agent traffic, for the dashboard")
    p_demo.add_argument("--url", default=None, help="the server (default http://SMARTSPACE_HOST:SMARTSPACE_PORT); "
                        "started here when none answers")
    p_demo.add_argument("--duration", type=_seconds, default=90.0, help="seconds of traffic (default 90)")
    p_demo.add_argument("--no-serve", action="store_true", help="fail instead of starting a server")
    p_demo.add_argument("--exit", action="store_true", help="stop a server it started when the traffic ends")
    p_demo.add_argument("--seed", type=int, default=None, help="random seed for the traffic")
    p_demo.add_argument("--approval-wait", type=_wait, default=20, metavar="SECONDS",
                        help="how long every other held request waits for a person to approve it (default 20)")
    p_demo.set_defaults(func=demo)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
