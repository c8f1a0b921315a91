"""The settler role on a real PostgreSQL: one holder at a time, the role freed by a killed process, the fence that
stops a holder who lost its connection from writing epoch state, and the barrier a new holder passes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import pytest

from loraledger.node.ledger.record_log import RecordLog
from loraledger.node.ledger.records import AttributionRecord
from loraledger.node.serving.settler_role import SettlerRole, SettlerRoleLost, fleet_holder
from loraledger.node.types import AdapterId, Address, Bytes32, Wei


def _record(i: int) -> AttributionRecord:
    return AttributionRecord(
        epoch=0, request_id=Bytes32("0x" + f"{i:064x}"), adapter_ids=(AdapterId(1),), weights_bps=(10_000,),
        prompt_tokens=3, completion_tokens=4, fee=Wei(12), output_hash=Bytes32("0x" + "ab" * 32),
        attribution_hash=Bytes32("0x" + "cd" * 32),
        contributors=((Address("0x" + "11" * 20), 1),))


def _wait_for(pred: Callable[[], bool], timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


def test_one_holder_and_who_it_is(fresh_db: Callable[[], str]) -> None:
    dsn = fresh_db()
    a, b = SettlerRole(dsn, "node-a", 0.05), SettlerRole(dsn, "node-b", 0.05)
    try:
        assert fleet_holder(dsn) == ""
        assert a.acquire()
        assert not b.acquire(now=1e12)
        assert a.acquire()  # still holds, checked on its own connection
        assert a.status().this_node and a.status().holder == "node-a" and a.status().since > 0
        assert not b.status().this_node and b.status().holder == "node-a"
        assert fleet_holder(dsn) == "node-a" and b.holder() == "node-a"
        assert b.guard(lambda: [1]) == []  # a standby does not tick
        assert a.guard(lambda: [1]) == [1]
        a.release()
        assert fleet_holder(dsn) == ""
        assert b.acquire(now=2e12) and fleet_holder(dsn) == "node-b"
        assert not a.acquire(now=3e12)
    finally:
        a.release()
        b.release()


def test_many_racers_one_holder(fresh_db: Callable[[], str]) -> None:
    """Eight roles try at the same instant, many times over: never two holders."""
    dsn = fresh_db()
    roles = [SettlerRole(dsn, f"n{i}", 0.001) for i in range(8)]
    try:
        for round_ in range(15):
            start = threading.Barrier(len(roles))
            got: list[str] = []

            def race(r: SettlerRole, start: threading.Barrier, got: list[str]) -> None:
                start.wait()
                if r.acquire():
                    got.append(r.node_name)

            threads = [threading.Thread(target=race, args=(r, start, got)) for r in roles]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert len(got) == 1, (round_, got)
            assert fleet_holder(dsn) == got[0]
            next(r for r in roles if r.node_name == got[0]).release()
    finally:
        for r in roles:
            r.release()


def test_kill9_frees_the_role(fresh_db: Callable[[], str]) -> None:
    dsn = fresh_db()
    code = ("import sys, time; from loraledger.node.serving.settler_role import SettlerRole; "
            "r = SettlerRole(sys.argv[1], 'doomed', 0.05); assert r.acquire(); print('held', flush=True); "
            "time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, dsn], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        b = SettlerRole(dsn, "heir", 0.05)
        assert not b.acquire() and b.status().holder == "doomed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        assert _wait_for(b.acquire, 10.0), "the role was not freed by the holder's death"
        assert fleet_holder(dsn) == "heir"
        b.release()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_fence_stops_a_holder_that_lost_its_connection(fresh_db: Callable[[], str]) -> None:
    """A holder whose lock connection dies without it noticing can no longer close or move an epoch; the new
    holder can, and sees what the old one committed."""
    import psycopg

    dsn = fresh_db()
    a, b = SettlerRole(dsn, "old", 0.01), SettlerRole(dsn, "new", 0.01)
    with RecordLog.open(dsn=dsn) as log_a, RecordLog.open(dsn=dsn) as log_b:
        log_a.fence, log_b.fence = a.fence, b.fence
        log_a.append_many([_record(i) for i in range(1, 4)])
        assert a.acquire()
        assert log_a.close_epoch() == 1  # the holder may
        with pytest.raises(SettlerRoleLost):
            log_b.close_epoch()  # a standby may not
        log_a.append(_record(9))
        # the old holder's lock session is cut (a network failure, an admin) and the new node takes the role
        with psycopg.connect(dsn, autocommit=True) as admin:
            pid = admin.execute("SELECT pid FROM pg_stat_activity WHERE application_name = 'loraledger settler old'"
                                ).fetchone()[0]
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        assert _wait_for(lambda: b.acquire(now=time.monotonic() + 1), 5.0)
        with pytest.raises(SettlerRoleLost):
            log_a.close_epoch()  # the old holder, not knowing yet: fenced off
        with pytest.raises(SettlerRoleLost):
            log_a.mark_failed(1, "stale")
        assert log_a.epoch(1) is not None and log_a.epoch(1).state == "open"  # type: ignore[union-attr]
        assert log_b.close_epoch() == 2
        assert [len(log_b.records_of_epoch(n)) for n in (1, 2)] == [3, 1]
        assert a.guard(lambda: [1]) == []  # and its loop learns it is no longer the settler
        assert not a.status().this_node and a.status().holder == ""
        assert not a.acquire(now=time.monotonic() + 10)  # its next try finds the lock taken, and by whom
        assert a.status().holder == "new"
    a.release()
    b.release()


def test_barrier_waits_for_the_old_holders_open_transition(fresh_db: Callable[[], str]) -> None:
    """A transition the old holder began while it still held the role commits before the new holder reads."""
    import psycopg

    dsn = fresh_db()
    a, b = SettlerRole(dsn, "old", 0.01), SettlerRole(dsn, "new", 0.01)
    with RecordLog.open(dsn=dsn) as log_a, RecordLog.open(dsn=dsn) as log_b:
        log_a.fence, log_b.fence = a.fence, b.fence
        log_a.append_many([_record(i) for i in range(1, 4)])
        assert a.acquire()
        entered, proceed = threading.Event(), threading.Event()

        def slow_fence(conn: object) -> None:
            a.fence(conn)
            entered.set()
            proceed.wait(10)

        log_a.fence = slow_fence
        closer = threading.Thread(target=log_a.close_epoch)
        closer.start()
        assert entered.wait(10)
        with psycopg.connect(dsn, autocommit=True) as admin:
            pid = admin.execute("SELECT pid FROM pg_stat_activity WHERE application_name = 'loraledger settler old'"
                                ).fetchone()[0]
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        took: list[bool] = []
        taker = threading.Thread(target=lambda: took.append(
            _wait_for(lambda: b.acquire(now=time.monotonic() + 1), 10.0)))
        taker.start()
        time.sleep(0.5)
        assert not took  # blocked in the barrier while the old transition is open
        proceed.set()
        closer.join(10)
        taker.join(15)
        assert took == [True]
        assert log_b.last_epoch() is not None and log_b.last_epoch().epoch == 1  # type: ignore[union-attr]
    a.release()
    b.release()


def test_epoch_settle_by_hand_waits_for_the_fleets_settler(fresh_db: Callable[[], str], chain_world: object,
                                                          capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from loraledger.node.cli import main as cli

    dsn = fresh_db()
    world = chain_world
    with RecordLog.open(dsn=dsn) as log_:
        log_.append(_record(1))
    monkeypatch.setenv("LORALEDGER_PRIVATE_KEY", world.operator.key.hex())  # type: ignore[attr-defined]
    node = SettlerRole(dsn, "gpu-a:50051")
    assert node.acquire()
    args = ["epoch", "settle", "--records", dsn, "--deployment", str(world.deployment_file),  # type: ignore[attr-defined]
            "--rpc-url", world.rpc_url]  # type: ignore[attr-defined]
    try:
        assert cli(args) == 1
        assert "gpu-a:50051 holds the settler role" in capsys.readouterr().err
    finally:
        node.release()
    with RecordLog.open(dsn=dsn) as log_:
        assert log_.pending()[0] == 1 and log_.epochs() == []  # nothing closed while the node held the role
