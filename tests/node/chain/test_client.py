"""loraledger.node.chain.client + loraledger.node.chain.bindings against a real anvil with the real contracts deployed.

Covers: many transactions in flight through the nonce manager (threads), nonce resync after another sender
used the key, custom-error decoding (from gas estimation, from a mined failed transaction, and from a nested
call into the token), receipt timeout, EIP-1559 fields, connection errors, and the typed wrappers.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from eth_abi import encode as abi_encode
from eth_utils import keccak
from web3 import Web3

from loraledger.node.chain.bindings import OPERATOR_ROLE, Contracts
from loraledger.node.chain.client import ChainClient, FeePolicy
from loraledger.node.chain.deploy import Deployment, deploy_all
from loraledger.node.chain.devnet import free_port
from loraledger.node.chain.keys import dev_account
from loraledger.node.errors import ChainError, ContractRevertError
from loraledger.node.types import Bytes32, Wei

ROOT_A = Bytes32("0x" + "aa" * 32)
ROOT_B = Bytes32("0x" + "bb" * 32)
ROOT_C = Bytes32("0x" + "cc" * 32)  # an export sha256


@pytest.fixture(scope="module")
def deployment(w3: Web3) -> Deployment:
    return deploy_all(w3, dev_account(0))


@pytest.fixture
def admin(w3: Web3, deployment: Deployment, chain_snapshot: str) -> Iterator[Contracts]:
    """The deployer's (account 0) view of the contracts, inside a snapshot."""
    yield Contracts.at(ChainClient(w3, dev_account(0)), deployment.addresses)


def _bind(w3: Web3, deployment: Deployment, index: int) -> Contracts:
    return Contracts.at(ChainClient(w3, dev_account(index)), deployment.addresses)


def test_many_transactions_in_flight_from_threads(w3: Web3, admin: Contracts) -> None:
    client = admin.token.client
    start = w3.eth.get_transaction_count(client.address)
    mint_fn = admin.token.contract.functions.mint
    to = dev_account(7).address
    hashes: list[str] = []
    lock = threading.Lock()

    def worker(k: int) -> None:
        for i in range(6):
            h = client.send(mint_fn(to, 1 + k * 100 + i))
            with lock:
                hashes.append(h)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    receipts = [client.wait(h, timeout=30) for h in hashes]
    assert all(r["status"] == 1 for r in receipts)
    nonces = sorted(w3.eth.get_transaction(h)["nonce"] for h in hashes)
    assert nonces == list(range(start, start + 24)), "nonces must be consecutive with no gaps or repeats"
    assert admin.token.balance_of(to) == sum(1 + k * 100 + i for k in range(4) for i in range(6))


def test_nonce_resync_after_another_sender_used_the_key(w3: Web3, admin: Contracts) -> None:
    client = admin.token.client
    client.transact({"to": dev_account(8).address, "value": 1})  # local counter is now initialised
    other = ChainClient(w3, dev_account(0))
    other.transact({"to": dev_account(8).address, "value": 1})  # takes the nonce `client` expects to use
    stale = client.nonces.next_nonce
    receipt = client.transact({"to": dev_account(8).address, "value": 2})
    assert receipt["status"] == 1
    assert w3.eth.get_transaction(receipt["transactionHash"])["nonce"] == stale + 1  # type: ignore[operator]


def test_revert_in_estimate_is_decoded_and_uses_no_nonce(w3: Web3, deployment: Deployment,
                                                         chain_snapshot: str) -> None:
    alice = _bind(w3, deployment, 2)
    alice.contributors.register("ipfs://alice")
    before = alice.contributors.client.nonces.next_nonce
    with pytest.raises(ContractRevertError) as ei:
        alice.contributors.register("ipfs://again")
    assert ei.value.error_name == "ContributorAlreadyRegistered"
    assert ei.value.error_args == (dev_account(2).address,)
    assert "ContributorAlreadyRegistered(account=" in str(ei.value)
    assert alice.contributors.client.nonces.next_nonce == before
    assert alice.contributors.contributor_count() == 1


def test_mined_revert_is_decoded_by_replay(w3: Web3, admin: Contracts) -> None:
    client = admin.datanets.client
    fn = admin.datanets.contract.functions.registerDatanet(bytes(32), 3, "zero root")
    h = client.send(fn, gas=200_000)  # explicit gas: no estimate, so the failure happens on chain
    with pytest.raises(ContractRevertError) as ei:
        client.wait(h, timeout=30)
    assert ei.value.error_name == "DatanetZeroRoot"
    assert w3.eth.get_transaction_receipt(h)["status"] == 0
    assert admin.datanets.datanet_count() == 0


def test_nested_token_error_decodes_through_the_ledger(admin: Contracts) -> None:
    # The deployer holds OPERATOR_ROLE but approved nothing: the token's own custom error surfaces.
    with pytest.raises(ContractRevertError) as ei:
        admin.ledger.submit_epoch(1, ROOT_A, 1, ROOT_B, ROOT_C, 100)
    assert ei.value.error_name == "ERC20InsufficientAllowance"
    assert ei.value.error_args == (admin.ledger.address, 0, 100)
    with pytest.raises(ContractRevertError) as ei2:
        admin.ledger.submit_epoch(2, ROOT_A, 1, ROOT_B, ROOT_C, 100)
    assert ei2.value.error_name == "LedgerUnexpectedEpoch"
    assert ei2.value.error_args == (admin.ledger.client.address, 1, 2)


def test_receipt_timeout_raises_chain_error(w3: Web3, admin: Contracts) -> None:
    client = admin.token.client
    w3.provider.make_request("evm_setAutomine", [False])  # type: ignore[arg-type]
    try:
        h = client.send({"to": dev_account(9).address, "value": 5})
        with pytest.raises(ChainError, match="no receipt .* within 0.3s"):
            client.wait(h, timeout=0.3)
        w3.provider.make_request("evm_mine", [])  # type: ignore[arg-type]
        assert client.wait(h, timeout=10)["status"] == 1
    finally:
        w3.provider.make_request("evm_setAutomine", [True])  # type: ignore[arg-type]


def test_eip1559_fields_default_and_overrides(w3: Web3, admin: Contracts) -> None:
    client = admin.token.client
    base = int(w3.eth.get_block("latest")["baseFeePerGas"])
    tip = int(w3.eth.max_priority_fee)
    tx = w3.eth.get_transaction(client.transact({"to": dev_account(9).address, "value": 1})["transactionHash"])
    assert tx["type"] == 2
    assert tx["maxPriorityFeePerGas"] == tip
    assert tx["maxFeePerGas"] == 2 * base + tip

    custom = ChainClient(w3, dev_account(0), fees=FeePolicy(priority_fee=Wei(7), max_fee=Wei(9 * 10**9)))
    tx2 = w3.eth.get_transaction(custom.transact({"to": dev_account(9).address, "value": 1})["transactionHash"])
    assert (tx2["maxPriorityFeePerGas"], tx2["maxFeePerGas"]) == (7, 9 * 10**9)
    with pytest.raises(ChainError, match="below the priority fee"):
        ChainClient(w3, dev_account(0), fees=FeePolicy(priority_fee=Wei(10), max_fee=Wei(5))).fee_fields()


def test_unreachable_rpc_is_a_clear_chain_error() -> None:
    dead = Web3(Web3.HTTPProvider(f"http://127.0.0.1:{free_port()}", request_kwargs={"timeout": 2}))
    client = ChainClient(dead, dev_account(0), read_retries=2)
    with pytest.raises(ChainError, match="cannot reach the RPC"):
        client.send({"to": dev_account(1).address, "value": 1})


def test_typed_wrappers_round_trip(w3: Web3, deployment: Deployment, admin: Contracts) -> None:
    # registries
    for i in (2, 3):
        _bind(w3, deployment, i).contributors.register(f"profile-{i}")
    assert admin.contributors.is_active(dev_account(2).address)
    assert admin.contributors.get_contributor(dev_account(3).address).profile_uri == "profile-3"
    dn1 = admin.datanets.register_datanet(ROOT_A, 3, "file://dn1")
    dn2 = admin.datanets.register_datanet(ROOT_B, 1, "file://dn2")
    assert (dn1, dn2) == (1, 2)
    assert admin.datanets.get_datanet(dn2).contributions_root == ROOT_B
    wh = Bytes32("0x" + "01" * 32)
    ad = admin.adapters.register_adapter(wh, ROOT_A, ROOT_B, [dn1, dn2], 5, "file://adapter")
    info = admin.adapters.get_adapter(ad)
    assert (ad, info.datanet_ids, info.fee_per_token, info.weights_hash) == (1, (1, 2), 5, wh)
    assert admin.adapters.adapter_id_by_weights_hash(wh) == ad
    with pytest.raises(ContractRevertError) as ei:
        admin.adapters.register_adapter(wh, ROOT_A, ROOT_B, [dn1], 5, "dup")
    assert (ei.value.error_name, ei.value.error_args[1]) == ("AdapterDuplicateWeightsHash", 1)

    # ledger: operator = account 1, one epoch with a single-leaf rewards tree (root = leaf, empty proof)
    assert admin.ledger.has_role(OPERATOR_ROLE, admin.ledger.client.address)
    op_address = dev_account(1).address
    admin.ledger.grant_operator(op_address)
    admin.token.mint(op_address, 1_000)
    op = _bind(w3, deployment, 1)
    op.token.approve(op.ledger.address, 1_000)
    account = dev_account(4).address
    leaf = keccak(keccak(abi_encode(["address", "uint256"], [account, 600])))
    res = op.ledger.submit_epoch(1, ROOT_A, 2, leaf, ROOT_C, 600)
    assert [e["event"] for e in res["events"]] == ["EpochSubmitted"]
    assert res["events"][0]["args"]["pulled"] == 600
    assert op.ledger.last_epoch(op_address) == 1
    ep = op.ledger.epoch(op_address, 1)
    assert (ep.rewards_root, ep.cumulative_total, ep.record_count, ep.revoked) == ("0x" + leaf.hex(), 600, 2, False)
    assert op.ledger.root_in_effect(op_address).epoch == 1
    # anyone claims for the account; the money goes to the account
    stranger = _bind(w3, deployment, 5)
    claim = stranger.ledger.claim(op_address, 1, account, 600, [])
    names = [e["event"] for e in claim["events"]]
    assert names == ["EffectiveEpochAdvanced", "Claimed"]  # the claim moved the effective epoch to 1 on the way
    assert claim["events"][1]["args"]["amount"] == 600 and claim["events"][1]["args"]["caller"] == \
        stranger.ledger.client.address
    assert admin.token.balance_of(account) == 600
    assert op.ledger.claimed(op_address, account) == 600
    with pytest.raises(ContractRevertError) as ei:
        stranger.ledger.claim(op_address, 1, account, 700, [])
    assert ei.value.error_name == "LedgerInvalidProof"


def test_claim_many_pays_nothing_twice(w3: Web3, deployment: Deployment, admin: Contracts) -> None:
    op_address = dev_account(1).address
    admin.ledger.grant_operator(op_address)
    admin.token.mint(op_address, 500)
    op = _bind(w3, deployment, 1)
    op.token.approve(op.ledger.address, 500)
    account = dev_account(6).address
    leaf = keccak(keccak(abi_encode(["address", "uint256"], [account, 500])))
    op.ledger.submit_epoch(1, ROOT_A, 1, leaf, ROOT_C, 500)
    first = op.ledger.claim_many(op_address, 1, [account], [500], [[]])
    assert [e["args"]["amount"] for e in first["events"] if e["event"] == "Claimed"] == [500]
    second = op.ledger.claim_many(op_address, 1, [account], [500], [[]])
    assert second["events"] == []
    assert admin.token.balance_of(account) == 500
    with pytest.raises(ContractRevertError) as ei:
        op.ledger.claim(op_address, 1, account, 500, [])
    assert ei.value.error_name == "LedgerNothingToClaim"
