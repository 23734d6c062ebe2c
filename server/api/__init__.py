"""REST v1 route modules; importing this package registers every route on ``server.http.routes``."""

from server.api import audit, catalog, gateway, health, identity, insights, money, openapi, payments, policies  # noqa: F401
