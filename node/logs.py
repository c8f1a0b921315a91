"""Log output of every `loraledger` command: text for people, or one JSON object per line for log pipelines.

    loraledger --log-format json node run ...     # {"ts": ..., "level": "INFO", "logger": ..., "message": ...}

A request's id is carried in a context variable (`request_context`) while the request path runs, and every line
logged inside it carries `"request_id"`, whichever logger wrote it (asyncio tasks and `asyncio.to_thread`
workers inherit the context). Lines of the engine's own thread belong to no single request and carry none.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from pythonjsonlogger.json import JsonFormatter

LOG_FORMATS = ("text", "json")

_request_id: ContextVar[str] = ContextVar("loraledger_request_id", default="")


@contextmanager
def request_context(request_id: str) -> Iterator[None]:
    """Every line logged inside the block (and in tasks or threads started from it) names `request_id`."""
    token = _request_id.set(request_id)
    try:
        yield
    finally:
        _request_id.reset(token)


def set_request_id(request_id: str) -> None:
    """Name the request the current context serves (for a generator that cannot wrap its body in a block)."""
    _request_id.set(request_id)


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        rid = _request_id.get()
        if rid:
            record.request_id = rid
        return True


HANDLER_NAME = "loraledger"  # the root handler setup_logging installs (tests take it off again by this name)


def setup_logging(fmt: str = "text", verbose: bool = False) -> None:
    """Configure the root logger once for a command: `fmt` "text" or "json" (ValueError naming the choices)."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"--log-format {fmt!r}: choose one of {', '.join(LOG_FORMATS)}")
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(HANDLER_NAME)
    handler.addFilter(_RequestIdFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter(
            "{asctime}{levelname}{name}{message}", style="{", rename_fields={
                "asctime": "ts", "levelname": "level", "name": "logger"}))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
