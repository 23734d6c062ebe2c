"""CORS for the REST API and the gateway (aiohttp-cors), for the origins in ``SMARTSPACE_CORS_ORIGINS``.

None are configured by default: browsers on other origins are then refused by their own same-origin
rule. A configured origin may call every route of the route table (``/api/v1/…``, ``/v1/…``, health),
preflight included, sending ``Authorization`` (or ``X-API-Key``), ``Content-Type``, ``Idempotency-Key`` and the
SmartSpace request headers; it may read the response headers a script needs (``x-smartspace-*``,
``X-Request-Id``, ``Retry-After``: every non-simple header of the response is exposed). Bearer
tokens travel in ``Authorization``, never in cookies, so credentials mode is not enabled. Socket.IO
is not covered here (it runs its own handshake).
"""

from __future__ import annotations

from collections.abc import Iterable

import aiohttp_cors
from aiohttp import web

ALLOW_HEADERS = ("Authorization", "X-API-Key", "Content-Type", "Idempotency-Key", "X-SmartSpace-Wait", "X-Request-Id")
ALLOW_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
MAX_AGE_SECONDS = 600


def enable_cors(app: web.Application, origins: Iterable[str]) -> None:
    """Allow ``origins`` on every resource registered so far (call after the routes are installed)."""
    origins = tuple(origins)
    if not origins:
        return
    options = aiohttp_cors.ResourceOptions(allow_credentials=False, expose_headers="*", allow_headers=ALLOW_HEADERS,
                                           allow_methods=ALLOW_METHODS, max_age=MAX_AGE_SECONDS)
    cors = aiohttp_cors.setup(app, defaults={origin: options for origin in origins})
    for resource in list(app.router.resources()):
        cors.add(resource)
