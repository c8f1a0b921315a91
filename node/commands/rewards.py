"""`loraledger epoch ...` and `loraledger rewards ...`: settle epochs, export them, show, claim and push rewards.

    loraledger epoch settle                         close what is pending now and settle it (resumes first)
    loraledger epoch export N --out FILE            full trees + proofs of epoch N as JSON
    loraledger rewards show ADDRESS [--server NODE | --epoch-file F...] [--epoch N]
                                                    claimable now, pending (and when), claimed; history from the log
    loraledger rewards claim --key-file F [--server NODE | --epoch-file F...] [--epoch N] [--account ADDR]
    loraledger rewards push [--epoch-file F] [--threshold N]

The record log, the deployment and the operator key come from the node config (`--config`, env vars, defaults:
see loraledger.node.config); `--records`, `--deployment`, `--rpc-url` override them. The deployment is found at
`--deployment`, `$LORALEDGER_DEPLOYMENT`, the config's `[chain] deployment`, then `./deployment.json`; the RPC
endpoint at `--rpc-url`, `$LORALEDGER_CHAIN_RPC_URL` / `[chain] rpc_url`, then the devnet's record.

Claims and `show` trust no node and need no operator database: proofs come from a running node (`--server`,
gRPC `GetRewardProof`), from published epoch files (`--epoch-file`, repeatable, or a folder of them), or from
the local record log; the numbers are checked against the chain. By default they are for the operator's epoch in
effect (`rootInEffect`), the one a claim can be paid against now; what newer epochs add is shown as pending,
with the time it takes effect.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from loraledger.node.chain.bindings import Contracts, LedgerClient
from loraledger.node.chain.client import ChainClient
from loraledger.node.chain.devnet_setup import read_deployment
from loraledger.node.commands.context import (
    chain_of,
    chain_options,
    load_cfg,
    open_log,
    reader,
    signing_key,
)
from loraledger.node.config import NodeConfig
from loraledger.node.errors import ConfigError
from loraledger.node.ledger.claims import (
    EpochFileSource,
    LogProofSource,
    ProofSource,
    claim,
    proofs_from_epoch_file,
    push_claims,
    reward_status,
)
from loraledger.node.ledger.epochs import EpochProofs, RewardProofData, export_epoch
from loraledger.node.ledger.record_log import RecordLog
from loraledger.node.ledger.settler import SettlementOptions, Settler
from loraledger.node.types import Wei, as_address, as_bytes32


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    def sources(p: argparse.ArgumentParser) -> None:
        p.add_argument("--server", help="read proofs from the node at HOST:PORT (gRPC GetRewardProof)")
        p.add_argument("--epoch-file", action="append", default=[], metavar="PATH",
                       help="published epoch file(s) of `loraledger epoch export`, or a folder of them (repeatable)")
        p.add_argument("--epoch", type=int, default=None,
                       help="the epoch to prove under (default: the operator's epoch in effect on chain)")
        p.add_argument("--timeout", type=float, default=30.0, help="gRPC deadline in seconds with --server")
        p.add_argument("--api-key", default=os.environ.get("LORALEDGER_API_KEY", ""),
                       help="the node's API key with --server (default: $LORALEDGER_API_KEY)")

    epoch = subparsers.add_parser("epoch", help="settle and export reward epochs")
    esub = epoch.add_subparsers(dest="epoch_command", metavar="ACTION", required=True)
    settle = esub.add_parser("settle", help="close the pending records into an epoch and submit it on chain")
    chain_options(settle)
    settle.add_argument("--key-file", help="operator keystore (default: config chain.key_file / chain.key_env)")
    settle.add_argument("--password-file", help="file whose first line is the keystore password")
    settle.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the transaction")
    settle.set_defaults(handler=_settle)
    exp = esub.add_parser("export", help="write epoch N's records and rewards with proofs as JSON")
    exp.add_argument("n", type=int, metavar="N", help="epoch number")
    exp.add_argument("--out", required=True, help="JSON file to write")
    exp.add_argument("--canonical", action="store_true",
                     help="write the canonical export instead (the bytes whose sha256 is on chain; what gRPC "
                          "GetEpochExport serves and `loraledger audit` checks)")
    chain_options(exp)
    exp.set_defaults(handler=_export)

    rewards = subparsers.add_parser("rewards", help="show, claim and push contributor rewards")
    rsub = rewards.add_subparsers(dest="rewards_command", metavar="ACTION", required=True)
    show = rsub.add_parser("show", help="claimable now, pending (until when), claimed; history from the log")
    show.add_argument("address", metavar="ADDRESS")
    show.add_argument("--operator", help="operator whose stream pays (default: the one the proofs name)")
    chain_options(show)
    sources(show)
    show.set_defaults(handler=_show)
    cl = rsub.add_parser("claim", help="claim what an account is owed (proof checked against the chain first)")
    cl.add_argument("--key-file", required=True, help="keystore of the account that sends the claim")
    cl.add_argument("--password-file", help="file whose first line is the keystore password")
    cl.add_argument("--operator", help="operator whose stream pays (default: the one the proofs name)")
    cl.add_argument("--account", help="account to claim for (default: the key's own address)")
    chain_options(cl)
    sources(cl)
    cl.set_defaults(handler=_claim)
    push = rsub.add_parser("push", help="pay every account owed more than --threshold with claimMany")
    push.add_argument("--epoch-file", help="exported epoch file (default: the epoch in effect, from the log)")
    push.add_argument("--threshold", type=int, default=None, help="skip accounts owed this much or less")
    push.add_argument("--key-file", help="keystore of the sender (default: the operator key)")
    push.add_argument("--password-file", help="file whose first line is the keystore password")
    chain_options(push)
    push.set_defaults(handler=_push)


# ----- handlers


@contextlib.contextmanager
def _settler_role(log_: RecordLog, args: argparse.Namespace, cfg: NodeConfig) -> Iterator[None]:
    """On a fleet's shared PostgreSQL log, hold the settler role for the command's duration (fencing its epoch
    transitions like a node's); refuse while a node holds it."""
    if log_.backend != "postgres":
        yield
        return
    import socket

    from loraledger.node.serving.settler_role import SettlerRole

    role = SettlerRole(args.records or cfg.records.postgres_dsn, f"cli@{socket.gethostname()}")
    try:
        if not role.acquire():
            raise ConfigError(f"node {role.holder() or '(unknown)'} holds the settler role of this record log; it "
                              "settles on its own (`loraledger node settler` shows which). Stop it first to settle "
                              "by hand")
        log_.fence = role.fence
        yield
    finally:
        log_.fence = None
        role.release()


def _settle(args: argparse.Namespace) -> int:
    cfg = load_cfg(args)
    dep, w3 = chain_of(args, cfg)
    contracts = Contracts.at(ChainClient(w3, signing_key(args, cfg)), dep.addresses)
    opts = SettlementOptions(epoch_seconds=cfg.settlement.epoch_seconds, epoch_records=cfg.settlement.epoch_records,
                             receipt_timeout=args.timeout, confirmations=cfg.chain.confirmations_for(dep.chain_id))
    with open_log(args, cfg) as log_, _settler_role(log_, args, cfg):
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
            proof_list = _log_proofs(log_, contracts.ledger)
            if not proof_list:
                print("no epoch in effect yet: nothing to push")
                return 0
            res = push_claims(contracts.ledger, proof_list, threshold=threshold)
            print(f"pushed claims to {len(res.paid)} accounts in {len(res.tx_hashes)} transactions")
    return 0


def _export(args: argparse.Namespace) -> int:
    cfg = load_cfg(args)
    ledger: str | None = None
    chain_id: int | None = None
    dep_path = Path(args.deployment or cfg.chain.deployment)
    if dep_path.is_file():
        dep = read_deployment(dep_path)
        ledger, chain_id = dep.address("AttributionLedger"), dep.chain_id
    if args.canonical:
        from loraledger.node.ledger.export import canonical_export, sha256_hex

        with open_log(args, cfg) as log_:
            data = canonical_export(log_, args.n)
        Path(args.out).write_bytes(data)
        print(f"wrote the canonical export of epoch {args.n} ({len(data)} bytes, sha256 {sha256_hex(data)}) to "
              f"{args.out}")
        return 0
    with open_log(args, cfg) as log_:
        out = export_epoch(log_, args.n, args.out, ledger=ledger, chain_id=chain_id)
        row = log_.epoch(args.n)
    assert row is not None
    print(f"wrote epoch {args.n} ({row.record_count} records, state {row.state}) to {out}")
    return 0


def _log_proofs(log_: RecordLog, ledger: LedgerClient) -> list[RewardProofData]:
    """Every account's proof under the operator's epoch in effect on chain (empty when none is in effect)."""
    last = log_.last_confirmed()
    if last is None:
        raise ConfigError("the record log has no confirmed epoch yet; run `loraledger epoch settle` first")
    proofs = EpochProofs(log_)
    operator = proofs.trees(last.epoch).operator
    n = ledger.root_in_effect(operator).epoch
    if n == 0:
        return []
    out = []
    for account, _ in proofs.trees(n).rewards_tree.values:
        p = proofs.reward_proof(account, n)
        assert p is not None
        out.append(p)
    return out


class NodeProofSource:
    """Proofs of one account from a running node (gRPC GetRewardProof); not trusted, the chain checks them."""

    def __init__(self, server: str, account: str, timeout: float = 30.0, api_key: str = "") -> None:
        self.server, self.account, self.timeout, self.api_key = server, as_address(account), timeout, api_key
        self._answers: dict[int, Any] = {}

    def _ask(self, epoch: int) -> Any:
        if epoch not in self._answers:
            self._answers[epoch] = _get_reward_proof(self.server, self.account, epoch, self.timeout, self.api_key)
        return self._answers[epoch]

    def latest_epoch(self) -> int | None:
        r = self._ask(0)
        return None if r is None else int(r.latest_epoch or r.epoch) or None

    def reward_proof(self, account: str, epoch: int | None = None) -> RewardProofData | None:
        if as_address(account) != self.account:
            raise ConfigError(f"this node source answers for {self.account}, not {account}")
        n = self.latest_epoch() if epoch is None else epoch
        if n is None:
            return None
        r = self._ask(n)
        if r is None or not r.rewards_root:
            return None
        try:
            return RewardProofData(as_address(r.operator), as_address(r.account), int(r.epoch),
                                   Wei(int(r.cumulative_amount)), as_bytes32(r.rewards_root),
                                   [as_bytes32(p) for p in r.proof])
        except ValueError as e:
            raise ConfigError(f"node {self.server} answered a malformed proof for {account}: {e}") from e


def _get_reward_proof(server: str, account: str, epoch: int, timeout: float, api_key: str) -> Any:
    """GetRewardProof(account, epoch) from `server`; None when the node has nothing for the account."""
    import grpc

    from loraledger.proto.loraledger.v1 import loraledger_pb2 as pb
    from loraledger.proto.loraledger.v1 import loraledger_pb2_grpc as pb_grpc

    with grpc.insecure_channel(server) as channel:
        try:
            return pb_grpc.AttributionStub(channel).GetRewardProof(
                pb.GetRewardProofRequest(account=account, epoch=epoch), timeout=timeout,
                metadata=[("authorization", f"Bearer {api_key}")] if api_key else None)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise ConfigError(f"node {server} gave no proof for {account}: {e.code().name}: {e.details()}") from e


def proof_from_node(server: str, account: str, timeout: float = 30.0, api_key: str = "",
                    epoch: int = 0) -> RewardProofData:
    """`account`'s proof from the node at `server` under `epoch` (0: the epoch in effect on chain). Not trusted:
    `claim` checks it against the operator's root on chain before sending anything."""
    src = NodeProofSource(server, account, timeout, api_key)
    r = src._ask(epoch)
    p = src.reward_proof(account, int(r.epoch)) if r is not None else None
    if p is None:
        raise ConfigError(f"node {server} has no reward proof for {account}"
                          + (f" under epoch {epoch}" if epoch else " under the epoch in effect"))
    return p


def _source(args: argparse.Namespace, cfg: NodeConfig, account: str, stack: ExitStack
            ) -> tuple[ProofSource, RecordLog | None]:
    """Where proofs come from: --server, --epoch-file, else the local record log (also returned, for history)."""
    if args.server and args.epoch_file:
        raise ConfigError("give --server or --epoch-file, not both")
    if args.server:
        return NodeProofSource(args.server, account, args.timeout, args.api_key), None
    if args.epoch_file:
        return EpochFileSource(args.epoch_file), None
    try:
        log_ = stack.enter_context(open_log(args, cfg))
    except ConfigError as e:
        raise ConfigError(f"{e}. Without the operator's record log, read proofs from its node (--server HOST:PORT) "
                          "or from its published epoch files (--epoch-file FILE or FOLDER)") from e
    return LogProofSource(log_), log_


def _show(args: argparse.Namespace) -> int:
    cfg = load_cfg(args)
    account = as_address(args.address)
    dep, w3 = chain_of(args, cfg)
    with ExitStack() as stack:
        source, log_ = _source(args, cfg, account, stack)
        operator = args.operator or (dep.operator if source.latest_epoch() is None else None)
        st = reward_status(reader(w3, dep).ledger, source, account, operator=operator, epoch=args.epoch)
        for line in st.lines():
            print(line)
        if log_ is not None:
            history = log_.history(account)
            print("  history (epoch: earned, cumulative):")
            for epoch_n, amount, cumulative in history:
                print(f"    {epoch_n}: {amount}, {cumulative}")
            if not history:
                print("    (nothing earned yet)")
    return 0


def _claim(args: argparse.Namespace) -> int:
    cfg = load_cfg(args)
    dep, w3 = chain_of(args, cfg)
    sender = signing_key(args, cfg)
    account = as_address(args.account or sender.address)
    contracts = Contracts.at(ChainClient(w3, sender), dep.addresses)
    with ExitStack() as stack:
        source, _ = _source(args, cfg, account, stack)
        st = reward_status(contracts.ledger, source, account, operator=args.operator, epoch=args.epoch)
    for line in st.lines():
        print(line)
    if st.proof is None:
        print(f"nothing to claim under epoch {st.epoch or '-'}; no transaction sent")
        return 0
    res = claim(contracts.ledger, st.proof)
    print(res.message)
    return 0


def _push(args: argparse.Namespace) -> int:
    cfg = load_cfg(args)
    dep, w3 = chain_of(args, cfg)
    contracts = Contracts.at(ChainClient(w3, signing_key(args, cfg)), dep.addresses)
    if args.epoch_file:
        proof_list = proofs_from_epoch_file(args.epoch_file)
    else:
        with open_log(args, cfg) as log_:
            proof_list = _log_proofs(log_, contracts.ledger)
        if not proof_list:
            print("no epoch of this operator is in effect yet: nothing to push")
            return 0
    threshold = args.threshold if args.threshold is not None else cfg.settlement.push_threshold
    res = push_claims(contracts.ledger, proof_list, threshold=threshold)
    for a, amount in sorted(res.paid.items()):
        print(f"paid {amount} to {a}")
    print(f"{len(res.paid)} accounts paid in {len(res.tx_hashes)} transactions (batch size {res.batch_size}); "
          f"{len(res.skipped)} skipped (nothing new above the threshold)")
    return 0
