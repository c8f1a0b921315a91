"""The gRPC servicers of a node: `Inference` (generation, adapters) and `Attribution` (records, proofs, epochs).

    request  --validate-->  GenerationRequest  --engine.submit-->  handle  --async for-->  deltas ... result
                                                                                              |
                                       record_sink.commit(FinishedRequest) -> AttributionSummary (in a thread)

Validation, before anything reaches the engine (InvalidRequestError -> INVALID_ARGUMENT):
    adapters   names non-empty and distinct; weights finite and > 0 summing to 1 within 1e-6; a single adapter
               with weight 0 means weight 1
    sampling   proto fields -> `SamplingParams` (temperature 0 = greedy by default; max_tokens 0 = the node's
               default); `SamplingParams` checks each value's range
    input      a non-empty prompt, or chat messages rendered with the tokenizer's chat template
Admission: at most `max_queue` requests in flight in this servicer; beyond it CapacityError (RESOURCE_EXHAUSTED).
Client cancel or deadline: grpc.aio cancels the handler task; its `finally` cancels the engine request at once,
which frees its KV blocks. Every error becomes a status through `loraledger.node.serving.grpc_status.status_for`.

Records (`RecordSink`), one per request that produced tokens:
    finished ("stop" / "length")         committed BEFORE the final response is sent (shielded: a client leaving
                                         or shutdown cancelling the call does not stop it)
    abandoned after tokens were produced the client left, its deadline passed, or the grace period of a shutdown
    (or cancelled by the engine)         ended: the engine request is cancelled and, once the engine's final
                                         result is in, a record of the tokens it generated is committed in the
                                         background; `flush` (shutdown) waits for these too
    no token produced, or failed         no record
    base model only                      no record: fees come from adapters (docs/ARCHITECTURE.md), so a request without
                                         one costs nothing and pays nobody; the sink returns None for it

The servicers depend on small Protocols (`AdapterCatalog`, `RecordSink`, `AttributionQueries`) that the node
process (`loraledger.node.serving.app`) implements with the adapter store, the record log and the chain; tests may plug in
their own. One JSON line per request goes to the `loraledger.requests` logger.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import re
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import grpc
from loraledger.inference.engine import Engine, GenerationRequest, GenerationResult, RequestHandle, TokenDelta
from loraledger.inference.errors import CapacityError, EngineError, InvalidRequestError
from loraledger.inference.sequence import SamplingParams
from loraledger.node.errors import NodeError, NotFoundError
from loraledger.node.serving.grpc_status import status_for
from loraledger.node.serving.views import (
    AdapterCatalog,
    AdapterDescription,
    AttributionQueries,
    AttributionSummary,
    BaseOnlyCatalog,
    FinishedRequest,
    NoRecords,
    RecordSink,
    RecordView,
)
from loraledger.proto.loraledger.v1 import loraledger_pb2 as pb
from loraledger.proto.loraledger.v1 import loraledger_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
request_log = logging.getLogger("loraledger.requests")

WEIGHT_TOLERANCE = 1e-6
CHAT_ROLES = frozenset({"system", "user", "assistant"})
_BYTES32_RE = re.compile(r"^0x[0-9a-fA-F]{64}$")


# ---- what the servicers need from the rest of the node -------------------------------------------------------


# ---- request conversion ----------------------------------------------------------------------------------


def request_id_bytes32(request_id: str) -> str:
    """The bytes32 form records use: the id itself when it is `0x` + 64 hex (lowercased), else
    `0x` + sha256(utf-8 of the id)."""
    if _BYTES32_RE.match(request_id):
        return request_id.lower()
    return "0x" + hashlib.sha256(request_id.encode("utf-8")).hexdigest()


def new_request_id() -> str:
    """A fresh server-assigned id, already in bytes32 form."""
    return "0x" + secrets.token_hex(32)


def adapter_weights(refs: Sequence[pb.AdapterRef]) -> list[tuple[str, float]]:
    """[(name, weight)] of a request, checked: distinct non-empty names, finite weights > 0 summing to 1
    (|sum - 1| <= 1e-6); a lone adapter with weight 0 gets weight 1. Empty list = the base model alone."""
    if not refs:
        return []
    if len(refs) == 1 and refs[0].weight == 0.0:
        pairs = [(refs[0].adapter, 1.0)]
    else:
        pairs = [(r.adapter, float(r.weight)) for r in refs]
    seen: set[str] = set()
    for name, weight in pairs:
        if not name:
            raise InvalidRequestError("an adapter entry has an empty name; give an on-chain id or an alias")
        if name in seen:
            raise InvalidRequestError(f"adapter {name!r} appears twice; list each adapter once with its weight")
        seen.add(name)
        if not math.isfinite(weight) or weight <= 0:
            raise InvalidRequestError(
                f"adapter {name!r} has weight {weight}; weights must be > 0 (and sum to 1 across the adapters)"
            )
    total = sum(w for _, w in pairs)
    if abs(total - 1.0) > WEIGHT_TOLERANCE:
        raise InvalidRequestError(
            f"adapter weights {[w for _, w in pairs]} sum to {total:.9g}; they must sum to 1 "
            f"(within {WEIGHT_TOLERANCE}); e.g. 0.7 and 0.3"
        )
    return pairs


def sampling_from_proto(sp: pb.SamplingParams, default_max_tokens: int) -> SamplingParams:
    """proto SamplingParams -> engine SamplingParams; unset optional fields take the proto's documented
    defaults (temperature 0 = greedy, top_p 1, top_k 0, repetition_penalty 1, no seed). InvalidRequestError
    names the value out of range."""
    return SamplingParams(
        max_tokens=int(sp.max_tokens) or default_max_tokens,
        temperature=float(sp.temperature) if sp.HasField("temperature") else 0.0,
        top_p=float(sp.top_p) if sp.HasField("top_p") else 1.0,
        top_k=int(sp.top_k) if sp.HasField("top_k") else 0,
        repetition_penalty=float(sp.repetition_penalty) if sp.HasField("repetition_penalty") else 1.0,
        stop=tuple(sp.stop),
        stop_token_ids=tuple(int(t) for t in sp.stop_token_ids),
        seed=int(sp.seed) if sp.HasField("seed") else None,
        logprobs=int(sp.logprobs) if sp.logprobs else None,
    )


def prompt_from_proto(request: pb.GenerateRequest, engine: Engine) -> str | list[int]:
    """The prompt text, or the ids of the chat messages rendered with the tokenizer's chat template."""
    which = request.WhichOneof("input")
    if which == "chat":
        messages = list(request.chat.messages)
        if not messages:
            raise InvalidRequestError("chat has no messages; send at least one {role, content}")
        for i, m in enumerate(messages):
            if m.role not in CHAT_ROLES:
                raise InvalidRequestError(
                    f"chat message {i} has role {m.role!r}; use one of {sorted(CHAT_ROLES)}"
                )
        return engine.tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in messages])
    if which == "prompt" and request.prompt:
        return request.prompt
    raise InvalidRequestError("the prompt is empty; set `prompt` or `chat`")


def summary_to_proto(s: AttributionSummary | None) -> pb.AttributionSummary | None:
    if s is None:
        return None
    return pb.AttributionSummary(
        record_hash=s.record_hash,
        request_id=s.request_id,
        adapter_ids=[str(i) for i in s.adapter_ids],
        weights_bps=list(s.weights_bps),
        datanet_ids=[str(i) for i in s.datanet_ids],
        fee=str(s.fee),
        attribution_hash=s.attribution_hash,
        top_contributors=[pb.ContributorShare(account=c.account, weight=str(c.weight), share=c.share)
                          for c in s.top_contributors],
        epoch=s.epoch,
    )


def adapter_to_proto(a: AdapterDescription) -> pb.AdapterInfo:
    return pb.AdapterInfo(
        key=a.key, alias=a.alias, onchain_id="" if a.onchain_id is None else str(a.onchain_id),
        weights_hash=a.weights_hash, base_model_hash=a.base_model_hash, rank=a.rank, resident=a.resident,
        datanet_ids=[str(d) for d in a.datanet_ids], fee_per_token=str(a.fee_per_token),
    )


def _logprob_proto(d: TokenDelta) -> pb.TokenLogprob:
    top = d.top_logprobs or ()
    return pb.TokenLogprob(
        token_id=d.token_id, logprob=d.logprob if d.logprob is not None else 0.0,
        top_token_ids=[t for t, _ in top], top_logprobs=[lp for _, lp in top],
    )


# ---- per-call bookkeeping ----------------------------------------------------------------------------------


@dataclass
class _CallLog:
    """Fields of the one structured log line a request leaves (emitted by `emit`)."""

    method: str
    request_id: str = ""
    adapters: list[tuple[str, float]] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = ""
    status: str = "OK"
    started: float = field(default_factory=time.monotonic)

    def emit(self) -> None:
        request_log.info(json.dumps({
            "event": "request", "method": self.method, "id": self.request_id,
            "adapters": [[k, w] for k, w in self.adapters], "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens, "finish_reason": self.finish_reason,
            "status": self.status, "latency_ms": round((time.monotonic() - self.started) * 1000.0, 3),
        }, separators=(",", ":")))


async def _abort(context: grpc.aio.ServicerContext, error: BaseException, call: _CallLog | None = None) -> None:
    """End the call with the status `status_for(error)` and the error's message (raises AbortError)."""
    code = status_for(error)
    if call is not None:
        call.status = code.name
    if code is grpc.StatusCode.INTERNAL:
        log.error("internal error serving %s: %s", call.method if call else "call", error, exc_info=error)
    await context.abort(code, str(error) or type(error).__name__)


# ---- Inference ---------------------------------------------------------------------------------------------


class InferenceServicer(pb_grpc.InferenceServicer):
    """Generate / GenerateStream / LoadAdapter / UnloadAdapter / ListAdapters over one running `Engine`."""

    def __init__(
        self,
        engine: Engine,
        *,
        catalog: AdapterCatalog | None = None,
        records: RecordSink | None = None,
        max_queue: int = 256,
        default_max_tokens: int = 64,
    ) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.engine = engine
        self.catalog: AdapterCatalog = catalog if catalog is not None else BaseOnlyCatalog()
        self.records: RecordSink = records if records is not None else NoRecords()
        self.max_queue = max_queue
        self.default_max_tokens = default_max_tokens
        self._inflight = 0
        self._commits: set[asyncio.Future[AttributionSummary | None]] = set()
        self._abandoned: set[asyncio.Future[None]] = set()

    @property
    def inflight(self) -> int:
        """Requests admitted and not yet answered."""
        return self._inflight

    # ---- the request path ----------------------------------------------------------------------------------
    async def _prepare(self, request: pb.GenerateRequest, call: _CallLog) -> tuple[GenerationRequest, str]:
        """Validate and resolve `request`; returns the engine request and the id the client sees."""
        client_id = request.request_id or new_request_id()
        call.request_id = client_id
        pairs = adapter_weights(request.adapters)
        call.adapters = pairs
        if pairs:
            keys = await asyncio.to_thread(lambda: [self.catalog.resolve(name) for name, _ in pairs])
            pairs = [(k, w) for k, (_, w) in zip(keys, pairs, strict=True)]
        params = sampling_from_proto(request.sampling, self.default_max_tokens)
        prompt = prompt_from_proto(request, self.engine)
        return GenerationRequest(prompt, params, request_id_bytes32(client_id), tuple(pairs),
                                 int(request.priority)), client_id

    async def _generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext, call: _CallLog
    ) -> AsyncIterator[list[TokenDelta] | pb.GenerateResponse]:
        """Admit, submit, stream the engine's deltas, then yield the final response (record committed).

        The engine request is cancelled in `finally` unless it finished: a client that goes away (or runs past
        its deadline) frees its sequence and KV blocks at once."""
        if self._inflight >= self.max_queue:
            raise CapacityError(
                f"the node holds {self._inflight} requests (server.max_queue={self.max_queue}); retry later"
            )
        self._inflight += 1
        slot = _Admission(self, request.client_account)
        # runs when the RPC ends for any reason (client cancel, deadline, shutdown), even before this generator
        # is finalised: the engine drops the sequence and frees its KV blocks now
        context.add_done_callback(lambda _ctx: slot.release())
        try:
            gen, client_id = await self._prepare(request, call)
            slot.gen = gen
            slot.handle = self.engine.submit(gen)
            async for item in slot.handle:
                if isinstance(item, TokenDelta):
                    # with what else piled up since: one stream message per wake-up, not per token
                    yield [item, *slot.handle.drain_deltas_nowait()]
                    continue
                slot.finalised = True  # from here `_final` owns the record
                yield await self._final(item, gen, client_id, request.client_account, call)
        finally:
            slot.release()

    async def _final(self, result: GenerationResult, gen: GenerationRequest, client_id: str, account: str,
                     call: _CallLog) -> pb.GenerateResponse:
        call.prompt_tokens, call.completion_tokens = result.prompt_tokens, result.completion_tokens
        call.finish_reason = result.finish_reason
        if result.finish_reason == "error":
            raise _EngineFailure(f"the engine failed this request: {result.error}")
        summary = None
        if result.finish_reason in ("stop", "length") or result.completion_tokens > 0:
            summary = await self._commit(_finished(result, gen, account))
        return pb.GenerateResponse(
            request_id=client_id, text=result.text, token_ids=list(result.token_ids),
            finish_reason=result.finish_reason,
            usage=pb.Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens),
            attribution=summary_to_proto(summary),
        )

    async def _commit(self, finished: FinishedRequest) -> AttributionSummary | None:
        """records.commit in a worker thread, shielded: a client leaving (or shutdown cancelling the call) never
        stops a record of a finished request from being written; `flush` waits for these."""
        fut = asyncio.ensure_future(asyncio.to_thread(self.records.commit, finished))
        self._commits.add(fut)
        fut.add_done_callback(self._commits.discard)
        return await asyncio.shield(fut)

    def _record_abandoned(self, handle: RequestHandle, gen: GenerationRequest, account: str,
                          loop: asyncio.AbstractEventLoop) -> None:
        """Schedule the record of a request whose call ended before its final result was handled, on `loop`
        (the servicer's); tracked so that `flush` waits for it."""
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
        """Wait until every admitted request has been released (after a server stop their handlers are being
        cancelled; at most `release_timeout` s), then for every record commit in progress (finished and
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

    # ---- RPCs ----------------------------------------------------------------------------------------------
    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        call = _CallLog("Generate")
        final: pb.GenerateResponse | None = None
        logprobs: list[pb.TokenLogprob] = []
        want_logprobs = request.sampling.logprobs > 0
        try:
            async for item in self._generate(request, context, call):
                if isinstance(item, list):
                    if want_logprobs:
                        logprobs.extend(_logprob_proto(d) for d in item)
                else:
                    final = item
        except (EngineError, NodeError) as e:
            await _abort(context, e, call)
        except asyncio.CancelledError:
            call.status = "CANCELLED"
            raise
        finally:
            call.emit()
        assert final is not None, "the engine ended a request without a result"
        final.logprobs.extend(logprobs)
        return final

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        call = _CallLog("GenerateStream")
        want_logprobs = request.sampling.logprobs > 0
        try:
            async for item in self._generate(request, context, call):
                if isinstance(item, list):
                    delta = pb.TextDelta(text="".join(d.text_delta for d in item),
                                         token_ids=[d.token_id for d in item])
                    if want_logprobs:
                        delta.logprobs.extend(_logprob_proto(d) for d in item)
                    yield pb.GenerateStreamResponse(delta=delta)
                else:
                    yield pb.GenerateStreamResponse(final=item)
        except (EngineError, NodeError) as e:
            await _abort(context, e, call)
        except asyncio.CancelledError:
            call.status = "CANCELLED"
            raise
        finally:
            call.emit()

    async def LoadAdapter(self, request: pb.LoadAdapterRequest, context: grpc.aio.ServicerContext
                          ) -> pb.LoadAdapterResponse:
        if not request.adapter:
            await _abort(context, InvalidRequestError("LoadAdapter needs `adapter` (an on-chain id or an alias)"))
        try:
            info = await asyncio.to_thread(self.catalog.load, request.adapter, request.path,
                                           request.expected_weights_hash)
        except (EngineError, NodeError) as e:
            await _abort(context, e)
        return pb.LoadAdapterResponse(adapter=adapter_to_proto(info))

    async def UnloadAdapter(self, request: pb.UnloadAdapterRequest, context: grpc.aio.ServicerContext
                            ) -> pb.UnloadAdapterResponse:
        try:
            unloaded = await asyncio.to_thread(self.catalog.unload, request.adapter)
        except (EngineError, NodeError) as e:
            await _abort(context, e)
        return pb.UnloadAdapterResponse(unloaded=unloaded)

    async def ListAdapters(self, request: pb.ListAdaptersRequest, context: grpc.aio.ServicerContext
                           ) -> pb.ListAdaptersResponse:
        adapters = await asyncio.to_thread(self.catalog.list)
        return pb.ListAdaptersResponse(adapters=[adapter_to_proto(a) for a in adapters])


def _finished(result: GenerationResult, gen: GenerationRequest, account: str) -> FinishedRequest:
    return FinishedRequest(
        request_id=result.request_id, adapters=tuple(gen.adapters), prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens, text=result.text, token_ids=result.token_ids,
        client_account=account,
    )


class _Admission:
    """One admitted request: `release` (idempotent) gives its queue place back, cancels the engine request
    unless it finished and, unless the final result reached `_final`, has the abandoned request recorded."""

    def __init__(self, servicer: InferenceServicer, account: str) -> None:
        self._servicer = servicer
        self._account = account
        self._loop = asyncio.get_running_loop()
        self.handle: RequestHandle | None = None
        self.gen: GenerationRequest | None = None
        self.finalised = False
        self._released = False

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._servicer._inflight -= 1
        handle = self.handle
        if handle is None or self.finalised:
            return
        if not handle.done:
            self._servicer.engine.cancel(handle.request_id)
        if self.gen is not None:
            self._servicer._record_abandoned(handle, self.gen, self._account, self._loop)


class _EngineFailure(EngineError, RuntimeError):
    """The engine finished a request with reason "error" (a failed step); maps to INTERNAL."""


# ---- Attribution -------------------------------------------------------------------------------------------


class AttributionServicer(pb_grpc.AttributionServicer):
    """GetRecord / GetRewardProof / ListEpochs over an `AttributionQueries` (the record log and its trees)."""

    def __init__(self, queries: AttributionQueries) -> None:
        self.queries = queries

    async def GetRecord(self, request: pb.GetRecordRequest, context: grpc.aio.ServicerContext
                        ) -> pb.GetRecordResponse:
        if not request.request_id:
            await _abort(context, InvalidRequestError("GetRecord needs the request_id of a finished request"))
        rid = request_id_bytes32(request.request_id)
        try:
            view = await asyncio.to_thread(self.queries.record, rid)
            if view is None:
                raise NotFoundError(f"no record for request {request.request_id!r} ({rid}); only requests that "
                                    "finished through an on-chain adapter have one")
            return _record_response(view, self.queries.operator)
        except (EngineError, NodeError) as e:
            await _abort(context, e)
            raise  # unreachable: abort raises

    async def GetRewardProof(self, request: pb.GetRewardProofRequest, context: grpc.aio.ServicerContext
                             ) -> pb.GetRewardProofResponse:
        try:
            view = await asyncio.to_thread(self.queries.reward_proof, request.account)
            if view is None:
                raise NotFoundError(f"account {request.account!r} has no rewards in a confirmed epoch of this "
                                    "operator yet")
            return pb.GetRewardProofResponse(operator=view.operator, account=view.account,
                                             cumulative_amount=str(view.cumulative_amount), epoch=view.epoch,
                                             rewards_root=view.rewards_root, proof=list(view.proof))
        except (EngineError, NodeError) as e:
            await _abort(context, e)
            raise  # unreachable: abort raises

    async def ListEpochs(self, request: pb.ListEpochsRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ListEpochsResponse:
        try:
            epochs = await asyncio.to_thread(self.queries.epochs, int(request.limit))
        except (EngineError, NodeError) as e:
            await _abort(context, e)
        return pb.ListEpochsResponse(operator=self.queries.operator, epochs=[
            pb.EpochInfo(epoch=e.epoch, records_root=e.records_root, record_count=e.record_count,
                         rewards_root=e.rewards_root, cumulative_total=str(e.cumulative_total), state=e.state,
                         tx_hash=e.tx_hash) for e in epochs])


def _record_response(view: RecordView, operator: str) -> pb.GetRecordResponse:
    r = view.record
    record = pb.Record(
        epoch=int(r["epoch"]), request_id=r["requestId"], adapter_ids=[str(i) for i in r["adapterIds"]],
        weights_bps=[int(w) for w in r["weightsBps"]], prompt_tokens=int(r["promptTokens"]),
        completion_tokens=int(r["completionTokens"]), fee=str(r["fee"]), output_hash=r["outputHash"],
        attribution_hash=r["attributionHash"],
        contributors=_shares([(str(a), int(w)) for a, w in r["contributors"]]),
        spans=[pb.MatchedSpan(**s) for s in view.spans],
    )
    return pb.GetRecordResponse(record=record, leaf=view.leaf, settled=view.settled, records_root=view.records_root,
                                proof=list(view.proof), operator=operator)


def _shares(contributors: Sequence[tuple[str, int]]) -> list[pb.ContributorShare]:
    total = sum(w for _, w in contributors) or 1
    return [pb.ContributorShare(account=a, weight=str(w), share=w / total) for a, w in contributors]
