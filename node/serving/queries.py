"""Read-side queries the Attribution service answers: records with their proofs, reward proofs, epochs.

Everything is read from the record log and the epoch trees rebuilt from it (`loraledger.node.ledger.epochs`),
plus the matched spans of token-level attribution.
"""

from __future__ import annotations

from typing import Any

from loraledger.node.ledger.record_log import RecordLog
from loraledger.node.serving.token_attribution import SpanStore
from loraledger.node.serving.views import EpochView, RecordView, RewardProofView
from loraledger.node.types import as_address


class LogQueries:
    """The node's `AttributionQueries` over its record log, the epoch trees built from it (the settler's data)
    and the span store."""

    def __init__(self, log_: RecordLog, operator: str = "", spans: SpanStore | None = None,
                 ledger: Any = None) -> None:
        from loraledger.node.ledger.epochs import EpochProofs

        self.log = log_
        self.proofs = EpochProofs(log_)
        self._operator = operator
        self.spans = spans
        self.ledger = ledger  # LedgerClient for reads (the root in effect, claimed); None without a chain

    @property
    def operator(self) -> str:
        return self._operator

    def record(self, request_id: str) -> RecordView | None:
        rec = self.log.get_record(request_id)
        if rec is None:
            return None
        proof = self.proofs.record_proof(request_id)
        row = self.log.epoch(rec.epoch) if rec.epoch else None
        return RecordView(
            record=rec.to_json(), leaf=proof.leaf if proof else "0x" + rec.content_hash().hex(),
            settled=row is not None and row.state == "confirmed",
            records_root=proof.records_root if proof else "", proof=tuple(proof.proof) if proof else (),
            spans=self.spans.get(rec.request_id) if self.spans is not None else (),
        )

    def reward_proof(self, account: str, epoch: int = 0) -> RewardProofView | None:
        """The proof under the epoch in effect on chain (or `epoch`), with claimable and pending amounts; without
        a chain, the proof under the latest confirmed epoch (or `epoch`). None when the account has nothing."""
        from loraledger.node.errors import NotFoundError
        from loraledger.node.ledger.claims import ClaimError, LogProofSource, reward_status

        a = as_address(account)  # ConfigError for a malformed address
        source = LogProofSource(self.log, self.proofs)
        if self.ledger is None:
            p = source.reward_proof(a, epoch or None)
            if p is None:
                return None
            return RewardProofView(p.operator, p.account, int(p.cumulative_amount), p.epoch, p.rewards_root,
                                   tuple(p.proof), latest_epoch=source.latest_epoch() or 0)
        latest = source.latest_epoch()
        if latest is None or source.reward_proof(a, latest) is None:
            return None
        try:
            st = reward_status(self.ledger, source, a, operator=self._operator or None, epoch=epoch or None)
        except ClaimError as e:
            raise NotFoundError(str(e)) from e
        p = st.proof
        return RewardProofView(st.operator, st.account, int(st.cumulative_amount), st.epoch,
                               p.rewards_root if p is not None else "", tuple(p.proof) if p is not None else (),
                               st.epoch_in_effect, st.in_effect, st.effective_at, int(st.claimed),
                               int(st.claimable_now), st.latest_epoch, int(st.pending), st.pending_effective_at)

    def epochs(self, limit: int) -> list[EpochView]:
        rows = self.log.epochs()
        if limit > 0:
            rows = rows[-limit:]
        return [EpochView(r.epoch, r.records_root or "", r.record_count, r.rewards_root or "",
                          int(r.cumulative_total or 0), r.state, r.tx_hash or "") for r in rows]
