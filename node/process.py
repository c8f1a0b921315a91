"""`NodeApp`: one node process, wired from its config.

    config --> engine (model + LoRA layers + AdapterStore as its slot hook)
           --> adapter catalog (aliases from config; on-chain ids resolved through the AdapterRegistry)
           --> record log + LedgerRecordSink (one AttributionRecord per finished request through on-chain adapters)
           --> settlement loop (a thread running `Settler.run`, when a deployment and an operator key are there)
           --> NodeServer (gRPC), health SERVING once the engine runs

    app = NodeApp(load_config("node.toml"))
    await app.run_until_signal()       # SIGTERM / SIGINT: drain (grace), flush records, stop engine, exit

Adapters by on-chain id N: weights from `adapters.dir/N/` when that directory exists, else from the registered
URI when it is a local path or a `file:` URI; before first use the files are checked against the registry
(`node.lineage.verify_adapter_against_chain`: weights hash, base model, datanets). Contributor weights come from
the adapter's `lineage.json` (written by `loraledger train`); without it the data share goes to the adapter owner.
By local alias (`adapters.aliases = { name = "path" }` or LoadAdapter with a path): served, but no record is kept
(a record names on-chain adapters only), and neither are records kept for the base model alone.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import signal
import threading
from collections.abc import Callable
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
from node.config import NodeConfig
from node.errors import ConfigError, NodeError
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
    `adapters.max_rank`, and build the engine with the adapter store as its slot hook (not started)."""
    m = cfg.model
    if m.quantize != "none":
        raise ConfigError(f"model.quantize={m.quantize!r} is not served by `node run` yet; use quantize = \"none\"")
    model_dir = Path(m.dir)
    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"no model checkpoint in {model_dir} (config.json missing); set model.dir or create the "
                          f"tiny default with `loraledger model init-tiny {model_dir}`")
    device = resolve_device(m.device)
    attention = None if m.attention == "auto" else m.attention
    model = load_model(model_dir, m.dtype, device)
    slots = apply_lora(model, num_slots=cfg.adapters.slots, max_rank=cfg.adapters.max_rank)
    store = AdapterStore(slots, BaseDims.from_model_config(model.config), base_hash=base_model_hash(model_dir))
    engine_cfg = EngineConfig(
        model_dir=model_dir, dtype=m.dtype, device=device, block_size=m.block_size,
        kv_cache_bytes=m.kv_cache_mb * (1 << 20), max_num_seqs=m.max_num_seqs,
        max_tokens_per_step=m.max_tokens_per_step, attention_backend=attention, max_queue=cfg.server.max_queue,
    )
    return Engine(engine_cfg, adapter_slots=store, model=model), store


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


class StoreCatalog:
    """The node's `AdapterCatalog` over its `AdapterStore` (see module docstring). Thread-safe."""

    def __init__(self, store: AdapterStore, cfg: NodeConfig, contracts: Any | None = None) -> None:
        self.store = store
        self.adapters_dir = Path(cfg.adapters.dir)
        self.base_model_dir = Path(cfg.model.dir)
        self.deployment = cfg.chain.deployment
        self.contracts = contracts
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
        try:
            tokens = lineage_tokens(load_lineage(path))
        except (ConfigError, RewardsError) as e:
            log.warning("adapter %d: no usable lineage.json (%s); its data share goes to the adapter owner",
                        adapter_id, e)
        return AdapterTerms(
            key=str(adapter_id), path=Path(path), onchain_id=adapter_id, weights_hash=str(info.weights_hash),
            base_model_hash=str(info.base_model_hash), fee_per_token=int(info.fee_per_token),
            datanet_ids=tuple(int(d) for d in info.datanet_ids), lineage=tokens,
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


class LedgerRecordSink:
    """The node's `RecordSink`: an `AttributionRecord` per finished request through on-chain adapters, appended
    to the record log (durable when `commit` returns)."""

    def __init__(self, log_: RecordLog, catalog: StoreCatalog) -> None:
        self.log = log_
        self.catalog = catalog

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
        contributors = contributor_weights(ids, bps, fees, {t.onchain_id: t.lineage for t in terms
                                                            if t.onchain_id is not None})
        record = AttributionRecord.create(
            request_id=finished.request_id, adapter_ids=ids, weights_bps=bps,
            prompt_tokens=finished.prompt_tokens, completion_tokens=finished.completion_tokens, fee=fee,
            output_hash="0x" + hashlib.sha256(finished.text.encode("utf-8")).hexdigest(), contributors=contributors,
        )
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
    """The node's `AttributionQueries` over its record log and the epoch trees built from it."""

    def __init__(self, log_: RecordLog, operator: str = "") -> None:
        from node.settlement import EpochProofs

        self.log = log_
        self.proofs = EpochProofs(log_)
        self._operator = operator

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
    contracts: Any  # node.contracts_client.Contracts
    can_sign: bool  # an operator key was configured (settlement needs one)


def connect_chain(cfg: NodeConfig) -> ChainHandles | None:
    """Contracts of `chain.deployment` bound to the operator key (`chain.key_env` / `chain.key_file`); None when
    the deployment file does not exist (on-chain adapters and settlement are then off). Without a key, a
    throwaway account is used for reads only."""
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
    return ChainHandles(Contracts.at(ChainClient(w3, account), dep.addresses), can_sign)


# ---- the process -------------------------------------------------------------------------------------------


class NodeApp:
    """Everything one node runs (module docstring). `start` / `stop` from a running asyncio loop."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.engine: Engine | None = None
        self.store: AdapterStore | None = None
        self.records: RecordLog | None = None
        self.server: NodeServer | None = None
        self.port: int | None = None
        self._settle_stop = threading.Event()
        self._settle_thread: threading.Thread | None = None

    async def start(self) -> int:
        """Load the model, start the engine, open the record log, start settlement and the server; returns the
        bound port. Health turns SERVING at the end."""
        cfg = self.config
        engine, store = await asyncio.to_thread(build_engine, cfg)
        self.engine, self.store = engine, store
        chain = await asyncio.to_thread(connect_chain, cfg)
        self.records = open_record_log(cfg.records.path, cfg.records.postgres_dsn)
        catalog = StoreCatalog(store, cfg, chain.contracts if chain else None)
        inference = InferenceServicer(
            engine, catalog=catalog, records=LedgerRecordSink(self.records, catalog),
            max_queue=cfg.server.max_queue, default_max_tokens=cfg.model.default_max_tokens,
        )
        operator = str(chain.contracts.ledger.client.address) if chain and chain.can_sign else ""
        attribution = AttributionServicer(LogQueries(self.records, operator))
        engine.start()
        self.server = NodeServer(cfg.server, inference, attribution)
        self.port = await self.server.start()
        if chain is not None and chain.can_sign and cfg.settlement.enabled:
            self._start_settlement(chain)
        await self.server.set_serving(True)
        log.info("node ready on port %d (model %s, device %s)", self.port, cfg.model.dir, engine.device)
        return self.port

    def _start_settlement(self, chain: ChainHandles) -> None:
        from node.settlement import SettlementError, SettlementOptions, Settler

        assert self.records is not None
        s = self.config.settlement
        settler = Settler(self.records, chain.contracts,
                          SettlementOptions(epoch_seconds=s.epoch_seconds, epoch_records=s.epoch_records))

        def loop() -> None:
            try:
                settler.run(self._settle_stop)
            except (SettlementError, NodeError) as e:
                log.error("settlement loop stopped: %s (records keep being logged; `loraledger rewards settle` "
                          "resumes it)", e)

        self._settle_thread = threading.Thread(target=loop, name="loraledger-settlement", daemon=True)
        self._settle_thread.start()

    async def stop(self, grace: float | None = None) -> None:
        """Drain the server (NOT_SERVING, grace period, cancel the rest, flush records), stop settlement, close
        the record log, stop the engine."""
        if self.server is not None:
            await self.server.drain(grace)
            self.server = None
        self._settle_stop.set()
        if self._settle_thread is not None:
            await asyncio.to_thread(self._settle_thread.join)
            self._settle_thread = None
        if self.records is not None:
            await asyncio.to_thread(self.records.close)
            self.records = None
        if self.engine is not None:
            await asyncio.to_thread(self.engine.shutdown)
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

