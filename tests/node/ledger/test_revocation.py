"""Revocations that stick, on a real anvil with a challenge delay: a revoked epoch's records are quarantined and
its amounts never come back; the next epoch builds on the last live state; `epoch resettle` pays the reviewed
records exactly once; an epoch on chain that the log did not build stops the node with what it found, and once
revoked the node numbers its own epoch after it."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from web3 import Web3

from loraledger.node.cli import main as cli
from loraledger.node.ledger.claims import claim
from loraledger.node.ledger.epochs import CONFIRMED, REVOKED, EpochProofs
from loraledger.node.ledger.record_log import RecordLog
from loraledger.node.ledger.settler import ForeignEpochError, Settler
from tests.node.ledger.test_settlement import World, build_world, expected_exact, make_records

DELAY = 3600


def _warp(w3: Web3, seconds: int) -> None:
    w3.provider.make_request("evm_increaseTime", [seconds])  # type: ignore[arg-type]
    w3.provider.make_request("evm_mine", [])  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def world(w3: Web3) -> World:
    return build_world(w3, challenge_delay=DELAY)


def test_revoked_epoch_is_quarantined_and_resettled_once(world: World, tmp_path: Path) -> None:
    w3 = world.w3
    operator = world.new_operator()
    op = world.bind(operator)
    rng = random.Random(3)
    e1, e2, e3 = make_records(world, rng, 12, 0), make_records(world, rng, 9, 100), make_records(world, rng, 7, 200)
    fees = {k: sum(int(r.fee) for r in e) for k, e in (("e1", e1), ("e2", e2), ("e3", e3))}
    with RecordLog.open(tmp_path / "log.sqlite") as log_:
        settler = Settler(log_, op)
        log_.append_many(e1)
        assert settler.settle() is not None
        _warp(w3, DELAY + 1)
        log_.append_many(e2)
        assert settler.settle() is not None  # epoch 2: pending in its delay
        world.admin.ledger.revoke_root(operator.address, 2)

        # the node takes the revocation in: epoch 2 quarantined, its records neither paid nor pending
        assert settler.sync_revocations() == [2]
        row2 = log_.epoch(2)
        assert row2 is not None and row2.state == REVOKED
        assert log_.pending()[0] == 0
        assert log_.cumulative_balances(2) == log_.cumulative_balances(1)

        # epoch 3 builds on epoch 1, the last live state: epoch 2's amounts do not come back
        log_.append_many(e3)
        out3 = settler.settle()
        assert out3 is not None and out3.epoch == 3
        assert int(out3.cumulative_total) == fees["e1"] + fees["e3"]
        assert op.ledger.live_tip(operator.address) == 3

        # reviewed: the operator resettles epoch 2; epoch 4 pays its records once
        assert cli(["epoch", "resettle", "2", "--records", str(tmp_path / "log.sqlite")]) == 0
        assert log_.pending()[0] == len(e2)
        assert cli(["epoch", "resettle", "2", "--records", str(tmp_path / "log.sqlite")]) == 1  # not twice
        out4 = settler.settle()
        assert out4 is not None and out4.epoch == 4
        assert int(out4.cumulative_total) == sum(fees.values())

        # after the delay every account claims exactly what an independent sum over e1 + e2 + e3 gives
        _warp(w3, DELAY + 1)
        proofs = EpochProofs(log_)
        exp = expected_exact(world, e1 + e2 + e3, operator.address, set(), {})
        claimer = world.bind(world.contributors[0])
        for account, want in exp.items():
            p = proofs.reward_proof(account, 4)
            assert p is not None and abs(int(p.cumulative_amount) - want) <= 3, (account, p, float(want))
            before = int(world.admin.token.balance_of(account))
            claim(claimer.ledger, p)
            assert int(world.admin.token.balance_of(account)) - before == int(p.cumulative_amount)
        assert sum(int(world.admin.ledger.claimed(operator.address, a)) for a in exp) == sum(fees.values())


def test_foreign_epoch_stops_the_node_until_revoked(world: World, tmp_path: Path) -> None:
    operator = world.new_operator()
    op = world.bind(operator)
    rng = random.Random(5)
    with RecordLog.open(tmp_path / "ours.sqlite") as ours, RecordLog.open(tmp_path / "theirs.sqlite") as theirs:
        # another process with the same key settles epoch 1 from its own log
        theirs.append_many(make_records(world, rng, 4, 500))
        assert Settler(theirs, op).settle() is not None
        ours.append_many(make_records(world, rng, 5, 600))
        settler = Settler(ours, op)
        with pytest.raises(ForeignEpochError) as err:
            settler.settle()
        msg = str(err.value)
        assert "did not build" in msg and "epoch revoke" in msg and "resettle" in msg
        assert op.ledger.last_epoch(operator.address) == 1  # nothing submitted on top of it

        # the guardian revokes it while pending: the node numbers its own epoch after it and goes on
        world.admin.ledger.revoke_root(operator.address, 1)
        assert [o.epoch for o in settler.resume()] == [2]
        rows = {r.epoch: r.state for r in ours.epochs()}
        assert rows == {1: REVOKED, 2: CONFIRMED}
        info = op.ledger.epoch(operator.address, 2)
        assert info.previous_live == 0 and not info.revoked


def test_adopt_an_epoch_another_log_built(world: World, tmp_path: Path) -> None:
    from loraledger.node.ledger.export import canonical_export

    operator = world.new_operator()
    op = world.bind(operator)
    rng = random.Random(8)
    dep = tmp_path / "deployment.json"
    dep.write_text(world.deployment.to_json())
    base = ["--deployment", str(dep), "--rpc-url", world.w3.provider.endpoint_uri,  # type: ignore[attr-defined]
            "--operator", operator.address]
    with RecordLog.open(tmp_path / "ours.sqlite") as ours, RecordLog.open(tmp_path / "theirs.sqlite") as theirs:
        theirs_records = make_records(world, rng, 6, 700)
        theirs.append_many(theirs_records)
        assert Settler(theirs, op).settle() is not None
        export = tmp_path / "epoch-1.export.json"
        export.write_bytes(canonical_export(theirs, 1))
        forged = tmp_path / "forged.json"
        forged.write_bytes(export.read_bytes().replace(b'"epoch":1', b'"epoch":1 '))
        ours_records = make_records(world, rng, 4, 800)
        ours.append_many(ours_records)
        settler = Settler(ours, op)
        with pytest.raises(ForeignEpochError, match="epoch adopt 1"):
            settler.settle()
        records = ["--records", str(tmp_path / "ours.sqlite")]
        assert cli(["epoch", "adopt", "1", "--export", str(forged), *base, *records]) == 1  # not the chain's
        assert cli(["epoch", "adopt", "1", "--export", str(export), *base, *records]) == 0
        assert [o.epoch for o in settler.resume()] == [2]
        fees = sum(int(r.fee) for r in theirs_records + ours_records)
        assert int(op.ledger.epoch(operator.address, 2).cumulative_total) == fees
        assert {r.epoch: r.state for r in ours.epochs()} == {1: CONFIRMED, 2: CONFIRMED}


def test_epoch_built_before_a_revocation_is_rebuilt_not_landed(world: World, tmp_path: Path) -> None:
    from loraledger.node.ledger.epochs import SettlementError

    operator = world.new_operator()
    op = world.bind(operator)
    rng = random.Random(9)
    e1, e2 = make_records(world, rng, 5, 900), make_records(world, rng, 6, 950)

    def revoke_epoch_1_under_it(step: str, n: int) -> None:
        if step == "approved" and n == 2 and not op.ledger.is_revoked(operator.address, 1):
            world.admin.ledger.revoke_root(operator.address, 1)  # epoch 2 is built on 1: the guardian revokes 1 now

    with RecordLog.open(tmp_path / "log.sqlite") as log_:
        log_.append_many(e1)
        assert Settler(log_, op).settle() is not None
        settler = Settler(log_, op, on_step=revoke_epoch_1_under_it)
        log_.append_many(e2)
        with pytest.raises(SettlementError, match="LedgerStaleParent"):
            settler.settle()  # names parent 1, no longer the live tip: it cannot land with epoch 1's amounts
        assert op.ledger.last_epoch(operator.address) == 1
        assert [o.epoch for o in settler.resume()] == [2]  # rebuilt on the live state (none) and sent
        assert {r.epoch: r.state for r in log_.epochs()} == {1: REVOKED, 2: CONFIRMED}
        info = op.ledger.epoch(operator.address, 2)
        assert int(info.cumulative_total) == sum(int(r.fee) for r in e2) and info.previous_live == 0
        assert len(log_.records_of_epoch(1)) == len(e1)  # epoch 1's records stay quarantined
