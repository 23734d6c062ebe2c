"""REST v1 route modules; importing this package registers every route on ``server.http.routes``."""

from server.api import anthropic, audit, catalog, chatbot, gateway, health, identity, money, openapi, payments, policies  # noqa: F401
