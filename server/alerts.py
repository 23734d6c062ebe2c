"""Outbound alerts: each new warning / critical insight POSTed as JSON to SMARTSPACE_ALERT_WEBHOOK_URL.

The body is signed: ``X-SmartSpace-Signature: sha256=<hex HMAC-SHA256(secret, timestamp + "." + body)>``
with ``X-SmartSpace-Timestamp`` (Unix seconds), so a receiver can check it came from here and is fresh.
``send`` only queues (bounded; the oldest alert is dropped if the receiver is away that long); one task
delivers in order, retrying a failed delivery with exponential backoff. A request never waits for it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import hmac
import logging
import time
from typing import Any

import aiohttp
import msgspec

from domain.insights import Insight, insight_data

log = logging.getLogger("smartspace.alerts")
QUEUE_LIMIT = 1000
SIGNATURE = "X-SmartSpace-Signature"
TIMESTAMP = "X-SmartSpace-Timestamp"


def sign(secret: str, timestamp: str, body: bytes) -> str:
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


class WebhookAlerts:
    def __init__(self, url: str, secret: str, *, attempts: int = 6, backoff_seconds: float = 0.5,
                 max_backoff_seconds: float = 30.0, timeout_seconds: float = 10.0) -> None:
        self.url = url
        self.secret = secret
        self.attempts = attempts
        self.backoff = backoff_seconds
        self.max_backoff = max_backoff_seconds
        self.timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._queue: collections.deque[dict[str, Any]] = collections.deque(maxlen=QUEUE_LIMIT)
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._session: aiohttp.ClientSession | None = None
        self.delivered = 0
        self.failed = 0

    def send(self, insight: Insight) -> None:
        self._queue.append({"type": "insight.created", "insight": insight_data(insight)})
        self._wake.set()

    async def start(self) -> None:
        if self._task is None:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
            self._task = asyncio.create_task(self._deliver_forever(), name="smartspace-alert-webhook")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _deliver_forever(self) -> None:
        while True:
            while not self._queue:
                self._wake.clear()
                await self._wake.wait()
            payload = self._queue[0]
            if await self._deliver(payload):
                self.delivered += 1
            else:
                self.failed += 1
                log.error("alert webhook gave up", extra={"insight_id": payload["insight"]["id"]})
            if self._queue and self._queue[0] is payload:
                self._queue.popleft()

    async def _deliver(self, payload: dict[str, Any]) -> bool:
        body = msgspec.json.encode(payload)
        assert self._session is not None
        delay = self.backoff
        for attempt in range(1, self.attempts + 1):
            timestamp = str(int(time.time()))
            headers = {"Content-Type": "application/json", TIMESTAMP: timestamp,
                       SIGNATURE: sign(self.secret, timestamp, body)}
            try:
                async with self._session.post(self.url, data=body, headers=headers) as resp:
                    if resp.status < 300:
                        return True
                    reason = f"HTTP {resp.status}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                reason = type(exc).__name__
            log.warning("alert webhook delivery failed", extra={"attempt": attempt, "reason": reason})
            if attempt < self.attempts:
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_backoff)
        return False
