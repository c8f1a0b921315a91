"""The record log on real SQLite files (and on a real PostgreSQL server where one can be started): group commit
under many writer threads, idempotent appends, epoch state machine, cumulative balances, and survival of
records whose append returned across a kill -9."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from loraledger.node.ledger.epochs import BUILT, CONFIRMED, OPEN, SUBMITTED
from loraledger.node.ledger.record_log import RecordLog, RecordLogError
from loraledger.node.ledger.records import AttributionRecord
from loraledger.node.types import Bytes32, TxHash, as_address

REPO = Path(__file__).resolve().parents[3]
A = as_address("0x" + "aa" * 20)
B = as_address("0x" + "bb" * 20)


def make_record(i: int, fee: int = 100) -> AttributionRecord:
    return AttributionRecord.create(
        request_id=i.to_bytes(32, "big"), adapter_ids=[1, 2], weights_bps=[5000, 5000], prompt_tokens=3,
        completion_tokens=4, fee=fee, output_hash=b"\x07" * 32, contributors={A: 2, B: 1})


def _exercise(log: RecordLog) -> None:
    """The checks every backend must pass."""
    assert log.append(make_record(1)) is True
    assert log.append(make_record(1)) is False  # a retry of the same record is a no-op
    with pytest.raises(RecordLogError, match="different content"):
        log.append(make_record(1, fee=999))
    assert log.append_many([make_record(i, fee=i) for i in range(2, 12)]) == 10
    assert log.get_record(make_record(5).request_id) == make_record(5, fee=5)
    assert log.pending()[0] == 11

    assert log.close_epoch(max_records=4) == 1
    assert log.close_epoch() == 2
    assert log.close_epoch() is None  # nothing pending
    e1 = log.records_of_epoch(1)
    assert [r.request_id for r in e1] == [make_record(i).request_id for i in (1, 2, 3, 4)]
    assert all(r.epoch == 1 for r in e1) and len(log.records_of_epoch(2)) == 7
    assert list(log.iter_records_of_epoch(2, chunk=3)) == log.records_of_epoch(2)
    row = log.epoch(1)
    assert row is not None and row.state == OPEN and row.record_count == 4 and row.fees_total == 100 + 2 + 3 + 4

    root = Bytes32("0x" + "01" * 32)
    with pytest.raises(RecordLogError, match="expected built"):
        log.mark_submitted(1, tx_hash=TxHash("0x" + "02" * 32), nonce=0, raw_tx="0x00")
    log.mark_built(1, records_root=root, rewards_root=root, cumulative_total=109, terms={"k": 1},
                   amounts={A: 100, B: 9}, cumulative={A: 100, B: 9})
    log.mark_submitted(1, tx_hash=TxHash("0x" + "02" * 32), nonce=7, raw_tx="0xabcd")
    row = log.epoch(1)
    assert row is not None and row.state == SUBMITTED and row.tx_nonce == 7 and row.raw_tx == "0xabcd"
    log.mark_failed(1, "reverted: test")
    row = log.epoch(1)
    assert row is not None and row.state == BUILT and row.tx_hash is None and row.last_error == "reverted: test"
    log.mark_confirmed(1, block_number=12)
    log.mark_built(2, records_root=root, rewards_root=root, cumulative_total=200, terms={},
                   amounts={A: 91}, cumulative={A: 191, B: 9})
    assert log.cumulative_balances(1) == {A: 100, B: 9}
    assert log.cumulative_balances(2) == {A: 191, B: 9}
    assert log.history(A) == [(1, 100, 100), (2, 91, 191)]
    assert [e.epoch for e in log.unfinished()] == [2]
    last = log.last_confirmed()
    assert last is not None and last.epoch == 1 and last.state == CONFIRMED and last.confirmed_block == 12


def test_sqlite_log(tmp_path: Path) -> None:
    with RecordLog.open(tmp_path / "log.sqlite") as log:
        assert log.backend == "sqlite"
        _exercise(log)
    with RecordLog.open(tmp_path / "log.sqlite") as again:  # reopens with everything in place
        assert again.record_count() == 11 and again.history(B) == [(1, 9, 9)]


def test_group_commit_many_writer_threads(tmp_path: Path) -> None:
    threads_n, per_thread = 16, 40
    with RecordLog.open(tmp_path / "log.sqlite") as log:
        errors: list[BaseException] = []

        def writer(t: int) -> None:
            try:
                for k in range(per_thread):
                    assert log.append(make_record(1_000_000 + t * per_thread + k))
            except BaseException as e:  # noqa: BLE001 - re-raised in the main thread below
                errors.append(e)

        threads = [threading.Thread(target=writer, args=(t,)) for t in range(threads_n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert log.record_count() == threads_n * per_thread
        assert log.commits < threads_n * per_thread  # appends shared commits


def test_epoch_transitions_while_records_are_appended(tmp_path: Path) -> None:
    """The settlement thread moves epochs through their states while the writer thread keeps appending: a
    transition that read before the appender committed must still get the write lock (no "database is locked")."""
    with RecordLog.open(tmp_path / "log.sqlite") as log:
        log.append_many([make_record(i) for i in range(1, 41)])
        closed = [log.close_epoch(max_records=1) for _ in range(40)]
        assert closed == list(range(1, 41))
        stop = threading.Event()
        appended: list[int] = []

        def writer() -> None:
            i = 1000
            while not stop.is_set():
                log.append(make_record(i))
                appended.append(i)
                i += 1

        thread = threading.Thread(target=writer)
        thread.start()
        root = Bytes32("0x" + "01" * 32)
        try:
            for n in closed:
                log.mark_built(n, records_root=root, rewards_root=root, cumulative_total=100 * n, terms={},
                               amounts={A: 100}, cumulative={A: 100 * n})
                log.mark_submitted(n, tx_hash=TxHash("0x" + f"{n:064x}"), nonce=n, raw_tx="0x00")
                log.mark_confirmed(n, block_number=n)
        finally:
            stop.set()
            thread.join()
        assert all(log.epoch(n).state == CONFIRMED for n in closed)  # type: ignore[union-attr]
        assert appended and log.record_count() == 40 + len(appended)


def test_open_needs_exactly_one_target(tmp_path: Path) -> None:
    with pytest.raises(RecordLogError, match="exactly one"):
        RecordLog.open()
    with pytest.raises(RecordLogError, match="exactly one"):
        RecordLog.open(tmp_path / "x.sqlite", dsn="postgresql://x")
    log = RecordLog.open(tmp_path / "x.sqlite")
    log.close()
    with pytest.raises(RecordLogError, match="closed"):
        log.append(make_record(1))


_CHILD = """
import sys
import tempfile
from loraledger.node.ledger.record_log import RecordLog
from tests_child_records import make_record
log = RecordLog.open(sys.argv[1])
i = 0
while True:
    log.append(make_record(i))
    print(i, flush=True)
    i += 1
"""


def test_appended_records_survive_kill_9(tmp_path: Path) -> None:
    (tmp_path / "tests_child_records.py").write_text(
        "from loraledger.node.ledger.records import AttributionRecord\n"
        "def make_record(i):\n"
        "    return AttributionRecord.create(request_id=i.to_bytes(32, 'big'), adapter_ids=[1], weights_bps=[10000],"
        " prompt_tokens=1, completion_tokens=1, fee=i, output_hash=b'\\x01' * 32, contributors={'0x' + 'aa' * 20: 1})\n")
    db = tmp_path / "crash.sqlite"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{tmp_path}"}
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(db)], stdout=subprocess.PIPE, text=True, env=env)
    acked: list[int] = []
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    while len(acked) < 200 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        acked.append(int(line))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    assert proc.returncode == -signal.SIGKILL
    assert len(acked) >= 200, "the child appended too few records before the deadline"
    with RecordLog.open(db) as log:
        for i in acked:
            assert log.get_record(Bytes32("0x" + i.to_bytes(32, "big").hex())) is not None, f"record {i} lost"
        assert log.record_count() >= len(acked)


# ---------------------------------------------------------------------- PostgreSQL


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def postgres_dsn() -> Iterator[str]:
    """$LORALEDGER_TEST_POSTGRES_DSN, else a throw-away cluster from the installed initdb/pg_ctl; else skip."""
    if os.environ.get("LORALEDGER_TEST_POSTGRES_DSN"):
        yield os.environ["LORALEDGER_TEST_POSTGRES_DSN"]
        return
    pytest.importorskip("psycopg")
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("no PostgreSQL server reachable (set LORALEDGER_TEST_POSTGRES_DSN) and no initdb to start one")
    prefix: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root: run the cluster as the `postgres` user
        runuser = shutil.which("runuser")
        if runuser is None:
            pytest.skip("running as root without runuser: cannot start a throw-away PostgreSQL cluster")
        prefix = [runuser, "-u", "postgres", "--"]
    base = Path(tempfile.mkdtemp(prefix="loraledger-pg-"))  # outside pytest's 0700 tree, for the postgres user
    data = base / "data"
    if prefix:
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no `postgres` user to run a throw-away cluster")
        os.chown(base, pw.pw_uid, pw.pw_gid)
    port = _free_port()
    def run(*cmd: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*prefix, *cmd], capture_output=True, text=True, timeout=120, check=False)

    res = run(initdb, "-D", str(data), "-A", "trust", "-U", "loraledger", "--no-sync")
    if res.returncode != 0:
        pytest.skip(f"initdb failed, cannot start a throw-away PostgreSQL: {res.stderr[-400:]}")
    opts = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off"
    res = run(pg_ctl, "-D", str(data), "-o", opts, "-l", str(base / "pg.log"), "-w", "start")
    if res.returncode != 0:
        pytest.skip(f"pg_ctl start failed: {res.stderr[-400:]} {(base / 'pg.log').read_text()[-400:]}")
    try:
        yield f"postgresql://loraledger@127.0.0.1:{port}/postgres"
    finally:
        run(pg_ctl, "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(base, ignore_errors=True)


def test_postgres_log(postgres_dsn: str) -> None:
    import psycopg

    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        for table in ("records", "epochs", "balances"):
            conn.execute(f"DROP TABLE IF EXISTS {table}")
    with RecordLog.open(dsn=postgres_dsn) as log:
        assert log.backend == "postgres"
        _exercise(log)
        errors: list[BaseException] = []

        def writer(t: int) -> None:
            try:
                for k in range(20):
                    log.append(make_record(5_000_000 + t * 20 + k))
            except BaseException as e:  # noqa: BLE001 - re-raised in the main thread below
                errors.append(e)

        threads = [threading.Thread(target=writer, args=(t,)) for t in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert log.record_count() == 11 + 160
    with RecordLog.open(dsn=postgres_dsn) as again:
        assert again.cumulative_balances(2) == {A: 191, B: 9}
