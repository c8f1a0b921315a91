"""The settlement loop: the node's background thread that closes and settles epochs while it serves.

    every `interval` s:  Settler.tick()                       (resume; close + settle an epoch when due)
    after each epoch:    claimMany for accounts owed > push_threshold (when push_threshold > 0), under the
                         operator's epoch in effect
    every FUNDS_EVERY s: the operator's ETH and tokens against what settling takes (warnings when low)

The loop never stops on its own. Whatever a tick raises, the loop names the cause, marks settlement degraded,
and retries after a backoff that doubles from `interval` up to `max_backoff`:

    cause            what it means                                        resolves when
    token_shortfall  the operator holds fewer reward tokens than the      tokens arrive (transfer or mint)
                     epoch pulls
    eth_shortfall    the operator cannot pay gas for submitEpoch          ETH arrives
    rpc_unreachable  the JSON-RPC endpoint does not answer                it answers again
    rate_limited     the endpoint refuses with 429 / "rate limit"         the limit lifts
    tx_pending       the submitted transaction is not final in time       it lands (the settler re-prices it
                     (a fee spike, a congested chain)                     every `replace_after` s)
    log_busy         the record log refused a write (SQLite lock)         the next try
    rejected         the chain refuses the epoch (a revert, log and       the operator acts (the log says how)
                     chain disagree, ledger paused)

Every step of the settler resumes from the log, so a retry after any of these picks up exactly where the
failed one stopped: a stored transaction is reconciled by its hash, never sent twice. `health()` says
`ok`, `degraded` (failing, retrying) or `stuck` (a shortfall or a rejection that needs the operator, or
STUCK_AFTER failures in a row); the HTTP `/health` and the metrics show it.
"""

from __future__ import annotations

import dataclasses
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from typing import Any

from loraledger.node.config import NodeConfig
from loraledger.node.errors import ChainError
from loraledger.node.ledger.funding import LOW_EPOCHS
from loraledger.node.ledger.record_log import RecordLog
from loraledger.node.serving.settler_role import SettlerRole

log = logging.getLogger(__name__)

MAX_BACKOFF = 60.0  # seconds between retries at most
STUCK_AFTER = 5  # failures in a row after which settlement counts as stuck whatever the cause
FUNDS_EVERY = 60.0  # seconds between funding checks while all is well
_NEEDS_OPERATOR = ("token_shortfall", "eth_shortfall", "rejected")
_RATE_MARKERS = ("429", "rate limit", "too many requests", "rate-limit", "exceeded the quota", "capacity exceeded")
_FUNDS_MARKERS = ("insufficient funds", "gas required exceeds", "exceeds allowance", "out of gas: not enough")


@dataclass(frozen=True)
class SettlementHealth:
    """The loop's state: `ok`, `degraded` or `stuck`; the cause and message of the last failure."""

    state: str
    cause: str
    message: str
    failures: int  # in a row
    since: float | None  # wall time of the first failure in a row
    next_retry_at: float | None
    last_ok_at: float | None
    epochs_confirmed: int
    warnings: tuple[str, ...] = ()  # funding warnings of the last check
    low_eth: bool = False  # the operator's ETH lasts fewer than LOW_EPOCHS epochs (or not one)
    low_tokens: bool = False  # its reward tokens do

    def to_dict(self) -> dict[str, Any]:
        return {"state": self.state, "cause": self.cause, "message": self.message, "failures": self.failures,
                "since": self.since, "next_retry_at": self.next_retry_at, "last_ok_at": self.last_ok_at,
                "epochs_confirmed": self.epochs_confirmed, "warnings": list(self.warnings),
                "low_eth": self.low_eth, "low_tokens": self.low_tokens}


class SettlementLoop:
    """The node's settlement thread: every `interval` s, `Settler.tick()` (resume unfinished epochs; close and
    settle one when `epoch_seconds` / `epoch_records` say so); after each confirmed epoch, when
    `settlement.push_threshold` > 0, `claimMany` for every account owed more than it under the epoch in effect.
    Failures back off and retry (module docstring); `health()` reports them."""

    def __init__(self, records: RecordLog, contracts: Any, cfg: NodeConfig, role: SettlerRole | None = None,
                 *, max_backoff: float = MAX_BACKOFF, receipt_timeout: float = 120.0,
                 funds_every: float = FUNDS_EVERY, lineage: Any = None) -> None:
        """`role`: in a fleet on one PostgreSQL log, the settler role; the loop then ticks only while this node
        holds it (`SettlerRole.guard`), and the log's epoch transitions are fenced by it. `lineage`: the catalog's
        `lineage_terms`, recorded in each epoch's terms for auditors."""
        from loraledger.node.ledger.publish import ExportPublisher
        from loraledger.node.ledger.records import RecordDomain
        from loraledger.node.ledger.settler import SettlementOptions, Settler

        s = cfg.settlement
        chain_id = int(contracts.ledger.client.chain_id)
        domain = RecordDomain(chain_id, contracts.ledger.address, contracts.ledger.client.address)
        self.publisher = ExportPublisher.for_template(s.export_uri, domain)
        self.settler = Settler(records, contracts, SettlementOptions(
            epoch_seconds=s.epoch_seconds, epoch_records=s.epoch_records, receipt_timeout=receipt_timeout,
            confirmations=cfg.chain.confirmations_for(chain_id)), lineage=lineage, on_step=self._on_step)
        self.records = records
        self.role = role
        if role is not None:
            records.fence = role.fence
            role.on_acquire = self.settler.client.nonces.invalidate  # another node may have sent meanwhile
        self.push_threshold = s.push_threshold
        self.interval = min(1.0, s.epoch_seconds / 2)
        self.max_backoff = max(self.interval, max_backoff)
        self.funds_every = funds_every
        self.error: BaseException | None = None  # the last failure (kept until a tick succeeds)
        self.epochs_confirmed = 0
        self._health = SettlementHealth("ok", "", "", 0, None, None, None, 0)
        self._funds_at = -1e18
        self._pushed_epoch = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loraledger-settlement", daemon=True)

    def _on_step(self, step: str, n: int) -> None:
        """Once an epoch's submission is signed, publish its export where `[settlement] export_uri` says (a local
        template): the same bytes the transaction's exportHash hashes, before the transaction is broadcast."""
        if step == "signed" and self.publisher is not None:
            row = self.records.epoch(n)
            try:
                self.publisher.publish(self.records, n, self.settler.export_bytes(row) if row else None)
            except OSError as e:  # the epoch still settles; auditors can fetch it over GetEpochExport meanwhile
                log.error("epoch %d: could not publish its export to %s (%s); auditors will not find it there",
                          n, self.publisher.path(n), e)

    def start(self) -> None:
        self._thread.start()

    def health(self) -> SettlementHealth:
        with self._lock:
            return self._health

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                done = self.settler.tick() if self.role is None else self.role.guard(self.settler.tick)
                self.epochs_confirmed += len(done)
                if done and self.push_threshold > 0:
                    self._push()
                self._ok()
                delay = self.interval
            except sqlite3.OperationalError as e:
                # SQLite refuses an epoch transition whose read snapshot went stale under a concurrent append
                # ("database is locked"). Every step is resumable from the log; a transaction signed but not
                # stored was never broadcast, so the nonce counter is re-read from the node before the retry.
                self.settler.client.nonces.invalidate()
                delay = self._failed(e, "log_busy", f"record log busy ({e})")
            except Exception as e:  # noqa: BLE001 - the loop must outlive any failure; each is named and retried
                cause, message = self.diagnose(e)
                delay = self._failed(e, cause, message)
            self._check_funds()
            self._stop.wait(delay)

    # ----- health

    def _ok(self) -> None:
        with self._lock:
            h = self._health
            if h.failures:
                log.info("settlement recovered after %d failure(s) (%s)", h.failures, h.cause)
            self.error = None
            self._health = dataclasses.replace(h, state="ok", cause="", message="", failures=0, since=None,
                                               next_retry_at=None, last_ok_at=time.time(),
                                               epochs_confirmed=self.epochs_confirmed)

    def _failed(self, e: BaseException, cause: str, message: str) -> float:
        with self._lock:
            h = self._health
            failures = h.failures + 1
            delay = min(self.max_backoff, self.interval * 2 ** (failures - 1))
            state = "stuck" if cause in _NEEDS_OPERATOR or failures >= STUCK_AFTER else "degraded"
            self.error = e
            self._health = dataclasses.replace(h, state=state, cause=cause, message=message, failures=failures,
                                               since=h.since or time.time(), next_retry_at=time.time() + delay,
                                               epochs_confirmed=self.epochs_confirmed)
        log.log(logging.WARNING if failures < STUCK_AFTER else logging.ERROR,
                "settlement %s (%s, failure %d in a row): %s; retrying in %.1f s (records keep being logged)",
                state, cause, failures, message, delay)
        self._funds_at = -1e18  # re-read the balances on the next pass: they name shortfalls
        return delay

    def diagnose(self, e: BaseException) -> tuple[str, str]:
        """(cause, message) of a failed tick: the real reason, read from the error and, where it may be a
        shortfall, from the operator's balances on chain."""
        from loraledger.node.chain.client import CONNECTION_ERRORS
        from loraledger.node.ledger.funding import funding_report

        text = _chain_text(e)
        low = text.lower()
        if any(m in low for m in _RATE_MARKERS):
            return "rate_limited", f"the RPC endpoint rate-limits this node: {text}"
        if _is_connection(e, CONNECTION_ERRORS):
            return "rpc_unreachable", f"the RPC endpoint does not answer: {text}"
        try:
            report = funding_report(self.settler.contracts, self.records)
        except (ChainError, *CONNECTION_ERRORS) as read_error:  # type: ignore[misc]
            return "rpc_unreachable", f"{text} (and the chain cannot be read: {read_error})"
        if report.eth_short or (any(m in low for m in _FUNDS_MARKERS)
                                and report.eth_balance < report.eth_per_epoch * 2):
            return "eth_shortfall", (
                f"operator {report.operator} holds {report.eth_balance} wei of ETH; one epoch needs about "
                f"{report.eth_per_epoch} wei of gas at {report.max_fee_per_gas} wei/gas: send ETH to "
                f"{report.operator} (node error: {text})")
        if report.token_short:
            return "token_shortfall", (
                f"operator {report.operator} holds {report.token_balance} reward tokens but the next epoch pulls "
                f"{report.next_pull}: transfer or mint tokens to {report.operator}")
        if "not final after" in low or "no receipt" in low or "pending too long" in low:
            return "tx_pending", (f"{text}; the settler re-prices the transaction with the same nonce every "
                                  f"{self.settler.options.replace_after:g} s until it lands")
        from loraledger.node.ledger.epochs import SettlementError

        if isinstance(e, SettlementError):
            return "rejected", text
        return "error", f"{type(e).__name__}: {text}"

    def _check_funds(self) -> None:
        """Every `funds_every` s (and after a failure): warn when the operator's ETH or tokens run low."""
        if time.monotonic() - self._funds_at < self.funds_every:
            return
        self._funds_at = time.monotonic()
        from loraledger.node.chain.client import CONNECTION_ERRORS
        from loraledger.node.ledger.funding import funding_report

        try:
            report = funding_report(self.settler.contracts, self.records)
        except (ChainError, *CONNECTION_ERRORS) as e:  # type: ignore[misc]
            log.debug("funding check: chain unreachable (%s)", e)
            return
        for w in report.warnings:
            log.warning("funding: %s", w)
        left, eth_left = report.epochs_left, report.eth_epochs_left
        with self._lock:
            self._health = dataclasses.replace(
                self._health, warnings=tuple(report.warnings),
                low_eth=report.eth_short or eth_left < LOW_EPOCHS,
                low_tokens=report.token_short or (left is not None and left < LOW_EPOCHS))

    # ----- claims

    def _push(self) -> None:
        """claimMany under the operator's epoch in effect, once per epoch that takes effect."""
        from loraledger.node.ledger.claims import push_claims

        proofs = self.settler.proofs
        n = self.settler.contracts.ledger.root_in_effect(self.settler.operator).epoch
        if n == 0 or n <= self._pushed_epoch:
            return
        values = proofs.trees(n).rewards_tree.values
        found = [proofs.reward_proof(str(account), n) for account, _ in values]
        res = push_claims(self.settler.contracts.ledger, [p for p in found if p is not None],
                          threshold=self.push_threshold)
        self._pushed_epoch = n
        log.info("epoch %d: pushed claims to %d account(s) in %d transaction(s)", n, len(res.paid),
                 len(res.tx_hashes))

    def stop(self) -> None:
        """Ask the loop to stop and wait for it (a transaction in flight is driven to its end first)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if self.role is not None:
            self.role.release()


def _chain_text(e: BaseException) -> str:
    """The error's message with the node's own words (a JSON-RPC error's message, an HTTP status)."""
    parts = [str(e)]
    cause = e.__cause__ or e.__context__
    while cause is not None and len(parts) < 4:
        if str(cause) and str(cause) not in parts[-1]:
            parts.append(str(cause))
        cause = cause.__cause__ or cause.__context__
    return ": ".join(parts)


def _is_connection(e: BaseException, kinds: tuple[type[BaseException], ...]) -> bool:
    cur: BaseException | None = e
    while cur is not None:
        if isinstance(cur, kinds):
            return True
        cur = cur.__cause__ or cur.__context__
    return False
