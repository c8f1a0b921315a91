"""The request path both APIs share: admission, validation into one engine request, streaming, records.

    service = GenerationService(engine, catalog=..., records=..., max_queue=256, authorizer=..., access=...)
    principal = service.authorizer.authorize(bearer, "infer")        # the API key (auth.py)
    account = service.client_account(principal, digest, claimed, signature, deadline)   # signed or key-bound
    slot = service.admit(account)                        # CapacityError when max_queue requests are held
    gen = await service.prepare(prompt, pairs, params, client_id, priority, call, account)  # + access check
    async for item in service.run(slot, gen, call):      # list[TokenDelta] ... then one Finished
        ...
    service.end(call)                                    # log line, metrics, tokens charged to the key
    slot.release()                                       # always (idempotent): frees the queue place and, if the
                                                         # request did not finish, cancels it in the engine

The gRPC servicer (`servicers.py`) and the HTTP API (`http_api.py`) are thin translations around this, so one
request over either API yields the same engine request, the same answer and the same attribution record.

Records (`RecordSink`), one per request that produced tokens:
    finished ("stop" / "length")         committed BEFORE `run` yields its `Finished` (shielded: a client leaving
                                         or shutdown cancelling the call does not stop it)
    abandoned after tokens were produced the client left, its deadline passed, or the grace period of a shutdown
    (or cancelled by the engine)         ended: `release` cancels the engine request and, once the engine's final
                                         result is in, a record of the tokens it generated is committed in the
                                         background; `flush` (shutdown) waits for these too
    no token produced, or failed         no record
    base model only                      no record: fees come from adapters (docs/ARCHITECTURE.md), so a request
                                         without one costs nothing and pays nobody; the sink returns None for it

One JSON line per request goes to the `loraledger.requests` logger (`CallLog.emit`), and the request's metrics
(`metrics.py`) are observed at the same time.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from loraledger.inference.adapter_mix import AdapterMix
from loraledger.inference.engine import Engine
from loraledger.inference.errors import CapacityError, EngineError, InvalidRequestError
from loraledger.inference.requests import GenerationRequest, GenerationResult, RequestHandle, TokenDelta
from loraledger.inference.sequence import SamplingParams
from loraledger.node.errors import AuthenticationError, NodeError, UnavailableError
from loraledger.node.logs import set_request_id
from loraledger.node.serving.auth import OPEN, Authorizer, Principal
from loraledger.node.serving.signing import SignatureVerifier
from loraledger.node.serving.views import (
    AdapterCatalog,
    AttributionSummary,
    BaseOnlyCatalog,
    FinishedRequest,
    NoRecords,
    RecordSink,
)

if TYPE_CHECKING:
    from loraledger.node.serving.metrics import NodeMetrics

AdapterAccessCheck = Callable[[list[str], str], None]
"""access(store keys, client account): raises PermissionDeniedError naming the first adapter `account` may not use."""

log = logging.getLogger(__name__)
request_log = logging.getLogger("loraledger.requests")

CHAT_ROLES = frozenset({"system", "user", "assistant"})
_BYTES32_RE = re.compile(r"^0x[0-9a-fA-F]{64}$")


def request_id_bytes32(request_id: str) -> str:
    """The bytes32 form records use: the id itself when it is `0x` + 64 hex (lowercased), else
    `0x` + sha256(utf-8 of the id)."""
    if _BYTES32_RE.match(request_id):
        return request_id.lower()
    return "0x" + hashlib.sha256(request_id.encode("utf-8")).hexdigest()


def new_request_id() -> str:
    """A fresh server-assigned id, already in bytes32 form."""
    return "0x" + secrets.token_hex(32)


def chat_prompt(engine: Engine, messages: list[tuple[str, str]]) -> list[int]:
    """The ids of chat `messages` [(role, content)] rendered with the tokenizer's chat template."""
    if not messages:
        raise InvalidRequestError("chat has no messages; send at least one {role, content}")
    for i, (role, _) in enumerate(messages):
        if role not in CHAT_ROLES:
            raise InvalidRequestError(f"chat message {i} has role {role!r}; use one of {sorted(CHAT_ROLES)}")
    return engine.tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in messages])


@dataclass
class CallLog:
    """What one request leaves behind when it ends (`emit`): one structured log line and its metrics."""

    method: str
    api: str = "grpc"
    request_id: str = ""
    adapters: list[tuple[str, float]] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = ""
    status: str = "OK"
    resolved: bool = False  # the adapters were checked and found (metrics label by their names only then)
    fee: int = 0
    adapter_fees: tuple[int, ...] = ()
    started: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    last_token_at: float | None = None
    inter_token: list[float] = field(default_factory=list)
    principal: Principal = OPEN

    def tokens_arrived(self, n: int) -> None:
        """`n` tokens reached the request's stream now: time to first token, then one gap per later token (the
        mean gap over the batch; tokens that came in the first batch with the first token came after 0 s)."""
        now = time.monotonic()
        if self.first_token_at is None:
            self.first_token_at = now
            self.inter_token.extend([0.0] * (n - 1))
        elif self.last_token_at is not None and n > 0:
            self.inter_token.extend([(now - self.last_token_at) / n] * n)
        self.last_token_at = now

    def emit(self, metrics: NodeMetrics | None = None) -> None:
        elapsed = time.monotonic() - self.started
        request_log.info(json.dumps({
            "event": "request", "api": self.api, "method": self.method, "id": self.request_id,
            "adapters": [[k, w] for k, w in self.adapters], "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens, "finish_reason": self.finish_reason,
            "status": self.status, "latency_ms": round(elapsed * 1000.0, 3),
        }, separators=(",", ":")))
        if metrics is not None:
            metrics.observe_request(self, elapsed)


@dataclass(frozen=True)
class Finished:
    """The end of one request: the engine's result and, when a record was kept, its summary."""

    result: GenerationResult
    summary: AttributionSummary | None


class EngineFailure(EngineError, RuntimeError):
    """The engine finished a request with reason "error" (a failed step); maps to INTERNAL / 500."""


class Admission:
    """One admitted request: `release` (idempotent) gives its queue place back, cancels the engine request
    unless it finished and, unless its final result was handled, has the abandoned request recorded."""

    def __init__(self, service: GenerationService, account: str) -> None:
        self._service = service
        self.account = account
        self._loop = asyncio.get_running_loop()
        self.handle: RequestHandle | None = None
        self.gen: GenerationRequest | None = None
        self.finalised = False
        self._released = False

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._service._inflight -= 1
        handle = self.handle
        if handle is None or self.finalised:
            return
        if not handle.done:
            self._service.engine.cancel(handle.request_id)
        if self.gen is not None:
            self._service._record_abandoned(handle, self.gen, self.account, self._loop)


class GenerationService:
    """Admission, request building, streaming and records over one running `Engine` (module docstring)."""

    def __init__(
        self,
        engine: Engine,
        *,
        catalog: AdapterCatalog | None = None,
        records: RecordSink | None = None,
        max_queue: int = 256,
        default_max_tokens: int = 64,
        metrics: NodeMetrics | None = None,
        authorizer: Authorizer | None = None,
        access: AdapterAccessCheck | None = None,
        signatures: SignatureVerifier | None = None,
    ) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.engine = engine
        self.catalog: AdapterCatalog = catalog if catalog is not None else BaseOnlyCatalog()
        self.records: RecordSink = records if records is not None else NoRecords()
        self.max_queue = max_queue
        self.default_max_tokens = default_max_tokens
        self.metrics = metrics
        self.authorizer = authorizer if authorizer is not None else Authorizer("none", None)
        self.access = access
        self.signatures = signatures
        self.accepting = True
        self._inflight = 0
        self._commits: set[asyncio.Future[AttributionSummary | None]] = set()
        self._abandoned: set[asyncio.Future[None]] = set()

    @property
    def inflight(self) -> int:
        """Requests admitted and not yet released."""
        return self._inflight

    def admit(self, account: str = "") -> Admission:
        """A queue place for one request; CapacityError when `max_queue` are held (the caller retries later),
        UnavailableError once the node stopped accepting (shutdown)."""
        if not self.accepting:
            raise UnavailableError("the node is shutting down; send the request to another node or retry later")
        if self._inflight >= self.max_queue:
            raise CapacityError(
                f"the node holds {self._inflight} requests (server.max_queue={self.max_queue}); retry later"
            )
        self._inflight += 1
        return Admission(self, account)

    async def prepare(self, prompt: str | list[int], adapters: AdapterMix | Iterable[tuple[str, float]],
                      params: SamplingParams, client_id: str, priority: int = 0,
                      call: CallLog | None = None, account: str = "") -> GenerationRequest:
        """The engine request: the mix checked once (`AdapterMix`), its names resolved to store keys through
        the catalog (on-chain ids verified against the registry on first use), and each adapter's access
        checked for `account` (the verified client account, "" for none; PermissionDeniedError names a denied
        adapter)."""
        set_request_id(client_id)
        if call is not None:
            call.request_id = client_id
        mix = AdapterMix.of(adapters)
        if call is not None:
            call.adapters = list(mix.pairs)
        if mix:
            def resolve_and_check() -> list[str]:  # a worker thread: a first use may read the chain
                keys = [self.catalog.resolve(k) for k in mix.keys]
                if self.access is not None:
                    self.access(keys, account)
                return keys

            mix = mix.rekeyed(await asyncio.to_thread(resolve_and_check))
        if call is not None:
            call.resolved = True
        if isinstance(prompt, str) and not prompt:
            raise InvalidRequestError("the prompt is empty; send a non-empty prompt or chat messages")
        return GenerationRequest(prompt, params, request_id_bytes32(client_id), mix, int(priority))

    async def run(self, slot: Admission, gen: GenerationRequest, call: CallLog
                  ) -> AsyncIterator[list[TokenDelta] | Finished]:
        """Submit `gen`, yield its deltas (everything piled up since the last wake-up in one list), then one
        `Finished` after the record (if any) is committed. The caller releases `slot` when the call ends."""
        slot.gen = gen
        slot.handle = self.engine.submit(gen)
        async for item in slot.handle:
            if isinstance(item, TokenDelta):
                batch = [item, *slot.handle.drain_deltas_nowait()]
                call.tokens_arrived(len(batch))
                yield batch
                continue
            slot.finalised = True  # from here this generator owns the record
            yield await self._final(item, gen, slot.account, call)

    async def _final(self, result: GenerationResult, gen: GenerationRequest, account: str,
                     call: CallLog) -> Finished:
        call.prompt_tokens, call.completion_tokens = result.prompt_tokens, result.completion_tokens
        call.finish_reason = result.finish_reason
        if result.finish_reason == "error":
            raise EngineFailure(f"the engine failed this request: {result.error}")
        summary = None
        if result.finish_reason in ("stop", "length") or result.completion_tokens > 0:
            summary = await self._commit(_finished(result, gen, account))
        if summary is not None:
            call.fee, call.adapter_fees = int(summary.fee), tuple(summary.adapter_fees)
        return Finished(result, summary)

    async def _commit(self, finished: FinishedRequest) -> AttributionSummary | None:
        """records.commit in a worker thread, shielded: a client leaving (or shutdown cancelling the call) never
        stops a record of a finished request from being written; `flush` waits for these."""
        fut = asyncio.ensure_future(asyncio.to_thread(self.records.commit, finished))
        self._commits.add(fut)
        fut.add_done_callback(self._commits.discard)
        return await asyncio.shield(fut)

    def client_account(self, principal: Principal, digest: Callable[[], str], account: str = "",
                       signature: str = "", deadline: int = 0) -> str:
        """The request's client account: the signer of a verified EIP-712 signature over the request's hash
        (`digest()`, `signing.request_hash` of what the client sent), else the account bound to its API key,
        else "" (an account claimed without a signature is refused rather than believed)."""
        if signature:
            if self.signatures is None:
                raise AuthenticationError("this node takes no signed requests (it has no operator key and chain "
                                          "deployment to name in the signature); send the request unsigned")
            return str(self.signatures.verify(digest(), account, int(deadline), signature))
        if account and account.lower() != principal.account.lower():
            raise AuthenticationError("client_account is taken only from a signature: sign the request (EIP-712, "
                                      "`loraledger generate --key-file`) or use an API key bound to the account")
        return principal.account

    def end(self, call: CallLog) -> None:
        """A request ended: its log line and metrics, and its tokens charged to its key's rate limit."""
        call.emit(self.metrics)
        self.authorizer.spent(call.principal, call.prompt_tokens + call.completion_tokens)

    def _record_abandoned(self, handle: RequestHandle, gen: GenerationRequest, account: str,
                          loop: asyncio.AbstractEventLoop) -> None:
        """Schedule the record of a request whose call ended before its final result was handled, on `loop`
        (the service's); tracked so that `flush` waits for it."""
        if not gen.adapters:
            return  # base model only: no record (module docstring)

        def spawn() -> None:
            task = asyncio.ensure_future(self._commit_abandoned(handle, gen, account))
            self._abandoned.add(task)
            task.add_done_callback(self._abandoned.discard)

        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        if here is loop:
            spawn()
        else:  # a gRPC done-callback from another thread
            loop.call_soon_threadsafe(spawn)

    async def _commit_abandoned(self, handle: RequestHandle, gen: GenerationRequest, account: str,
                                timeout: float = 60.0) -> None:
        """Wait for the engine's final result of an abandoned request (it was cancelled, or finished unread);
        commit its record when it produced tokens. Failures are logged: nobody is left to answer."""
        try:
            result = await asyncio.to_thread(handle.result, timeout)
            if result.completion_tokens == 0 or result.finish_reason == "error":
                return
            summary = await self._commit(_finished(result, gen, account))
            if summary is not None:
                log.info("record %s of abandoned request %s (%d tokens, %s)", summary.record_hash,
                         result.request_id, result.completion_tokens, result.finish_reason)
        except (EngineError, NodeError, TimeoutError) as e:
            log.error("could not record abandoned request %s: %s", handle.request_id, e)

    async def flush(self, release_timeout: float = 10.0) -> None:
        """Wait until every admitted request has been released (after the servers stopped, their handlers are
        being cancelled; at most `release_timeout` s), then for every record commit in progress (finished and
        abandoned requests), then flush the sink (durable on return)."""
        deadline = time.monotonic() + release_timeout
        while self._inflight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self._inflight > 0:
            log.warning("%d request(s) still held after %.1f s of shutdown; their records may be missing",
                        self._inflight, release_timeout)
        while self._abandoned or self._commits:
            await asyncio.gather(*self._abandoned, *self._commits, return_exceptions=True)
        await asyncio.to_thread(self.records.flush)


def _finished(result: GenerationResult, gen: GenerationRequest, account: str) -> FinishedRequest:
    return FinishedRequest(
        request_id=result.request_id, adapters=tuple(gen.adapters), prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens, text=result.text, token_ids=result.token_ids,
        client_account=account,
    )
