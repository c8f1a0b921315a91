"""The record sink: one `AttributionRecord` per finished request through on-chain adapters, into the record log.

Requests through local aliases only, or through the base model alone, produce no record (a record names
on-chain adapters). The summary it returns is what the API answers with.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from loraledger.node.attribution.matcher import Attribution
from loraledger.node.attribution.mixing import mix_weights
from loraledger.node.ledger.record_log import RecordLog
from loraledger.node.ledger.records import BPS, AttributionRecord
from loraledger.node.ledger.rewards import contributor_weights, record_fee, weights_to_bps
from loraledger.node.serving.catalog import ServedAdapter, StoreCatalog
from loraledger.node.serving.token_attribution import SpanStore, TokenAttribution, span_views
from loraledger.node.serving.views import AttributionSummary, ContributorShareView, FinishedRequest
from loraledger.node.types import AdapterId, Address, as_address

TOP_CONTRIBUTORS = 10


class LedgerRecordSink:
    """The node's `RecordSink`: an `AttributionRecord` per finished request through on-chain adapters, appended
    to the record log (durable when `commit` returns). Runs in a worker thread of the servicer, never on the
    engine thread; token-level attribution (module docstring) runs in the attribution pool's threads.

        ids, bps = the request's on-chain adapters, weights -> basis points (largest remainder)
        fee      = record_fee(bps, feePerToken(ids), promptTokens, completionTokens)
        lineage  = {id: lineage tokens}, each mixed with token-level weights when attribution is on
        record   = AttributionRecord.create(..., contributors = contributor_weights(ids, bps, fees, lineage))
    """

    def __init__(self, log_: RecordLog, catalog: StoreCatalog, *, attribution: TokenAttribution | None = None,
                 spans: SpanStore | None = None, attribution_timeout: float = 60.0) -> None:
        self.log = log_
        self.catalog = catalog
        self.attribution = attribution
        self.spans = spans
        self.attribution_timeout = attribution_timeout

    def mixed_lineage(self, terms: Sequence[ServedAdapter], completion_ids: Sequence[int]
                      ) -> tuple[dict[AdapterId, dict[Address, int]], list[Attribution]]:
        """{adapter id: contributor weights} for `contributor_weights`: lineage tokens, re-weighted by token-level
        attribution of `completion_ids` where the adapter has indexes (module docstring); and the attributions."""
        lineage: dict[AdapterId, dict[Address, int]] = {t.onchain_id: dict(t.lineage) for t in terms
                                                        if t.onchain_id is not None}
        att = self.attribution
        if att is None or not completion_ids:
            return lineage, []
        futures = {t.onchain_id: att.pool.submit(completion_ids, t.index_dirs) for t in terms
                   if t.onchain_id is not None and t.index_dirs and t.lineage}
        found: list[Attribution] = []
        for adapter_id, fut in futures.items():
            result = fut.result(self.attribution_timeout)
            found.append(result)
            own = lineage[adapter_id]
            token: dict[str, float] = {a: w for a, w in ((as_address(k), v) for k, v in
                                                          result.contributor_weights.items()) if a in own and w > 0}
            mixed = mix_weights({str(a): t for a, t in own.items()}, token, att.lam)
            lineage[adapter_id] = {as_address(a): int(w) for a, w in mixed.items()}
        return lineage, found

    def commit(self, finished: FinishedRequest) -> AttributionSummary | None:
        if not finished.adapters:
            return None
        terms = [self.catalog.terms(key) for key, _ in finished.adapters]
        if any(t.onchain_id is None for t in terms):
            return None
        ids = [t.onchain_id for t in terms if t.onchain_id is not None]
        bps = weights_to_bps([w for _, w in finished.adapters])
        fees = [t.fee_per_token for t in terms]
        fee = record_fee(bps, fees, finished.prompt_tokens, finished.completion_tokens)
        lineage, attributions = self.mixed_lineage(terms, finished.token_ids)
        contributors = contributor_weights(ids, bps, fees, lineage)
        record = AttributionRecord.create(
            request_id=finished.request_id, adapter_ids=ids, weights_bps=bps,
            prompt_tokens=finished.prompt_tokens, completion_tokens=finished.completion_tokens, fee=fee,
            output_hash="0x" + hashlib.sha256(finished.text.encode("utf-8")).hexdigest(), contributors=contributors,
        )
        spans = span_views(attributions)
        if spans and self.spans is not None:
            self.spans.put(record.request_id, spans)
        self.log.append(record)
        total = sum(w for _, w in record.contributors) or 1
        top = sorted(record.contributors, key=lambda c: -c[1])[:TOP_CONTRIBUTORS]
        return AttributionSummary(
            record_hash="0x" + record.content_hash().hex(), request_id=record.request_id, adapter_ids=tuple(ids),
            weights_bps=tuple(bps), datanet_ids=tuple(sorted({d for t in terms for d in t.datanet_ids})),
            fee=int(fee), attribution_hash=record.attribution_hash,
            top_contributors=tuple(ContributorShareView(a, int(w), int(w) / total) for a, w in top),
            adapter_fees=tuple(b * f * (finished.prompt_tokens + finished.completion_tokens) // BPS
                               for b, f in zip(bps, fees, strict=True)),
        )

    def flush(self) -> None:
        self.log.flush()
