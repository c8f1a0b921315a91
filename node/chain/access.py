"""Who may use which adapter, answered from memory: the node's copy of the AdapterRegistry's access rules.

On chain (`contracts/AdapterRegistry.sol`) every adapter is public until its owner makes it private; a private
adapter may be used only by the client accounts on its allowlist. The allowlist is not enumerable on chain, so this
cache rebuilds it by replaying the registry's two access events:

    state(id) at block B = fold, in (block, log index) order, over the events of id in [from_block, B],
                           starting from public = True, allowlist = {}:
        AdapterAccessChanged(id, isPublic)            public = isPublic
        AdapterAllowlistChanged(id, account, ok)      ok ? allowlist.add(account) : allowlist.discard(account)

    allowed(id, account) = public or account in allowlist           (account "" = unsigned client: public only)

Every loaded adapter is held at one block, the cursor:

    load(ids)    first use of ids: existence check (adapterCount), then replay of their events in
                 [from_block, cursor]; eth_getLogs in chunks of `log_chunk` blocks
    refresh()    head = latest - confirmations; replay every event in (cursor, head] onto the loaded ids, then
                 cursor = head; one eth_blockNumber, plus eth_getLogs per chunk when any id is loaded
    allowed()    a dict lookup under a lock; an RPC only on the first use of an id (through load)

A background thread calls refresh() every `interval` seconds (`start` / `stop`, or `with access:`). A failed refresh
keeps the last state and cursor and is retried at the next tick; access is then as stale as `cursor` says. A head
below the cursor means the chain was rewound (a reorg deeper than `confirmations`, a devnet revert): everything is
dropped and reloaded on next use. A reorg that keeps the height is not detected; `confirmations` is the guard.

Locks: `_sync` serialises load and refresh (RPC and cursor); `_lock` guards the states and is held only to read
them or to apply one fetched batch, so allowed() never waits on an RPC for a loaded id, and sees each refresh whole.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

from loraledger.node.chain.bindings import AccessChanged, AccessEvent, AdapterRegistryClient
from loraledger.node.errors import ConfigError, NodeError, NotFoundError
from loraledger.node.types import AdapterId, Address, as_address

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AccessRule:
    """One adapter's access as of `block`: public, or only the accounts of `allowlist`."""

    adapter_id: AdapterId
    public: bool
    allowlist: frozenset[Address]
    block: int


@dataclass
class _State:
    public: bool = True
    allowlist: set[str] = field(default_factory=set)  # lowercase 0x hex

    def apply(self, e: AccessEvent) -> None:
        if isinstance(e, AccessChanged):
            self.public = e.is_public
        elif e.allowed:
            self.allowlist.add(e.account.lower())
        else:
            self.allowlist.discard(e.account.lower())


class AdapterAccess:
    """The access rules of the adapters this node serves, loaded on first use and kept current by polling.

    Args:
        registry: the AdapterRegistry binding to read through (reads only; any account).
        from_block: where the registry's history starts (`Deployment.block_number`).
        interval: seconds between refreshes of the background thread.
        confirmations: blocks behind the head the cursor stays (0: follow the head).
        log_chunk: most blocks per eth_getLogs (providers cap the range).
    """

    def __init__(
        self,
        registry: AdapterRegistryClient,
        from_block: int,
        *,
        interval: float = 2.0,
        confirmations: int = 0,
        log_chunk: int = 2_000,
    ) -> None:
        if from_block < 0 or confirmations < 0 or log_chunk < 1 or not interval > 0:
            raise ConfigError(f"adapter access: from_block {from_block} and confirmations {confirmations} must be "
                              f">= 0, log_chunk {log_chunk} >= 1, interval {interval} > 0")
        self.registry = registry
        self.from_block = int(from_block)
        self.interval = float(interval)
        self.confirmations = int(confirmations)
        self.log_chunk = int(log_chunk)
        self._lock = threading.Lock()
        self._sync = threading.Lock()
        self._states: dict[int, _State] = {}
        self._cursor: int | None = None
        self._known_count = 0
        self._last_refresh: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ----- queries

    def allowed(self, adapter_id: int, account: str) -> bool:
        """Whether `account` (any hex case; "" for an unsigned client) may use adapter `adapter_id`.

        From memory for a loaded id; the first use of an id loads it (RPC). NotFoundError for an id the registry
        does not have; ChainError when that first load cannot reach the chain.
        """
        key = account.lower() if account else ""
        while True:
            with self._lock:
                st = self._states.get(adapter_id)
                if st is not None:
                    return st.public or (bool(key) and key in st.allowlist)
            self.load(adapter_id)

    def rule(self, adapter_id: int) -> AccessRule:
        """Adapter `adapter_id`'s access as of the cursor (loads it on first use, like `allowed`)."""
        while True:
            with self._lock:
                st = self._states.get(adapter_id)
                if st is not None and self._cursor is not None:
                    return AccessRule(AdapterId(adapter_id), st.public,
                                      frozenset(as_address(a) for a in st.allowlist), self._cursor)
            self.load(adapter_id)

    @property
    def cursor(self) -> int | None:
        """The block every loaded adapter's access is current to (None before the first load or refresh)."""
        return self._cursor

    @property
    def last_refresh(self) -> float | None:
        """`time.monotonic()` of the last successful refresh (None before the first)."""
        return self._last_refresh

    # ----- keeping current

    def load(self, *adapter_ids: int) -> None:
        """Load `adapter_ids` not loaded yet: check they exist, replay their events up to the cursor.

        One history scan for all of them, so a node loads its catalog's ids in one call at start-up.
        NotFoundError naming the ids the registry does not have (nothing is loaded then).
        """
        with self._sync:
            with self._lock:
                todo = sorted({int(i) for i in adapter_ids} - set(self._states))
            if not todo:
                return
            if todo[-1] > self._known_count:
                self._known_count = self.registry.adapter_count()
            unknown = [i for i in todo if not 1 <= i <= self._known_count]
            if unknown:
                raise NotFoundError(f"no adapter with id {', '.join(map(str, unknown))} in the AdapterRegistry at "
                                    f"{self.registry.address} ({self._known_count} registered)")
            if self._cursor is None:
                self._cursor = self._head()
            states = {i: _State() for i in todo}
            for e in self._scan(self.from_block, self._cursor, todo):
                states[e.adapter_id].apply(e)
            with self._lock:
                self._states.update(states)
            log.debug("adapter access: loaded %s at block %d", todo, self._cursor)

    def refresh(self) -> int:
        """Replay the access events since the cursor onto the loaded adapters; returns how many applied.

        ChainError when the chain cannot be read (state and cursor unchanged).
        """
        with self._sync:
            head = self._head()
            applied = 0
            if self._cursor is not None and head < self._cursor:
                log.warning("adapter access: head %d is below the cursor %d (chain rewound); reloading on next use",
                            head, self._cursor)
                with self._lock:
                    self._states.clear()
                    self._cursor = head
                self._known_count = 0  # ids registered in the dropped blocks may be gone
            elif self._cursor is not None and head > self._cursor:
                with self._lock:
                    loaded = bool(self._states)
                events = self._scan(self._cursor + 1, head, None) if loaded else []
                with self._lock:
                    for e in events:
                        st = self._states.get(e.adapter_id)
                        if st is not None:
                            st.apply(e)
                            applied += 1
                    self._cursor = head
            else:
                self._cursor = head
            self._last_refresh = time.monotonic()
            return applied

    def start(self) -> None:
        """Start the background thread (refresh now, then every `interval` s); a second call does nothing."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="adapter-access", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the background thread and wait for it (at most `timeout` s)."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop.set()
            thread.join(timeout)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # ----- internals

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh()
            except NodeError as e:
                log.warning("adapter access: refresh failed (%s); access stays at block %s", e, self._cursor)
            except Exception:  # the watcher must outlive a bad answer; logged with its traceback
                log.exception("adapter access: refresh failed; access stays at block %s", self._cursor)
            self._stop.wait(self.interval)

    def _head(self) -> int:
        client = self.registry.client
        latest = int(client.read(lambda: client.w3.eth.block_number, "eth_blockNumber"))
        return max(latest - self.confirmations, 0)

    def _scan(self, lo: int, hi: int, adapter_ids: list[int] | None) -> list[AccessEvent]:
        """The access events in blocks lo..hi (of `adapter_ids` only, when given), `log_chunk` blocks a call."""
        out: list[AccessEvent] = []
        while lo <= hi:
            top = min(hi, lo + self.log_chunk - 1)
            out.extend(self.registry.access_events(lo, top, adapter_ids))
            lo = top + 1
        return out
