"""Block allocator: grow, free, counts, errors, no leak under random churn."""

from __future__ import annotations

import random

import pytest

from loraledger.inference.block_manager import BlockManager
from loraledger.inference.errors import KVCacheError


def test_grow_covers_tokens_and_counts() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    assert bm.capacity_tokens == 32
    t = bm.grow(1, 5)  # 5 tokens -> 2 blocks
    assert len(t) == 2 and bm.num_used_blocks == 2 and bm.num_free_blocks == 6
    assert bm.grow(1, 8) == t  # still 2 blocks
    t3 = bm.grow(1, 9)
    assert t3[:2] == t and len(t3) == 3
    assert bm.extra_blocks_needed(1, 16) == 1 and bm.extra_blocks_needed(2, 16) == 4
    assert bm.block_table(1) == t3
    assert bm.free(1) == 3
    assert bm.num_free_blocks == 8 and not bm.has(1)
    bm.check_invariants()


def test_tables_are_disjoint() -> None:
    bm = BlockManager(num_blocks=10, block_size=2)
    a = bm.grow(1, 7)
    b = bm.grow(2, 6)
    assert not set(a) & set(b)
    assert set(a) | set(b) <= set(range(10))
    bm.check_invariants()


def test_exhaustion_changes_nothing() -> None:
    bm = BlockManager(num_blocks=3, block_size=4)
    bm.grow(1, 8)
    assert not bm.can_grow(2, 5)
    with pytest.raises(KVCacheError, match="needs 2 more KV blocks"):
        bm.grow(2, 5)
    assert bm.num_free_blocks == 1 and not bm.has(2)
    assert bm.can_grow(2, 4)


def test_double_free_and_unknown_are_errors() -> None:
    bm = BlockManager(num_blocks=2, block_size=4)
    bm.grow(7, 1)
    bm.free(7)
    with pytest.raises(KVCacheError, match="double free"):
        bm.free(7)
    with pytest.raises(KVCacheError, match="holds no KV blocks"):
        bm.block_table(3)
    with pytest.raises(KVCacheError, match="at least 1 block"):
        BlockManager(num_blocks=0, block_size=4)


def test_random_churn_never_leaks() -> None:
    rng = random.Random(0)
    bm = BlockManager(num_blocks=64, block_size=4)
    lens: dict[int, int] = {}
    for step in range(2000):
        op = rng.random()
        if op < 0.5:
            sid = rng.randrange(20)
            target = lens.get(sid, 0) + rng.randrange(1, 9)
            if bm.can_grow(sid, target):
                bm.grow(sid, target)
                lens[sid] = target
        elif lens:
            sid = rng.choice(sorted(lens))
            assert bm.free(sid) == bm.blocks_for_tokens(lens.pop(sid))
        assert bm.num_used_blocks == sum(bm.blocks_for_tokens(n) for n in lens.values())
    bm.check_invariants()
    for sid in list(lens):
        bm.free(sid)
    assert bm.num_free_blocks == 64
