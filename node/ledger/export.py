"""The canonical epoch export: one file per epoch, byte-for-byte reproducible from the record log once the epoch is
built, whose sha256 the operator submits on chain with the epoch (`exportHash`).

    data = canonical_export(log, n)           # bytes; sha256(data) == the chain's exportHash of epoch n
    export_sha256(log, n)                     # "0x" + sha256 hex

It holds everything needed to recompute the epoch's two roots without the operator's database: the records'
domain, every record, the terms snapshot, the previous and new cumulative amounts. It depends on nothing that
changes after the epoch is built (no transaction hash, no state), and is written as JSON with sorted keys and no
whitespace, so the same log always gives the same bytes.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

from loraledger.node.ledger.epochs import rebuild_epoch
from loraledger.node.ledger.merkle import RECORD_LEAF_ENCODING, REWARD_LEAF_ENCODING
from loraledger.node.types import Bytes32

if TYPE_CHECKING:
    from loraledger.node.ledger.record_log import RecordLog

EXPORT_FORMAT = "loraledger-epoch-export-v1"


def canonical_export(log_: RecordLog, n: int) -> bytes:
    """Epoch `n` as canonical JSON bytes (module docstring); TamperError when the log no longer matches the roots
    it stored."""
    t = rebuild_epoch(log_, n)
    row = t.row
    assert row.terms is not None and row.cumulative_total is not None
    previous = log_.cumulative_balances(n - 1) if n > 1 else {}
    doc: dict[str, Any] = {
        "format": EXPORT_FORMAT,
        "domain": t.domain.to_json(),
        "epoch": n,
        "recordsRoot": row.records_root,
        "recordCount": row.record_count,
        "rewardsRoot": row.rewards_root,
        "cumulativeTotal": str(int(row.cumulative_total)),
        "feesTotal": str(int(row.fees_total)),
        "terms": row.terms,
        "recordLeafEncoding": list(RECORD_LEAF_ENCODING),
        "records": [r.to_json() for r in t.records],
        "rewardLeafEncoding": list(REWARD_LEAF_ENCODING),
        "previousCumulative": {a: str(int(v)) for a, v in sorted(previous.items())},
        "cumulative": [[str(a), str(int(v))] for a, v in t.rewards_tree.values],
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("utf-8")


def export_sha256(log_: RecordLog, n: int) -> Bytes32:
    """sha256 of `canonical_export(log_, n)`, as the chain stores it."""
    return Bytes32("0x" + hashlib.sha256(canonical_export(log_, n)).hexdigest())
