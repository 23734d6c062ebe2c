"""Event buses: in-process, and Redis pub/sub for several server processes.

Both deliver every committed event to the listeners of the publishing process directly. The Redis
bus also publishes to a channel that every other process subscribes to, and skips its own messages
when they come back. Redis is best-effort fan-out only — the event log is the source of truth:

- ``publish`` never raises and never waits for Redis: the message goes to a bounded outbox that one
  task sends in order, retrying with backoff while Redis is away (the oldest are dropped, and counted,
  if the outbox overflows). Requests are never slowed down by a Redis outage.
- The publishing connection is retried once on a fresh one when a pooled connection died while Redis
  was away (the first publish after an outage goes out at once; a duplicate is dropped by seq).
- The listener subscribes on its own connection with redis-py's silent retries turned off, so every
  lost connection is seen here. It pings through that connection every ``heartbeat_seconds``; hearing
  nothing at all (no message, not even its own pong) for ``3 × heartbeat_seconds`` counts as a lost
  connection too (a deaf listener: a half-open TCP connection or a stuck proxy).
- After any lost connection the listener re-subscribes with backoff and then calls its ``on_resync``
  callbacks, so listeners read what they may have missed from the log.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import msgspec
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from domain.events import Event

log = logging.getLogger("smartspace.bus")
Listener = Callable[[Event], Awaitable[None]]
Resync = Callable[[], Awaitable[None]]
CHANNEL = "smartspace:events"  # the default prefix's channel: f"{SMARTSPACE_REDIS_CHANNEL_PREFIX}:events"
OUTBOX_LIMIT = 10_000  # messages (one per committed unit of work) kept while Redis is away
HEARTBEAT = b"smartspace-heartbeat"


class _Message(msgspec.Struct, array_like=True):
    origin: str
    events: list[Event]
    deployment: str = ""  # whose events these are: a process ignores another deployment's on a shared channel


def channel_for(prefix: str) -> str:
    return f"{prefix}:events"


def deployment_id(database_name: str, secret: str) -> str:
    """Who shares events: processes of one deployment share its database and its JWT secret (a token issued by
    one is valid on all). Derived, never configured, so two deployments on one Redis cannot be mixed up."""
    return hashlib.sha256(f"{database_name}\0{secret}".encode()).hexdigest()[:16]


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(_Message).decode


class _Deaf(Exception):
    """The listener heard nothing, not even its own heartbeat, for too long."""


class LocalBus:
    def __init__(self, metrics=None) -> None:
        self._listeners: list[Listener] = []
        self._own_listeners: list[Listener] = []
        self._resync: list[Resync] = []
        self.metrics = metrics

    def listen(self, callback: Listener) -> None:
        self._listeners.append(callback)

    def listen_own(self, callback: Listener) -> None:
        """Hear only the events this process publishes (per-process counters, e.g. /metrics' spend series,
        so that summing them over the processes counts each event once)."""
        self._own_listeners.append(callback)

    def on_resync(self, callback: Resync) -> None:
        self._resync.append(callback)

    async def _deliver(self, events: Sequence[Event], listeners: Sequence[Listener] | None = None) -> None:
        for event in events:
            for callback in self._listeners if listeners is None else listeners:
                try:
                    await callback(event)
                except Exception:
                    log.exception("event listener failed", extra={"event_type": event.type})

    async def publish(self, events: Sequence[Event]) -> None:
        if self.metrics is not None:
            self.metrics.events_published.inc(len(events))
        await self._deliver(events)
        if self._own_listeners:
            await self._deliver(events, self._own_listeners)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


class RedisBus(LocalBus):
    def __init__(self, url: str, metrics=None, channel: str = CHANNEL, *, heartbeat_seconds: float = 0.5,
                 max_backoff_seconds: float = 2.0, deployment: str = "") -> None:
        super().__init__(metrics)
        self.url = url
        self.channel = channel
        self.deployment = deployment
        self.origin = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.heartbeat_seconds = heartbeat_seconds
        self.max_backoff_seconds = max_backoff_seconds
        options: dict[str, Any] = {"socket_connect_timeout": 2, "socket_timeout": 2}
        # Publishing and /ready: a pooled connection that died while Redis was away (reset, EOF) is retried
        # once on a fresh one, so the first publish or /ready after Redis is back does not fail for it (a
        # publish that did go out twice is a duplicate seq, which every listener drops).
        self.redis = aioredis.Redis.from_url(
            url, **options, retry=Retry(NoBackoff(), 1, supported_errors=(aioredis.ConnectionError,)))
        # The subscription: no library retries, a lost connection must surface here, where it is counted
        # and recovered from the log.
        self._listen_redis = aioredis.Redis.from_url(url, **options, retry=Retry(NoBackoff(), 0))
        self._outbox: collections.deque[bytes] = collections.deque()
        self._outbox_ready = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self.connected = asyncio.Event()  # the listener is subscribed
        self.resyncs = 0  # completed resyncs after a lost connection (for tests and logs)

    @property
    def deaf_after_seconds(self) -> float:
        """Silence after which the listener counts its connection as lost (a frozen subscription): 1.5 s by default."""
        return self.heartbeat_seconds * 3

    async def ping(self) -> None:
        await self.redis.ping()

    def _count(self, op: str, n: int = 1) -> None:
        if self.metrics is not None:
            self.metrics.bus_errors.labels(op).inc(n)

    # ------------------------------------------------------------------ publishing
    async def publish(self, events: Sequence[Event]) -> None:
        await super().publish(events)
        if len(self._outbox) >= OUTBOX_LIMIT:
            self._outbox.popleft()  # the log still has them; far subscribers recover on resync
            self._count("overflow")
        self._outbox.append(_encode(_Message(self.origin, list(events), self.deployment)))
        self._outbox_ready.set()

    async def _publish_forever(self) -> None:
        delay = 0.05
        while not self._closing:
            await self._outbox_ready.wait()
            while self._outbox:
                payload = self._outbox.popleft()
                try:
                    await self.redis.publish(self.channel, payload)
                except asyncio.CancelledError:
                    self._outbox.appendleft(payload)  # close() may still send it
                    raise
                except Exception as exc:  # any fault (not only RedisError/OSError): the publisher must not die
                    self._outbox.appendleft(payload)  # in order: nothing overtakes it
                    self._count("publish")
                    log.warning("redis publish failed; retrying (events are in the log)",
                                extra={"error": repr(exc), "queued": len(self._outbox), "retry_in_s": delay})
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self.max_backoff_seconds)
                    continue
                delay = 0.05
            self._outbox_ready.clear()

    # ------------------------------------------------------------------ listening
    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._listen_forever(), name="redis-bus-listener"),
                       asyncio.create_task(self._publish_forever(), name="redis-bus-publisher")]

    async def _listen_forever(self) -> None:
        delay, lost = 0.05, False
        while not self._closing:
            pubsub = self._listen_redis.pubsub()
            try:
                await asyncio.wait_for(pubsub.subscribe(self.channel), self.heartbeat_seconds * 3 + 2)
                await self._receive(pubsub, resync=lost)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.connected.is_set() or not lost:
                    log.warning("redis bus listener lost its connection; reconnecting", extra={"error": repr(exc)})
                self.connected.clear()
                lost = True
                self._count("listen")
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_backoff_seconds)
            else:
                delay = 0.05
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(pubsub.aclose(), 1)

    async def _receive(self, pubsub, *, resync: bool) -> None:
        heard = next_ping = time.monotonic()
        while True:
            if self._closing:
                # redis-py's read timeout can swallow a cancellation that races with it (asyncio.timeout on
                # Python 3.11): without this check a cancelled listener could poll forever.
                raise asyncio.CancelledError
            now = time.monotonic()
            if now >= next_ping:
                await pubsub.ping(HEARTBEAT)
                next_ping = now + self.heartbeat_seconds
            message = await pubsub.get_message(timeout=min(self.heartbeat_seconds, 1.0))
            now = time.monotonic()
            if message is None:
                if now - heard > self.deaf_after_seconds:
                    raise _Deaf(f"nothing heard from redis for {now - heard:.1f}s")
                continue
            heard = now
            kind = message.get("type")
            if kind == "message":
                await self._handle(message["data"])
            elif kind == "subscribe":
                # Subscribed for sure: from here on nothing is missed, so the log read below covers the gap.
                self.connected.set()
                if resync:
                    resync = False
                    log.info("redis bus reconnected; resyncing subscribers from the log")
                    for callback in self._resync:
                        try:
                            await callback()
                        except Exception:
                            log.exception("resync callback failed")
                    self.resyncs += 1
                    heard = next_ping = time.monotonic()

    async def _handle(self, data: bytes) -> None:
        try:
            decoded = _decode(data)
        except (msgspec.DecodeError, TypeError, ValueError):
            self._count("decode")
            log.warning("ignored an undecodable message on the event channel")
            return
        if decoded.deployment != self.deployment:
            return  # another deployment sharing this Redis channel: not ours to deliver
        if decoded.origin != self.origin:
            await self._deliver(decoded.events)

    async def close(self) -> None:
        self._closing = True
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            _, stuck = await asyncio.wait(self._tasks, timeout=5)
            if stuck:
                log.warning("redis bus tasks did not stop", extra={"tasks": [t.get_name() for t in stuck]})
        self._tasks = []
        # Best effort, briefly: what is still queued goes out (it is in the log either way).
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1):
                while self._outbox:
                    await self.redis.publish(self.channel, self._outbox[0])
                    self._outbox.popleft()
        for client in (self.redis, self._listen_redis):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.aclose(), 2)
