"""The one place where errors become gRPC status codes.

    unknown adapter / record / account           -> NOT_FOUND
    weights hash or base model mismatch          -> FAILED_PRECONDITION
    bad request (weights, sampling, prompt size) -> INVALID_ARGUMENT
    malformed adapter file                       -> FAILED_PRECONDITION
    queue full                                   -> RESOURCE_EXHAUSTED
    chain unreachable                            -> UNAVAILABLE
    anything else                                -> INTERNAL (logged with its traceback)
"""

from __future__ import annotations

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
from loraledger.node.errors import ChainError, ConfigError, LineageMismatchError, NodeError, NotFoundError

__all__ = ["LineageMismatchError", "NotFoundError", "status_for"]


_TABLE: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (AdapterNotFoundError, grpc.StatusCode.NOT_FOUND),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (AdapterMismatchError, grpc.StatusCode.FAILED_PRECONDITION),
    (LineageMismatchError, grpc.StatusCode.FAILED_PRECONDITION),
    (AdapterFormatError, grpc.StatusCode.FAILED_PRECONDITION),
    (ModelLoadError, grpc.StatusCode.FAILED_PRECONDITION),
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (ConfigError, grpc.StatusCode.INVALID_ARGUMENT),
    (CapacityError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ChainError, grpc.StatusCode.UNAVAILABLE),
    (EngineError, grpc.StatusCode.INTERNAL),
    (NodeError, grpc.StatusCode.INTERNAL),
)


def status_for(error: BaseException) -> grpc.StatusCode:
    """The gRPC code for an error raised while serving a call (the first matching class wins)."""
    for cls, code in _TABLE:
        if isinstance(error, cls):
            return code
    return grpc.StatusCode.INTERNAL
