"""What the servicers exchange with the rest of the node: plain view types and the Protocols they depend on.

The servicers (`servicers.py`) know nothing of the record log, the chain or the adapter store; the node app
plugs in implementations of these Protocols (`catalog.StoreCatalog`, `record_sink.LedgerRecordSink`,
`queries.LogQueries`), and tests may plug in their own.

    AdapterCatalog       resolve / load / unload / describe adapters          -> AdapterDescription
    RecordSink           commit(FinishedRequest)                             -> AttributionSummary | None
    AttributionQueries   record / reward_proof / epochs                      -> RecordView, RewardProofView, EpochView
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from loraledger.inference.errors import AdapterNotFoundError, InvalidRequestError
from loraledger.node.types import AdapterId, DatanetId


@dataclass(frozen=True)
class AdapterDescription:
    """One adapter as `ListAdapters` shows it (mirrors the proto `AdapterInfo`)."""

    key: str  # the engine key requests resolve to (on-chain id in decimal, or the alias)
    alias: str = ""
    onchain_id: AdapterId | None = None
    weights_hash: str = ""
    base_model_hash: str = ""
    rank: int = 0
    resident: bool = False
    datanet_ids: tuple[DatanetId, ...] = ()
    fee_per_token: int = 0
    owner: str = ""  # the registered owner's address (on-chain adapters)


class AdapterCatalog(Protocol):
    """Names in requests -> engine adapter keys, and the adapter admin calls. May block (chain, disk): the
    servicer calls it from a worker thread.

    resolve(name)            engine key for an on-chain id (decimal) or alias, registering it with the engine's
                             store on first use; AdapterNotFoundError / NotFoundError if unknown,
                             LineageMismatchError / AdapterMismatchError if its files are not the registered ones
    load(name, path, hash)   register and load now (errors at once); its description
    unload(name)             forget it; False if it was not known
    list()                   every known adapter
    """

    def resolve(self, name: str) -> str: ...

    def load(self, name: str, path: str, expected_weights_hash: str) -> AdapterDescription: ...

    def unload(self, name: str) -> bool: ...

    def list(self) -> list[AdapterDescription]: ...


class BaseOnlyCatalog:
    """The catalog of a node without an adapter store: every name is unknown, nothing can be loaded."""

    def resolve(self, name: str) -> str:
        raise AdapterNotFoundError(
            f"unknown adapter {name!r}: this node serves the base model only (started without an adapter store)"
        )

    def load(self, name: str, path: str, expected_weights_hash: str) -> AdapterDescription:
        raise InvalidRequestError(
            f"cannot load adapter {name!r}: this node serves the base model only; restart it with an adapter store"
        )

    def unload(self, name: str) -> bool:
        return False

    def list(self) -> list[AdapterDescription]:
        return []


@dataclass(frozen=True)
class ContributorShareView:
    account: str
    weight: int
    share: float  # weight / sum of weights


@dataclass(frozen=True)
class AttributionSummary:
    """What the final response says about the record of one request (mirrors the proto message)."""

    record_hash: str
    request_id: str  # bytes32 form
    adapter_ids: tuple[AdapterId, ...]
    weights_bps: tuple[int, ...]
    datanet_ids: tuple[DatanetId, ...]
    fee: int
    attribution_hash: str
    top_contributors: tuple[ContributorShareView, ...] = ()
    epoch: int = 0
    adapter_fees: tuple[int, ...] = ()  # each adapter's part of `fee`: bps_i * feePerToken_i * tokens // 10000


@dataclass(frozen=True)
class FinishedRequest:
    """A request the engine finished with "stop" or "length": what a record is made of."""

    request_id: str  # the bytes32 form (`request_id_bytes32`)
    adapters: tuple[tuple[str, float], ...]  # (engine key, weight), weights summing to 1
    prompt_tokens: int
    completion_tokens: int
    text: str
    token_ids: tuple[int, ...]
    client_account: str = ""


class RecordSink(Protocol):
    """Turns a finished request into its durable attribution record. `commit` returns once the record is durable
    (None when the request has no record, e.g. base model only); `flush` waits for everything committed."""

    def commit(self, finished: FinishedRequest) -> AttributionSummary | None: ...

    def flush(self) -> None: ...


class NoRecords:
    """A sink that keeps nothing (a node without a record log)."""

    def commit(self, finished: FinishedRequest) -> AttributionSummary | None:
        return None

    def flush(self) -> None:
        return None


@dataclass(frozen=True)
class RecordView:
    """GetRecord's answer: the record as JSON (`AttributionRecord.to_json()`), its leaf and, once settled, proof."""

    record: dict[str, Any]
    leaf: str
    settled: bool = False
    records_root: str = ""
    proof: tuple[str, ...] = ()
    spans: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class RewardProofView:
    operator: str
    account: str
    cumulative_amount: int
    epoch: int
    rewards_root: str
    proof: tuple[str, ...]
    # from the chain, when the node has one (loraledger.node.ledger.claims.RewardStatus)
    epoch_in_effect: int = 0
    in_effect: bool = False
    effective_at: int = 0
    claimed: int = 0
    claimable_now: int = 0
    latest_epoch: int = 0
    pending: int = 0
    pending_effective_at: int = 0


@dataclass(frozen=True)
class EpochView:
    epoch: int
    records_root: str
    record_count: int
    rewards_root: str
    cumulative_total: int
    state: str
    tx_hash: str


class AttributionQueries(Protocol):
    """Read side of the record log and epoch trees (may block: called from a worker thread).

    record(request_id_bytes32) -> RecordView | None; reward_proof(account, epoch 0 = the epoch in effect) -> RewardProofView | None (raises
    ConfigError for a malformed address); epochs(limit) newest last; operator: the operator's address."""

    @property
    def operator(self) -> str: ...

    def record(self, request_id: str) -> RecordView | None: ...

    def reward_proof(self, account: str, epoch: int = 0) -> RewardProofView | None: ...

    def epochs(self, limit: int) -> list[EpochView]: ...
