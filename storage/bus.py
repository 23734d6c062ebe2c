"""Event buses: in-process, and Redis pub/sub for several server processes.

Both deliver every committed event to the listeners of the publishing process directly. The Redis
bus also publishes to a channel that every other process subscribes to, and skips its own messages
when they come back. Redis is best-effort fan-out only: the event log is the source of truth, so a
publish that fails is counted and logged, never raised, and a listener that lost Redis reconnects
with backoff and tells its listeners (``on_resync``) so they can replay what they missed from the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from collections.abc import Awaitable, Callable, Sequence

import msgspec
import redis.asyncio as aioredis

from domain.events import Event

log = logging.getLogger("smartspace.bus")
Listener = Callable[[Event], Awaitable[None]]
Resync = Callable[[], Awaitable[None]]
CHANNEL = "smartspace:events"


class _Message(msgspec.Struct, array_like=True):
    origin: str
    events: list[Event]


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(_Message).decode


class LocalBus:
    def __init__(self, metrics=None) -> None:
        self._listeners: list[Listener] = []
        self._resync: list[Resync] = []
        self.metrics = metrics

    def listen(self, callback: Listener) -> None:
        self._listeners.append(callback)

    def on_resync(self, callback: Resync) -> None:
        self._resync.append(callback)

    async def _deliver(self, events: Sequence[Event]) -> None:
        for event in events:
            for callback in self._listeners:
                try:
                    await callback(event)
                except Exception:
                    log.exception("event listener failed", extra={"event_type": event.type})

    async def publish(self, events: Sequence[Event]) -> None:
        if self.metrics is not None:
            self.metrics.events_published.inc(len(events))
        await self._deliver(events)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


class RedisBus(LocalBus):
    def __init__(self, url: str, metrics=None, channel: str = CHANNEL) -> None:
        super().__init__(metrics)
        self.url = url
        self.channel = channel
        self.origin = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.redis = aioredis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2,
                                             health_check_interval=5)
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()

    async def ping(self) -> None:
        await self.redis.ping()

    async def publish(self, events: Sequence[Event]) -> None:
        await super().publish(events)
        try:
            await self.redis.publish(self.channel, _encode(_Message(self.origin, list(events))))
        except (aioredis.RedisError, OSError) as exc:
            # The events are in the log; remote subscribers recover them when they re-subscribe.
            if self.metrics is not None:
                self.metrics.bus_errors.labels("publish").inc()
            log.warning("redis publish failed; events stay in the log", extra={"error": repr(exc),
                                                                               "events": len(events)})

    async def start(self) -> None:
        self._task = asyncio.create_task(self._listen_forever(), name="redis-bus-listener")

    async def _listen_forever(self) -> None:
        delay, lost = 0.1, False
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                self.connected.set()
                if lost:
                    # We may have missed events while deaf: let listeners catch up from the log.
                    log.info("redis bus reconnected; resyncing subscribers")
                    for callback in self._resync:
                        await callback()
                    lost = False
                delay = 0.1
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is None or message.get("type") != "message":
                        continue
                    decoded = _decode(message["data"])
                    if decoded.origin != self.origin:
                        await self._deliver(decoded.events)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.connected.clear()
                lost = True
                if self.metrics is not None:
                    self.metrics.bus_errors.labels("listen").inc()
                log.warning("redis bus listener lost its connection; retrying",
                            extra={"error": repr(exc), "retry_in_s": delay})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.redis.aclose()
