"""The Socket.IO hub: one ``AsyncServer`` on the aiohttp app, auth on connect, subscribe with replay,
and delivery of bus events to the room ``project:<id>`` of the namespace that owns each type.

In order, once (per process, per project): a :class:`_Stream` records ``upto``, the seq up to which
every event has been emitted to the project's rooms, in seq order. An event that arrives ahead of a
gap (concurrent writers publish out of order; Redis may drop a message) waits in ``ahead`` until the
gap fills from the bus, or — after ``GAP_GRACE_SECONDS`` — from the log. An event at or below ``upto``
is a duplicate and is dropped. When the bus reconnects after an outage it asks for a resync: every
stream reads what it has not emitted from the log. The log, not pub/sub, makes delivery reliable.

Fast (bench/fanout.py, bench/README.md): the bus listener only files the event and returns, so neither the
publishing request nor the Redis reader waits for a broadcast; one drainer task per project emits its events
in order. An event is encoded once per process (msgspec, the Socket.IO v4 text packet inside one engine.io
packet) and that same packet is put on each recipient socket's send queue, in steps of ``FANOUT_CHUNK``
recipients with the loop free in between — no task per recipient, no binary scan.

Replay-then-live without loss or duplicates (DESIGN.md §9): a subscriber is marked *holding* and
joins the room before anything is read; live events for it are buffered while the log is replayed to
it; then the buffer is released (only seqs above the last replayed) and the hold removed — all on
one event loop, so no event slips between. Clients also drop any seq they have already seen.

Access follows the log: each subscribe re-checks the connection's token and the membership; a
``member.removed`` takes that user's sockets out of the project's rooms and a ``key.revoked``
disconnects that key's sockets (on every process, since every process sees every event).

Per-client state lives in the socket session and room membership; the hub itself keeps only the
streams (one per subscribed project) and the hold buffers of subscribes in progress.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import msgspec
import socketio
from aiohttp import web
from engineio import packet as eio_packet

from domain.base import Actor
from domain.errors import DomainError, Forbidden, InvalidRequest, Unavailable
from domain.events import NAMESPACES, Event, namespace_for
from domain.identity import require_key_scope
from domain.inputs import SocketJson, nul_message, nul_path
from domain.ports import HubMetrics, Units

log = logging.getLogger("smartspace.hub")
REPLAY_PAGE = 500
GAP_GRACE_SECONDS = 0.5
# How often each watched project's log tail is read: catches an event whose publisher died between
# commit and publish when no later event arrives to reveal the gap.
TAIL_CHECK_SECONDS = 5.0
HUB = web.AppKey("hub", object)
_REVOKING = frozenset({"member.removed", "key.revoked"})  # events after which some subscribers must go
# Recipients queued per step of a broadcast; between steps the loop runs other work (requests, the bus).
FANOUT_CHUNK = 256
_wire = msgspec.json.Encoder()


def _ts_epoch(ts: str) -> float:
    try:
        return datetime.fromisoformat(ts).timestamp()
    except ValueError:
        return time.time()


def room(project_id: str) -> str:
    return f"project:{project_id}"


def ack_error(exc: DomainError) -> dict[str, Any]:
    """The one place domain errors become Socket.IO acks."""
    return {"ok": False, "error": {"code": exc.code, "message": exc.message}}


class _Stream:
    """One project's live delivery on this process."""

    __slots__ = ("ahead", "drainer", "gap_since", "upto")

    def __init__(self) -> None:
        self.upto: int | None = None  # None until the first subscriber has read the log's head
        self.ahead: dict[int, Event] = {}
        self.gap_since = 0.0
        self.drainer: asyncio.Task[None] | None = None  # the one task emitting this project's events, if any

    def seen(self, seq: int) -> bool:
        return (self.upto is not None and seq <= self.upto) or seq in self.ahead


class _Server(socketio.AsyncServer):
    """A packet that does not decode (malformed, or nested past ``MAX_DEPTH``) closes its connection, as the
    JavaScript server's "parse error" does, instead of an error logged with a traceback per packet."""

    async def _handle_eio_message(self, eio_sid: str, data: Any) -> None:
        try:
            await super()._handle_eio_message(eio_sid, data)
        except ValueError as exc:
            log.info("undecodable Socket.IO packet: connection closed", extra={"reason": str(exc)[:200]})
            socket = self.eio.sockets.get(eio_sid)
            await self.eio.disconnect(eio_sid)  # Engine.IO's close packet, then the session is gone
            if socket is not None:
                await socket.queue.put(None)  # and the transport too, not when the client gets round to it


class Hub:
    def __init__(self, container: Units, metrics: HubMetrics) -> None:
        self.container = container
        self.metrics = metrics
        # json=: every packet is depth-checked before it is parsed (a deep one is a ValueError: _Server).
        self.sio = _Server(async_mode="aiohttp", cors_allowed_origins="*", logger=False, engineio_logger=False,
                           ping_interval=20, ping_timeout=20, json=SocketJson)
        # (namespace, sid, project_id, n) -> live events buffered while that subscriber is replayed
        self.holding: dict[tuple[str, str, str, int], list[Event]] = {}
        self.streams: dict[str, _Stream] = {}
        self._ids = itertools.count()
        self._holds = 0  # subscribes begun so far (a broadcast in steps notices new ones)
        self._pending: set[asyncio.TimerHandle | asyncio.Future] = set()  # gap look-ups, stopped by close()
        self._closed = False
        self.tail_check_seconds = TAIL_CHECK_SECONDS
        for namespace in NAMESPACES:
            self.sio.register_namespace(ProjectNamespace(namespace, self))
        container.bus.listen(self.deliver)
        container.bus.on_resync(self.catch_up_all)

    # ------------------------------------------------------------------ delivery
    async def deliver(self, event: Event) -> None:
        """A bus listener: note the event and return at once. The project's drainer emits it (in seq order), so
        neither the publishing request nor the Redis reader waits for a broadcast."""
        stream = self.streams.get(event.project_id)
        if stream is None or stream.seen(event.seq):
            return  # nobody here subscribes to this project, or already delivered
        stream.ahead[event.seq] = event
        self._kick(event.project_id, stream)

    def _kick(self, project_id: str, stream: _Stream) -> None:
        """Make sure the project's drainer runs (one per project: its events go out one after another)."""
        if stream.drainer is None and not self._closed:
            stream.drainer = asyncio.get_running_loop().create_task(self._drain(project_id, stream))
            self._pending.add(stream.drainer)
            stream.drainer.add_done_callback(self._pending.discard)
            stream.drainer.add_done_callback(_log_failure)

    async def _drain(self, project_id: str, stream: _Stream) -> None:
        """Emit what is next in seq order; note (and schedule a look at) a gap that remains."""
        try:
            while stream.upto is not None and stream.upto + 1 in stream.ahead:
                stream.upto += 1
                event = stream.ahead.pop(stream.upto)
                await self._emit_live(event)
                if event.type in _REVOKING:
                    await self._revoke(event)
        finally:
            stream.drainer = None
        if stream.upto is not None and stream.upto + 1 in stream.ahead:
            self._kick(project_id, stream)  # arrived as the loop ended
        elif stream.ahead and not stream.gap_since:
            stream.gap_since = time.monotonic()
            self._look_later(project_id)
        elif not stream.ahead:
            stream.gap_since = 0.0

    def _look_later(self, project_id: str) -> None:
        if self._closed:
            return
        handle: asyncio.TimerHandle

        def spawn() -> None:
            self._pending.discard(handle)
            if self._closed:
                return
            task = asyncio.ensure_future(self.catch_up(project_id))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)
            task.add_done_callback(_log_failure)

        handle = asyncio.get_running_loop().call_later(GAP_GRACE_SECONDS, spawn)
        self._pending.add(handle)

    async def close(self) -> None:
        """Stop gap look-ups (before the database goes away)."""
        self._closed = True
        for item in list(self._pending):
            item.cancel()
        tasks = [t for t in self._pending if isinstance(t, asyncio.Future)]
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        self._pending.clear()

    def _packet(self, namespace: str, event: Event) -> eio_packet.Packet:
        """The event as one engine.io MESSAGE, encoded once (msgspec) and shared by every recipient: its text is
        the Socket.IO v4 EVENT packet ``2<namespace>,["<type>",<envelope>]``. Envelopes are JSON (no binary)."""
        body = _wire.encode([event.type, event.envelope()]).decode()
        pkt = eio_packet.Packet(eio_packet.MESSAGE, f"2{namespace},{body}")
        pkt.encode()  # fills the packet's cache: each socket's writer sends the same string
        return pkt

    def _queue(self, namespace: str, sid: str, eio_sid: str | None, pkt: eio_packet.Packet) -> None:
        """Hand a packet to a client's engine.io socket: its writer task sends the queue in order."""
        if eio_sid is None:
            eio_sid = self.sio.manager.eio_sid_from_sid(sid, namespace)
        socket = self.sio.eio.sockets.get(eio_sid) if eio_sid is not None else None
        if socket is not None and not socket.closed:
            socket.queue.put_nowait(pkt)

    async def _emit_live(self, event: Event) -> None:
        namespace = namespace_for(event.type)
        held = set()
        for (ns, sid, project_id, _), buffer in self.holding.items():
            if ns == namespace and project_id == event.project_id:
                buffer.append(event)
                held.add(sid)
        # Who gets it is fixed now: a subscriber joining from here on holds and replays it from the log.
        recipients = [p for p in self.sio.manager.get_participants(namespace, room(event.project_id))
                      if p[0] not in held]
        if recipients:
            pkt = self._packet(namespace, event)
            for i in range(0, len(recipients), FANOUT_CHUNK):
                if i:
                    holds = self._holds
                    await asyncio.sleep(0)  # let requests and the bus reader in between steps of a broadcast
                    if self._holds != holds:  # someone began subscribing meanwhile: their replay has this event
                        held = {k[1] for k in self.holding if k[0] == namespace and k[2] == event.project_id}
                for sid, eio_sid in recipients[i:i + FANOUT_CHUNK]:
                    if sid not in held:
                        self._queue(namespace, sid, eio_sid, pkt)
        self.metrics.events_delivered.labels(namespace).inc()
        self.metrics.live_lag.observe(max(0.0, time.time() - _ts_epoch(event.ts)))

    def _send(self, namespace: str, sid: str, event: Event) -> None:
        self._queue(namespace, sid, None, self._packet(namespace, event))

    async def _revoke(self, event: Event) -> None:
        """A removed member leaves the project's rooms; a revoked key's sockets are disconnected. Each still
        gets the event that told them."""
        data = event.data
        for namespace in NAMESPACES:
            for sid, _ in list(self.sio.manager.get_participants(namespace, room(event.project_id))):
                try:
                    actor = (await self.sio.get_session(sid, namespace=namespace))["actor"]
                except (KeyError, TypeError):
                    continue
                if event.type == "member.removed" and actor.kind == "user" and actor.user_id == data.get("user_id"):
                    await self.sio.leave_room(sid, room(event.project_id), namespace=namespace)
                elif event.type == "key.revoked" and actor.kind == "key" and actor.id == data.get("key_id"):
                    await self.sio.disconnect(sid, namespace=namespace)
        self._drop_if_unused(event.project_id)

    async def catch_up(self, project_id: str, *, force: bool = False) -> None:
        """Emit from the log what this process has not emitted (a message dropped, late or missed)."""
        stream = self.streams.get(project_id)
        if stream is None or stream.upto is None:
            return
        if not force and not (stream.ahead and time.monotonic() - stream.gap_since >= GAP_GRACE_SECONDS * 0.9):
            if stream.ahead:  # the gap opened again since: look later
                self._look_later(project_id)
            return
        cursor = stream.upto
        while True:
            async with self.container.reader() as scope:
                missing = await scope.store.events.since(project_id, cursor, REPLAY_PAGE)
            if self.streams.get(project_id) is not stream:
                return  # everyone left meanwhile
            recovered = [e for e in missing if not stream.seen(e.seq)]
            for event in recovered:
                stream.ahead[event.seq] = event
            if recovered:
                log.info("recovered events from the log", extra={"project_id": project_id,
                                                                 "events": len(recovered)})
                for event in recovered:
                    self.metrics.events_replayed.labels(namespace_for(event.type)).inc()
            stream.gap_since = 0.0
            self._kick(project_id, stream)
            if len(missing) < REPLAY_PAGE:
                return
            cursor = missing[-1].seq

    async def check_tails(self) -> None:
        """Forever: read each watched project's log past what was emitted (see TAIL_CHECK_SECONDS)."""
        while not self._closed:
            await asyncio.sleep(self.tail_check_seconds)
            await self.catch_up_all()

    async def catch_up_all(self) -> None:
        for project_id in list(self.streams):
            try:
                await self.catch_up(project_id, force=True)
            except Exception:
                log.exception("catch-up from the log failed", extra={"project_id": project_id})

    # ------------------------------------------------------------------ subscriptions
    async def subscribe(self, namespace: str, sid: str, actor: Actor, project_id: str, since: int,
                        token: str | None = None) -> int:
        # Hold first, then join, then read: nothing committed from here on can slip past this subscriber. The
        # token's re-check (a revoked key, a deleted user), the membership check, the log's head and the first
        # replay page are one read; until it passes, what the room carries only goes to this subscriber's hold
        # buffer, which a refusal discards.
        key = (namespace, sid, project_id, next(self._ids))
        self.holding[key] = []
        self._holds += 1
        stream = self.streams.setdefault(project_id, _Stream())
        try:
            await self.sio.enter_room(sid, room(project_id), namespace=namespace)
            if not self.sio.manager.is_connected(sid, namespace):
                raise Forbidden("the connection is closing")
            async with self.container.reader(actor) as scope:
                if token is not None:
                    actor = await self.container.authenticate(token, count_use=False, scope=scope)
                require_key_scope(actor, "audit:read")  # a key's live events are its project's log
                try:
                    await scope.projects.require(project_id, "viewer")
                except DomainError:
                    raise Forbidden("you are not a member of this project", {"project_id": project_id}) from None
                head = await scope.store.events.head(project_id)
                page = await scope.store.events.since(project_id, since, REPLAY_PAGE)
            latest = top = head[0] if head else 0
            if stream.upto is None:
                # Everything up to the head is in the log, and every member of the room is still holding.
                stream.upto = latest
                for seq in [s for s in stream.ahead if s <= latest]:
                    del stream.ahead[seq]
                self._kick(project_id, stream)
            last = since
            while True:
                for event in page:
                    last = event.seq
                    top = max(top, last)
                    if namespace_for(event.type) == namespace:
                        self._send(namespace, sid, event)
                        self.metrics.events_replayed.labels(namespace).inc()
                if len(page) < REPLAY_PAGE:
                    break
                async with self.container.reader() as scope:
                    page = await scope.store.events.since(project_id, last, REPLAY_PAGE)
            buffer = self.holding[key]
            while buffer:
                event = buffer.pop(0)
                if event.seq > last:
                    self._send(namespace, sid, event)
                    last = event.seq
                    top = max(top, last)
        except BaseException:
            with contextlib.suppress(Exception):
                await self.sio.leave_room(sid, room(project_id), namespace=namespace)
            raise
        finally:
            del self.holding[key]
            self._drop_if_unused(project_id)
        return top

    async def unsubscribe(self, namespace: str, sid: str, project_id: str) -> None:
        await self.sio.leave_room(sid, room(project_id), namespace=namespace)
        self._drop_if_unused(project_id)

    def disconnected(self, namespace: str, sid: str, rooms: list[str]) -> None:
        for name in rooms:
            if name.startswith("project:"):
                self._drop_if_unused(name.removeprefix("project:"), leaving=(namespace, sid))

    def _drop_if_unused(self, project_id: str, leaving: tuple[str, str] | None = None) -> None:
        """A stream lives while a connected client is in one of the project's rooms or subscribing."""
        if project_id not in self.streams or any(k[2] == project_id for k in self.holding):
            return
        manager = self.sio.manager
        for namespace in NAMESPACES:
            for sid, _ in manager.get_participants(namespace, room(project_id)):
                if (namespace, sid) != leaving and manager.is_connected(sid, namespace):
                    return
        del self.streams[project_id]


def _log_failure(task: asyncio.Future) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("catch-up from the log failed", exc_info=task.exception())


class ProjectNamespace(socketio.AsyncNamespace):
    """Shared by every client of a namespace: per-client state lives in the socket session."""

    def __init__(self, namespace: str, hub: Hub) -> None:
        super().__init__(namespace)
        self.hub = hub

    async def trigger_event(self, event: str, *args: Any) -> Any:
        """Every event of every namespace passes here first: a NUL in any string of its payload is refused
        with ``invalid_request`` naming the field, before any handler (PostgreSQL cannot take it)."""
        if event not in ("connect", "disconnect") and len(args) > 1:
            path = nul_path(args[1] if len(args) == 2 else list(args[1:]))
            if path is not None:
                field = "payload" if path == "$" else path
                return ack_error(InvalidRequest(nul_message(field), {"field": field}))
        return await super().trigger_event(event, *args)

    async def on_connect(self, sid: str, environ: dict, auth: Any = None) -> None:
        token = auth.get("token") if isinstance(auth, dict) else None
        if not token:
            raise socketio.exceptions.ConnectionRefusedError("unauthorized")
        try:
            actor = await self.hub.container.authenticate(str(token), count_use=False)  # a read, no write
        except DomainError:
            raise socketio.exceptions.ConnectionRefusedError("unauthorized") from None
        except Exception:
            log.exception("socket authentication failed")
            raise socketio.exceptions.ConnectionRefusedError("unavailable") from None
        # The token stays in the session so each subscribe re-checks it (a revoked key, a deleted user).
        await self.save_session(sid, {"actor": actor, "token": str(token)})
        self.hub.metrics.sockets.labels(self.namespace).inc()

    async def on_disconnect(self, sid: str, reason: Any = None) -> None:
        self.hub.metrics.sockets.labels(self.namespace).dec()
        rooms = [r for r in self.hub.sio.rooms(sid, namespace=self.namespace) if r != sid]
        self.hub.disconnected(self.namespace, sid, rooms)

    async def on_subscribe(self, sid: str, data: Any = None) -> dict[str, Any]:
        try:
            project_id, since = _subscription(data)
            session = await self.get_session(sid)
            seq = await self.hub.subscribe(self.namespace, sid, session["actor"], project_id, since,
                                           token=session["token"])  # re-checked in the subscribe's one read
        except DomainError as exc:
            return ack_error(exc)
        except Exception:
            log.exception("subscribe failed", extra={"sid": sid})
            return ack_error(Unavailable("try again"))
        return {"ok": True, "project_id": project_id, "seq": seq}

    async def on_unsubscribe(self, sid: str, data: Any = None) -> dict[str, Any]:
        try:
            project_id, _ = _subscription(data)
        except DomainError as exc:
            return ack_error(exc)
        await self.hub.unsubscribe(self.namespace, sid, project_id)
        return {"ok": True, "project_id": project_id}


MAX_SEQ = 2**63 - 1  # seqs are BIGINT


def _subscription(data: Any) -> tuple[str, int]:
    if not isinstance(data, dict) or not isinstance(data.get("project_id"), str):
        raise InvalidRequest("send {project_id, since?}")
    since = data.get("since")
    if since is None:
        since = 0
    elif not isinstance(since, int) or isinstance(since, bool) or not 0 <= since <= MAX_SEQ:
        raise InvalidRequest(f"since must be an integer seq between 0 and {MAX_SEQ}", {"field": "since"})
    return data["project_id"], since


def attach(app: web.Application, container: Units, metrics: HubMetrics) -> Hub:
    hub = Hub(container, metrics)
    hub.sio.attach(app)
    app[HUB] = hub

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        tails = asyncio.create_task(hub.check_tails(), name="hub-tail-check")
        yield
        tails.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await tails
        await hub.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(hub.sio.shutdown(), 5)

    app.cleanup_ctx.append(lifecycle)
    return hub
