"""Fixed-shape decode steps with adapters: a batch mixing base requests, adapters of ranks 4/16/64 and a merged
request gives the plain step's tokens and logprobs, on the torch LoRA path (host-planned), on the BGMV kernels
driven by the static indices (Triton, interpreted on the CPU), and as CUDA graphs on a GPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from loraledger.inference.engine import Engine
from loraledger.inference.engine_config import EngineConfig
from loraledger.inference.loader import load_model
from loraledger.inference.lora.adapter import BaseDims
from loraledger.inference.lora.layers import apply_lora
from loraledger.inference.lora.store import AdapterStore
from loraledger.inference.requests import GenerationRequest, GenerationResult
from loraledger.inference.sequence import SamplingParams

HAS_CUDA = torch.cuda.is_available()
SPECS: dict[str, dict[str, Any]] = {
    "r4": {"r": 4, "alpha": 8, "seed": 11},
    "r16-attn": {"r": 16, "alpha": 16, "seed": 12, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]},
    "r64": {"r": 64, "alpha": 32, "seed": 13},
}
REQUESTS: list[tuple[tuple[str, float], ...]] = [
    (("r4", 1.0),), (), (("r64", 1.0),), (("r4", 0.3), ("r64", 0.7)), (("r16-attn", 1.0),), (), (("r4", 1.0),),
]


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path, make_adapter: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    root = tmp_path_factory.mktemp("graph-lora")
    return {k: make_adapter(hf, root / k, std=0.1, **kw) for k, kw in SPECS.items()}


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(6, 512, (3 + 4 * i,), generator=g).tolist() for i in range(len(REQUESTS))]


def run(model_dir: Path, adapters: dict[str, Path], backend: str, device: str, modes: tuple[str, ...],
        max_tokens: int = 6) -> dict[str, tuple[list[GenerationResult], Engine]]:
    """One model with LoRA slots; the REQUESTS batch through an engine per decode_graphs mode, the "off" one
    on the torch kernels and attention, the others on `backend`."""
    model = load_model(model_dir, dtype="fp32", device=device)
    slots = apply_lora(model, num_slots=4, max_rank=64, backend=backend)
    store = AdapterStore(slots, BaseDims.from_model_config(model.config))
    for k, d in adapters.items():
        store.register(k, d)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=0)
    out = {}
    for name in modes:
        # the plain steps run the torch twins of the kernels (the oracle); the others run on `backend`;
        # "<mode>-ahead": that mode's steps run ahead of the host (async_decode)
        mode, ahead = name.removesuffix("-ahead"), name.endswith("-ahead")
        kernels = "torch" if mode == "off" else backend
        slots.context.set_backend(kernels)
        attention = "triton" if kernels == "triton" else "torch"
        eng = Engine(EngineConfig(model_dir=model_dir, device=device, block_size=4, num_blocks=128, max_num_seqs=8,
                                  decode_graphs=mode, attention_backend=attention, async_decode=ahead),
                     adapter_slots=store, model=model)
        results = eng.generate([GenerationRequest(p, params, adapters=a) for p, a in zip(prompts(), REQUESTS,
                                                                                          strict=True)])
        assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
        out[name] = (results, eng)
    assert store.pinned() == {}
    return out


def assert_same(a: list[GenerationResult], b: list[GenerationResult], atol: float) -> None:
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        assert x.token_ids == y.token_ids, f"request {i} {REQUESTS[i]}"
        assert x.logprobs is not None and y.logprobs is not None
        torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=atol, rtol=0)


def test_static_steps_with_mixed_and_merged_adapters_equal_plain_steps(
    tiny_model_dir: Path, adapters: dict[str, Path]
) -> None:
    out = run(tiny_model_dir, adapters, "torch", "cpu", ("off", "static", "static-ahead"))
    (plain, _), (static, eng), (ahead, ahead_eng) = out["off"], out["static"], out["static-ahead"]
    assert_same(plain, static, atol=1e-5)
    assert_same(static, ahead, atol=0.0)  # the same steps, run ahead of the host: the very same answers
    assert eng.stats()["graph_steps"] > 0
    assert ahead_eng.stats()["steps_ahead"] > 0
    assert len({r.token_ids for r in plain}) > 3  # the adapters steer the requests apart


@pytest.mark.slow
def test_static_steps_on_bgmv_kernels_equal_plain_torch_steps(
    tiny_model_dir: Path, adapters: dict[str, Path]
) -> None:
    """The static indices (every column kept, rank grid over max_rank) drive the Triton BGMV kernels and the
    Triton attention kernel (interpreted on the CPU); the plain steps run the torch twins."""
    device = "cuda" if HAS_CUDA else "cpu"
    out = run(tiny_model_dir, adapters, "triton", device, ("off", "static"), max_tokens=3)
    (plain, _), (static, eng) = out["off"], out["static"]
    assert_same(plain, static, atol=1e-4)
    assert eng.stats()["graph_steps"] > 0


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs need a CUDA device")
def test_cuda_graphs_with_adapters_equal_plain_steps(tiny_model_dir: Path, adapters: dict[str, Path]) -> None:
    out = run(tiny_model_dir, adapters, "triton", "cuda", ("off", "graphs", "graphs-ahead"))
    (plain, _), (graphs, eng), (ahead, _) = out["off"], out["graphs"], out["graphs-ahead"]
    assert_same(plain, graphs, atol=1e-4)
    assert_same(graphs, ahead, atol=0.0)
    stats = eng.stats()
    assert stats["graph_steps"] > 0 and stats["graph_captures"] > 0


def test_steps_with_adapters_are_captured_only_on_the_triton_lora_backend(tiny_model_dir: Path) -> None:
    """The torch LoRA path plans from host values, so a graph may hold adapters only on the triton backend; the
    backend is read at each step (it can be switched), the layers' contexts are found once."""
    from loraledger.inference.graph_runner import DecodeGraphRunner
    from loraledger.inference.kv_cache import PagedKVCache

    model = load_model(tiny_model_dir, dtype="fp32")
    slots = apply_lora(model, num_slots=2, max_rank=8, backend="torch")
    runner = DecodeGraphRunner(model, PagedKVCache.for_model(model.config, 5, 4), scratch_block=4, max_batch=4,
                               max_model_len=16, mode="static")
    assert not runner._lora_capturable()
    slots.context.set_backend("triton")
    assert runner._lora_capturable()
    with pytest.raises(ValueError, match="unknown LoRA kernel backend"):
        slots.context.set_backend("cuda-magic")
    assert slots.context.backend == "triton"  # a refused switch changes nothing


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs need a CUDA device")
def test_warm_up_captures_base_and_one_adapter_graphs(tiny_model_dir: Path, adapters: dict[str, Path]) -> None:
    model = load_model(tiny_model_dir, dtype="fp32", device="cuda")
    slots = apply_lora(model, num_slots=4, max_rank=64, backend="triton")
    store = AdapterStore(slots, BaseDims.from_model_config(model.config))
    for k, d in adapters.items():
        store.register(k, d)
    eng = Engine(EngineConfig(model_dir=tiny_model_dir, device="cuda", block_size=4, num_blocks=128, max_num_seqs=8,
                              decode_graphs="graphs"), adapter_slots=store, model=model)
    assert eng.graphs is not None
    assert eng.warm_up_graphs() == 2 * len(eng.graphs.buckets)  # base-only and one-adapter steps
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    eng.generate([GenerationRequest(p, params, adapters=a) for p, a in zip(prompts(), REQUESTS, strict=True)])
    merged_buckets = eng.stats()["graph_captures"] - 2 * len(eng.graphs.buckets)
    assert 0 <= merged_buckets <= len(eng.graphs.buckets)  # only the merged request's steps (M = 2) were new
