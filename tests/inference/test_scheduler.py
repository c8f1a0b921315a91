"""Scheduler logic without a model: a simulated paged cache checks that every chunk reads back exactly the
tokens its sequence wrote, through its block table, across steps, chunking and preemption."""

from __future__ import annotations

import random
from collections.abc import Sequence as Seq

import pytest

from loraledger.inference.adapter_mix import AdapterMix
from loraledger.inference.block_manager import BlockManager
from loraledger.inference.errors import AdapterMismatchError, AdapterNotFoundError, InvalidRequestError
from loraledger.inference.scheduler import (
    AdapterSlots,
    NoAdapterSlots,
    Scheduler,
    SchedulerConfig,
    SchedulerOutput,
)
from loraledger.inference.sequence import SamplingParams, Sequence, SequenceStatus


class SimulatedCache:
    """Slots of a paged cache holding (seq_id, position, token); the 'model' reads a sequence back through
    its block table and derives the next token from what it read (so a paging bug changes the tokens)."""

    def __init__(self, block_size: int) -> None:
        self.bs = block_size
        self.slots: dict[int, tuple[int, int, int]] = {}

    def run(self, out: SchedulerOutput) -> dict[int, int]:
        sampled: dict[int, int] = {}
        for seq, c in zip(out.seqs, out.chunks):
            assert list(c.token_ids) == seq.all_ids[c.start_pos : c.start_pos + len(c.token_ids)]
            for i, tok in enumerate(c.token_ids):
                p = c.start_pos + i
                self.slots[c.block_table[p // self.bs] * self.bs + p % self.bs] = (c.seq_id, p, tok)
            if c.sample:
                end = c.start_pos + len(c.token_ids)
                read = [self.slots[c.block_table[p // self.bs] * self.bs + p % self.bs] for p in range(end)]
                assert all(r[0] == c.seq_id and r[1] == p for p, r in enumerate(read)), (
                    "cache slot overwritten"
                )
                toks = [r[2] for r in read]
                sampled[c.seq_id] = (sum((i + 1) * t for i, t in enumerate(toks)) * 31 + len(toks)) % 1000
        return sampled


def step(sched: Scheduler, cache: SimulatedCache) -> SchedulerOutput:
    """One engine step: schedule, run on the simulated cache, append sampled tokens, finish at max_tokens."""
    out = sched.schedule()
    assert out.num_tokens <= sched.config.max_tokens_per_step
    assert len(out.seqs) <= sched.config.max_num_seqs
    assert len({c.seq_id for c in out.chunks}) == len(out.chunks)
    sched.blocks.check_invariants()
    sampled = cache.run(out)
    sched.advance(out)
    for seq in out.seqs:
        if seq.seq_id in sampled:
            seq.output_ids.append(sampled[seq.seq_id])
            if len(seq.output_ids) >= seq.params.max_tokens:
                sched.finish(seq, "length")
    return out


def drive(
    sched: Scheduler, cache: SimulatedCache | None = None, max_steps: int = 10_000
) -> list[SchedulerOutput]:
    """Run the scheduler to completion; returns every step's output."""
    cache = cache or SimulatedCache(sched.blocks.block_size)
    outs = []
    for _ in range(max_steps):
        if not sched.has_work():
            return outs
        out = step(sched, cache)
        assert not out.is_empty or out.failed, "scheduler stalled with work pending (deadlock)"
        outs.append(out)
    raise AssertionError("did not finish within max_steps")


def make_seq(sid: int, prompt_len: int, max_tokens: int = 4, priority: int = 0, adapters=()) -> Sequence:
    return Sequence(
        seq_id=sid,
        request_id=f"r{sid}",
        prompt_ids=[(sid * 7 + i) % 50 + 1 for i in range(prompt_len)],
        params=SamplingParams(max_tokens=max_tokens, temperature=0.0),
        priority=priority,
        adapters=AdapterMix.of(adapters),
    )


def make_sched(
    num_blocks: int = 64, block_size: int = 4, seqs: int = 8, budget: int = 16, slots=None
) -> Scheduler:
    return Scheduler(
        SchedulerConfig(max_num_seqs=seqs, max_tokens_per_step=budget),
        BlockManager(num_blocks, block_size),
        slots,
    )


def reference_outputs(specs: list[tuple[int, int]]) -> dict[int, list[int]]:
    """Each sequence alone on a roomy engine: the outputs every other schedule must reproduce."""
    res = {}
    for sid, (plen, mt) in enumerate(specs):
        s = make_sched(num_blocks=256, budget=64)
        seq = make_seq(sid, plen, mt)
        s.add(seq)
        drive(s)
        res[sid] = seq.output_ids
    return res


def test_chunked_prefill_and_budget() -> None:
    sched = make_sched(budget=8)
    a, b = make_seq(0, 10), make_seq(1, 5)
    sched.add(a)
    sched.add(b)
    o1 = sched.schedule()
    assert [(c.seq_id, len(c.token_ids), c.start_pos, c.sample) for c in o1.chunks] == [(0, 8, 0, False)]
    sched.advance(o1)
    o2 = sched.schedule()
    # a's last 2 prompt tokens, then b's first 6 would exceed b: b takes its 5 tokens (budget 6 left)
    assert [(c.seq_id, len(c.token_ids), c.start_pos, c.sample) for c in o2.chunks] == [
        (0, 2, 8, True),
        (1, 5, 0, True),
    ]
    assert o2.chunks[0].block_table == sched.blocks.block_table(0)
    assert len(o2.chunks[0].block_table) == 3  # 10 tokens / block 4


def test_decodes_go_before_prefills_and_all_finish_without_leak() -> None:
    sched = make_sched(budget=6, seqs=4)
    specs = [(3, 5), (20, 3), (4, 4), (9, 2)]
    seqs = [make_seq(i, p, m) for i, (p, m) in enumerate(specs)]
    for s in seqs:
        sched.add(s)
    outs = drive(sched)
    for out in outs:
        kinds = [
            len(c.token_ids) == 1 and c.start_pos >= len(s.prompt_ids) for s, c in zip(out.seqs, out.chunks)
        ]
        # once a prefill appears in a step, no decode follows it
        assert kinds == sorted(kinds, reverse=True)
    ref = reference_outputs(specs)
    assert {s.seq_id: s.output_ids for s in seqs} == ref
    assert sched.blocks.num_free_blocks == sched.blocks.num_blocks
    assert all(s.finish_reason == "length" for s in seqs)


def test_max_num_seqs_caps_running() -> None:
    sched = make_sched(seqs=2, budget=16)
    for i in range(5):
        sched.add(make_seq(i, 3, 3))
    outs = drive(sched)
    assert max(len(o.chunks) for o in outs) == 2
    assert sched.blocks.num_free_blocks == sched.blocks.num_blocks


def test_fcfs_within_priority_and_priority_first() -> None:
    sched = make_sched(seqs=1, budget=16)
    order = []
    seqs = [
        make_seq(0, 3, 2, priority=1),
        make_seq(1, 3, 2, priority=0),
        make_seq(2, 3, 2, priority=1),
        make_seq(3, 3, 2, priority=0),
    ]
    for s in seqs:
        sched.add(s)
    for out in drive(sched):
        for c in out.chunks:
            if not order or order[-1] != c.seq_id:
                order.append(c.seq_id)
    assert order == [1, 3, 0, 2]


def test_head_of_line_waits_for_blocks() -> None:
    # 6 blocks of 4: a holds 4 blocks; b (prompt 12 = 3 blocks) cannot enter; c (1 block) must not overtake b
    sched = make_sched(num_blocks=6, block_size=4, budget=32)
    a, b, c = make_seq(0, 13, 2), make_seq(1, 12, 2), make_seq(2, 2, 2)
    for s in (a, b, c):
        sched.add(s)
    cache = SimulatedCache(4)
    o1 = step(sched, cache)
    assert [ch.seq_id for ch in o1.chunks] == [0]
    assert b.status is SequenceStatus.WAITING and c.status is SequenceStatus.WAITING
    o2 = step(sched, cache)
    assert [ch.seq_id for ch in o2.chunks] == [0]  # a decodes; still no room for b, and c waits behind b
    drive(sched, cache)
    assert all(s.is_finished for s in (a, b, c))


def test_preemption_recomputes_youngest_and_keeps_outputs() -> None:
    specs = [(6, 12), (7, 12), (5, 12), (8, 12)]
    ref = reference_outputs(specs)
    # 10 blocks of 4 = 40 slots; the four need 17..19 slots each at the end: preemption is unavoidable
    sched = make_sched(num_blocks=10, block_size=4, budget=16)
    seqs = [make_seq(i, p, m) for i, (p, m) in enumerate(specs)]
    for s in seqs:
        sched.add(s)
    outs = drive(sched)
    preempted = [v for o in outs for v in o.preempted]
    assert preempted, "the pool was meant to be too small"
    # the victim is always the youngest running sequence at that moment: never the oldest
    assert all(v.seq_id != 0 for v in preempted)
    assert {s.seq_id: s.output_ids for s in seqs} == ref
    assert sched.blocks.num_free_blocks == 10


def test_sequence_that_can_never_fit_is_rejected_at_add() -> None:
    sched = make_sched(num_blocks=4, block_size=4)  # 16 tokens
    with pytest.raises(InvalidRequestError, match="whole cache holds 16"):
        sched.add(make_seq(0, 10, 8))
    sched.add(make_seq(1, 10, 7))  # 10 + 7 - 1 = 16: fits exactly
    drive(sched)
    assert sched.blocks.num_free_blocks == 4


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_workload_never_deadlocks_or_leaks(seed: int) -> None:
    rng = random.Random(seed)
    nb, bs = 12, 4
    sched = make_sched(
        num_blocks=nb, block_size=bs, seqs=rng.choice([2, 4, 8]), budget=rng.choice([8, 13, 32])
    )
    specs = []
    seqs = []
    for i in range(25):
        p, m = rng.randrange(1, 30), rng.randrange(1, 16)
        if p + m - 1 > nb * bs:
            continue
        specs.append((p, m))
        seqs.append(make_seq(len(seqs), p, m, priority=rng.choice([0, 0, 1])))
    for s in seqs[:10]:
        sched.add(s)
    pending = seqs[10:]
    cache = SimulatedCache(bs)
    steps = 0
    while sched.has_work() or pending:
        steps += 1
        assert steps < 5000, "no progress"
        if pending and rng.random() < 0.3:
            sched.add(pending.pop(0))  # arrivals between steps
        out = step(sched, cache)
        if out.is_empty:
            assert not sched.has_work()
    ref = reference_outputs(specs)
    assert {s.seq_id: s.output_ids for s in seqs} == ref
    assert sched.blocks.num_free_blocks == nb


def test_finish_waiting_and_running_frees_at_once() -> None:
    sched = make_sched(budget=4, seqs=2)
    a, b = make_seq(0, 8, 5), make_seq(1, 3, 5)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    sched.advance(out)
    assert a.status is SequenceStatus.RUNNING and sched.blocks.num_used_blocks == 1
    sched.finish(a, "cancelled")
    sched.finish(b, "cancelled")
    assert sched.blocks.num_free_blocks == sched.blocks.num_blocks
    assert not sched.has_work() and a.finish_reason == "cancelled" and b.finish_reason == "cancelled"
    sched.finish(a, "cancelled")  # idempotent


class CountingSlots:
    """A small real AdapterSlots: `num_slots` slots, pinned by reference count; `broken` keys fail to load."""

    def __init__(self, num_slots: int, known: Seq[str], broken: Seq[str] = ()) -> None:
        self._n = num_slots
        self.known = set(known)
        self.broken = set(broken)
        self.slot_of: dict[str, int] = {}
        self.refs: dict[str, int] = {}
        self.prefetched: list[str] = []

    @property
    def num_slots(self) -> int:
        return self._n

    def validate(self, keys: Seq[str]) -> None:
        for k in keys:
            if k not in self.known:
                raise AdapterNotFoundError(f"unknown adapter {k}")

    def acquire(self, keys: Seq[str]) -> tuple[int, ...] | None:
        for k in keys:
            if k in self.broken:
                raise AdapterMismatchError(f"adapter {k}: weights hash mismatch")
        # evict unpinned to make room
        need = [k for k in keys if k not in self.slot_of]
        free = [s for s in range(self._n) if s not in self.slot_of.values()]
        unpinned = [k for k in self.slot_of if self.refs.get(k, 0) == 0 and k not in keys]
        if len(need) > len(free) + len(unpinned):
            return None
        for k in need:
            if not free:
                victim = unpinned.pop(0)
                free.append(self.slot_of.pop(victim))
            self.slot_of[k] = free.pop(0)
        for k in keys:
            self.refs[k] = self.refs.get(k, 0) + 1
        return tuple(self.slot_of[k] for k in keys)

    def release(self, keys: Seq[str]) -> None:
        for k in keys:
            assert self.refs[k] > 0
            self.refs[k] -= 1

    def prefetch(self, keys: Seq[str]) -> None:
        self.prefetched.extend(keys)


def test_adapter_slots_bound_distinct_adapters_and_do_not_block_others() -> None:
    slots = CountingSlots(2, known=["a", "b", "c"])
    assert isinstance(slots, AdapterSlots)
    sched = make_sched(budget=32, slots=slots)
    seqs = [
        make_seq(0, 3, 6, adapters=[("a", 1.0)]),
        make_seq(1, 3, 6, adapters=[("b", 1.0)]),
        make_seq(2, 3, 6, adapters=[("c", 1.0)]),  # must wait for a slot
        make_seq(3, 3, 6),  # no adapter: must not wait behind seq 2
        make_seq(4, 3, 6, adapters=[("a", 0.5), ("b", 0.5)]),  # a merge of resident adapters
    ]
    for s in seqs:
        sched.add(s)
    cache = SimulatedCache(4)
    o1 = step(sched, cache)
    assert [c.seq_id for c in o1.chunks] == [0, 1, 3, 4]
    assert "c" in slots.prefetched
    by_id = {c.seq_id: c for c in o1.chunks}
    assert by_id[4].adapter_slots == (slots.slot_of["a"], slots.slot_of["b"]) and by_id[4].adapter_scales == (
        0.5,
        0.5,
    )
    assert by_id[3].adapter_slots == () and by_id[0].adapter_scales == (1.0,)
    outs = [o1] + drive(sched, cache)
    for o in outs:
        keys = {k for s in o.seqs for k in s.adapter_keys}
        assert len(keys) <= 2
    assert all(s.is_finished for s in seqs)
    assert all(v == 0 for v in slots.refs.values())


def test_waiting_requests_adapters_are_prefetched_ahead_of_admission() -> None:
    """Requests that cannot run yet (no seat) still get their adapters warmed, head of the queue first, at most
    as many distinct adapters as there are slots."""
    slots = CountingSlots(2, known=["a", "b", "c", "d"])
    sched = make_sched(budget=32, slots=slots, seqs=1)
    for i, key in enumerate(["a", "b", "c", "d"]):
        sched.add(make_seq(i, 3, 2, adapters=[(key, 1.0)]))
    step(sched, SimulatedCache(4))
    assert slots.prefetched[-2:] == ["b", "c"]  # "a" runs; the next two waiting adapters are warmed
    assert "d" not in slots.prefetched


def test_adapter_errors() -> None:
    slots = CountingSlots(2, known=["a", "bad", "c"], broken=["bad"])
    sched = make_sched(slots=slots)
    with pytest.raises(AdapterNotFoundError, match="unknown adapter zz"):
        sched.add(make_seq(0, 3, adapters=[("zz", 1.0)]))
    with pytest.raises(InvalidRequestError, match="names an adapter twice"):
        sched.add(make_seq(1, 3, adapters=[("a", 0.5), ("a", 0.5)]))
    with pytest.raises(InvalidRequestError, match="only 2 adapter slots"):
        sched.add(make_seq(1, 3, adapters=[("a", 0.3), ("bad", 0.3), ("c", 0.4)]))
    bad, good = make_seq(2, 3, adapters=[("bad", 1.0)]), make_seq(3, 3)
    sched.add(bad)
    sched.add(good)
    out = sched.schedule()
    assert out.failed == [bad] and bad.finish_reason == "error" and "hash mismatch" in (bad.error or "")
    assert [c.seq_id for c in out.chunks] == [3]
    with pytest.raises(AdapterNotFoundError, match="base model only"):
        make_sched(slots=NoAdapterSlots()).add(make_seq(5, 3, adapters=[("a", 1.0)]))


def test_config_rejects_budget_below_seats() -> None:
    with pytest.raises(ValueError, match="max_tokens_per_step"):
        SchedulerConfig(max_num_seqs=8, max_tokens_per_step=4)
