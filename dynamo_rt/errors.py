"""One exception tree for the whole runtime, and the HTTP status each maps to.

Backend errors (etcd, NATS, NIXL, engines) are translated into these at their module boundary, so nothing
above the boundary ever sees a grpc/nats/nixl exception. The frontend maps them to OpenAI error bodies with
one table (``http_status``), the same words in streaming and non-streaming responses.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    INVALID_REQUEST = "invalid_request"  # 400: the request cannot be served as sent
    UNAUTHORIZED = "invalid_api_key"  # 401: missing or wrong API key (OpenAI's code word for it)
    CONTEXT_LENGTH = "context_length_exceeded"  # 400: prompt (+ max_tokens) longer than the model's context
    NOT_FOUND = "not_found"  # 404: unknown model / instance
    TOO_LARGE = "request_too_large"  # 413
    OVERLOADED = "overloaded"  # 429: queue full
    UNAVAILABLE = "unavailable"  # 503: no worker / worker gone / transport down
    TIMEOUT = "timeout"  # 504: deadline passed
    CANCELLED = "cancelled"  # the caller went away
    INTERNAL = "internal"  # 500: a bug or engine failure


_STATUS = {
    ErrorCode.INVALID_REQUEST: 400,
    ErrorCode.CONTEXT_LENGTH: 400,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.OVERLOADED: 429,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.TIMEOUT: 504,
    ErrorCode.CANCELLED: 499,
    ErrorCode.INTERNAL: 500,
}

_TYPE = {
    400: "invalid_request_error",
    401: "authentication_error",  # the openai SDK raises AuthenticationError on the status
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    499: "cancelled",
    500: "internal_error",
    503: "service_unavailable",
    504: "timeout",
}


def http_status(code: ErrorCode | str) -> int:
    try:
        return _STATUS[ErrorCode(code)]
    except ValueError:
        return 500


def error_type(status: int) -> str:
    return _TYPE.get(status, "internal_error")


class DynamoError(Exception):
    """Root of every runtime error. ``code`` decides the HTTP status; ``param`` names the bad field."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, *, code: ErrorCode | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.param = param

    @property
    def status(self) -> int:
        return http_status(self.code)


class InvalidRequest(DynamoError):
    code = ErrorCode.INVALID_REQUEST


class Unauthorized(DynamoError):
    """The caller did not present the API key the frontend requires."""

    code = ErrorCode.UNAUTHORIZED


class NotFound(DynamoError):
    code = ErrorCode.NOT_FOUND


class Overloaded(DynamoError):
    code = ErrorCode.OVERLOADED

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Unavailable(DynamoError):
    """No worker, a worker that left, or a transport (etcd/NATS) that is down."""

    code = ErrorCode.UNAVAILABLE


class DeadlineExceeded(DynamoError):
    code = ErrorCode.TIMEOUT


class Cancelled(DynamoError):
    code = ErrorCode.CANCELLED


class RemoteError(DynamoError):
    """An error raised by a handler on the far side of the request plane, re-raised on the caller."""


class DiscoveryError(Unavailable):
    """etcd is unreachable or refused an operation."""


class TransportError(Unavailable):
    """NATS is unreachable or the request could not be delivered."""


class ConfigError(DynamoError):
    """A bad command-line flag or environment twin. ``param`` names the flag; a process entry point prints
    one line (``dynamo-rt worker: error: --flag: why``) and exits with status 2, never a traceback."""

    code = ErrorCode.INVALID_REQUEST

    def __init__(self, flag: str, message: str) -> None:
        super().__init__(f"{flag}: {message}", param=flag)
        self.flag = flag


class KvTransferError(DynamoError):
    """A NIXL transfer failed or its peer is gone."""

    code = ErrorCode.UNAVAILABLE


def internal(exc: BaseException) -> DynamoError:
    """What a client is told of an unexpected exception (a bug): its type, never its text."""
    return DynamoError(f"internal error: {type(exc).__name__}")


def from_wire(code: str, message: str) -> DynamoError:
    """Rebuild a typed error from an :class:`~dynamo_rt.protocol.Error` frame."""
    try:
        ec = ErrorCode(code)
    except ValueError:
        ec = ErrorCode.INTERNAL
    cls: type[DynamoError] = {
        ErrorCode.INVALID_REQUEST: InvalidRequest,
        ErrorCode.CONTEXT_LENGTH: InvalidRequest,
        ErrorCode.UNAUTHORIZED: Unauthorized,
        ErrorCode.NOT_FOUND: NotFound,
        ErrorCode.UNAVAILABLE: Unavailable,
        ErrorCode.TIMEOUT: DeadlineExceeded,
        ErrorCode.CANCELLED: Cancelled,
    }.get(ec, RemoteError)
    return cls(message, code=ec)
