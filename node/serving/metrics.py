"""Prometheus metrics of one node (prometheus_client), served at `/metrics` on the HTTP listener, or on
`[metrics] listen` when the HTTP API is off.

Per request (observed when it ends, `observe_request`; `adapter` is the name the client used, "base" for the
base model alone; a mix counts once for each of its adapters):

    loraledger_requests_total{api, adapter, status}          requests, by their final status
    loraledger_prompt_tokens_total{adapter}                   prompt tokens served
    loraledger_completion_tokens_total{adapter}               tokens generated
    loraledger_fees_total{adapter}                            fees recorded, reward-token base units
    loraledger_time_to_first_token_seconds{api}               histogram
    loraledger_inter_token_latency_seconds{api}               histogram, per generated token after the first
    loraledger_request_duration_seconds{api}                  histogram, admission to the end of the request

Read at scrape time (`NodeCollector`):

    loraledger_requests_in_flight                             admitted and not yet answered (both APIs)
    loraledger_engine_waiting / loraledger_engine_running     sequences in the engine
    loraledger_kv_blocks_used / loraledger_kv_blocks_free     paged KV cache blocks
    loraledger_adapter_slots / loraledger_adapter_slots_used  GPU (or CPU) LoRA slots
    loraledger_adapter_store_hits_total{tier}                 tier = slot | cpu
    loraledger_adapter_store_misses_total{tier}               a slot miss goes to the CPU tier; a CPU miss to disk
    loraledger_adapter_loads_total                            disk reads (first loads and reloads)
    loraledger_adapter_load_failures_total
    loraledger_adapter_load_seconds                           histogram of disk reads (read, hash, layout)
    loraledger_records_pending                                records not yet in an epoch
    loraledger_records_pending_fees                           what the next epoch's submit will pull
    loraledger_settlement_lag_seconds                         age of the oldest pending record
    loraledger_epoch_last_settled                             last epoch confirmed on chain (record log)
    loraledger_epoch_in_effect                                the operator's epoch whose root claims use (chain)
    loraledger_operator_token_balance / _allowance            the operator's reward tokens and the ledger's
                                                              allowance, against records_pending_fees
    loraledger_operator_eth_balance_wei                       the operator's ETH (gas for settlement)
    loraledger_settlement_state{state, cause}                 1 for ok | degraded | stuck (settlement_loop.py)
    loraledger_settlement_failures                            settlement failures in a row
    loraledger_operator_low_funds{asset}                      1 while eth | token lasts under 3 epochs
    loraledger_settler                                        fleet on PostgreSQL: 1 while this node settles
    loraledger_settler_holder{node}                           the node holding the settler role (as last seen)
    loraledger_build_info{version, python, torch}

Chain values are read at most every `chain_ttl` seconds and keep their last value while the chain is
unreachable (a scrape never waits on a down RPC more than once per TTL).
"""

from __future__ import annotations

import logging
import platform
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

import torch
from prometheus_client import CollectorRegistry, Counter, Histogram, Info, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from loraledger.node.errors import ChainError

if TYPE_CHECKING:
    from loraledger.inference.engine import Engine
    from loraledger.inference.lora.store import AdapterStore
    from loraledger.node.ledger.record_log import RecordLog
    from loraledger.node.serving.generation import CallLog, GenerationService

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)
_LOAD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


def _package_version() -> str:
    try:
        return version("loraledger")
    except PackageNotFoundError:
        return "unknown"


class NodeMetrics:
    """The node's metrics in a registry of their own (several nodes in one test process never mix)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("loraledger_requests", "Requests by API, adapter and final status",
                                ["api", "adapter", "status"], registry=r)
        self.prompt_tokens = Counter("loraledger_prompt_tokens", "Prompt tokens served", ["adapter"], registry=r)
        self.completion_tokens = Counter("loraledger_completion_tokens", "Tokens generated", ["adapter"],
                                         registry=r)
        self.fees = Counter("loraledger_fees", "Fees recorded, in reward-token base units", ["adapter"],
                            registry=r)
        self.ttft = Histogram("loraledger_time_to_first_token_seconds", "Admission to the first token",
                              ["api"], buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("loraledger_inter_token_latency_seconds", "Time per generated token after the first",
                             ["api"], buckets=_TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram("loraledger_request_duration_seconds", "Admission to the end of the request",
                             ["api"], buckets=_LATENCY_BUCKETS, registry=r)
        self.adapter_load = Histogram("loraledger_adapter_load_seconds",
                                      "Disk reads of adapters (read, hash, layout)", buckets=_LOAD_BUCKETS,
                                      registry=r)
        Info("loraledger_build", "Build of this node", registry=r).info(
            {"version": _package_version(), "python": platform.python_version(), "torch": torch.__version__})

    def observe_request(self, call: CallLog, elapsed: float) -> None:
        """One request ended (`CallLog.emit`)."""
        names = [name for name, _ in call.adapters] if call.resolved else []
        labels = names or ["base" if call.resolved else "unresolved"]
        for name in labels:
            self.requests.labels(call.api, name, call.status).inc()
            if call.resolved:
                self.prompt_tokens.labels(name).inc(call.prompt_tokens)
                self.completion_tokens.labels(name).inc(call.completion_tokens)
        for name, fee in zip(names, call.adapter_fees, strict=False):
            self.fees.labels(name).inc(fee)
        self.e2e.labels(call.api).observe(elapsed)
        if call.first_token_at is not None:
            self.ttft.labels(call.api).observe(call.first_token_at - call.started)
        itl = self.itl.labels(call.api)
        for gap in call.inter_token:
            itl.observe(gap)

    def attach(self, collector: NodeCollector) -> None:
        """Register the scrape-time collector of the running node's parts."""
        self.registry.register(collector)
        if collector.store is not None:
            collector.store.load_observer = self.adapter_load.observe

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric (blocking: chain reads may run; call from a thread)."""
        return generate_latest(self.registry)


@dataclass
class SettlementView:
    """What the settlement metrics read: the record log, and the operator's ledger and token (optional)."""

    records: RecordLog
    contracts: Any = None  # loraledger.node.chain.bindings.Contracts of the operator, or None without a chain
    operator: str = ""
    role: Any = None  # loraledger.node.serving.settler_role.SettlerRole of a fleet node, or None
    loop: Any = None  # loraledger.node.serving.settlement_loop.SettlementLoop (its health), or None
    chain_ttl: float = 15.0
    _chain: dict[str, float] = field(default_factory=dict)
    _read_at: float = -1e18
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def chain_values(self) -> dict[str, float]:
        """Epoch in effect, operator balance and allowance; refreshed at most every `chain_ttl` s."""
        if self.contracts is None or not self.operator:
            return {}
        with self._lock:
            if time.monotonic() - self._read_at >= self.chain_ttl:
                self._read_at = time.monotonic()
                try:
                    ledger, token = self.contracts.ledger, self.contracts.token
                    self._chain = {
                        "in_effect": float(ledger.root_in_effect(self.operator).epoch),
                        "eth": float(ledger.client.w3.eth.get_balance(ledger.client.address)),
                        "balance": float(token.balance_of(self.operator)),
                        "allowance": float(token.allowance(self.operator, ledger.address)),
                    }
                except (ChainError, OSError) as e:
                    log.warning("metrics: chain read failed (%s); keeping the last values", e)
            return dict(self._chain)


class NodeCollector(Collector):
    """Scrape-time gauges and counters of the engine, the admission queue, the adapter store and settlement."""

    def __init__(self, engine: Engine | None = None, service: GenerationService | None = None,
                 store: AdapterStore | None = None, settlement: SettlementView | None = None) -> None:
        self.engine = engine
        self.service = service
        self.store = store
        self.settlement = settlement

    def collect(self) -> Iterator[Metric]:
        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=value)

        if self.service is not None:
            yield gauge("loraledger_requests_in_flight", "Requests admitted and not yet answered",
                        self.service.inflight)
        if self.engine is not None:
            s = self.engine.stats()
            yield gauge("loraledger_engine_waiting", "Sequences waiting for the engine", s["waiting"])
            yield gauge("loraledger_engine_running", "Sequences running in the engine", s["running"])
            yield gauge("loraledger_kv_blocks_used", "KV cache blocks in use", s["kv_blocks_used"])
            yield gauge("loraledger_kv_blocks_free", "KV cache blocks free",
                        s["kv_blocks_total"] - s["kv_blocks_used"])
        if self.store is not None:
            st = self.store.stats
            yield gauge("loraledger_adapter_slots", "LoRA slots", self.store.num_slots)
            yield gauge("loraledger_adapter_slots_used", "LoRA slots holding an adapter", len(self.store.resident()))
            hits = CounterMetricFamily("loraledger_adapter_store_hits", "Adapter lookups served by a tier",
                                       labels=["tier"])
            hits.add_metric(["slot"], st.slot_hits)
            hits.add_metric(["cpu"], st.cpu_hits)
            yield hits
            misses = CounterMetricFamily("loraledger_adapter_store_misses", "Adapter lookups a tier missed",
                                         labels=["tier"])
            misses.add_metric(["slot"], st.slot_misses)
            misses.add_metric(["cpu"], st.disk_loads)
            yield misses
            yield CounterMetricFamily("loraledger_adapter_loads", "Adapter disk reads", value=st.disk_loads)
            yield CounterMetricFamily("loraledger_adapter_load_failures", "Adapter reads that failed",
                                      value=st.load_failures)
        if self.settlement is not None:
            yield from self._settlement(self.settlement)

    @staticmethod
    def _settlement(view: SettlementView) -> Iterator[Metric]:
        count, oldest = view.records.pending()
        yield GaugeMetricFamily("loraledger_records_pending", "Records not yet in an epoch", value=count)
        yield GaugeMetricFamily("loraledger_records_pending_fees", "Fees the next epoch will pull",
                                value=float(view.records.pending_fees()))
        yield GaugeMetricFamily("loraledger_settlement_lag_seconds", "Age of the oldest pending record",
                                value=0.0 if oldest is None else max(0.0, time.time() - oldest))
        last = view.records.last_confirmed()
        yield GaugeMetricFamily("loraledger_epoch_last_settled", "Last epoch confirmed on chain",
                                value=0 if last is None else last.epoch)
        if view.role is not None:
            role = view.role.status()
            yield GaugeMetricFamily("loraledger_settler", "1 while this node holds the fleet's settler role",
                                    value=1.0 if role.this_node else 0.0)
            holder = GaugeMetricFamily("loraledger_settler_holder", "The fleet node that settles (as last seen)",
                                       labels=["node"])
            holder.add_metric([role.holder or "none"], 1.0)
            yield holder
        chain = view.chain_values()
        if "in_effect" in chain:
            yield GaugeMetricFamily("loraledger_epoch_in_effect", "The operator's epoch in effect for claims",
                                    value=chain["in_effect"])
            yield GaugeMetricFamily("loraledger_operator_token_balance", "Operator's reward-token balance",
                                    value=chain["balance"])
            yield GaugeMetricFamily("loraledger_operator_token_allowance", "Ledger's allowance on the operator",
                                    value=chain["allowance"])
            yield GaugeMetricFamily("loraledger_operator_eth_balance_wei", "Operator's ETH balance (wei)",
                                    value=chain["eth"])
        if view.loop is not None:
            h = view.loop.health()
            state = GaugeMetricFamily("loraledger_settlement_state", "1 for the settlement loop's state",
                                      labels=["state", "cause"])
            for name in ("ok", "degraded", "stuck"):
                state.add_metric([name, h.cause if name == h.state else ""], 1.0 if name == h.state else 0.0)
            yield state
            yield GaugeMetricFamily("loraledger_settlement_failures", "Settlement failures in a row",
                                    value=h.failures)
            low = GaugeMetricFamily("loraledger_operator_low_funds", "1 while the operator's asset runs low",
                                    labels=["asset"])
            low.add_metric(["eth"], 1.0 if h.low_eth else 0.0)
            low.add_metric(["token"], 1.0 if h.low_tokens else 0.0)
            yield low
