"""`loraledger demo`: what `make run` runs (see node/demo.py for the stages)."""

from __future__ import annotations

import argparse

from node.demo import report, run_demo


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("demo", help="end-to-end demo on a local devnet (what `make run` runs)")
    p.add_argument("--state-dir", default=".loraledger", help="devnet and demo files go here (default: %(default)s)")
    p.add_argument("--port", type=int, default=0, help="devnet RPC port when it has to start (0: a free one)")
    p.set_defaults(handler=_demo)


def _demo(args: argparse.Namespace) -> int:
    ctx = run_demo(args.state_dir, port=args.port or None, progress=lambda line: print(line, flush=True))
    print(report(ctx))
    return 0
