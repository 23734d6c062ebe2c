"""``Idempotency-Key`` for POSTs that move money (API.md): same key + same body → the first response
again (with ``Idempotent-Replayed: true``); same key + a different body → 409; the same key while
the first request still runs → 409. Keys are scoped to the caller and the path.

The first request claims the key with an in-progress row (INSERT … ON CONFLICT DO NOTHING, so two
processes racing on one key cannot both run), runs, and stores its response — errors included
(a 402 stays a 402), except 5xx and crashes, which release the key so a retry runs again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable

from aiohttp import web

from domain.base import utcnow
from domain.errors import Conflict, DomainError, InvalidRequest
from server.http import actor, container
from server.middleware import render_domain_error
from storage.idempotency import IN_PROGRESS, IdempotencyKeys

HEADER = "Idempotency-Key"


async def idempotent(request: web.Request, run: Callable[[], Awaitable[web.Response]]) -> web.Response:
    key = request.headers.get(HEADER)
    if key is None:
        return await run()
    if not 1 <= len(key) <= 200:
        raise InvalidRequest("Idempotency-Key must be 1-200 characters", {"header": HEADER})
    who = actor(request)
    body = await request.read()
    request_hash = hashlib.sha256(body).hexdigest()
    scope = f"{who.label}:" + hashlib.sha256(f"{request.method} {request.path}".encode()).hexdigest()[:32]
    db = container(request).db
    async with db.write() as conn:
        seen = await IdempotencyKeys(conn).claim(scope, key, request_hash, utcnow())
    if seen is not None:
        seen_hash, status, stored = seen
        if seen_hash != request_hash:
            raise Conflict("this Idempotency-Key was used with a different request body",
                           {"idempotency_key": key})
        if status == IN_PROGRESS:
            raise Conflict("a request with this Idempotency-Key is still in progress; retry shortly",
                           {"idempotency_key": key})
        return web.Response(status=status, body=stored, content_type="application/json",
                            headers={"Idempotent-Replayed": "true"})
    try:
        try:
            response = await run()
        except DomainError as exc:
            response = render_domain_error(request, exc)
    except BaseException:
        async with db.write() as conn:
            await IdempotencyKeys(conn).release(scope, key)
        raise
    async with db.write() as conn:
        if response.status >= 500 or not isinstance(response.body, bytes):
            await IdempotencyKeys(conn).release(scope, key)
        else:
            await IdempotencyKeys(conn).complete(scope, key, response.status, response.body)
    return response
