"""Continuous batching at iteration level: which tokens of which sequences run in the next engine step.

Each `schedule()` builds one flat batch under two bounds, a token budget (`max_tokens_per_step`) and a
sequence cap (`max_num_seqs`), in this order (stall-free batching, as in Sarathi-Serve):

    1. running decodes         1 token each, oldest first
    2. running prefills        the next chunk of a prompt that did not fit earlier steps: min(left, budget)
    3. waiting sequences       by (priority, arrival); the first chunk of their prefill; only when nothing was
                               preempted this step

Every scheduled sequence gets the KV blocks its chunk needs. When the pool runs dry, the youngest running
sequence (largest (priority, arrival)) is preempted by recompute: its blocks are freed, it goes back to the
waiting queue with its generated tokens kept, and it re-runs prompt + outputs as a prefill when admitted
again. If the youngest is the sequence asking, it is the one preempted. The oldest running sequence can
therefore always take blocks from all the others, and a sequence that could not fit the whole pool even alone
is refused at `add()`: no state can deadlock.

Waiting sequences are served first come first served within a priority: if the head of the queue lacks KV
blocks, nobody behind it is admitted (no starvation of long prompts). The one exception is adapters: a
sequence whose adapters cannot be made resident in GPU slots now is skipped without blocking those behind it,
and the distinct adapters of the running set never exceed the slot count. Each step hints the store with the
adapters the head of the queue needs, at most a slot's worth (`prefetch`), not with every request skipped: the
loads then follow the slot misses, not the length of the queue.

Adapter hook: the scheduler talks to an `AdapterSlots` (the adapter store implements it): `acquire(keys)` pins
the adapters of a sequence in GPU slots when it starts running and returns their slot ids (or None when
they cannot be resident now), `release(keys)` unpins them when it finishes or is preempted.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from loraledger.inference.batch import SeqChunk
from loraledger.inference.block_manager import BlockManager
from loraledger.inference.errors import (
    AdapterNotFoundError,
    EngineConfigError,
    EngineError,
    InvalidRequestError,
)
from loraledger.inference.sequence import FinishReason, Sequence, SequenceStatus

if TYPE_CHECKING:  # the engine config module imports this one
    from loraledger.inference.engine_config import EngineConfig


@runtime_checkable
class AdapterSlots(Protocol):
    """GPU adapter slots as the scheduler needs them (implemented by the LoRA adapter store).

    num_slots           how many adapters can be resident at once (the bound on distinct adapters per step)
    validate(keys)      raise `AdapterNotFoundError` (or another `EngineError`) if a key is unknown; at submit
                        (the keys of one `AdapterMix`: distinct)
    acquire(keys)       pin every key in a slot (loading it if needed) and return the slot ids in key order,
                        or None if that is impossible now (e.g. all slots pinned); a reference count per key
    release(keys)       undo one acquire of the same keys
    prefetch(keys)      hint: a waiting sequence needs these soon (may start loading them); may do nothing
    """

    @property
    def num_slots(self) -> int: ...

    def validate(self, keys: Seq[str]) -> None: ...

    def acquire(self, keys: Seq[str]) -> tuple[int, ...] | None: ...

    def release(self, keys: Seq[str]) -> None: ...

    def prefetch(self, keys: Seq[str]) -> None: ...


class NoAdapterSlots:
    """The `AdapterSlots` of an engine that serves only the base model: any adapter key is unknown."""

    @property
    def num_slots(self) -> int:
        return 0

    def validate(self, keys: Seq[str]) -> None:
        if keys:
            raise AdapterNotFoundError(
                f"this engine serves the base model only and knows no adapters (asked for {list(keys)}); "
                "start it with an adapter store"
            )

    def acquire(self, keys: Seq[str]) -> tuple[int, ...] | None:
        self.validate(keys)
        return ()

    def release(self, keys: Seq[str]) -> None:
        self.validate(keys)

    def prefetch(self, keys: Seq[str]) -> None:
        return None


@dataclass(frozen=True)
class SchedulerConfig:
    """The scheduler's two bounds; an engine takes them from its `EngineConfig` (`from_engine`).

    max_num_seqs          sequences running at once
    max_tokens_per_step   tokens in one step's flat batch; >= max_num_seqs, so every running sequence decodes
                          in every step
    """

    max_num_seqs: int
    max_tokens_per_step: int

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_tokens_per_step"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise EngineConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.max_tokens_per_step < self.max_num_seqs:
            raise EngineConfigError(
                f"max_tokens_per_step ({self.max_tokens_per_step}) must be >= max_num_seqs "
                f"({self.max_num_seqs}) so that every running sequence can decode in every step"
            )

    @classmethod
    def from_engine(cls, config: EngineConfig) -> SchedulerConfig:
        """The bounds `config` sets; raises `EngineConfigError` as `__post_init__` does."""
        return cls(config.max_num_seqs, config.max_tokens_per_step)


@dataclass
class SchedulerOutput:
    """One step's work: `chunks[i]` runs for `seqs[i]`; `preempted` lost their blocks this step; `failed` were
    finished with an error while scheduling (an adapter that could not be loaded)."""

    seqs: list[Sequence] = field(default_factory=list)
    chunks: list[SeqChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    failed: list[Sequence] = field(default_factory=list)
    num_decodes: int = 0  # chunks that are one generated token (the rest are prompt tokens)

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


def token_ids_of(seq: Sequence, start: int, n: int) -> tuple[int, ...]:
    """seq.all_ids[start : start + n] without copying prompt + outputs (a decode reads one output token)."""
    prompt_len = len(seq.prompt_ids)
    if start >= prompt_len:
        if n == 1:  # a decode, every step of every sequence: no slice
            return (seq.output_ids[start - prompt_len],)
        return tuple(seq.output_ids[start - prompt_len : start - prompt_len + n])
    return tuple(seq.all_ids[start : start + n])


class Scheduler:
    """Waiting queue + running set over one `BlockManager` and one `AdapterSlots`."""

    def __init__(
        self,
        config: SchedulerConfig,
        block_manager: BlockManager,
        adapter_slots: AdapterSlots | None = None,
    ) -> None:
        self.config = config
        self.blocks = block_manager
        self.adapter_slots: AdapterSlots = adapter_slots if adapter_slots is not None else NoAdapterSlots()
        self.waiting: list[Sequence] = []  # sorted by sort_key
        self.running: list[Sequence] = []  # sorted by sort_key
        self._next_arrival = 0

    # ---- queue ----------------------------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def check_fits(self, seq: Sequence) -> None:
        """Raise `InvalidRequestError` for a sequence that could never run, even alone on the engine (the KV
        cache too small, more adapters than slots), or `AdapterNotFoundError` for an adapter the slots do not know."""
        need = seq.max_total_tokens() - 1  # the last sampled token is never fed back
        if need > self.blocks.capacity_tokens:
            raise InvalidRequestError(
                f"request {seq.request_id!r} needs KV cache room for {need} tokens "
                f"(prompt {len(seq.prompt_ids)} + max_tokens {seq.params.max_tokens}) "
                f"but the whole cache holds {self.blocks.capacity_tokens}; "
                "lower max_tokens, shorten the prompt, or give the engine a larger KV budget"
            )
        keys = seq.adapter_keys  # distinct: an `AdapterMix`
        self.adapter_slots.validate(keys)
        if keys and len(keys) > self.adapter_slots.num_slots:
            raise InvalidRequestError(
                f"request {seq.request_id!r} merges {len(keys)} adapters but the engine has only "
                f"{self.adapter_slots.num_slots} adapter slots"
            )

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence (after `check_fits`); it gets the next arrival index (FCFS)."""
        self.check_fits(seq)
        seq.arrival_index = self._next_arrival
        self._next_arrival += 1
        seq.status = SequenceStatus.WAITING
        self._insert(self.waiting, seq)

    @staticmethod
    def _insert(queue: list[Sequence], seq: Sequence) -> None:
        bisect.insort(queue, seq, key=lambda s: s.sort_key)

    # ---- one step -------------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        """Pick this step's chunks (see the module docstring); allocates their KV blocks."""
        out = SchedulerOutput()
        budget = self.config.max_tokens_per_step
        planned: dict[int, tuple[Sequence, int]] = {}  # seq_id -> (seq, num tokens this step), in order

        decodes: list[tuple[Sequence, int]] = []  # (seq, tokens not yet in the cache): decodes first
        prefills: list[tuple[Sequence, int]] = []
        for s in self.running:
            if s.held:
                continue  # its last token is still on the device (`Engine` async_decode): nothing to run
            u = len(s.prompt_ids) + len(s.output_ids) - s.num_computed  # s.num_uncomputed, inlined: every step
            (decodes if u == 1 else prefills).append((s, u))
        room = self.blocks.room
        for seq, uncomputed in decodes + prefills:
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            if budget == 0:
                break
            n = min(uncomputed, budget)
            target = seq.num_computed + n
            if target > room(seq.seq_id):  # most decodes fit in their last block
                while not self.blocks.can_grow(seq.seq_id, target):
                    victim = self.running[-1]  # the youngest running sequence (seq itself is running)
                    self._preempt(victim)
                    out.preempted.append(victim)
                    if victim.seq_id in planned:  # it had been planned earlier in this step: unplan it
                        budget += planned.pop(victim.seq_id)[1]
                    if victim is seq:
                        break
                if seq.status is not SequenceStatus.RUNNING:
                    continue
                self.blocks.grow(seq.seq_id, target)
            planned[seq.seq_id] = (seq, n)
            budget -= n

        if not out.preempted:
            budget = self._admit(budget, planned, out)
        self._prefetch_ahead()

        table = self.blocks.block_table
        for seq, n in planned.values():
            start = seq.num_computed
            prompt_len = len(seq.prompt_ids)
            if n == 1 and start >= prompt_len:  # a decode: its one output token
                out.num_decodes += 1
            out.seqs.append(seq)
            out.chunks.append(
                SeqChunk(seq.seq_id, token_ids_of(seq, start, n), start, table(seq.seq_id), seq.adapter_slots,
                         seq.adapter_weights if seq.adapter_slots else (),
                         start + n == prompt_len + len(seq.output_ids))
            )
        return out

    def _prefetch_ahead(self) -> None:
        """Hint the adapter store with the adapters the head of the waiting queue will need (at most as many
        distinct adapters as there are slots), so their loads overlap with the steps before they run."""
        wanted: dict[str, None] = {}
        for seq in self.waiting:
            for key in seq.adapter_keys:
                wanted.setdefault(key)
            if len(wanted) >= self.adapter_slots.num_slots:
                break
        if wanted:
            self.adapter_slots.prefetch(list(wanted)[: self.adapter_slots.num_slots])

    def _admit(self, budget: int, planned: dict[int, tuple[Sequence, int]], out: SchedulerOutput) -> int:
        """Move waiting sequences into the running set while seats, budget, blocks and slots allow."""
        resident = {k for s in self.running for k in s.adapter_keys}
        for seq in list(self.waiting):
            if len(self.running) >= self.config.max_num_seqs or budget == 0:
                break
            if seq.held:
                continue  # preempted while its last token was on the device: it ends when that token lands
            n = min(seq.num_uncomputed, budget)
            if not self.blocks.can_grow(seq.seq_id, n):
                break  # FCFS: the head waits for blocks, nobody overtakes it
            keys = seq.adapter_keys
            slots: tuple[int, ...] = ()
            if keys:
                # Too many distinct adapters with it: it waits and does not block the others. No prefetch for
                # it here: `_prefetch_ahead` hints what the head of the queue needs, at most a slot's worth.
                # Hinting every skipped request would load (and, with a CPU tier smaller than what waits,
                # evict and load again) adapters that cannot run for many steps.
                if not resident.issuperset(keys) and len(resident.union(keys)) > self.adapter_slots.num_slots:
                    continue
                try:
                    acquired = self.adapter_slots.acquire(keys)
                except EngineError as e:  # the adapter failed to load: this request fails, others go on
                    self.waiting.remove(seq)
                    self.mark_finished(seq, "error", f"adapter could not be loaded: {e}")
                    out.failed.append(seq)
                    continue
                if acquired is None:  # still loading, or its slots taken meanwhile: it waits (hinted if at the head)
                    continue
                if len(acquired) != len(keys):
                    raise EngineError(
                        f"adapter slots returned {len(acquired)} slots for {len(keys)} adapters {list(keys)}"
                    )
                slots = tuple(acquired)
                resident |= set(keys)
            self.waiting.remove(seq)
            seq.status = SequenceStatus.RUNNING
            seq.adapter_slots = slots
            self._insert(self.running, seq)
            self.blocks.grow(seq.seq_id, n)
            planned[seq.seq_id] = (seq, n)
            budget -= n
        return budget

    def advance(self, out: SchedulerOutput) -> None:
        """Record that this step's chunks ran: their tokens now sit in the KV cache."""
        for seq, chunk in zip(out.seqs, out.chunks):
            if seq.status is SequenceStatus.RUNNING:
                seq.num_computed += len(chunk.token_ids)

    # ---- leaving --------------------------------------------------------------------------------------
    def _preempt(self, seq: Sequence) -> None:
        """Recompute preemption: free blocks and slots, forget the cache, back to the waiting queue."""
        self.running.remove(seq)
        self.blocks.free(seq.seq_id)
        self._release_adapters(seq)
        seq.num_computed = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self._insert(self.waiting, seq)

    def finish(self, seq: Sequence, reason: FinishReason, error: str | None = None) -> None:
        """Take `seq` out (running or waiting): its KV blocks and adapter slots are released at once."""
        if seq.status is SequenceStatus.FINISHED:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self.blocks.free(seq.seq_id)
            self._release_adapters(seq)
        else:
            self.waiting.remove(seq)
        self.mark_finished(seq, reason, error)

    def _release_adapters(self, seq: Sequence) -> None:
        if seq.adapter_slots:
            self.adapter_slots.release(seq.adapter_keys)
            seq.adapter_slots = ()

    @staticmethod
    def mark_finished(seq: Sequence, reason: FinishReason, error: str | None = None) -> None:
        """Set the final state of a sequence the scheduler does not (or no longer) hold."""
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.error = error
