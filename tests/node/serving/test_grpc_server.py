"""The node's gRPC API on a real grpc.aio server (loopback, free port) over a real engine with the tiny model and
real PEFT adapters served by alias: health, reflection, 64 concurrent streams equal to the engine's own greedy
output, cancel / deadline freeing KV blocks, and the status code of each kind of bad input."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from loraledger.inference.engine import Engine
from loraledger.inference.requests import GenerationRequest
from loraledger.inference.sequence import SamplingParams
from loraledger.node.config import NodeConfig, ServerConfig
from loraledger.node.ledger.record_log import RecordLog
from loraledger.node.serving.app import build_engine
from loraledger.node.serving.catalog import StoreCatalog
from loraledger.node.serving.generation import GenerationService, request_id_bytes32
from loraledger.node.serving.queries import LogQueries
from loraledger.node.serving.server import NodeServer
from loraledger.node.serving.servicers import AttributionServicer, InferenceServicer
from loraledger.proto.loraledger.v1 import loraledger_pb2 as pb
from loraledger.proto.loraledger.v1 import loraledger_pb2_grpc as pb_grpc

MAX_MESSAGE = 64 * 1024
PROMPTS = ["The cat", "Once upon a time", "In the beginning", "Numbers: 1, 2, 3", "Hello", "A list of things",
           "Python is", "Water and"]
ADAPTER_MIX: list[list[tuple[str, float]]] = [[], [("a", 0.0)], [("b", 1.0)], [("a", 0.75), ("b", 0.25)]]


@dataclass
class Node:
    engine: Engine
    port: int
    small_port: int  # the same engine behind a servicer with max_queue=2
    records: RecordLog

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def node(tiny_model_dir: Path, random_adapter: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory,
         server_loop: object) -> Iterator[Node]:
    tmp = tmp_path_factory.mktemp("grpc")
    cfg = NodeConfig()
    cfg.model.dir = str(tiny_model_dir)
    cfg.model.device = "cpu"
    cfg.model.max_num_seqs = 64
    cfg.model.max_tokens_per_step = 1024
    cfg.adapters.slots = 4
    cfg.adapters.max_rank = 8
    cfg.adapters.roots = [str(tmp_path_factory.getbasetemp())]  # LoadAdapter reads the tests' own folders
    cfg.adapters.aliases = {"a": str(random_adapter(tiny_model_dir, tmp / "a", seed=1)),
                            "b": str(random_adapter(tiny_model_dir, tmp / "b", seed=2, r=8))}
    cfg.chain.deployment = str(tmp / "no-deployment.json")
    engine, store = build_engine(cfg.validate())
    engine.start()
    catalog = StoreCatalog(store, cfg)
    records = RecordLog.open(tmp / "records.sqlite")
    server_cfg = ServerConfig(listen="127.0.0.1:0", max_message_bytes=MAX_MESSAGE, grace_seconds=1.0)
    main = NodeServer(server_cfg, InferenceServicer(GenerationService(engine, catalog=catalog, max_queue=128, default_max_tokens=16)),
                      AttributionServicer(LogQueries(records)))
    small = NodeServer(server_cfg, InferenceServicer(GenerationService(engine, catalog=catalog, max_queue=2)))
    loop = server_loop  # LoopThread

    async def up() -> tuple[int, int]:
        p1, p2 = await main.start(), await small.start()
        await main.set_serving(True)
        return p1, p2

    port, small_port = loop.run(up())  # type: ignore[attr-defined]
    yield Node(engine, port, small_port, records)
    loop.run(main.drain(0.5))  # type: ignore[attr-defined]
    loop.run(small.drain(0.5))  # type: ignore[attr-defined]
    engine.shutdown()
    records.close()


def _request(prompt: str, adapters: list[tuple[str, float]] = (), max_tokens: int = 16,  # type: ignore[assignment]
             **sampling: float) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt=prompt, adapters=[pb.AdapterRef(adapter=n, weight=w) for n, w in adapters],
                              sampling=pb.SamplingParams(max_tokens=max_tokens, **sampling))


def _wait_idle(engine: Engine, timeout: float = 10.0) -> dict[str, float | int]:
    deadline = time.monotonic() + timeout
    while True:
        stats = engine.stats()
        if (stats["kv_blocks_used"] == 0 and stats["running"] == 0 and stats["waiting"] == 0) \
                or time.monotonic() > deadline:
            return stats
        time.sleep(0.02)


def _code(fn: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    err = info.value
    return err.code(), err.details()  # type: ignore[attr-defined]


def test_health_and_reflection(node: Node) -> None:
    with grpc.insecure_channel(node.address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "loraledger.v1.Inference", "loraledger.v1.Attribution"):
            resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING, service
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        answers = list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                 timeout=10))
        names = {s.name for s in answers[0].list_services_response.service}
        assert {"loraledger.v1.Inference", "loraledger.v1.Attribution", "grpc.health.v1.Health"} <= names
        files = list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="loraledger.v1.Inference")]), timeout=10))
        assert files[0].file_descriptor_response.file_descriptor_proto, "reflection gave no descriptor"


def test_64_concurrent_streams_match_engine_greedy(node: Node) -> None:
    jobs = [(PROMPTS[i % len(PROMPTS)] + f" #{i}", ADAPTER_MIX[i % len(ADAPTER_MIX)]) for i in range(64)]
    params = SamplingParams(max_tokens=12, temperature=0.0)
    expected = node.engine.generate([
        GenerationRequest(p, params, adapters=tuple((n, 1.0 if len(ad) == 1 else w) for n, w in ad))
        for p, ad in jobs])

    async def one(stub: pb_grpc.InferenceStub, prompt: str, adapters: list[tuple[str, float]]
                  ) -> tuple[str, list[int], pb.GenerateResponse]:
        text, ids, final = "", [], None
        async for msg in stub.GenerateStream(_request(prompt, adapters, max_tokens=12), timeout=120):
            if msg.HasField("delta"):
                text += msg.delta.text
                ids.extend(msg.delta.token_ids)
            else:
                final = msg.final
        assert final is not None, "stream ended without a final message"
        return text, ids, final

    async def run_all() -> list[tuple[str, list[int], pb.GenerateResponse]]:
        async with grpc.aio.insecure_channel(node.address) as ch:
            stub = pb_grpc.InferenceStub(ch)
            return await asyncio.gather(*(one(stub, p, ad) for p, ad in jobs))

    got = asyncio.run(run_all())
    assert len({tuple(r.token_ids) for r in expected}) > 8, "adapters and prompts should give varied answers"
    for (text, ids, final), exp, (prompt, ad) in zip(got, expected, jobs, strict=True):
        assert ids == list(exp.token_ids), (prompt, ad)
        assert list(final.token_ids) == ids
        assert final.text == exp.text == text
        assert final.finish_reason == exp.finish_reason
        assert final.usage.completion_tokens == len(ids)
        assert final.usage.prompt_tokens == exp.prompt_tokens
    stats = _wait_idle(node.engine)
    assert stats["kv_blocks_used"] == 0


def test_unary_generate_with_chat_and_logprobs(node: Node) -> None:
    with grpc.insecure_channel(node.address) as ch:
        stub = pb_grpc.InferenceStub(ch)
        req = pb.GenerateRequest(request_id="my-req-1", sampling=pb.SamplingParams(max_tokens=5, logprobs=2))
        req.chat.messages.append(pb.ChatMessage(role="user", content="Hi there"))
        resp = stub.Generate(req, timeout=60)
    ids = node.engine.tokenizer.apply_chat_template([{"role": "user", "content": "Hi there"}])
    exp = node.engine.generate([ids], SamplingParams(max_tokens=5, temperature=0.0))[0]
    assert resp.request_id == "my-req-1"
    assert list(resp.token_ids) == list(exp.token_ids)
    assert resp.usage.prompt_tokens == len(ids)
    assert len(resp.logprobs) == len(resp.token_ids)
    assert all(lp.logprob <= 0 and len(lp.top_token_ids) == 2 for lp in resp.logprobs)
    assert not resp.HasField("attribution"), "no record for the base model alone"


def test_client_cancel_mid_stream_frees_kv_blocks(node: Node) -> None:
    async def run() -> tuple[int, dict[str, float | int]]:
        async with grpc.aio.insecure_channel(node.address) as ch:
            call = pb_grpc.InferenceStub(ch).GenerateStream(_request("Once upon a time", max_tokens=480,
                                                                     repetition_penalty=1.0), timeout=120)
            seen = 0
            async for msg in call:
                assert msg.HasField("delta"), "finished before the client left"
                seen += 1
                if seen == 3:
                    busy = node.engine.stats()
                    call.cancel()
                    break
            return seen, busy

    seen, busy = asyncio.run(run())
    assert seen == 3 and busy["kv_blocks_used"] > 0
    stats = _wait_idle(node.engine)
    assert stats["kv_blocks_used"] == 0 and stats["running"] == 0


def test_deadline_cancels_engine_request(node: Node) -> None:
    with grpc.insecure_channel(node.address) as ch:
        stub = pb_grpc.InferenceStub(ch)
        code, _ = _code(lambda: stub.Generate(_request("In the beginning", max_tokens=480), timeout=0.3))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    stats = _wait_idle(node.engine)
    assert stats["kv_blocks_used"] == 0 and stats["running"] == 0


@pytest.mark.parametrize("request_, code, words", [
    (_request("Hi", [("no-such-adapter", 1.0)]), grpc.StatusCode.NOT_FOUND, "unknown adapter"),
    (_request("Hi", [("77", 1.0)]), grpc.StatusCode.NOT_FOUND, "on-chain ids cannot be resolved"),
    (_request("Hi", [("a", 0.5), ("b", 0.4)]), grpc.StatusCode.INVALID_ARGUMENT, "sum to 0.9"),
    (_request("Hi", [("a", 1.5), ("b", -0.5)]), grpc.StatusCode.INVALID_ARGUMENT, "must be > 0"),
    (_request("Hi", [("a", 0.5), ("a", 0.5)]), grpc.StatusCode.INVALID_ARGUMENT, "appears twice"),
    (_request("Hi", temperature=-1.0), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    (_request("Hi", temperature=math.nan), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    (_request("Hi", top_p=0.0), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    (_request("Hi", repetition_penalty=0.0), grpc.StatusCode.INVALID_ARGUMENT, "repetition_penalty"),
    (_request("Hi", logprobs=99), grpc.StatusCode.INVALID_ARGUMENT, "logprobs"),
    (_request(""), grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty"),
    (_request("word " * 600), grpc.StatusCode.INVALID_ARGUMENT, "shorten the prompt"),
    (_request("Hi", max_tokens=100_000), grpc.StatusCode.INVALID_ARGUMENT, "lower max_tokens"),
    (pb.GenerateRequest(chat=pb.ChatMessages(messages=[pb.ChatMessage(role="robot", content="x")])),
     grpc.StatusCode.INVALID_ARGUMENT, "role"),
], ids=["unknown-alias", "onchain-without-chain", "weights-sum", "weights-negative", "duplicate", "temperature",
        "nan", "top_p", "repetition", "logprobs", "empty", "prompt-over-context", "max-tokens-over-context",
        "chat-role"])
def test_bad_input_status(node: Node, request_: pb.GenerateRequest, code: grpc.StatusCode, words: str) -> None:
    with grpc.insecure_channel(node.address) as ch:
        stub = pb_grpc.InferenceStub(ch)
        for call in (lambda: stub.Generate(request_, timeout=30),
                     lambda: list(stub.GenerateStream(request_, timeout=30))):
            got, details = _code(call)
            assert got == code, details
            assert words in details
    assert _wait_idle(node.engine)["kv_blocks_used"] == 0


def test_queue_full_is_resource_exhausted(node: Node) -> None:
    async def run() -> tuple[grpc.StatusCode, str]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{node.small_port}") as ch:
            stub = pb_grpc.InferenceStub(ch)
            held = [stub.GenerateStream(_request(f"hold {i}", max_tokens=480), timeout=60) for i in range(2)]
            for call in held:  # both admitted and generating
                msg = await call.read()
                assert msg.HasField("delta")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Generate(_request("one too many"), timeout=30)
            for call in held:
                call.cancel()
            return info.value.code(), info.value.details() or ""

    code, details = asyncio.run(run())
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_queue=2" in details
    assert _wait_idle(node.engine)["kv_blocks_used"] == 0


def test_oversized_message_refused(node: Node) -> None:
    big = _request("x" * (MAX_MESSAGE + 1024))
    with grpc.insecure_channel(node.address, options=[("grpc.max_send_message_length", 4 * MAX_MESSAGE)]) as ch:
        code, _ = _code(lambda: pb_grpc.InferenceStub(ch).Generate(big, timeout=30))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_adapter_admin_calls(node: Node, random_adapter: Callable[..., Path], tmp_path: Path,
                             tiny_model_dir: Path) -> None:
    with grpc.insecure_channel(node.address) as ch:
        stub = pb_grpc.InferenceStub(ch)
        keys = {a.key for a in stub.ListAdapters(pb.ListAdaptersRequest(), timeout=10).adapters}
        assert {"a", "b"} <= keys
        path = random_adapter(tiny_model_dir, tmp_path / "c", seed=3)
        loaded = stub.LoadAdapter(pb.LoadAdapterRequest(adapter="c", path=str(path)), timeout=30).adapter
        assert loaded.key == "c" and loaded.alias == "c" and loaded.onchain_id == ""
        assert loaded.weights_hash.startswith("0x") and len(loaded.weights_hash) == 66
        out = stub.Generate(_request("The cat", [("c", 0.0)], max_tokens=4), timeout=30)
        assert out.usage.completion_tokens == 4
        code, details = _code(lambda: stub.LoadAdapter(
            pb.LoadAdapterRequest(adapter="d", path=str(path), expected_weights_hash="0x" + "ab" * 32), timeout=30))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "weights hash" in details
        code, _ = _code(lambda: stub.LoadAdapter(pb.LoadAdapterRequest(adapter="e", path=str(tmp_path / "none")),
                                                 timeout=30))
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert stub.UnloadAdapter(pb.UnloadAdapterRequest(adapter="c"), timeout=10).unloaded
        assert not stub.UnloadAdapter(pb.UnloadAdapterRequest(adapter="c"), timeout=10).unloaded
        code, _ = _code(lambda: stub.Generate(_request("The cat", [("c", 1.0)]), timeout=30))
        assert code == grpc.StatusCode.NOT_FOUND


def test_attribution_service_answers_from_the_record_log(node: Node) -> None:
    with grpc.insecure_channel(node.address) as ch:
        stub = pb_grpc.AttributionStub(ch)
        code, details = _code(lambda: stub.GetRecord(pb.GetRecordRequest(request_id="never-seen"), timeout=10))
        assert code == grpc.StatusCode.NOT_FOUND and request_id_bytes32("never-seen") in details
        code, _ = _code(lambda: stub.GetRewardProof(pb.GetRewardProofRequest(account="0x1234"), timeout=10))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert list(stub.ListEpochs(pb.ListEpochsRequest(), timeout=10).epochs) == []


def test_get_record_serves_a_logged_record(node: Node) -> None:
    from loraledger.node.ledger.records import AttributionRecord

    rec = AttributionRecord.create(
        request_id=request_id_bytes32("req-logged"), adapter_ids=[3, 7], weights_bps=[7000, 3000], prompt_tokens=5,
        completion_tokens=9, fee=42, output_hash="0x" + "11" * 32,
        contributors=[("0x" + "22" * 20, 3), ("0x" + "33" * 20, 1)])
    assert node.records.append(rec)
    with grpc.insecure_channel(node.address) as ch:
        resp = pb_grpc.AttributionStub(ch).GetRecord(pb.GetRecordRequest(request_id="req-logged"), timeout=10)
    assert resp.record.request_id == rec.request_id and list(resp.record.adapter_ids) == ["3", "7"]
    assert list(resp.record.weights_bps) == [7000, 3000] and resp.record.fee == "42"
    assert resp.leaf == "0x" + rec.content_hash().hex()  # not settled: no epoch or domain yet
    assert [c.weight for c in resp.record.contributors] == ["3", "1"]
    assert resp.record.contributors[0].share == pytest.approx(0.75)
    assert not resp.settled and list(resp.proof) == []
