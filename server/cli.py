"""The ``smartspace`` command: ``serve`` and ``migrate``."""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import sys
from typing import NoReturn

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
    from server.app import create_app
    from server.logs import setup_logging
    from storage.migrate import upgrade

    setup_logging(settings.log_level)
    host = args.host or settings.host
    port = args.port if args.port is not None else settings.port
    migrate = upgrade if settings.migrate_on_start else None

    def serving(_: str) -> None:  # aiohttp calls this once every site is bound, never before
        bus = "redis" if settings.redis_url else "in-process"
        print(f"smartspace: serving on http://{host}:{port} (database "
              f"{settings.resolved_database_url.split('://')[0]}, bus {bus})", file=sys.stderr, flush=True)

    try:
        app = create_app(settings, migrate=migrate)
        web.run_app(app, host=host, port=port, access_log=None, print=serving)
    except SettingsError as exc:  # found while wiring up (SMARTSPACE_UPSTREAMS) or starting (the chain)
        _config_error(exc)
    except OSError as exc:  # the database did not answer at start-up, or the port is taken
        hint = (f"is {host}:{port} free? (SMARTSPACE_PORT / --port)" if exc.errno == errno.EADDRINUSE
                else "check SMARTSPACE_DATABASE_URL and that the database is running")
        print(f"smartspace: cannot start: {exc}; {hint}", file=sys.stderr)
        raise SystemExit(1) from None


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


def _port(raw: str) -> int:
    try:
        port = int(raw)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a TCP port between 1 and 65535")
    return port


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="smartspace", description="SmartSpace spend control plane")
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser("serve", help="run the HTTP + Socket.IO server")
    p_serve.add_argument("--host", default=None, help="bind address (default SMARTSPACE_HOST or 127.0.0.1)")
    p_serve.add_argument("--port", type=_port, default=None, help="port (default SMARTSPACE_PORT or 8080)")
    p_serve.set_defaults(func=serve)
    p_migrate = sub.add_parser("migrate", help="apply database migrations")
    p_migrate.add_argument("revision", nargs="?", default="head")
    p_migrate.set_defaults(func=migrate)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
