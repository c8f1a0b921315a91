"""Benchmark: what API keys cost the gRPC path at 64 concurrent streams (target: under 2% of tokens/s).

One engine (tiny random Llama, CPU, random adapters by alias) behind two gRPC servers in this process, in turn:

    open    no keys in force (Authorizer mode "none")
    keyed   every call carries `authorization: Bearer KEY`; the node looks the key up in its keys file (a stat of
            the file per call, re-read when it changes), checks the scope, and counts the key's requests and
            tokens per minute (limits set high enough never to refuse)

A client in a separate process sends the same 64 streams to each, alternating, `--rounds` times.
    throughput = generated tokens / wall time;  ratio = keyed / open (medians)
The on-chain access check is a dictionary lookup once an adapter is loaded (tests/node/chain/test_access.py
counts zero RPCs over 20,000 checks); it is not on this path because these adapters are local aliases.
Writes JSON with the machine to benchmarks/results/auth_<device>.json.
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
from pathlib import Path
from typing import Any

import grpc
from bench_grpc import serving_node, stream_client  # scripts/bench_grpc.py, beside this script
from benchlib import machine_info

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--client", nargs=2, metavar=("ADDR", "KEY"), help=argparse.SUPPRESS)
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/auth_<device>.json)")
    args = parser.parse_args()
    if args.client:
        addr, key = args.client
        print(json.dumps(asyncio.run(stream_client(addr, args.streams, args.adapters, args.max_tokens,
                                                   "" if key == "-" else key))))
        return 0

    from loraledger.node.config import ServerConfig
    from loraledger.node.serving.auth import Authorizer, KeyStore
    from loraledger.node.serving.generation import GenerationService
    from loraledger.node.serving.server import NodeServer
    from loraledger.node.serving.servicers import InferenceServicer

    tmp = Path(tempfile.mkdtemp(prefix="bench-auth-"))
    heads = max(2, args.hidden // 16)
    engine, catalog = serving_node(tmp, args.layers, args.hidden, args.device, args.streams, args.adapters)
    keys = KeyStore(tmp / "keys.json")
    secret, _ = keys.create("bench", "infer", rpm=10**9, tpm=10**12)
    servers = {
        "open": NodeServer(ServerConfig(listen="127.0.0.1:0"), InferenceServicer(GenerationService(
            engine, catalog=catalog, max_queue=4 * args.streams, authorizer=Authorizer("none", None)))),
        "keyed": NodeServer(ServerConfig(listen="127.0.0.1:0"), InferenceServicer(GenerationService(
            engine, catalog=catalog, max_queue=4 * args.streams, authorizer=Authorizer("keys", keys)))),
    }
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    def on_loop(coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result()

    ports = {name: on_loop(s.start()) for name, s in servers.items()}
    runs: dict[str, list[dict[str, Any]]] = {"open": [], "keyed": []}
    for r in range(args.rounds):
        for name in (("open", "keyed") if r % 2 == 0 else ("keyed", "open")):
            cmd = [sys.executable, __file__, "--client", f"127.0.0.1:{ports[name]}",
                   secret if name == "keyed" else "-", "--streams", str(args.streams), "--adapters",
                   str(args.adapters), "--max-tokens", str(args.max_tokens)]
            res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
                             .stdout.strip().splitlines()[-1])
            res["tokens_per_s"] = res["tokens"] / res["seconds"]
            runs[name].append(res)
            print(f"round {r} {name:5s}: {res['tokens']} tokens in {res['seconds']:.2f} s = "
                  f"{res['tokens_per_s']:.1f} tok/s", flush=True)
    for s in servers.values():
        on_loop(s.drain(1.0))
    engine.shutdown()
    loop.call_soon_threadsafe(loop.stop)
    med = {k: statistics.median(x["tokens_per_s"] for x in v) for k, v in runs.items()}
    ratio = med["keyed"] / med["open"]
    result = {
        "benchmark": "API keys (lookup, scope, rate limits) on the gRPC path vs the same node open",
        "device": args.device, "machine": machine_info(args.device, grpcio=grpc.__version__),
        "model": {"layers": args.layers, "hidden": args.hidden, "heads": heads, "dtype": "float32"},
        "workload": {"streams": args.streams, "max_tokens": args.max_tokens, "adapters": args.adapters,
                     "rounds": args.rounds, "client": "separate process, one channel"},
        "runs": runs, "median_tokens_per_s": med, "ratio_keyed_over_open": ratio,
        "overhead_percent": (1 - ratio) * 100, "target": "overhead under 2%",
    }
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"auth_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"keyed/open throughput {ratio:.3f} ({(1 - ratio) * 100:.1f}% overhead); wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
