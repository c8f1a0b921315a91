"""Typed errors of the engine. The engine knows nothing of chains; the node maps these to gRPC codes.

One base, `EngineError`; each subclass also inherits the fitting built-in.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base of every error raised by the `inference` package."""


class ModelLoadError(EngineError, ValueError):
    """A checkpoint is missing a file, names an unsupported architecture, or has malformed tensors."""


class InvalidRequestError(EngineError, ValueError):
    """A request is malformed: empty prompt, bad sampling values, prompt over the context, ..."""


class AdapterMixError(InvalidRequestError):
    """A request's adapter list is malformed: an empty or repeated key, a weight not finite and > 0, weights
    not summing to 1 (`loraledger.inference.adapter_mix.AdapterMix`)."""


class AdapterNotFoundError(EngineError, LookupError):
    """A request or call names an adapter the engine does not know."""


class AdapterMismatchError(EngineError, ValueError):
    """An adapter's weights hash or base model does not match what the caller expects."""


class AdapterFormatError(EngineError, ValueError):
    """An adapter directory is malformed (missing file, bad config, rank over the maximum, bad shapes)."""


class CapacityError(EngineError, RuntimeError):
    """The engine cannot take more work now (queue full); retry later."""


class KVCacheError(EngineError, RuntimeError):
    """The KV block pool was misused (unknown or double-freed sequence) or has too few free blocks."""


class ModelConfigError(EngineError, ValueError):
    """Model sizes asked for are inconsistent or out of range (e.g. `init-tiny` with heads not dividing hidden)."""


class BackendError(EngineError, ValueError):
    """A backend name (attention, ...) is unknown, or that backend cannot run here (package missing)."""


class EngineConfigError(EngineError, ValueError):
    """An engine configuration value is invalid; the message names it and the accepted range."""


class QuantizationError(EngineError, ValueError):
    """A base model cannot be quantized as asked: unknown mode, bitsandbytes missing, projections already wrapped."""
