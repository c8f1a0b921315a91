"""LoRA deltas added into column views of fused q/k/v and gate/up outputs (`loraledger.inference.fused_linear`), on the torch
kernels and on the Triton SGMV/BGMV kernels (interpreted on the CPU), against LoRA over unfused projections."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from loraledger.inference.batch import SeqChunk, build_batch
from loraledger.inference.kv_cache import PagedKVCache
from loraledger.inference.loader import load_model
from loraledger.inference.lora.adapter import BaseDims
from loraledger.inference.lora.layers import apply_lora
from loraledger.inference.lora.store import AdapterStore
from loraledger.inference.model import LlamaModel

CHUNKS = [SeqChunk(0, tuple(range(10, 19)), 0, (0, 1, 2)), SeqChunk(1, (40,), 6, (3, 4)),
          SeqChunk(2, tuple(range(60, 65)), 3, (5, 6))]


def unfused(model_dir: Path) -> LlamaModel:
    model = load_model(model_dir, dtype="fp32")
    model.unfuse_projections()
    return model


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_lora_deltas_on_fused_outputs(tiny_model_dir: Path, make_adapter: Any, backend: str,
                                      tmp_path_factory: pytest.TempPathFactory) -> None:
    """LoRA on q/k/v/gate/up adds into column views of the fused outputs (SGMV in the prefill chunks, BGMV in a
    decode-only step): the same logits as LoRA over the unfused projections on the torch kernels."""
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    adapter = make_adapter(hf, tmp_path_factory.mktemp("fused-lora") / "a", r=8, alpha=16, std=0.1, seed=3)
    tables = {0: (0, 1, 2), 1: (3, 4), 2: (5, 6, 7)}  # seq 2's decode at position 8 needs a third block
    decode = [SeqChunk(c.seq_id, (7,), c.start_pos + len(c.token_ids), tables[c.seq_id]) for c in CHUNKS]
    out = {}
    for name, model, kernels in (("fused", load_model(tiny_model_dir, dtype="fp32"), backend),
                                 ("plain", unfused(tiny_model_dir), "torch")):
        slots = apply_lora(model, num_slots=2, max_rank=8, backend=kernels)
        store = AdapterStore(slots, BaseDims.from_model_config(model.config))
        store.register("a", adapter)
        slot = store.acquire(["a"])
        assert slot is not None
        with_adapter = [SeqChunk(c.seq_id, c.token_ids, c.start_pos, c.block_table, slot if c.seq_id != 1 else (),
                                 (1.0,) if c.seq_id != 1 else ()) for c in (*CHUNKS, *decode)]
        cache = PagedKVCache.for_model(model.config, 8, 4)
        prefill = model.compute_logits(model(build_batch(with_adapter[:3], 4), cache))
        step = model.compute_logits(model(build_batch(with_adapter[3:], 4), cache))
        out[name] = torch.cat([prefill, step])
    torch.testing.assert_close(out["fused"], out["plain"], atol=1e-4, rtol=0)
    base = unfused(tiny_model_dir)  # no LoRA at all: the adapted rows must differ from it
    cache = PagedKVCache.for_model(base.config, 8, 4)
    no_lora = torch.cat([base.compute_logits(base(build_batch(CHUNKS, 4), cache)),
                         base.compute_logits(base(build_batch(decode, 4), cache))])
    adapted = torch.ones(len(no_lora), dtype=torch.bool)
    adapted[9:10] = False  # sequence 1's prefill row
    adapted[15 + 1] = False  # and its decode row
    assert (out["fused"][adapted] - no_lora[adapted]).abs().amax(-1).min() > 1e-2
    torch.testing.assert_close(out["fused"][~adapted], no_lora[~adapted], atol=1e-4, rtol=0)
