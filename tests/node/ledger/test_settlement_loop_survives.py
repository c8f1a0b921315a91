"""The node's settlement loop survives what a public chain does to it, on a real anvil of its own: a token
shortfall, an ETH shortfall and an RPC outage each put it into backoff with the real cause named in its
health, and it resumes by itself once the operator is funded or the endpoint answers again."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from eth_account.signers.local import LocalAccount
from web3 import Web3

from loraledger.node.chain.bindings import Contracts
from loraledger.node.chain.client import ChainClient
from loraledger.node.chain.keys import dev_account
from loraledger.node.config import NodeConfig
from loraledger.node.ledger.funding import funding_report
from loraledger.node.ledger.record_log import RecordLog
from loraledger.node.serving.settlement_loop import SettlementLoop


def wait_for(pred: Callable[[], bool], what: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def loop_for(world: Any, op: LocalAccount, log_: RecordLog, rpc_url: str | None = None) -> SettlementLoop:
    cfg = NodeConfig()
    cfg.settlement.epoch_seconds = 0.5
    cfg.settlement.epoch_records = 1
    w3 = Web3(Web3.HTTPProvider(rpc_url or world.anvil.rpc_url, request_kwargs={"timeout": 5}))
    contracts = Contracts.at(ChainClient(w3, op), world.deployment.addresses)
    return SettlementLoop(log_, contracts, cfg, max_backoff=0.5, receipt_timeout=10.0, funds_every=0.5)


def test_token_shortfall_backs_off_names_the_cause_and_resumes_once_funded(delay_world: Any, tmp_path: Path) -> None:
    world = delay_world
    op = world.new_operator(tokens=1)
    with RecordLog.open(tmp_path / "log.sqlite") as log_:
        log_.append_many(world.records(random.Random(1), 4, 0))
        loop = loop_for(world, op, log_)
        loop.start()
        try:
            wait_for(lambda: loop.health().cause == "token_shortfall" and loop.health().failures >= 2,
                     "a token shortfall, retried")
            h = loop.health()
            assert h.state == "stuck" and f"operator {op.address} holds 1 reward tokens" in h.message
            assert loop._thread.is_alive() and log_.last_confirmed() is None
            wait_for(lambda: loop.health().low_tokens, "the low-token flag")
            world.bind(dev_account(0)).token.mint(op.address, 10**24)
            wait_for(lambda: log_.last_confirmed() is not None and loop.health().state == "ok", "recovery")
            assert world.bind(op).ledger.last_epoch(op.address) == 1
            assert loop.epochs_confirmed == 1 and loop.error is None
        finally:
            loop.stop()


def test_eth_shortfall_names_the_empty_balance_and_resumes_once_funded(delay_world: Any, tmp_path: Path) -> None:
    world = delay_world
    op = world.new_operator(eth=0)
    with RecordLog.open(tmp_path / "log.sqlite") as log_:
        log_.append_many(world.records(random.Random(2), 3, 0))
        loop = loop_for(world, op, log_)
        loop.start()
        try:
            wait_for(lambda: loop.health().failures >= 2, "failures")
            h = loop.health()
            assert h.cause == "eth_shortfall", h
            assert f"operator {op.address} holds 0 wei of ETH" in h.message and "send ETH" in h.message
            wait_for(lambda: loop.health().low_eth, "the low-ETH flag")
            report = funding_report(world.bind(op))
            assert report.eth_short and any("send ETH" in w for w in report.warnings)
            world.w3.provider.make_request("anvil_setBalance", [op.address, hex(10**20)])
            wait_for(lambda: log_.last_confirmed() is not None and loop.health().state == "ok", "recovery")
            assert world.bind(op).ledger.last_epoch(op.address) == 1
        finally:
            loop.stop()


def test_rpc_outage_backs_off_and_resumes_when_the_endpoint_returns(delay_world: Any, tmp_path: Path) -> None:
    from tests.node.ledger.conftest import TcpProxy

    world = delay_world
    op = world.new_operator()
    proxy = TcpProxy(int(world.anvil.port))
    proxy.up()
    with RecordLog.open(tmp_path / "log.sqlite") as log_:
        loop = loop_for(world, op, log_, proxy.url)
        loop.start()
        try:
            log_.append_many(world.records(random.Random(3), 2, 0))
            wait_for(lambda: log_.last_confirmed() is not None, "epoch 1 through the proxy")
            proxy.down()
            log_.append_many(world.records(random.Random(4), 2, 100))
            wait_for(lambda: loop.health().cause == "rpc_unreachable" and loop.health().failures >= 2,
                     "the outage, retried")
            assert loop.health().state in ("degraded", "stuck") and loop._thread.is_alive()
            last = log_.last_confirmed()
            assert last is not None and last.epoch == 1
            proxy.up()
            wait_for(lambda: (log_.last_confirmed() or last).epoch == 2 and loop.health().state == "ok", "recovery")
            assert world.bind(op).ledger.last_epoch(op.address) == 2
        finally:
            loop.stop()
            proxy.down()
