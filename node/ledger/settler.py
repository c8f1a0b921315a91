"""Settlement: turn the record log into funded, provable epochs on the AttributionLedger.

    settler = Settler(log, contracts)          # contracts: loraledger.node.chain.bindings.Contracts bound to the operator
    settler.tick()                             # resume anything unfinished; close + settle an epoch when due
    settler.settle()                           # force: close whatever is pending now and settle it

One epoch goes through the states of `epochs.py`, kept in the record log:

    open       records assigned (close_epoch)
    built      terms snapshotted from the chain (shares, adapter owners and fees, contributor payouts and
               suspensions), amounts (loraledger.node.ledger.rewards), cumulative balances, records root, rewards root
    submitted  `approve` done; the submitEpoch transaction signed and its hash, nonce and raw bytes stored
               *before* it is broadcast, so a crash can never lose track of a transaction that may land
    confirmed  the ledger holds our roots for this epoch (receipt seen, `confirmations` deep)

Crash safety and idempotence (every step re-reads the log and the chain):
- built, not yet sent: the ledger's `lastEpoch(operator)` is checked first; if the epoch is there with our roots
  it is adopted, with other roots it is a conflict (SettlementError), otherwise it is sent.
- submitted: the receipt of the stored hash decides. No receipt: the ledger is checked (a replacement may have
  landed); then, if the node still has the transaction, we wait and after `replace_after` s replace it with the
  same nonce and fees bumped by `fee_bump_percent`; if the node lost it and the nonce is still free, the same raw
  bytes are broadcast again; if the nonce was used by another transaction, it is sent anew with a fresh nonce.
  A transaction is never re-sent with a new nonce while the old one can still land.
- a receipt that disappears (reorg) before `confirmations` blocks is treated like a lost transaction; when the
  reorg also took an earlier transaction of ours (the approve before it), the nonce gap is filled first
  (`_fill_nonce_gap`), so that the stored transaction itself lands.
- reverted: the epoch goes back to built with `last_error` and SettlementError stops the caller; records stay.

Revocations (every `resume` first compares the chain's live tip with the log, two reads in the common case):
- an epoch of ours revoked on chain (directly, or because an epoch below it was) goes to `revoked`: its records
  are quarantined (not paid, not pending) and its balances stop counting, so the next epoch builds on the last
  live cumulative state; a built epoch not yet sent goes back to open to be rebuilt on that state;
  `loraledger epoch resettle N` releases a revoked epoch's records into the next epoch once reviewed.
- an epoch on chain that this log did not build: if the guardian revoked it, the log records it as revoked and
  renumbers its own epoch after it; otherwise ForeignEpochError says what the chain holds and refuses to submit
  on top of it (module `ForeignEpochError` names the ways out).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import rlp
from hexbytes import HexBytes
from web3.exceptions import TransactionNotFound, Web3RPCError
from web3.types import TxParams

from loraledger.node.chain.bindings import Contracts, EpochInfo
from loraledger.node.chain.client import CONNECTION_ERRORS
from loraledger.node.errors import ContractRevertError
from loraledger.node.ledger.epochs import (
    BUILT,
    CONFIRMED,
    OPEN,
    SUBMITTED,
    EpochProofs,
    EpochRow,
    SettlementError,
)
from loraledger.node.ledger.export import canonical_export, previous_live_epoch, sha256_hex
from loraledger.node.ledger.record_log import RecordLog
from loraledger.node.ledger.records import AttributionRecord, RecordDomain, records_tree
from loraledger.node.ledger.rewards import add_cumulative, epoch_amounts, rewards_tree
from loraledger.node.ledger.terms import AdapterTerms, ContributorStatus, EpochTerms, Shares, terms_to_json
from loraledger.node.types import AdapterId, Address, Bytes32, TxHash, Wei, as_address, bytes32_to_bytes

log = logging.getLogger(__name__)

MAX_RECORDS_PER_EPOCH = 2**32 - 1  # recordCount is a uint32 on chain
REVOCABLE_MARGIN = 600.0  # s: how far the host's clock may be from the chain's block times


@dataclass(frozen=True)
class SettlementOptions:
    """When epochs close and how their transactions are driven.

    epoch_seconds / epoch_records: `tick` closes an epoch when the oldest pending record is this old, or this many
    are pending. max_epoch_records: cap of records per epoch. confirmations: blocks on top of the receipt before
    an epoch is final. receipt_timeout: how long one `process` waits for its transaction before giving up (the
    epoch stays submitted; the next call resumes). replace_after: seconds a pending transaction may sit before it
    is replaced with bumped fees (fee_bump_percent >= 10, what nodes require of a replacement).
    """

    epoch_seconds: float = 300.0
    epoch_records: int = 10_000
    max_epoch_records: int = 1_000_000
    confirmations: int = 0
    receipt_timeout: float = 120.0
    replace_after: float = 30.0
    fee_bump_percent: int = 25
    poll_interval: float = 0.2
    max_resends: int = 5

    def __post_init__(self) -> None:
        if self.epoch_seconds <= 0 or self.epoch_records <= 0:
            raise SettlementError("epoch_seconds and epoch_records must be > 0")
        if not 0 < self.max_epoch_records <= MAX_RECORDS_PER_EPOCH:
            raise SettlementError(f"max_epoch_records must be in 1..{MAX_RECORDS_PER_EPOCH}")
        if self.fee_bump_percent < 10:
            raise SettlementError("fee_bump_percent must be >= 10 (nodes reject smaller replacement bumps)")
        if self.confirmations < 0:
            raise SettlementError("confirmations must be >= 0")


@dataclass(frozen=True)
class EpochOutcome:
    """A confirmed epoch."""

    epoch: int
    record_count: int
    records_root: Bytes32
    rewards_root: Bytes32
    cumulative_total: Wei
    tx_hash: TxHash | None
    block_number: int | None


class ForeignEpochError(SettlementError):
    """The ledger holds an epoch of this operator that this log did not build; the node will not submit on top."""


LineageTerms = Callable[[int], "Mapping[str, Any] | None"]
"""adapter id -> {"trainingConfigHash", "tokenLevel", "weights": {contributor: tokens}} or None."""

StepHook = Callable[[str, int], None]
"""Called as hook(step, epoch) after: "closed", "built", "approved", "signed", "sent", "confirmed"."""


# ---------------------------------------------------------------------------------------------- trees and proofs


# ---------------------------------------------------------------------------------------------- the settler


def _node_message(err: Web3RPCError) -> str:
    """The lowercase JSON-RPC error message a node answered with."""
    resp = err.rpc_response if isinstance(err.rpc_response, dict) else {}
    error = resp.get("error")
    if isinstance(error, dict):
        return str(error.get("message", "")).lower()
    return str(err).lower()


def _decode_type2(raw_hex: str) -> dict[str, Any]:
    """Fields of a signed EIP-1559 transaction: 0x02 || rlp([chainId, nonce, tip, maxFee, gas, to, value, data,
    accessList, v, r, s])."""
    raw = bytes(HexBytes(raw_hex))
    if not raw or raw[0] != 2:
        raise SettlementError("stored transaction is not an EIP-1559 (type 2) transaction")
    f = rlp.decode(raw[1:])
    as_int = lambda b: int.from_bytes(b, "big")
    return {"chainId": as_int(f[0]), "nonce": as_int(f[1]), "maxPriorityFeePerGas": as_int(f[2]),
            "maxFeePerGas": as_int(f[3]), "gas": as_int(f[4]), "to": "0x" + bytes(f[5]).hex(),
            "value": as_int(f[6]), "data": "0x" + bytes(f[7]).hex()}


class Settler:
    """Drives epochs of one operator from the log to the ledger (module docstring).

    `contracts` is bound to the operator's ChainClient (its account holds OPERATOR_ROLE and the reward tokens).
    """

    def __init__(self, log_: RecordLog, contracts: Contracts, options: SettlementOptions | None = None,
                 on_step: StepHook | None = None, lineage: LineageTerms | None = None) -> None:
        """`lineage(adapter_id)`: the adapter's lineage as the epoch's terms should record it (the node's catalog
        gives it), so that auditors can check each record's contributor split; None records none."""
        self.log = log_
        self.contracts = contracts
        self.client = contracts.ledger.client
        self.w3 = self.client.w3
        self.operator = Address(self.client.address)
        self.options = options or SettlementOptions()
        self.on_step = on_step
        self.lineage = lineage
        self._delay: int | None = None  # the ledger's challenge delay, read once
        self._export: tuple[tuple[int, str | None, str | None], bytes] | None = None
        self.proofs = EpochProofs(log_)
        self.domain = RecordDomain(self.client.chain_id, contracts.ledger.address, self.operator)

    # ----- public

    def due(self, now: float | None = None) -> bool:
        """True when an epoch should close: `epoch_records` pending, or the oldest pending is `epoch_seconds` old."""
        count, oldest = self.log.pending()
        if count == 0:
            return False
        if count >= self.options.epoch_records:
            return True
        return oldest is not None and (now or time.time()) - oldest >= self.options.epoch_seconds

    def tick(self, now: float | None = None) -> list[EpochOutcome]:
        """Resume unfinished epochs, then close and settle one if `due`. Returns the epochs confirmed."""
        done = self.resume()
        if self.due(now):
            outcome = self.settle()
            if outcome is not None:
                done.append(outcome)
        return done

    def resume(self) -> list[EpochOutcome]:
        """Take in the chain's revocations, then finish every epoch the log has not confirmed, oldest first."""
        self.sync_revocations()
        return [self.process(row.epoch) for row in self.log.unfinished()]

    def sync_revocations(self) -> list[int]:
        """Mark the log's sent epochs that the chain revoked as `revoked` (quarantining their records) and reopen a
        built epoch that would have built on them. Returns the epochs newly marked.

        Only a pending epoch can be revoked, so once the log's latest sent epoch is older than the challenge delay
        (plus REVOCABLE_MARGIN for the host's clock against the chain's) nothing is read from the chain: an idle
        tick costs no RPC call."""
        ledger = self.contracts.ledger
        last = self.log.last_sent()
        if last is None:
            return []
        if self._delay is None:
            self._delay = ledger.challenge_delay()  # immutable
        signed = last.submitted_at if last.submitted_at is not None else last.closed_at
        if time.time() > signed + self._delay + REVOCABLE_MARGIN:
            return []
        tip = ledger.live_tip(self.operator)
        sent = [r for r in self.log.epochs_after(tip) if r.state in (SUBMITTED, CONFIRMED)]
        if not sent:
            return []
        chain_last = ledger.last_epoch(self.operator)
        newly: list[int] = []
        for row in sent:
            if row.epoch <= chain_last and ledger.is_revoked(self.operator, row.epoch):
                if row.state == SUBMITTED:  # ours landed and was revoked: the stored transaction is done
                    self.log.mark_confirmed(row.epoch, block_number=int(self.w3.eth.block_number))
                self.log.mark_revoked(row.epoch, f"revoked on chain (live tip is epoch {tip}); records quarantined")
                newly.append(row.epoch)
        if newly:
            log.warning("epochs %s revoked on chain: their records are quarantined (review them, then "
                        "`loraledger epoch resettle N`); the next epoch builds on epoch %d", newly, tip)
            for row in self.log.unfinished():
                if row.state == BUILT and row.epoch > newly[0]:
                    self.log.reopen(row.epoch)
        return newly

    def settle(self) -> EpochOutcome | None:
        """Finish unfinished epochs, then close everything pending (up to max_epoch_records) into a new epoch and
        settle it. None when nothing was pending."""
        self.resume()
        n = self.log.close_epoch(max_records=self.options.max_epoch_records)
        if n is None:
            return None
        self._step("closed", n)
        return self.process(n)

    def run(self, stop: threading.Event, interval: float = 1.0) -> None:
        """`tick` every `interval` s until `stop` is set; a SettlementError ends the loop (and propagates)."""
        while not stop.is_set():
            self.tick()
            stop.wait(interval)

    def process(self, n: int) -> EpochOutcome:
        """Drive epoch `n` to confirmed from whatever state the log holds (it may be renumbered on the way, when
        the chain holds revoked epochs this log did not build)."""
        resends = 0
        while True:
            row = self._row(n)
            if row.state == OPEN:
                self._build(row)
            elif row.state == BUILT:
                if resends > self.options.max_resends:
                    raise SettlementError(f"epoch {n}: sent {resends} times without landing; giving up for now")
                resends += 1
                n = self._submit(row)
            elif row.state == SUBMITTED:
                self._reconcile(row)
            else:
                assert row.state == CONFIRMED
                assert row.records_root and row.rewards_root and row.cumulative_total is not None
                return EpochOutcome(n, row.record_count, row.records_root, row.rewards_root, row.cumulative_total,
                                    row.tx_hash, row.confirmed_block)

    # ----- steps

    def _row(self, n: int) -> EpochRow:
        row = self.log.epoch(n)
        if row is None:
            raise SettlementError(f"epoch {n} is not in the record log")
        return row

    def _step(self, step: str, n: int) -> None:
        log.info("epoch %d: %s", n, step)
        if self.on_step is not None:
            self.on_step(step, n)

    def snapshot_terms(self, records: list[AttributionRecord]) -> tuple[EpochTerms, int]:
        """Shares, adapter owners/fees and contributor payouts/suspensions as the chain holds them now."""
        c = self.contracts
        block = int(self.client.read(lambda: self.w3.eth.block_number, "eth_blockNumber"))
        s = c.ledger.shares()
        adapters: dict[AdapterId, AdapterTerms] = {}
        for i in sorted({i for r in records for i in r.adapter_ids}):
            info = c.adapters.get_adapter(i)
            adapters[i] = AdapterTerms(info.owner, int(info.fee_per_token))
        contributors: dict[Address, ContributorStatus] = {}
        for a in sorted({a for r in records for a, _ in r.contributors}):
            if not c.contributors.is_registered(a):
                log.warning("contributor %s is not registered: its share goes to the record's other contributors", a)
                contributors[a] = ContributorStatus(a, False)
                continue
            cinfo = c.contributors.get_contributor(a)
            contributors[a] = ContributorStatus(as_address(cinfo.payout), not cinfo.suspended)
        terms = EpochTerms(Shares(s.data_bps, s.adapter_owner_bps, s.operator_bps), self.operator, adapters,
                           contributors)
        return terms, block

    def _build(self, row: EpochRow) -> None:
        n = row.epoch
        records = self.log.records_of_epoch(n)
        terms, block = self.snapshot_terms(records)
        amounts = epoch_amounts(records, terms)
        previous = self.log.cumulative_balances(n - 1) if n > 1 else {}  # live epochs only
        cumulative = add_cumulative(previous, amounts)
        rtree = records_tree(records, self.domain)
        wtree = rewards_tree(cumulative, self.operator)
        total = sum(int(v) for _, v in wtree.values)
        assert total == sum(int(v) for v in previous.values()) + int(row.fees_total)
        terms_json = terms_to_json(terms, block, self.domain)
        if self.lineage is not None:
            lineage = {str(i): dict(doc) for i in sorted(terms.adapters) if (doc := self.lineage(int(i))) is not None}
            if lineage:
                terms_json["lineage"] = lineage
        self.log.mark_built(n, records_root=Bytes32(rtree.root_hex), rewards_root=Bytes32(wtree.root_hex),
                            cumulative_total=total, terms=terms_json, amounts=amounts,
                            cumulative=cumulative)
        self._step("built", n)

    def _onchain(self, row: EpochRow) -> EpochInfo | None:
        """The ledger's epoch `row.epoch` of this operator if it exists; ForeignEpochError if its roots differ."""
        last = self.contracts.ledger.last_epoch(self.operator)
        if last < row.epoch:
            return None
        info = self.contracts.ledger.epoch(self.operator, row.epoch)
        if (info.records_root, info.rewards_root) != (row.records_root, row.rewards_root):
            raise self._foreign(row.epoch, last, info)
        return info

    def _foreign(self, n: int, last: int, info: EpochInfo) -> ForeignEpochError:
        """The error for epochs n..last on chain that this log did not build: what they are, and the ways out."""
        ledger = self.contracts.ledger
        effective = ledger.effective_at(self.operator, n)
        now = int(self.w3.eth.get_block("latest")["timestamp"])
        when = (f"takes effect at {effective} ({effective - now} s from now)" if effective > now
                else f"in effect since {effective}")
        return ForeignEpochError(
            f"the ledger holds epoch {n}{f'..{last}' if last > n else ''} of operator {self.operator} that this "
            f"log did not build: epoch {n} has records root {info.records_root} ({info.record_count} records), "
            f"rewards root {info.rewards_root}, cumulative total {int(info.cumulative_total)}, export sha256 "
            f"{info.export_hash}, submitted at {info.submitted_at}, {when}; this log built {n} with "
            f"{self._row(n).records_root}. This node will not submit on top of it. Ways out: "
            f"(1) revoke: if it is not yours and still pending, have the guardian run `loraledger epoch revoke "
            f"--operator {self.operator} {n}`; this node then numbers its own epoch after it and goes on; "
            f"(2) adopt: if another process of yours built it, `loraledger epoch adopt {n} --export FILE` takes its "
            f"published export (checked against the chain's export sha256) into this log; "
            f"(3) resettle: once an epoch of ours is revoked, `loraledger epoch resettle N` puts its records back.")

    def export_bytes(self, row: EpochRow) -> bytes:
        """The canonical export of built epoch `row` (what its exportHash hashes), kept for the last epoch asked:
        the submission and the publisher share one rebuild."""
        key = (row.epoch, row.records_root, row.rewards_root)
        if self._export is None or self._export[0] != key:
            self._export = (key, canonical_export(self.log, row.epoch))
        return self._export[1]

    def _submit(self, row: EpochRow) -> int:
        """Send a built epoch (or adopt it if the chain already has our roots). Returns the epoch's number, which
        changes when the chain holds revoked epochs this log did not build (it is renumbered after them)."""
        n = row.epoch
        ledger = self.contracts.ledger
        last = ledger.last_epoch(self.operator)
        if last >= n:
            info = ledger.epoch(self.operator, n)
            if (info.records_root, info.rewards_root) == (row.records_root, row.rewards_root):
                self.log.mark_confirmed(n, block_number=int(self.w3.eth.block_number))
                self._step("confirmed", n)
                return n
            if all(ledger.is_revoked(self.operator, k) for k in range(n, last + 1)):
                self.log.renumber(n, last + 1)  # our epoch goes after them; rebuilt (its leaves name the epoch)
                for k in range(n, last + 1):
                    self.log.add_foreign_revoked(k, "an epoch this log did not build, revoked on chain")
                log.warning("epochs %d..%d on chain were not built by this log and are revoked; epoch %d is "
                            "renumbered %d", n, last, n, last + 1)
                return last + 1
            raise self._foreign(n, last, info)
        if last != n - 1:
            raise SettlementError(
                f"the ledger's last epoch for operator {self.operator} is {last}, but the log is about to submit "
                f"epoch {n}: the log and the chain disagree (a fresh log against a used operator key, or the "
                "wrong deployment)")
        if ledger.paused():
            raise SettlementError(f"epoch {n}: epoch submission is paused on the ledger; records are kept, "
                                  "settle again once it is unpaused")
        assert row.cumulative_total is not None and row.records_root and row.rewards_root
        self._ensure_funding(n, int(row.cumulative_total))
        fn = ledger.contract.functions.submitEpoch(
            n, bytes32_to_bytes(row.records_root), row.record_count, bytes32_to_bytes(row.rewards_root),
            bytes32_to_bytes(sha256_hex(self.export_bytes(row))), int(row.cumulative_total),
            previous_live_epoch(self.log, n))
        try:
            tx = self.client.build(fn)
        except ContractRevertError as e:
            self.log.mark_failed(n, str(e))
            raise SettlementError(f"epoch {n}: submitEpoch would revert ({e}); records are kept in the log") from e
        with self.client.nonces.lock:
            nonce = self.client.nonces.reserve()
            self._sign_and_send(n, tx, nonce)
        return n

    def _ensure_funding(self, n: int, cumulative_total: int) -> None:
        """Approve the ledger for what submitEpoch will pull (cumulativeTotal - fundedTotal), checking the balance."""
        c = self.contracts
        held = int(c.ledger.funded_total(self.operator)) - int(c.ledger.refunded_total(self.operator))
        need = cumulative_total - held
        if need <= 0:
            return
        have = int(c.token.balance_of(self.operator))
        if have < need:
            raise SettlementError(f"epoch {n}: operator {self.operator} holds {have} reward tokens but the epoch "
                                  f"pulls {need}; fund it and settle again (records are kept)")
        if int(c.token.allowance(self.operator, c.ledger.address)) < need:
            c.token.approve(c.ledger.address, need)
        self._step("approved", n)

    def _sign_and_send(self, n: int, tx: dict[str, Any], nonce: int) -> None:
        """Sign, store (hash, nonce, raw) in the log, then broadcast: the log knows the tx before the chain does."""
        signed = self.client.account.sign_transaction({**tx, "nonce": nonce})
        tx_hash = TxHash("0x" + bytes(signed.hash).hex())
        raw = "0x" + bytes(signed.raw_transaction).hex()
        self.log.mark_submitted(n, tx_hash=tx_hash, nonce=nonce, raw_tx=raw)
        self._step("signed", n)
        self._broadcast(n, raw, tx_hash)
        self._step("sent", n)

    def _broadcast(self, n: int, raw: str, tx_hash: TxHash) -> str | None:
        """Hand `raw` to the node. Returns None on success, else the node's message for the caller to judge
        (connection errors are logged and left to reconciliation)."""
        try:
            self.w3.eth.send_raw_transaction(HexBytes(raw))
            return None
        except Web3RPCError as e:
            msg = _node_message(e)
            if any(m in msg for m in ("already known", "already imported", "known transaction")):
                return None
            log.warning("epoch %d: node refused %s: %s", n, tx_hash, msg)
            return msg
        except CONNECTION_ERRORS as e:
            log.warning("epoch %d: could not reach the node to send %s (%s); will reconcile by hash", n, tx_hash, e)
            return None

    def _receipt(self, tx_hash: str) -> Any:
        try:
            return self.w3.eth.get_transaction_receipt(HexBytes(tx_hash))
        except TransactionNotFound:
            return None

    def _pending_tx(self, tx_hash: str) -> bool:
        try:
            self.w3.eth.get_transaction(HexBytes(tx_hash))
            return True
        except TransactionNotFound:
            return False

    def _reconcile(self, row: EpochRow) -> None:
        """Drive a submitted epoch to confirmed (or back to built), never double-sending (module docstring)."""
        n = row.epoch
        assert row.tx_hash is not None and row.raw_tx is not None and row.tx_nonce is not None
        opts = self.options
        deadline = time.monotonic() + opts.receipt_timeout
        onchain_since: dict[int, int] = {}  # epoch -> head when the ledger first showed it without a receipt
        while True:
            row = self._row(n)
            if row.state != SUBMITTED:
                return
            assert row.tx_hash is not None and row.raw_tx is not None and row.tx_nonce is not None
            receipt = self._receipt(row.tx_hash)
            if receipt is not None:
                if receipt["status"] != 1:
                    try:
                        self.client.wait(row.tx_hash, timeout=0)
                        detail = "reverted"
                    except ContractRevertError as e:
                        detail = str(e)
                    self.log.mark_failed(n, detail)
                    self.client.nonces.invalidate()
                    raise SettlementError(f"epoch {n}: submitEpoch transaction {row.tx_hash} reverted: {detail}. "
                                          "The records are kept; fix the cause and run `loraledger epoch settle`.")
                if self._final(receipt):
                    if self._onchain(row) is None:
                        raise SettlementError(f"epoch {n}: receipt of {row.tx_hash} succeeded but the ledger has "
                                              "no such epoch")
                    self.log.mark_confirmed(n, block_number=int(receipt["blockNumber"]))
                    self._step("confirmed", n)
                    return
            elif self._onchain(row) is not None:  # a replacement we signed earlier (or a re-inclusion) landed
                # no receipt to measure depth by: count `confirmations` blocks from when we first saw it there
                head = int(self.w3.eth.block_number)
                seen = onchain_since.setdefault(n, head)
                if head - seen >= opts.confirmations:
                    self.log.mark_confirmed(n, block_number=seen)
                    self._step("confirmed", n)
                    return
            elif self._pending_tx(row.tx_hash):
                if self._fill_nonce_gap(row):
                    pass  # it waited behind a nonce no transaction of ours held; it can land now
                elif row.submitted_at is not None and time.time() - row.submitted_at >= opts.replace_after:
                    self._replace(row, "pending too long")
            else:
                mined_nonce = int(self.w3.eth.get_transaction_count(self.operator, "latest"))
                if mined_nonce > row.tx_nonce:
                    # Another transaction took our nonce and the epoch is not on chain: ours can never land.
                    log.warning("epoch %d: nonce %d was used by another transaction; sending anew", n, row.tx_nonce)
                    self.log.mark_failed(n, f"nonce {row.tx_nonce} taken by another transaction; resending")
                    self.client.nonces.resync()
                    return
                self._fill_nonce_gap(row, mined_nonce)
                err = self._broadcast(n, row.raw_tx, row.tx_hash)
                if err is not None:
                    if "underpriced" in err or "fee" in err or "base fee" in err:
                        self._replace(row, err)
                    else:
                        self.log.mark_failed(n, err)
                        raise SettlementError(f"epoch {n}: the node refuses the submitEpoch transaction: {err}")
                else:
                    log.info("epoch %d: re-broadcast %s (nonce %d)", n, row.tx_hash, row.tx_nonce)
            if time.monotonic() >= deadline:
                raise SettlementError(
                    f"epoch {n}: transaction {row.tx_hash} not final after {opts.receipt_timeout:g}s; the epoch "
                    "stays submitted and the next `loraledger epoch settle` picks it up")
            time.sleep(opts.poll_interval)

    def _fill_nonce_gap(self, row: EpochRow, mined: int | None = None) -> bool:
        """When the stored transaction waits behind nonces that no transaction of ours holds any more (a reorg
        took the approve sent before it, or the pool dropped one), fill them: the ledger's approval when the
        allowance went too, 0-value transfers to ourselves otherwise. The stored transaction itself can then
        land; it is never re-signed under another nonce. True when something was sent."""
        assert row.tx_nonce is not None and row.cumulative_total is not None
        if mined is None:
            mined = int(self.w3.eth.get_transaction_count(self.operator, "latest"))
        if mined >= row.tx_nonce:
            return False
        first_free = max(mined, int(self.w3.eth.get_transaction_count(self.operator, "pending")))
        if first_free >= row.tx_nonce:
            return False  # the nonces below ours are held by pending transactions: they land first
        c = self.contracts
        need = int(row.cumulative_total) - (int(c.ledger.funded_total(self.operator))
                                            - int(c.ledger.refunded_total(self.operator)))
        approve = need > 0 and int(c.token.allowance(self.operator, c.ledger.address)) < need
        log.warning("epoch %d: %s (nonce %d) waits behind nonces %d..%d that no transaction of ours holds (a reorg "
                    "or a dropped transaction); filling them%s", row.epoch, row.tx_hash, row.tx_nonce, first_free,
                    row.tx_nonce - 1, " (the approval included)" if approve else "")
        with self.client.nonces.lock:
            for k in range(first_free, row.tx_nonce):
                if approve and k == row.tx_nonce - 1:
                    tx = self.client.build(c.token.contract.functions.approve(c.ledger.address, need))
                else:
                    to_self: TxParams = {"to": self.operator}
                    tx = self.client.build(to_self, gas=21_000)
                signed = self.client.account.sign_transaction({**tx, "nonce": k})
                err = self._broadcast(row.epoch, "0x" + bytes(signed.raw_transaction).hex(),
                                      TxHash("0x" + bytes(signed.hash).hex()))
                if err is not None:
                    break  # the nonce is taken after all (the next round sees it) or the node refuses: retry later
            self.client.nonces.invalidate()
        return True

    def _final(self, receipt: Any) -> bool:
        """True when the receipt's block is `confirmations` deep and still canonical."""
        if self.options.confirmations == 0:
            return True
        head = int(self.w3.eth.block_number)
        if head - int(receipt["blockNumber"]) < self.options.confirmations:
            return False
        block = self.w3.eth.get_block(int(receipt["blockNumber"]))
        return bytes(block["hash"]) == bytes(receipt["blockHash"])

    def _replace(self, row: EpochRow, reason: str) -> None:
        """Re-sign the stored transaction with the same nonce and fees bumped by fee_bump_percent (at least the
        current market fees), store it, broadcast it."""
        assert row.raw_tx is not None and row.tx_nonce is not None
        old = _decode_type2(row.raw_tx)
        bump = 100 + self.options.fee_bump_percent
        fresh = self.client.fee_fields()
        tip = max(math.ceil(old["maxPriorityFeePerGas"] * bump / 100), int(fresh.get("maxPriorityFeePerGas", 0)))
        max_fee = max(math.ceil(old["maxFeePerGas"] * bump / 100), int(fresh.get("maxFeePerGas", 0)), tip)
        tx = {"to": as_address(old["to"]), "data": old["data"], "value": old["value"], "gas": old["gas"],
              "chainId": old["chainId"], "maxPriorityFeePerGas": tip, "maxFeePerGas": max_fee, "type": 2}
        log.warning("epoch %d: replacing %s (nonce %d, %s) with fees %d/%d", row.epoch, row.tx_hash, row.tx_nonce,
                    reason, tip, max_fee)
        self._sign_and_send(row.epoch, tx, row.tx_nonce)
