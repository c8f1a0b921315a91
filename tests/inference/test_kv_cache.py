"""The physical paged KV cache: sizing from a memory budget and writes landing at their flat slots."""

from __future__ import annotations

import pytest
import torch

from loraledger.inference.config import ModelConfig
from loraledger.inference.errors import KVCacheError
from loraledger.inference.kv_cache import PagedKVCache, bytes_per_block, num_blocks_for_budget

CONFIG = ModelConfig.from_dict({
    "model_type": "llama", "vocab_size": 10, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
    "num_attention_heads": 4, "num_key_value_heads": 2,
})


def test_blocks_for_budget() -> None:
    per_block = 2 * 3 * 16 * 2 * 16 * 2  # k and v, 3 layers, 16 tokens, 2 kv heads, head_dim 16, bf16
    assert bytes_per_block(CONFIG, 16, torch.bfloat16) == per_block
    assert num_blocks_for_budget(CONFIG, 16, 10 * per_block + per_block - 1, torch.bfloat16) == 10
    assert num_blocks_for_budget(CONFIG, 16, 10 * per_block, torch.float32) == 5
    with pytest.raises(KVCacheError, match="holds no block"):
        num_blocks_for_budget(CONFIG, 16, per_block - 1, torch.bfloat16)


def test_write_lands_at_slots() -> None:
    cache = PagedKVCache.for_model(CONFIG, num_blocks=4, block_size=4)
    assert cache.key[0].shape == (4, 4, 2, 16) and cache.num_layers == 3 and cache.num_slots == 16
    k = torch.randn(3, 2, 16)
    v = torch.randn(3, 2, 16)
    cache.write(1, k, v, torch.tensor([13, 2, 7]))
    assert torch.equal(cache.key[1][3, 1], k[0]) and torch.equal(cache.key[1][0, 2], k[1])
    assert torch.equal(cache.value[1][1, 3], v[2])
    assert cache.key[0].abs().sum() == 0 and cache.key[2].abs().sum() == 0, "another layer was written"
    assert int((cache.key[1].abs().sum(dim=(2, 3)) > 0).sum()) == 3, "more slots written than asked"
