"""The fan-out baseline for bench/fanout.py: a stock python-socketio ``AsyncServer`` with ``AsyncRedisManager``.

    .venv/bin/python bench/stock_sio.py --port 8101 --redis-url redis://… --channel bench-… --token …

What a plain python-socketio deployment does for the same clients: ``/budgets`` namespace, connect refused
unless ``auth.token`` is the expected one (a constant-time compare: cheaper than SmartSpace's JWT check),
``subscribe`` joins the room ``project:<id>`` and acks ``{"ok": true, "seq": 0}``. ``POST /trigger`` is the
PATCH-like cause: it numbers the event (one process receives every trigger, so numbers are gap-free),
builds an envelope shaped like SmartSpace's ``project.updated`` with ``ts`` = now, and ``sio.emit``\\ s it to
the room through the Redis manager (every process, this one included, emits it when it comes back from Redis).
"""

from __future__ import annotations

import argparse
import hmac
import itertools
import uuid
from datetime import UTC, datetime

import socketio
from aiohttp import web


def build(redis_url: str, channel: str, token: str) -> web.Application:
    manager = socketio.AsyncRedisManager(redis_url, channel=channel)
    sio = socketio.AsyncServer(async_mode="aiohttp", client_manager=manager, cors_allowed_origins="*",
                               logger=False, engineio_logger=False, ping_interval=20, ping_timeout=20)
    app = web.Application()
    sio.attach(app)
    seqs = itertools.count(1)

    @sio.on("connect", namespace="/budgets")
    async def connect(sid, environ, auth=None):
        given = auth.get("token") if isinstance(auth, dict) else None
        if not isinstance(given, str) or not hmac.compare_digest(given, token):
            raise socketio.exceptions.ConnectionRefusedError("unauthorized")
        await sio.save_session(sid, {"token": given}, namespace="/budgets")

    @sio.on("subscribe", namespace="/budgets")
    async def subscribe(sid, data=None):
        project_id = data.get("project_id") if isinstance(data, dict) else None
        if not isinstance(project_id, str):
            return {"ok": False, "error": {"code": "invalid_request", "message": "send {project_id}"}}
        await sio.enter_room(sid, f"project:{project_id}", namespace="/budgets")
        return {"ok": True, "project_id": project_id, "seq": 0}

    async def trigger(request: web.Request) -> web.Response:
        body = await request.json()
        project_id = body["project_id"]
        seq = next(seqs)
        ts = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        envelope = {"id": f"evt_{uuid.uuid4().hex}", "project_id": project_id, "seq": seq, "type": "project.updated",
                    "ts": ts, "actor": "user:usr_bench", "data": {"project": {
                        "id": project_id, "name": body.get("name", ""), "status": "active", "owner_id": "usr_bench",
                        "created_at": ts, "updated_at": ts}}}
        await sio.emit("project.updated", envelope, room=f"project:{project_id}", namespace="/budgets")
        return web.json_response({"ok": True, "seq": seq})

    async def ready(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app.router.add_post("/trigger", trigger)
    app.router.add_get("/ready", ready)
    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--redis-url", required=True)
    ap.add_argument("--channel", required=True)
    ap.add_argument("--token", required=True)
    args = ap.parse_args()
    web.run_app(build(args.redis_url, args.channel, args.token), host=args.host, port=args.port,
                access_log=None, print=None)


if __name__ == "__main__":
    main()
