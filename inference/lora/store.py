"""The adapter store: thousands of adapters known on disk, an LRU of loaded ones in CPU memory, a fixed set of
GPU (or CPU) slots that the LoRA layers read. It implements the scheduler's `AdapterSlots` hook.

    disk   key -> (path, expected weights hash, expected base hash)            register()/load(), unload()
    CPU    LRU of verified `LoRAAdapter`s (pinned memory on CUDA), bounded in bytes
    slots  `LoRASlots` of the model: slot -> key, reference count per key, LRU among unreferenced keys

acquire(keys) -> slot ids | None
    every key resident (loading disk -> CPU -> slot as needed) and its reference count + 1; None, with no
    change at all, when there are not enough slots free of running sequences. A key is evicted from its slot
    only when no running sequence holds it (refs == 0): empty slots first, then the least recently used.
release(keys)    reference counts - 1; the adapter stays resident (a later acquire is a hit) until evicted.
prefetch(keys)   waiting requests will need these: load them into the CPU tier and, on CUDA, copy them into
                 empty slots on a side stream (acquire makes the compute stream wait on that copy's event).
                 With `background_loads=False` (the default) the disk loads run now, in the caller.
                 With `background_loads=True` they are queued to one loader thread (read + hash + parse off the
                 engine step): while a key is queued or loading, acquire of it returns None (its request
                 waits, others run); a failed background load is kept and raised by the next acquire of that
                 key (that request fails alone; the next acquire after it retries from disk).
                 A failed prefetch is logged; acquire reports the error. `close()` stops the thread.

Loading from disk verifies the weights hash and base hash against what was registered (`load_adapter`); a
malformed or mismatched adapter raises `AdapterFormatError` / `AdapterMismatchError` from acquire (the
scheduler fails that request only) and never reaches a slot. A slot write that fails leaves the slot empty.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from loraledger.inference.errors import AdapterNotFoundError, EngineError, InvalidRequestError
from loraledger.inference.identity import parse_hash
from loraledger.inference.lora.adapter import LORA_MODULES, BaseDims, LoRAAdapter, load_adapter
from loraledger.inference.lora.layers import LoRASlots, slot_nbytes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdapterEntry:
    """An adapter known on disk: where it is and the hashes it must have (None = not checked)."""

    key: str
    path: Path
    weights_hash: str | None = None
    base_hash: str | None = None


@dataclass(frozen=True)
class AdapterInfo:
    """One row of `AdapterStore.adapters()`: where the adapter is now."""

    key: str
    path: Path
    weights_hash: str | None
    tier: str  # "gpu" (in a slot; also on CPU), "cpu", or "disk"
    slot: int | None
    refs: int


@dataclass
class StoreStats:
    """Counters since start: slot hits/misses per acquired key, CPU-tier hits, disk loads, evictions, failures."""

    slot_hits: int = 0
    slot_misses: int = 0
    cpu_hits: int = 0
    disk_loads: int = 0
    evictions: int = 0
    cpu_evictions: int = 0
    load_failures: int = 0
    prefetch_loads: int = 0


def default_num_slots(
    dims: BaseDims,
    max_rank: int,
    dtype: torch.dtype,
    budget_bytes: int,
    targets: Iterable[str] = LORA_MODULES,
) -> int:
    """How many slots fit `budget_bytes`: budget // (bytes of one slot over all layers and targets), at least 1.

    One slot = sum over layers and targets of (in + out) * max_rank * itemsize (A and B zero-padded to max_rank).
    """
    shapes = [dims.module_shape(m) for m in targets] * dims.num_layers
    per_slot = slot_nbytes(shapes, max_rank, dtype)
    return max(1, budget_bytes // per_slot)


_F = TypeVar("_F", bound=Callable[..., Any])


def _locked(method: _F) -> _F:
    """Run `method` under the store's re-entrant lock: the engine thread acquires and releases slots while
    the node's worker threads load and unload adapters at run time."""

    @functools.wraps(method)
    def wrapper(self: AdapterStore, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


class AdapterStore:
    """Disk -> CPU -> slot tiers for the LoRA layers of one model (see the module docstring)."""

    def __init__(
        self,
        slots: LoRASlots,
        dims: BaseDims,
        base_hash: str | None = None,
        cpu_cache_bytes: int = 2 << 30,
        dtype: torch.dtype | None = None,
        background_loads: bool = False,
    ) -> None:
        self._lock = threading.RLock()
        self._loads_done = threading.Condition(self._lock)  # notified whenever a background load ends
        self._slots = slots
        self._dims = dims
        self._base_hash = parse_hash(base_hash) if base_hash is not None else None
        self._cpu_cache_bytes = cpu_cache_bytes
        first = next(iter(slots.layers.values()), None)
        if first is None:
            raise ValueError("the model has no LoRA layers; call apply_lora before building the store")
        self._device: torch.device = first.lora_A.device
        self._dtype: torch.dtype = dtype or first.lora_A.dtype
        self._entries: dict[str, AdapterEntry] = {}
        self._cpu: OrderedDict[str, LoRAAdapter] = OrderedDict()  # LRU order: oldest first
        self._cpu_bytes = 0
        self._slot_key: list[str | None] = [None] * slots.num_slots
        self._key_slot: dict[str, int] = {}
        self._refs: dict[str, int] = {}
        self._last_use: list[int] = [0] * slots.num_slots
        self._tick = 0
        self._ready: dict[int, torch.cuda.Event] = {}  # slot -> copy event of a prefetch on the side stream
        self._side_stream = torch.cuda.Stream(device=self._device) if self._device.type == "cuda" else None
        self._background = background_loads
        self._queue: queue.SimpleQueue[str | None] = queue.SimpleQueue()  # keys to load; None stops the thread
        self._loading: set[str] = set()  # keys queued or being loaded by the loader thread
        self._failed: dict[str, EngineError] = {}  # key -> error of its last background load
        self._loader: threading.Thread | None = None
        self.stats = StoreStats()
        # called with the seconds of each disk read (read, hash, layout), from whichever thread ran it
        self.load_observer: Callable[[float], None] | None = None

    # ---- the disk tier: what is known ------------------------------------------------------------------
    @property
    def max_rank(self) -> int:
        return self._slots.context.max_rank

    @_locked
    def register(self, key: str, path: str | Path, weights_hash: str | None = None, base_hash: str | None = None) -> None:
        """Make `key` known (nothing is read yet). Re-registering a key that is not in use replaces it."""
        if not key:
            raise InvalidRequestError("an adapter key must be a non-empty string")
        if self._refs.get(key, 0) > 0:
            raise InvalidRequestError(f"adapter {key!r} is in use by running requests; unload it when they finish")
        entry = AdapterEntry(
            key=key,
            path=Path(path),
            weights_hash=parse_hash(weights_hash) if weights_hash is not None else None,
            base_hash=parse_hash(base_hash) if base_hash is not None else None,
        )
        if key in self._entries:
            self._drop(key)
        self._entries[key] = entry

    @_locked
    def load(self, key: str, path: str | Path, weights_hash: str | None = None, base_hash: str | None = None) -> AdapterInfo:
        """Register `key` and load it into the CPU tier now, so a bad adapter is refused at once (run time API).

        On any error the key is left unknown.
        """
        self.register(key, path, weights_hash, base_hash)
        try:
            self._cpu_get(key)
        except EngineError:
            del self._entries[key]
            raise
        return self._info(key)

    @_locked
    def unload(self, key: str) -> None:
        """Forget `key` in every tier; refused while a running request holds it."""
        self._entry(key)
        if self._refs.get(key, 0) > 0:
            raise InvalidRequestError(
                f"adapter {key!r} is held by {self._refs[key]} running request(s); unload it when they finish"
            )
        self._drop(key)
        del self._entries[key]

    @_locked
    def adapters(self) -> list[AdapterInfo]:
        """Every known adapter with its tier, slot and reference count, by key."""
        return [self._info(k) for k in sorted(self._entries)]

    def _info(self, key: str) -> AdapterInfo:
        e = self._entries[key]
        slot = self._key_slot.get(key)
        tier = "gpu" if slot is not None else ("cpu" if key in self._cpu else "disk")
        return AdapterInfo(key, e.path, e.weights_hash, tier, slot, self._refs.get(key, 0))

    def _entry(self, key: str) -> AdapterEntry:
        e = self._entries.get(key)
        if e is None:
            raise AdapterNotFoundError(f"unknown adapter {key!r}; load it first (known: {len(self._entries)})")
        return e

    def _drop(self, key: str) -> None:
        """Remove `key` from the slot and CPU tiers (refs must be 0)."""
        slot = self._key_slot.pop(key, None)
        if slot is not None:
            self._slot_key[slot] = None
            self._slots.clear(slot)
        self._refs.pop(key, None)
        self._failed.pop(key, None)
        ad = self._cpu.pop(key, None)
        if ad is not None:
            self._cpu_bytes -= ad.nbytes

    # ---- the CPU tier ------------------------------------------------------------------------------------
    def _cpu_get(self, key: str) -> LoRAAdapter:
        """The verified adapter from the CPU LRU, loading it from disk (hashes checked) on a miss."""
        ad = self._cpu.get(key)
        if ad is not None:
            self._cpu.move_to_end(key)
            self.stats.cpu_hits += 1
            return ad
        e = self._entry(key)
        try:
            ad = self._read(e)
        except EngineError:
            self.stats.load_failures += 1
            raise
        self._cpu_put(key, ad)
        return ad

    def _read(self, e: AdapterEntry) -> LoRAAdapter:
        """Disk -> verified `LoRAAdapter` (pinned on CUDA); touches no store state, so it may run unlocked."""
        started = time.perf_counter()
        adapter = load_adapter(
            e.path, self._dims, self.max_rank, dtype=self._dtype, expected_weights_hash=e.weights_hash,
            expected_base_hash=e.base_hash, base_hash=self._base_hash, pin_memory=self._device.type == "cuda",
        )
        if self.load_observer is not None:
            self.load_observer(time.perf_counter() - started)
        return adapter

    def _cpu_put(self, key: str, ad: LoRAAdapter) -> None:
        """Insert a freshly read adapter into the CPU LRU, evicting the oldest beyond the byte budget."""
        self.stats.disk_loads += 1
        self._cpu[key] = ad
        self._cpu_bytes += ad.nbytes
        while self._cpu_bytes > self._cpu_cache_bytes and len(self._cpu) > 1:
            _, old = self._cpu.popitem(last=False)
            self._cpu_bytes -= old.nbytes
            self.stats.cpu_evictions += 1

    # ---- the slot tier: the scheduler's AdapterSlots -----------------------------------------------------
    @property
    def num_slots(self) -> int:
        return self._slots.num_slots

    @_locked
    def validate(self, keys: Sequence[str]) -> None:
        """AdapterNotFoundError for an unknown key; InvalidRequestError for more distinct keys than slots (the
        keys come from a checked `AdapterMix`: only what this store knows and holds is checked here)."""
        for k in keys:
            self._entry(k)
        if len(set(keys)) > self.num_slots:
            raise InvalidRequestError(
                f"a request names {len(set(keys))} distinct adapters but the engine has {self.num_slots} slots"
            )

    def _free_slots(self, exclude: set[str]) -> list[int]:
        """Slots a new adapter may take: empty ones first, then unreferenced ones by least recent use."""
        empty = [s for s, k in enumerate(self._slot_key) if k is None]
        idle = [s for s, k in enumerate(self._slot_key) if k is not None and self._refs.get(k, 0) == 0 and k not in exclude]
        idle.sort(key=lambda s: self._last_use[s])
        return empty + idle

    @_locked
    def acquire(self, keys: Sequence[str]) -> tuple[int, ...] | None:
        """Pin `keys` in slots and return their slot ids in key order, or None (nothing changed) if slots are short.

        Raises AdapterNotFoundError for an unknown key, AdapterFormatError / AdapterMismatchError if an adapter
        fails to load (no slot is changed by that adapter; keys loaded before it stay resident, unpinned).
        """
        self.validate(keys)
        wanted = list(dict.fromkeys(keys))
        missing = [k for k in wanted if k not in self._key_slot]
        for k in missing:
            failed = self._failed.pop(k, None)
            if failed is not None:  # its background load failed: this request fails; a later acquire retries
                raise failed
        if any(k in self._loading for k in missing):
            return None  # still loading on the loader thread: the request waits a step, nothing changes
        free = self._free_slots(exclude=set(wanted))
        if len(missing) > len(free):
            return None
        for k in wanted:
            if k in self._key_slot:
                self.stats.slot_hits += 1
        for k, slot in zip(missing, free, strict=False):
            self.stats.slot_misses += 1
            self._fill(slot, k)
        self._tick += 1
        for k in wanted:
            slot = self._key_slot[k]
            self._refs[k] = self._refs.get(k, 0) + 1
            self._last_use[slot] = self._tick
            ev = self._ready.pop(slot, None)
            if ev is not None:
                torch.cuda.current_stream(self._device).wait_event(ev)
        return tuple(self._key_slot[k] for k in keys)

    def _fill(self, slot: int, key: str, stream: torch.cuda.Stream | None = None) -> None:
        """Load `key` (CPU tier, else disk) and write it into `slot`, evicting the slot's unreferenced owner."""
        adapter = self._cpu_get(key)  # raises before the slot is touched
        old = self._slot_key[slot]
        if old is not None:
            assert self._refs.get(old, 0) == 0, "evicting an adapter a running sequence holds"
            del self._key_slot[old]
            self._slot_key[slot] = None
            self.stats.evictions += 1
        pending = self._ready.pop(slot, None)
        if pending is not None:  # a prefetch copy into this slot may still run: order our writes after it
            (stream or torch.cuda.current_stream(self._device)).wait_event(pending)
        if stream is not None:
            with torch.cuda.stream(stream):
                self._slots.load(slot, adapter)  # clears the slot itself if a write fails
                ev = torch.cuda.Event()
                ev.record(stream)
            self._ready[slot] = ev
        else:
            self._slots.load(slot, adapter)
        self._slot_key[slot] = key
        self._key_slot[key] = slot
        self._last_use[slot] = self._tick

    @_locked
    def release(self, keys: Sequence[str]) -> None:
        """Undo one `acquire(keys)`; the adapters stay resident (unpinned) until their slot is needed."""
        unique = list(dict.fromkeys(keys))
        for k in unique:
            if self._refs.get(k, 0) <= 0:
                raise EngineError(f"release of adapter {k!r} that is not acquired (reference count would go below 0)")
        for k in unique:
            self._refs[k] -= 1

    @_locked
    def prefetch(self, keys: Sequence[str]) -> None:
        """Warm the tiers for a waiting request: CPU tier (now, or queued to the loader thread with
        `background_loads`); on CUDA also empty slots, on a side stream."""
        for k in dict.fromkeys(keys):
            if k not in self._entries or k in self._key_slot or k in self._loading:
                continue
            if self._background and k not in self._cpu:
                if k in self._failed:
                    continue  # acquire reports that failure first; it retries after that
                self._loading.add(k)
                self._start_loader()
                self._queue.put(k)
                continue
            try:
                if k not in self._cpu:
                    self._cpu_get(k)
                    self.stats.prefetch_loads += 1
                if self._side_stream is not None:
                    empty = [s for s, owner in enumerate(self._slot_key) if owner is None]
                    if empty:
                        self._fill(empty[0], k, stream=self._side_stream)
            except EngineError as e:  # a hint only: acquire will raise the same error for the request
                log.warning("prefetch of adapter %r failed: %s", k, e)

    # ---- the loader thread (background_loads=True) ---------------------------------------------------------
    def _start_loader(self) -> None:
        if self._loader is None or not self._loader.is_alive():
            self._loader = threading.Thread(target=self._load_loop, name="loraledger-adapter-loader", daemon=True)
            self._loader.start()

    def _load_loop(self) -> None:
        """Take keys off the queue until None: read + verify each outside the lock, then publish it under it."""
        while True:
            key = self._queue.get()
            if key is None:
                return
            try:
                self._load_one(key)
            finally:  # whatever happened, the key is no longer loading (acquire then loads it itself)
                with self._lock:
                    self._loading.discard(key)
                    self._loads_done.notify_all()

    def _load_one(self, key: str) -> None:
        """One background load: disk -> CPU tier (hashes verified), or the error kept for acquire to raise."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or key in self._cpu or key in self._key_slot:
                return  # unloaded, or loaded by acquire meanwhile
        error: EngineError | None = None
        adapter: LoRAAdapter | None = None
        try:
            adapter = self._read(entry)
        except EngineError as e:
            error = e
        except (OSError, RuntimeError, ValueError) as e:  # keep the thread alive and the request informed
            error = EngineError(f"background load of adapter {key!r} from {entry.path} failed: {e}")
            error.__cause__ = e
        with self._lock:
            if self._entries.get(key) is not entry:
                return  # unloaded or re-registered while it loaded: the result belongs to nobody
            if error is not None:
                self.stats.load_failures += 1
                self._failed[key] = error
                log.warning("background load of adapter %r failed: %s", key, error)
            elif adapter is not None and key not in self._cpu:
                self._cpu_put(key, adapter)
                self.stats.prefetch_loads += 1
                self._fill_empty_slot_async(key)

    def _fill_empty_slot_async(self, key: str) -> None:
        """On CUDA: copy `key` (now in the CPU tier) into an empty slot on the side stream, if one is empty."""
        if self._side_stream is None or key in self._key_slot:
            return
        empty = [s for s, owner in enumerate(self._slot_key) if owner is None]
        if empty:
            try:
                self._fill(empty[0], key, stream=self._side_stream)
            except EngineError as e:  # the slot stays empty (`LoRASlots.load` clears it); acquire retries
                log.warning("prefetch of adapter %r into slot %d failed: %s", key, empty[0], e)

    def wait_for_loads(self, timeout: float | None = None) -> bool:
        """Block until the loader thread has no key queued or loading; False if `timeout` (s) passed first."""
        with self._loads_done:
            return self._loads_done.wait_for(lambda: not self._loading, timeout)

    @_locked
    def loading(self) -> list[str]:
        """Keys queued or being loaded by the loader thread, sorted."""
        return sorted(self._loading)

    def close(self) -> None:
        """Stop the loader thread after the load in progress (queued loads are dropped; acquire loads them)."""
        with self._lock:
            thread = self._loader
            self._loader = None
            dropped = set(self._loading)
        if thread is None:
            return
        while True:  # drain what is queued so the thread sees the stop marker next
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._queue.put(None)
        thread.join()
        with self._lock:
            self._loading -= dropped
            self._loads_done.notify_all()

    # ---- introspection -------------------------------------------------------------------------------------
    @_locked
    def pinned(self) -> dict[str, int]:
        """Keys held by running sequences -> reference count (empty when nothing runs: no leak)."""
        return {k: n for k, n in self._refs.items() if n > 0}

    @_locked
    def resident(self) -> dict[int, str]:
        """slot -> key of every filled slot."""
        return {s: k for s, k in enumerate(self._slot_key) if k is not None}

    @property
    def cpu_bytes(self) -> int:
        return self._cpu_bytes

    @_locked
    def cpu_keys(self) -> list[str]:
        """Keys in the CPU tier, least recently used first."""
        return list(self._cpu)
