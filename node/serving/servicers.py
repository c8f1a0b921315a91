"""The gRPC servicers of a node: `Inference` (generation, adapters) and `Attribution` (records, proofs, epochs).

    pb.GenerateRequest --> GenerationService.prepare --> run --> deltas ... Finished --> pb.GenerateResponse

Validation and admission are the shared `GenerationService`'s (`generation.py`), records too; this module only
translates proto messages (sampling: proto fields -> `SamplingParams`, temperature 0 = greedy by default,
max_tokens 0 = the node's default) and maps errors to status codes through
`loraledger.node.serving.status.status_for`. A client cancel or deadline ends the RPC, which releases the
request's admission: the engine request is cancelled at once and its KV blocks freed.

The servicers depend on small Protocols (`views.py`) that the node app implements with the adapter store, the
record log and the chain; tests may plug in their own.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Sequence

import grpc

from loraledger.inference.engine import Engine
from loraledger.inference.errors import EngineError, InvalidRequestError
from loraledger.inference.requests import TokenDelta
from loraledger.inference.sequence import SamplingParams
from loraledger.node.errors import NodeError, NotFoundError, PermissionDeniedError
from loraledger.node.ledger.records import AttributionRecord
from loraledger.node.serving.auth import Authorizer, Principal, RateLimitedError, bearer_token
from loraledger.node.serving.generation import (
    CallLog,
    Finished,
    GenerationService,
    chat_prompt,
    new_request_id,
    request_id_bytes32,
)
from loraledger.node.serving.signing import proto_request_hash
from loraledger.node.serving.status import status_for
from loraledger.node.serving.views import (
    AdapterDescription,
    AttributionQueries,
    AttributionSummary,
    RecordView,
)
from loraledger.proto.loraledger.v1 import loraledger_pb2 as pb
from loraledger.proto.loraledger.v1 import loraledger_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


# ---- request conversion ----------------------------------------------------------------------------------


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
        return chat_prompt(engine, [(m.role, m.content) for m in request.chat.messages])
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


async def _abort(context: grpc.aio.ServicerContext, error: BaseException, call: CallLog | None = None) -> None:
    """End the call with the status `status_for(error)` and the error's message (raises AbortError)."""
    code = status_for(error)
    if call is not None:
        call.status = code.name
    if isinstance(error, RateLimitedError):
        context.set_trailing_metadata((("retry-after", str(math.ceil(error.retry_after))),))
    if code is grpc.StatusCode.INTERNAL:
        log.error("internal error serving %s: %s", call.method if call else "call", error, exc_info=error)
    await context.abort(code, str(error) or type(error).__name__)


def authorize(authorizer: Authorizer, context: grpc.aio.ServicerContext, scope: str,
              client_cert: bool = False) -> Principal:
    """The caller of this RPC, from its `authorization: Bearer KEY` metadata (see `auth.py`); with
    `client_cert`, a TLS client certificate verified against tls.client_ca_file is required too (mTLS)."""
    metadata = {k.lower(): v for k, v in (context.invocation_metadata() or ())}
    principal = authorizer.authorize(bearer_token(str(metadata.get("authorization", "")) or None), scope)
    if client_cert and not context.peer_identities():
        raise PermissionDeniedError(f"{scope} calls need a TLS client certificate signed by the node's "
                                    "tls.client_ca_file (mTLS)")
    return principal


# ---- Inference ---------------------------------------------------------------------------------------------


class InferenceServicer(pb_grpc.InferenceServicer):
    """Generate / GenerateStream / LoadAdapter / UnloadAdapter / ListAdapters: the gRPC face of a
    `GenerationService` (shared with the HTTP API)."""

    def __init__(self, service: GenerationService, admin_needs_client_cert: bool = False) -> None:
        self.service = service
        self.engine = service.engine
        self.catalog = self.service.catalog
        self.admin_needs_client_cert = admin_needs_client_cert

    @property
    def inflight(self) -> int:
        """Requests admitted and not yet answered (over every API sharing the service)."""
        return self.service.inflight

    async def flush(self, release_timeout: float = 10.0) -> None:
        await self.service.flush(release_timeout)

    async def _generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext, call: CallLog
    ) -> AsyncIterator[list[TokenDelta] | pb.GenerateResponse]:
        """Admit, build, stream the engine's deltas, then yield the final response (record committed).

        The admission is released when the RPC ends for any reason (client cancel, deadline, shutdown), even
        before this generator is finalised: the engine drops the sequence and frees its KV blocks at once."""
        call.principal = authorize(self.service.authorizer, context, "infer")
        pairs = [(r.adapter, r.weight) for r in request.adapters]
        account = self.service.client_account(call.principal, lambda: proto_request_hash(request),
                                              request.client_account, request.client_signature,
                                              request.signature_deadline)
        slot = self.service.admit(account)
        context.add_done_callback(lambda _ctx: slot.release())
        try:
            client_id = request.request_id or new_request_id()
            gen = await self.service.prepare(
                prompt_from_proto(request, self.engine), pairs,
                sampling_from_proto(request.sampling, self.service.default_max_tokens), client_id,
                int(request.priority), call, account)
            async for item in self.service.run(slot, gen, call):
                if isinstance(item, list):
                    yield item
                else:
                    yield _response(item, client_id)
        finally:
            slot.release()

    # ---- RPCs ----------------------------------------------------------------------------------------------
    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        call = CallLog("Generate")
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
            self.service.end(call)
        assert final is not None, "the engine ended a request without a result"
        final.logprobs.extend(logprobs)
        return final

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        call = CallLog("GenerateStream")
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
            self.service.end(call)

    async def LoadAdapter(self, request: pb.LoadAdapterRequest, context: grpc.aio.ServicerContext
                          ) -> pb.LoadAdapterResponse:
        try:
            authorize(self.service.authorizer, context, "admin", self.admin_needs_client_cert)
            if not request.adapter:
                raise InvalidRequestError("LoadAdapter needs `adapter` (an on-chain id or an alias)")
            info = await asyncio.to_thread(self.catalog.load, request.adapter, request.path,
                                           request.expected_weights_hash)
        except (EngineError, NodeError) as e:
            await _abort(context, e)
        return pb.LoadAdapterResponse(adapter=adapter_to_proto(info))

    async def UnloadAdapter(self, request: pb.UnloadAdapterRequest, context: grpc.aio.ServicerContext
                            ) -> pb.UnloadAdapterResponse:
        try:
            authorize(self.service.authorizer, context, "admin", self.admin_needs_client_cert)
            unloaded = await asyncio.to_thread(self.catalog.unload, request.adapter)
        except (EngineError, NodeError) as e:
            await _abort(context, e)
        return pb.UnloadAdapterResponse(unloaded=unloaded)

    async def ListAdapters(self, request: pb.ListAdaptersRequest, context: grpc.aio.ServicerContext
                           ) -> pb.ListAdaptersResponse:
        try:
            authorize(self.service.authorizer, context, "infer")
        except (EngineError, NodeError) as e:
            await _abort(context, e)
        adapters = await asyncio.to_thread(self.catalog.list)
        return pb.ListAdaptersResponse(adapters=[adapter_to_proto(a) for a in adapters])


def _response(done: Finished, client_id: str) -> pb.GenerateResponse:
    r = done.result
    return pb.GenerateResponse(
        request_id=client_id, text=r.text, token_ids=list(r.token_ids), finish_reason=r.finish_reason,
        usage=pb.Usage(prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens),
        attribution=summary_to_proto(done.summary),
    )


# ---- Attribution -------------------------------------------------------------------------------------------


class AttributionServicer(pb_grpc.AttributionServicer):
    """GetRecord / GetRewardProof / ListEpochs over an `AttributionQueries` (the record log and its trees)."""

    def __init__(self, queries: AttributionQueries, authorizer: Authorizer | None = None) -> None:
        self.queries = queries
        self.authorizer = authorizer if authorizer is not None else Authorizer("none", None)

    async def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        try:
            authorize(self.authorizer, context, "infer")
        except NodeError as e:
            await _abort(context, e)

    async def GetRecord(self, request: pb.GetRecordRequest, context: grpc.aio.ServicerContext
                        ) -> pb.GetRecordResponse:
        await self._authorize(context)
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
        await self._authorize(context)
        try:
            view = await asyncio.to_thread(self.queries.reward_proof, request.account, int(request.epoch))
            if view is None:
                raise NotFoundError(f"account {request.account!r} has no rewards in a confirmed epoch of this "
                                    "operator yet")
            return pb.GetRewardProofResponse(
                operator=view.operator, account=view.account, cumulative_amount=str(view.cumulative_amount),
                epoch=view.epoch, rewards_root=view.rewards_root, proof=list(view.proof),
                epoch_in_effect=view.epoch_in_effect, in_effect=view.in_effect, effective_at=view.effective_at,
                claimed=str(view.claimed), claimable_now=str(view.claimable_now), latest_epoch=view.latest_epoch,
                pending=str(view.pending), pending_effective_at=view.pending_effective_at)
        except (EngineError, NodeError) as e:
            await _abort(context, e)
            raise  # unreachable: abort raises

    async def ListEpochs(self, request: pb.ListEpochsRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ListEpochsResponse:
        await self._authorize(context)
        try:
            epochs = await asyncio.to_thread(self.queries.epochs, int(request.limit))
        except (EngineError, NodeError) as e:
            await _abort(context, e)
        return pb.ListEpochsResponse(operator=self.queries.operator, epochs=[
            pb.EpochInfo(epoch=e.epoch, records_root=e.records_root, record_count=e.record_count,
                         rewards_root=e.rewards_root, cumulative_total=str(e.cumulative_total), state=e.state,
                         tx_hash=e.tx_hash) for e in epochs])

    async def GetEpochExport(self, request: pb.GetEpochExportRequest, context: grpc.aio.ServicerContext
                             ) -> AsyncIterator[pb.EpochExportChunk]:
        """The epoch's canonical export (`loraledger.node.ledger.export`), in chunks; the first names the size
        and sha256."""
        await self._authorize(context)
        log_ = getattr(self.queries, "log", None)
        try:
            if log_ is None:
                raise NotFoundError("this node has no record log to export epochs from")
            if request.epoch <= 0:
                raise InvalidRequestError("GetEpochExport needs an epoch number >= 1")
            data = await asyncio.to_thread(_epoch_export, log_, int(request.epoch))
        except (EngineError, NodeError) as e:
            await _abort(context, e)
            raise  # unreachable: abort raises
        import hashlib

        size = int(request.chunk_bytes) or 1 << 20
        sha = "0x" + hashlib.sha256(data).hexdigest()
        for off in range(0, max(len(data), 1), size):
            yield pb.EpochExportChunk(offset=off, data=data[off:off + size],
                                      total_bytes=len(data) if off == 0 else 0, sha256=sha if off == 0 else "")


def _epoch_export(log_: object, n: int) -> bytes:
    """canonical_export, with "not built" / unknown epochs as NotFoundError."""
    from loraledger.node.ledger.epochs import SettlementError
    from loraledger.node.ledger.export import canonical_export

    try:
        return canonical_export(log_, n)  # type: ignore[arg-type]
    except SettlementError as e:
        raise NotFoundError(f"no export of epoch {n}: {e}") from e


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


def record_from_pb(r: pb.Record) -> AttributionRecord:
    """The AttributionRecord a `Record` message carries (inverse of `_record_response`'s record), e.g. to check it
    on chain with `LedgerClient.verify_record`."""
    return AttributionRecord.from_json({
        "epoch": r.epoch, "requestId": r.request_id, "adapterIds": list(r.adapter_ids),
        "weightsBps": list(r.weights_bps), "promptTokens": r.prompt_tokens, "completionTokens": r.completion_tokens,
        "fee": r.fee, "outputHash": r.output_hash, "attributionHash": r.attribution_hash,
        "contributors": [[c.account, c.weight] for c in r.contributors],
    })
