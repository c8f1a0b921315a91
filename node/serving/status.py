"""The one place where errors become API statuses: a gRPC status code and an HTTP status with its OpenAI error
type, from the same table.

    error                                         gRPC                  HTTP  OpenAI error type
    no key, unknown or revoked key, bad signature UNAUTHENTICATED       401   authentication_error
    wrong scope, denied adapter, path not allowed PERMISSION_DENIED     403   permission_denied_error
    unknown adapter / record / account            NOT_FOUND             404   not_found_error
    weights hash or base model mismatch,          FAILED_PRECONDITION   422   invalid_request_error
      malformed adapter file, model load
    bad request (weights, sampling, prompt size)  INVALID_ARGUMENT      400   invalid_request_error
    queue full, a key over its rate limit         RESOURCE_EXHAUSTED    429   rate_limit_error (+ Retry-After)
    chain unreachable, shutting down              UNAVAILABLE           503   service_unavailable
    anything else                                 INTERNAL              500   server_error (logged with traceback)
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from loraledger.inference.errors import (
    AdapterFormatError,
    AdapterMismatchError,
    AdapterNotFoundError,
    CapacityError,
    EngineError,
    InvalidRequestError,
    ModelLoadError,
)
from loraledger.node.errors import (
    AuthenticationError,
    ChainError,
    ConfigError,
    LineageMismatchError,
    NodeError,
    NotFoundError,
    PermissionDeniedError,
    UnavailableError,
)

__all__ = ["ApiStatus", "LineageMismatchError", "NotFoundError", "api_status", "status_for"]


@dataclass(frozen=True)
class ApiStatus:
    grpc: grpc.StatusCode
    http: int
    openai_type: str


_NOT_FOUND = ApiStatus(grpc.StatusCode.NOT_FOUND, 404, "not_found_error")
_PRECONDITION = ApiStatus(grpc.StatusCode.FAILED_PRECONDITION, 422, "invalid_request_error")
_INVALID = ApiStatus(grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error")
_INTERNAL = ApiStatus(grpc.StatusCode.INTERNAL, 500, "server_error")

_TABLE: tuple[tuple[type[BaseException], ApiStatus], ...] = (
    (AuthenticationError, ApiStatus(grpc.StatusCode.UNAUTHENTICATED, 401, "authentication_error")),
    (PermissionDeniedError, ApiStatus(grpc.StatusCode.PERMISSION_DENIED, 403, "permission_denied_error")),
    (AdapterNotFoundError, _NOT_FOUND),
    (NotFoundError, _NOT_FOUND),
    (AdapterMismatchError, _PRECONDITION),
    (LineageMismatchError, _PRECONDITION),
    (AdapterFormatError, _PRECONDITION),
    (ModelLoadError, _PRECONDITION),
    (InvalidRequestError, _INVALID),
    (ConfigError, _INVALID),
    (CapacityError, ApiStatus(grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "rate_limit_error")),
    (UnavailableError, ApiStatus(grpc.StatusCode.UNAVAILABLE, 503, "service_unavailable")),
    (ChainError, ApiStatus(grpc.StatusCode.UNAVAILABLE, 503, "service_unavailable")),
    (EngineError, _INTERNAL),
    (NodeError, _INTERNAL),
)


def api_status(error: BaseException) -> ApiStatus:
    """The statuses for an error raised while serving a request (the first matching class wins)."""
    for cls, status in _TABLE:
        if isinstance(error, cls):
            return status
    return _INTERNAL


def status_for(error: BaseException) -> grpc.StatusCode:
    """The gRPC code for an error raised while serving a call."""
    return api_status(error).grpc
