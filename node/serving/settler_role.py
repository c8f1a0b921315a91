"""The settler role of a fleet: several nodes of one operator share one PostgreSQL record log, and exactly one of
them settles at a time.

    role = SettlerRole(dsn, "gpu-a:50051")         # one dedicated connection, kept for the node's life
    if role.acquire():                             # holder now (already, or just took the free lock)
        role.guard(settler.tick)                   # tick; losing the role mid-tick ends it quietly
    role.status()                                  # RoleStatus(this_node, holder, since)

The role is a PostgreSQL session advisory lock, key (ROLE_CLASS, ROLE_OBJECT), taken with `pg_try_advisory_lock`
on the role's own connection. PostgreSQL releases a session lock when its connection ends, so:

- a node that exits, or is killed (`kill -9`: the kernel closes its socket, the server backend sees EOF and
  exits), gives the role up at once; a host that vanishes without closing its sockets is noticed by the
  server's TCP keepalives, which the role sets on its session (`KEEPALIVE_*`, about 25 s);
- every standby tries the lock every `poll_seconds`, so another node holds the role at most `poll_seconds` (plus
  one settlement tick interval) after the holder's connection is gone.

Fencing. A holder can lose its connection while it is in the middle of a tick and not notice before its next
database write. `fence(conn)` therefore runs inside every epoch-state transaction of the record log (close,
built, submitted, confirmed, failed: `RecordLog.fence`) and aborts it unless the role's own backend still holds
the lock at that moment. A node that lost the role can thus never close an epoch or store a newly signed
transaction; the new holder finds the epoch state exactly as the last successful transition left it and
resumes it (`Settler.resume`: a stored transaction is reconciled by its hash, its raw bytes re-broadcast if the
chain lost them, and never re-signed under a new nonce while the stored one can still land). The operator's
nonce counter is re-read from the chain whenever this node takes the role.

A new holder first passes a barrier: every fenced transaction holds the key (ROLE_CLASS, FENCE_OBJECT) shared
for its duration, and the new holder takes it exclusively once before it reads anything. Every transition the
previous holder committed is therefore visible to it, and none can follow.

Which node settles is visible to every node and to the operator: the lock's backend is named
`loraledger settler <node>` in `pg_stat_activity` (standbys: `loraledger standby <node>`), and `holder()` reads
it from `pg_locks`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from loraledger.node.errors import NodeError

log = logging.getLogger(__name__)

T = TypeVar("T")

ROLE_CLASS = 74201  # loraledger's advisory-lock namespace (the schema lock uses the one-key form of 74201)
ROLE_OBJECT = 1  # the settler role
FENCE_OBJECT = 2  # shared by each fenced transaction, taken exclusively once by a new holder (the barrier)
BARRIER_TIMEOUT_MS = 10_000
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 10, 5, 3  # server-side probes of the role session
SETTLER_PREFIX = "loraledger settler "
STANDBY_PREFIX = "loraledger standby "

_HOLDER_SQL = (
    "SELECT l.pid, a.application_name FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid "
    "WHERE l.locktype = 'advisory' AND l.granted AND l.classid = %s AND l.objid = %s AND l.objsubid = 2 "
    "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
)


class SettlerRoleLost(NodeError, RuntimeError):
    """This node no longer holds the settler role (its lock connection ended); another node may settle now."""


@dataclass(frozen=True)
class RoleStatus:
    """this_node: this node holds the role; holder: the holding node's name ("" when no node holds it, or when it
    could not be read); since: time.time() this node took the role (0 when it does not hold it)."""

    this_node: bool
    holder: str
    since: float


class SettlerRole:
    """One node's claim on the fleet's settler role (module docstring). Thread-safe."""

    def __init__(self, dsn: str, node_name: str, poll_seconds: float = 2.0) -> None:
        if not dsn:
            raise NodeError("the settler role needs the fleet's PostgreSQL DSN ([records] postgres_dsn)")
        if not node_name or len(node_name) > 40:
            raise NodeError(f"node name {node_name!r} must be 1..40 characters (it names the node in "
                            "pg_stat_activity, whose application_name holds 63 bytes)")
        if poll_seconds <= 0:
            raise NodeError(f"settler role poll_seconds must be > 0, got {poll_seconds}")
        self.dsn = dsn
        self.node_name = node_name
        self.poll_seconds = poll_seconds
        self._lock = threading.RLock()
        self._conn: Any = None
        self._backend_pid: int | None = None
        self._held = False
        self._since = 0.0
        self._holder = ""
        self._next_try = 0.0
        self.acquisitions = 0  # how often this node took the role
        self.on_acquire: Callable[[], None] | None = None  # called (under the role's lock) each time it is taken

    # ----- connection

    def _connect(self) -> Any:
        import psycopg

        conn = psycopg.connect(self.dsn, autocommit=True, application_name=STANDBY_PREFIX + self.node_name,
                               keepalives=1, keepalives_idle=KEEPALIVE_IDLE,
                               keepalives_interval=KEEPALIVE_INTERVAL, keepalives_count=KEEPALIVE_COUNT,
                               connect_timeout=10)
        # the server probes this session too, so a holder whose host vanished is dropped in ~25 s
        conn.execute(f"SET tcp_keepalives_idle = {KEEPALIVE_IDLE}")
        conn.execute(f"SET tcp_keepalives_interval = {KEEPALIVE_INTERVAL}")
        conn.execute(f"SET tcp_keepalives_count = {KEEPALIVE_COUNT}")
        return conn

    def _drop(self, why: str) -> None:
        if self._held:
            log.warning("settler role lost (%s): this node stops settling", why)
        self._held = False
        self._since = 0.0
        self._holder = ""  # unknown until the next try reads it
        self._backend_pid = None
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception as e:  # noqa: BLE001 - psycopg; the connection is being discarded either way
                log.debug("closing the role connection: %s", e)
        self._conn = None

    # ----- the role

    def acquire(self, now: float | None = None) -> bool:
        """True when this node holds the role: it still does (checked on its connection), or the lock was free
        and it took it now. A standby tries at most every `poll_seconds`; database errors count as not holding."""
        import psycopg

        with self._lock:
            t = time.monotonic() if now is None else now
            if not self._held and t < self._next_try:
                return False
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = self._connect()
                    self._backend_pid = int(self._conn.info.backend_pid)
                if self._held:
                    if self._lock_pid() == self._backend_pid:
                        return True
                    self._drop("the lock is no longer this node's")
                    return False
                self._next_try = t + self.poll_seconds
                got = bool(self._conn.execute("SELECT pg_try_advisory_lock(%s, %s)",
                                              (ROLE_CLASS, ROLE_OBJECT)).fetchone()[0])
                if not got:
                    self._holder = self._read_holder()
                    return False
                self._barrier()
                self._conn.execute("SELECT set_config('application_name', %s, false)",
                                   (SETTLER_PREFIX + self.node_name,))
                self._held, self._since, self._holder = True, time.time(), self.node_name
                self.acquisitions += 1
                log.info("settler role taken by this node (%s)", self.node_name)
                if self.on_acquire is not None:
                    self.on_acquire()
                return True
            except psycopg.Error as e:
                self._drop(f"database error: {e}")
                self._next_try = t + self.poll_seconds
                return False

    def _barrier(self) -> None:
        """Wait until every fenced transaction begun under the previous holder has ended: each holds the fence key
        shared, so taking it exclusively once (then letting go) orders all of them before this node's first read.
        A previous holder's transaction that starts later fails its fence check (the role lock is not its own)."""
        self._conn.execute(f"SET lock_timeout = {BARRIER_TIMEOUT_MS}")
        try:
            self._conn.execute("SELECT pg_advisory_lock(%s, %s)", (ROLE_CLASS, FENCE_OBJECT))
            self._conn.execute("SELECT pg_advisory_unlock(%s, %s)", (ROLE_CLASS, FENCE_OBJECT))
        finally:
            self._conn.execute("SET lock_timeout = 0")

    def _lock_pid(self) -> int | None:
        row = self._conn.execute(_HOLDER_SQL, (ROLE_CLASS, ROLE_OBJECT)).fetchone()
        return None if row is None else int(row[0])

    def _read_holder(self) -> str:
        row = self._conn.execute(_HOLDER_SQL, (ROLE_CLASS, ROLE_OBJECT)).fetchone()
        if row is None:
            return ""
        name = str(row[1] or "")
        return name[len(SETTLER_PREFIX):] if name.startswith(SETTLER_PREFIX) else name or f"backend {row[0]}"

    def fence(self, conn: Any) -> None:
        """Inside a record-log transaction on `conn`: raise SettlerRoleLost unless this node's role backend holds
        the lock now (the transaction is then rolled back by the log)."""
        pid = self._backend_pid
        conn.execute("SELECT pg_advisory_xact_lock_shared(%s, %s)", (ROLE_CLASS, FENCE_OBJECT))
        row = conn.execute(_HOLDER_SQL, (ROLE_CLASS, ROLE_OBJECT)).fetchone()
        if pid is None or not self._held or row is None or int(row[0]) != pid:
            raise SettlerRoleLost(f"node {self.node_name} does not hold the settler role any more; the epoch state "
                                  "is left for the node that does")

    def guard(self, fn: Callable[[], list[T]]) -> list[T]:
        """Run `fn` (a settlement tick) when this node holds the role; [] when it does not, or lost it mid-way."""
        if not self.acquire():
            return []
        try:
            return fn()
        except SettlerRoleLost as e:
            with self._lock:
                self._drop(str(e))
            return []

    def status(self) -> RoleStatus:
        """Whether this node settles, and which node does (as of the last `acquire`)."""
        with self._lock:
            return RoleStatus(self._held, self._holder, self._since)

    def holder(self) -> str:
        """The name of the node holding the role now, read from the database ("" when none)."""
        with self._lock:
            if self._conn is None or self._conn.closed:
                self._conn = self._connect()
                self._backend_pid = int(self._conn.info.backend_pid)
            self._holder = self._read_holder()
            return self._holder

    def release(self) -> None:
        """Give the role up (closing the connection releases the lock); idempotent."""
        import psycopg

        with self._lock:
            if self._held:
                log.info("settler role released by this node (%s)", self.node_name)
                self._held = False
                try:  # at once: a closed connection's backend lets go of the lock only a moment later
                    self._conn.execute("SELECT pg_advisory_unlock(%s, %s)", (ROLE_CLASS, ROLE_OBJECT))
                except psycopg.Error as e:
                    log.debug("unlocking the settler role: %s (closing the connection releases it)", e)
            self._drop("released")


def fleet_holder(dsn: str) -> str:
    """The name of the node that settles for the fleet on `dsn` now ("" when none): for status commands."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        row = conn.execute(_HOLDER_SQL, (ROLE_CLASS, ROLE_OBJECT)).fetchone()
        if row is None:
            return ""
        name = str(row[1] or "")
        return name[len(SETTLER_PREFIX):] if name.startswith(SETTLER_PREFIX) else name or f"backend {row[0]}"
