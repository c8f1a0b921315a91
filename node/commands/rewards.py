"""`loraledger epoch ...` and `loraledger rewards ...`: settle epochs, export them, show, claim and push rewards.

    loraledger epoch settle                         close what is pending now and settle it (resumes first)
    loraledger epoch export N --out FILE            full trees + proofs of epoch N as JSON
    loraledger rewards show ADDRESS                 owed, claimed, and per-epoch history of one account
    loraledger rewards claim --key-file F [--operator ADDR] [--server ADDR | --epoch-file F] [--account ADDR]
    loraledger rewards push [--epoch-file F] [--threshold N]

The record log, the deployment and the operator key come from the node config (`--config`, env vars, defaults:
see loraledger.node.config); `--records`, `--deployment`, `--rpc-url` override them. A claim trusts no node: with
`--server` it fetches the proof from a running node (gRPC `GetRewardProof`), with `--epoch-file` it reads it
from an exported epoch file, else from the local record log; either way it is checked against the root on chain
before anything is sent.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import Web3

from loraledger.node.chain.bindings import Contracts
from loraledger.node.chain.client import ChainClient
from loraledger.node.chain.deploy import Deployment
from loraledger.node.chain.devnet_setup import read_deployment, web3_for
from loraledger.node.chain.keys import (
    PASSWORD_ENV,
    account_from_hex,
    load_account,
    load_keystore,
    read_password,
)
from loraledger.node.config import NodeConfig, load_config
from loraledger.node.errors import ConfigError
from loraledger.node.ledger.claims import claim, proof_from_epoch_file, proofs_from_epoch_file, push_claims
from loraledger.node.ledger.epochs import EpochProofs, RewardProofData, export_epoch
from loraledger.node.ledger.record_log import RecordLog
from loraledger.node.ledger.settler import SettlementOptions, Settler
from loraledger.node.types import Wei, as_address, as_bytes32


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", help="node config TOML (default: built-in defaults + env)")
        p.add_argument("--records", help="record log: SQLite path or postgresql:// DSN (default: from config)")
        p.add_argument("--deployment", help="deployment.json (default: from config)")
        p.add_argument("--rpc-url", help="JSON-RPC endpoint (default: the one in deployment.json)")

    epoch = subparsers.add_parser("epoch", help="settle and export reward epochs")
    esub = epoch.add_subparsers(dest="epoch_command", metavar="ACTION", required=True)
    settle = esub.add_parser("settle", help="close the pending records into an epoch and submit it on chain")
    common(settle)
    settle.add_argument("--key-file", help="operator keystore (default: config chain.key_file / chain.key_env)")
    settle.add_argument("--password-file", help="file whose first line is the keystore password")
    settle.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the transaction")
    settle.set_defaults(handler=_settle)
    exp = esub.add_parser("export", help="write epoch N's records and rewards with proofs as JSON")
    exp.add_argument("n", type=int, metavar="N", help="epoch number")
    exp.add_argument("--out", required=True, help="JSON file to write")
    common(exp)
    exp.set_defaults(handler=_export)

    rewards = subparsers.add_parser("rewards", help="show, claim and push contributor rewards")
    rsub = rewards.add_subparsers(dest="rewards_command", metavar="ACTION", required=True)
    show = rsub.add_parser("show", help="owed, claimed and per-epoch history of ADDRESS")
    show.add_argument("address", metavar="ADDRESS")
    show.add_argument("--operator", help="operator whose stream pays (default: the config's operator)")
    common(show)
    show.set_defaults(handler=_show)
    cl = rsub.add_parser("claim", help="claim what an account is owed (proof checked against the chain first)")
    cl.add_argument("--key-file", required=True, help="keystore of the account that sends the claim")
    cl.add_argument("--password-file", help="file whose first line is the keystore password")
    cl.add_argument("--operator", help="operator whose stream pays (default: the epoch file's operator)")
    cl.add_argument("--epoch-file", help="exported epoch file holding the proof (default: the local record log)")
    cl.add_argument("--server", help="fetch the proof from the node at HOST:PORT (gRPC GetRewardProof)")
    cl.add_argument("--timeout", type=float, default=30.0, help="gRPC deadline in seconds with --server")
    cl.add_argument("--api-key", default=os.environ.get("LORALEDGER_API_KEY", ""),
                    help="the node's API key with --server (default: $LORALEDGER_API_KEY)")
    cl.add_argument("--account", help="account to claim for (default: the key's own address)")
    common(cl)
    cl.set_defaults(handler=_claim)
    push = rsub.add_parser("push", help="pay every account owed more than --threshold with claimMany")
    push.add_argument("--epoch-file", help="exported epoch file (default: the latest confirmed epoch in the log)")
    push.add_argument("--threshold", type=int, default=None, help="skip accounts owed this much or less")
    push.add_argument("--key-file", help="keystore of the sender (default: the operator key)")
    push.add_argument("--password-file", help="file whose first line is the keystore password")
    common(push)
    push.set_defaults(handler=_push)


# ----- context


def _config(args: argparse.Namespace) -> NodeConfig:
    return load_config(getattr(args, "config", None))


def _open_log(args: argparse.Namespace, cfg: NodeConfig) -> RecordLog:
    target = args.records or cfg.records.postgres_dsn or cfg.records.path
    if target.startswith(("postgresql://", "postgres://")):
        return RecordLog.open(dsn=target)
    if not Path(target).exists():
        raise ConfigError(f"no record log at {target}; pass --records PATH (or set records.path in the config)")
    return RecordLog.open(target)


def _chain(args: argparse.Namespace, cfg: NodeConfig) -> tuple[Deployment, Web3]:
    dep = read_deployment(args.deployment or cfg.chain.deployment)
    rpc = args.rpc_url or cfg.chain.rpc_url or str(dep.extra.get("rpcUrl", ""))
    if not rpc:
        raise ConfigError("no RPC endpoint: pass --rpc-url or set chain.rpc_url (deployment.json has none)")
    return dep, web3_for(rpc)


def _key(args: argparse.Namespace, cfg: NodeConfig) -> LocalAccount:
    key_file = getattr(args, "key_file", None) or cfg.chain.key_file or None
    if key_file:
        env = {PASSWORD_ENV: os.environ[cfg.chain.password_env]} if cfg.chain.password_env in os.environ else {}
        return load_keystore(key_file, read_password(password_file=getattr(args, "password_file", None), environ=env))
    if os.environ.get(cfg.chain.key_env):
        return account_from_hex(os.environ[cfg.chain.key_env], f"${cfg.chain.key_env}")
    return load_account()


# ----- handlers


def _settle(args: argparse.Namespace) -> int:
    cfg = _config(args)
    dep, w3 = _chain(args, cfg)
    contracts = Contracts.at(ChainClient(w3, _key(args, cfg)), dep.addresses)
    opts = SettlementOptions(epoch_seconds=cfg.settlement.epoch_seconds, epoch_records=cfg.settlement.epoch_records,
                             receipt_timeout=args.timeout)
    with _open_log(args, cfg) as log_:
        settler = Settler(log_, contracts, opts)
        resumed = settler.resume()
        for o in resumed:
            print(f"epoch {o.epoch}: resumed and confirmed ({o.record_count} records, tx {o.tx_hash})")
        outcome = settler.settle()
        if outcome is None:
            print("no pending records: nothing to settle")
            return 0
        print(f"epoch {outcome.epoch}: {outcome.record_count} records, cumulative total {outcome.cumulative_total}, "
              f"records root {outcome.records_root}, rewards root {outcome.rewards_root}, tx {outcome.tx_hash} "
              f"(block {outcome.block_number})")
        threshold = cfg.settlement.push_threshold
        if threshold > 0:
            proof_list = _log_proofs(log_)
            res = push_claims(contracts.ledger, proof_list, threshold=threshold)
            print(f"pushed claims to {len(res.paid)} accounts in {len(res.tx_hashes)} transactions")
    return 0


def _export(args: argparse.Namespace) -> int:
    cfg = _config(args)
    ledger: str | None = None
    chain_id: int | None = None
    dep_path = Path(args.deployment or cfg.chain.deployment)
    if dep_path.is_file():
        dep = read_deployment(dep_path)
        ledger, chain_id = dep.address("AttributionLedger"), dep.chain_id
    with _open_log(args, cfg) as log_:
        out = export_epoch(log_, args.n, args.out, ledger=ledger, chain_id=chain_id)
        row = log_.epoch(args.n)
    assert row is not None
    print(f"wrote epoch {args.n} ({row.record_count} records, state {row.state}) to {out}")
    return 0


def _log_proofs(log_: RecordLog) -> list[RewardProofData]:
    last = log_.last_confirmed()
    if last is None:
        raise ConfigError("the record log has no confirmed epoch yet; run `loraledger epoch settle` first")
    proofs = EpochProofs(log_)
    trees = proofs.trees(last.epoch)
    out = []
    for account, _ in trees.rewards_tree.values:
        p = proofs.reward_proof(account, last.epoch)
        assert p is not None
        out.append(p)
    return out


def _show(args: argparse.Namespace) -> int:
    cfg = _config(args)
    account = as_address(args.address)
    with _open_log(args, cfg) as log_:
        history = log_.history(account)
        last = log_.last_confirmed()
        proof = EpochProofs(log_).reward_proof(account) if last is not None else None
        operator = args.operator or (proof.operator if proof else None)
    owed = int(proof.cumulative_amount) if proof else 0
    print(f"account {account}")
    print(f"  owed (cumulative, epoch {proof.epoch if proof else '-'}): {owed}")
    try:
        dep, w3 = _chain(args, cfg)
    except ConfigError as e:
        print(f"  claimed: unknown ({e})")
        dep = None
    if dep is not None and operator:
        contracts = Contracts.at(ChainClient(w3, _reader_account()), dep.addresses)
        claimed = int(contracts.ledger.claimed(operator, account))
        print(f"  claimed: {claimed}")
        print(f"  claimable now: {max(0, owed - claimed)}")
    print("  history (epoch: earned, cumulative):")
    for epoch_n, amount, cumulative in history:
        print(f"    {epoch_n}: {amount}, {cumulative}")
    if not history:
        print("    (nothing earned yet)")
    return 0


def _reader_account() -> LocalAccount:
    """A throw-away local account for read-only calls (no key needed to read the chain)."""
    acct: LocalAccount = Account.create()
    return acct


def _claim(args: argparse.Namespace) -> int:
    cfg = _config(args)
    dep, w3 = _chain(args, cfg)
    sender = _key(args, cfg)
    account = as_address(args.account or sender.address)
    if args.epoch_file and args.server:
        raise ConfigError("give --server or --epoch-file, not both")
    if args.server:
        proof = proof_from_node(args.server, account, args.timeout, args.api_key)
    elif args.epoch_file:
        proof = proof_from_epoch_file(args.epoch_file, account)
    else:
        with _open_log(args, cfg) as log_:
            found = EpochProofs(log_).reward_proof(account)
        if found is None:
            raise ConfigError(f"no reward for {account} in the local record log; pass --epoch-file FILE")
        proof = found
    if args.operator and as_address(args.operator) != proof.operator:
        raise ConfigError(f"--operator {args.operator} does not match the proof's operator {proof.operator}")
    contracts = Contracts.at(ChainClient(w3, sender), dep.addresses)
    res = claim(contracts.ledger, proof)
    print(res.message)
    return 0


def proof_from_node(server: str, account: str, timeout: float = 30.0, api_key: str = "") -> RewardProofData:
    """The latest cumulative amount and proof of `account` from the node at `server` (gRPC GetRewardProof).
    Not trusted: `claim` checks it against the operator's root on chain before sending anything."""
    import grpc

    from loraledger.proto.loraledger.v1 import loraledger_pb2 as pb
    from loraledger.proto.loraledger.v1 import loraledger_pb2_grpc as pb_grpc

    with grpc.insecure_channel(server) as channel:
        try:
            r = pb_grpc.AttributionStub(channel).GetRewardProof(
                pb.GetRewardProofRequest(account=account), timeout=timeout,
                metadata=[("authorization", f"Bearer {api_key}")] if api_key else None)
        except grpc.RpcError as e:
            raise ConfigError(f"node {server} gave no proof for {account}: {e.code().name}: {e.details()}") from e
    try:
        return RewardProofData(as_address(r.operator), as_address(r.account), int(r.epoch),
                               Wei(int(r.cumulative_amount)), as_bytes32(r.rewards_root),
                               [as_bytes32(p) for p in r.proof])
    except ValueError as e:
        raise ConfigError(f"node {server} answered a malformed proof for {account}: {e}") from e


def _push(args: argparse.Namespace) -> int:
    cfg = _config(args)
    dep, w3 = _chain(args, cfg)
    contracts = Contracts.at(ChainClient(w3, _key(args, cfg)), dep.addresses)
    if args.epoch_file:
        proof_list = proofs_from_epoch_file(args.epoch_file)
    else:
        with _open_log(args, cfg) as log_:
            proof_list = _log_proofs(log_)
    threshold = args.threshold if args.threshold is not None else cfg.settlement.push_threshold
    res = push_claims(contracts.ledger, proof_list, threshold=threshold)
    for a, amount in sorted(res.paid.items()):
        print(f"paid {amount} to {a}")
    print(f"{len(res.paid)} accounts paid in {len(res.tx_hashes)} transactions (batch size {res.batch_size}); "
          f"{len(res.skipped)} skipped (nothing new above the threshold)")
    return 0
