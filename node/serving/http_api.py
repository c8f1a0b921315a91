"""The OpenAI-compatible HTTP API of a node (FastAPI on uvicorn, in the node's own event loop).

    POST /v1/completions          prompt -> text           (stream: Server-Sent Events, `data: [DONE]` last)
    POST /v1/chat/completions     messages -> message      (the tokenizer's chat template)
    GET  /v1/models               the base model and every adapter the node knows
    GET  /v1/epochs/{n}/export    the epoch's export file (`loraledger epoch export` writes the same bytes)
    GET  /health                  200 while serving, 503 otherwise
    GET  /metrics                 Prometheus text format (`metrics.py`)

The request path is the shared `GenerationService`, so a request here and the same request over gRPC give the
same engine request, the same answer and the same attribution record. What the request names:

    model = the base's served name ([model] name, else the checkpoint folder's name)  -> the base model alone
    model = an on-chain adapter id ("7") or a local alias                             -> that adapter
    model = the base name, with `adapters: [{"adapter": "7", "weight": 0.7}, ...]`    -> a per-request mix

Fields mapped to the engine: temperature (default 1), top_p, max_tokens / max_completion_tokens (default: the
node's), stop, seed, n (choice i > 0 draws with seed + i when a seed is given), logprobs (completions: the number
of alternatives; chat: `logprobs` + `top_logprobs`). Sampling options the engine does not have
(presence/frequency penalties, logit_bias, best_of > n, echo, suffix) are refused with 400 rather than ignored.

Every response names its attribution record in the extension object `loraledger` (per choice, and the first
choice's at the top level) and in the headers `x-loraledger-record-id` / `x-loraledger-fee`; a stream carries
it on each choice's last chunk. A request through the base model or a local alias has no record: its object
says `record_id: null` and fee "0".

Errors have OpenAI's shape `{"error": {"message", "type", "param", "code"}}`, with the status of `status.py`
(404 unknown model, 400 bad parameter, 429 + Retry-After queue full, 413 body too large, 503 shutting down).
A client that disconnects cancels its engine requests (KV blocks freed at once); what they generated is
recorded as over gRPC.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from loraledger.inference.errors import EngineError, InvalidRequestError
from loraledger.inference.requests import TokenDelta
from loraledger.inference.sequence import SamplingParams
from loraledger.node.config import TlsConfig
from loraledger.node.errors import NodeError
from loraledger.node.serving.auth import Principal, bearer_token
from loraledger.node.serving.generation import (
    CallLog,
    Finished,
    GenerationService,
    chat_prompt,
    new_request_id,
)
from loraledger.node.serving.metrics import CONTENT_TYPE, NodeMetrics
from loraledger.node.serving.signing import request_hash
from loraledger.node.serving.status import api_status
from loraledger.node.serving.views import AdapterDescription, AttributionSummary

log = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 1
# the status name a request's log line and metrics use, the same over both APIs
_GRPC_NAME_OF_HTTP = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                      413: "RESOURCE_EXHAUSTED", 429: "RESOURCE_EXHAUSTED", 503: "UNAVAILABLE"}
MAX_CHOICES = 16


# ---- request bodies ------------------------------------------------------------------------------------------


class AdapterWeight(BaseModel):
    model_config = ConfigDict(extra="forbid")
    adapter: str
    weight: float = 0.0


class SignedBy(BaseModel):
    model_config = ConfigDict(extra="forbid")
    account: str
    deadline: int
    signature: str


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    """Fields both endpoints take; unknown fields are ignored (clients send vendor extensions)."""

    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    adapters: list[AdapterWeight] | None = None  # loraledger extension: a per-request mix
    loraledger_signature: SignedBy | None = None  # loraledger extension: an EIP-712 signature (signing.py)


class CompletionBody(_Common):
    prompt: str | list[str] | list[int]
    logprobs: int | None = Field(default=None, ge=0, le=SamplingParams.MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatBody(_Common):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=SamplingParams.MAX_LOGPROBS)


# ---- errors --------------------------------------------------------------------------------------------------


class ApiError(Exception):
    """An error answered as is: HTTP status, OpenAI error type, the parameter at fault."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.retry_after = retry_after


def error_response(status: int, message: str, type_: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status, headers=headers)


def _as_api_error(e: BaseException, param: str | None = None) -> ApiError:
    status = api_status(e)
    if status.http >= 500 and not isinstance(e, NodeError | EngineError):
        log.error("internal error serving an HTTP request: %s", e, exc_info=e)
    return ApiError(status.http, str(e) or type(e).__name__, status.openai_type, param,
                    status.grpc.name.lower(), getattr(e, "retry_after", None))


def _error_of(e: ApiError) -> JSONResponse:
    wait = RETRY_AFTER_SECONDS if e.retry_after is None else max(1, math.ceil(e.retry_after))
    headers = {"Retry-After": str(wait)} if e.status == 429 else None
    return error_response(e.status, e.message, e.type, e.param, e.code, headers)


# ---- the request, engine side --------------------------------------------------------------------------------


@dataclass
class _Choice:
    """One choice's engine request while it runs."""

    index: int
    client_id: str
    call: CallLog


def _sampling(body: _Common, max_tokens: int | None, logprobs: int | None, default_max_tokens: int,
              index: int) -> SamplingParams:
    if body.presence_penalty or body.frequency_penalty:
        raise ApiError(400, "presence_penalty and frequency_penalty are not supported by this node; omit them "
                            "(repetition control is not offered over this API)", param="presence_penalty")
    if body.logit_bias:
        raise ApiError(400, "logit_bias is not supported by this node; omit it", param="logit_bias")
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    seed = None if body.seed is None else body.seed + index
    try:
        return SamplingParams(
            max_tokens=max_tokens or default_max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p, stop=stop, seed=seed, logprobs=logprobs)
    except InvalidRequestError as e:
        raise ApiError(400, str(e)) from e


def _token_text(service: GenerationService, token_id: int) -> str:
    return service.engine.tokenizer.decode([token_id], skip_special_tokens=False)


def _attribution(summary: AttributionSummary | None) -> dict[str, Any]:
    if summary is None:
        return {"record_id": None, "record_hash": None, "fee": "0", "adapters": [], "weights": [],
                "contributors_hash": None, "datanets": []}
    return {"record_id": summary.request_id, "record_hash": summary.record_hash, "fee": str(summary.fee),
            "adapters": [str(i) for i in summary.adapter_ids], "weights": list(summary.weights_bps),
            "contributors_hash": summary.attribution_hash, "datanets": [str(d) for d in summary.datanet_ids]}


def _headers(summary: AttributionSummary | None) -> dict[str, str]:
    out = {"x-loraledger-fee": "0" if summary is None else str(summary.fee)}
    if summary is not None:
        out["x-loraledger-record-id"] = summary.request_id
    return out


# ---- the app -------------------------------------------------------------------------------------------------


@dataclass
class HttpNode:
    """What the HTTP API serves from: the shared request path and the node's read side."""

    service: GenerationService
    model_name: str
    base_model_hash: str = ""
    operator: str = ""
    metrics: NodeMetrics | None = None
    export_epoch: Callable[[int, Path], None] | None = None  # writes the epoch's export file (NotFoundError)
    max_body_bytes: int = 1024 * 1024
    serving: bool = False
    metrics_keyed: bool = False  # /metrics needs a valid key (any scope) when keys are in force
    settlement: Any = None  # the SettlementLoop: /health shows its state (ok, degraded, stuck) and cause


class _BodyLimit:
    """ASGI middleware: 413 for a body over `limit` bytes (by Content-Length, or counted while it streams)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: MutableMapping[str, Any], receive: Callable[[], Awaitable[Any]],
                       send: Callable[[Any], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = error_response(413, f"the request body exceeds http.max_body_bytes = {self.limit} bytes; "
                                        "send a shorter prompt", "invalid_request_error", None, "too_large")
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                await too_large(scope, receive, send)
                return
        seen = 0

        async def limited() -> Any:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise ApiError(413, f"the request body exceeds http.max_body_bytes = {self.limit} bytes",
                                   code="too_large")
            return message

        await self.app(scope, limited, send)


def create_app(node: HttpNode) -> Any:
    """The ASGI app of the API (module docstring), the body limit outermost."""
    app = FastAPI(title="loraledger", version="v1", docs_url=None, redoc_url=None)
    service = node.service

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError) -> JSONResponse:
        return _error_of(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = loc[0] if loc else None  # the request field at fault; the message gives the full path
        return error_response(400, f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid request')}",
                              "invalid_request_error", param, "invalid_value")

    @app.exception_handler(EngineError)
    @app.exception_handler(NodeError)
    async def _domain(_: Request, e: Exception) -> JSONResponse:
        return _error_of(_as_api_error(e))

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = node.serving and service.accepting
        body: dict[str, Any] = {"status": "serving" if ok else "not_serving"}
        if node.settlement is not None:  # serving goes on while settlement retries; the body says how it fares
            body["settlement"] = node.settlement.health().to_dict()
        return JSONResponse(body, status_code=200 if ok else 503)

    def caller(request: Request, scope: str) -> Principal:
        return service.authorizer.authorize(bearer_token(request.headers.get("authorization")), scope)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        if node.metrics_keyed:
            caller(request, "infer")
        if node.metrics is None:
            raise ApiError(404, "metrics are not enabled on this node", "not_found_error")
        body = await asyncio.to_thread(node.metrics.exposition)
        return Response(body, media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        caller(request, "infer")
        adapters: list[AdapterDescription] = await asyncio.to_thread(service.catalog.list)
        now = int(time.time())
        data = [{"id": node.model_name, "object": "model", "created": now,
                 "owned_by": node.operator or "loraledger",
                 "loraledger": {"kind": "base", "base_model_hash": node.base_model_hash}}]
        for a in adapters:
            data.append({"id": a.key, "object": "model", "created": now, "owned_by": a.owner or "local",
                         "parent": node.model_name, "root": node.model_name,
                         "loraledger": {"kind": "adapter", "onchain_id": None if a.onchain_id is None
                                        else str(a.onchain_id), "alias": a.alias, "weights_hash": a.weights_hash,
                                        "base_model_hash": a.base_model_hash, "fee_per_token": str(a.fee_per_token),
                                        "datanets": [str(d) for d in a.datanet_ids], "resident": a.resident,
                                        "rank": a.rank}})
        return JSONResponse({"object": "list", "data": data})

    @app.get("/v1/epochs/{epoch}/export")
    async def epoch_export(epoch: int, request: Request) -> Response:
        caller(request, "infer")
        if node.export_epoch is None:
            raise ApiError(404, "this node keeps no record log to export from", "not_found_error")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"epoch-{epoch}.json"
            await asyncio.to_thread(node.export_epoch, epoch, path)
            return Response(path.read_bytes(), media_type="application/json",
                            headers={"content-disposition": f'attachment; filename="epoch-{epoch}.json"'})

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request) -> Response:
        if body.echo or body.suffix or (body.best_of is not None and body.best_of != body.n):
            raise ApiError(400, "echo, suffix and best_of are not supported by this node; omit them",
                           param="echo" if body.echo else "suffix" if body.suffix else "best_of")
        principal = caller(request, "infer")
        prompt = _completion_prompt(body.prompt)
        return await _serve(node, request, principal, body, "completion", prompt, prompt, body.max_tokens,
                            body.logprobs)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, request: Request) -> Response:
        principal = caller(request, "infer")
        messages = [(m.role, _content_text(m.content, i)) for i, m in enumerate(body.messages)]
        try:
            prompt = chat_prompt(service.engine, messages)
        except InvalidRequestError as e:
            raise ApiError(400, str(e), param="messages") from e
        top = (body.top_logprobs or 0) if body.logprobs else None
        max_tokens = body.max_completion_tokens or body.max_tokens
        return await _serve(node, request, principal, body, "chat", messages, prompt, max_tokens, top)

    return _BodyLimit(app, node.max_body_bytes)


def _completion_prompt(prompt: str | list[str] | list[int]) -> str | list[int]:
    if isinstance(prompt, str):
        return prompt
    if prompt and all(isinstance(p, int) for p in prompt):
        return [int(p) for p in prompt]
    if len(prompt) == 1 and isinstance(prompt[0], str):
        return prompt[0]
    raise ApiError(400, "prompt must be one string or one list of token ids (batches of prompts: send one "
                        "request per prompt, or use n for several completions of one prompt)", param="prompt")


def _content_text(content: str | list[dict[str, Any]] | None, index: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ApiError(400, f"messages[{index}].content: only text parts are supported", param="messages")
        parts.append(part["text"])
    return "".join(parts)


def _mix(node: HttpNode, body: _Common) -> list[tuple[str, float]]:
    if body.adapters:
        if body.model != node.model_name:
            raise ApiError(400, f"with `adapters` (a mix), set model to the base model {node.model_name!r}; "
                                f"got {body.model!r}", param="model")
        return [(a.adapter, a.weight) for a in body.adapters]
    if body.model == node.model_name:
        return []
    return [(body.model, 1.0)]


async def _serve(node: HttpNode, request: Request, principal: Principal, body: _Common,
                 kind: Literal["completion", "chat"], raw_input: str | list[int] | list[tuple[str, str]],
                 prompt: str | list[int], max_tokens: int | None, logprobs: int | None) -> Response:
    """Admit and prepare one engine request per choice; answer as a stream or at once. `raw_input` is what the
    client sent (the prompt, or the chat messages): a signature covers it, not its rendering."""
    service = node.service
    base_id = new_request_id()
    method = "completions" if kind == "completion" else "chat.completions"
    pairs = _mix(node, body)
    slots, choices, gens, calls = [], [], [], []
    try:
        signed = body.loraledger_signature
        account = service.client_account(
            principal, lambda: request_hash(raw_input, pairs, max_tokens=max_tokens or 0),
            signed.account if signed else "", signed.signature if signed else "", signed.deadline if signed else 0)
        for i in range(body.n):
            call = CallLog(method, api="http", principal=principal)
            calls.append(call)
            slots.append(service.admit(account))
            client_id = base_id if body.n == 1 else f"{base_id}-{i}"
            params = _sampling(body, max_tokens, logprobs, service.default_max_tokens, i)
            gens.append(await service.prepare(prompt, pairs, params, client_id, 0, call, account))
            choices.append(_Choice(i, client_id, call))
    except (ApiError, EngineError, NodeError) as e:
        err = e if isinstance(e, ApiError) else _as_api_error(e, "model" if api_status(e).http == 404 else None)
        for slot in slots:
            slot.release()
        for c in calls:
            c.status = (err.code or _GRPC_NAME_OF_HTTP.get(err.status, "INTERNAL")).upper()  # as gRPC names it
            service.end(c)
        raise err from e
    created = int(time.time())
    answer = _Answer(node, kind, body.model, base_id, created, logprobs)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_stream(service, answer, slots, gens, choices, include_usage),
                                 media_type="text/event-stream",
                                 headers={"cache-control": "no-cache", "x-loraledger-request-id": base_id})
    return await _unary(service, request, answer, slots, gens, choices)


@dataclass
class _Answer:
    """Builds the response objects of one request (both endpoints, streamed or not)."""

    node: HttpNode
    kind: Literal["completion", "chat"]
    model: str
    id: str
    created: int
    logprobs: int | None

    @property
    def object(self) -> str:
        return "text_completion" if self.kind == "completion" else "chat.completion"

    def logprobs_of(self, deltas: list[TokenDelta], offset: int) -> dict[str, Any] | None:
        if self.logprobs is None:
            return None
        service = self.node.service
        if self.kind == "completion":
            tokens = [_token_text(service, d.token_id) for d in deltas]
            offsets, at = [], offset
            for t in tokens:
                offsets.append(at)
                at += len(t)
            return {"tokens": tokens, "token_logprobs": [d.logprob for d in deltas],
                    "top_logprobs": [{_token_text(service, t): lp for t, lp in (d.top_logprobs or ())}
                                     for d in deltas], "text_offset": offsets}
        content = []
        for d in deltas:
            tok = _token_text(service, d.token_id)
            content.append({"token": tok, "logprob": d.logprob, "bytes": list(tok.encode("utf-8")),
                            "top_logprobs": [{"token": (s := _token_text(service, t)), "logprob": lp,
                                              "bytes": list(s.encode("utf-8"))} for t, lp in (d.top_logprobs or ())]})
        return {"content": content}

    def choice(self, index: int, text: str, finish: str | None, lp: dict[str, Any] | None,
               summary: AttributionSummary | None = None, delta: bool = False, first: bool = False
               ) -> dict[str, Any]:
        out: dict[str, Any] = {"index": index}
        if self.kind == "completion":
            out["text"] = text
        elif delta:
            out["delta"] = ({"role": "assistant"} if first else {}) | ({"content": text} if text or first else {})
        else:
            out["message"] = {"role": "assistant", "content": text}
        out["logprobs"] = lp
        out["finish_reason"] = finish
        if finish is not None:
            out["loraledger"] = _attribution(summary)
        return out

    def usage(self, results: list[Finished]) -> dict[str, int]:
        prompt = results[0].result.prompt_tokens if results else 0
        completion = sum(r.result.completion_tokens for r in results)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def chunk(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        obj = {"id": self.id, "object": self.object + (".chunk" if self.kind == "chat" else ""),
               "created": self.created, "model": self.model, "choices": choices, **extra}
        return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _finish(result: Finished) -> str:
    return "length" if result.result.finish_reason == "length" else "stop"


async def _run_choice(service: GenerationService, slot: Any, gen: Any, choice: _Choice,
                      on_delta: Callable[[list[TokenDelta]], None] | None = None) -> Finished:
    """One choice to its end; its call log emitted whatever happens."""
    done: Finished | None = None
    try:
        async for item in service.run(slot, gen, choice.call):
            if isinstance(item, Finished):
                done = item
            elif on_delta is not None:
                on_delta(item)
    except asyncio.CancelledError:
        choice.call.status = "CANCELLED"
        raise
    except (EngineError, NodeError) as e:
        choice.call.status = api_status(e).grpc.name
        raise
    finally:
        slot.release()
        service.end(choice.call)
    assert done is not None, "the engine ended a request without a result"
    return done


async def _watch_disconnect(request: Request) -> None:
    """Returns when the client goes away (the body was read already, so the next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _unary(service: GenerationService, request: Request, answer: _Answer, slots: list[Any],
                 gens: list[Any], choices: list[_Choice]) -> Response:
    deltas: list[list[TokenDelta]] = [[] for _ in choices]
    tasks = [asyncio.ensure_future(_run_choice(service, s, g, c, deltas[c.index].extend if answer.logprobs
                                               is not None else None))
             for s, g, c in zip(slots, gens, choices, strict=True)]
    watcher = asyncio.ensure_future(_watch_disconnect(request))
    done_all: asyncio.Future[list[Finished]] = asyncio.gather(*tasks)
    try:
        await asyncio.wait([done_all, watcher], return_when=asyncio.FIRST_COMPLETED)  # type: ignore[type-var]
        if not done_all.done():  # the client left: the engine requests are cancelled in `finally`
            return Response(status_code=499)
        results = done_all.result()
    except (EngineError, NodeError) as e:
        return _error_of(_as_api_error(e))
    finally:
        watcher.cancel()
        for t in tasks:  # a request cut short (client gone, error, shutdown): cancel what still runs
            if not t.done():
                t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    out_choices = [answer.choice(c.index, r.result.text, _finish(r), answer.logprobs_of(deltas[c.index], 0),
                                 r.summary) for c, r in zip(choices, results, strict=True)]
    body = {"id": answer.id, "object": answer.object, "created": answer.created, "model": answer.model,
            "choices": out_choices, "usage": answer.usage(results),
            "loraledger": _attribution(results[0].summary)}
    return JSONResponse(body, headers=_headers(results[0].summary))


async def _stream(service: GenerationService, answer: _Answer, slots: list[Any], gens: list[Any],
                  choices: list[_Choice], include_usage: bool) -> AsyncIterator[bytes]:
    """SSE chunks of every choice as their tokens arrive; a client that disconnects cancels this generator,
    which cancels every choice (their engine requests freed, their records kept)."""
    queue: asyncio.Queue[tuple[int, list[TokenDelta] | Finished | BaseException]] = asyncio.Queue()
    offsets = [0] * len(choices)

    async def produce(slot: Any, gen: Any, choice: _Choice) -> None:
        try:
            done = await _run_choice(service, slot, gen, choice, lambda d: queue.put_nowait((choice.index, d)))
            queue.put_nowait((choice.index, done))
        except (EngineError, NodeError) as e:
            queue.put_nowait((choice.index, e))

    tasks = [asyncio.ensure_future(produce(s, g, c)) for s, g, c in zip(slots, gens, choices, strict=True)]
    results: list[Finished] = []
    try:
        if answer.kind == "chat":
            yield answer.chunk([answer.choice(c.index, "", None, None, delta=True, first=True) for c in choices])
        open_choices = len(choices)
        while open_choices:
            index, item = await queue.get()
            if isinstance(item, BaseException):
                err = _as_api_error(item)
                yield b"data: " + json.dumps({"error": {"message": err.message, "type": err.type, "param": None,
                                                        "code": err.code}}).encode() + b"\n\n"
                open_choices -= 1
                continue
            if isinstance(item, Finished):
                results.append(item)
                open_choices -= 1
                yield answer.chunk([answer.choice(index, "", _finish(item), None, item.summary, delta=True)],
                                   loraledger=_attribution(item.summary))
                continue
            text = "".join(d.text_delta for d in item)
            if not text and answer.logprobs is None:
                continue  # tokens whose text is held back (a partial character or stop string): nothing to send
            lp = answer.logprobs_of(item, offsets[index])
            offsets[index] += len(text)
            yield answer.chunk([answer.choice(index, text, None, lp, delta=True)])
        if include_usage:
            yield answer.chunk([], usage=answer.usage(results))
        yield b"data: [DONE]\n\n"
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# ---- the server ----------------------------------------------------------------------------------------------


class _Server(uvicorn.Server):
    """uvicorn inside the node's loop: the node owns the signals (it drains both APIs on SIGTERM)."""

    def capture_signals(self) -> Any:
        import contextlib

        return contextlib.nullcontext()


class HttpServer:
    """The API on `listen` (HOST:PORT; port 0 picks a free one), in the running event loop."""

    def __init__(self, app: Any, listen: str, grace_seconds: float = 10.0, tls: TlsConfig | None = None) -> None:
        host, _, port = listen.rpartition(":")
        ssl: dict[str, Any] = {}
        if tls is not None and tls.cert_file:
            ssl = {"ssl_certfile": tls.cert_file, "ssl_keyfile": tls.key_file}
        self.config = uvicorn.Config(app, host=host, port=int(port), log_config=None, access_log=False,
                                     lifespan="off", timeout_graceful_shutdown=max(1, int(grace_seconds)),
                                     loop="none", http="httptools", **ssl)
        self.server = _Server(self.config)
        self._task: asyncio.Task[None] | None = None
        self.port: int | None = None

    async def start(self) -> int:
        self._task = asyncio.ensure_future(self.server.serve())
        while not self.server.started:
            if self._task.done():
                self._task.result()  # the bind failed: raise why
                raise OSError(f"the HTTP API could not listen on {self.config.host}:{self.config.port}")
            await asyncio.sleep(0.01)
        sock = self.server.servers[0].sockets[0]
        self.port = int(sock.getsockname()[1])
        log.info("HTTP API listening on %s:%d", self.config.host, self.port)
        return self.port

    async def stop(self) -> None:
        """Stop accepting, give open requests the grace period, cancel the rest (their engine requests too)."""
        if self._task is None:
            return
        self.server.should_exit = True
        await self._task
        self._task = None
        log.info("HTTP API stopped")
