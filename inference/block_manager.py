"""Which physical KV blocks belong to which sequence (host-side allocator; the tensors live in `kv_cache`).

The paged cache holds `num_blocks` blocks of `block_size` token slots. A sequence holding n tokens owns
ceil(n / block_size) blocks, listed in its block table: block_table[j] holds its tokens
[j * block_size, (j + 1) * block_size). Tables only grow (one block at a time as tokens are appended) until
the sequence is freed (finished, cancelled or preempted), when all its blocks go back to the pool at once.
No prefix sharing: every block has exactly one owner.
"""

from __future__ import annotations

from loraledger.inference.errors import KVCacheError


class BlockManager:
    """Free-block pool plus one block table per sequence id."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise KVCacheError(f"the KV cache needs at least 1 block, got num_blocks={num_blocks}")
        if block_size < 1:
            raise KVCacheError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # A stack: the most recently freed block is reused first (still warm in caches).
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._tables: dict[int, list[int]] = {}
        self._frozen: dict[int, tuple[int, ...]] = {}  # tuple(table) of each sequence, rebuilt when it grows

    # ---- counts ---------------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_for_tokens(self, num_tokens: int) -> int:
        """ceil(num_tokens / block_size)."""
        return -(-num_tokens // self.block_size)

    def extra_blocks_needed(self, seq_id: int, num_tokens: int) -> int:
        """Blocks `seq_id` must gain so that its table covers `num_tokens` tokens (0 if it already does)."""
        have = len(self._tables.get(seq_id, ()))
        return max(0, self.blocks_for_tokens(num_tokens) - have)

    def room(self, seq_id: int) -> int:
        """Tokens the blocks `seq_id` holds can take (0 if it holds none)."""
        table = self._tables.get(seq_id)
        return len(table) * self.block_size if table is not None else 0

    def can_grow(self, seq_id: int, num_tokens: int) -> bool:
        return self.extra_blocks_needed(seq_id, num_tokens) <= len(self._free)

    # ---- changes --------------------------------------------------------------------------------------
    def grow(self, seq_id: int, num_tokens: int) -> tuple[int, ...]:
        """Extend (or create) the table of `seq_id` to cover `num_tokens` tokens; return the whole table.

        Raises `KVCacheError` without changing anything when the pool has too few free blocks.
        """
        need = self.extra_blocks_needed(seq_id, num_tokens)
        if need > len(self._free):
            raise KVCacheError(
                f"sequence {seq_id} needs {need} more KV blocks for {num_tokens} tokens but only "
                f"{len(self._free)} of {self.num_blocks} are free (the scheduler should have preempted)"
            )
        table = self._tables.setdefault(seq_id, [])
        for _ in range(need):
            table.append(self._free.pop())
        frozen = self._frozen[seq_id] = tuple(table)
        return frozen

    def free(self, seq_id: int) -> int:
        """Return every block of `seq_id` to the pool; return how many. Unknown id -> `KVCacheError`."""
        table = self._tables.pop(seq_id, None)
        if table is None:
            raise KVCacheError(f"sequence {seq_id} holds no KV blocks (double free or never allocated)")
        del self._frozen[seq_id]
        self._free.extend(reversed(table))
        return len(table)

    # ---- queries --------------------------------------------------------------------------------------
    def has(self, seq_id: int) -> bool:
        return seq_id in self._tables

    def block_table(self, seq_id: int) -> tuple[int, ...]:
        table = self._frozen.get(seq_id)
        if table is None:
            raise KVCacheError(f"sequence {seq_id} holds no KV blocks")
        return table

    def num_seqs(self) -> int:
        return len(self._tables)

    def check_invariants(self) -> None:
        """Every block is either free or owned by exactly one sequence (used by tests and debug runs)."""
        owned = [b for t in self._tables.values() for b in t]
        all_blocks = owned + self._free
        assert len(all_blocks) == self.num_blocks, "a block is lost or counted twice"
        assert self._frozen == {k: tuple(v) for k, v in self._tables.items()}, "a cached block table is stale"
        assert sorted(all_blocks) == list(range(self.num_blocks)), "block ids are duplicated or out of range"
