"""Read-side queries the Attribution service answers: records with their proofs, reward proofs, epochs.

Everything is read from the record log and the epoch trees rebuilt from it (`loraledger.node.ledger.epochs`),
plus the matched spans of token-level attribution.
"""

from __future__ import annotations

from loraledger.node.ledger.record_log import RecordLog
from loraledger.node.serving.token_attribution import SpanStore
from loraledger.node.serving.views import EpochView, RecordView, RewardProofView
from loraledger.node.types import as_address


class LogQueries:
    """The node's `AttributionQueries` over its record log, the epoch trees built from it (the settler's data)
    and the span store."""

    def __init__(self, log_: RecordLog, operator: str = "", spans: SpanStore | None = None) -> None:
        from loraledger.node.ledger.epochs import EpochProofs

        self.log = log_
        self.proofs = EpochProofs(log_)
        self._operator = operator
        self.spans = spans

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
            record=rec.to_json(), leaf="0x" + rec.leaf_hash().hex(),
            settled=row is not None and row.state == "confirmed",
            records_root=proof.records_root if proof else "", proof=tuple(proof.proof) if proof else (),
            spans=self.spans.get(rec.request_id) if self.spans is not None else (),
        )

    def reward_proof(self, account: str) -> RewardProofView | None:
        p = self.proofs.reward_proof(as_address(account))  # ConfigError for a malformed address
        if p is None:
            return None
        return RewardProofView(p.operator, p.account, int(p.cumulative_amount), p.epoch, p.rewards_root,
                               tuple(p.proof))

    def epochs(self, limit: int) -> list[EpochView]:
        rows = self.log.epochs()
        if limit > 0:
            rows = rows[-limit:]
        return [EpochView(r.epoch, r.records_root or "", r.record_count, r.rewards_root or "",
                          int(r.cumulative_total or 0), r.state, r.tx_hash or "") for r in rows]
