"""Typed errors of the node side (chain, lineage, attribution, settlement, CLI).

One base, `NodeError`; each subclass also inherits the built-in it resembles, so a caller may catch
either (`except ValueError` keeps working for a bad argument).
"""

from __future__ import annotations


class NodeError(Exception):
    """Base of every error raised by the `node` package."""


class ConfigError(NodeError, ValueError):
    """A configuration value or command-line argument is invalid; the message says which and what to do."""


class ChainError(NodeError, RuntimeError):
    """A chain call failed (RPC unreachable, transaction reverted, receipt timed out)."""


class ContractRevertError(ChainError):
    """A contract call reverted; `error_name` and `args` decode the custom error when the ABI knows it."""

    def __init__(self, message: str, error_name: str | None = None, args: tuple[object, ...] = ()) -> None:
        super().__init__(message)
        self.error_name = error_name
        self.error_args = args


class DevnetError(NodeError, RuntimeError):
    """The local anvil devnet could not be started, reached or stopped."""


class SigningKeyError(NodeError, ValueError):
    """A signing key could not be loaded (missing file, wrong password, malformed)."""


class AttributionError(NodeError, ValueError):
    """Token-level attribution failed: a malformed or missing suffix-array index, bad answer ids, bad weights."""


class NotFoundError(NodeError, LookupError):
    """A request names something the node does not know (record, epoch, account, adapter id)."""


class AuthenticationError(NodeError, PermissionError):
    """No API key, or one this node does not accept (unknown or revoked); UNAUTHENTICATED / HTTP 401."""


class SignatureError(AuthenticationError):
    """A client's EIP-712 request signature was refused (loraledger.node.serving.signing); UNAUTHENTICATED / 401.

    `reason` is one of "malformed", "expired", "too_far", "mismatch", "replayed"; the message says what to fix.
    """

    def __init__(self, message: str, reason: str = "malformed") -> None:
        super().__init__(message)
        self.reason = reason


class PermissionDeniedError(NodeError, PermissionError):
    """The caller is known but may not do this (scope, adapter access, a path outside the roots); 403."""


class UnavailableError(NodeError, RuntimeError):
    """The node cannot take the request now (shutting down, or a dependency is down); retry elsewhere or later."""


class LineageMismatchError(NodeError, ValueError):
    """An adapter's files do not match what the chain registered (weights hash, base model, datanets)."""
