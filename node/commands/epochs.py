"""`loraledger epoch list | revoke | resettle`: what the log holds per epoch, the guardian's revocation, and the
operator's release of a revoked epoch's quarantined records into the next epoch.

    loraledger epoch list                                  # state, records, fees, roots of every epoch in the log
    loraledger epoch revoke --operator ADDR N              # guardian: revoke pending epoch N (and every later one)
    loraledger epoch resettle N                            # operator: put revoked epoch N's records back to pending
    loraledger epoch adopt N --export FILE                 # operator: take in epoch N another log of ours built

A revoked epoch's records are quarantined: the node does not pay them and does not count its balances; the next
epoch builds on the last live cumulative state. Resettling is the operator's decision after reviewing why the
epoch was revoked (a bad terms snapshot, a bug): the records then go into the next epoch, with its terms.
"""

from __future__ import annotations

import argparse

from loraledger.node.chain.bindings import Contracts
from loraledger.node.chain.client import ChainClient
from loraledger.node.commands.context import (
    chain_of,
    chain_options,
    load_cfg,
    open_log,
    reader,
    signing_key,
)
from loraledger.node.errors import ConfigError
from loraledger.node.ledger.epochs import REVOKED
from loraledger.node.types import as_address


def _epoch_actions(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]
                   ) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    """The ACTION sub-parsers of `loraledger epoch` (registered by the rewards module)."""
    existing = subparsers.choices.get("epoch")
    if existing is None:
        raise ConfigError("the `epoch` command group is missing; the rewards commands must be registered first")
    for action in existing._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    raise ConfigError("`loraledger epoch` has no actions")


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    actions = _epoch_actions(subparsers)
    ls = actions.add_parser("list", help="every epoch in the record log: state, records, fees, roots")
    chain_options(ls)
    ls.set_defaults(handler=_list)
    rv = actions.add_parser("revoke", help="guardian: revoke an operator's pending epoch N and every later one")
    rv.add_argument("n", type=int, metavar="N", help="the first epoch to revoke")
    rv.add_argument("--operator", required=True, help="the operator whose epochs are revoked")
    rv.add_argument("--key-file", help="guardian keystore (default: config chain.key_file / chain.key_env)")
    rv.add_argument("--password-file", help="file whose first line is the keystore password")
    chain_options(rv)
    rv.set_defaults(handler=_revoke)
    rs = actions.add_parser("resettle", help="put a revoked epoch's quarantined records back to pending")
    rs.add_argument("n", type=int, metavar="N", help="a revoked epoch of this node's log")
    chain_options(rs)
    rs.set_defaults(handler=_resettle)
    ad = actions.add_parser("adopt", help="take in epoch N that another log of this operator built, from its "
                                          "published export (checked against the chain's export sha256)")
    ad.add_argument("n", type=int, metavar="N", help="the chain's epoch to adopt")
    ad.add_argument("--export", required=True, help="the epoch's canonical export file")
    ad.add_argument("--operator", help="the operator (default: the address of the configured key)")
    ad.add_argument("--key-file", help="operator keystore, for its address (default: config chain.key_file)")
    ad.add_argument("--password-file", help="file whose first line is the keystore password")
    chain_options(ad)
    ad.set_defaults(handler=_adopt)


def _list(args: argparse.Namespace) -> int:
    cfg = load_cfg(args)
    with open_log(args, cfg) as log_:
        rows = log_.epochs()
    if not rows:
        print("the record log has no epoch yet")
        return 0
    print(f"{'epoch':>5}  {'state':<9}  {'records':>7}  {'fees':>14}  rewards root")
    for r in rows:
        print(f"{r.epoch:>5}  {r.state:<9}  {r.record_count:>7}  {int(r.fees_total):>14}  {r.rewards_root or '-'}"
              + (f"  ({r.last_error})" if r.last_error else ""))
    return 0


def _revoke(args: argparse.Namespace) -> int:
    cfg = load_cfg(args)
    dep, w3 = chain_of(args, cfg)
    ledger = Contracts.at(ChainClient(w3, signing_key(args, cfg)), dep.addresses).ledger
    operator = as_address(args.operator)
    last = ledger.last_epoch(operator)
    res = ledger.revoke_root(operator, args.n)
    print(f"revoked epochs {args.n}..{last} of operator {operator} (tx {res['tx_hash']}); the operator's next "
          f"epoch builds on epoch {ledger.live_tip(operator)}")
    return 0


def _resettle(args: argparse.Namespace) -> int:
    cfg = load_cfg(args)
    with open_log(args, cfg) as log_:
        row = log_.epoch(args.n)
        if row is None:
            raise ConfigError(f"epoch {args.n} is not in the record log")
        if row.state != REVOKED:
            raise ConfigError(f"epoch {args.n} is {row.state}, not revoked: only a revoked epoch's records can be "
                              "resettled (see `loraledger epoch list`)")
        released = log_.resettle(args.n)
    print(f"epoch {args.n}: {released} record(s) back to pending; the next epoch includes them")
    return 0


def _adopt(args: argparse.Namespace) -> int:
    from pathlib import Path

    from loraledger.node.ledger.export import parse_export, sha256_hex
    from loraledger.node.ledger.records import RecordDomain

    cfg = load_cfg(args)
    dep, w3 = chain_of(args, cfg)
    ledger = reader(w3, dep).ledger
    operator = as_address(args.operator if args.operator else signing_key(args, cfg).address)
    n = int(args.n)
    if not 0 < n <= ledger.last_epoch(operator):
        raise ConfigError(f"operator {operator} has no epoch {n} on chain")
    info = ledger.epoch(operator, n)
    data = Path(args.export).read_bytes()
    if sha256_hex(data) != info.export_hash:
        raise ConfigError(f"{args.export} has sha256 {sha256_hex(data)}, but epoch {n} on chain commits to "
                          f"{info.export_hash}: not this epoch's export")
    ex = parse_export(data, domain=RecordDomain(dep.chain_id, ledger.address, operator), epoch=n)
    with open_log(args, cfg) as log_:
        live = [r.epoch for r in log_.epochs() if r.state not in (REVOKED, "resettled") and r.epoch < n]
        if ex.previous_epoch != (live[-1] if live else 0):
            raise ConfigError(f"epoch {n} builds on epoch {ex.previous_epoch}, but this log's last live epoch "
                              f"below it is {live[-1] if live else 0}: adopt the epochs in order")
        if {a: int(v) for a, v in log_.cumulative_balances(n - 1).items()} != {a: v for a, v in ex.previous.items()
                                                                                if v}:
            raise ConfigError(f"epoch {n} starts from cumulative amounts that differ from this log's: it was not "
                              "built on this log's history")
        mine = log_.epoch(n)
        if mine is not None:
            if mine.state not in ("open", "built"):
                raise ConfigError(f"this log's epoch {n} is {mine.state}: it cannot make way for an adopted one")
            log_.renumber(n, n + 1)  # never sent: it goes after the adopted epoch and is rebuilt on it
        log_.adopt_epoch(n, ex.records, records_root=ex.records_root, rewards_root=ex.rewards_root,
                         cumulative_total=ex.cumulative_total, terms=ex.terms, amounts=ex.amounts,
                         cumulative=ex.cumulative, block_number=int(w3.eth.block_number))
    print(f"adopted epoch {n} ({ex.record_count} records, cumulative total {ex.cumulative_total}) from "
          f"{args.export}" + (f"; this log's own epoch {n} is now {n + 1}" if mine is not None else ""))
    return 0
