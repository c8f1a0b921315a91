"""A push that cannot pay one account pays the others and says whom it could not pay (a blocklisting token)."""

from __future__ import annotations

from web3 import Web3

from loraledger.node.chain.bindings import Contracts
from loraledger.node.chain.client import ChainClient
from loraledger.node.chain.deploy import deploy_all
from loraledger.node.chain.keys import dev_account
from loraledger.node.ledger.claims import push_claims
from loraledger.node.ledger.epochs import RewardProofData
from loraledger.node.ledger.rewards import rewards_tree
from loraledger.node.types import Address, Bytes32, Wei
from tests.contracts.helpers import deploy, send


def test_push_pays_past_a_blocklisted_account_and_names_it(w3: Web3) -> None:
    admin = dev_account(0)
    token = deploy(w3, "BlocklistToken", [], admin.address)
    dep = deploy_all(w3, admin, token=token.address)
    op = Contracts.at(ChainClient(w3, admin), dep.addresses)  # the deployer holds OPERATOR_ROLE
    blocked, fine = Address(dev_account(3).address), Address(dev_account(4).address)
    amounts = {blocked: 300, fine: 500, Address(admin.address): 0}
    tree = rewards_tree(amounts, Address(admin.address))
    total = sum(amounts.values())
    send(w3, token.functions.mint(admin.address, total), admin.address)
    op.token.approve(op.ledger.address, total)
    op.ledger.submit_epoch(1, "0x" + "11" * 32, 1, tree.root_hex, "0x" + "22" * 32, total)
    send(w3, token.functions.setBlocked(blocked, True), admin.address)
    proofs = [RewardProofData(Address(admin.address), Address(a), 1, Wei(int(v)), Bytes32(tree.root_hex),
                              [Bytes32(p) for p in tree.get_proof_hex(i)])
              for i, (a, v) in enumerate(tree.values) if int(v) > 0]

    res = push_claims(op.ledger, proofs)
    assert res.paid == {fine: 500}
    assert res.failed == {blocked: "the token refused the transfer"}
    assert int(op.ledger.claimed(admin.address, blocked)) == 0  # its claim stays open
    send(w3, token.functions.setBlocked(blocked, False), admin.address)
    assert push_claims(op.ledger, proofs).paid == {blocked: 300}
