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

Adapters: `catalog.py`. Records: `record_sink.py` (token-level attribution: `token_attribution.py`).
Settlement while serving: `settlement_loop.py`.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from prometheus_client import start_http_server

from loraledger.inference.engine import Engine
from loraledger.inference.engine_config import EngineConfig
from loraledger.inference.identity import base_model_hash
from loraledger.inference.loader import load_model
from loraledger.inference.lora.adapter import BaseDims
from loraledger.inference.lora.layers import apply_lora
from loraledger.inference.lora.store import AdapterStore
from loraledger.node.chain.access import AdapterAccess
from loraledger.node.config import NodeConfig
from loraledger.node.errors import ConfigError, NotFoundError, PermissionDeniedError
from loraledger.node.ledger.epochs import export_epoch
from loraledger.node.ledger.record_log import RecordLog, open_record_log
from loraledger.node.serving.auth import Authorizer, KeyStore
from loraledger.node.serving.catalog import StoreCatalog
from loraledger.node.serving.generation import AdapterAccessCheck, GenerationService
from loraledger.node.serving.http_api import HttpNode, HttpServer, create_app
from loraledger.node.serving.metrics import NodeCollector, NodeMetrics, SettlementView
from loraledger.node.serving.queries import LogQueries
from loraledger.node.serving.record_sink import LedgerRecordSink
from loraledger.node.serving.server import NodeServer
from loraledger.node.serving.servicers import (
    AttributionServicer,
    InferenceServicer,
)
from loraledger.node.serving.settlement_loop import SettlementLoop
from loraledger.node.serving.settler_role import SettlerRole
from loraledger.node.serving.signing import SignatureVerifier
from loraledger.node.serving.token_attribution import SpanStore, TokenAttribution, spans_path

log = logging.getLogger(__name__)


# ---- engine ----------------------------------------------------------------------------------------------


def resolve_device(name: str) -> str:
    """"auto" -> "cuda" when a GPU is visible, else "cpu"; anything else unchanged."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def build_engine(cfg: NodeConfig) -> tuple[Engine, AdapterStore]:
    """Load the model of `cfg.model`, wrap its projections with `adapters.slots` LoRA slots of rank up to
    `adapters.max_rank`, and build the engine with the adapter store as its slot hook (not started).

    model.quantize = "nf4": the base projections are loaded in 4-bit NF4 (`loraledger.inference.quant.load_model_quantized`,
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
        from loraledger.inference.quant import load_model_quantized

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


# ---- records -----------------------------------------------------------------------------------------------


# ---- chain -------------------------------------------------------------------------------------------------


@dataclass
class ChainHandles:
    contracts: Any  # loraledger.node.chain.bindings.Contracts bound to the operator key (or a throwaway one)
    can_sign: bool  # an operator key was configured (settlement needs one)
    reader: Any = None  # the same contracts over their own connection, for the request path's reads
    deployment_block: int = 0  # the block the contracts were deployed at (where event scans start)

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

    from loraledger.node.chain.bindings import Contracts
    from loraledger.node.chain.client import ChainClient
    from loraledger.node.chain.devnet_setup import read_deployment, web3_for
    from loraledger.node.chain.keys import account_from_hex, load_keystore

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
    return ChainHandles(Contracts.at(ChainClient(w3, account), dep.addresses), can_sign, reader,
                        int(dep.block_number))


# ---- settlement --------------------------------------------------------------------------------------------


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
        self.generation: GenerationService | None = None
        self.settlement: SettlementLoop | None = None
        self.port: int | None = None
        self.metrics: NodeMetrics | None = None
        self.http: HttpServer | None = None
        self.http_node: HttpNode | None = None
        self.http_port: int | None = None
        self._metrics_server: Any = None
        self.access: AdapterAccess | None = None

    async def start(self) -> int:
        """Load the model, start the engine, open the record log, start settlement and the server; returns the
        bound port. Health turns SERVING at the end."""
        cfg = self.config
        authorizer = Authorizer(cfg.auth.mode, KeyStore(cfg.auth.keys_file))
        authorizer.check_startup({"server.listen": cfg.server.listen, "http.listen": cfg.http.listen,
                                  "metrics.listen": cfg.metrics.listen})  # before anything loads
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
        self.metrics = NodeMetrics()
        operator = str(chain.contracts.ledger.client.address) if chain and chain.can_sign else ""
        signatures = None
        if chain is not None and operator:
            signatures = SignatureVerifier(int(chain.reads.ledger.client.chain_id), operator,
                                           int(cfg.auth.signature_ttl_seconds))
        self.access = AdapterAccess(chain.reads.adapters, chain.deployment_block) if chain is not None else None
        if self.access is not None:
            self.access.start()
        self.generation = GenerationService(
            engine, catalog=catalog, records=sink, max_queue=cfg.server.max_queue,
            default_max_tokens=cfg.model.default_max_tokens, metrics=self.metrics, authorizer=authorizer,
            access=self._access_check(catalog), signatures=signatures)
        inference = InferenceServicer(self.generation, admin_needs_client_cert=bool(cfg.tls.client_ca_file))
        attribution = AttributionServicer(LogQueries(self.records, operator, self.spans,
                                                     chain.reads.ledger if chain else None), authorizer)
        settlement_view = SettlementView(self.records, chain.reads if chain and chain.can_sign else None, operator)
        self.metrics.attach(NodeCollector(engine, self.generation, store, settlement_view))
        engine.start()
        self.server = NodeServer(cfg.server, inference, attribution, cfg.tls)
        self.port = await self.server.start()
        if cfg.http.listen:
            base_hash = await asyncio.to_thread(base_model_hash, Path(cfg.model.dir))  # cached beside the model
            self.http_node = HttpNode(self.generation, cfg.model.served_name, str(base_hash), operator,
                                      self.metrics, self._export_epoch, cfg.http.max_body_bytes,
                                      metrics_keyed=cfg.auth.metrics == "keyed")
            self.http = HttpServer(create_app(self.http_node), cfg.http.listen, cfg.server.grace_seconds,
                                   cfg.tls)
            self.http_port = await self.http.start()
        elif cfg.metrics.listen:
            host, _, port = cfg.metrics.listen.rpartition(":")
            self._metrics_server, _ = start_http_server(int(port), host, registry=self.metrics.registry)
            log.info("metrics on http://%s/metrics", cfg.metrics.listen)
        if chain is not None and chain.can_sign and cfg.settlement.enabled:
            role = None
            if self.records.backend == "postgres":  # a fleet may share this log: settle only as its settler
                name = cfg.settlement.node_name or f"{socket.gethostname()[:30]}:{self.port}"
                role = settlement_view.role = SettlerRole(cfg.records.postgres_dsn, name,
                                                          cfg.settlement.role_poll_seconds)
            self.settlement = SettlementLoop(self.records, chain.contracts, cfg, role, lineage=catalog.lineage_terms)
            settlement_view.loop = self.settlement
            if self.http_node is not None:
                self.http_node.settlement = self.settlement
            self.settlement.start()
        elif cfg.settlement.enabled:
            log.info("settlement off: it needs a deployment and an operator key ($%s or chain.key_file)",
                     cfg.chain.key_env)
        await self.server.set_serving(True)
        if self.http_node is not None:
            self.http_node.serving = True
        log.info("node ready on port %d%s (model %s, device %s)", self.port,
                 f", HTTP port {self.http_port}" if self.http_port else "", cfg.model.dir, engine.device)
        return self.port

    def _access_check(self, catalog: StoreCatalog) -> AdapterAccessCheck | None:
        """The request path's check of on-chain adapter access, answered from the access cache (no RPC)."""
        access = self.access
        if access is None:
            return None

        def check(keys: list[str], account: str) -> None:
            for key in keys:
                adapter_id = catalog.terms(key).onchain_id
                if adapter_id is not None and not access.allowed(adapter_id, account):
                    who = account or "an unsigned client"
                    raise PermissionDeniedError(
                        f"adapter {adapter_id} is not open to {who}: its owner allows only listed accounts; sign "
                        "the request with an allowed account (EIP-712) or use a key bound to one")

        return check

    def _export_epoch(self, n: int, path: Path) -> None:
        """The epoch's export file, as `loraledger epoch export` writes it (NotFoundError before it is built)."""
        records = self.records
        row = records.epoch(n) if records is not None else None
        if records is None or row is None or row.records_root is None:
            raise NotFoundError(f"epoch {n} has no export on this node yet (not in its record log, or not built); "
                                "list epochs with `loraledger epoch show`")
        ledger, chain_id = None, None
        if Path(self.config.chain.deployment).is_file():
            from loraledger.node.chain.devnet_setup import read_deployment

            dep = read_deployment(self.config.chain.deployment)
            ledger, chain_id = dep.address("AttributionLedger"), dep.chain_id
        export_epoch(records, n, path, ledger=ledger, chain_id=chain_id)

    async def stop(self, grace: float | None = None) -> None:
        """Drain the server (NOT_SERVING, grace period, cancel the rest, write the records of what finished or
        was abandoned after producing tokens, flush), stop settlement, close the record log, stop the engine."""
        if self.generation is not None:
            self.generation.accepting = False  # both APIs refuse new requests (503 / UNAVAILABLE) from here
        if self.http_node is not None:
            self.http_node.serving = False
        if self.server is not None:
            await asyncio.gather(self.server.drain(grace), *([self.http.stop()] if self.http else []))
            self.server, self.http = None, None
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server = None
        if self.settlement is not None:
            await asyncio.to_thread(self.settlement.stop)
            self.settlement = None
        if self.access is not None:
            await asyncio.to_thread(self.access.stop)
            self.access = None
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

