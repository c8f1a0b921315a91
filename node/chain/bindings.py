"""Typed wrappers over each contract's calls, bound to one `ChainClient` (one signing account).

    c = Contracts.at(client, deployment.addresses)     # {"RewardToken": addr, "DatanetRegistry": addr, ...}
    dn = c.datanets.register_datanet(root, 3, "file://dn.jsonl")     # -> DatanetId, parsed from the event
    c.ledger.submit_epoch(1, records_root, 10, rewards_root, 1234)  # -> TxResult (hash, block, gas, events)
    c.ledger.epoch(operator, 1)                                      # -> EpochInfo
    c.adapters.access_events(from_block, to_block, adapter_ids=[7])  # -> [AccessChanged | AllowlistChanged]

Writes send from the bound client's account and wait for the receipt (ContractRevertError names the custom
error); reads go through `ChainClient.call`. To act as another account, bind a second `Contracts` to another
client (e.g. each contributor registers from its own account).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from eth_abi import encode
from eth_utils import event_abi_to_log_topic, keccak
from web3.contract import Contract
from web3.contract.contract import ContractFunction
from web3.exceptions import Web3RPCError
from web3.types import TxReceipt

from loraledger.node.chain.artifacts import load_artifact
from loraledger.node.chain.client import ChainClient
from loraledger.node.errors import ChainError, ContractRevertError
from loraledger.node.types import (
    AdapterId,
    Address,
    Bytes32,
    DatanetId,
    LogEntry,
    TxHash,
    TxResult,
    Wei,
    as_address,
    bytes32_to_bytes,
)

OPERATOR_ROLE = Bytes32("0x" + keccak(text="OPERATOR_ROLE").hex())
GUARDIAN_ROLE = Bytes32("0x" + keccak(text="GUARDIAN_ROLE").hex())
PAUSER_ROLE = Bytes32("0x" + keccak(text="PAUSER_ROLE").hex())
MINTER_ROLE = Bytes32("0x" + keccak(text="MINTER_ROLE").hex())
SUSPENDER_ROLE = Bytes32("0x" + keccak(text="SUSPENDER_ROLE").hex())
DEFAULT_ADMIN_ROLE = Bytes32("0x" + "00" * 32)


def _hex32(value: bytes) -> Bytes32:
    return Bytes32("0x" + bytes(value).hex())


def _proof_bytes(proof: Sequence[Bytes32 | str | bytes]) -> list[bytes]:
    return [p if isinstance(p, bytes) else bytes32_to_bytes(p) for p in proof]


def _plain(value: Any) -> Any:
    """Event/return values as JSON-friendly Python: bytes -> 0x hex, AttributeDict -> dict, tuples -> lists."""
    if isinstance(value, (bytes, bytearray)):
        return "0x" + bytes(value).hex()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class BoundContract:
    """One deployed contract (ABI from `contracts/artifacts/<NAME>.json`) at `address`, sending via `client`."""

    NAME: ClassVar[str] = ""

    def __init__(self, client: ChainClient, address: Address | str) -> None:
        if not self.NAME:
            raise TypeError("BoundContract subclasses set NAME to their artifact name")
        self.client = client
        self.address = as_address(address)
        abi = load_artifact(self.NAME).abi
        self.contract: Contract = client.w3.eth.contract(address=self.address, abi=abi)
        self._events_by_topic = {
            event_abi_to_log_topic(e): str(e["name"])  # type: ignore[arg-type]
            for e in abi if e.get("type") == "event" and not e.get("anonymous")
        }

    def _fn(self, name: str, *args: Any) -> ContractFunction:
        return self.contract.functions[name](*args)

    def _read(self, name: str, *args: Any) -> Any:
        return self.client.call(self._fn(name, *args))

    def _write(self, name: str, *args: Any, gas: int | None = None) -> TxResult:
        receipt = self.client.transact(self._fn(name, *args), gas=gas)
        return self.result(receipt)

    def events(self, receipt: TxReceipt) -> list[LogEntry]:
        """The logs of `receipt` emitted by this contract, decoded by this contract's ABI, in log order."""
        out: list[LogEntry] = []
        for log in receipt["logs"]:
            if log["address"] != self.address or not log["topics"]:
                continue
            name = self._events_by_topic.get(bytes(log["topics"][0]))
            if name is None:
                continue
            decoded = self.contract.events[name]().process_log(log)
            out.append(LogEntry(address=self.address, event=name, args=_plain(dict(decoded["args"]))))
        return out

    def result(self, receipt: TxReceipt) -> TxResult:
        """The TxResult of a mined receipt, with this contract's events decoded."""
        return TxResult(
            tx_hash=TxHash("0x" + bytes(receipt["transactionHash"]).hex()),
            block_number=int(receipt["blockNumber"]),
            gas_used=int(receipt["gasUsed"]),
            effective_gas_price=Wei(int(receipt.get("effectiveGasPrice", 0))),
            events=self.events(receipt),
        )

    def _event_arg(self, result: TxResult, event: str, arg: str) -> Any:
        for e in result["events"]:
            if e["event"] == event:
                return e["args"][arg]
        raise ChainError(f"{self.NAME} transaction {result['tx_hash']} emitted no {event} event")

    # AccessControl, shared by every contract here
    def has_role(self, role: Bytes32, account: Address | str) -> bool:
        return bool(self._read("hasRole", bytes32_to_bytes(role), as_address(account)))

    def grant_role(self, role: Bytes32, account: Address | str) -> TxResult:
        return self._write("grantRole", bytes32_to_bytes(role), as_address(account))


class RewardTokenClient(BoundContract):
    """The ERC-20 rewards are paid in (`RewardToken` on the devnet; any ERC-20 ABI-compatible otherwise)."""

    NAME = "RewardToken"

    def balance_of(self, account: Address | str) -> Wei:
        return Wei(int(self._read("balanceOf", as_address(account))))

    def allowance(self, owner: Address | str, spender: Address | str) -> Wei:
        return Wei(int(self._read("allowance", as_address(owner), as_address(spender))))

    def total_supply(self) -> Wei:
        return Wei(int(self._read("totalSupply")))

    def approve(self, spender: Address | str, amount: int) -> TxResult:
        return self._write("approve", as_address(spender), int(amount))

    def transfer(self, to: Address | str, amount: int) -> TxResult:
        return self._write("transfer", as_address(to), int(amount))

    def mint(self, to: Address | str, amount: int) -> TxResult:
        """Mint `amount` to `to` (caller needs MINTER_ROLE)."""
        return self._write("mint", as_address(to), int(amount))


@dataclass(frozen=True)
class ContributorInfo:
    payout: Address
    registered_at: int
    registered: bool
    suspended: bool
    profile_uri: str


class ContributorRegistryClient(BoundContract):
    NAME = "ContributorRegistry"

    def register(self, profile_uri: str = "") -> TxResult:
        """Register the bound account as a contributor."""
        return self._write("registerContributor", profile_uri)

    def set_payout_address(self, payout: Address | str) -> TxResult:
        return self._write("setPayoutAddress", as_address(payout))

    def suspend(self, account: Address | str) -> TxResult:
        return self._write("suspend", as_address(account))

    def reinstate(self, account: Address | str) -> TxResult:
        return self._write("reinstate", as_address(account))

    def is_active(self, account: Address | str) -> bool:
        return bool(self._read("isActive", as_address(account)))

    def is_registered(self, account: Address | str) -> bool:
        return bool(self._read("isRegistered", as_address(account)))

    def payout_of(self, account: Address | str) -> Address:
        return Address(self._read("payoutOf", as_address(account)))

    def get_contributor(self, account: Address | str) -> ContributorInfo:
        c = self._read("getContributor", as_address(account))
        return ContributorInfo(Address(c[0]), int(c[1]), bool(c[2]), bool(c[3]), str(c[4]))

    def contributor_count(self) -> int:
        return int(self._read("contributorCount"))


@dataclass(frozen=True)
class DatanetInfo:
    contributions_root: Bytes32
    contribution_count: int
    registered_at: int
    curator: Address
    uri: str


class DatanetRegistryClient(BoundContract):
    NAME = "DatanetRegistry"

    def register_datanet(self, contributions_root: Bytes32 | str, contribution_count: int, uri: str) -> DatanetId:
        """Register a datanet; returns its id from the `DatanetRegistered` event."""
        res = self._write("registerDatanet", bytes32_to_bytes(contributions_root), int(contribution_count), uri)
        return DatanetId(int(self._event_arg(res, "DatanetRegistered", "id")))

    def get_datanet(self, datanet_id: int) -> DatanetInfo:
        d = self._read("getDatanet", int(datanet_id))
        return DatanetInfo(_hex32(d[0]), int(d[1]), int(d[2]), Address(d[3]), str(d[4]))

    def exists(self, datanet_id: int) -> bool:
        return bool(self._read("exists", int(datanet_id)))

    def datanet_count(self) -> int:
        return int(self._read("datanetCount"))


@dataclass(frozen=True)
class AdapterInfo:
    weights_hash: Bytes32
    base_model_hash: Bytes32
    training_config_hash: Bytes32
    owner: Address
    registered_at: int
    deprecated: bool
    fee_per_token: Wei
    datanet_ids: tuple[DatanetId, ...]
    uri: str


@dataclass(frozen=True)
class AccessChanged:
    """`AdapterAccessChanged`: adapter `adapter_id` became public (`is_public`) or allowlist-only, at this log."""

    adapter_id: AdapterId
    is_public: bool
    block_number: int
    log_index: int


@dataclass(frozen=True)
class AllowlistChanged:
    """`AdapterAllowlistChanged`: `account` was added to (`allowed`) or removed from `adapter_id`'s allowlist."""

    adapter_id: AdapterId
    account: Address
    allowed: bool
    block_number: int
    log_index: int


AccessEvent = AccessChanged | AllowlistChanged


class AdapterRegistryClient(BoundContract):
    NAME = "AdapterRegistry"

    @staticmethod
    def commitment(owner: Address | str, weights_hash: Bytes32 | str, training_config_hash: Bytes32 | str,
                   salt: bytes) -> bytes:
        """`adapterCommitment(owner, weightsHash, trainingConfigHash, salt)`, computed locally:
        keccak256(abi.encode(owner, weightsHash, trainingConfigHash, salt))."""

        return bytes(keccak(encode(["address", "bytes32", "bytes32", "bytes32"],
                                   [as_address(owner), bytes32_to_bytes(weights_hash),
                                    bytes32_to_bytes(training_config_hash), salt])))

    def commit_adapter(self, commitment: bytes) -> TxResult | None:
        """Step 1 of registration: commit (the reveal must land in a later block). None when the commitment is
        already pending: someone copied our commit transaction and it landed first, which stores our own
        commitment (it binds our address), so the reveal goes ahead."""
        try:
            return self._write("commitAdapter", commitment)
        except ContractRevertError as e:
            if e.error_name != "AdapterAlreadyCommitted":
                raise
            return None

    def register_adapter_tx(
        self,
        weights_hash: Bytes32 | str,
        base_model_hash: Bytes32 | str,
        training_config_hash: Bytes32 | str,
        datanet_ids: Sequence[int],
        fee_per_token: int,
        uri: str,
        salt: bytes | None = None,
    ) -> TxResult:
        """Register an adapter owned by the bound account, commit-reveal: with no `salt`, commit a fresh random one
        and wait for its receipt first (the reveal then lands in a later block); with a `salt`, reveal a
        commitment made earlier. Returns the reveal's result."""
        if salt is None:
            import secrets

            salt = secrets.token_bytes(32)
            self.commit_adapter(self.commitment(self.client.address, weights_hash, training_config_hash, salt))
        return self._write(
            "registerAdapter", bytes32_to_bytes(weights_hash), bytes32_to_bytes(base_model_hash),
            bytes32_to_bytes(training_config_hash), [int(i) for i in datanet_ids], int(fee_per_token), uri, salt,
        )

    def register_adapter(
        self,
        weights_hash: Bytes32 | str,
        base_model_hash: Bytes32 | str,
        training_config_hash: Bytes32 | str,
        datanet_ids: Sequence[int],
        fee_per_token: int,
        uri: str,
        salt: bytes | None = None,
    ) -> AdapterId:
        """`register_adapter_tx`, returning the new id from the `AdapterRegistered` event."""
        res = self.register_adapter_tx(weights_hash, base_model_hash, training_config_hash, datanet_ids,
                                       fee_per_token, uri, salt)
        return AdapterId(int(self._event_arg(res, "AdapterRegistered", "id")))

    def deprecate(self, adapter_id: int) -> TxResult:
        return self._write("deprecate", int(adapter_id))

    def get_adapter(self, adapter_id: int) -> AdapterInfo:
        a = self._read("getAdapter", int(adapter_id))
        return AdapterInfo(
            _hex32(a[0]), _hex32(a[1]), _hex32(a[2]), Address(a[3]), int(a[4]), bool(a[5]), Wei(int(a[6])),
            tuple(DatanetId(int(i)) for i in a[7]), str(a[8]),
        )

    def adapter_id_by_weights_hash(self, weights_hash: Bytes32 | str) -> AdapterId:
        """The id registered for `weights_hash`, 0 if none."""
        return AdapterId(int(self._read("adapterIdByWeightsHash", bytes32_to_bytes(weights_hash))))

    def adapter_count(self) -> int:
        return int(self._read("adapterCount"))

    # access: public (the default) or the owner's allowlist of client accounts
    def set_public(self, adapter_id: int, is_public: bool) -> TxResult:
        """Make the bound account's adapter usable by anyone (`is_public`) or by its allowlist only."""
        return self._write("setPublic", int(adapter_id), bool(is_public))

    def set_allowed(self, adapter_id: int, accounts: Sequence[Address | str], allowed: bool) -> TxResult:
        """Add `accounts` to (`allowed`) or remove them from the allowlist of the bound account's adapter."""
        return self._write("setAllowed", int(adapter_id), [as_address(a) for a in accounts], bool(allowed))

    def is_public(self, adapter_id: int) -> bool:
        return bool(self._read("isPublic", int(adapter_id)))

    def is_allowed(self, adapter_id: int, account: Address | str) -> bool:
        """True when the adapter is public or `account` is on its allowlist."""
        return bool(self._read("isAllowed", int(adapter_id), as_address(account)))

    def access_events(
        self, from_block: int, to_block: int, adapter_ids: Iterable[int] | None = None,
    ) -> list[AccessEvent]:
        """Both access events in blocks `from_block..to_block` (inclusive), in chain order (block, log index);
        only those of `adapter_ids` when given (an empty list: none). One `eth_getLogs`, topics
        `[[AdapterAccessChanged, AdapterAllowlistChanged], [ids...]]`; a provider's limit on the block range is the
        caller's to respect."""
        events = self.contract.events
        names = {str(events[n]().topic): n for n in ("AdapterAccessChanged", "AdapterAllowlistChanged")}
        topics: list[Any] = [list(names)]
        if adapter_ids is not None:
            ids = sorted({int(i) for i in adapter_ids})
            if not ids:
                return []
            topics.append(["0x" + i.to_bytes(32, "big").hex() for i in ids])
        params: Any = {"address": self.address, "fromBlock": int(from_block), "toBlock": int(to_block),
                       "topics": topics}
        try:
            logs = self.client.read(lambda: self.client.w3.eth.get_logs(params), "eth_getLogs (adapter access)")
        except Web3RPCError as e:  # e.g. the provider's cap on the block range or on the number of results
            raise ChainError(f"eth_getLogs of blocks {from_block}..{to_block} failed: {e}") from e
        out: list[AccessEvent] = []
        for log in logs:
            name = names["0x" + bytes(log["topics"][0]).hex()]
            args = events[name]().process_log(log)["args"]
            block, index = int(log["blockNumber"]), int(log["logIndex"])
            if name == "AdapterAccessChanged":
                out.append(AccessChanged(AdapterId(int(args["id"])), bool(args["isPublic"]), block, index))
            else:
                out.append(AllowlistChanged(AdapterId(int(args["id"])), as_address(args["account"]),
                                            bool(args["allowed"]), block, index))
        out.sort(key=lambda e: (e.block_number, e.log_index))
        return out


@dataclass(frozen=True)
class EpochInfo:
    records_root: Bytes32
    rewards_root: Bytes32
    export_hash: Bytes32
    cumulative_total: Wei
    record_count: int
    submitted_at: int
    previous_live: int
    depth: int
    revoked: bool


@dataclass(frozen=True)
class RootInEffect:
    epoch: int
    rewards_root: Bytes32
    cumulative_total: Wei


@dataclass(frozen=True)
class Shares:
    data_bps: int
    adapter_owner_bps: int
    operator_bps: int


class LedgerClient(BoundContract):
    """AttributionLedger: epochs per operator, cumulative-Merkle claims."""

    NAME = "AttributionLedger"

    # operator
    def submit_epoch(
        self, epoch: int, records_root: Bytes32 | str, record_count: int, rewards_root: Bytes32 | str,
        export_hash: Bytes32 | str, cumulative_total: int, parent: int | None = None,
    ) -> TxResult:
        """Submit the bound account's epoch `epoch` (it must hold OPERATOR_ROLE and have approved the token), built
        on live epoch `parent` (default: the chain's live tip now)."""
        if parent is None:
            parent = self.live_tip(self.client.address)
        return self._write("submitEpoch", int(epoch), bytes32_to_bytes(records_root), int(record_count),
                           bytes32_to_bytes(rewards_root), bytes32_to_bytes(export_hash), int(cumulative_total),
                           int(parent))

    def refund_credit(self) -> TxResult:
        """Take back the bound operator's credit left by revoked epochs (none of its epochs may be pending)."""
        return self._write("refundCredit")

    # claims
    def advance(self, operator: Address | str, epoch: int) -> TxResult:
        return self._write("advance", as_address(operator), int(epoch))

    def claim(self, operator: Address | str, epoch: int, account: Address | str, cumulative_amount: int,
              proof: Sequence[Bytes32 | str | bytes]) -> TxResult:
        """Claim against `epoch`'s rewards root (the effective epoch, or a later one in effect)."""
        return self._write("claim", as_address(operator), int(epoch), as_address(account), int(cumulative_amount),
                           _proof_bytes(proof))

    def claim_many(self, operator: Address | str, epoch: int, accounts: Sequence[Address | str],
                   cumulative_amounts: Sequence[int], proofs: Sequence[Sequence[Bytes32 | str | bytes]]) -> TxResult:
        return self._write("claimMany", as_address(operator), int(epoch), [as_address(a) for a in accounts],
                           [int(x) for x in cumulative_amounts], [_proof_bytes(p) for p in proofs])

    # admin, guardian, pauser
    def revoke_root(self, operator: Address | str, epoch: int) -> TxResult:
        return self._write("revokeRoot", as_address(operator), int(epoch))

    def pause(self) -> TxResult:
        return self._write("pause")

    def unpause(self) -> TxResult:
        return self._write("unpause")

    def set_shares(self, data_bps: int, adapter_owner_bps: int, operator_bps: int) -> TxResult:
        return self._write("setShares", int(data_bps), int(adapter_owner_bps), int(operator_bps))

    def grant_operator(self, account: Address | str) -> TxResult:
        return self.grant_role(OPERATOR_ROLE, account)

    def sweep(self, to: Address | str) -> TxResult:
        return self._write("sweep", as_address(to))

    # views
    def epoch(self, operator: Address | str, epoch: int) -> EpochInfo:
        e = self._read("getEpoch", as_address(operator), int(epoch))
        return EpochInfo(_hex32(e[0]), _hex32(e[1]), _hex32(e[2]), Wei(int(e[3])), int(e[4]), int(e[5]), int(e[6]),
                         int(e[7]), bool(e[8]))

    def last_epoch(self, operator: Address | str) -> int:
        return int(self._read("lastEpoch", as_address(operator)))

    def live_tip(self, operator: Address | str) -> int:
        """The operator's latest live (not revoked) epoch: the one its next epoch builds on."""
        return int(self._read("liveTip", as_address(operator)))

    def effective_epoch(self, operator: Address | str) -> int:
        """The epoch claims are checked against now (the stored pointer; `root_in_effect` may be later)."""
        return int(self._read("effectiveEpoch", as_address(operator)))

    def is_revoked(self, operator: Address | str, epoch: int) -> bool:
        return bool(self._read("isRevoked", as_address(operator), int(epoch)))

    def refunded_total(self, operator: Address | str) -> Wei:
        return Wei(int(self._read("refundedTotal", as_address(operator))))

    def owed_total(self) -> Wei:
        return Wei(int(self._read("owedTotal")))

    def effective_at(self, operator: Address | str, epoch: int) -> int:
        return int(self._read("effectiveAt", as_address(operator), int(epoch)))

    def root_in_effect(self, operator: Address | str) -> RootInEffect:
        r = self._read("rootInEffect", as_address(operator))
        return RootInEffect(int(r[0]), _hex32(r[1]), Wei(int(r[2])))

    def funded_total(self, operator: Address | str) -> Wei:
        return Wei(int(self._read("fundedTotal", as_address(operator))))

    def claimed_total(self, operator: Address | str) -> Wei:
        return Wei(int(self._read("claimedTotal", as_address(operator))))

    def claimed(self, operator: Address | str, account: Address | str) -> Wei:
        return Wei(int(self._read("claimed", as_address(operator), as_address(account))))

    def shares(self) -> Shares:
        s = self._read("shares")
        return Shares(int(s[0]), int(s[1]), int(s[2]))

    def verify_record(self, operator: Address | str, epoch: int, record: Any,
                      proof: Sequence[Bytes32 | str | bytes]) -> bool:
        """Whether `record` (an AttributionRecord: the ledger hashes its fields itself) is under `epoch`'s
        records root."""
        return bool(self._read("verifyRecord", as_address(operator), int(epoch), record.ledger_tuple(),
                               _proof_bytes(proof)))

    def record_leaf(self, operator: Address | str, epoch: int, record: Any) -> Bytes32:
        """The ledger's leaf of `record` in `operator`'s `epoch` (domain-separated by chain, ledger, operator)."""
        return _hex32(self._read("recordLeaf", as_address(operator), int(epoch), record.ledger_tuple()))

    def reward_token(self) -> Address:
        return Address(self._read("rewardToken"))

    def challenge_delay(self) -> int:
        return int(self._read("challengeDelay"))

    def paused(self) -> bool:
        return bool(self._read("paused"))


@dataclass(frozen=True)
class Contracts:
    """All five contracts of one deployment, bound to one client."""

    token: RewardTokenClient
    contributors: ContributorRegistryClient
    datanets: DatanetRegistryClient
    adapters: AdapterRegistryClient
    ledger: LedgerClient

    @classmethod
    def at(cls, client: ChainClient, addresses: Mapping[str, str]) -> Contracts:
        """Bind to `addresses` keyed by contract name (RewardToken, ContributorRegistry, DatanetRegistry,
        AdapterRegistry, AttributionLedger); a missing name raises ChainError listing what was given."""
        needed = ("RewardToken", "ContributorRegistry", "DatanetRegistry", "AdapterRegistry", "AttributionLedger")
        missing = [n for n in needed if n not in addresses]
        if missing:
            raise ChainError(f"deployment lacks addresses for {missing} (has {sorted(addresses)})")
        return cls(
            token=RewardTokenClient(client, addresses["RewardToken"]),
            contributors=ContributorRegistryClient(client, addresses["ContributorRegistry"]),
            datanets=DatanetRegistryClient(client, addresses["DatanetRegistry"]),
            adapters=AdapterRegistryClient(client, addresses["AdapterRegistry"]),
            ledger=LedgerClient(client, addresses["AttributionLedger"]),
        )
