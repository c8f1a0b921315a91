"""QLoRA serving: the runner with its projections in bitsandbytes NF4 (CPU here), with and without LoRA.

Measured on this CPU (init_tiny defaults, 64 prompt tokens; see benchmarks/results/qlora_cpu.json):
- NF4 weight error ||deq(W) - W|| / ||W|| = 0.090 for Gaussian weights (4 bits, absmax per 64).
- our NF4 runner vs transformers' own bitsandbytes-4bit LlamaForCausalLM: max |logits diff| ~6e-6 (same bits).
- vs the unquantized model, tiny model with W ~ N(0, 1/fan_in): relative logits error 0.14, greedy agreement 0.81.
  (init_tiny's own N(0, 0.25) weights are chaotic and amplify the error: 0.52 and 0.39.)
- LoRA over the NF4 base vs peft over the same bitsandbytes model: ~1e-5.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install 'loraledger[quant]')")

from loraledger.inference.batch import SeqChunk, build_batch
from loraledger.inference.engine import Engine
from loraledger.inference.engine_config import EngineConfig
from loraledger.inference.errors import QuantizationError
from loraledger.inference.kv_cache import PagedKVCache
from loraledger.inference.loader import load_model
from loraledger.inference.lora.adapter import BaseDims
from loraledger.inference.lora.layers import apply_lora
from loraledger.inference.lora.store import AdapterStore
from loraledger.inference.model import LlamaModel
from loraledger.inference.quant import (
    is_nf4,
    load_model_quantized,
    module_nbytes,
    projections_nbytes,
    quantize_nf4,
)
from loraledger.inference.requests import GenerationRequest
from loraledger.inference.sequence import SamplingParams

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
EXACT = 1e-4  # same quantized bits, different kernels / op order
NEW_TOKENS = 4


def _bnb_runs_here() -> bool:
    """bitsandbytes imports on machines where its 4-bit kernels cannot run; probe one tiny layer."""
    lin = torch.nn.Linear(64, 8)
    q = bnb.nn.Linear4bit(64, 8, compute_dtype=torch.float32, quant_type="nf4", device="meta")
    q.weight = bnb.nn.Params4bit(lin.weight.detach().clone(), requires_grad=False, quant_type="nf4", module=q)
    q.bias = torch.nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
    q.weight = q.weight.to("cpu")
    with torch.no_grad():
        return bool(torch.isfinite(q(torch.randn(2, 64))).all())


pytestmark = pytest.mark.skipif(not _bnb_runs_here(), reason="bitsandbytes 4-bit cannot run on this machine")


def _bnb_matmul_in_bf16() -> bool:
    """bitsandbytes' CPU 4-bit matmul casts its input to bfloat16 on CPUs with AVX512-BF16 (its fused kernel);
    elsewhere it dequantizes and multiplies in the compute dtype."""
    from bitsandbytes.functional import has_avx512bf16

    return not torch.cuda.is_available() and bool(has_avx512bf16())


# LoRA over nf4 against peft over bitsandbytes: the same bits, but the LoRA term is added in another order, so
# the next projection's input differs in the last float32 bits; where bitsandbytes rounds that input to bf16,
# a last-bit difference can land on the other side of a bf16 rounding step (seen: 0.03 on logits of ~10)
LORA_OVER_NF4_TOL = 0.1 if _bnb_matmul_in_bf16() else EXACT


def prompt_logits(model: LlamaModel, ids: list[int]) -> torch.Tensor:
    """One prefill of `ids` through the runner -> logits [L, vocab] float32."""
    blocks = -(-len(ids) // 4)
    batch = build_batch([SeqChunk(0, tuple(ids), 0, tuple(range(blocks)))], 4)
    cache = PagedKVCache.for_model(model.config, blocks, 4)
    return model.compute_logits(model(batch, cache))


@pytest.fixture(scope="module")
def ids(tiny_model: LlamaModel) -> list[int]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(6, tiny_model.config.vocab_size, (64,), generator=g).tolist()


@pytest.fixture(scope="module")
def nf4_model(tiny_model_dir: Path) -> LlamaModel:
    return load_model_quantized(tiny_model_dir, "nf4", "fp32", "cpu")


def load_hf_nf4(model_dir: Path) -> Any:
    """transformers' own 4-bit model of the checkpoint (nf4, float32 compute, no double quant).

    Load a fresh one rather than `copy.deepcopy` one: a deep copy of bitsandbytes' 4-bit weights does not keep
    what they decode to (seen with bitsandbytes 0.50.2: the copy's logits differed from the original's by 3)."""
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    return LlamaForCausalLM.from_pretrained(
        model_dir, quantization_config=cfg, device_map="cpu", dtype=torch.float32
    ).eval()


@pytest.fixture(scope="module")
def hf_nf4(tiny_model_dir: Path) -> Any:
    return load_hf_nf4(tiny_model_dir)


def test_projections_are_nf4_and_smaller(nf4_model: LlamaModel, tiny_model: LlamaModel) -> None:
    linears = nf4_model.named_linears()
    assert len(linears) == 7 * nf4_model.config.num_layers
    assert all(is_nf4(m) for m in linears.values())
    assert not is_nf4(nf4_model.lm_head) and nf4_model.embed_tokens.weight.dtype == torch.float32
    # fp32 -> 4 bits + one float32 absmax per 64 weights: 4.5 / 32 of the bytes
    ratio = projections_nbytes(nf4_model) / projections_nbytes(tiny_model)
    assert 0.13 < ratio < 0.15, ratio
    assert module_nbytes(nf4_model) < module_nbytes(tiny_model)


def test_nf4_weights_within_4bit_error(nf4_model: LlamaModel, tiny_model: LlamaModel) -> None:
    """||deq(W) - W|| / ||W|| per projection: 0.090 measured for the Gaussian weights of init_tiny."""
    ref = tiny_model.named_linears()
    for name, q in nf4_model.named_linears().items():
        w = ref[name].weight.detach()
        deq = bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state)
        rel = float((deq - w).norm() / w.norm())
        assert 0.01 < rel < 0.12, (name, rel)


def test_nf4_runner_equals_transformers_bitsandbytes(nf4_model: LlamaModel, hf_nf4: Any, ids: list[int]) -> None:
    got = prompt_logits(nf4_model, ids)
    with torch.no_grad():
        want = hf_nf4(torch.tensor([ids])).logits[0].float()
    torch.testing.assert_close(got, want, atol=EXACT, rtol=0)


def test_nf4_close_to_unquantized_on_a_well_conditioned_model(tiny_model: LlamaModel, ids: list[int]) -> None:
    """W ~ N(0, 1/fan_in), embeddings N(0, 1): measured relative logits error 0.14, greedy agreement 0.81."""
    ref = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.dim() == 2:
                std = 1.0 if "embed" in name else 1 / math.sqrt(p.shape[1])
                p.mul_(std / p.std())
    quant = quantize_nf4(copy.deepcopy(ref))
    want, got = prompt_logits(ref, ids), prompt_logits(quant, ids)
    rel = float((got - want).norm() / want.norm())
    agree = float((got.argmax(-1) == want.argmax(-1)).float().mean())
    assert 0.0 < rel < 0.3, rel
    assert agree >= 0.7, agree


def test_quantize_refuses_wrapped_and_unknown_modes(tiny_model_dir: Path) -> None:
    model = load_model(tiny_model_dir, dtype="fp32")
    apply_lora(model, num_slots=1, max_rank=4, backend="torch")
    with pytest.raises(QuantizationError, match="apply_lora"):
        quantize_nf4(model)
    with pytest.raises(QuantizationError, match="nf4"):
        load_model_quantized(tiny_model_dir, "int3")


def test_quantize_none_is_the_plain_loader(tiny_model_dir: Path, tiny_model: LlamaModel, ids: list[int]) -> None:
    model = load_model_quantized(tiny_model_dir, "none", "fp32")
    assert not any(is_nf4(m) for m in model.named_linears().values())
    torch.testing.assert_close(prompt_logits(model, ids), prompt_logits(tiny_model, ids), atol=0, rtol=0)


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real peft adapter (rank 8, all 7 projections, random A and B) saved from the fp32 transformers model."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    peft_model = get_peft_model(hf, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    out = tmp_path_factory.mktemp("qlora") / "adapter"
    peft_model.save_pretrained(str(out))
    return out


def test_lora_over_nf4_equals_peft_over_bitsandbytes(
    tiny_model_dir: Path, adapter_dir: Path, hf_nf4: Any, nf4_model: LlamaModel, ids: list[int]
) -> None:
    from peft import PeftModel

    model = load_model_quantized(tiny_model_dir, "nf4", "fp32")
    slots = apply_lora(model, num_slots=2, max_rank=8, backend="torch", dtype=model.dtype)
    assert all(is_nf4(layer.base) for layer in slots.layers.values())  # wraps the 4-bit base unchanged
    assert slots.layers["layers.0.self_attn.q_proj"].lora_A.dtype == torch.float32  # adapters in compute dtype
    store = AdapterStore(slots, BaseDims.from_model_config(model.config))
    store.register("a", adapter_dir)

    peft_model = PeftModel.from_pretrained(load_hf_nf4(tiny_model_dir), str(adapter_dir)).eval()
    with torch.no_grad():
        want = peft_model(torch.tensor([ids])).logits[0].float()
    slot = store.acquire(["a"])
    assert slot is not None
    blocks = -(-len(ids) // 4)
    batch = build_batch([SeqChunk(0, tuple(ids), 0, tuple(range(blocks)), slot, (1.0,))], 4)
    got = model.compute_logits(model(batch, PagedKVCache.for_model(model.config, blocks, 4)))
    store.release(["a"])
    torch.testing.assert_close(got, want, atol=LORA_OVER_NF4_TOL, rtol=0)
    assert (got - prompt_logits(nf4_model, ids)).abs().max() > 1e-2  # the adapter matters

    # the engine serves it: greedy tokens equal peft's by full recompute
    engine = Engine(EngineConfig(model_dir=tiny_model_dir, block_size=4, num_blocks=64), adapter_slots=store,
                    model=model)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    prompt = ids[:16]
    [res] = engine.generate([GenerationRequest(prompt, params, adapters=[("a", 1.0)])])
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            seq.append(int(peft_model(torch.tensor([seq])).logits[0, -1].argmax()))
    assert list(res.token_ids) == seq[len(prompt):]
    assert store.pinned() == {}


def test_engine_config_quantize_serves_an_nf4_base(tiny_model_dir: Path, nf4_model: LlamaModel, ids: list[int]) -> None:
    """`EngineConfig(quantize="nf4")` loads the base 4-bit itself and generates the nf4 runner's greedy tokens."""
    engine = Engine(EngineConfig(model_dir=tiny_model_dir, quantize="nf4"))
    assert all(is_nf4(m) for m in engine.model.named_linears().values())
    out = engine.generate([GenerationRequest(list(ids), SamplingParams(max_tokens=4))])[0]
    reference = Engine(EngineConfig(model_dir=tiny_model_dir), model=nf4_model)
    expected = reference.generate([GenerationRequest(list(ids), SamplingParams(max_tokens=4))])[0]
    assert out.token_ids == expected.token_ids
    with pytest.raises(ValueError, match="unknown quantize mode"):
        EngineConfig(model_dir=tiny_model_dir, quantize="int3")
