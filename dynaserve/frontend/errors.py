"""Errors in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}`` with their HTTP status,
and the mapping from DynaServe's wire error codes (:mod:`dynaserve.errors`)."""

from __future__ import annotations

from typing import Any

from dynaserve.errors import DynaServeError

INVALID = "invalid_request_error"
NOT_FOUND = "not_found_error"
RATE_LIMIT = "rate_limit_error"
UNAVAILABLE = "service_unavailable_error"
SERVER = "server_error"

# DynaServe error code -> (HTTP status, OpenAI error type, param it concerns)
_BY_CODE: dict[str, tuple[int, str, str | None]] = {
    "invalid_request": (400, INVALID, None),
    "malformed": (400, INVALID, None),
    "bad_field": (400, INVALID, None),
    "unknown_type": (400, INVALID, None),
    "unexpected_type": (400, INVALID, None),
    "too_large": (400, INVALID, None),
    "protocol_version": (500, SERVER, None),
    "prompt_too_long": (400, INVALID, "prompt"),
    "duplicate_id": (409, INVALID, None),
    "queue_full": (429, RATE_LIMIT, None),
    "slo_infeasible": (429, RATE_LIMIT, None),
    "no_workers": (503, UNAVAILABLE, None),
    "broker_unavailable": (503, UNAVAILABLE, None),
    "worker_lost": (502, SERVER, None),
    "request_failed": (500, SERVER, None),
}


class ApiError(Exception):
    """An error answered to the HTTP client."""

    def __init__(self, status: int, message: str, type_: str = INVALID, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_param(param: str, message: str) -> ApiError:
    """400 for one bad request parameter."""
    return ApiError(400, message, INVALID, param, "invalid_parameter")


def from_dynaserve(exc: DynaServeError, prompt_param: str = "prompt") -> ApiError:
    """The HTTP error for a DynaServe error reply."""
    status, type_, param = _BY_CODE.get(exc.code, (500, SERVER, None))
    if param == "prompt":
        param = prompt_param
    return ApiError(status, str(exc), type_, param, exc.code)
