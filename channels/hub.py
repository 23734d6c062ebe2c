"""The Socket.IO hub: one ``AsyncServer`` on the aiohttp app, auth on connect, subscribe with replay,
and delivery of bus events to the room ``project:<id>`` of the namespace that owns each type.

Replay-then-live without loss or duplicates (DESIGN.md §9): a subscriber joins the room first and is
marked *holding*; live events for it are buffered while the log is replayed to it; then the buffer is
released (only seqs above the last replayed) and the hold removed — all on one event loop, so no event
slips between. Clients also drop any seq they have already seen.

Gaps: each process tracks, per project, the highest seq below which it has delivered everything.
Events that arrive ahead of a gap are delivered at once; if the gap is still open shortly after (Redis
dropped a message) or the bus reconnects after an outage, the missing events are read from the log and
delivered. The log, not pub/sub, is what makes delivery reliable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import socketio
from aiohttp import web

from domain.base import Actor
from domain.errors import DomainError, Forbidden, InvalidRequest
from domain.events import NAMESPACES, Event, namespace_for
from server.container import Container
from server.metrics import Metrics

log = logging.getLogger("smartspace.hub")
REPLAY_PAGE = 500
GAP_GRACE_SECONDS = 0.5
HUB = web.AppKey("hub", object)


def room(project_id: str) -> str:
    return f"project:{project_id}"


def ack_error(exc: DomainError) -> dict[str, Any]:
    """The one place domain errors become Socket.IO acks."""
    return {"ok": False, "error": {"code": exc.code, "message": exc.message}}


class _Watermark:
    """Highest seq with everything at or below delivered, plus seqs delivered ahead of a gap."""

    __slots__ = ("ahead", "gap_since", "upto")

    def __init__(self, upto: int) -> None:
        self.upto = upto
        self.ahead: set[int] = set()
        self.gap_since = 0.0

    def seen(self, seq: int) -> bool:
        return seq <= self.upto or seq in self.ahead

    def mark(self, seq: int) -> None:
        if seq <= self.upto:
            return
        self.ahead.add(seq)
        while self.upto + 1 in self.ahead:
            self.upto += 1
            self.ahead.discard(self.upto)
        if self.ahead and not self.gap_since:
            self.gap_since = time.monotonic()
        elif not self.ahead:
            self.gap_since = 0.0


class Hub:
    def __init__(self, container: Container, metrics: Metrics) -> None:
        self.container = container
        self.metrics = metrics
        self.sio = socketio.AsyncServer(async_mode="aiohttp", cors_allowed_origins="*", logger=False,
                                        engineio_logger=False, ping_interval=20, ping_timeout=20)
        # (namespace, sid, project_id) -> live events buffered while that subscriber is replayed
        self.holding: dict[tuple[str, str, str], list[Event]] = {}
        self.subscribers: dict[str, int] = {}  # project_id -> subscriptions on this process
        self.marks: dict[str, _Watermark] = {}
        self._lock = asyncio.Lock()  # one log catch-up at a time
        for namespace in NAMESPACES:
            self.sio.register_namespace(ProjectNamespace(namespace, self))
        container.bus.listen(self.deliver)
        on_resync = getattr(container.bus, "on_resync", None)
        if on_resync is not None:
            on_resync(self.catch_up_all)

    # ------------------------------------------------------------------ delivery
    async def deliver(self, event: Event) -> None:
        mark = self.marks.get(event.project_id)
        if mark is None:
            return  # nobody here subscribes to this project
        if mark.seen(event.seq):
            return
        mark.mark(event.seq)
        await self._emit_live(event)
        if mark.ahead:
            asyncio.get_running_loop().call_later(
                GAP_GRACE_SECONDS * 1.5, lambda: asyncio.ensure_future(self.catch_up(event.project_id)))

    async def _emit_live(self, event: Event) -> None:
        namespace = namespace_for(event.type)
        held = []
        for (ns, sid, project_id), buffer in self.holding.items():
            if ns == namespace and project_id == event.project_id:
                buffer.append(event)
                held.append(sid)
        await self.sio.emit(event.type, event.envelope(), room=room(event.project_id), namespace=namespace,
                            skip_sid=held or None)
        self.metrics.events_delivered.labels(namespace).inc()

    async def catch_up(self, project_id: str, *, force: bool = False) -> None:
        """Deliver from the log what this process has not delivered (a dropped or missed message)."""
        mark = self.marks.get(project_id)
        if mark is None or not (force or (mark.ahead and time.monotonic() - mark.gap_since >= GAP_GRACE_SECONDS)):
            return
        async with self._lock:
            async with self.container.reader() as scope:
                missing = await scope.store.events.since(project_id, mark.upto, REPLAY_PAGE)
            for event in missing:
                if not mark.seen(event.seq):
                    mark.mark(event.seq)
                    await self._emit_live(event)
                    self.metrics.events_replayed.labels(namespace_for(event.type)).inc()

    async def catch_up_all(self) -> None:
        for project_id in list(self.marks):
            try:
                await self.catch_up(project_id, force=True)
            except Exception:
                log.exception("catch-up from the log failed", extra={"project_id": project_id})

    # ------------------------------------------------------------------ subscriptions
    async def subscribe(self, namespace: str, sid: str, actor: Actor, project_id: str, since: int) -> int:
        async with self.container.reader(actor) as scope:
            try:
                await scope.projects.require(project_id, "viewer")
            except DomainError:
                raise Forbidden("you are not a member of this project", {"project_id": project_id}) from None
            head = await scope.store.events.head(project_id)
        latest = head[0] if head else 0
        key = (namespace, sid, project_id)
        self.holding[key] = []
        if project_id not in self.marks:
            self.marks[project_id] = _Watermark(latest)
        self.subscribers[project_id] = self.subscribers.get(project_id, 0) + 1
        await self.sio.enter_room(sid, room(project_id), namespace=namespace)
        last = since
        try:
            while True:
                async with self.container.reader() as scope:
                    page = await scope.store.events.since(project_id, last, REPLAY_PAGE)
                for event in page:
                    last = event.seq
                    if namespace_for(event.type) == namespace:
                        await self.sio.emit(event.type, event.envelope(), to=sid, namespace=namespace)
                        self.metrics.events_replayed.labels(namespace).inc()
                if len(page) < REPLAY_PAGE:
                    break
            buffer = self.holding[key]
            while buffer:
                event = buffer.pop(0)
                if event.seq > last:
                    await self.sio.emit(event.type, event.envelope(), to=sid, namespace=namespace)
                    last = event.seq
        finally:
            self.holding.pop(key, None)
        return max(last, latest)

    async def unsubscribe(self, namespace: str, sid: str, project_id: str) -> None:
        rooms = self.sio.rooms(sid, namespace=namespace)
        if room(project_id) in rooms:
            await self.sio.leave_room(sid, room(project_id), namespace=namespace)
            self._forget(project_id)

    def disconnected(self, namespace: str, sid: str, rooms: list[str]) -> None:
        for name in rooms:
            if name.startswith("project:"):
                self._forget(name.removeprefix("project:"))

    def _forget(self, project_id: str) -> None:
        left = self.subscribers.get(project_id, 0) - 1
        if left <= 0:
            self.subscribers.pop(project_id, None)
            self.marks.pop(project_id, None)
        else:
            self.subscribers[project_id] = left


class ProjectNamespace(socketio.AsyncNamespace):
    """Shared by every client of a namespace: per-client state lives in the socket session."""

    def __init__(self, namespace: str, hub: Hub) -> None:
        super().__init__(namespace)
        self.hub = hub

    async def on_connect(self, sid: str, environ: dict, auth: Any = None) -> None:
        token = auth.get("token") if isinstance(auth, dict) else None
        if not token:
            raise socketio.exceptions.ConnectionRefusedError("unauthorized")
        try:
            actor = await self.hub.container.authenticate(str(token))
        except DomainError:
            raise socketio.exceptions.ConnectionRefusedError("unauthorized") from None
        await self.save_session(sid, {"actor": actor})
        self.hub.metrics.sockets.labels(self.namespace).inc()

    async def on_disconnect(self, sid: str, reason: Any = None) -> None:
        self.hub.metrics.sockets.labels(self.namespace).dec()
        rooms = [r for r in self.hub.sio.rooms(sid, namespace=self.namespace) if r != sid]
        self.hub.disconnected(self.namespace, sid, rooms)

    async def on_subscribe(self, sid: str, data: Any = None) -> dict[str, Any]:
        try:
            project_id, since = _subscription(data)
            session = await self.get_session(sid)
            seq = await self.hub.subscribe(self.namespace, sid, session["actor"], project_id, since)
        except DomainError as exc:
            return ack_error(exc)
        return {"ok": True, "project_id": project_id, "seq": seq}

    async def on_unsubscribe(self, sid: str, data: Any = None) -> dict[str, Any]:
        try:
            project_id, _ = _subscription(data)
        except DomainError as exc:
            return ack_error(exc)
        await self.hub.unsubscribe(self.namespace, sid, project_id)
        return {"ok": True, "project_id": project_id}


def _subscription(data: Any) -> tuple[str, int]:
    if not isinstance(data, dict) or not isinstance(data.get("project_id"), str):
        raise InvalidRequest("send {project_id, since?}")
    since = data.get("since", 0) or 0
    if not isinstance(since, int) or isinstance(since, bool) or since < 0:
        raise InvalidRequest("since must be a non-negative integer seq")
    return data["project_id"], since


def attach(app: web.Application, container: Container, metrics: Metrics) -> Hub:
    hub = Hub(container, metrics)
    hub.sio.attach(app)
    app[HUB] = hub

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        yield
        with contextlib.suppress(Exception):
            await hub.sio.shutdown()

    app.cleanup_ctx.append(lifecycle)
    return hub
