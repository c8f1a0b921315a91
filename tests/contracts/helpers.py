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
from loraledger.node.ledger.merkle import REWARD_LEAF_ENCODING, StandardMerkleTree, keccak256
from loraledger.node.ledger.records import AttributionRecord, RecordDomain
from loraledger.node.ledger.records import records_tree as domain_records_tree

OPERATOR_FUNDS = 10**27
MAX_UINT = 2**256 - 1
DELAY = 3600  # challenge delay of the second ledger, seconds
DEFAULT_DOMAIN = RecordDomain(31337, "0x" + "11" * 20, "0x" + "22" * 20)  # for leaf-encoding tests off chain

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


def make_record(epoch: int, i: int) -> AttributionRecord:
    """A deterministic attribution record (the record layout of docs/ARCHITECTURE.md) of `epoch` for tests."""
    contributors = [("0x" + f"{0xC0 + i % 5:02x}" * 20, 1 + i), ("0x" + f"{0xD0 + i % 3:02x}" * 20, 2)]
    return AttributionRecord.create(
        request_id=(1000 * epoch + i).to_bytes(32, "big"),
        adapter_ids=[1, 2 + i % 3],
        weights_bps=[6000, 4000],
        prompt_tokens=10 + i,
        completion_tokens=20 + i,
        fee=30 * (i + 1),
        output_hash=bytes([i % 256]) * 32,
        contributors=contributors,
        epoch=epoch,
    )


def record(epoch: int, i: int, domain: RecordDomain = DEFAULT_DOMAIN) -> list[Any]:
    """The leaf values (RECORD_LEAF_ENCODING order, domain first) of `make_record(epoch, i)`."""
    return make_record(epoch, i).leaf_values(domain)


def domain_of(env: ChainEnv, ledger: Contract | None = None, operator: str | None = None) -> RecordDomain:
    """The record domain of `operator`'s stream (default: the env's operator) on `ledger` (default: env.ledger)."""
    led = env.ledger if ledger is None else ledger
    return RecordDomain(env.w3.eth.chain_id, led.address, env.operator if operator is None else operator)


def records_tree(domain: RecordDomain, epoch: int, n: int = 3) -> StandardMerkleTree:
    """StandardMerkleTree over `n` records of `epoch` in `domain` (the tree the node builds)."""
    return domain_records_tree([make_record(epoch, i) for i in range(n)], domain)


def export_hash(epoch: int) -> bytes:
    """A stand-in sha256 of the epoch's canonical export (non-zero, distinct per epoch)."""
    return keccak256(b"export" + epoch.to_bytes(8, "big"))


def submit_fn(
    env: ChainEnv,
    epoch: int,
    rewards: StandardMerkleTree | bytes,
    cumulative_total: int,
    *,
    ledger: Contract | None = None,
    operator: str | None = None,
    records: StandardMerkleTree | None = None,
    parent: int | None = None,
) -> Any:
    """The `submitEpoch` call for `epoch` with these roots (`rewards`: a tree, or a bare root), built on `parent`
    (default: the operator's live tip now)."""
    led = env.ledger if ledger is None else ledger
    op = env.operator if operator is None else operator
    recs = records_tree(domain_of(env, led, op), epoch) if records is None else records
    root = rewards if isinstance(rewards, bytes) else rewards.root
    tip = led.functions.liveTip(op).call() if parent is None else parent
    return led.functions.submitEpoch(epoch, recs.root, len(recs), root, export_hash(epoch), cumulative_total, tip)


def submit(
    env: ChainEnv,
    epoch: int,
    rewards: StandardMerkleTree | bytes,
    cumulative_total: int,
    *,
    ledger: Contract | None = None,
    operator: str | None = None,
    records: StandardMerkleTree | None = None,
) -> TxReceipt:
    """Submit `epoch` from `operator` (default: the env's operator) with these roots."""
    fn = submit_fn(env, epoch, rewards, cumulative_total, ledger=ledger, operator=operator, records=records)
    return send(env.w3, fn, env.operator if operator is None else operator)


def send_all(w3: Web3, calls: Sequence[tuple[Any, str]], gas: int = 1_000_000) -> list[TxReceipt]:
    """Send many transactions without waiting between them, then wait for all; assert every one succeeded.

    Automining anvil mines each on arrival, in order; skipping the per-call receipt wait and gas estimate makes
    a few hundred setup transactions take a second or two."""
    hashes = [fn.transact({"from": sender, "gas": gas}) for fn, sender in calls]
    receipts = [w3.eth.wait_for_transaction_receipt(h) for h in hashes]
    for r in receipts:
        assert r["status"] == 1, f"transaction failed: {r}"
    return receipts


def mine(w3: Web3) -> None:
    """Mine an empty block. After a commitment, calls and gas estimates against `latest` run in the commitment's
    block, where its reveal is still too new (AdapterCommitTooNew); one more block and they run as mined."""
    w3.provider.make_request("evm_mine", [])  # type: ignore[arg-type]


def set_time(w3: Web3, timestamp: int) -> None:
    """Mine a block at `timestamp` (anvil's clock then continues from there)."""
    w3.provider.make_request("evm_mine", [timestamp])  # type: ignore[arg-type]


def commitment(owner: str, weights: bytes, config: bytes, salt: bytes) -> bytes:
    """adapterCommitment(owner, weightsHash, trainingConfigHash, salt), computed locally."""
    from eth_abi import encode as abi_encode

    return keccak256(abi_encode(["address", "bytes32", "bytes32", "bytes32"], [owner, weights, config, salt]))


def register_adapter(
    env: ChainEnv,
    owner: str,
    weights: bytes,
    datanets: Sequence[int],
    *,
    base: bytes | None = None,
    config: bytes | None = None,
    fee: int = 5,
    uri: str = "file://adapter",
) -> int:
    """Commit, then (next block) register an adapter owned by `owner`; its id."""
    base = weights if base is None else base
    config = weights if config is None else config
    salt = keccak256(b"salt" + weights + bytes.fromhex(owner[2:]))
    send(env.w3, env.adapters.functions.commitAdapter(commitment(owner, weights, config, salt)), owner)
    mine(env.w3)
    r = send(env.w3, env.adapters.functions.registerAdapter(weights, base, config, list(datanets), fee, uri, salt),
             owner)
    return int(events(env.adapters, "AdapterRegistered", r)[0].args.id)
