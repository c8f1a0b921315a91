"""Token-level attribution as the node runs it, and where the matched spans it finds are kept.

When `attribution.token_level_lambda` = lam > 0, an adapter's datanets are the `manifest_dir`s its lineage.json
names that hold an index (`loraledger datanet index`) built with the engine's tokenizer. For a finished answer
(completion ids c[0:n]) each adapter i with indexes gets, in a worker thread of the pool,
`attribute(c, indexes_i)`; its lineage map becomes

    mixed_i = mix_weights(lineage_i, token_level_i restricted to lineage_i's contributors, lam)

and the record's contributor weights are `contributor_weights(ids, bps, fees, {i: mixed_i})` (`record_sink.py`).
The matched spans are kept beside the record log (`SpanStore`, `<records.path stem>.spans<suffix>`) for
`GetRecord`; they explain a record and are not part of any commitment.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraledger.node.attribution.index import INDEX_DIRNAME
from loraledger.node.attribution.matcher import Attribution, MatcherConfig
from loraledger.node.attribution.pool import AttributionPool
from loraledger.node.config import NodeConfig
from loraledger.node.errors import AttributionError

log = logging.getLogger(__name__)


@dataclass
class TokenAttribution:
    """Token-level attribution as the node runs it: the worker pool and the mixing factor lam in (0, 1]."""

    pool: AttributionPool
    lam: float

    @classmethod
    def from_config(cls, cfg: NodeConfig) -> TokenAttribution | None:
        """None when `attribution.token_level_lambda` is 0; else a pool of `attribution.workers` threads matching
        at least `attribution.min_match` tokens, refusing indexes of another tokenizer than the model's."""
        a = cfg.attribution
        if a.token_level_lambda <= 0:
            return None
        tok = Path(cfg.model.dir) / "tokenizer.json"
        sha = "0x" + hashlib.sha256(tok.read_bytes()).hexdigest() if tok.is_file() else None
        pool = AttributionPool(a.workers, MatcherConfig(min_match=a.min_match), tokenizer_sha256=sha)
        return cls(pool, float(a.token_level_lambda))

    def index_dirs(self, adapter_id: int, lineage: Mapping[str, Any]) -> tuple[Path, ...]:
        """The index folders of the datanets an adapter's lineage.json names (`datanets[].manifest_dir`) that
        hold an index this pool accepts; the others are left out with a warning (lineage shares only)."""
        out: list[Path] = []
        entries = lineage.get("datanets")
        for d in entries if isinstance(entries, list) else []:
            manifest_dir = Path(str(d.get("manifest_dir", ""))) if isinstance(d, Mapping) else None
            if manifest_dir is None or not str(manifest_dir):
                continue
            index_dir = manifest_dir / INDEX_DIRNAME
            if not (index_dir / "header.json").is_file():
                log.warning("adapter %d: datanet %s has no attribution index (run `loraledger datanet index %s`); "
                            "its contributors get lineage shares only", adapter_id, manifest_dir, manifest_dir)
                continue
            try:
                self.pool.index(index_dir)
            except AttributionError as e:
                log.warning("adapter %d: attribution index %s is unusable (%s); lineage shares only",
                            adapter_id, index_dir, e)
                continue
            out.append(index_dir)
        return tuple(out)

    def close(self) -> None:
        self.pool.close(wait=True)


def spans_path(records_path: str | Path) -> Path:
    """Where the matched spans of a record log live: `records.sqlite` -> `records.spans.sqlite`."""
    p = Path(records_path)
    return p.with_name(f"{p.stem}.spans{p.suffix}") if p.suffix else p.with_name(p.name + ".spans")


class SpanStore:
    """The matched spans of each record (token-level attribution), beside the record log, for `GetRecord`.

    One SQLite table `spans(request_id PRIMARY KEY, spans JSON)`; spans are explanations, not part of any
    commitment (the record's attributionHash commits to the contributor list), so they are written before the
    record and kept when a retry finds the record already logged. Thread-safe.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("CREATE TABLE IF NOT EXISTS spans (request_id TEXT PRIMARY KEY, spans TEXT NOT NULL)")

    def put(self, request_id: str, spans: Sequence[Mapping[str, Any]]) -> None:
        """Keep `spans` (dicts with the proto MatchedSpan fields) for `request_id` (bytes32 form)."""
        with self._lock:
            self._conn.execute("INSERT OR REPLACE INTO spans (request_id, spans) VALUES (?, ?)",
                               (request_id.lower(), json.dumps(list(spans), separators=(",", ":"))))

    def get(self, request_id: str) -> tuple[dict[str, Any], ...]:
        with self._lock:
            row = self._conn.execute("SELECT spans FROM spans WHERE request_id = ?", (request_id.lower(),)).fetchone()
        return tuple(json.loads(row[0])) if row else ()

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def span_views(attributions: Sequence[Attribution]) -> list[dict[str, Any]]:
    """The matched spans of an answer's attributions as proto `MatchedSpan` fields, without repeats (two adapters
    on one datanet find the same spans), ordered by answer position."""
    seen: set[tuple[Any, ...]] = set()
    out: list[dict[str, Any]] = []
    for att in attributions:
        for sp in att.spans:
            view = {"contributor": str(sp.contributor), "contribution_hash": sp.contribution_hash,
                    "answer_start": int(sp.answer_start), "answer_end": int(sp.answer_end),
                    "contribution_start": int(sp.contribution_offset)}
            key = tuple(view.values())
            if key not in seen:
                seen.add(key)
                out.append(view)
    out.sort(key=lambda v: (v["answer_start"], v["answer_end"], v["contribution_hash"]))
    return out
