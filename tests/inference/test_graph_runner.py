"""Fixed-shape decode steps (`loraledger.inference.graph_runner`): the padded "static" step equals the plain step on the CPU
(tokens and logprobs, odd batch sizes, staggered arrivals, cancel, preemption), padding rows write nothing but
the scratch block, bad configurations fail clearly, and on CUDA the captured graphs equal the plain step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loraledger.inference.batch import SeqChunk, build_batch
from loraledger.inference.engine import Engine
from loraledger.inference.engine_config import EngineConfig
from loraledger.inference.errors import EngineConfigError
from loraledger.inference.graph_runner import DecodeGraphRunner, bucket_sizes
from loraledger.inference.kv_cache import PagedKVCache
from loraledger.inference.loader import load_model
from loraledger.inference.model import LlamaModel
from loraledger.inference.requests import GenerationRequest, GenerationResult
from loraledger.inference.sequence import SamplingParams

HAS_CUDA = torch.cuda.is_available()
NEW = 8
# greedy, EOS ignored, the chosen token's logprob returned (to compare the logits, not only the argmax)
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True, logprobs=0)


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(6, 512, (2 + 5 * i,), generator=g).tolist() for i in range(n)]


def engine(model_dir: Path, model: LlamaModel, mode: str, **kw: object) -> Engine:
    cfg = {"block_size": 4, "max_num_seqs": 8, "max_tokens_per_step": 64, "num_blocks": 128, **kw}
    return Engine(EngineConfig(model_dir=model_dir, decode_graphs=mode, **cfg), model=model)  # type: ignore[arg-type]


def assert_same(a: list[GenerationResult], b: list[GenerationResult], atol: float = 1e-5) -> None:
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        assert x.token_ids == y.token_ids, f"request {i}"
        assert x.logprobs is not None and y.logprobs is not None
        torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=atol, rtol=0)


def assert_same_prefix(a: list[GenerationResult], b: list[GenerationResult], atol: float) -> None:
    """Tokens agree on average over 3/4 of each answer, and logprobs agree (atol) until the first difference."""
    agreed = []
    for x, y in zip(a, b, strict=True):
        n = next((i for i, (s, t) in enumerate(zip(x.token_ids, y.token_ids)) if s != t), len(x.token_ids))
        agreed.append(n / len(x.token_ids))
        assert x.logprobs is not None and y.logprobs is not None
        torch.testing.assert_close(torch.tensor(x.logprobs[:n]), torch.tensor(y.logprobs[:n]), atol=atol, rtol=0)
    assert sum(agreed) / len(agreed) >= 0.75, agreed


def assert_clean(eng: Engine) -> None:
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
    eng.block_manager.check_invariants()
    assert not eng.has_work()


def test_bucket_sizes() -> None:
    assert bucket_sizes(1) == (1,)
    assert bucket_sizes(3) == (1, 2, 3)
    assert bucket_sizes(8) == (1, 2, 4, 8)
    assert bucket_sizes(20) == (1, 2, 4, 8, 16, 20)
    assert bucket_sizes(32) == (1, 2, 4, 8, 16, 24, 32)
    with pytest.raises(ValueError, match="positive"):
        bucket_sizes(0)


@pytest.mark.parametrize("batch", [1, 3, 5, 8])
def test_static_step_equals_plain_step(tiny_model_dir: Path, tiny_model: LlamaModel, batch: int) -> None:
    """B prompts of different lengths run together: the same greedy tokens and logprobs (1e-5) whether the
    decodes run as padded fixed-shape steps (B padded up to its bucket) or as plain steps."""
    reqs = prompts(batch)
    plain = engine(tiny_model_dir, tiny_model, "off")
    static = engine(tiny_model_dir, tiny_model, "static")
    want = plain.generate(reqs, GREEDY)
    got = static.generate(reqs, GREEDY)
    assert_same(want, got)
    assert static.stats()["graph_steps"] >= NEW - 1  # every decode step took the fixed-shape path
    assert plain.stats()["graph_steps"] == 0
    assert static.kv_cache.num_blocks == static.block_manager.num_blocks + 1  # the scratch block
    assert_clean(plain)
    assert_clean(static)


def test_static_steps_with_staggered_arrivals_cancel_and_preemption(
    tiny_model_dir: Path, tiny_model: LlamaModel
) -> None:
    """Requests joining between steps, one cancelled midway, and a pool so small that sequences are preempted:
    every finished request equals its plain-step result run alone, and no block leaks."""
    reqs = prompts(6, seed=1)
    alone = [engine(tiny_model_dir, tiny_model, "off").generate([r], GREEDY)[0] for r in reqs]
    eng = engine(tiny_model_dir, tiny_model, "static", num_blocks=14, max_num_seqs=6)
    handles = [eng.submit(GenerationRequest(reqs[0], GREEDY))]
    cancelled = None
    steps = 0
    while eng.has_work() or len(handles) < len(reqs):
        if len(handles) < len(reqs) and steps % 2 == 1:
            handles.append(eng.submit(GenerationRequest(reqs[len(handles)], GREEDY)))
        if steps == 5:
            cancelled = handles[1]
            assert cancelled.cancel()
        eng.step()
        steps += 1
    assert eng.stats()["preemptions"] > 0, "the pool was meant to force preemption"
    assert eng.stats()["graph_steps"] > 0
    results = [h.result(timeout=0) for h in handles]
    for i, (res, ref) in enumerate(zip(results, alone, strict=True)):
        if handles[i] is cancelled:
            assert res.finish_reason == "cancelled"
            continue
        assert_same([ref], [res])
    assert_clean(eng)


def test_padding_rows_write_only_the_scratch_block(tiny_model_dir: Path) -> None:
    """A 3-sequence decode padded to bucket 4: the cache changes at the 3 real slots (and the scratch block),
    nowhere else, and the logits equal the plain step's."""
    model = load_model(tiny_model_dir, dtype="fp32", device="cpu")
    cfg = model.config
    bs, nblocks = 4, 12
    cache = PagedKVCache.for_model(cfg, nblocks + 1, bs)
    g = torch.Generator().manual_seed(3)
    for layer in range(cfg.num_layers):
        cache.key[layer].copy_(torch.randn(cache.key[layer].shape, generator=g))
        cache.value[layer].copy_(torch.randn(cache.value[layer].shape, generator=g))
    before = [k.clone() for k in cache.key] + [v.clone() for v in cache.value]
    runner = DecodeGraphRunner(model, cache, scratch_block=nblocks, max_batch=8, max_model_len=64, mode="static")
    chunks = [
        SeqChunk(0, (17,), 5, (0, 1)),  # writes block 1, offset 1
        SeqChunk(1, (42,), 0, (2,)),  # block 2, offset 0
        SeqChunk(2, (99,), 10, (5, 6, 7)),  # block 7, offset 2
    ]
    got = runner.run(chunks)
    assert got.shape == (3, cfg.vocab_size)
    changed = torch.zeros(nblocks + 1, bs, dtype=torch.bool)
    for old, new in zip(before, list(cache.key) + list(cache.value), strict=True):
        changed |= (old != new).any(-1).any(-1)
    assert sorted(map(tuple, changed[:nblocks].nonzero().tolist())) == [(1, 1), (2, 0), (7, 2)]
    assert changed[nblocks, 0]  # the padding row wrote its (discarded) k/v to the scratch block

    # the same step unpadded, on a copy of the cache as it was
    plain = PagedKVCache.for_model(cfg, nblocks + 1, bs)
    for layer in range(cfg.num_layers):
        plain.key[layer].copy_(before[layer])
        plain.value[layer].copy_(before[cfg.num_layers + layer])
    want = model.compute_logits(model(build_batch(chunks, bs), plain))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_runner_declines_steps_it_cannot_run(tiny_model_dir: Path, tiny_model: LlamaModel) -> None:
    eng = engine(tiny_model_dir, tiny_model, "static", max_num_seqs=4)
    runner = eng.graphs
    assert runner is not None
    assert eng.warm_up_graphs() == 0  # nothing to capture without CUDA graphs
    assert engine(tiny_model_dir, tiny_model, "off").warm_up_graphs() == 0
    one = SeqChunk(0, (5,), 3, (0,))
    assert runner.fits([one])
    assert not runner.fits([SeqChunk(0, (5, 6), 3, (0, 1))])  # a prefill chunk
    assert not runner.fits([one] * 5)  # over the largest bucket
    assert not runner.fits([SeqChunk(0, (5,), 3, (0,), tuple(range(5)), (0.2,) * 5)])  # 5 merged adapters
    assert runner.fits([SeqChunk(0, (5,), 3, (0,), (1, 2), (0.5, 0.5))])
    with pytest.raises(ValueError, match="largest bucket"):
        runner.bucket(5)


def test_bad_graph_configs_fail_clearly(tiny_model_dir: Path) -> None:
    with pytest.raises(EngineConfigError, match="decode_graphs must be one of"):
        EngineConfig(model_dir=tiny_model_dir, decode_graphs="sometimes")
    with pytest.raises(EngineConfigError, match="needs a CUDA device"):
        EngineConfig(model_dir=tiny_model_dir, device="cpu", decode_graphs="graphs")
    with pytest.raises(EngineConfigError, match="not supported over a nf4 base"):
        EngineConfig(model_dir=tiny_model_dir, device="cuda", quantize="nf4", decode_graphs="graphs")
    assert EngineConfig(model_dir=tiny_model_dir, device="cpu").graph_mode == "off"
    assert EngineConfig(model_dir=tiny_model_dir, device="cuda").graph_mode == "graphs"
    assert EngineConfig(model_dir=tiny_model_dir, device="cuda", quantize="nf4").graph_mode == "off"


@pytest.mark.slow
def test_static_step_on_triton_kernels_equals_plain_torch_step(tiny_model_dir: Path) -> None:
    """The Triton kernels in a fixed-shape step (what a graph replays on CUDA): attention and the fused layer ops
    (interpreted on the CPU) over the padded static buffers give the plain torch step's tokens and logprobs."""
    device = "cuda" if HAS_CUDA else "cpu"
    model = load_model(tiny_model_dir, dtype="fp32", device=device)
    reqs = prompts(3, seed=2)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, logprobs=0)
    model.set_layer_ops("torch")
    want = engine(tiny_model_dir, model, "off", attention_backend="torch", device=device).generate(reqs, params)
    model.set_layer_ops("triton")  # the fused norm / rope + cache write / gating kernels as well
    tri = engine(tiny_model_dir, model, "static", attention_backend="triton", device=device)
    got = tri.generate(reqs, params)
    assert tri.stats()["graph_steps"] >= 3
    assert_same(want, got, atol=1e-4)


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("dtype,atol", [("float32", 1e-4), ("bfloat16", 0.1)])
def test_cuda_graphs_equal_plain_steps(tiny_model_dir: Path, dtype: str, atol: float) -> None:
    """Captured and replayed decode steps give the plain steps' greedy tokens (fp32; bf16 within rounding of
    the logprobs), over several buckets, and reuse their graphs."""
    model = load_model(tiny_model_dir, dtype=dtype, device="cuda")
    for batch in (1, 3, 8):
        reqs = prompts(batch)
        want = engine(tiny_model_dir, model, "off", device="cuda", dtype=dtype).generate(reqs, GREEDY)
        eng = engine(tiny_model_dir, model, "graphs", device="cuda", dtype=dtype)
        got = eng.generate(reqs, GREEDY)
        captured = eng.stats()["graph_captures"]
        got_again = eng.generate(reqs, GREEDY)
        if dtype == "float32":
            assert_same(want, got, atol=atol)
        else:  # bf16: GEMMs over P padded rows may round differently; compare up to a first flipped argmax
            assert_same_prefix(want, got, atol=atol)
        assert_same(got, got_again, atol=0.0)  # replays are deterministic
        stats = eng.stats()
        assert stats["graph_steps"] >= 2 * (NEW - 1)
        assert eng.graphs is not None and 1 <= captured <= len(eng.graphs.buckets)
        assert stats["graph_captures"] == captured  # the second run replayed the graphs of the first
        assert_clean(eng)
    warm = engine(tiny_model_dir, model, "graphs", device="cuda", dtype=dtype)
    assert warm.graphs is not None
    assert warm.warm_up_graphs() == len(warm.graphs.buckets)  # base-only graphs: the model has no LoRA layers
    plain = engine(tiny_model_dir, model, "off", device="cuda", dtype=dtype)
    assert_same_prefix(plain.generate(prompts(8), GREEDY), warm.generate(prompts(8), GREEDY), atol)
    assert warm.stats()["graph_captures"] == len(warm.graphs.buckets)  # serving captured nothing more
