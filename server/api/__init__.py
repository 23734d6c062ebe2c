"""REST v1 route modules; importing this package registers every route on ``server.http.routes``."""

from server.api import audit, catalog, gateway, health, identity, money, openapi, policies  # noqa: F401
from server.api import payments  # noqa: F401
