"""What a caller hands the engine and what it gets back: `GenerationRequest` in; through its `RequestHandle`,
`TokenDelta`s then one `GenerationResult` out.

    handle = engine.submit(GenerationRequest("Hello", SamplingParams(max_tokens=32), adapters=[("law", 1.0)]))
    async for item in handle: ...          # TokenDelta, TokenDelta, ..., then one GenerationResult
    handle.result(timeout=30)              # or block a plain thread until the result

Text. `TokenDelta.text_delta` never holds half a UTF-8 character nor text that might become part of a stop
string; concatenated, the deltas equal `GenerationResult.text` (for a cancelled request, text held back
at that moment is dropped). `token_ids` hold every sampled token, including the EOS / stop token / the token
that completed a stop string; `text` leaves out special tokens, the text of a stop token id, and everything
from a stop string on (`loraledger.inference.text_stream`).

Threads. The engine thread fills a handle (`RequestHandle.push`); the handle delivers to the asyncio loop that
iterates it through `loop.call_soon_threadsafe`, at most one wake-up per loop per engine step (`wake_all`), and
to plain threads through `result()`.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import AsyncIterator, Callable, Iterable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

from loraledger.inference.adapter_mix import BASE_MODEL, AdapterMix
from loraledger.inference.sequence import FinishReason, SamplingParams


@dataclass
class GenerationRequest:
    """One request: a prompt (text, or token ids), how to sample, which adapters to apply with which weights.

    `adapters`: an `AdapterMix`, or (key, merge weight) pairs, which are built into one here (`AdapterMix.of`:
    `AdapterMixError` when malformed); after construction it is always a checked `AdapterMix`.
    `priority`: smaller is served first (default 0). `request_id`: unique among live requests; None = a uuid.
    """

    prompt: str | Seq[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str | None = None
    adapters: AdapterMix = BASE_MODEL
    priority: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.adapters, AdapterMix):
            pairs: Iterable[tuple[str, float]] = self.adapters
            self.adapters = AdapterMix.of(pairs)


@dataclass(frozen=True)
class TokenDelta:
    """One generated token as streamed: its id, the new text it makes visible (may be ""), its logprob and
    top alternatives when the request asked for logprobs."""

    token_id: int
    text_delta: str
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] | None = None


@dataclass(frozen=True)
class GenerationResult:
    """The final word on one request."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    adapters: tuple[tuple[str, float], ...] = ()  # the request's (key, merge weight) pairs
    logprobs: tuple[float, ...] | None = None
    error: str | None = None  # why, when finish_reason == "error"


HandleItem = TokenDelta | GenerationResult
Wakes = dict[asyncio.AbstractEventLoop, list[asyncio.Event]]  # consumers to wake at the end of a step, by loop


def _set_all(events: list[asyncio.Event]) -> None:
    for event in events:
        event.set()


def wake_all(wakes: Wakes) -> None:
    """One `call_soon_threadsafe` per consumer loop, setting every event queued for it this step."""
    for loop, events in wakes.items():
        if not loop.is_closed():
            loop.call_soon_threadsafe(_set_all, events)


class RequestHandle:
    """The consumer's side of one request: an async iterator of `TokenDelta`s ending with one
    `GenerationResult`, or `result()` to block a plain thread until done. Filled by the engine thread;
    `cancel(request_id)` is the engine's (`Engine.cancel`)."""

    def __init__(self, request_id: str, cancel: Callable[[str], bool]) -> None:
        self.request_id = request_id
        self._cancel = cancel
        self._lock = threading.Lock()
        self._items: collections.deque[HandleItem] = collections.deque()
        self._final: GenerationResult | None = None
        self._done = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._consumed_final = False
        self._wake_scheduled = False  # a wake.set is on its way to the consumer's loop

    # engine side
    def push(self, item: HandleItem, wakes: Wakes | None = None) -> None:
        """Queue `item` for the consumer (engine thread only). Its loop is woken now, or, given `wakes`, once
        per loop for the whole step by `wake_all(wakes)` (a cross-thread wake-up is a syscall and a GIL
        hand-over: one per step, not one per stream)."""
        with self._lock:
            self._items.append(item)
            if isinstance(item, GenerationResult):
                self._final = item
            loop, wake = self._loop, self._wake
            notify = not self._wake_scheduled  # one cross-thread wake-up per batch the consumer has not seen
            if loop is not None and notify:
                self._wake_scheduled = True
        if isinstance(item, GenerationResult):
            self._done.set()
        if loop is not None and wake is not None and notify and not loop.is_closed():
            if wakes is None:
                loop.call_soon_threadsafe(wake.set)
            else:
                wakes.setdefault(loop, []).append(wake)

    # consumer side
    @property
    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> GenerationResult:
        """Block until the request finishes; return its result (needs the engine loop or someone stepping)."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request_id!r} not finished after {timeout} s")
        assert self._final is not None
        return self._final

    def cancel(self) -> bool:
        """Cancel the request (`Engine.cancel`); False if it is no longer live."""
        return self._cancel(self.request_id)

    def drain_deltas_nowait(self) -> list[TokenDelta]:
        """The `TokenDelta`s already produced and not yet consumed, without waiting (the final result, if
        queued, stays for the next `__anext__`). Lets a streaming consumer send what piled up in one message."""
        out: list[TokenDelta] = []
        with self._lock:
            while self._items and isinstance(self._items[0], TokenDelta):
                out.append(self._items.popleft())  # type: ignore[arg-type]
        return out

    def __aiter__(self) -> AsyncIterator[HandleItem]:
        return self

    async def __anext__(self) -> HandleItem:
        if self._wake is None:
            with self._lock:
                self._loop = asyncio.get_running_loop()
                self._wake = asyncio.Event()
        while True:
            with self._lock:
                if self._items:
                    item = self._items.popleft()
                    if isinstance(item, GenerationResult):
                        self._consumed_final = True
                    return item
                if self._consumed_final:
                    raise StopAsyncIteration
                self._wake.clear()
                self._wake_scheduled = False
            await self._wake.wait()
