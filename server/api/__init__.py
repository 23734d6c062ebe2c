"""REST v1 route modules; importing this package registers every route on ``server.http.routes``."""

import server.api.dashboard  # noqa: F401 - GET / and its assets (issue 13)
from server.api import (  # noqa: F401
    anthropic,
    audit,
    catalog,
    chatbot,
    gateway,
    health,
    identity,
    insights,
    money,
    openapi,
    payments,
    policies,
)
