"""Epochs: the states an epoch goes through, its trees rebuilt from the log, its export, and proofs against it.

States, in order (kept in the record log's `epochs` table; the settler drives them, see `settler.py`):

    open       records assigned (close_epoch)
    built      terms snapshotted, amounts, cumulative balances, records root, rewards root
    submitted  the submitEpoch transaction signed and stored before broadcast
    confirmed  the ledger holds the epoch's roots
    revoked    a guardian revoked it on chain (or an epoch below it): its records are quarantined, not paid,
               and its balances no longer count; later epochs build on the last live one
    resettled  a revoked epoch whose records the operator reviewed and put back to pending
               (`loraledger epoch resettle N`): the next epoch includes them

Read side, which anyone holding the log can run:

    trees  = rebuild_epoch(log, n)            # records and balances -> both trees, checked against stored roots
    export_epoch(log, n, "epoch-3.json")      # full trees + proofs, for anyone to verify and claim
    EpochProofs(log).reward_proof(account)    # the proof of an account's cumulative amount

A log that no longer matches the roots it stored (a record or balance altered) raises `TamperError`.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraledger.node.errors import NodeError
from loraledger.node.ledger.merkle import RECORD_LEAF_ENCODING, REWARD_LEAF_ENCODING, StandardMerkleTree
from loraledger.node.ledger.records import AttributionRecord, RecordDomain, attribution_hash, records_tree
from loraledger.node.ledger.rewards import rewards_tree
from loraledger.node.types import Address, Bytes32, TxHash, Wei, as_address

if TYPE_CHECKING:  # the log stores epochs (and imports this module); the functions here only read it
    from loraledger.node.ledger.record_log import RecordLog

# The states of an epoch, in order (see the module docstring); kept in the record log's `epochs` table.
OPEN, BUILT, SUBMITTED, CONFIRMED = "open", "built", "submitted", "confirmed"
REVOKED, RESETTLED = "revoked", "resettled"


EPOCH_FILE_FORMAT = "loraledger-epoch-v1"


class SettlementError(NodeError, RuntimeError):
    """Settlement cannot go on (reverted transaction, log and chain disagree, ...); records are kept."""


class TamperError(SettlementError):
    """The log no longer matches the roots it stored for an epoch (a record or balance was altered)."""


@dataclass
class EpochTrees:
    """An epoch rebuilt from the log and checked against its stored roots."""

    row: EpochRow
    records: list[AttributionRecord]
    records_tree: StandardMerkleTree
    rewards_tree: StandardMerkleTree
    amounts: dict[Address, Wei]
    operator: Address
    domain: RecordDomain


def rebuild_epoch(log_: RecordLog, n: int) -> EpochTrees:
    """Rebuild epoch `n`'s trees from the log; TamperError if a record or balance no longer matches its root.

    Checks: each record's attributionHash commits to its stored contributor list; the records root and the
    rewards root recomputed from the log equal the roots stored when the epoch was built.
    """
    row = log_.epoch(n)
    if row is None:
        raise SettlementError(f"epoch {n} is not in the record log")
    if row.state == RESETTLED:
        raise SettlementError(f"epoch {n} was revoked and its records resettled into later epochs")
    if row.state == OPEN or row.records_root is None or row.rewards_root is None or row.terms is None:
        raise SettlementError(f"epoch {n} is {row.state}: it has no trees yet (run `loraledger epoch settle`)")
    records = log_.records_of_epoch(n)
    bad = [r.request_id for r in records if attribution_hash(r.contributors) != r.attribution_hash]
    if bad:
        raise TamperError(f"epoch {n}: {len(bad)} record(s) no longer match their attributionHash "
                          f"(first: {bad[0]}); the log was altered")
    if len(records) != row.record_count:
        raise TamperError(f"epoch {n}: the log holds {len(records)} records, {row.record_count} were settled")
    from loraledger.node.ledger.terms import domain_of_terms

    domain = domain_of_terms(row.terms)
    rtree = records_tree(records, domain)
    if rtree.root_hex != row.records_root:
        raise TamperError(f"epoch {n}: records rebuilt from the log give root {rtree.root_hex}, but the epoch was "
                          f"settled with {row.records_root}: a record was altered after settlement")
    operator = as_address(str(row.terms["operator"]))
    cumulative = log_.cumulative_balances(n)
    wtree = rewards_tree(cumulative, operator)
    if wtree.root_hex != row.rewards_root:
        raise TamperError(f"epoch {n}: balances in the log give rewards root {wtree.root_hex}, but the epoch was "
                          f"settled with {row.rewards_root}: a balance was altered")
    return EpochTrees(row, records, rtree, wtree, log_.amounts_of_epoch(n), operator, domain)


def export_epoch(log_: RecordLog, n: int, path: str | Path, *, ledger: str | None = None,
                 chain_id: int | None = None) -> Path:
    """Write epoch `n` as JSON: every record with its leaf and proof, every cumulative reward with its proof, and
    the rewards tree in OpenZeppelin's dump format. TamperError when the log no longer matches the roots.

    {format, chainId, ledger, operator, epoch, state, txHash, recordsRoot, recordCount, rewardsRoot,
     cumulativeTotal, feesTotal, terms, recordLeafEncoding, records: [{record, leaf, proof}],
     rewardLeafEncoding, rewards: [{account, cumulativeAmount, epochAmount, proof}], rewardsTree}
    """
    t = rebuild_epoch(log_, n)
    row = t.row
    records = [{"record": r.to_json(), "leaf": "0x" + r.leaf_hash(t.domain).hex(),
                "proof": t.records_tree.get_proof_hex(i)}
               for i, r in enumerate(t.records)]
    rewards = [{"account": v[0], "cumulativeAmount": str(v[1]), "epochAmount": str(int(t.amounts.get(v[0], 0))),
                "proof": t.rewards_tree.get_proof_hex(i)} for i, v in enumerate(t.rewards_tree.values)]
    doc = {
        "format": EPOCH_FILE_FORMAT,
        "chainId": t.domain.chain_id if chain_id is None else chain_id,
        "ledger": t.domain.ledger if ledger is None else ledger,
        "operator": t.operator,
        "epoch": n,
        "state": row.state,
        "txHash": row.tx_hash,
        "recordsRoot": row.records_root,
        "recordCount": row.record_count,
        "rewardsRoot": row.rewards_root,
        "cumulativeTotal": str(int(row.cumulative_total or 0)),
        "feesTotal": str(int(row.fees_total)),
        "terms": row.terms,
        "recordLeafEncoding": list(RECORD_LEAF_ENCODING),
        "records": records,
        "rewardLeafEncoding": list(REWARD_LEAF_ENCODING),
        "rewards": rewards,
        "rewardsTree": t.rewards_tree.dump(),
    }
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    tmp.replace(out)
    return out


@dataclass(frozen=True)
class RewardProofData:
    """An account's latest cumulative amount under epoch `epoch`'s rewards root, with its proof."""

    operator: Address
    account: Address
    epoch: int
    cumulative_amount: Wei
    rewards_root: Bytes32
    proof: list[Bytes32]


@dataclass(frozen=True)
class RecordProofData:
    """A record (carrying its epoch), its leaf and proof under the epoch's records root."""

    record: AttributionRecord
    epoch: int
    leaf: Bytes32
    records_root: Bytes32
    proof: list[Bytes32]


class EpochProofs:
    """Proof queries over the log, with the trees of the last few epochs cached (rebuilding one is O(records))."""

    def __init__(self, log_: RecordLog, cache_size: int = 2) -> None:
        self._log = log_
        self._cache: OrderedDict[int, EpochTrees] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def trees(self, n: int) -> EpochTrees:
        with self._lock:
            hit = self._cache.get(n)
            if hit is not None:
                self._cache.move_to_end(n)
                return hit
        t = rebuild_epoch(self._log, n)
        with self._lock:
            self._cache[n] = t
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return t

    def reward_proof(self, account: str, epoch: int | None = None) -> RewardProofData | None:
        """The account's cumulative amount + proof in `epoch` (default: the latest confirmed); None if absent."""
        if epoch is None:
            row = self._log.last_confirmed()
            if row is None:
                return None
            epoch = row.epoch
        t = self.trees(epoch)
        a = as_address(account)
        for i, (acct, amount) in enumerate(t.rewards_tree.values):
            if acct == a:
                return RewardProofData(t.operator, a, epoch, Wei(int(amount)), Bytes32(t.rewards_tree.root_hex),
                                       [Bytes32(p) for p in t.rewards_tree.get_proof_hex(i)])
        return None

    def record_proof(self, request_id: str) -> RecordProofData | None:
        """The record with `request_id` with its proof; None if unknown or its epoch is not built yet."""
        rec = self._log.get_record(request_id)
        if rec is None or rec.epoch == 0:
            return None
        row = self._log.epoch(rec.epoch)
        if row is None or row.state == OPEN:
            return None
        t = self.trees(rec.epoch)
        i = next(k for k, r in enumerate(t.records) if r.request_id == rec.request_id)
        return RecordProofData(rec, rec.epoch, Bytes32("0x" + rec.leaf_hash(t.domain).hex()),
                               Bytes32(t.records_tree.root_hex),
                               [Bytes32(p) for p in t.records_tree.get_proof_hex(i)])


@dataclass(frozen=True)
class EpochRow:
    """One row of `epochs` (None where the state has not produced the value yet)."""

    epoch: int
    state: str
    closed_at: float
    record_count: int
    fees_total: Wei
    records_root: Bytes32 | None
    rewards_root: Bytes32 | None
    cumulative_total: Wei | None
    terms: dict[str, Any] | None
    tx_hash: TxHash | None
    tx_nonce: int | None
    raw_tx: str | None
    submitted_at: float | None
    confirmed_block: int | None
    last_error: str | None
