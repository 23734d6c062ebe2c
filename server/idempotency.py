"""``Idempotency-Key`` — one mechanism for every POST that moves money (API.md): admin credits,
``/api/v1/requests``, withdrawals and the gateway's ``/v1/chat/completions`` and ``/v1/embeddings``.

- **Scope: the project and the key.** A key is claimed by inserting its row (primary key
  ``(project_id, key)``), so of any number of concurrent requests with one key — from the user's token
  and the project's API key, on any process — exactly one runs. The others get the first answer (the
  same actor) or 409 (another actor: an answer is only replayed to whoever asked).
- **Same request, compared parsed.** The fingerprint is the method, the path and the canonical JSON of
  the decoded body (sorted keys, no whitespace), so re-formatted JSON is the same request; another
  body with the same key is 409.
- **The first answer again,** stored with its status and receipt headers, marked
  ``Idempotent-Replayed: true``. A stream is stored as the SSE bytes it sent and replayed as one SSE
  body. Not stored (the key is released and a retry runs anew): 5xx, a stream that did not finish, a
  crash, and refusals that ran nothing — 401, 403 ``forbidden``, 404, 429.
- **A lease, never stuck.** A running claim holds a lease of ``idempotency_lease_seconds`` and renews
  it while it runs. If its process dies the lease lapses and the next retry takes the key over; what
  the first request left behind decides what it sees (``recover``: e.g. its spend request settled → that
  answer; still executing → released as the sweeper would, then run anew). Until then a retry gets 409
  with ``Retry-After`` (the official SDKs wait that long and retry by themselves).
- **Retention.** Keys are kept ``idempotency_retention_hours``; expired rows are pruned on claim
  (at most once a minute per process) and an expired key is new again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import time
import weakref
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

import msgspec
from aiohttp import web

from domain.base import Actor, utcnow
from domain.errors import Conflict, DomainError, InvalidRequest
from server.http import container
from server.middleware import render_domain_error
from storage.db import Database
from storage.idempotency import Answered, Busy, Claimed, IdempotencyKeys, Mismatch

log = logging.getLogger("smartspace.idempotency")

HEADER = "Idempotency-Key"
_KEY_OK = re.compile(r"^[\x21-\x7e][\x20-\x7e]{0,199}$")  # printable ASCII, 1-200 characters
_RECORDING = web.RequestKey("idempotency_recording", list)
_NOT_STORED = frozenset({401, 404, 429})  # and 403 "forbidden", and every 5xx
_SSE_DONE = b"data: [DONE]\n\n"
PRUNE_EVERY = 60.0  # seconds between prunes of expired keys, per process and database
_pruned: weakref.WeakKeyDictionary[Database, float] = weakref.WeakKeyDictionary()

Run = Callable[[], Awaitable[web.StreamResponse]]
Recover = Callable[[datetime], Awaitable[web.StreamResponse | None]]
Replay = Callable[[Answered], Awaitable[web.Response]]
Render = Callable[[web.Request, DomainError], web.StreamResponse]


def canonical(body: Any) -> bytes:
    """A parsed body as canonical JSON: sorted keys, no whitespace."""
    return msgspec.json.encode(body, order="sorted")


def fingerprint(method: str, path: str, body: Any) -> str:
    return hashlib.sha256(f"{method} {path}\n".encode() + canonical(body)).hexdigest()


def install(app: web.Application) -> None:
    """Let :func:`idempotent` record what a streamed answer writes (so it can be replayed)."""
    app.on_response_prepare.append(_record_stream)


async def _record_stream(request: web.BaseRequest, response: web.StreamResponse) -> None:
    chunks = request.get(_RECORDING)
    if chunks is None or isinstance(response, web.Response):
        return
    write = response.write

    async def recording(data: bytes | bytearray | memoryview) -> None:
        chunks.append(bytes(data))
        await write(data)

    response.write = recording  # type: ignore[method-assign]


async def idempotent(request: web.Request, who: Actor, project_id: str | None, body: Any, run: Run, *,
                     recover: Recover | None = None, replay: Replay | None = None,
                     render: Render = render_domain_error) -> web.StreamResponse:
    """Run ``run`` once per (project, Idempotency-Key) for ``who``; ``body`` is the decoded request body.
    ``recover`` turns what a dead first request left behind into its answer (None: run anew); ``replay``
    builds a replay from the stored answer (default: the stored bytes); ``render`` renders a DomainError
    in the route's error shape."""
    key = request.headers.get(HEADER)
    if key is None or project_id is None:  # no key, or no project yet: the route refuses it itself
        return await run()
    if not _KEY_OK.match(key):
        raise InvalidRequest("Idempotency-Key must be 1-200 printable ASCII characters", {"header": HEADER})
    c = container(request)
    lease = timedelta(seconds=c.settings.idempotency_lease_seconds)
    retention = timedelta(hours=c.settings.idempotency_retention_hours)
    now = utcnow()
    async with c.db.write() as conn:
        keys = IdempotencyKeys(conn)
        if time.monotonic() - _pruned.get(c.db, -PRUNE_EVERY) >= PRUNE_EVERY:
            _pruned[c.db] = time.monotonic()
            await keys.prune(now)
        outcome = await keys.claim(project_id, key, who.label, fingerprint(request.method, request.path, body), now,
                                   lease, retention)
    if isinstance(outcome, Mismatch):
        message = ("this Idempotency-Key was used with a different request" if outcome.reason == "body"
                   else "this Idempotency-Key was already used by another caller in this project")
        raise Conflict(message, {"idempotency_key": key})
    if isinstance(outcome, Busy):  # Retry-After: the official SDKs retry a 409 after it by themselves
        busy = render(request, Conflict("a request with this Idempotency-Key is still in progress; retry shortly",
                                        {"idempotency_key": key, "retry_after_seconds": outcome.retry_after}))
        busy.headers["Retry-After"] = str(outcome.retry_after)
        return busy
    if isinstance(outcome, Answered):
        response = await replay(outcome) if replay is not None else replayed(outcome)
        response.headers["Idempotent-Replayed"] = "true"
        return response
    return await _run_claimed(request, c.db, project_id, key, outcome, lease, run, recover, render)


async def _run_claimed(request: web.Request, db: Database, project_id: str, key: str, claim: Claimed,
                       lease: timedelta, run: Run, recover: Recover | None, render: Render) -> web.StreamResponse:
    chunks: list[bytes] = []
    request[_RECORDING] = chunks
    renewing = asyncio.create_task(_renew(db, project_id, key, claim.token, lease))
    code = ""
    try:
        try:
            response = None
            if claim.resumed_from is not None and recover is not None:
                response = await recover(claim.resumed_from)
                if response is not None:
                    response.headers["Idempotent-Replayed"] = "true"
            if response is None:
                response = await run()
        except DomainError as exc:
            code = exc.code
            response = render(request, exc)
    except BaseException:
        await asyncio.shield(_release(db, project_id, key, claim.token))
        raise
    finally:
        renewing.cancel()
    stored = _storable(response, code, chunks)
    await asyncio.shield(_finish(db, project_id, key, claim.token, stored))
    return response


def _storable(response: web.StreamResponse, code: str, chunks: list[bytes]) -> Answered | None:
    status = response.status
    if status >= 500 or status in _NOT_STORED or (status == 403 and code == "forbidden"):
        return None
    headers = {k: v for k, v in response.headers.items() if k.lower().startswith("x-smartspace-")}
    if isinstance(response, web.Response):
        if not isinstance(response.body, bytes):
            return None
        return Answered(status, response.headers.get("Content-Type", "application/json"), headers, response.body)
    body = b"".join(chunks)
    if not body.endswith(_SSE_DONE):  # the stream failed or the client left: not an answer to keep
        return None
    return Answered(status, response.headers.get("Content-Type", "text/event-stream"), headers, body)


def replayed(answer: Answered) -> web.Response:
    response = web.Response(status=answer.status, body=answer.body, headers=answer.headers)
    response.headers["Content-Type"] = answer.content_type
    return response


async def _renew(db: Database, project_id: str, key: str, token: str, lease: timedelta) -> None:
    """Keep the claim's lease alive while its request runs (a third of the lease apart)."""
    while True:
        await asyncio.sleep(lease.total_seconds() / 3)
        try:
            async with db.write() as conn:
                if not await IdempotencyKeys(conn).renew(project_id, key, token, utcnow() + lease):
                    return
        except Exception:  # a missed renewal only shortens the lease; the next one may succeed
            log.warning("could not renew an Idempotency-Key lease", exc_info=True)


async def _release(db: Database, project_id: str, key: str, token: str) -> None:
    with contextlib.suppress(Exception):
        async with db.write() as conn:
            await IdempotencyKeys(conn).release(project_id, key, token)


async def _finish(db: Database, project_id: str, key: str, token: str, stored: Answered | None) -> None:
    try:
        async with db.write() as conn:
            keys = IdempotencyKeys(conn)
            if stored is None:
                await keys.release(project_id, key, token)
            else:
                await keys.answer(project_id, key, token, stored.status, stored.content_type, stored.headers,
                                  stored.body)
    except Exception:  # the answer still goes out; the claim's lease lapses and a retry recovers
        log.exception("could not store an Idempotency-Key answer")
