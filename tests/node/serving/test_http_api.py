"""The OpenAI-compatible HTTP API of a real node (NodeApp on loopback, the tiny model, adapters registered on the
session's anvil plus a local alias), driven by the official `openai` client and by raw HTTP: completions, chat,
streams, the model list, adapters by id, alias and mix, the attribution extension against the record log, each
error status, SSE framing with a client that leaves mid-stream, the epoch export, and /metrics moving with
traffic."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import h11
import httpx
import openai
import pytest

from loraledger.node.config import load_config
from loraledger.node.ledger.epochs import export_epoch
from loraledger.node.ledger.settler import Settler
from loraledger.node.logs import request_context, setup_logging
from loraledger.node.serving.app import NodeApp
from loraledger.proto.loraledger.v1 import loraledger_pb2 as pb
from loraledger.proto.loraledger.v1 import loraledger_pb2_grpc as pb_grpc

KEY_ENV = "LORALEDGER_HTTP_TEST_OPERATOR_KEY"
MAX_QUEUE = 6


@dataclass
class Http:
    app: NodeApp
    base_url: str
    grpc_address: str
    world: Any
    model: str  # the base model's served name

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(chain_world: Any, tiny_model_dir: Path, random_adapter: Callable[..., Path],
         tmp_path_factory: pytest.TempPathFactory, server_loop: Any,
         start_app: Callable[..., Any]) -> Iterator[Http]:
    tmp = tmp_path_factory.mktemp("http-node")
    alias_dir = random_adapter(tiny_model_dir, tmp / "local-adapter", seed=41)
    cfg = load_config(None, {
        "server": {"listen": "127.0.0.1:0", "max_queue": MAX_QUEUE, "grace_seconds": 2.0},
        "http": {"listen": "127.0.0.1:0", "max_body_bytes": 64 * 1024},
        "model": {"dir": str(tiny_model_dir), "device": "cpu", "max_num_seqs": 16, "default_max_tokens": 8},
        "adapters": {"dir": str(tmp / "adapters"), "slots": 4, "max_rank": 8, "aliases": {"local": str(alias_dir)}},
        "chain": {"deployment": str(chain_world.deployment_file), "key_env": KEY_ENV},
        "records": {"path": str(tmp / "records.sqlite")},
        "settlement": {"enabled": False},
    }, environ={})
    app, port = start_app(server_loop, cfg, chain_world.operator_key())
    yield Http(app, f"http://127.0.0.1:{app.http_port}", f"127.0.0.1:{port}", chain_world,
               cfg.model.served_name)
    server_loop.run(app.stop(1.0))


def _record(h: Http, record_id: str) -> Any:
    assert h.app.records is not None
    h.app.records.flush()
    return h.app.records.get_record(record_id)


def _wait_idle(h: Http, timeout: float = 15.0) -> dict[str, Any]:
    assert h.app.engine is not None
    deadline = time.monotonic() + timeout
    while True:
        stats = h.app.engine.stats()
        if (stats["running"] == 0 and stats["waiting"] == 0 and stats["kv_blocks_used"] == 0
                and h.app.generation is not None and h.app.generation.inflight == 0) or time.monotonic() > deadline:
            return stats
        time.sleep(0.02)


def _scrape(h: Http) -> dict[str, float]:
    """Every sample of /metrics as {'name{labels}': value} (parsed with prometheus_client's own parser)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(h.base_url + "/metrics", timeout=30).text
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}"] = s.value
    return out


def test_models_list_the_base_and_the_adapters(http: Http) -> None:
    client = http.client()
    client.completions.create(model="1", prompt="warm up", max_tokens=1)  # resolves on-chain adapter 1
    models = {m.id: m for m in client.models.list().data}
    assert http.model in models and models[http.model].model_extra["loraledger"]["kind"] == "base"
    assert models[http.model].model_extra["loraledger"]["base_model_hash"].startswith("0x")
    one = models["1"].model_extra["loraledger"]
    assert models["1"].owned_by == http.world.owners[1]
    assert one["onchain_id"] == "1" and one["fee_per_token"] == "3"
    assert one["datanets"] == [str(http.world.datanet_id)] and one["weights_hash"].startswith("0x")
    assert models["local"].owned_by == "local" and models["local"].model_extra["loraledger"]["onchain_id"] is None


def test_completion_by_id_equals_grpc_and_its_record(http: Http) -> None:
    client = http.client()
    raw = client.completions.with_raw_response.create(model="2", prompt="Tell me about owls", max_tokens=6,
                                                      temperature=0)
    resp = raw.parse()
    ext = resp.model_extra["loraledger"]
    assert raw.headers["x-loraledger-record-id"] == ext["record_id"]
    assert raw.headers["x-loraledger-fee"] == ext["fee"]
    assert resp.choices[0].finish_reason == "length" and resp.usage.completion_tokens == 6
    record = _record(http, ext["record_id"])
    assert record is not None, "the HTTP request left no record in the log"
    assert [str(i) for i in record.adapter_ids] == ext["adapters"] == ["2"]
    assert list(record.weights_bps) == ext["weights"] == [10_000]
    assert str(record.fee) == ext["fee"] == str(5 * (resp.usage.prompt_tokens + resp.usage.completion_tokens))
    assert record.attribution_hash == ext["contributors_hash"]
    assert record.completion_tokens == resp.usage.completion_tokens
    # the same request over gRPC: same text, an equal record (same adapters, weights, fee, contributors)
    with grpc.insecure_channel(http.grpc_address) as ch:
        final = pb_grpc.InferenceStub(ch).Generate(pb.GenerateRequest(
            prompt="Tell me about owls", adapters=[pb.AdapterRef(adapter="2")],
            sampling=pb.SamplingParams(max_tokens=6, temperature=0)), timeout=60)
    assert final.text == resp.choices[0].text
    other = _record(http, final.attribution.request_id)
    assert (other.adapter_ids, other.weights_bps, other.fee, other.attribution_hash) == \
        (record.adapter_ids, record.weights_bps, record.fee, record.attribution_hash)


def test_chat_stream_equals_unary_with_usage_by_alias(http: Http) -> None:
    client = http.client()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a bird."}]
    unary = client.chat.completions.create(model="local", messages=messages, max_tokens=7, temperature=0)
    chunks = list(client.chat.completions.create(model="local", messages=messages, max_tokens=7, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == unary.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].model_extra["loraledger"]["record_id"] is None  # a local alias: no record
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == unary.usage.completion_tokens
    assert unary.model_extra["loraledger"] == {"record_id": None, "record_hash": None, "fee": "0", "adapters": [],
                                               "weights": [], "contributors_hash": None, "datanets": []}


def test_mix_logprobs_and_n(http: Http) -> None:
    client = http.client()
    resp = client.completions.create(model=http.model, prompt="Owls hunt", max_tokens=4, temperature=0, logprobs=2,
                                     extra_body={"adapters": [{"adapter": "1", "weight": 0.7},
                                                              {"adapter": "3", "weight": 0.3}]})
    ext = resp.model_extra["loraledger"]
    assert ext["adapters"] == ["1", "3"] and ext["weights"] == [7000, 3000]
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == 4 and all(len(t) <= 2 for t in lp.top_logprobs)
    assert "".join(lp.tokens).startswith(resp.choices[0].text[:1])
    chat = client.chat.completions.create(model="1", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                          n=2, seed=7, temperature=1.0, logprobs=True, top_logprobs=1)
    assert [c.index for c in chat.choices] == [0, 1]
    ids = {c.model_extra["loraledger"]["record_id"] for c in chat.choices}
    assert len(ids) == 2 and all(_record(http, i) is not None for i in ids)  # one record per choice
    assert all(len(c.logprobs.content) == 3 for c in chat.choices)


@pytest.mark.parametrize(("body", "status", "param", "words"), [
    ({"model": "404", "prompt": "x"}, 404, "model", "no adapter 404"),
    ({"model": "nope", "prompt": "x"}, 404, "model", "unknown adapter 'nope'"),
    ({"model": "1", "prompt": "x", "temperature": -1}, 400, "temperature", "greater than or equal to 0"),
    ({"model": "1", "prompt": "x", "max_tokens": 0}, 400, "max_tokens", "greater than or equal to 1"),
    ({"model": "1", "prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty", "not supported"),
    ({"model": "1", "prompt": ""}, 400, None, "prompt is empty"),
    ({"model": "1", "prompt": "x", "stop": [1]}, 400, "stop", ""),
    ({"model": "base?", "prompt": "x", "adapters": [{"adapter": "1", "weight": 0.5}]}, 400, "model", "base model"),
    ({"model": "M", "prompt": "x", "adapters": [{"adapter": "1", "weight": 0.5}, {"adapter": "2", "weight": 0.4}]},
     400, None, "sum to 1"),
])
def test_error_statuses(http: Http, body: dict[str, Any], status: int, param: str | None, words: str) -> None:
    if body["model"] == "M":
        body = {**body, "model": http.model}
    r = httpx.post(http.base_url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and words in err["message"]
    assert err["param"] == param


def test_openai_client_raises_the_matching_errors(http: Http) -> None:
    client = http.client()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="999", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(model="1", messages=[{"role": "robot", "content": "x"}])


def test_body_too_large_queue_full_and_shutting_down(http: Http, server_loop: Any) -> None:
    big = {"model": "1", "prompt": "x" * (70 * 1024)}
    r = httpx.post(http.base_url + "/v1/completions", json=big, timeout=30)
    assert r.status_code == 413 and "max_body_bytes" in r.json()["error"]["message"]

    async def hold_and_overflow() -> tuple[int, dict[str, str], dict[str, Any]]:
        async with httpx.AsyncClient(base_url=http.base_url, timeout=60) as c:
            body = {"model": "1", "prompt": "a long one", "max_tokens": 200, "stream": True}
            streams = [c.stream("POST", "/v1/completions", json=body) for _ in range(MAX_QUEUE)]
            opened = [await s.__aenter__() for s in streams]
            try:
                assert all(o.status_code == 200 for o in opened)
                over = await c.post("/v1/completions", json={"model": "1", "prompt": "x", "max_tokens": 1})
                return over.status_code, dict(over.headers), over.json()
            finally:
                for s in streams:
                    await s.__aexit__(None, None, None)

    code, headers, payload = asyncio.run(hold_and_overflow())
    assert code == 429 and headers["retry-after"] == "1" and payload["error"]["type"] == "rate_limit_error"
    _wait_idle(http)
    assert http.app.generation is not None
    http.app.generation.accepting = False
    try:
        r = httpx.post(http.base_url + "/v1/completions", json={"model": "1", "prompt": "x"}, timeout=30)
        assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"]
        assert httpx.get(http.base_url + "/health", timeout=10).status_code == 503
    finally:
        http.app.generation.accepting = True
    assert httpx.get(http.base_url + "/health", timeout=10).json() == {"status": "serving"}


def test_sse_framing_and_a_client_that_leaves_mid_stream(http: Http) -> None:
    """Raw HTTP over a socket: `data: {json}\\n\\n` events; closing the socket mid-stream frees the sequence's KV
    blocks at once, and the tokens it produced are recorded as over gRPC (an abandoned request's record)."""
    body = json.dumps({"model": "1", "prompt": "Stream a long answer", "max_tokens": 400, "stream": True}).encode()
    host, port = http.base_url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    conn = h11.Connection(h11.CLIENT)  # an HTTP/1.1 client of its own: the events as the socket carries them
    sock.sendall(conn.send(h11.Request(method="POST", target="/v1/completions", headers=[
        ("Host", host), ("Content-Type", "application/json"), ("Content-Length", str(len(body)))])))
    sock.sendall(conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
    response, stream = None, b""
    while stream.count(b"\n\n") < 3:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = sock.recv(65536)
            assert data, "the server closed the stream early"
            conn.receive_data(data)
        elif isinstance(event, h11.Response):
            response = event
        elif isinstance(event, h11.Data):
            stream += bytes(event.data)
        else:
            raise AssertionError(f"unexpected {event!r} before three events")
    assert response is not None and response.status_code == 200
    headers = {k.decode(): v.decode() for k, v in response.headers}
    assert headers["content-type"].startswith("text/event-stream")
    request_id = headers["x-loraledger-request-id"]
    framed = stream.split(b"\n\n")[:3]
    assert all(e.startswith(b"data: {") and b"\n" not in e for e in framed), framed
    assert [json.loads(e[6:])["object"] for e in framed] == ["text_completion"] * 3
    sock.close()
    stats = _wait_idle(http)
    assert stats["kv_blocks_used"] == 0 and stats["running"] == 0
    deadline = time.monotonic() + 30
    while (rec := _record(http, request_id)) is None:
        assert time.monotonic() < deadline, "no record of the abandoned stream"
        time.sleep(0.05)
    assert 1 <= rec.completion_tokens < 400 and [int(i) for i in rec.adapter_ids] == [1]


def test_epoch_export_over_http_equals_the_cli_file(http: Http, tmp_path: Path) -> None:
    http.client().completions.create(model="3", prompt="one for the epoch", max_tokens=2)
    assert http.app.records is not None
    Settler(http.app.records, http.world.bind(http.world.operator)).settle()
    row = http.app.records.last_confirmed()
    assert row is not None
    r = httpx.get(f"{http.base_url}/v1/epochs/{row.epoch}/export", timeout=60)
    assert r.status_code == 200
    dep = http.world.deployment
    out = export_epoch(http.app.records, row.epoch, tmp_path / "cli.json",
                       ledger=dep.address("AttributionLedger"), chain_id=dep.chain_id)
    assert r.content == out.read_bytes()
    assert httpx.get(f"{http.base_url}/v1/epochs/999/export", timeout=30).status_code == 404


def test_metrics_move_with_traffic(http: Http) -> None:
    before = _scrape(http)
    resp = http.client().completions.create(model="1", prompt="count me", max_tokens=5, temperature=0)
    _wait_idle(http)
    after = _scrape(http)

    def moved(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert moved("loraledger_requests_total{adapter=1,api=http,status=OK}") == 1
    assert moved("loraledger_completion_tokens_total{adapter=1}") == resp.usage.completion_tokens
    assert moved("loraledger_prompt_tokens_total{adapter=1}") == resp.usage.prompt_tokens
    assert moved("loraledger_fees_total{adapter=1}") == int(resp.model_extra["loraledger"]["fee"])
    assert moved("loraledger_time_to_first_token_seconds_count{api=http}") == 1
    assert moved("loraledger_inter_token_latency_seconds_count{api=http}") == resp.usage.completion_tokens - 1
    assert moved("loraledger_request_duration_seconds_count{api=http}") == 1
    assert moved("loraledger_records_pending{}") == 1
    assert moved("loraledger_records_pending_fees{}") == int(resp.model_extra["loraledger"]["fee"])
    assert after["loraledger_kv_blocks_used{}"] == 0 and after["loraledger_kv_blocks_free{}"] > 0
    assert after["loraledger_requests_in_flight{}"] == 0 and after["loraledger_engine_running{}"] == 0
    assert after["loraledger_adapter_slots{}"] == 4 and after["loraledger_adapter_slots_used{}"] >= 1
    assert moved("loraledger_adapter_store_hits_total{tier=slot}") + \
        moved("loraledger_adapter_store_misses_total{tier=slot}") >= 1
    assert after["loraledger_adapter_loads_total{}"] >= 1
    assert after["loraledger_adapter_load_seconds_count{}"] == after["loraledger_adapter_loads_total{}"]
    assert after["loraledger_epoch_in_effect{}"] >= 0 and after["loraledger_operator_token_balance{}"] > 0
    assert any(k.startswith("loraledger_build_info{") for k in after)


def test_json_logs_carry_the_request_id() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    setup_logging("json")
    handler = root.handlers[0]
    handler.stream = stream  # type: ignore[attr-defined]
    try:
        with request_context("0xabc"):
            logging.getLogger("loraledger.test").info("inside %s", "a request")
        logging.getLogger("loraledger.test").warning("outside")
    finally:  # the session's own handlers back (a handler on a closed capture stream would fail later lines)
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved[0]:
            root.addHandler(h)
        root.setLevel(saved[1])
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "inside a request" and first["request_id"] == "0xabc"
    assert first["level"] == "INFO" and first["logger"] == "loraledger.test" and "ts" in first
    assert second["level"] == "WARNING" and "request_id" not in second
    with pytest.raises(ValueError, match="json"):
        setup_logging("xml")


def test_inter_token_gaps_count_every_token_after_the_first() -> None:
    """However the engine's wake-ups batch the tokens, a request of n tokens leaves n - 1 gaps."""
    from loraledger.node.serving.generation import CallLog

    for batches in ([1, 1, 1, 1, 1], [2, 3], [5], [3, 1, 1]):
        call = CallLog("test")
        for n in batches:
            call.tokens_arrived(n)
        assert len(call.inter_token) == sum(batches) - 1, batches
        assert call.first_token_at is not None and all(g >= 0 for g in call.inter_token)
