"""The durable record log: every attribution record, the epoch state machine, and cumulative balances.

    log = RecordLog.open(path="records.sqlite")            # or RecordLog.open(dsn="postgresql://...")
    log.append(record)                                      # returns once the record is durable on disk
    n = log.close_epoch(max_records=10_000)                 # assigns pending records to a new epoch "open"

Backends, chosen by `open`: SQLite in WAL mode with `synchronous=FULL` (the embedded default), or PostgreSQL
through psycopg for several nodes of one operator. Both use the same tables:

    records   (seq, request_id UNIQUE, epoch NULL until assigned, adapter_ids, weights_bps, prompt_tokens,
               completion_tokens, fee, output_hash, attribution_hash, contributors, appended_at)
    epochs    (epoch, state, closed_at, record_count, fees_total, records_root, rewards_root, cumulative_total,
               terms, tx_hash, tx_nonce, raw_tx, submitted_at, confirmed_block, last_error)
    balances  (epoch, account, amount, cumulative)       -- only accounts paid in that epoch

uint256 values are stored as decimal TEXT (SQLite integers are 64-bit). Epoch states:

    open -> built (roots, amounts, balances) -> submitted (signed tx: hash, nonce, raw bytes) -> confirmed

Group commit: `append` hands the record to one writer thread, which takes everything queued (up to
`max_batch`), inserts it in one transaction, commits (one fsync) and only then releases every waiting caller.
Many threads appending at once therefore share fsyncs. Appending a request id already logged with the same
content is a no-op (a retry); with different content it raises RecordLogError.
"""

from __future__ import annotations

import json
import logging
import queue
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self

from loraledger.node.errors import NodeError
from loraledger.node.ledger.epochs import BUILT, CONFIRMED, OPEN, RESETTLED, REVOKED, SUBMITTED, EpochRow
from loraledger.node.ledger.records import AttributionRecord
from loraledger.node.types import AdapterId, Address, Bytes32, TxHash, Wei

log = logging.getLogger(__name__)



class RecordLogError(NodeError, RuntimeError):
    """The record log cannot do what was asked (closed, conflicting record, bad epoch transition)."""


_RECORD_COLUMNS = ("request_id", "adapter_ids", "weights_bps", "prompt_tokens", "completion_tokens", "fee",
                   "output_hash", "attribution_hash", "contributors", "appended_at")

_SCHEMA_SQLITE = """
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL UNIQUE,
    epoch INTEGER,
    adapter_ids TEXT NOT NULL, weights_bps TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL,
    fee TEXT NOT NULL, output_hash TEXT NOT NULL, attribution_hash TEXT NOT NULL,
    contributors TEXT NOT NULL, appended_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS records_epoch ON records (epoch, seq);
CREATE TABLE IF NOT EXISTS epochs (
    epoch INTEGER PRIMARY KEY, state TEXT NOT NULL, closed_at REAL NOT NULL, record_count INTEGER NOT NULL,
    fees_total TEXT NOT NULL, records_root TEXT, rewards_root TEXT, cumulative_total TEXT, terms TEXT,
    tx_hash TEXT, tx_nonce INTEGER, raw_tx TEXT, submitted_at REAL, confirmed_block INTEGER, last_error TEXT
);
CREATE TABLE IF NOT EXISTS balances (
    epoch INTEGER NOT NULL, account TEXT NOT NULL, amount TEXT NOT NULL, cumulative TEXT NOT NULL,
    PRIMARY KEY (epoch, account)
);
CREATE INDEX IF NOT EXISTS balances_account ON balances (account, epoch);
"""

_SCHEMA_POSTGRES = _SCHEMA_SQLITE.replace("seq INTEGER PRIMARY KEY AUTOINCREMENT", "seq BIGSERIAL PRIMARY KEY") \
    .replace("appended_at REAL", "appended_at DOUBLE PRECISION").replace("closed_at REAL", "closed_at DOUBLE PRECISION") \
    .replace("submitted_at REAL", "submitted_at DOUBLE PRECISION").replace("confirmed_block INTEGER", "confirmed_block BIGINT") \
    .replace("tx_nonce INTEGER", "tx_nonce BIGINT").replace("epoch INTEGER", "epoch BIGINT")


_EPOCH_COLUMNS = ("epoch", "state", "closed_at", "record_count", "fees_total", "records_root", "rewards_root",
                  "cumulative_total", "terms", "tx_hash", "tx_nonce", "raw_tx", "submitted_at", "confirmed_block",
                  "last_error")


def _epoch_row(row: Sequence[Any]) -> EpochRow:
    d = dict(zip(_EPOCH_COLUMNS, row, strict=True))
    return EpochRow(
        epoch=int(d["epoch"]), state=str(d["state"]), closed_at=float(d["closed_at"]),
        record_count=int(d["record_count"]), fees_total=Wei(int(d["fees_total"])),
        records_root=d["records_root"], rewards_root=d["rewards_root"],
        cumulative_total=None if d["cumulative_total"] is None else Wei(int(d["cumulative_total"])),
        terms=None if d["terms"] is None else json.loads(d["terms"]),
        tx_hash=d["tx_hash"], tx_nonce=None if d["tx_nonce"] is None else int(d["tx_nonce"]), raw_tx=d["raw_tx"],
        submitted_at=d["submitted_at"], confirmed_block=None if d["confirmed_block"] is None else int(d["confirmed_block"]),
        last_error=d["last_error"],
    )


def _record_row(r: AttributionRecord, now: float) -> tuple[Any, ...]:
    """The row of one record. The list columns are JSON (ids and weights as decimal strings), written by hand
    because this runs per append: '["3","7"]', '[7000,3000]', '[["0xAb..","12"],...]'."""
    ids = '["' + '","'.join(str(i) for i in r.adapter_ids) + '"]'
    weights = "[" + ",".join(str(w) for w in r.weights_bps) + "]"
    contribs = "[" + ",".join(f'["{a}","{w}"]' for a, w in r.contributors) + "]"
    return (r.request_id, ids, weights, r.prompt_tokens, r.completion_tokens, str(int(r.fee)), r.output_hash,
            r.attribution_hash, contribs, now)


def _row_record(row: Sequence[Any]) -> AttributionRecord:
    """(epoch, request_id, adapter_ids, ..., contributors) -> AttributionRecord (epoch 0 when unassigned)."""
    (epoch, request_id, adapter_ids, weights, prompt, completion, fee, output_hash, attribution, contributors) = row
    return AttributionRecord(
        epoch=int(epoch or 0), request_id=Bytes32(request_id),
        adapter_ids=tuple(AdapterId(int(i)) for i in json.loads(adapter_ids)), weights_bps=tuple(json.loads(weights)),
        prompt_tokens=int(prompt), completion_tokens=int(completion), fee=Wei(int(fee)),
        output_hash=Bytes32(output_hash), attribution_hash=Bytes32(attribution),
        contributors=tuple((Address(a), int(w)) for a, w in json.loads(contributors)),
    )


_RECORD_FIELDS = ("epoch, request_id, adapter_ids, weights_bps, prompt_tokens, completion_tokens, fee, "
                  "output_hash, attribution_hash, contributors")
_SELECT_RECORD = f"SELECT {_RECORD_FIELDS} FROM records"


class _Backend(ABC):
    """How to reach one database: connections, placeholder style, and the epoch-closing lock."""

    name = ""

    @abstractmethod
    def connect(self) -> Any:
        """A new connection in autocommit mode (transactions are begun explicitly)."""

    def sql(self, text: str) -> str:
        return text

    @abstractmethod
    def begin_exclusive(self, conn: Any) -> None:
        """Begin a transaction that locks out other epoch closers."""

    def begin_write(self, conn: Any) -> None:
        """Start a transaction that will write (takes the write lock up front where the database needs it)."""
        conn.execute("BEGIN")

    @abstractmethod
    def init_schema(self, conn: Any) -> None:
        """Create the tables if they do not exist."""


class _SQLiteBackend(_Backend):
    name = "sqlite"

    def __init__(self, path: Path, synchronous: str) -> None:
        self.path = path
        self.synchronous = synchronous

    def connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=60.0, isolation_level=None, check_same_thread=False)
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise RecordLogError(f"{self.path}: SQLite refused WAL mode (got {mode!r}); is it on a network share?")
        conn.execute(f"PRAGMA synchronous={self.synchronous}")
        conn.execute("PRAGMA busy_timeout=60000")
        return conn

    def begin_exclusive(self, conn: Any) -> None:
        conn.execute("BEGIN IMMEDIATE")

    def begin_write(self, conn: Any) -> None:
        # A deferred BEGIN that reads and then writes cannot upgrade its lock in WAL mode once the appender
        # thread committed in between (SQLITE_BUSY at once, the busy timeout does not apply): take it first.
        conn.execute("BEGIN IMMEDIATE")

    def init_schema(self, conn: Any) -> None:
        conn.executescript(_SCHEMA_SQLITE)


class _PostgresBackend(_Backend):
    name = "postgres"

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    def connect(self) -> Any:
        try:
            import psycopg
        except ImportError as e:
            raise RecordLogError("the PostgreSQL record log needs psycopg: pip install 'loraledger[postgres]'") from e
        try:
            return psycopg.connect(self.dsn, autocommit=True)
        except psycopg.OperationalError as e:
            raise RecordLogError(f"cannot connect to PostgreSQL at {self.dsn!r}: {e}") from e

    def sql(self, text: str) -> str:
        return text.replace("?", "%s")

    def begin_exclusive(self, conn: Any) -> None:
        conn.execute("BEGIN")
        conn.execute("LOCK TABLE epochs IN EXCLUSIVE MODE")

    def init_schema(self, conn: Any) -> None:
        conn.execute("SELECT pg_advisory_lock(74201)")  # several nodes may start at once
        try:
            for stmt in _SCHEMA_POSTGRES.split(";"):
                if stmt.strip():
                    conn.execute(stmt)
        finally:
            conn.execute("SELECT pg_advisory_unlock(74201)")


_Item = tuple[list[AttributionRecord], "Future[int]"]


class RecordLog:
    """The record log (module docstring). Thread-safe; use `RecordLog.open(...)`, then `close()`."""

    def __init__(self, backend: _Backend, *, max_batch: int = 4096) -> None:
        self._backend = backend
        self.max_batch = max_batch
        self._ctl = backend.connect()
        backend.init_schema(self._ctl)
        self._ctl_lock = threading.RLock()
        self._queue: queue.Queue[_Item | None] = queue.Queue()
        self._closed = False
        # fence(conn): run first in every epoch-state transaction (close, mark_*); raising aborts it. A fleet's
        # settler sets it to check that it still holds the settler role (loraledger.node.serving.settler_role).
        self.fence: Callable[[Any], None] | None = None
        self.commits = 0  # group commits done by the writer (records / commits = mean batch size)
        self._writer_conn = backend.connect()
        self._writer = threading.Thread(target=self._write_loop, name="record-log-writer", daemon=True)
        self._writer.start()

    @classmethod
    def open(cls, path: str | Path | None = None, *, dsn: str | None = None, synchronous: str = "FULL",
             max_batch: int = 4096) -> RecordLog:
        """SQLite at `path` (WAL, `synchronous` FULL by default: durable against power loss too) or, when `dsn`
        is given, PostgreSQL. Exactly one of the two."""
        if (path is None) == (not dsn):
            raise RecordLogError("give the record log exactly one of a SQLite path or a PostgreSQL DSN")
        if dsn:
            return cls(_PostgresBackend(dsn), max_batch=max_batch)
        if synchronous.upper() not in ("FULL", "NORMAL", "EXTRA"):
            raise RecordLogError(f"synchronous must be FULL, NORMAL or EXTRA, got {synchronous!r}")
        p = Path(path)  # type: ignore[arg-type]
        p.parent.mkdir(parents=True, exist_ok=True)
        return cls(_SQLiteBackend(p, synchronous.upper()), max_batch=max_batch)

    @property
    def backend(self) -> str:
        """"sqlite" or "postgres"."""
        return self._backend.name

    # ------------------------------------------------------------------ appending (group commit)

    def append_async(self, records: AttributionRecord | Sequence[AttributionRecord]) -> Future[int]:
        """Queue records for the writer; the future resolves (to how many were new) once they are durable."""
        if self._closed:
            raise RecordLogError("record log is closed")
        batch = [records] if isinstance(records, AttributionRecord) else list(records)
        for r in batch:
            if r.epoch != 0:
                raise RecordLogError(f"record {r.request_id} already carries epoch {r.epoch}; append unassigned "
                                     "records (epoch 0): the log assigns epochs when it closes one")
        fut: Future[int] = Future()
        self._queue.put((batch, fut))
        return fut

    def append(self, record: AttributionRecord, timeout: float | None = 60.0) -> bool:
        """Append one record; returns once it is committed (True: new, False: same record already logged)."""
        return self.append_async(record).result(timeout) == 1

    def append_many(self, records: Sequence[AttributionRecord], timeout: float | None = 300.0) -> int:
        """Append many records in one group; returns how many were new, once all are committed."""
        return self.append_async(records).result(timeout)

    def _write_loop(self) -> None:
        conn = self._writer_conn
        while True:
            item = self._queue.get()
            if item is None:
                return
            items = [item]
            size = len(item[0])
            stop = False
            while size < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                items.append(nxt)
                size += len(nxt[0])
            self._commit_batch(conn, items)
            if stop:
                return

    def _commit_batch(self, conn: Any, items: list[_Item]) -> None:
        now = time.time()
        rows = [_record_row(r, now) for batch, _ in items for r in batch]
        sql = self._backend.sql(
            f"INSERT INTO records ({', '.join(_RECORD_COLUMNS)}) VALUES ({', '.join('?' * len(_RECORD_COLUMNS))}) "
            "ON CONFLICT (request_id) DO NOTHING")
        try:
            conn.execute("BEGIN")
            cur = conn.cursor()
            cur.executemany(sql, rows)
            inserted = cur.rowcount
            conn.execute("COMMIT")
            self.commits += 1
        except Exception as e:  # noqa: BLE001 - every waiter must learn of the failure, whatever it was
            self._rollback(conn)
            err = RecordLogError(f"appending {len(rows)} records failed: {e}")
            err.__cause__ = e
            for _, fut in items:
                fut.set_exception(err)
            return
        if inserted == len(rows):
            for batch, fut in items:
                fut.set_result(len(batch))
            return
        self._resolve_duplicates(conn, items, now)

    def _resolve_duplicates(self, conn: Any, items: list[_Item], now: float) -> None:
        """Some rows already existed: for each caller, count its new rows and reject changed duplicates."""
        for batch, fut in items:
            new = 0
            conflict: str | None = None
            for r in batch:
                stored = self._read_record(conn, r.request_id)
                if stored is None:
                    conflict = f"record {r.request_id} was not stored"
                    break
                row_now = _record_row(r, now)[:-1]
                if _record_row(stored[0], now)[:-1] != row_now:
                    conflict = (f"request id {r.request_id} is already logged with different content; "
                                "request ids must be unique per answer")
                    break
                if stored[1] >= now:
                    new += 1
            if conflict:
                fut.set_exception(RecordLogError(conflict))
            else:
                fut.set_result(new)

    def _read_record(self, conn: Any, request_id: str) -> tuple[AttributionRecord, float] | None:
        row = conn.execute(self._backend.sql(
            f"SELECT {_RECORD_FIELDS}, appended_at FROM records WHERE request_id = ?"),
            (request_id,)).fetchone()
        if row is None:
            return None
        return _row_record(row[:-1]), float(row[-1])

    @staticmethod
    def _rollback(conn: Any) -> None:
        try:
            conn.execute("ROLLBACK")
        except Exception as e:  # noqa: BLE001 - sqlite3 or psycopg; the error that caused the rollback matters
            log.warning("rollback failed (the transaction may already be gone): %s", e)

    def flush(self, timeout: float | None = 60.0) -> None:
        """Wait until everything queued so far is committed."""
        self.append_async([]).result(timeout)

    def close(self) -> None:
        """Commit what is queued, stop the writer, close the connections. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._writer.join()
        self._writer_conn.close()
        with self._ctl_lock:
            self._ctl.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ control connection helpers

    @contextmanager
    def _tx(self, exclusive: bool = False) -> Iterator[Any]:
        """A transaction on the control connection (exclusive: also locks out other epoch closers)."""
        with self._ctl_lock:
            conn = self._ctl
            if exclusive:
                self._backend.begin_exclusive(conn)
            else:
                self._backend.begin_write(conn)
            try:
                if self.fence is not None:
                    self.fence(conn)
                yield conn
            except BaseException:
                self._rollback(conn)
                raise
            conn.execute("COMMIT")

    def _q(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._ctl_lock:
            return [tuple(r) for r in self._ctl.execute(self._backend.sql(sql), tuple(params)).fetchall()]

    # ------------------------------------------------------------------ records

    def record_count(self) -> int:
        return int(self._q("SELECT COUNT(*) FROM records")[0][0])

    def pending(self) -> tuple[int, float | None]:
        """(records not yet in an epoch, append time of the oldest of them or None)."""
        n, oldest = self._q("SELECT COUNT(*), MIN(appended_at) FROM records WHERE epoch IS NULL")[0]
        return int(n), None if oldest is None else float(oldest)

    def pending_fees(self) -> Wei:
        """The fees of the records not yet in an epoch: what the next epoch's submit will pull."""
        return Wei(sum(int(f) for (f,) in self._q("SELECT fee FROM records WHERE epoch IS NULL")))

    def records_of_epoch(self, epoch: int) -> list[AttributionRecord]:
        """The epoch's records in append order, each carrying its epoch."""
        rows = self._q(f"{_SELECT_RECORD} WHERE epoch = ? ORDER BY seq", (epoch,))
        return [_row_record(r) for r in rows]

    def iter_records_of_epoch(self, epoch: int, chunk: int = 10_000) -> Iterator[AttributionRecord]:
        """Like `records_of_epoch`, reading `chunk` rows at a time."""
        last = -1
        while True:
            rows = self._q(f"SELECT seq, {_RECORD_FIELDS} FROM records WHERE epoch = ? AND seq > ? ORDER BY seq LIMIT ?",
                           (epoch, last, chunk))
            if not rows:
                return
            for r in rows:
                yield _row_record(r[1:])
            last = int(rows[-1][0])

    def get_record(self, request_id: str) -> AttributionRecord | None:
        """The record with `request_id` (its epoch set once assigned), or None."""
        rows = self._q(f"{_SELECT_RECORD} WHERE request_id = ?", (request_id,))
        return _row_record(rows[0]) if rows else None

    # ------------------------------------------------------------------ epochs

    def close_epoch(self, max_records: int | None = None) -> int | None:
        """Assign up to `max_records` pending records (oldest first) to a new epoch in state "open".

        Returns the new epoch number (previous + 1, from 1), or None when no record is pending.
        """
        with self._tx(exclusive=True) as conn:
            sql = self._backend.sql
            row = conn.execute(sql("SELECT MAX(epoch) FROM epochs")).fetchone()
            n = int(row[0] or 0) + 1
            limit = "" if max_records is None else f" LIMIT {int(max_records)}"
            cur = conn.execute(sql(
                "UPDATE records SET epoch = ? WHERE seq IN "
                f"(SELECT seq FROM records WHERE epoch IS NULL ORDER BY seq{limit})"), (n,))
            count = cur.rowcount
            if count <= 0:
                return None
            fees = sum(int(f) for (f,) in conn.execute(sql("SELECT fee FROM records WHERE epoch = ?"), (n,)))
            conn.execute(sql("INSERT INTO epochs (epoch, state, closed_at, record_count, fees_total) "
                             "VALUES (?, ?, ?, ?, ?)"), (n, OPEN, time.time(), count, str(fees)))
        return n

    def epoch(self, n: int) -> EpochRow | None:
        rows = self._q(f"SELECT {', '.join(_EPOCH_COLUMNS)} FROM epochs WHERE epoch = ?", (n,))
        return _epoch_row(rows[0]) if rows else None

    def epochs(self) -> list[EpochRow]:
        rows = self._q(f"SELECT {', '.join(_EPOCH_COLUMNS)} FROM epochs ORDER BY epoch")
        return [_epoch_row(r) for r in rows]

    def last_epoch(self) -> EpochRow | None:
        rows = self._q(f"SELECT {', '.join(_EPOCH_COLUMNS)} FROM epochs ORDER BY epoch DESC LIMIT 1")
        return _epoch_row(rows[0]) if rows else None

    def last_confirmed(self) -> EpochRow | None:
        rows = self._q(f"SELECT {', '.join(_EPOCH_COLUMNS)} FROM epochs WHERE state = ? ORDER BY epoch DESC LIMIT 1",
                       (CONFIRMED,))
        return _epoch_row(rows[0]) if rows else None

    def unfinished(self) -> list[EpochRow]:
        """Epochs on their way to confirmed (open, built or submitted), oldest first."""
        rows = self._q(f"SELECT {', '.join(_EPOCH_COLUMNS)} FROM epochs WHERE state IN (?, ?, ?) ORDER BY epoch",
                       (OPEN, BUILT, SUBMITTED))
        return [_epoch_row(r) for r in rows]

    def _transition(self, conn: Any, n: int, expect: Sequence[str], sets: Mapping[str, Any]) -> None:
        row = conn.execute(self._backend.sql("SELECT state FROM epochs WHERE epoch = ?"), (n,)).fetchone()
        if row is None:
            raise RecordLogError(f"epoch {n} is not in the log")
        if row[0] not in expect:
            raise RecordLogError(f"epoch {n} is {row[0]}, expected {' or '.join(expect)}")
        cols = ", ".join(f"{k} = ?" for k in sets)
        conn.execute(self._backend.sql(f"UPDATE epochs SET {cols} WHERE epoch = ?"), (*sets.values(), n))

    def mark_built(
        self,
        n: int,
        *,
        records_root: Bytes32,
        rewards_root: Bytes32,
        cumulative_total: int,
        terms: Mapping[str, Any],
        amounts: Mapping[Address, int],
        cumulative: Mapping[Address, int],
    ) -> None:
        """open -> built: store roots, the terms snapshot, and per account this epoch's amount + cumulative."""
        with self._tx() as conn:
            self._transition(conn, n, (OPEN,), {
                "state": BUILT, "records_root": records_root, "rewards_root": rewards_root,
                "cumulative_total": str(int(cumulative_total)), "terms": json.dumps(terms, sort_keys=True),
                "last_error": None})
            conn.execute(self._backend.sql("DELETE FROM balances WHERE epoch = ?"), (n,))
            rows = [(n, a, str(int(v)), str(int(cumulative[a]))) for a, v in sorted(amounts.items()) if v]
            if rows:
                conn.cursor().executemany(self._backend.sql(
                    "INSERT INTO balances (epoch, account, amount, cumulative) VALUES (?, ?, ?, ?)"), rows)

    def mark_submitted(self, n: int, *, tx_hash: TxHash, nonce: int, raw_tx: str) -> None:
        """built/submitted -> submitted: the signed transaction (before it is broadcast, so a crash keeps it)."""
        with self._tx() as conn:
            self._transition(conn, n, (BUILT, SUBMITTED), {
                "state": SUBMITTED, "tx_hash": tx_hash, "tx_nonce": int(nonce), "raw_tx": raw_tx,
                "submitted_at": time.time(), "last_error": None})

    def mark_confirmed(self, n: int, *, block_number: int, tx_hash: TxHash | None = None) -> None:
        """built/submitted -> confirmed (the epoch is on chain with our roots)."""
        sets: dict[str, Any] = {"state": CONFIRMED, "confirmed_block": int(block_number), "last_error": None}
        if tx_hash is not None:
            sets["tx_hash"] = tx_hash
        with self._tx() as conn:
            self._transition(conn, n, (BUILT, SUBMITTED), sets)

    def mark_failed(self, n: int, error: str) -> None:
        """submitted -> built with `last_error` (the tx reverted or is gone; records and balances are kept)."""
        with self._tx() as conn:
            self._transition(conn, n, (BUILT, SUBMITTED), {
                "state": BUILT, "tx_hash": None, "tx_nonce": None, "raw_tx": None, "last_error": error[:2000]})

    def mark_revoked(self, n: int, reason: str) -> None:
        """any state -> revoked: the chain revoked epoch `n`. Its records stay assigned to it (quarantined: not
        paid, not pending) and its balances stop counting towards later epochs' cumulative amounts."""
        with self._tx() as conn:
            self._transition(conn, n, (OPEN, BUILT, SUBMITTED, CONFIRMED), {"state": REVOKED,
                                                                            "last_error": reason[:2000]})

    def add_foreign_revoked(self, n: int, reason: str) -> None:
        """Record that the chain's epoch `n`, which this log never built, is revoked: an empty revoked row keeps
        the log's epoch numbers in step with the chain's."""
        with self._tx(exclusive=True) as conn:
            sql = self._backend.sql
            if conn.execute(sql("SELECT 1 FROM epochs WHERE epoch = ?"), (n,)).fetchone() is not None:
                raise RecordLogError(f"epoch {n} is already in the log")
            conn.execute(sql("INSERT INTO epochs (epoch, state, closed_at, record_count, fees_total, last_error) "
                             "VALUES (?, ?, ?, 0, '0', ?)"), (n, REVOKED, time.time(), reason[:2000]))

    def renumber(self, old: int, new: int) -> None:
        """Move an open or built epoch `old` (never sent) to number `new` > every epoch in the log, back to open:
        its records follow it, its roots and balances are dropped (its leaves name the epoch: it is rebuilt)."""
        with self._tx(exclusive=True) as conn:
            sql = self._backend.sql
            top = int(conn.execute(sql("SELECT MAX(epoch) FROM epochs")).fetchone()[0] or 0)
            if new <= top:
                raise RecordLogError(f"cannot renumber epoch {old} to {new}: the log already has epoch {top}")
            self._transition(conn, old, (OPEN, BUILT), {"state": OPEN})
            conn.execute(sql("DELETE FROM balances WHERE epoch = ?"), (old,))
            conn.execute(sql("UPDATE records SET epoch = ? WHERE epoch = ?"), (new, old))
            conn.execute(sql("UPDATE epochs SET epoch = ?, records_root = NULL, rewards_root = NULL, "
                             "cumulative_total = NULL, terms = NULL, last_error = NULL WHERE epoch = ?"), (new, old))

    def reopen(self, n: int) -> None:
        """built -> open, dropping roots and balances: the epoch is rebuilt (its base changed under it)."""
        with self._tx() as conn:
            self._transition(conn, n, (BUILT,), {"state": OPEN, "records_root": None, "rewards_root": None,
                                                 "cumulative_total": None, "terms": None})
            conn.execute(self._backend.sql("DELETE FROM balances WHERE epoch = ?"), (n,))

    def last_sent(self) -> EpochRow | None:
        """The latest epoch whose submission was signed (submitted or confirmed), or None."""
        rows = self._q(f"SELECT {', '.join(_EPOCH_COLUMNS)} FROM epochs WHERE state IN (?, ?) ORDER BY epoch DESC "
                       "LIMIT 1", (SUBMITTED, CONFIRMED))
        return _epoch_row(rows[0]) if rows else None

    def epochs_after(self, n: int) -> list[EpochRow]:
        """Epochs numbered above `n`, oldest first."""
        rows = self._q(f"SELECT {', '.join(_EPOCH_COLUMNS)} FROM epochs WHERE epoch > ? ORDER BY epoch", (n,))
        return [_epoch_row(r) for r in rows]

    def resettle(self, n: int) -> int:
        """revoked -> resettled: put epoch `n`'s quarantined records back to pending (the next epoch takes them).
        Returns how many records were released."""
        with self._tx(exclusive=True) as conn:
            self._transition(conn, n, (REVOKED,), {"state": RESETTLED})
            cur = conn.execute(self._backend.sql("UPDATE records SET epoch = NULL WHERE epoch = ?"), (n,))
            return int(cur.rowcount)

    def adopt_epoch(self, n: int, records: Sequence[AttributionRecord], *, records_root: Bytes32,
                    rewards_root: Bytes32, cumulative_total: int, terms: Mapping[str, Any],
                    amounts: Mapping[Address, int], cumulative: Mapping[Address, int], block_number: int) -> None:
        """Take in epoch `n` that another log built (its export checked against the chain by the caller) as
        confirmed: its records (a record this log already holds must be identical and pending: it is assigned to
        `n`), its roots, terms and balances. `n` must not be in the log, and every epoch below it must be."""
        now = time.time()
        with self._tx(exclusive=True) as conn:
            sql = self._backend.sql
            below = int(conn.execute(sql("SELECT COUNT(*) FROM epochs WHERE epoch < ?"), (n,)).fetchone()[0])
            if conn.execute(sql("SELECT 1 FROM epochs WHERE epoch = ?"), (n,)).fetchone() is not None \
                    or below != n - 1:
                raise RecordLogError(f"cannot adopt epoch {n}: the log must hold epochs 1..{n - 1} and not {n}")
            for r in records:
                stored = self._read_record(conn, r.request_id)
                if stored is None:
                    conn.execute(sql(f"INSERT INTO records ({', '.join(_RECORD_COLUMNS)}) VALUES "
                                     f"({', '.join('?' * len(_RECORD_COLUMNS))})"), _record_row(r, now))
                elif _record_row(stored[0], now)[:-1] != _record_row(r, now)[:-1]:
                    raise RecordLogError(f"cannot adopt epoch {n}: record {r.request_id} is in this log with other "
                                         "content")
                elif stored[0].epoch != 0:
                    raise RecordLogError(f"cannot adopt epoch {n}: record {r.request_id} is already in epoch "
                                         f"{stored[0].epoch} of this log (it would be paid twice)")
                conn.execute(sql("UPDATE records SET epoch = ? WHERE request_id = ?"), (n, r.request_id))
            fees = sum(int(r.fee) for r in records)
            conn.execute(sql("INSERT INTO epochs (epoch, state, closed_at, record_count, fees_total, records_root, "
                             "rewards_root, cumulative_total, terms, confirmed_block, last_error) "
                             "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"),
                         (n, CONFIRMED, now, len(records), str(fees), records_root, rewards_root,
                          str(int(cumulative_total)), json.dumps(terms, sort_keys=True), int(block_number),
                          "adopted from another log's export"))
            rows = [(n, a, str(int(v)), str(int(cumulative[a]))) for a, v in sorted(amounts.items()) if v]
            if rows:
                conn.cursor().executemany(sql(
                    "INSERT INTO balances (epoch, account, amount, cumulative) VALUES (?, ?, ?, ?)"), rows)

    def quarantined(self) -> list[EpochRow]:
        """Revoked epochs whose records are held back (not yet resettled), oldest first."""
        rows = self._q(f"SELECT {', '.join(_EPOCH_COLUMNS)} FROM epochs WHERE state = ? ORDER BY epoch", (REVOKED,))
        return [_epoch_row(r) for r in rows]

    # ------------------------------------------------------------------ balances

    def amounts_of_epoch(self, n: int) -> dict[Address, Wei]:
        """What each account earned in epoch `n`."""
        return {Address(a): Wei(int(v)) for a, v in self._q("SELECT account, amount FROM balances WHERE epoch = ?", (n,))}

    def cumulative_balances(self, upto_epoch: int) -> dict[Address, Wei]:
        """Every account's cumulative amount as of epoch `upto_epoch` (its latest row at or before it), counting
        live epochs only: a revoked epoch's balances never carry into later ones."""
        out: dict[Address, Wei] = {}
        for a, c in self._q("SELECT account, cumulative FROM balances WHERE epoch <= ? AND epoch NOT IN "
                            "(SELECT epoch FROM epochs WHERE state IN (?, ?)) ORDER BY epoch",
                            (upto_epoch, REVOKED, RESETTLED)):
            out[Address(a)] = Wei(int(c))
        return out

    def history(self, account: Address) -> list[tuple[int, Wei, Wei]]:
        """(epoch, amount, cumulative) of every epoch that paid `account`, oldest first."""
        rows = self._q("SELECT epoch, amount, cumulative FROM balances WHERE account = ? ORDER BY epoch", (account,))
        return [(int(e), Wei(int(a)), Wei(int(c))) for e, a, c in rows]


def open_record_log(path: str | Path | None = None, dsn: str | None = None) -> RecordLog:
    """`RecordLog.open` for callers that hold a `RecordsConfig` (dsn wins when set)."""
    return RecordLog.open(None if dsn else path, dsn=dsn or None)


"""What the node's request path calls for each finished request: `RecordLog.append`."""
