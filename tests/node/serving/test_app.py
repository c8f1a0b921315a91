"""The node as a process: `loraledger node run` starts, serves, and on SIGTERM mid-load lets in-flight requests
finish, refuses new ones and exits 0; `NodeApp.stop` with a short grace cancels what is left and frees the KV
cache; SIGTERM mid-load through on-chain adapters loses no record (finished or cut after producing tokens);
`model.quantize = "nf4"` serves adapters over a 4-bit base."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraledger.node.config import load_config
from loraledger.node.serving.app import NodeApp
from loraledger.proto.loraledger.v1 import loraledger_pb2 as pb
from loraledger.proto.loraledger.v1 import loraledger_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[3]
STARTUP_TIMEOUT = 180.0


def _stream_request(prompt: str, max_tokens: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt=prompt, sampling=pb.SamplingParams(max_tokens=max_tokens))


async def _stream(address: str, prompt: str, max_tokens: int, started: asyncio.Event | None = None
                  ) -> tuple[int, pb.GenerateResponse | None, grpc.StatusCode | None]:
    """(deltas seen, final or None, error code or None) of one streaming call."""
    deltas = 0
    async with grpc.aio.insecure_channel(address) as ch:
        try:
            async for msg in pb_grpc.InferenceStub(ch).GenerateStream(_stream_request(prompt, max_tokens), timeout=120):
                if msg.HasField("final"):
                    return deltas, msg.final, None
                deltas += 1
                if started is not None and deltas == 2:
                    started.set()
        except grpc.aio.AioRpcError as e:
            return deltas, None, e.code()
    return deltas, None, None


async def _until_not_serving(address: str, timeout: float = 30.0) -> None:
    """Poll health until the node reports NOT_SERVING or stops answering (it is draining)."""
    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            try:
                resp = await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
            except grpc.aio.AioRpcError:
                return
            if resp.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                return
            await asyncio.sleep(0.05)
    raise AssertionError(f"node still SERVING {timeout} s after SIGTERM")


@pytest.fixture
def node_process(tiny_model_dir: Path, tmp_path: Path, node_runner: Callable[..., Any]
                 ) -> Iterator[tuple[subprocess.Popen[str], str, list[str]]]:
    """`loraledger node run` on a free port; yields (process, address, stdout lines so far)."""
    node = node_runner(["--model", str(tiny_model_dir), "--device", "cpu", "--listen", "127.0.0.1:0",
                        "--records", str(tmp_path / "records.sqlite"), "--grace", "30",
                        "--deployment", str(tmp_path / "no-deployment.json")], timeout=STARTUP_TIMEOUT)
    try:
        yield node.proc, node.address, node.lines
    finally:
        if node.proc.poll() is None:
            node.proc.kill()
            node.proc.wait(10)
        node.reader.join(10)


@pytest.mark.slow
def test_node_run_serves_and_drains_on_sigterm(node_process: tuple[subprocess.Popen[str], str, list[str]]) -> None:
    proc, address, lines = node_process
    with grpc.insecure_channel(address) as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        first = pb_grpc.InferenceStub(ch).Generate(_stream_request("Hello", 6), timeout=60)
        assert first.usage.completion_tokens == 6 and first.finish_reason == "length"

    async def load() -> tuple[list[Any], grpc.StatusCode | None]:
        started = asyncio.Event()
        tasks = [asyncio.create_task(_stream(address, f"Load {i}", 200, started)) for i in range(8)]
        await asyncio.wait_for(started.wait(), 60)
        proc.send_signal(signal.SIGTERM)  # mid-load: streams are running
        await _until_not_serving(address)
        await asyncio.sleep(0.2)
        late = await _stream(address, "too late", 4)
        return await asyncio.gather(*tasks), late[2]

    results, late_code = asyncio.run(load())
    assert proc.wait(60) == 0, "\n".join(lines[-30:])
    for deltas, final, code in results:  # in-flight requests finished within the grace period
        assert code is None and final is not None
        assert final.usage.completion_tokens == 200 or final.finish_reason == "stop"
    assert late_code == grpc.StatusCode.UNAVAILABLE, "a request after SIGTERM must be refused"
    logged = [json.loads(line.split("loraledger.requests: ", 1)[1]) for line in lines
              if "loraledger.requests: " in line]
    finished = [e for e in logged if e["method"] == "GenerateStream" and e["status"] == "OK"]
    assert len(finished) == 8 and all(e["completion_tokens"] > 0 and e["latency_ms"] > 0 for e in finished)
    assert any("signal received" in line for line in lines) and lines[-1] == "loraledger node: stopped"


def test_node_app_stop_cancels_after_grace(tiny_model_dir: Path, tmp_path: Path) -> None:
    cfg = load_config(None, {
        "server": {"listen": "127.0.0.1:0", "grace_seconds": 0.2},
        "http": {"listen": "127.0.0.1:0"},
        "model": {"dir": str(tiny_model_dir), "device": "cpu"},
        "records": {"path": str(tmp_path / "records.sqlite")},
        "chain": {"deployment": str(tmp_path / "none.json")},
    }, environ={})
    app = NodeApp(cfg)

    async def run() -> tuple[list[Any], dict[str, Any]]:
        port = await app.start()
        started = asyncio.Event()
        tasks = [asyncio.create_task(_stream(f"127.0.0.1:{port}", f"Long {i}", 480, started)) for i in range(4)]
        await asyncio.wait_for(started.wait(), 60)
        t0 = time.monotonic()
        await app.stop()
        assert time.monotonic() - t0 < 10, "stop must not wait past the grace period for long requests"
        assert app.engine is not None
        return await asyncio.gather(*tasks), app.engine.stats()

    results, stats = asyncio.run(run())
    cut = [r for r in results if r[1] is None]
    assert cut, "480-token requests should still be running when the 0.2 s grace ends"
    assert all(code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE) for _, _, code in cut)
    assert stats["kv_blocks_used"] == 0 and stats["running"] == 0


@pytest.mark.parametrize("weights, bps", [
    ([1.0], [10000]), ([0.75, 0.25], [7500, 2500]), ([1 / 3, 1 / 3, 1 / 3], [3334, 3333, 3333]),
    ([1 - 2e-9, 1e-9, 1e-9], [9998, 1, 1]),
])
def test_weights_to_bps_sums_exactly(weights: list[float], bps: list[int]) -> None:
    from loraledger.node.ledger.rewards import weights_to_bps

    assert weights_to_bps(weights) == bps and sum(bps) == 10000


@pytest.mark.slow
def test_sigterm_mid_load_loses_no_record(chain_world: Any, tiny_model_dir: Path, tmp_path: Path,
                                          node_runner: Callable[..., Any]) -> None:
    """Streams through on-chain adapters, SIGTERM while they run (grace 1 s): every stream whose final response
    arrived has its record with the same usage, and every stream cut by the grace period after tokens were
    produced has the record of the tokens the engine generated."""
    import sqlite3

    from loraledger.node.serving.generation import request_id_bytes32

    records = tmp_path / "records.sqlite"
    node = node_runner(["--model", str(tiny_model_dir), "--device", "cpu", "--listen", "127.0.0.1:0",
                        "--records", str(records), "--grace", "1", "--adapters-dir", str(tmp_path / "adapters"),
                        "--deployment", str(chain_world.deployment_file)],
                       {"LORALEDGER_SETTLEMENT_ENABLED": "false"})

    async def one(i: int, started: asyncio.Event, seen: dict[str, int]) -> tuple[str, pb.GenerateResponse | None]:
        rid = f"sigterm-{i}"
        req = pb.GenerateRequest(prompt=f"Load {i}", request_id=rid, sampling=pb.SamplingParams(
            max_tokens=12 if i % 2 else 480), adapters=[pb.AdapterRef(adapter=str(1 + i % 2))])
        seen[rid] = 0
        async with grpc.aio.insecure_channel(node.address) as ch:
            try:
                async for msg in pb_grpc.InferenceStub(ch).GenerateStream(req, timeout=120):
                    if msg.HasField("final"):
                        return rid, msg.final
                    seen[rid] += 1
                    if all(v >= 2 for v in seen.values()) and len(seen) == 8:
                        started.set()
            except grpc.aio.AioRpcError as e:
                assert e.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE), e
        return rid, None

    async def load() -> tuple[list[tuple[str, pb.GenerateResponse | None]], dict[str, int]]:
        started, seen = asyncio.Event(), {}
        tasks = [asyncio.create_task(one(i, started, seen)) for i in range(8)]
        await asyncio.wait_for(started.wait(), 60)
        node.proc.send_signal(signal.SIGTERM)
        return await asyncio.gather(*tasks), seen

    results, seen = asyncio.run(load())
    assert node.proc.wait(60) == 0, "\n".join(node.lines[-30:])
    conn = sqlite3.connect(records)
    logged = {r: c for r, c in conn.execute("SELECT request_id, completion_tokens FROM records")}
    conn.close()
    finished = [(rid, f) for rid, f in results if f is not None]
    assert len(finished) >= 4, "the 12-token streams finish within the grace period"
    for rid, final in results:
        key = request_id_bytes32(rid)
        assert key in logged, f"no record for {rid} ({'finished' if final else 'cut'})"
        if final is not None:
            assert logged[key] == final.usage.completion_tokens and final.attribution.request_id == key
        else:
            assert logged[key] >= seen[rid] > 0
    assert len(logged) == 8


def _nf4_runs_here() -> bool:
    """bitsandbytes 4-bit works on this machine (its CPU kernels need a recent build)."""
    try:
        import bitsandbytes as bnb
        import torch
    except ImportError:
        return False
    q = bnb.nn.Linear4bit(64, 8, compute_dtype=torch.float32, quant_type="nf4", device="meta")
    q.weight = bnb.nn.Params4bit(torch.randn(8, 64), requires_grad=False, quant_type="nf4", module=q)
    q.weight = q.weight.to("cpu")
    with torch.no_grad():
        return bool(torch.isfinite(q(torch.randn(2, 64))).all())


@pytest.mark.skipif(not _nf4_runs_here(), reason="bitsandbytes 4-bit cannot run on this machine")
def test_nf4_base_serves_adapters(tiny_model_dir: Path, tmp_path: Path, random_adapter: Callable[..., Path]) -> None:
    from loraledger.inference.quant import is_nf4
    from loraledger.inference.requests import GenerationRequest
    from loraledger.inference.sequence import SamplingParams
    from loraledger.node.serving.app import build_engine

    cfg = load_config(None, {
        "model": {"dir": str(tiny_model_dir), "device": "cpu", "quantize": "nf4"},
        "adapters": {"slots": 2, "max_rank": 8},
    }, environ={})
    cfg.adapters.aliases = {"a": str(random_adapter(tiny_model_dir, tmp_path / "a", seed=5))}
    engine, store = build_engine(cfg)
    bases = [getattr(m, "base", m) for m in engine.model.named_linears().values()]
    assert bases and all(is_nf4(b) for b in bases), "every base projection must be 4-bit"
    store.register("a", cfg.adapters.aliases["a"])
    params = SamplingParams(max_tokens=6, temperature=0.0)
    base, tuned = engine.generate([GenerationRequest("The cat", params),
                                   GenerationRequest("The cat", params, adapters=(("a", 1.0),))])
    assert base.completion_tokens == tuned.completion_tokens == 6
    assert base.token_ids != tuned.token_ids, "the adapter must act on the quantized base"
