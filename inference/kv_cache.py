"""The physical paged KV cache: per layer one key and one value tensor split into fixed-size blocks.

    key[layer], value[layer]: [num_blocks, block_size, num_kv_heads, head_dim]
    flat slot s = block * block_size + offset  <->  key[layer][block, offset]

The cache only stores; which block ids are free is the scheduler's business (`loraledger.inference.block_manager`), and
`BatchMetadata.slot_mapping` / `block_tables` say where each token goes and where each sequence lives.
"""

from __future__ import annotations

import torch

from loraledger.inference.config import ModelConfig
from loraledger.inference.errors import KVCacheError


def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block takes over all layers: 2 (k, v) * layers * block_size * kv_heads * head_dim * itemsize."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim * itemsize


def num_blocks_for_budget(config: ModelConfig, block_size: int, budget_bytes: int, dtype: torch.dtype) -> int:
    """How many blocks fit in `budget_bytes`: floor(budget_bytes / bytes_per_block). Raises `KVCacheError`
    if not even one block fits (the budget is too small for this model)."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    per_block = bytes_per_block(config, block_size, dtype)
    n = budget_bytes // per_block
    if n < 1:
        raise KVCacheError(
            f"a KV budget of {budget_bytes} bytes holds no block of {per_block} bytes "
            f"(block_size={block_size}, {config.num_layers} layers, {config.num_kv_heads} kv heads, "
            f"head_dim={config.head_dim}, {dtype}); raise the budget or lower block_size"
        )
    return int(n)


class PagedKVCache:
    """Key and value blocks of every layer; `write` stores one step's k/v at their flat slots."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.key: list[torch.Tensor] = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.value: list[torch.Tensor] = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @classmethod
    def for_model(
        cls,
        config: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> PagedKVCache:
        """A cache shaped for `config` (its layers, kv heads and head_dim)."""
        return cls(config.num_layers, num_blocks, block_size, config.num_kv_heads, config.head_dim, dtype, device)

    @property
    def num_layers(self) -> int:
        return len(self.key)

    @property
    def num_slots(self) -> int:
        """num_blocks * block_size: the number of token positions the cache can hold."""
        return self.num_blocks * self.block_size

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """key[layer].flat[slot_mapping[t]] = k[t]; same for v.   k, v: [T, kv_heads, head_dim]; slots: [T] int64."""
        self.key[layer].view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, slot_mapping, k.to(self.dtype))
        self.value[layer].view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, slot_mapping, v.to(self.dtype))
