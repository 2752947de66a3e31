"""HTTP errors of ``smoledge serve``: :class:`ApiError` and the mapping of every exception to one.

The body is OpenAI's: ``{"error": {"message", "type", "code", "param"}}``; ``error_for(exc)`` picks the
status from smoledge's exception tree (bad input 4xx, cloud trouble 502/503, local failure 500) and
never puts a traceback in the message.
"""

from __future__ import annotations

import math
from typing import Any

from smoledge.redact import redact

from smoledge.errors import (
    BackendError,
    CloudAuthError,
    CloudCreditError,
    CloudDisabledError,
    CloudError,
    CloudRateLimitError,
    CloudUnavailableError,
    DeadlineExceededError,
    FallbackFailedError,
    ImageError,
    InputError,
    PromptTooLongError,
    SmolEdgeError,
    VideoError,
)


class ApiError(Exception):
    """An error answered as ``{"error": {...}}`` with an HTTP status (and optional headers)."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The error body, sanitised: no token in upstream text reaches an API client (smoledge.redact)."""
        return {"error": {"message": redact(self.message), "type": self.type, "code": self.code,
                          "param": self.param}}


def bad(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, code=code, param=param)


# (exception type, status, type, code): the first match wins, so subclasses come first
_ERRORS: tuple[tuple[type, int, str, str], ...] = (
    (PromptTooLongError, 400, "invalid_request_error", "context_length_exceeded"),
    (ImageError, 400, "invalid_request_error", "invalid_image"),
    (VideoError, 400, "invalid_request_error", "unsupported_content"),
    (InputError, 400, "invalid_request_error", "invalid_request"),
    (CloudDisabledError, 422, "invalid_request_error", "refused_by_policy"),
    (FallbackFailedError, 502, "server_error", "fallback_failed"),
    (CloudRateLimitError, 503, "server_error", "cloud_rate_limited"),
    (CloudUnavailableError, 503, "server_error", "cloud_unavailable"),
    (CloudAuthError, 502, "server_error", "cloud_auth_failed"),
    (CloudCreditError, 502, "server_error", "cloud_out_of_credit"),
    (CloudError, 502, "server_error", "cloud_error"),
    (DeadlineExceededError, 504, "server_error", "deadline_exceeded"),
    (BackendError, 500, "server_error", "local_inference_failed"),
    (MemoryError, 503, "server_error", "out_of_memory"),
    (SmolEdgeError, 500, "server_error", "internal_error"),
)


def error_for(exc: BaseException) -> ApiError:
    """The HTTP answer for any exception raised while serving a request (no traceback text leaks)."""
    if isinstance(exc, ApiError):
        return exc
    for kind, status, err_type, code in _ERRORS:
        if isinstance(exc, kind):
            message = str(exc) if isinstance(exc, SmolEdgeError) else "out of memory on the device"
            headers = {}
            retry = getattr(exc, "retry_after", None)
            if status in (429, 503) and retry:
                headers["Retry-After"] = str(max(1, math.ceil(retry)))
            return ApiError(status, message, type=err_type, code=code, headers=headers)
    return ApiError(500, f"internal server error ({type(exc).__name__})", type="server_error", code="internal_error")
