"""Helpers of the contract suite: the deployment handle, transact/revert assertions, clock control, tree builders.

Accounts are anvil's unlocked dev accounts: admin = accounts[0] (deployer; admin of everything),
operator = accounts[1], guardian = accounts[2], users = accounts[3:] (contributors, adapter owners, claimants).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from web3 import Web3
from web3.contract import Contract
from web3.exceptions import ContractLogicError
from web3.logs import DISCARD
from web3.types import TxReceipt

from loraledger.node.chain.artifacts import ARTIFACTS_DIR, load_artifact
from loraledger.node.chain.deploy import Deployment
from loraledger.node.chain.reverts import DecodedRevert, ErrorDecoder
from loraledger.node.ledger.merkle import RECORD_LEAF_ENCODING, REWARD_LEAF_ENCODING, StandardMerkleTree

OPERATOR_FUNDS = 10**27
MAX_UINT = 2**256 - 1
DELAY = 3600  # challenge delay of the second ledger, seconds

DECODER = ErrorDecoder.from_artifacts(ARTIFACTS_DIR)


@dataclass
class ChainEnv:
    """Handles on one deployment: web3 contracts and the accounts playing each role."""

    w3: Web3
    deployment: Deployment
    token: Contract
    contributors: Contract
    datanets: Contract
    adapters: Contract
    ledger: Contract
    delayed_ledger: Contract  # same token, challenge delay DELAY, same operator and guardian
    admin: str
    operator: str
    guardian: str
    users: list[str]


def contract(w3: Web3, name: str, address: str) -> Contract:
    """A web3 contract for artifact `name` at `address`."""
    return w3.eth.contract(address=Web3.to_checksum_address(address), abi=load_artifact(name).abi)


def send(w3: Web3, fn: Any, sender: str) -> TxReceipt:
    """Transact `fn` from the unlocked `sender`, wait, and assert it succeeded."""
    receipt = w3.eth.wait_for_transaction_receipt(fn.transact({"from": sender}))
    assert receipt["status"] == 1, f"transaction from {sender} failed: {receipt}"
    return receipt


def deploy(w3: Web3, name: str, args: Sequence[Any], sender: str) -> Contract:
    """Deploy artifact `name` with constructor `args` from `sender`; returns the bound contract."""
    art = load_artifact(name)
    factory = w3.eth.contract(abi=art.abi, bytecode=art.bytecode)
    receipt = send(w3, factory.constructor(*args), sender)
    return contract(w3, name, receipt["contractAddress"])


def events(c: Contract, name: str, receipt: TxReceipt) -> tuple[Any, ...]:
    """The `name` events `c` emitted in `receipt` (other contracts' logs ignored)."""
    return tuple(getattr(c.events, name)().process_receipt(receipt, errors=DISCARD))


def revert_of(fn: Any, sender: str) -> DecodedRevert:
    """Decode the custom error `fn` reverts with when called from `sender` (AssertionError if it does not revert)."""
    try:
        fn.call({"from": sender})
    except ContractLogicError as e:
        return DECODER.decode(e.data)
    raise AssertionError(f"expected {fn.fn_name} from {sender} to revert, but it succeeded")


def expect_revert(w3: Web3, fn: Any, sender: str, name: str, *args: Any) -> DecodedRevert:
    """Assert `fn` reverts with custom error `name` (and `args` when given), both in eth_call and when mined."""
    decoded = revert_of(fn, sender)
    assert decoded.name == name, f"expected {name}, got {decoded.describe()}"
    if args:
        assert decoded.args == tuple(args), f"expected {name}{args}, got {decoded.describe()}"
    receipt = w3.eth.wait_for_transaction_receipt(fn.transact({"from": sender, "gas": 3_000_000}))
    assert receipt["status"] == 0, f"{fn.fn_name} was mined successfully but should have reverted with {name}"
    return decoded


def increase_time(w3: Web3, seconds: int) -> None:
    """Advance anvil's clock by `seconds` and mine a block."""
    w3.provider.make_request("evm_increaseTime", [seconds])  # type: ignore[arg-type]
    w3.provider.make_request("evm_mine", [])  # type: ignore[arg-type]


def snapshot(w3: Web3) -> str:
    """`evm_snapshot` id."""
    return str(w3.provider.make_request("evm_snapshot", [])["result"])  # type: ignore[arg-type]


def revert_to(w3: Web3, snap: str) -> None:
    """`evm_revert` to `snap`, asserting it worked."""
    assert w3.provider.make_request("evm_revert", [snap])["result"] is True  # type: ignore[arg-type]


def rewards_tree(amounts: Mapping[str, int]) -> StandardMerkleTree:
    """StandardMerkleTree over (account, cumulativeAmount) leaves."""
    return StandardMerkleTree.of([[a, v] for a, v in amounts.items()], REWARD_LEAF_ENCODING)


def record(epoch: int, i: int) -> list[Any]:
    """A deterministic attribution record (the record layout of docs/ARCHITECTURE.md) for tests."""
    return [
        epoch,
        (1000 * epoch + i).to_bytes(32, "big"),
        [1, 2 + i % 3],
        [6000, 4000],
        10 + i,
        20 + i,
        30 * (i + 1),
        bytes([i % 256]) * 32,
        bytes([(i + 7) % 256]) * 32,
    ]


def records_tree(epoch: int, n: int = 3) -> StandardMerkleTree:
    """StandardMerkleTree over `n` records of `epoch`."""
    return StandardMerkleTree.of([record(epoch, i) for i in range(n)], RECORD_LEAF_ENCODING)


def submit(
    env: ChainEnv,
    epoch: int,
    rewards: StandardMerkleTree | bytes,
    cumulative_total: int,
    *,
    ledger: Contract | None = None,
    records: StandardMerkleTree | None = None,
) -> TxReceipt:
    """Submit `epoch` from the operator with these roots (`rewards`: a tree, or a bare root)."""
    led = env.ledger if ledger is None else ledger
    recs = records_tree(epoch) if records is None else records
    root = rewards if isinstance(rewards, bytes) else rewards.root
    fn = led.functions.submitEpoch(epoch, recs.root, len(recs), root, cumulative_total)
    return send(env.w3, fn, env.operator)
