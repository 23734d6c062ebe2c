"""Domain errors: each carries a stable ``code`` and the HTTP status it maps to.

They are rendered in exactly one place per transport: HTTP answers in ``server.middleware.error_response``
(REST's shape, or OpenAI's under ``/v1/`` — also the error event inside a gateway stream, via
``openai_error``), Socket.IO acks in ``channels.hub.ack_error``.
"""

from __future__ import annotations

from typing import Any


class DomainError(Exception):
    code = "invalid_request"
    status = 400

    def __init__(self, message: str, details: dict[str, Any] | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}
        self.extra = extra

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "details": self.details}


class InvalidRequest(DomainError):
    code = "invalid_request"
    status = 422


class Unauthorized(DomainError):
    code = "unauthorized"
    status = 401


class Forbidden(DomainError):
    code = "forbidden"
    status = 403


class NotFound(DomainError):
    code = "not_found"
    status = 404


class Conflict(DomainError):
    code = "conflict"
    status = 409


class InsufficientFunds(DomainError):
    code = "insufficient_funds"
    status = 402


class BudgetExceeded(DomainError):
    code = "budget_exceeded"
    status = 402


class PolicyViolation(DomainError):
    code = "policy_violation"
    status = 403


class ApprovalRequired(DomainError):
    code = "approval_required"
    status = 403


class RateLimited(DomainError):
    code = "rate_limited"
    status = 429

    def __init__(self, message: str, retry_after: int = 1, details: dict[str, Any] | None = None) -> None:
        super().__init__(message, details)
        self.retry_after = max(1, int(retry_after))


class ProviderError(DomainError):
    code = "provider_error"
    status = 502


class ProviderTimeout(DomainError):
    code = "provider_timeout"
    status = 504


class Unavailable(DomainError):
    code = "unavailable"
    status = 503
