"""Benchmark: throughput lost to the gRPC API layer at 64 concurrent streams (target: < 5%).

One engine (tiny random Llama by default, CPU, LoRA slots + random adapters served by alias) answers the same
workload twice, alternating, `--rounds` times each:

    direct   64 requests submitted to `Engine.submit`, each handle consumed by an asyncio task (what the servicer
             itself does)
    grpc     the same 64 requests as `GenerateStream` calls from a separate client process over one loopback
             channel to the node's gRPC server (NodeServer + InferenceServicer) in this process

    throughput = generated tokens / wall time (first submit to last final);  ratio = grpc / direct (medians)

Greedy decoding; requests spread over the base model and the adapters (request i uses adapter i % (A + 1)).
Writes JSON with the machine described to benchmarks/results/grpc_<device>.json.

    python scripts/bench_grpc.py                    # CPU, tiny model, 64 streams x 32 tokens, 3 rounds
    python scripts/bench_grpc.py --hidden 256 --layers 4 --max-tokens 64
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
from benchlib import machine_info  # scripts/benchlib.py, beside this script

from loraledger.proto.loraledger.v1 import loraledger_pb2 as pb
from loraledger.proto.loraledger.v1 import loraledger_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent


def workload(n: int, adapters: int) -> list[tuple[str, str]]:
    """[(prompt, adapter alias or "")] of the benchmark: distinct prompts, adapters round-robin with the base."""
    return [(f"Request {i}: the history of the city and its river, told briefly", "" if i % (adapters + 1) == 0
             else f"ad{i % (adapters + 1)}") for i in range(n)]


# ---- client (runs in its own process) ------------------------------------------------------------------------


async def stream_client(address: str, n: int, adapters: int, max_tokens: int, api_key: str = "") -> dict[str, Any]:
    """The client side (its own process): n concurrent GenerateStream calls; tokens and wall time."""
    metadata = [("authorization", f"Bearer {api_key}")] if api_key else None

    async def one(stub: pb_grpc.InferenceStub, prompt: str, adapter: str) -> int:
        req = pb.GenerateRequest(prompt=prompt, sampling=pb.SamplingParams(max_tokens=max_tokens))
        if adapter:
            req.adapters.append(pb.AdapterRef(adapter=adapter, weight=1.0))
        async for msg in stub.GenerateStream(req, timeout=600, metadata=metadata):
            if msg.HasField("final"):
                return int(msg.final.usage.completion_tokens)
        raise RuntimeError("stream ended without a final message")

    async with grpc.aio.insecure_channel(address) as ch:
        stub = pb_grpc.InferenceStub(ch)
        await one(stub, "warm up", "")
        t0 = time.perf_counter()
        tokens = await asyncio.gather(*(one(stub, p, a) for p, a in workload(n, adapters)))
        return {"seconds": time.perf_counter() - t0, "tokens": sum(tokens)}


# ---- server side ---------------------------------------------------------------------------------------------


def write_adapter(model_dir: Path, out_dir: Path, seed: int, r: int = 8) -> Path:
    """A random PEFT LoRA adapter (q_proj, v_proj of every layer) for the checkpoint in `model_dir`."""
    import torch
    from safetensors.torch import save_file

    cfg = json.loads((model_dir / "config.json").read_text())
    h, heads, kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    outs = {"q_proj": h, "v_proj": kv * h // heads}
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(cfg["num_hidden_layers"]):
        for t, fan_out in outs.items():
            p = f"base_model.model.model.layers.{layer}.self_attn.{t}"
            tensors[f"{p}.lora_A.weight"] = torch.randn(r, h, generator=g) * 0.1
            tensors[f"{p}.lora_B.weight"] = torch.randn(fan_out, r, generator=g) * 0.1
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": list(outs), "bias": "none"}))
    save_file(tensors, str(out_dir / "adapter_model.safetensors"))
    return out_dir


def serving_node(tmp: Path, layers: int, hidden: int, device: str, requests: int, adapters: int) -> tuple[Any, Any]:
    """(engine started, adapter catalog): a tiny random Llama of `layers` x `hidden` on `device`, sized for
    `requests` concurrent sequences, with `adapters` random adapters served by alias (ad1 .. adN)."""
    from loraledger.inference.tiny import init_tiny
    from loraledger.node.config import NodeConfig
    from loraledger.node.serving.app import build_engine
    from loraledger.node.serving.catalog import StoreCatalog

    heads = max(2, hidden // 16)
    model_dir = init_tiny(tmp / "model", layers=layers, hidden=hidden, heads=heads, kv_heads=max(1, heads // 2),
                          intermediate=2 * hidden)
    cfg = NodeConfig()
    cfg.model.dir, cfg.model.device = str(model_dir), device
    cfg.model.max_num_seqs, cfg.model.max_tokens_per_step = requests, 4096
    cfg.adapters.slots, cfg.adapters.max_rank = max(1, adapters), 8
    cfg.adapters.aliases = {f"ad{i}": str(write_adapter(model_dir, tmp / f"ad{i}", seed=i))
                            for i in range(1, adapters + 1)}
    engine, store = build_engine(cfg.validate())
    engine.start()
    return engine, StoreCatalog(store, cfg)


async def _direct(engine: Any, n: int, adapters: int, max_tokens: int) -> dict[str, Any]:
    from loraledger.inference.requests import GenerationRequest, GenerationResult
    from loraledger.inference.sequence import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)

    async def one(prompt: str, adapter: str) -> int:
        handle = engine.submit(GenerationRequest(prompt, params, adapters=((adapter, 1.0),) if adapter else ()))
        async for item in handle:
            if isinstance(item, GenerationResult):
                return int(item.completion_tokens)
        raise RuntimeError("handle ended without a result")

    await one("warm up", "")
    t0 = time.perf_counter()
    tokens = await asyncio.gather(*(one(p, a) for p, a in workload(n, adapters)))
    return {"seconds": time.perf_counter() - t0, "tokens": sum(tokens)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--client", metavar="ADDR", help=argparse.SUPPRESS)  # internal: run the client side
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=4, help="random adapters served by alias (default 4)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/grpc_<device>.json)")
    args = parser.parse_args()
    if args.client:
        print(json.dumps(asyncio.run(stream_client(args.client, args.streams, args.adapters, args.max_tokens))))
        return 0

    from loraledger.node.config import ServerConfig
    from loraledger.node.serving.generation import GenerationService
    from loraledger.node.serving.server import NodeServer
    from loraledger.node.serving.servicers import InferenceServicer

    tmp = Path(tempfile.mkdtemp(prefix="bench-grpc-"))
    heads = max(2, args.hidden // 16)
    engine, catalog = serving_node(tmp, args.layers, args.hidden, args.device, args.streams, args.adapters)
    servicer = InferenceServicer(GenerationService(engine, catalog=catalog, max_queue=4 * args.streams,
                                                   default_max_tokens=args.max_tokens))
    server = NodeServer(ServerConfig(listen="127.0.0.1:0"), servicer)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def on_loop(coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result()

    port = on_loop(server.start())
    on_loop(server.set_serving(True))
    client_cmd = [sys.executable, __file__, "--client", f"127.0.0.1:{port}", "--streams", str(args.streams),
                  "--adapters", str(args.adapters), "--max-tokens", str(args.max_tokens)]
    runs: dict[str, list[dict[str, Any]]] = {"direct": [], "grpc": []}
    for r in range(args.rounds):
        order = ("direct", "grpc") if r % 2 == 0 else ("grpc", "direct")
        for path in order:
            if path == "direct":
                res = on_loop(_direct(engine, args.streams, args.adapters, args.max_tokens))
            else:
                out = subprocess.run(client_cmd, check=True, capture_output=True, text=True, cwd=ROOT)
                res = json.loads(out.stdout.strip().splitlines()[-1])
            res["tokens_per_s"] = res["tokens"] / res["seconds"]
            runs[path].append(res)
            print(f"round {r} {path:6s}: {res['tokens']} tokens in {res['seconds']:.2f} s "
                  f"= {res['tokens_per_s']:.1f} tok/s", flush=True)
    on_loop(server.drain(1.0))
    engine.shutdown()
    loop.call_soon_threadsafe(loop.stop)

    med = {k: statistics.median(x["tokens_per_s"] for x in v) for k, v in runs.items()}
    ratio = med["grpc"] / med["direct"]
    result = {
        "benchmark": "gRPC API layer vs the engine called directly",
        "device": args.device, "machine": machine_info(args.device, grpcio=grpc.__version__),
        "model": {"layers": args.layers, "hidden": args.hidden, "heads": heads, "dtype": "float32"},
        "workload": {"streams": args.streams, "max_tokens": args.max_tokens, "adapters": args.adapters,
                     "rounds": args.rounds, "decoding": "greedy", "client": "separate process, one channel"},
        "runs": runs,
        "median_tokens_per_s": med,
        "ratio_grpc_over_direct": ratio,
        "throughput_loss_percent": (1 - ratio) * 100,
    }
    out_path = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"grpc_{args.device}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"grpc/direct throughput ratio {ratio:.3f} ({(1 - ratio) * 100:.1f}% loss); wrote {out_path}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
