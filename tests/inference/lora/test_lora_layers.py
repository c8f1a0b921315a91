"""LoRALinear on its own (over nn.Linear, driven by a real BatchMetadata) and apply_lora on a LlamaModel."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from loraledger.inference.batch import SeqChunk, build_batch
from loraledger.inference.config import ModelConfig
from loraledger.inference.errors import AdapterFormatError
from loraledger.inference.lora.layers import LoRAContext, LoRALinear, apply_lora
from loraledger.inference.model import LlamaModel


def _layer(num_slots: int = 4, max_rank: int = 16, backend: str = "torch") -> LoRALinear:
    torch.manual_seed(0)
    return LoRALinear(nn.Linear(24, 40), LoRAContext(num_slots, max_rank, backend))


def _weights(r: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(24, r, generator=g) / 5, torch.randn(r, 40, generator=g) / r**0.5  # outputs O(1)


def test_forward_mixes_slots_ranks_merges_and_no_adapter() -> None:
    layer = _layer()
    ws = {0: (*_weights(4, 0), 0.5), 2: (*_weights(16, 1), 2.0), 3: (*_weights(1, 2), 1.0)}
    for slot, (a, b, s) in ws.items():
        layer.set_slot(slot, a, b, s)
    chunks = [
        SeqChunk(0, (1, 2, 3), 0, (0,), (2,), (1.0,)),  # prefill on slot 2
        SeqChunk(1, (4,), 5, (1, 2), (), ()),  # no adapter
        SeqChunk(2, (5, 6), 0, (3,), (0, 3), (0.25, 0.75)),  # merged request
        SeqChunk(3, (7,), 2, (4,), (3,), (1.0,)),
    ]
    batch = build_batch(chunks, block_size=4)
    x = torch.randn(batch.num_tokens, 24)
    got = layer(x, batch)
    expected = layer.base(x).clone()
    for t in range(batch.num_tokens):
        for m in range(batch.token_adapter_slots.shape[1]):
            slot = int(batch.token_adapter_slots[t, m])
            if slot >= 0:
                a, b, s = ws[slot]
                expected[t] += float(batch.token_adapter_scales[t, m]) * s * (x[t] @ a @ b)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(got[3], layer.base(x)[3])  # the token with no adapter: base output exactly
    assert torch.equal(layer(x), layer.base(x))  # no batch: base only


def test_indices_built_once_per_step() -> None:
    layer = _layer()
    layer.set_slot(1, *_weights(4, 0), 1.0)
    batch = build_batch([SeqChunk(0, (1, 2), 0, (0,), (1,), (1.0,))], block_size=4)
    x = torch.randn(2, 24)
    layer(x, batch)
    first = layer.context.indices_for(batch)
    layer(x, batch)
    assert layer.context.indices_for(batch) is first  # shared, not rebuilt per layer call
    other = build_batch([SeqChunk(0, (3,), 2, (0,), (1,), (1.0,))], block_size=4)
    assert layer.context.indices_for(other) is not first and layer.context.indices_for(other).decode_only


def test_clear_slot_and_bad_weights() -> None:
    layer = _layer()
    layer.set_slot(1, *_weights(8, 0), 1.0)
    layer.set_slot(1, *_weights(2, 1), 1.0)  # refilled at a lower rank: the old columns are zeroed
    assert layer.ranks_host[1] == 2 and not layer.lora_A[1, :, 2:].any() and not layer.lora_B[1, 2:].any()
    layer.clear_slot(1)
    assert layer.ranks_host[1] == 0 and int(layer.ranks[1]) == 0 and not layer.lora_A[1].any()
    with pytest.raises(AdapterFormatError, match="over this model's max_rank 16"):
        layer.set_slot(0, *_weights(17, 0), 1.0)
    with pytest.raises(AdapterFormatError, match="do not fit"):
        layer.set_slot(0, torch.zeros(23, 4), torch.zeros(4, 40), 1.0)
    with pytest.raises(IndexError):
        layer.set_slot(4, *_weights(2, 0), 1.0)
    with pytest.raises(ValueError, match="unknown LoRA kernel backend"):
        LoRAContext(2, 4, "fast")


def test_apply_lora_wraps_named_linears() -> None:
    cfg = ModelConfig.from_dict({"model_type": "llama", "vocab_size": 96, "hidden_size": 32,
                                 "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
                                 "num_key_value_heads": 2})
    model = LlamaModel(cfg)
    slots = apply_lora(model, num_slots=3, max_rank=8, targets=("q_proj", "down_proj"), backend="torch")
    assert sorted(slots.layers) == ["layers.0.mlp.down_proj", "layers.0.self_attn.q_proj",
                                    "layers.1.mlp.down_proj", "layers.1.self_attn.q_proj"]
    assert isinstance(model.layers[1].mlp.down_proj, LoRALinear)
    assert isinstance(model.layers[1].mlp.up_proj, nn.Linear)
    assert slots.layers["layers.0.self_attn.q_proj"].context is slots.context
    with pytest.raises(ValueError, match="already has LoRA layers"):
        apply_lora(model, num_slots=3, max_rank=8)
    with pytest.raises(ValueError, match="unknown LoRA targets"):
        apply_lora(LlamaModel(cfg), num_slots=3, max_rank=8, targets=("lm_head",))


def test_slot_fill_writes_every_layers_rank_in_one_copy_or_per_layer_once_unshared() -> None:
    """`LoRASlots.load` writes the device ranks of all layers as one column of a shared tensor; a layer whose
    ranks buffer was replaced (e.g. by `module.to()`) no longer shares it, and then gets its own write."""
    from pathlib import Path

    from loraledger.inference.lora.adapter import AdapterConfig, LoRAAdapter, LoRAModuleWeights

    cfg = ModelConfig.from_dict({"model_type": "llama", "vocab_size": 96, "hidden_size": 32,
                                 "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
                                 "num_key_value_heads": 2})
    slots = apply_lora(LlamaModel(cfg), num_slots=3, max_rank=8, targets=("q_proj", "down_proj"), backend="torch")
    names = sorted(slots.layers)
    ranks = dict(zip(names, (2, 8, 5, 1), strict=True))

    def adapter(skip: str | None = None) -> LoRAAdapter:
        mods = {}
        for n in names:
            if n == skip:
                continue
            layer, r = slots.layers[n], ranks[n]
            mods[n] = LoRAModuleWeights(torch.ones(layer.in_features, r), torch.full((r, layer.out_features), 0.5), 2.0)
        config = AdapterConfig.from_dict({"peft_type": "LORA", "r": 8, "lora_alpha": 16,
                                          "target_modules": ["q_proj", "down_proj"]})
        return LoRAAdapter(Path("mem"), config, "0x" + "00" * 32, mods)  # type: ignore[arg-type]

    slots.load(1, adapter())
    for n in names:
        layer = slots.layers[n]
        assert int(layer.ranks[1]) == layer.ranks_host[1] == ranks[n]
        assert torch.equal(layer.lora_B[1, : ranks[n]], torch.full((ranks[n], layer.out_features), 0.5))  # as given
    assert int(slots.layers[names[0]].ranks.sum()) == ranks[names[0]]  # only slot 1 was written
    lone = slots.layers[names[2]]
    lone.ranks = lone.ranks.clone()  # no longer a row of the shared tensor
    slots.load(2, adapter(skip=names[3]))
    assert int(lone.ranks[2]) == ranks[names[2]] and int(slots.layers[names[3]].ranks[2]) == 0
    assert all(int(slots.layers[n].ranks[2]) == ranks[n] for n in names[:2])
    slots.clear(1)
    assert all(int(slots.layers[n].ranks[1]) == 0 == slots.layers[n].ranks_host[1] for n in names)
