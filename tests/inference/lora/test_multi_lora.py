"""End to end: one flat batch mixing 6 adapters of ranks 4/8/16/64, two requests with no adapter and one merged
request; each request's logits (1e-4) and greedy tokens equal peft's run on that request alone (fp32, tiny)."""

from __future__ import annotations

import copy
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytest
import torch

from loraledger.inference.batch import SeqChunk, build_batch
from loraledger.inference.engine import Engine
from loraledger.inference.engine_config import EngineConfig
from loraledger.inference.kv_cache import PagedKVCache
from loraledger.inference.loader import load_model
from loraledger.inference.lora.adapter import BaseDims
from loraledger.inference.lora.layers import apply_lora
from loraledger.inference.lora.store import AdapterStore
from loraledger.inference.requests import GenerationRequest
from loraledger.inference.sequence import SamplingParams

TOL = 1e-4
NEW_TOKENS = 6
# key -> make_adapter kwargs: ranks 4/8/16/64, rslora, per-module rank/alpha patterns, partial targets
SPECS: dict[str, dict[str, Any]] = {
    "r4": {"r": 4, "alpha": 8, "seed": 1},
    "r8-rslora": {"r": 8, "alpha": 16, "seed": 2, "use_rslora": True},
    "r16-partial": {"r": 16, "alpha": 16, "seed": 3, "targets": ["q_proj", "v_proj", "down_proj"]},
    "r64": {"r": 64, "alpha": 32, "seed": 4},
    "r8-patterns": {"r": 8, "alpha": 8, "seed": 5, "rank_pattern": {"up_proj": 4}, "alpha_pattern": {"o_proj": 32}},
    "r4-mlp": {"r": 4, "alpha": 4, "seed": 6, "targets": ["gate_proj", "o_proj"]},
}
MERGE = (("r4", 0.3), ("r64", 0.7))
# request -> adapters; two without any, one merged; ids of prompts drawn below
REQUESTS: list[tuple[tuple[str, float], ...]] = [
    (("r4", 1.0),), (), (("r8-rslora", 1.0),), (("r16-partial", 1.0),), MERGE, (("r64", 1.0),), (),
    (("r8-patterns", 1.0),), (("r4-mlp", 1.0),),
]


@pytest.fixture(scope="module")
def hf(tiny_model_dir: Path) -> Any:
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def adapters(hf: Any, make_adapter: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("multi")
    return {k: make_adapter(hf, root / k, std=0.1, **kw) for k, kw in SPECS.items()}


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(6, 512, (3 + 2 * i,), generator=g).tolist() for i in range(len(REQUESTS))]


@pytest.fixture(scope="module")
def reference(hf: Any, adapters: dict[str, Path], prompts: list[list[int]]) -> list[tuple[torch.Tensor, list[int]]]:
    """peft on each request alone: (prompt logits [L, V], greedy NEW_TOKENS tokens by full recompute)."""
    from peft import PeftModel

    names = list(adapters)
    pm = PeftModel.from_pretrained(copy.deepcopy(hf), str(adapters[names[0]]), adapter_name=names[0]).eval()
    for k in names[1:]:
        pm.load_adapter(str(adapters[k]), adapter_name=k)
    pm.add_weighted_adapter([k for k, _ in MERGE], [w for _, w in MERGE], "merged", combination_type="cat")
    out = []
    for req, ids in zip(REQUESTS, prompts, strict=True):
        name = None if not req else ("merged" if len(req) > 1 else req[0][0])
        if name is not None:
            pm.set_adapter(name)
        seq, first = list(ids), None
        with torch.no_grad(), (pm.disable_adapter() if name is None else nullcontext()):
            for _ in range(NEW_TOKENS):
                logits = pm(torch.tensor([seq])).logits[0].float()
                first = logits[: len(ids)] if first is None else first
                seq.append(int(logits[-1].argmax()))
        out.append((first, seq[len(ids):]))
    return out


@pytest.fixture(scope="module")
def served(tiny_model_dir: Path, adapters: dict[str, Path]) -> tuple[Any, AdapterStore]:
    model = load_model(tiny_model_dir, dtype="fp32", device="cpu")
    slots = apply_lora(model, num_slots=8, max_rank=64, backend="torch")
    store = AdapterStore(slots, BaseDims.from_model_config(model.config))
    for k, d in adapters.items():
        store.register(k, d)
    return model, store


def test_mixed_batch_logits_match_peft(served: tuple[Any, AdapterStore], prompts: list[list[int]],
                                       reference: list[tuple[torch.Tensor, list[int]]]) -> None:
    model, store = served
    chunks, tables, nxt = [], [], 0
    for i, (req, ids) in enumerate(zip(REQUESTS, prompts, strict=True)):
        keys = [k for k, _ in req]
        got = store.acquire(keys) if keys else ()
        assert got is not None
        nblocks = -(-len(ids) // 4)
        tables.append(tuple(range(nxt, nxt + nblocks)))
        nxt += nblocks
        chunks.append(SeqChunk(i, tuple(ids), 0, tables[-1], tuple(got), tuple(w for _, w in req)))
    batch = build_batch(chunks, block_size=4)
    assert batch.token_adapter_slots.shape[1] == 2  # the merged request sets M = 2
    cache = PagedKVCache.for_model(model.config, nxt, 4)
    hidden = model(batch, cache)
    logits = model.compute_logits(hidden)
    for i, (ref_logits, _) in enumerate(reference):
        a, b = int(batch.query_start[i]), int(batch.query_start[i + 1])
        torch.testing.assert_close(logits[a:b], ref_logits, atol=TOL, rtol=0, msg=f"request {i} {REQUESTS[i]}")
    for req in REQUESTS:
        if req:
            store.release([k for k, _ in req])
    assert store.pinned() == {}
    # the adapters matter: adapted requests differ from the base model on the same prompt
    base_hidden = model(build_batch([SeqChunk(0, tuple(prompts[0]), 0, tables[0])], 4), cache)
    assert (model.compute_logits(base_hidden) - logits[: len(prompts[0])]).abs().max() > 1e-2


def test_engine_greedy_tokens_match_peft(served: tuple[Any, AdapterStore], tiny_model_dir: Path,
                                         prompts: list[list[int]],
                                         reference: list[tuple[torch.Tensor, list[int]]]) -> None:
    model, store = served
    engine = Engine(EngineConfig(model_dir=tiny_model_dir, dtype="float32", device="cpu", block_size=4,
                                 num_blocks=256), adapter_slots=store, model=model)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    results = engine.generate([GenerationRequest(ids, params, adapters=req)
                               for req, ids in zip(REQUESTS, prompts, strict=True)])
    for i, (res, (_, ref_tokens)) in enumerate(zip(results, reference, strict=True)):
        assert list(res.token_ids) == ref_tokens, f"request {i} {REQUESTS[i]}"
    assert store.pinned() == {}  # every finished request released its adapters
    distinct = {tuple(r.token_ids) for r in results}
    assert len(distinct) > 3  # different adapters steer generation differently
