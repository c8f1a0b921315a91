"""`loraledger contracts compile|check`: build the Solidity sources into `contracts/artifacts/`, or verify them.

`compile` needs Node.js and `node_modules` (solc, OpenZeppelin); the committed artifacts mean a user who only
deploys never runs it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from loraledger.node.chain.artifacts import ARTIFACTS_DIR, artifact_bytes, compile_contracts, write_artifacts


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("contracts", help="Solidity contracts: compile to artifacts, check artifacts")
    sub = p.add_subparsers(dest="contracts_command", metavar="ACTION", required=True)

    comp = sub.add_parser("compile", help="compile contracts/*.sol and write contracts/artifacts/<Name>.json")
    comp.add_argument("--out", default=str(ARTIFACTS_DIR), help="artifacts directory (default: %(default)s)")
    comp.set_defaults(handler=_compile)

    check = sub.add_parser("check", help="recompile and fail if the artifacts on disk differ (exit 1)")
    check.add_argument("--dir", default=str(ARTIFACTS_DIR), help="artifacts directory (default: %(default)s)")
    check.set_defaults(handler=_check)


def _compile(args: argparse.Namespace) -> int:
    artifacts = compile_contracts()
    for path in write_artifacts(artifacts, Path(args.out)):
        print(f"wrote {path}")
    return 0


def _check(args: argparse.Namespace) -> int:
    artifacts = compile_contracts()
    out_dir = Path(args.dir)
    stale = []
    for name, art in sorted(artifacts.items()):
        path = out_dir / f"{name}.json"
        if not path.is_file() or path.read_bytes() != artifact_bytes(art):
            stale.append(name)
    extra = sorted(p.stem for p in out_dir.glob("*.json") if p.stem not in artifacts) if out_dir.is_dir() else []
    if stale or extra:
        print(f"artifacts differ from the sources: changed {stale}, stale files {extra}; "
              "run `loraledger contracts compile`")
        return 1
    print(f"{len(artifacts)} artifacts in {out_dir} match the sources")
    return 0
