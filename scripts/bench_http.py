"""Benchmark: the OpenAI-compatible HTTP API against the gRPC API on the same node (target: HTTP >= 0.95x gRPC).

One node in this process (tiny random Llama by default, CPU, random adapters served by alias) serves both APIs
from one `GenerationService`, as `loraledger node run` does. A client in a separate process sends the same
workload over each API, alternating, `--rounds` times each, in two modes:

    unary    N concurrent requests: gRPC `Generate`, HTTP `POST /v1/completions`
    stream   N concurrent streams:  gRPC `GenerateStream`, HTTP `POST /v1/completions` with stream: true (SSE)

    throughput = generated tokens / wall time (first request to last answer);  ratio = http / grpc (medians)

Greedy decoding; request i uses adapter i % (A + 1) (0 = the base model). Every answer's text, over either API
and in either mode, must equal the engine's own output for that request (checked; a mismatch fails the run).
Writes JSON with the machine described to benchmarks/results/http_<device>.json.

    python scripts/bench_http.py                    # CPU, 4 layers hidden 256, 64 requests x 64 tokens, 5 rounds
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
from bench_grpc import serving_node, workload  # scripts/bench_grpc.py, beside this script
from benchlib import machine_info

from loraledger.proto.loraledger.v1 import loraledger_pb2 as pb
from loraledger.proto.loraledger.v1 import loraledger_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
BASE = "base"


# ---- client (runs in its own process) ------------------------------------------------------------------------


async def _grpc(address: str, n: int, adapters: int, max_tokens: int, stream: bool) -> dict[str, Any]:
    async def one(stub: pb_grpc.InferenceStub, prompt: str, adapter: str) -> tuple[int, str]:
        req = pb.GenerateRequest(prompt=prompt, sampling=pb.SamplingParams(max_tokens=max_tokens))
        if adapter:
            req.adapters.append(pb.AdapterRef(adapter=adapter, weight=1.0))
        if not stream:
            final = await stub.Generate(req, timeout=600)
            return int(final.usage.completion_tokens), final.text
        text = []
        async for msg in stub.GenerateStream(req, timeout=600):
            if msg.HasField("delta"):
                text.append(msg.delta.text)
            else:
                return int(msg.final.usage.completion_tokens), "".join(text)
        raise RuntimeError("stream ended without a final message")

    async with grpc.aio.insecure_channel(address) as ch:
        stub = pb_grpc.InferenceStub(ch)
        await one(stub, "warm up", "")
        t0 = time.perf_counter()
        done = await asyncio.gather(*(one(stub, p, a) for p, a in workload(n, adapters)))
        return {"seconds": time.perf_counter() - t0, "tokens": sum(t for t, _ in done), "texts": [s for _, s in done]}


async def _http(base_url: str, n: int, adapters: int, max_tokens: int, stream: bool) -> dict[str, Any]:
    async def one(client: httpx.AsyncClient, prompt: str, adapter: str) -> tuple[int, str]:
        body = {"model": adapter or BASE, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                "stream": stream, "stream_options": {"include_usage": True}}
        if not stream:
            r = await client.post("/v1/completions", json=body)
            r.raise_for_status()
            doc = r.json()
            return int(doc["usage"]["completion_tokens"]), doc["choices"][0]["text"]
        text, tokens = [], 0
        async with client.stream("POST", "/v1/completions", json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk["choices"]:
                    text.append(chunk["choices"][0]["text"])
                elif chunk.get("usage"):
                    tokens = int(chunk["usage"]["completion_tokens"])
        return tokens, "".join(text)

    limits = httpx.Limits(max_connections=n + 1, max_keepalive_connections=n + 1)
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as client:
        await one(client, "warm up", "")
        t0 = time.perf_counter()
        done = await asyncio.gather(*(one(client, p, a) for p, a in workload(n, adapters)))
        return {"seconds": time.perf_counter() - t0, "tokens": sum(t for t, _ in done), "texts": [s for _, s in done]}


# ---- server side ---------------------------------------------------------------------------------------------


async def _reference(engine: Any, n: int, adapters: int, max_tokens: int) -> list[str]:
    """The engine's own greedy text for every request of the workload."""
    from loraledger.inference.requests import GenerationRequest, GenerationResult
    from loraledger.inference.sequence import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)

    async def one(prompt: str, adapter: str) -> str:
        handle = engine.submit(GenerationRequest(prompt, params, adapters=((adapter, 1.0),) if adapter else ()))
        async for item in handle:
            if isinstance(item, GenerationResult):
                return item.text
        raise RuntimeError("handle ended without a result")

    return list(await asyncio.gather(*(one(p, a) for p, a in workload(n, adapters))))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--client", nargs=3, metavar=("API", "MODE", "ADDR"), help=argparse.SUPPRESS)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=4, help="random adapters served by alias (default 4)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/http_<device>.json)")
    args = parser.parse_args()
    if args.client:
        api, mode, addr = args.client
        run = _grpc if api == "grpc" else _http
        print(json.dumps(asyncio.run(run(addr, args.requests, args.adapters, args.max_tokens, mode == "stream"))))
        return 0

    from loraledger.node.config import ServerConfig
    from loraledger.node.serving.generation import GenerationService
    from loraledger.node.serving.http_api import HttpNode, HttpServer, create_app
    from loraledger.node.serving.server import NodeServer
    from loraledger.node.serving.servicers import InferenceServicer

    tmp = Path(tempfile.mkdtemp(prefix="bench-http-"))
    heads = max(2, args.hidden // 16)
    engine, catalog = serving_node(tmp, args.layers, args.hidden, args.device, args.requests, args.adapters)
    service = GenerationService(engine, catalog=catalog, max_queue=4 * args.requests,
                                default_max_tokens=args.max_tokens)
    grpc_server = NodeServer(ServerConfig(listen="127.0.0.1:0"), InferenceServicer(service))
    http_node = HttpNode(service, BASE, serving=True)
    http_server = HttpServer(create_app(http_node), "127.0.0.1:0")
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def on_loop(coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result()

    grpc_port = on_loop(grpc_server.start())
    on_loop(grpc_server.set_serving(True))
    http_port = on_loop(http_server.start())
    reference = on_loop(_reference(engine, args.requests, args.adapters, args.max_tokens))
    address = {"grpc": f"127.0.0.1:{grpc_port}", "http": f"http://127.0.0.1:{http_port}"}
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {m: {"grpc": [], "http": []} for m in ("unary", "stream")}
    mismatches = 0
    for r in range(args.rounds):
        for mode in ("unary", "stream"):
            order = ("grpc", "http") if r % 2 == 0 else ("http", "grpc")
            for api in order:
                cmd = [sys.executable, __file__, "--client", api, mode, address[api], "--requests",
                       str(args.requests), "--adapters", str(args.adapters), "--max-tokens", str(args.max_tokens)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
                res = json.loads(out.stdout.strip().splitlines()[-1])
                bad = sum(a != b for a, b in zip(res.pop("texts"), reference, strict=True))
                mismatches += bad
                res["tokens_per_s"] = res["tokens"] / res["seconds"]
                runs[mode][api].append(res)
                print(f"round {r} {mode:6s} {api:4s}: {res['tokens']} tokens in {res['seconds']:.2f} s "
                      f"= {res['tokens_per_s']:.1f} tok/s, {bad} text(s) differ from the engine", flush=True)
    on_loop(http_server.stop())
    on_loop(grpc_server.drain(1.0))
    engine.shutdown()
    loop.call_soon_threadsafe(loop.stop)
    if mismatches:
        print(f"{mismatches} answers differ from the engine's own output", file=sys.stderr)
        return 1

    ratios = {}
    medians = {}
    for mode, by_api in runs.items():
        medians[mode] = {api: statistics.median(x["tokens_per_s"] for x in v) for api, v in by_api.items()}
        ratios[mode] = medians[mode]["http"] / medians[mode]["grpc"]
    result = {
        "benchmark": "OpenAI-compatible HTTP API vs the gRPC API, one node, one workload",
        "device": args.device,
        "machine": machine_info(args.device, grpcio=grpc.__version__, httpx=httpx.__version__),
        "model": {"layers": args.layers, "hidden": args.hidden, "heads": heads, "dtype": "float32"},
        "workload": {"requests": args.requests, "max_tokens": args.max_tokens, "adapters": args.adapters,
                     "rounds": args.rounds, "decoding": "greedy",
                     "client": "separate process; gRPC: one channel; HTTP: httpx, one pooled connection per request"},
        "texts_equal_engine_output": True,
        "runs": runs,
        "median_tokens_per_s": medians,
        "ratio_http_over_grpc": ratios,
        "target": "ratio >= 0.95 in both modes",
    }
    out_path = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"http_{args.device}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print("http/grpc throughput: " + ", ".join(f"{m} {r:.3f}x" for m, r in ratios.items()) + f"; wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
