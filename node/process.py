"""`NodeApp`: one node process, wired from its config.

    config --> engine (model + LoRA layers + AdapterStore as its slot hook)
           --> adapter catalog (aliases from config; on-chain ids resolved through the AdapterRegistry)
           --> record log + LedgerRecordSink (one AttributionRecord per finished request through on-chain adapters;
               token-level attribution in an AttributionPool when attribution.token_level_lambda > 0)
           --> settlement loop (a thread ticking a `Settler`, when a deployment, an operator key and
               settlement.enabled are there; optional claim push after each epoch)
           --> NodeServer (gRPC), health SERVING once the engine runs

    app = NodeApp(load_config("node.toml"))
    await app.run_until_signal()       # SIGTERM / SIGINT: drain (grace), flush records, stop engine, exit

Adapters by on-chain id N: weights from `adapters.dir/N/` when that directory exists, else from the registered
URI when it is a local path or a `file:` URI; before first use the files are checked against the registry
(`node.lineage.verify_adapter_against_chain`: weights hash, base model, datanets). Contributor weights come from
the adapter's `lineage.json` (written by `loraledger train`); without it the data share goes to the adapter owner.
By local alias (`adapters.aliases = { name = "path" }` or LoadAdapter with a path): served, but no record is kept
(a record names on-chain adapters only), and neither are records kept for the base model alone.

Token-level attribution (issue 8), when `attribution.token_level_lambda` = lam > 0: an adapter's datanets are the
`manifest_dir`s its lineage.json names that hold an index (`loraledger datanet index`) built with the engine's
tokenizer. For a finished answer (completion ids c[0:n]) each adapter i with indexes gets, in a worker thread of
the pool, `attribute(c, indexes_i)`; its lineage map becomes

    mixed_i = mix_weights(lineage_i, token_level_i restricted to lineage_i's contributors, lam)

and the record's contributor weights are `contributor_weights(ids, bps, fees, {i: mixed_i})`. The matched spans
are kept beside the record log (`SpanStore`, `<records.path stem>.spans<suffix>`) for `GetRecord`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import signal
import sqlite3
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import torch

from inference.engine import Engine, EngineConfig
from inference.errors import AdapterNotFoundError, EngineError, InvalidRequestError
from inference.identity import base_model_hash, weights_hash
from inference.loader import load_model
from inference.lora.adapter import BaseDims, read_adapter_config
from inference.lora.layers import apply_lora
from inference.lora.store import AdapterStore
from node.attribution.index import INDEX_DIRNAME
from node.attribution.matcher import Attribution, MatcherConfig
from node.attribution.mixing import mix_weights
from node.attribution.pool import AttributionPool
from node.config import NodeConfig
from node.errors import AttributionError, ChainError, ConfigError, NodeError
from node.record_log import RecordLog, open_record_log
from node.records import BPS, AttributionRecord
from node.rewards import RewardsError, contributor_weights, lineage_tokens, record_fee
from node.server import NodeServer
from node.servicer import (
    AdapterDescription,
    AttributionServicer,
    AttributionSummary,
    ContributorShareView,
    EpochView,
    FinishedRequest,
    InferenceServicer,
    RecordView,
    RewardProofView,
)
from node.types import Address, as_address

log = logging.getLogger(__name__)

TOP_CONTRIBUTORS = 10


# ---- engine ----------------------------------------------------------------------------------------------


def resolve_device(name: str) -> str:
    """"auto" -> "cuda" when a GPU is visible, else "cpu"; anything else unchanged."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def build_engine(cfg: NodeConfig) -> tuple[Engine, AdapterStore]:
    """Load the model of `cfg.model`, wrap its projections with `adapters.slots` LoRA slots of rank up to
    `adapters.max_rank`, and build the engine with the adapter store as its slot hook (not started).

    model.quantize = "nf4": the base projections are loaded in 4-bit NF4 (`inference.quant.load_model_quantized`,
    QLoRA serving); the LoRA slots then hold the adapters in the compute dtype `model.dtype`.
    """
    m = cfg.model
    model_dir = Path(m.dir)
    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"no model checkpoint in {model_dir} (config.json missing); set model.dir or create the "
                          f"tiny default with `loraledger model init-tiny {model_dir}`")
    device = resolve_device(m.device)
    attention = None if m.attention == "auto" else m.attention
    if m.quantize == "nf4":
        from inference.quant import load_model_quantized

        model = load_model_quantized(model_dir, "nf4", m.dtype, device)
        slots = apply_lora(model, num_slots=cfg.adapters.slots, max_rank=cfg.adapters.max_rank, dtype=model.dtype)
    else:
        model = load_model(model_dir, m.dtype, device)
        slots = apply_lora(model, num_slots=cfg.adapters.slots, max_rank=cfg.adapters.max_rank)
    store = AdapterStore(slots, BaseDims.from_model_config(model.config), base_hash=base_model_hash(model_dir),
                         background_loads=True)  # first loads from disk off the engine step
    engine_cfg = EngineConfig(
        model_dir=model_dir, dtype=m.dtype, device=device, block_size=m.block_size,
        kv_cache_bytes=m.kv_cache_mb * (1 << 20), max_num_seqs=m.max_num_seqs,
        max_tokens_per_step=m.max_tokens_per_step, attention_backend=attention, max_queue=cfg.server.max_queue,
        decode_graphs=m.decode_graphs, async_decode={"auto": None, "on": True, "off": False}[m.async_decode],
    )
    engine = Engine(engine_cfg, adapter_slots=store, model=model)
    captured = engine.warm_up_graphs()  # CUDA: every decode bucket captured now, not on a request's first step
    if captured:
        log.info("captured %d decode CUDA graphs", captured)
    return engine, store


# ---- adapters --------------------------------------------------------------------------------------------


@dataclass
class AdapterTerms:
    """What the node knows of one served adapter beyond its files (on-chain registration, lineage)."""

    key: str
    path: Path
    alias: str = ""
    onchain_id: int | None = None
    weights_hash: str = ""
    base_model_hash: str = ""
    fee_per_token: int = 0
    datanet_ids: tuple[int, ...] = ()
    lineage: dict[Address, int] = field(default_factory=dict)  # contributor -> tokens trained on
    index_dirs: tuple[Path, ...] = ()  # attribution indexes of its datanets (token-level attribution)

    @property
    def rank(self) -> int:
        """The adapter's LoRA rank r from its adapter_config.json (0 if unreadable)."""
        try:
            return int(read_adapter_config(self.path)[0].r)
        except EngineError:
            return 0


def local_uri_path(uri: str) -> Path | None:
    """The local path a registered URI names (`file:` URI or a plain path that exists), else None."""
    if uri.startswith("file:"):
        return Path(unquote(urlparse(uri).path))
    if uri and "://" not in uri and Path(uri).exists():
        return Path(uri)
    return None


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


class StoreCatalog:
    """The node's `AdapterCatalog` over its `AdapterStore` (see module docstring). Thread-safe."""

    def __init__(self, store: AdapterStore, cfg: NodeConfig, contracts: Any | None = None,
                 attribution: TokenAttribution | None = None) -> None:
        self.store = store
        self.adapters_dir = Path(cfg.adapters.dir)
        self.base_model_dir = Path(cfg.model.dir)
        self.deployment = cfg.chain.deployment
        self.contracts = contracts
        self.attribution = attribution
        self._lock = threading.Lock()
        self._terms: dict[str, AdapterTerms] = {}
        for alias, path in cfg.adapters.aliases.items():
            store.register(alias, path)  # read (and verified) on first use
            self._terms[alias] = AdapterTerms(key=alias, path=Path(path), alias=alias)

    def terms(self, key: str) -> AdapterTerms:
        with self._lock:
            t = self._terms.get(key)
        if t is None:
            raise AdapterNotFoundError(f"adapter {key!r} is not known to this node")
        return t

    def resolve(self, name: str) -> str:
        with self._lock:
            if name in self._terms:
                return name
            if not name.isdigit():
                raise AdapterNotFoundError(
                    f"unknown adapter {name!r}: not an on-chain id, not an alias in adapters.aliases, not loaded "
                    f"with LoadAdapter (aliases: {sorted(k for k, t in self._terms.items() if t.alias)})"
                )
            terms = self._onchain(int(name), None)
            self.store.register(terms.key, terms.path, terms.weights_hash, terms.base_model_hash)
            self._terms[terms.key] = terms
            return terms.key

    def _onchain(self, adapter_id: int, path: Path | None) -> AdapterTerms:
        """Look adapter `adapter_id` up in the AdapterRegistry, find its files, verify them against it."""
        from node.lineage import AdapterNotRegisteredError, verify_adapter_against_chain
        from node.training import load_lineage

        if self.contracts is None:
            raise AdapterNotFoundError(
                f"adapter {adapter_id}: this node has no chain deployment ({self.deployment} not found), so "
                "on-chain ids cannot be resolved; run `loraledger devnet up` or set chain.deployment"
            )
        if not 0 < adapter_id <= self.contracts.adapters.adapter_count():
            raise AdapterNotRegisteredError(f"no adapter {adapter_id} in the AdapterRegistry at "
                                            f"{self.contracts.adapters.address}")
        info = self.contracts.adapters.get_adapter(adapter_id)
        if path is None:
            local = self.adapters_dir / str(adapter_id)
            path = local if local.is_dir() else local_uri_path(info.uri)
            if path is None:
                raise AdapterNotFoundError(
                    f"adapter {adapter_id}: no local copy in {local} and its registered URI {info.uri!r} is not a "
                    f"local path; copy its files to {local}"
                )
        verify_adapter_against_chain(path, adapter_id, self.contracts, self.base_model_dir)
        tokens: dict[Address, int] = {}
        index_dirs: tuple[Path, ...] = ()
        try:
            doc = load_lineage(path)
            tokens = lineage_tokens(doc)
            if self.attribution is not None and tokens:
                index_dirs = self.attribution.index_dirs(adapter_id, doc)
        except (ConfigError, RewardsError) as e:
            log.warning("adapter %d: no usable lineage.json (%s); its data share goes to the adapter owner",
                        adapter_id, e)
        return AdapterTerms(
            key=str(adapter_id), path=Path(path), onchain_id=adapter_id, weights_hash=str(info.weights_hash),
            base_model_hash=str(info.base_model_hash), fee_per_token=int(info.fee_per_token),
            datanet_ids=tuple(int(d) for d in info.datanet_ids), lineage=tokens, index_dirs=index_dirs,
        )

    def load(self, name: str, path: str, expected_weights_hash: str) -> AdapterDescription:
        with self._lock:
            if name.isdigit():
                terms = self._onchain(int(name), Path(path) if path else None)
            else:
                known = self._terms.get(name)
                source = Path(path) if path else (known.path if known is not None else None)
                if source is None:
                    raise InvalidRequestError(f"LoadAdapter {name!r}: give `path`, the adapter directory to load")
                terms = AdapterTerms(key=name, path=source, alias=name,
                                     weights_hash=expected_weights_hash.lower())
            self.store.load(terms.key, terms.path, terms.weights_hash or None, terms.base_model_hash or None)
            if not terms.weights_hash:  # loaded fine: name the weights it holds
                terms.weights_hash = str(weights_hash(terms.path))
            self._terms[terms.key] = terms
            return self._describe(terms)

    def unload(self, name: str) -> bool:
        with self._lock:
            if name not in self._terms:
                return False
            self.store.unload(name)
            del self._terms[name]
            return True

    def list(self) -> list[AdapterDescription]:
        with self._lock:
            return [self._describe(t) for t in sorted(self._terms.values(), key=lambda t: t.key)]

    def _describe(self, t: AdapterTerms) -> AdapterDescription:
        info = {i.key: i for i in self.store.list()}.get(t.key)
        return AdapterDescription(
            key=t.key, alias=t.alias, onchain_id=t.onchain_id,
            weights_hash=t.weights_hash or (info.weights_hash if info and info.weights_hash else ""),
            base_model_hash=t.base_model_hash, rank=t.rank, resident=bool(info and info.tier == "gpu"),
            datanet_ids=t.datanet_ids, fee_per_token=t.fee_per_token,
        )


# ---- records -----------------------------------------------------------------------------------------------


def weights_to_bps(weights: list[float]) -> list[int]:
    """Float weights summing to 1 -> basis points summing exactly to 10000, each >= 1 (largest remainder:
    floor(w * 10000) each, the missing points to the largest fractional parts, ties to the earlier)."""
    raw = [w * BPS for w in weights]
    bps = [max(1, int(r)) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - int(raw[i])), i))
    k = 0
    while sum(bps) < BPS:
        bps[order[k % len(order)]] += 1
        k += 1
    while sum(bps) > BPS:  # only after lifting tiny weights to 1: take from the largest
        bps[max(range(len(bps)), key=lambda i: bps[i])] -= 1
    return bps


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

    def mixed_lineage(self, terms: Sequence[AdapterTerms], completion_ids: Sequence[int]
                      ) -> tuple[dict[int, dict[Address, int]], list[Attribution]]:
        """{adapter id: contributor weights} for `contributor_weights`: lineage tokens, re-weighted by token-level
        attribution of `completion_ids` where the adapter has indexes (module docstring); and the attributions."""
        lineage: dict[int, dict[Address, int]] = {int(t.onchain_id): dict(t.lineage) for t in terms
                                                  if t.onchain_id is not None}
        att = self.attribution
        if att is None or not completion_ids:
            return lineage, []
        futures = {int(t.onchain_id): att.pool.submit(completion_ids, t.index_dirs) for t in terms
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
        ids = [int(t.onchain_id) for t in terms if t.onchain_id is not None]
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
            record_hash="0x" + record.leaf_hash().hex(), request_id=record.request_id, adapter_ids=tuple(ids),
            weights_bps=tuple(bps), datanet_ids=tuple(sorted({d for t in terms for d in t.datanet_ids})),
            fee=int(fee), attribution_hash=record.attribution_hash,
            top_contributors=tuple(ContributorShareView(a, int(w), int(w) / total) for a, w in top),
        )

    def flush(self) -> None:
        self.log.flush()


class LogQueries:
    """The node's `AttributionQueries` over its record log, the epoch trees built from it (the settler's data)
    and the span store."""

    def __init__(self, log_: RecordLog, operator: str = "", spans: SpanStore | None = None) -> None:
        from node.settlement import EpochProofs

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


# ---- chain -------------------------------------------------------------------------------------------------


@dataclass
class ChainHandles:
    contracts: Any  # node.contracts_client.Contracts bound to the operator key (or a throwaway one)
    can_sign: bool  # an operator key was configured (settlement needs one)
    reader: Any = None  # the same contracts over their own connection, for the request path's reads

    @property
    def reads(self) -> Any:
        return self.reader if self.reader is not None else self.contracts


def connect_chain(cfg: NodeConfig) -> ChainHandles | None:
    """Contracts of `chain.deployment` bound to the operator key (`chain.key_env` / `chain.key_file`); None when
    the deployment file does not exist (on-chain adapters and settlement are then off). Without a key, a
    throwaway account is used for reads only. `reader`: a second binding over its own HTTP connection, so the
    request path's registry reads and the settlement thread's transactions never share one session."""
    import os

    from eth_account import Account

    from node.chain import ChainClient
    from node.contracts_client import Contracts
    from node.devnet_setup import read_deployment, web3_for
    from node.keys import account_from_hex, load_keystore

    if not Path(cfg.chain.deployment).is_file():
        log.info("no deployment at %s: on-chain adapters and settlement are off", cfg.chain.deployment)
        return None
    dep = read_deployment(cfg.chain.deployment)
    rpc = cfg.chain.rpc_url or str(dep.extra.get("rpcUrl", ""))
    if not rpc:
        raise ConfigError(f"no RPC endpoint: set chain.rpc_url ({cfg.chain.deployment} has none)")
    w3 = web3_for(rpc)
    if cfg.chain.key_file:
        account, can_sign = load_keystore(cfg.chain.key_file, os.environ.get(cfg.chain.password_env, "")), True
    elif os.environ.get(cfg.chain.key_env):
        account, can_sign = account_from_hex(os.environ[cfg.chain.key_env], f"${cfg.chain.key_env}"), True
    else:
        log.warning("no operator key (set $%s or chain.key_file): chain reads only, settlement off",
                    cfg.chain.key_env)
        account, can_sign = Account.create(), False
    reader = Contracts.at(ChainClient(web3_for(rpc), Account.create()), dep.addresses)
    return ChainHandles(Contracts.at(ChainClient(w3, account), dep.addresses), can_sign, reader)


# ---- settlement --------------------------------------------------------------------------------------------


class SettlementLoop:
    """The node's settlement thread: every `interval` s, `Settler.tick()` (resume unfinished epochs; close and
    settle one when `epoch_seconds` / `epoch_records` say so); after each confirmed epoch, when
    `settlement.push_threshold` > 0, `claimMany` for every account owed more than it. A SettlementError (a
    reverted transaction, log and chain disagreeing) stops the loop with the error logged and kept in `error`;
    the records stay in the log for `loraledger epoch settle`. Connection errors are logged and retried."""

    def __init__(self, records: RecordLog, contracts: Any, cfg: NodeConfig) -> None:
        from node.settlement import SettlementOptions, Settler

        s = cfg.settlement
        self.settler = Settler(records, contracts, SettlementOptions(epoch_seconds=s.epoch_seconds,
                                                                     epoch_records=s.epoch_records))
        self.push_threshold = s.push_threshold
        self.interval = min(1.0, s.epoch_seconds / 2)
        self.error: BaseException | None = None
        self.epochs_confirmed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loraledger-settlement", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        from node.settlement import SettlementError

        while not self._stop.is_set():
            try:
                done = self.settler.tick()
                self.epochs_confirmed += len(done)
                if done and self.push_threshold > 0:
                    self._push(done[-1].epoch)
            except (SettlementError, ConfigError) as e:
                self.error = e
                log.error("settlement loop stopped: %s (records keep being logged; `loraledger epoch settle` "
                          "resumes it)", e)
                return
            except (ChainError, OSError) as e:
                log.warning("settlement: chain unreachable (%s); retrying in %.1f s", e, self.interval)
            except sqlite3.OperationalError as e:
                # SQLite refuses an epoch transition whose read snapshot went stale under a concurrent append
                # ("database is locked"). Every step is resumable from the log; a transaction signed but not
                # stored was never broadcast, so the nonce counter is re-read from the node before the retry.
                log.warning("settlement: record log busy (%s); retrying in %.1f s", e, self.interval)
                self.settler.client.nonces.invalidate()
            except NodeError as e:  # a claim push that failed: settlement itself goes on
                log.error("settlement: %s", e)
            self._stop.wait(self.interval)

    def _push(self, epoch: int) -> None:
        from node.claims import push_claims

        proofs = self.settler.proofs
        values = proofs.trees(epoch).rewards_tree.values
        found = [proofs.reward_proof(str(account), epoch) for account, _ in values]
        res = push_claims(self.settler.contracts.ledger, [p for p in found if p is not None],
                          threshold=self.push_threshold)
        log.info("epoch %d: pushed claims to %d account(s) in %d transaction(s)", epoch, len(res.paid),
                 len(res.tx_hashes))

    def stop(self) -> None:
        """Ask the loop to stop and wait for it (a transaction in flight is driven to its end first)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


# ---- the process -------------------------------------------------------------------------------------------


class NodeApp:
    """Everything one node runs (module docstring). `start` / `stop` from a running asyncio loop."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.engine: Engine | None = None
        self.store: AdapterStore | None = None
        self.records: RecordLog | None = None
        self.spans: SpanStore | None = None
        self.attribution: TokenAttribution | None = None
        self.server: NodeServer | None = None
        self.settlement: SettlementLoop | None = None
        self.port: int | None = None

    async def start(self) -> int:
        """Load the model, start the engine, open the record log, start settlement and the server; returns the
        bound port. Health turns SERVING at the end."""
        cfg = self.config
        engine, store = await asyncio.to_thread(build_engine, cfg)
        self.engine, self.store = engine, store
        chain = await asyncio.to_thread(connect_chain, cfg)
        self.records = open_record_log(cfg.records.path, cfg.records.postgres_dsn)
        self.attribution = TokenAttribution.from_config(cfg)
        spans_file = spans_path(cfg.records.path)
        # spans are written with token-level attribution on; an earlier run's stay readable for GetRecord
        self.spans = SpanStore(spans_file) if self.attribution is not None or spans_file.is_file() else None
        catalog = StoreCatalog(store, cfg, chain.reads if chain else None, self.attribution)
        sink = LedgerRecordSink(self.records, catalog, attribution=self.attribution, spans=self.spans)
        inference = InferenceServicer(engine, catalog=catalog, records=sink, max_queue=cfg.server.max_queue,
                                      default_max_tokens=cfg.model.default_max_tokens)
        operator = str(chain.contracts.ledger.client.address) if chain and chain.can_sign else ""
        attribution = AttributionServicer(LogQueries(self.records, operator, self.spans))
        engine.start()
        self.server = NodeServer(cfg.server, inference, attribution)
        self.port = await self.server.start()
        if chain is not None and chain.can_sign and cfg.settlement.enabled:
            self.settlement = SettlementLoop(self.records, chain.contracts, cfg)
            self.settlement.start()
        elif cfg.settlement.enabled:
            log.info("settlement off: it needs a deployment and an operator key ($%s or chain.key_file)",
                     cfg.chain.key_env)
        await self.server.set_serving(True)
        log.info("node ready on port %d (model %s, device %s)", self.port, cfg.model.dir, engine.device)
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """Drain the server (NOT_SERVING, grace period, cancel the rest, write the records of what finished or
        was abandoned after producing tokens, flush), stop settlement, close the record log, stop the engine."""
        if self.server is not None:
            await self.server.drain(grace)
            self.server = None
        if self.settlement is not None:
            await asyncio.to_thread(self.settlement.stop)
            self.settlement = None
        if self.records is not None:
            await asyncio.to_thread(self.records.close)
            self.records = None
        if self.attribution is not None:
            await asyncio.to_thread(self.attribution.close)
            self.attribution = None
        if self.spans is not None:
            self.spans.close()
            self.spans = None
        if self.engine is not None:
            await asyncio.to_thread(self.engine.shutdown)
        if self.store is not None:
            await asyncio.to_thread(self.store.close)
        log.info("node stopped")

    async def run_until_signal(self, on_ready: Callable[[int], None] | None = None) -> None:
        """start(), call `on_ready(port)`, serve until SIGTERM or SIGINT, then stop()."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            port = await self.start()
            if on_ready is not None:
                on_ready(port)
            await stop.wait()
            log.info("signal received: shutting down")
        finally:
            await self.stop()

