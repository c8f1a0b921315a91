"""`loraledger audit`: check an operator's epochs from the chain and their published exports alone.

    loraledger audit --deployment D --operator ADDR [--epoch N | --all] [--export FILE|DIR|TEMPLATE]
                     [--server HOST:PORT] [--lineage [ID=]lineage.json ...] [--token-level] [--json]
    loraledger audit --watch --guardian-key-file K --operator ADDR [--operator ADDR2 ...] [--state FILE]
                     [--grace SECONDS] [--poll SECONDS] [export sources as above]

Trusts neither the node nor its database: only the JSON-RPC endpoint and the exports, whose sha256 the chain
holds. One line per violation; exit code 0 when every audited epoch passes, 1 when one fails, 2 when the audit
could not run (bad arguments, chain unreachable). Export sources, tried in order: `--export` (a file, a folder
of epoch-N.json, or a template with {operator} and {epoch}), `--server` (gRPC GetEpochExport), then the mirror
template `--export-uri` / the deployment's `extra.exportUri` / the config's `[settlement] export_uri`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from typing import Any

from eth_account import Account

from loraledger.node.errors import ConfigError


def add_commands(subparsers: Any) -> None:
    p = subparsers.add_parser("audit", help="recompute an operator's epochs from the chain and their exports; "
                                            "optionally watch and revoke failing roots")
    p.add_argument("--deployment", help="deployment.json (default: $LORALEDGER_DEPLOYMENT, [chain] deployment)")
    p.add_argument("--rpc-url", help="JSON-RPC endpoint (default: $LORALEDGER_CHAIN_RPC_URL / [chain] rpc_url)")
    p.add_argument("--config", help="node config TOML (only for defaults: deployment, rpc url, export_uri)")
    p.add_argument("--operator", action="append", required=True, metavar="ADDR",
                   help="operator whose epoch stream to audit (repeatable with --watch)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--epoch", type=int, help="audit this epoch (default: the operator's last)")
    which.add_argument("--all", action="store_true", help="audit every epoch of the operator")
    p.add_argument("--export", help="export FILE, a folder of epoch-N.json, or a template with {operator}/{epoch}")
    p.add_argument("--server", help="fetch exports from the node at HOST:PORT (gRPC GetEpochExport)")
    p.add_argument("--api-key", default=os.environ.get("LORALEDGER_API_KEY", ""), help="the node's API key")
    p.add_argument("--export-uri", help="mirror URI template ({chainId}, {ledger}, {operator}, {epoch})")
    p.add_argument("--lineage", action="append", default=[], metavar="[ID=]PATH",
                   help="an adapter's lineage.json (repeatable): check records' contributor splits against it")
    p.add_argument("--token-level", action="store_true",
                   help="the node re-weights lineage with token-level attribution: only check that contributors "
                        "come from the adapters' lineage")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    p.add_argument("--watch", action="store_true", help="follow new epochs and revoke failing ones")
    p.add_argument("--guardian-key-file", help="keystore of an account with GUARDIAN_ROLE (with --watch)")
    p.add_argument("--password-file", help="file whose first line is the keystore password")
    p.add_argument("--state", default="audit-watch.json", help="the watcher's state file (default: %(default)s)")
    p.add_argument("--grace", type=float, default=600.0,
                   help="seconds after submission an export may stay unpublished before that is a failure")
    p.add_argument("--poll", type=float, default=5.0, help="seconds between watch passes")
    p.set_defaults(handler=_audit)


def _audit(args: argparse.Namespace) -> int:
    """Exit 0 pass, 1 a violation, 2 the audit could not run (the reason on stderr)."""
    from loraledger.node.errors import NodeError

    try:
        return _run(args)
    except (NodeError, OSError) as e:
        print(f"loraledger audit: cannot audit: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from web3 import Web3

    from loraledger.node.chain.bindings import GUARDIAN_ROLE, Contracts
    from loraledger.node.chain.client import ChainClient
    from loraledger.node.chain.devnet_setup import read_deployment
    from loraledger.node.config import load_config
    from loraledger.node.ledger.audit import AuditChain, AuditError, audit_epoch, load_lineage_files
    from loraledger.node.ledger.watch import Watcher, WatchOptions, make_fetch
    from loraledger.node.types import as_address

    cfg = load_config(args.config)
    dep_path = args.deployment or os.environ.get("LORALEDGER_DEPLOYMENT") or cfg.chain.deployment
    dep = read_deployment(dep_path)
    rpc = args.rpc_url or cfg.chain.rpc_url or str(dep.extra.get("rpcUrl", ""))
    if not rpc:
        raise ConfigError("no JSON-RPC endpoint: pass --rpc-url (or set [chain] rpc_url)")
    w3 = Web3(Web3.HTTPProvider(rpc, request_kwargs={"timeout": 30}))
    reader = Contracts.at(ChainClient(w3, Account.create()), dep.addresses)
    try:
        chain = AuditChain(reader)
    except OSError as e:
        raise ConfigError(f"cannot reach the chain at {rpc}: {e}") from e
    if chain.chain_id != dep.chain_id:
        raise ConfigError(f"{rpc} serves chain {chain.chain_id}, the deployment is on chain {dep.chain_id}")
    operators = [as_address(o) for o in args.operator]
    template = args.export_uri or str(dep.extra.get("exportUri", "")) or cfg.settlement.export_uri or None
    fetch = make_fetch(export=args.export, server=args.server, uri_template=template, chain_id=chain.chain_id,
                       ledger=chain.ledger, api_key=args.api_key)
    lineage = load_lineage_files(args.lineage)

    if args.watch:
        from loraledger.node.chain.keys import load_account

        guardian = None
        if args.guardian_key_file:
            acct = load_account(key_file=args.guardian_key_file, password_file=args.password_file)
            guardian = Contracts.at(ChainClient(w3, acct), dep.addresses)
            if not guardian.ledger.has_role(GUARDIAN_ROLE, acct.address):
                raise ConfigError(f"{acct.address} does not hold GUARDIAN_ROLE on ledger {chain.ledger}: it "
                                  "could not revoke")
        else:
            print("watch: no --guardian-key-file: failing epochs are reported, not revoked", file=sys.stderr)
        delay = reader.ledger.challenge_delay()
        if args.grace >= delay > 0:
            raise ConfigError(f"--grace {args.grace:g} s must be shorter than the challenge delay ({delay} s), or "
                              "an unpublished export could never be revoked in time")
        watcher = Watcher(chain, guardian, operators, fetch, args.state,
                          WatchOptions(grace=args.grace, poll=args.poll, lineage=lineage,
                                       token_level=args.token_level),
                          emit=lambda line: print(line, flush=True))
        stop = threading.Event()
        try:
            watcher.run(stop)
        except KeyboardInterrupt:
            stop.set()
        return 0

    reports: list[dict[str, Any]] = []
    failed = False
    for op in operators:
        last = chain.last_epoch(op)
        if last == 0:
            raise ConfigError(f"operator {op} has no epoch on ledger {chain.ledger}")
        epochs = range(1, last + 1) if args.all else [args.epoch or last]
        for n in epochs:
            if chain.epoch(op, n).revoked:
                reports.append({"operator": op, "epoch": n, "ok": None, "revoked": True, "violations": []})
                if not args.json:
                    print(f"operator {op} epoch {n}: revoked on chain (skipped)")
                continue
            try:
                data = fetch(op, n)
            except AuditError as e:
                raise ConfigError(str(e)) from e
            prev_n = chain.epoch(op, n).previous_live
            prev = fetch(op, prev_n) if data is not None and prev_n else None
            report = audit_epoch(chain, op, n, data, lineage=lineage, token_level=args.token_level,
                                 previous_data=prev)
            failed |= not report.ok
            reports.append(report.to_json())
            if not args.json:
                for line in report.lines():
                    print(line)
                for note in report.notes:
                    print(f"operator {op} epoch {n}: note: {note}")
                verdict = "PASS" if report.ok else f"FAIL ({len(report.violations)} violation(s))"
                print(f"operator {op} epoch {n}: {verdict} ({report.records} records, export "
                      f"{report.export_sha256}, {report.seconds:.2f} s)")
    if args.json:
        print(json.dumps({"chainId": chain.chain_id, "ledger": chain.ledger, "ok": not failed, "epochs": reports},
                         indent=1))
    return 1 if failed else 0
