"""Confirmations and reorgs, on an anvil of its own with Sepolia's chain id (11155111, so `[chain] confirmations`
defaults to 2): an epoch whose submitEpoch receipt is reorged out before it is 2 blocks deep is not counted as
confirmed, and the settler re-submits it safely. However the reorg ends (the transaction dropped, re-included in
another block, its nonce taken by another transaction of the operator, or the approve or another transaction
before it dropped too, leaving a nonce gap that the settler fills), the epoch lands exactly once, the operator
pays its fees once, and each contributor is paid once."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import Web3

from loraledger.node.chain.bindings import Contracts
from loraledger.node.chain.client import ChainClient
from loraledger.node.chain.deploy import SAFE_CHALLENGE_DELAY, Deployment, deploy_all
from loraledger.node.chain.devnet import Anvil
from loraledger.node.chain.keys import dev_account
from loraledger.node.config import NodeConfig
from loraledger.node.ledger.claims import claim
from loraledger.node.ledger.epochs import CONFIRMED, SUBMITTED, EpochProofs, SettlementError
from loraledger.node.ledger.record_log import RecordLog
from loraledger.node.ledger.records import AttributionRecord
from loraledger.node.ledger.rewards import contributor_weights, record_fee
from loraledger.node.ledger.settler import SettlementOptions, Settler

SEPOLIA = 11155111
FEE = 11


@dataclass
class ReorgWorld:
    anvil: Anvil
    w3: Web3
    deployment: Deployment
    contributors: list[LocalAccount]
    lineage: dict[int, dict[str, int]]

    def bind(self, account: LocalAccount) -> Contracts:
        return Contracts.at(ChainClient(self.w3, account), self.deployment.addresses)

    def rpc(self, method: str, params: list[Any]) -> Any:
        resp = self.w3.provider.make_request(method, params)  # type: ignore[arg-type]
        assert "error" not in resp, (method, resp)
        return resp["result"]

    def mine(self, blocks: int = 1) -> None:
        for _ in range(blocks):
            self.rpc("evm_mine", [])

    def new_operator(self) -> LocalAccount:
        op: LocalAccount = Account.create()
        self.rpc("anvil_setBalance", [op.address, hex(10**21)])
        admin = self.bind(dev_account(0))
        admin.token.mint(op.address, 10**24)
        admin.ledger.grant_operator(op.address)
        return op

    def records(self, n: int, seed: int) -> list[AttributionRecord]:
        rng = random.Random(seed)
        (aid,) = self.lineage
        out = []
        for i in range(n):
            prompt, completion = rng.randint(1, 50), rng.randint(1, 80)
            out.append(AttributionRecord.create(
                request_id=(seed * 1000 + i).to_bytes(32, "big"), adapter_ids=[aid], weights_bps=[10_000],
                prompt_tokens=prompt, completion_tokens=completion,
                fee=record_fee([10_000], [FEE], prompt, completion), output_hash=rng.randbytes(32),
                contributors=contributor_weights([aid], [10_000], [FEE], self.lineage)))
        return out


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReorgWorld]:
    root = tmp_path_factory.mktemp("reorg-world")
    with Anvil(root / "anvil", chain_id=SEPOLIA) as anvil:
        w3 = Web3(Web3.HTTPProvider(anvil.rpc_url, request_kwargs={"timeout": 30}))
        dep = deploy_all(w3, dev_account(0))  # the public-chain default: a one-day challenge delay
        assert dep.challenge_delay == SAFE_CHALLENGE_DELAY
        contributors = [dev_account(i) for i in (3, 4)]
        for acct in contributors:
            Contracts.at(ChainClient(w3, acct), dep.addresses).contributors.register("ipfs://c")
        curator = Contracts.at(ChainClient(w3, dev_account(8)), dep.addresses)
        dn = curator.datanets.register_datanet("0x" + "7e" * 32, 2, "file://datanet.jsonl")
        owner = Contracts.at(ChainClient(w3, dev_account(1)), dep.addresses)
        aid = owner.adapters.register_adapter(random.Random(7).randbytes(32), b"\x01" * 32, b"\x02" * 32, [dn],
                                              FEE, "file://adapter")
        c0, c1 = (a.address for a in contributors)
        yield ReorgWorld(anvil, w3, dep, contributors, {int(aid): {c0: 200, c1: 100}})


def drive(world: ReorgWorld, settler: Settler, log_: RecordLog, n: int, max_rounds: int = 20) -> None:
    """Resume the settler until epoch `n` is confirmed, mining one block after each round (blocks come only when
    asked: anvil mines a block per transaction and otherwise stands still)."""
    for _ in range(max_rounds):
        try:
            settler.resume()
        except SettlementError as e:
            assert "not final" in str(e), e
        row = log_.epoch(n)
        assert row is not None
        if row.state == CONFIRMED:
            return
        world.mine()
    raise AssertionError(f"epoch {n} not confirmed after {max_rounds} rounds: {log_.epoch(n)}")


@pytest.mark.parametrize("how", ["dropped", "reincluded", "nonce_taken", "approve_dropped", "earlier_dropped"])
def test_an_epoch_reorged_out_below_the_confirmation_depth_lands_exactly_once(
        world: ReorgWorld, tmp_path: Path, how: str) -> None:
    w3 = world.w3
    depth = NodeConfig().chain.confirmations_for(int(w3.eth.chain_id))
    assert depth == 2  # the default off dev chains
    op = world.new_operator()
    c = world.bind(op)
    if how != "approve_dropped":  # otherwise the settler approves the ledger itself, just before submitEpoch
        c.token.approve(c.ledger.address, 10**30)
    tokens_before = int(c.token.balance_of(op.address))
    opts = SettlementOptions(confirmations=depth, receipt_timeout=0.5, poll_interval=0.05, replace_after=3600)
    with RecordLog.open(tmp_path / "log.sqlite") as log_:
        log_.append_many(world.records(5, seed=len(how)))
        settler = Settler(log_, c, opts)
        start = int(w3.eth.block_number)
        if how == "earlier_dropped":  # another transaction of the operator's just before the epoch's
            c.token.transfer(dev_account(9).address, 1)
        with pytest.raises(SettlementError, match="not final"):
            settler.settle()  # mined at once, but 0 blocks deep
        row = log_.epoch(1)
        assert row is not None and row.state == SUBMITTED and row.tx_hash is not None and row.raw_tx is not None
        first = w3.eth.get_transaction_receipt(row.tx_hash)
        assert c.ledger.last_epoch(op.address) == 1
        world.mine()  # one block on top: still below the depth, still not confirmed
        with pytest.raises(SettlementError, match="not final"):
            settler.resume()
        assert log_.epoch(1).state == SUBMITTED  # type: ignore[union-attr]

        # the reorg: every block since before the epoch's transactions is replaced
        reorg_depth = int(w3.eth.block_number) - start
        replacement: list[Any] = []
        if how == "reincluded":
            replacement = [[row.raw_tx, 1]]
        elif how == "nonce_taken":  # the new chain holds another transaction of the operator under that nonce
            other = op.sign_transaction({"to": op.address, "value": 1, "gas": 21_000, "nonce": row.tx_nonce,
                                         "maxFeePerGas": 10**11, "maxPriorityFeePerGas": 10**9, "chainId": SEPOLIA,
                                         "type": 2})
            replacement = [["0x" + bytes(other.raw_transaction).hex(), 0]]
        world.rpc("anvil_reorg", [reorg_depth, replacement])
        if how != "reincluded":
            assert c.ledger.last_epoch(op.address) == 0  # the epoch is gone from the canonical chain
            assert int(c.token.balance_of(op.address)) == tokens_before

        drive(world, settler, log_, 1)
        done = log_.epoch(1)
        assert done is not None and done.state == CONFIRMED
        receipt = w3.eth.get_transaction_receipt(done.tx_hash)  # type: ignore[arg-type]
        assert receipt["status"] == 1
        assert bytes(receipt["blockHash"]) != bytes(first["blockHash"])  # landed again, on the new chain
        assert int(w3.eth.block_number) - int(receipt["blockNumber"]) >= depth
        assert done.confirmed_block == int(receipt["blockNumber"])
        if how in ("dropped", "reincluded"):
            assert done.tx_hash == row.tx_hash  # the stored transaction itself, not a second one
        # exactly once: one epoch on chain with our roots, its fees pulled once
        assert c.ledger.last_epoch(op.address) == 1
        info = c.ledger.epoch(op.address, 1)
        assert (info.records_root, info.rewards_root) == (done.records_root, done.rewards_root)
        assert done.cumulative_total == int(done.fees_total)
        assert int(c.ledger.funded_total(op.address)) == int(done.fees_total)
        assert tokens_before - int(c.token.balance_of(op.address)) == int(done.fees_total)
        assert int(c.token.balance_of(c.ledger.address)) >= int(done.fees_total)

        # nothing paid twice: once the delay is over, each account claims its amount once; a second claim pays 0
        world.rpc("evm_increaseTime", [SAFE_CHALLENGE_DELAY + 1])
        world.mine()
        proofs = EpochProofs(log_)
        paid = 0
        for account, amount in proofs.trees(1).rewards_tree.values:
            p = proofs.reward_proof(account, 1)
            assert p is not None
            first_claim = claim(world.bind(dev_account(9)).ledger, p)
            assert int(first_claim.paid) == int(amount)
            again = claim(world.bind(dev_account(9)).ledger, p)
            assert int(again.paid) == 0 and again.tx_hash is None
            paid += int(first_claim.paid)
        assert paid == int(done.fees_total) == int(c.ledger.claimed_total(op.address))
