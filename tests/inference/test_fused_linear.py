"""Fused q/k/v and gate/up projections (`loraledger.inference.fused_linear`): loaded models are fused without extra memory,
give the unfused model's logits, and stay right through deep copies, casts and replaced projections (LoRA over
fused projections: tests/inference/lora/test_fused_lora.py)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from loraledger.inference.batch import BatchMetadata, SeqChunk, build_batch
from loraledger.inference.fused_linear import FusedLinear
from loraledger.inference.kv_cache import PagedKVCache
from loraledger.inference.loader import load_model
from loraledger.inference.model import LlamaModel

CHUNKS = [SeqChunk(0, tuple(range(10, 19)), 0, (0, 1, 2)), SeqChunk(1, (40,), 6, (3, 4)),
          SeqChunk(2, tuple(range(60, 65)), 3, (5, 6))]


def logits(model: LlamaModel, chunks: list[SeqChunk] = CHUNKS) -> torch.Tensor:
    cache = PagedKVCache.for_model(model.config, 8, 4, dtype=model.dtype)
    return model.compute_logits(model(build_batch(chunks, 4), cache))


def unfused(model_dir: Path) -> LlamaModel:
    model = load_model(model_dir, dtype="fp32")
    model.unfuse_projections()
    return model


def test_loaded_models_are_fused_in_place(tiny_model_dir: Path) -> None:
    model = load_model(tiny_model_dir, dtype="fp32")
    assert model.projections_fused
    attn, mlp = model.decoder_layers()[0].self_attn, model.decoder_layers()[0].mlp
    assert attn.qkv is not None and mlp.gate_up is not None
    for fused, projs in ((attn.qkv, (attn.q_proj, attn.k_proj, attn.v_proj)), (mlp.gate_up, (mlp.gate_proj, mlp.up_proj))):
        storage = fused.weight.untyped_storage().data_ptr()
        assert all(p.weight.untyped_storage().data_ptr() == storage for p in projs)  # views: no byte twice
        assert fused.weight.shape[0] == sum(p.out_features for p in projs)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in unfused(tiny_model_dir).parameters())


def test_fused_logits_equal_unfused(tiny_model_dir: Path, tiny_model: LlamaModel) -> None:
    torch.testing.assert_close(logits(tiny_model), logits(unfused(tiny_model_dir)), atol=1e-5, rtol=0)


def test_deep_copy_and_cast_keep_the_fusion_consistent(tiny_model_dir: Path) -> None:
    model = load_model(tiny_model_dir, dtype="fp32")
    want = logits(model)
    twin = copy.deepcopy(model)
    assert twin.projections_fused
    with torch.no_grad():
        twin.decoder_layers()[0].self_attn.k_proj.weight.mul_(0.5)  # an edit through the copy's projection ...
    assert (logits(twin) - want).abs().max() > 1e-3  # ... reaches the copy's fused GEMM
    torch.testing.assert_close(logits(model), want, atol=0, rtol=0)  # and not the original
    half = copy.deepcopy(model).to(torch.bfloat16)
    assert half.projections_fused and half.decoder_layers()[1].mlp.gate_up.weight.dtype == torch.bfloat16  # type: ignore[union-attr]
    ref = unfused(tiny_model_dir).to(torch.bfloat16)
    torch.testing.assert_close(logits(half), logits(ref), atol=0, rtol=0)


class Scaled(nn.Module):
    """A batch-aware replacement that is not a delta layer: y = 2 * base(x)."""

    takes_batch = True

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base

    def forward(self, x: torch.Tensor, batch: BatchMetadata) -> torch.Tensor:
        return 2 * self.base(x)


def test_a_replaced_projection_runs_on_its_own(tiny_model_dir: Path) -> None:
    fused, plain = load_model(tiny_model_dir, dtype="fp32"), unfused(tiny_model_dir)
    for m in (fused, plain):
        m.set_linear("layers.1.mlp.up_proj", Scaled(m.named_linears()["layers.1.mlp.up_proj"]))
    mlp = fused.decoder_layers()[1].mlp
    assert mlp.gate_up is not None and not mlp.gate_up.usable((mlp.gate_proj, mlp.up_proj))
    torch.testing.assert_close(logits(fused), logits(plain), atol=1e-5, rtol=0)


def test_fused_linear_refuses_what_it_cannot_fuse() -> None:
    with pytest.raises(TypeError, match="plain nn.Linear"):
        FusedLinear([nn.Linear(4, 4), nn.Identity()])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="all have a bias or all have none"):
        FusedLinear([nn.Linear(4, 4), nn.Linear(4, 2, bias=False)])
    with pytest.raises(ValueError, match="share in_features"):
        FusedLinear([nn.Linear(4, 4), nn.Linear(3, 2)])
