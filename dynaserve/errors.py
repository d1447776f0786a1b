"""Typed errors the client SDK raises for error replies from the broker, keyed by wire code."""

from __future__ import annotations


class DynaServeError(Exception):
    """Base class: ``code`` is the wire error code, ``req_id`` the request it concerns (if any)."""

    code = "error"

    def __init__(self, message: str, *, code: str | None = None, req_id: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.req_id = req_id


class ProtocolVersionError(DynaServeError):
    code = "protocol_version"


class MalformedRequestError(DynaServeError):
    code = "malformed"


class InvalidRequestError(DynaServeError):
    code = "invalid_request"


class PromptTooLongError(DynaServeError):
    code = "prompt_too_long"


class QueueFullError(DynaServeError):
    code = "queue_full"


class SloInfeasibleError(DynaServeError):
    code = "slo_infeasible"


class NoWorkersError(DynaServeError):
    code = "no_workers"


class DuplicateRequestError(DynaServeError):
    code = "duplicate_id"


class WorkerLostError(DynaServeError):
    code = "worker_lost"


class RequestFailedError(DynaServeError):
    code = "request_failed"


class BrokerUnavailableError(DynaServeError):
    code = "broker_unavailable"


_BY_CODE: dict[str, type[DynaServeError]] = {
    cls.code: cls
    for cls in (
        ProtocolVersionError,
        MalformedRequestError,
        InvalidRequestError,
        PromptTooLongError,
        QueueFullError,
        SloInfeasibleError,
        NoWorkersError,
        DuplicateRequestError,
        WorkerLostError,
        RequestFailedError,
        BrokerUnavailableError,
    )
}
# decode-level codes that mean "the frame was bad"
for _c in ("bad_field", "unknown_type", "unexpected_type", "too_large"):
    _BY_CODE[_c] = MalformedRequestError


def error_from_wire(code: str, message: str, req_id: str | None = None) -> DynaServeError:
    """The typed exception for an ErrorReply."""
    cls = _BY_CODE.get(code, DynaServeError)
    return cls(f"{code}: {message}", code=code, req_id=req_id)
