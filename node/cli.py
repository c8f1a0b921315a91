"""The `loraledger` command line.

Each area owns one module that exposes `add_commands(subparsers)`; this file only lists those modules, so
adding a command never means editing another area's code. A command's handler receives the parsed
`argparse.Namespace` and returns a process exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from loraledger.node.errors import NodeError
from loraledger.node.logs import LOG_FORMATS, setup_logging

# Modules that contribute sub-commands, in the order they appear in `loraledger --help`.
COMMAND_MODULES: tuple[str, ...] = (
    "loraledger.node.commands.devnet",
    "loraledger.node.commands.deploy",
    "loraledger.node.commands.key",
    "loraledger.node.commands.demo",
    "loraledger.node.commands.contracts",
    "loraledger.node.commands.model",
    "loraledger.node.commands.lineage",
    "loraledger.node.commands.attribution",  # after any module that adds `datanet`: it adds `datanet index` there
    "loraledger.node.commands.serve",
    "loraledger.node.commands.apikey",
    "loraledger.node.commands.rewards",
    "loraledger.node.commands.operator",
    "loraledger.node.commands.epochs",  # after rewards: it adds `epoch list|revoke|resettle` there
    "loraledger.node.commands.audit",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraledger",
        description="Serve many LoRA adapters from one GPU and pay data contributors, provably, on an EVM chain.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--log-format", choices=LOG_FORMATS, default="text",
                        help="text (default) or json: one JSON object per line, with the request id on every "
                             "line a request causes")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        module = importlib.import_module(name)
        module.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_format, args.verbose)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        return int(handler(args) or 0)
    except (NodeError, ValueError, FileNotFoundError) as e:
        print(f"loraledger {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
