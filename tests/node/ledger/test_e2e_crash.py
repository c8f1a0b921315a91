"""kill -9 of `loraledger node run` (settlement on, token-level attribution on) during traffic and during the
settlement of an epoch, then restarts: every request whose response arrived has its record, no record is settled
twice (the chain's epochs hold exactly the log's records and fees), every record proof verifies on chain, and
every account's claim pays exactly once."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from loraledger.node.chain.keys import dev_account
from loraledger.node.commands.rewards import proof_from_node
from loraledger.node.ledger.claims import claim
from loraledger.node.serving.servicers import record_from_pb
from loraledger.proto.loraledger.v1 import loraledger_pb2 as pb
from loraledger.proto.loraledger.v1 import loraledger_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow

KEY_ENV = "LORALEDGER_CRASH_TEST_KEY"
KINDS: list[list[tuple[str, float]]] = [[("1", 1.0)], [("2", 1.0)], [("1", 0.5), ("2", 0.5)]]


def _config(world: Any, model_dir: Path, tmp: Path) -> Path:
    (tmp / "adapters").mkdir()
    q = lambda p: '"' + str(p) + '"'
    path = tmp / "node.toml"
    path.write_text("\n".join([
        "[server]", 'listen = "127.0.0.1:0"', "grace_seconds = 2.0",
        "[model]", f"dir = {q(model_dir)}", 'device = "cpu"', "max_num_seqs = 16", "max_tokens_per_step = 256",
        "[adapters]", f"dir = {q(tmp / 'adapters')}", "slots = 4", "max_rank = 8",
        "[chain]", f"deployment = {q(world.deployment_file)}", f'key_env = "{KEY_ENV}"',
        "[records]", f"path = {q(tmp / 'records.sqlite')}",
        "[settlement]", "enabled = true", "epoch_seconds = 1.0", "epoch_records = 10",
        "[attribution]", "token_level_lambda = 0.5", "workers = 1",
    ]) + "\n")
    return path


def _db(path: Path, sql: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        return list(conn.execute(sql).fetchall())
    finally:
        conn.close()


def _request(rid: str, k: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt=f"{rid}: owls hunt at night", request_id=rid,
                              adapters=[pb.AdapterRef(adapter=a, weight=w) for a, w in KINDS[k % len(KINDS)]],
                              sampling=pb.SamplingParams(max_tokens=3))


async def _traffic(address: str, prefix: str, workers: int, until: int,
                   on_count: Callable[[int], None] | None = None,
                   dead: Callable[[], bool] = lambda: False) -> dict[str, int]:
    """`workers` clients sending requests back to back until `until` answers arrived in all or the node died
    (`dead()`: an RPC error is expected only then); returns {request id: completion tokens} of every final
    response received. `on_count(n)` after each."""
    got: dict[str, int] = {}
    async with grpc.aio.insecure_channel(address) as ch:
        stub = pb_grpc.InferenceStub(ch)

        async def worker(w: int) -> None:
            k = 0
            while len(got) < until:
                rid = f"{prefix}-{w}-{k}"
                try:
                    if k % 2:
                        r = await stub.Generate(_request(rid, k + w), timeout=60)
                    else:
                        r = None
                        async for msg in stub.GenerateStream(_request(rid, k + w), timeout=60):
                            if msg.HasField("final"):
                                r = msg.final
                        assert r is not None
                except grpc.aio.AioRpcError:
                    if dead():
                        return
                    raise
                assert r.HasField("attribution") and r.request_id == rid
                got[rid] = r.usage.completion_tokens
                if on_count is not None:
                    on_count(len(got))
                k += 1

        await asyncio.gather(*(worker(w) for w in range(workers)))
    return got


def _wait_all_settled(address: str, records_db: Path, timeout: float = 90.0) -> list[pb.EpochInfo]:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as ch:
        stub = pb_grpc.AttributionStub(ch)
        while True:
            total = _db(records_db, "SELECT COUNT(*) FROM records")[0][0]
            epochs = list(stub.ListEpochs(pb.ListEpochsRequest(), timeout=10).epochs)
            if sum(e.record_count for e in epochs) == total and all(e.state == "confirmed" for e in epochs):
                return epochs
            assert time.monotonic() < deadline, f"{total} records, epochs {epochs}"
            time.sleep(0.3)


def _rpc(w3: Any, method: str, *params: Any) -> Any:
    resp = w3.provider.make_request(method, list(params))
    assert "error" not in resp, resp
    return resp.get("result")


def test_kill9_during_traffic_and_settlement(chain_world: Any, tiny_model_dir: Path, tmp_path: Path,
                                             node_runner: Callable[..., Any]) -> None:
    world = chain_world
    cfg = _config(world, tiny_model_dir, tmp_path)
    db = tmp_path / "records.sqlite"
    env = {KEY_ENV: world.operator_key()}
    args = ["--config", str(cfg)]
    received: dict[str, int] = {}

    # ---- 1. kill -9 in the middle of traffic
    node = node_runner(args, env)

    killed: list[bool] = []

    def kill_at(n: int) -> None:
        if n == 30 and not killed:
            killed.append(True)
            node.proc.kill()

    received.update(asyncio.run(_traffic(node.address, "t1", workers=6, until=10**6, on_count=kill_at,
                                         dead=lambda: bool(killed))))
    node.kill9()
    assert len(received) >= 30

    # ---- 2. restart: every answered request has its record; everything settles; then kill -9 mid-settlement
    node = node_runner(args, env)
    with grpc.insecure_channel(node.address) as ch:
        att = pb_grpc.AttributionStub(ch)
        for rid, completion in received.items():
            rec = att.GetRecord(pb.GetRecordRequest(request_id=rid), timeout=10).record
            assert rec.completion_tokens == completion, rid
    _wait_all_settled(node.address, db)
    w3 = world.w3
    _rpc(w3, "evm_setAutomine", False)
    try:
        received.update(asyncio.run(_traffic(node.address, "t2", workers=3, until=3)))
        deadline = time.monotonic() + 60
        while not _db(db, "SELECT epoch FROM epochs WHERE state = 'submitted'"):
            assert time.monotonic() < deadline, "no epoch reached `submitted` with mining paused"
            time.sleep(0.1)
        node.kill9()  # the submitEpoch transaction is signed, stored and in the mempool, not mined
        submitted = _db(db, "SELECT epoch, tx_hash FROM epochs WHERE state = 'submitted'")
    finally:
        _rpc(w3, "evm_setAutomine", True)
    _rpc(w3, "evm_mine")

    # ---- 3. restart: the submitted epoch is reconciled by its hash, the rest settles
    node = node_runner(args, env)
    epochs = _wait_all_settled(node.address, db)
    operator = world.operator.address
    ledger = world.bind(dev_account(0)).ledger
    n_epochs = len(epochs)
    assert [e.epoch for e in epochs] == list(range(1, n_epochs + 1))
    assert ledger.last_epoch(operator) == n_epochs, "every epoch landed once, in order"
    (ep, tx_hash), = submitted
    assert epochs[ep - 1].tx_hash == tx_hash, "the epoch pending at the kill was adopted, not sent again"
    for e in epochs:
        onchain = ledger.epoch(operator, e.epoch)
        assert (onchain.records_root, onchain.rewards_root) == (e.records_root, e.rewards_root)
        assert onchain.record_count == e.record_count
    total_records, unassigned = _db(db, "SELECT COUNT(*), SUM(epoch IS NULL) FROM records")[0]
    assert unassigned == 0 and sum(e.record_count for e in epochs) == total_records >= len(received)
    fees = sum(int(f) for (f,) in _db(db, "SELECT fee FROM records"))
    assert int(epochs[-1].cumulative_total) == fees == int(ledger.funded_total(operator))

    # every record's proof verifies on chain; every answered request is among them
    rids = [r for (r,) in _db(db, "SELECT request_id FROM records")]
    with grpc.insecure_channel(node.address) as ch:
        att = pb_grpc.AttributionStub(ch)
        for rid in rids:
            resp = att.GetRecord(pb.GetRecordRequest(request_id=rid), timeout=10)
            assert resp.settled and ledger.verify_record(operator, resp.record.epoch, record_from_pb(resp.record),
                                                         list(resp.proof))
        for rid in received:
            assert att.GetRecord(pb.GetRecordRequest(request_id=rid), timeout=10).settled

    # every account claims once and is paid its cumulative amount; a second claim pays nothing
    token = world.bind(dev_account(0)).token
    accounts = [c.address for c in world.contributors] + sorted(set(world.owners.values())) + [operator]
    payer = world.bind(dev_account(9)).ledger  # anyone may claim for an account
    for a in accounts:
        proof = proof_from_node(node.address, a)
        before = int(token.balance_of(a))
        assert claim(payer, proof).paid == proof.cumulative_amount > 0
        assert int(token.balance_of(a)) - before == int(proof.cumulative_amount)
        again = claim(payer, proof_from_node(node.address, a))
        assert again.paid == 0 and again.tx_hash is None
    assert int(ledger.claimed_total(operator)) == fees and int(token.balance_of(ledger.address)) == 0
    assert node.terminate() == 0
