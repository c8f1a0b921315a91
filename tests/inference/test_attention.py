"""Paged attention: the torch reference against a float32 loop oracle, the Triton kernel against the reference
(TRITON_INTERPRET=1 without CUDA; tiny shapes), launcher checks, the backend factory, and the whole runner on
the Triton backend."""

from __future__ import annotations

import importlib
import itertools
import os
from pathlib import Path
from types import ModuleType

import pytest
import torch

from loraledger.inference.attention import TorchPagedAttention, TritonPagedAttention, get_attention_backend
from loraledger.inference.batch import SeqChunk, build_batch
from loraledger.inference.errors import BackendError, EngineError
from loraledger.inference.kv_cache import PagedKVCache
from loraledger.inference.loader import load_model
from loraledger.inference.model import LlamaModel
from loraledger.kernels.paged_attention_ref import paged_attention_loop, paged_attention_ref

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()


def make_case(
    seqs: list[tuple[int, int]], block_size: int, hq: int, hkv: int, d: int, dtype: torch.dtype = torch.float32,
    device: str = "cpu", seed: int = 0,
) -> dict[str, object]:
    """seqs: (context_len, q_len) per sequence (q_len == context_len: a fresh prefill; 1: a decode; in between:
    a prefill chunk over a cached prefix). Blocks are handed out shuffled, so tables are not contiguous."""
    gen = torch.Generator().manual_seed(seed)
    need = [-(-ctx // block_size) for ctx, _ in seqs]
    num_blocks = sum(need) + 3
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables, p = [], 0
    for n in need:
        tables.append(perm[p : p + n])
        p += n
    width = max(need) + 1  # a spare column: unused entries must be ignored
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    q_lens = [q for _, q in seqs]
    query_start = torch.tensor([0, *itertools.accumulate(q_lens)], dtype=torch.int32)
    context_lens = torch.tensor([c for c, _ in seqs], dtype=torch.int32)
    k_cache = torch.randn(num_blocks, block_size, hkv, d, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, hkv, d, generator=gen).to(dtype)
    q = torch.randn(sum(q_lens), hq, d, generator=gen).to(dtype)
    to = {"device": device}
    return {
        "q": q.to(**to), "k_cache": k_cache.to(**to), "v_cache": v_cache.to(**to),
        "block_tables": block_tables.to(**to), "query_start": query_start.to(**to),
        "context_lens": context_lens.to(**to), "max_query_len": max(q_lens),
        "max_context_len": max(c for c, _ in seqs), "scale": d**-0.5,
    }


def run_ref(case: dict[str, object]) -> torch.Tensor:
    return paged_attention_ref(**case)  # type: ignore[arg-type]


def run_loop(case: dict[str, object]) -> torch.Tensor:
    args = {k: v for k, v in case.items() if k not in ("max_query_len", "max_context_len")}
    return paged_attention_loop(**args)  # type: ignore[arg-type]


MIXED = [(9, 9), (13, 1), (21, 6), (1, 1), (17, 17), (6, 2)]  # prefills, decodes, chunks over a cached prefix


@pytest.mark.parametrize(
    ("block_size", "hq", "hkv", "d"), [(4, 4, 4, 16), (4, 4, 2, 16), (16, 8, 2, 32), (1, 2, 1, 8), (5, 6, 3, 16)]
)
def test_reference_matches_loop_oracle(block_size: int, hq: int, hkv: int, d: int) -> None:
    case = make_case(MIXED, block_size, hq, hkv, d)
    out = run_ref(case)
    assert out.shape == case["q"].shape  # type: ignore[union-attr]
    assert (out - run_loop(case)).abs().max() < 1e-5


@pytest.mark.parametrize(("block_size", "hq", "hkv"), [(4, 4, 2), (16, 9, 3), (1, 2, 1)])
def test_torch_backend_decode_step_equals_the_reference(block_size: int, hq: int, hkv: int) -> None:
    """The torch backend's decode-only path (one index_select per cache) gives the reference's values exactly."""
    from loraledger.inference.attention import _decode_attention
    from loraledger.kernels.paged_attention_ref import plan_paged_attention

    case = make_case([(13, 1), (1, 1), (40, 1), (7, 1)], block_size, hq, hkv, 16)
    q: torch.Tensor = case["q"]  # type: ignore[assignment]
    plan = plan_paged_attention(case["block_tables"], case["query_start"], case["context_lens"],  # type: ignore[arg-type]
                                q.shape[0], 1, case["max_context_len"], block_size)  # type: ignore[arg-type]
    assert plan.decode_only
    out = _decode_attention(q, case["k_cache"], case["v_cache"], plan, case["scale"])  # type: ignore[arg-type]
    assert torch.equal(out, run_ref(case))
    assert (out - run_loop(case)).abs().max() < 1e-5


def test_reference_sees_only_its_own_sequence_and_the_past() -> None:
    """Changing the keys of one sequence, or a key after a query's position, leaves the other outputs alone."""
    case = make_case([(8, 8), (8, 8)], 4, 2, 2, 16)
    base = run_ref(case)
    k_cache: torch.Tensor = case["k_cache"]  # type: ignore[assignment]
    tables: torch.Tensor = case["block_tables"]  # type: ignore[assignment]
    k_cache[int(tables[1, 1]), 3] += 5.0  # sequence 1, position 7 (its last)
    after = run_ref(case)
    assert torch.equal(after[:8], base[:8]), "sequence 0 saw sequence 1's keys"
    assert torch.equal(after[8:15], base[8:15]), "a query saw a key after its own position"
    assert not torch.allclose(after[15], base[15])


def test_reference_bf16_close_to_fp32() -> None:
    case = make_case(MIXED, 4, 4, 2, 16)
    lo = {k: (v.to(torch.bfloat16) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
          for k, v in case.items()}
    out = run_ref(lo)
    assert out.dtype == torch.bfloat16
    assert (out.float() - run_ref(case)).abs().max() < 0.05


def test_factory_picks_by_name_and_rejects_unknown() -> None:
    assert isinstance(get_attention_backend("torch"), TorchPagedAttention)
    assert get_attention_backend(None, "cpu").name == "torch"
    with pytest.raises(BackendError, match="unknown attention backend 'flash'.*torch, triton"):
        get_attention_backend("flash")
    with pytest.raises(EngineError):
        get_attention_backend("")


@pytest.fixture(scope="module")
def triton_kernels() -> ModuleType:
    """`loraledger.kernels.paged_attention`: compiled for CUDA, or interpreted on CPU (conftest sets TRITON_INTERPRET=1
    before triton is first imported)."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed (pip extra 'gpu' or 'dev')")
    if not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.fail("without CUDA the Triton tests need TRITON_INTERPRET=1 set before triton is imported")
    return importlib.import_module("loraledger.kernels.paged_attention")


TRITON_CASES = [
    # block_size, hq, hkv, d, sequences
    (4, 4, 2, 16, MIXED),
    (16, 4, 1, 32, [(20, 5), (3, 1), (33, 33), (16, 1)]),
    (4, 2, 2, 32, [(7, 1), (40, 1), (2, 1)]),  # decode only
]


@pytest.mark.parametrize(("block_size", "hq", "hkv", "d", "seqs"), TRITON_CASES)
def test_triton_matches_reference(
    triton_kernels: ModuleType, block_size: int, hq: int, hkv: int, d: int, seqs: list[tuple[int, int]]
) -> None:
    device = "cuda" if HAS_CUDA else "cpu"
    case = make_case(seqs, block_size, hq, hkv, d, device=device)
    got = triton_kernels.paged_attention(
        case["q"], case["k_cache"], case["v_cache"], case["block_tables"], case["query_start"],
        case["context_lens"], case["max_query_len"], case["scale"],
    )
    err = (got - run_ref(case)).abs().max().item()
    assert err < 1e-5, f"triton vs reference: max abs error {err}"


@pytest.mark.parametrize(("num_splits", "split_len"), [(2, 32), (3, 96), (8, 32), (5, 256)])
@pytest.mark.parametrize(("hq", "hkv"), [(4, 2), (8, 1), (3, 3)])
def test_split_kv_decode_matches_reference(
    triton_kernels: ModuleType, num_splits: int, split_len: int, hq: int, hkv: int
) -> None:
    """Split-KV decoding: contexts of 1 to 300 keys cut into spans (some empty, some partial) and merged give the
    reference's output; the unsplit kernel gives the same."""
    device = "cuda" if HAS_CUDA else "cpu"
    seqs = [(1, 1), (31, 1), (32, 1), (100, 1), (257, 1)]
    if num_splits * split_len < 257:
        seqs = [(c, q) for c, q in seqs if c <= num_splits * split_len]  # the spans must cover every context
    case = make_case(seqs, 16, hq, hkv, 32, device=device)
    args = [case[k] for k in ("q", "k_cache", "v_cache", "block_tables", "query_start", "context_lens",
                              "max_query_len", "scale")]
    got = triton_kernels.paged_attention(*args, num_splits=num_splits, split_len=split_len)
    ref = run_ref(case)
    assert (got - ref).abs().max().item() < 1e-5
    assert (triton_kernels.paged_attention(*args) - ref).abs().max().item() < 1e-5


def test_decode_splits_cover_the_context_and_keep_busy_batches_whole(triton_kernels: ModuleType) -> None:
    split = triton_kernels.decode_splits
    assert split(64, 8, 4096, 132) == (1, 0)  # 512 programs already fill 132 SMs
    assert split(1, 8, 200, 132) == (1, 0)  # short contexts: nothing to split
    for seqs, ctx in ((1, 4096), (2, 1000), (4, 300), (1, 200_000)):
        n, length = split(seqs, 8, ctx, 132)
        assert n > 1 and n * length >= ctx and length % 32 == 0 and n <= triton_kernels.MAX_SPLITS
    case = make_case([(40, 5)], 4, 2, 2, 16)
    args = [case[k] for k in ("q", "k_cache", "v_cache", "block_tables", "query_start", "context_lens",
                              "max_query_len", "scale")]
    with pytest.raises(ValueError, match="decode-only batches"):
        triton_kernels.paged_attention(*args, num_splits=2, split_len=32)


def test_triton_launcher_rejects_bad_inputs(triton_kernels: ModuleType) -> None:
    case = make_case([(5, 5)], 4, 2, 2, 16)
    launch = triton_kernels.paged_attention
    args = [case[k] for k in ("q", "k_cache", "v_cache", "block_tables", "query_start", "context_lens",
                              "max_query_len", "scale")]
    with pytest.raises(ValueError, match="dtypes must match"):
        launch(args[0].half(), *args[1:])
    with pytest.raises(ValueError, match="head_dim"):
        launch(args[0][..., :8].contiguous(), *args[1:])
    with pytest.raises(ValueError, match="int32 or int64"):
        launch(*args[:3], args[3].float(), *args[4:])
    with pytest.raises(ValueError, match=r"query_start must be \[B\+1\]"):
        launch(*args[:4], args[4][:1], *args[5:])


def test_runner_on_triton_backend_matches_torch_backend(
    triton_kernels: ModuleType, tiny_model_dir: Path, tiny_model: LlamaModel
) -> None:
    """The tiny model through prefill + a mixed step on the Triton backend gives the torch backend's hidden."""
    device = "cuda" if HAS_CUDA else "cpu"
    model = load_model(tiny_model_dir, device=device, attention=TritonPagedAttention())
    steps = [
        [SeqChunk(0, tuple(range(3, 12)), 0, (2, 0, 5)), SeqChunk(1, (7, 8, 9), 0, (1, 3))],
        [SeqChunk(1, (40,), 3, (1, 3)), SeqChunk(0, (41, 42), 9, (2, 0, 5))],
    ]
    caches = {m: PagedKVCache.for_model(m.config, 6, 4, device=m.device) for m in (model, tiny_model)}
    for chunks in steps:
        outs = [m(build_batch(chunks, 4, device=m.device), caches[m]).cpu() for m in (model, tiny_model)]
        assert (outs[0] - outs[1]).abs().max() < 1e-4


def test_runner_decodes_long_contexts_with_split_kv(
    triton_kernels: ModuleType, tiny_model_dir: Path, tiny_model: LlamaModel
) -> None:
    """A 300-token prompt then decode steps on the Triton backend told of 64 SMs (so one sequence's decode is
    cut into spans): the torch backend's hidden states, step after step."""
    device = "cuda" if HAS_CUDA else "cpu"
    model = load_model(tiny_model_dir, device=device, attention=TritonPagedAttention(num_sms=64))
    assert triton_kernels.decode_splits(1, model.config.num_kv_heads, 301, 64)[0] > 1
    table = tuple(range(20))
    prompt = tuple(int(t) for t in torch.randint(6, 500, (300,), generator=torch.Generator().manual_seed(5)))
    caches = {m: PagedKVCache.for_model(m.config, 20, 16, device=m.device) for m in (model, tiny_model)}
    steps = [[SeqChunk(0, prompt, 0, table)], [SeqChunk(0, (7,), 300, table)], [SeqChunk(0, (8,), 301, table)]]
    for chunks in steps:
        outs = [m(build_batch(chunks, 16, device=m.device), caches[m]).cpu() for m in (model, tiny_model)]
        assert (outs[0] - outs[1]).abs().max() < 1e-4


@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs a CUDA device and triton")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_half_precision_on_gpu(triton_kernels: ModuleType, dtype: torch.dtype) -> None:
    case = make_case([(100, 37), (513, 1), (64, 64), (257, 3)] * 3, 16, 32, 8, 128, dtype=dtype, device="cuda")
    got = triton_kernels.paged_attention(
        case["q"], case["k_cache"], case["v_cache"], case["block_tables"], case["query_start"],
        case["context_lens"], case["max_query_len"], case["scale"],
    )
    ref = run_ref({k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                   for k, v in case.items()})
    assert (got.float() - ref).abs().max() < 2e-2
