"""BGMV/SGMV Triton kernels and their torch twins (`loraledger.kernels.lora_ref`) against its float32 loop
oracle `add_lora_loop`.

Without CUDA the Triton kernels run in the interpreter (TRITON_INTERPRET=1, set below before triton is
imported); shapes are tiny so the whole file stays in seconds.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from loraledger.inference.lora.backend import add_lora_torch, get_add_lora
from loraledger.inference.lora.plan import build_lora_indices, segments_from_slots
from loraledger.kernels import bgmv, sgmv
from loraledger.kernels.lora_ref import add_lora_loop, expand_ref, shrink_ref, slots_from_segments

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# ranks 1..128 sampled: odd, power of two, one past a tile edge, the maximum; 0 = an empty slot
SLOT_RANKS = [1, 8, 17, 64, 128, 0, 4, 33]
IN_F, OUT_F, MAX_RANK = 40, 72, 128
# per-dtype tolerances (atol, rtol) against the float32 loop reference; outputs are O(1)
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-2, 2e-2), torch.bfloat16: (8e-2, 5e-2)}
NAN_PAD = True  # padded rank columns and unused slots hold NaN: any read of them would poison the output


def make_weights(dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A [S, in, R], B [S, R, out] with per-slot ranks; padding and empty slots filled with NaN."""
    g = torch.Generator().manual_seed(seed)
    s = len(SLOT_RANKS)
    A = torch.full((s, IN_F, MAX_RANK), float("nan"))
    B = torch.full((s, MAX_RANK, OUT_F), float("nan"))
    for i, r in enumerate(SLOT_RANKS):
        A[i, :, :r] = torch.randn(IN_F, r, generator=g) / IN_F**0.5
        B[i, :r, :] = torch.randn(r, OUT_F, generator=g) / max(r, 1) ** 0.5
    ranks = torch.tensor(SLOT_RANKS, dtype=torch.int32)
    return A.to(dtype).to(DEVICE), B.to(dtype).to(DEVICE), ranks.to(DEVICE)


def make_slots(spread: str, t: int, seed: int = 0) -> torch.Tensor:
    """Per-token slots [T] int32 in sequence runs, as the scheduler lays them out; -1 = no adapter.

    distinct: every run its own slot; uniform: slots drawn uniformly; zipf: popularity 1/k^1.5;
    skewed: 80% one slot. The second run and about one run in six have no adapter in every spread.
    """
    g = torch.Generator().manual_seed(seed)
    used = [i for i, r in enumerate(SLOT_RANKS) if r > 0] + [5]  # slot 5 (rank 0, empty) is also referenced
    slots: list[int] = []
    run = 0
    while len(slots) < t:
        n = int(torch.randint(1, 6, (1,), generator=g))
        if run == 1 or torch.rand(1, generator=g) < 1 / 6:
            s = -1
        elif spread == "distinct":
            s = used[run % len(used)]
        elif spread == "uniform":
            s = used[int(torch.randint(len(used), (1,), generator=g))]
        elif spread == "zipf":
            w = torch.tensor([1 / (k + 1) ** 1.5 for k in range(len(used))])
            s = used[int(torch.multinomial(w, 1, generator=g))]
        elif spread == "skewed":
            s = used[0] if torch.rand(1, generator=g) < 0.8 else used[int(torch.randint(len(used), (1,), generator=g))]
        else:
            raise ValueError(spread)
        slots.extend([s] * n)
        run += 1
    return torch.tensor(slots[:t], dtype=torch.int32, device=DEVICE)


def _inputs(dtype: torch.dtype, t: int, spread: str, seed: int):
    g = torch.Generator().manual_seed(seed + 1)
    A, B, ranks = make_weights(dtype, seed)
    x = torch.randn(t, IN_F, generator=g).to(dtype).to(DEVICE)
    out = torch.randn(t, OUT_F, generator=g).to(dtype).to(DEVICE)
    scales = (torch.rand(t, generator=g) + 0.5).to(DEVICE)
    slots = make_slots(spread, t, seed)
    return x, out, A, B, ranks, slots, scales


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("spread", ["distinct", "uniform", "zipf", "skewed"])
@pytest.mark.parametrize("t", [7, 33])
@pytest.mark.parametrize("kernel", ["bgmv", "sgmv", "torch"])
def test_kernels_match_loop_reference(kernel: str, t: int, spread: str, dtype: torch.dtype) -> None:
    x, out, A, B, ranks, slots, scales = _inputs(dtype, t, spread, seed=t)
    expected = add_lora_loop(out, x, A, B, slots, scales, ranks)
    got = out.clone()
    if kernel == "bgmv":
        y = bgmv.bgmv_shrink(x, A, slots, ranks, max_rank=MAX_RANK)
        bgmv.bgmv_expand(got, y, B, slots, scales, ranks, max_rank=MAX_RANK)
    elif kernel == "sgmv":
        st, ln, ss = segments_from_slots(slots)
        y = sgmv.sgmv_shrink(x, A, st, ln, ss, ranks, int(ln.max()), max_rank=MAX_RANK)
        sgmv.sgmv_expand(got, y, B, st, ln, ss, scales, ranks, int(ln.max()), max_rank=MAX_RANK)
    else:
        y = shrink_ref(x, A, slots, ranks)
        expand_ref(got, y, B, slots, scales, ranks)
    atol, rtol = TOL[dtype]
    assert not torch.isnan(got).any(), "a padded rank column or an unused slot was read"
    torch.testing.assert_close(got.float().cpu(), expected, atol=atol, rtol=rtol)
    # tokens with no adapter (or an empty slot) are left bit-identical
    untouched = (slots < 0) | (ranks[slots.clamp(min=0).long()] == 0)
    assert torch.equal(got[untouched], out[untouched])
    assert untouched.any() and not untouched.all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shrink_outputs_agree(dtype: torch.dtype) -> None:
    """Shrink alone: bgmv, sgmv and the torch twin give the same y, zero past each rank and on -1 tokens."""
    x, _, A, _, ranks, slots, _ = _inputs(dtype, 33, "uniform", seed=3)
    ref = shrink_ref(x, A, slots, ranks)
    st, ln, ss = segments_from_slots(slots)
    atol, rtol = TOL[dtype]
    for y in (bgmv.bgmv_shrink(x, A, slots, ranks), sgmv.sgmv_shrink(x, A, st, ln, ss, ranks, int(ln.max()))):
        torch.testing.assert_close(y, ref, atol=atol, rtol=rtol)
        for t in range(33):
            s = int(slots[t])
            r = int(ranks[s]) if s >= 0 else 0
            assert torch.all(y[t, r:] == 0)


def test_sgmv_empty_segments_and_unused_slots() -> None:
    """Zero-length segments and an empty segment list do nothing; slots never referenced are never read."""
    x, out, A, B, ranks, _, scales = _inputs(torch.float32, 9, "uniform", seed=5)
    st = torch.tensor([0, 2, 2, 7], dtype=torch.int32, device=DEVICE)
    ln = torch.tensor([2, 0, 5, 2], dtype=torch.int32, device=DEVICE)  # the second segment is empty
    ss = torch.tensor([1, 3, 0, 6], dtype=torch.int32, device=DEVICE)
    slots = slots_from_segments(9, st, ln, ss)
    assert slots.tolist() == [1, 1, 0, 0, 0, 0, 0, 6, 6]
    got = out.clone()
    y = sgmv.sgmv_shrink(x, A, st, ln, ss, ranks, 5)
    sgmv.sgmv_expand(got, y, B, st, ln, ss, scales, ranks, 5)
    expected = add_lora_loop(out, x, A, B, slots, scales, ranks)
    torch.testing.assert_close(got.cpu(), expected, atol=2e-5, rtol=2e-5)
    none = torch.zeros(0, dtype=torch.int32, device=DEVICE)
    got2 = out.clone()
    y = sgmv.sgmv_shrink(x, A, none, none, none, ranks, 0)
    sgmv.sgmv_expand(got2, y, B, none, none, none, scales, ranks, 0)
    assert torch.equal(got2, out) and torch.equal(y, torch.zeros_like(y))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("decode_only", [True, False])
def test_add_lora_with_merges(backend: str, decode_only: bool) -> None:
    """Two merge columns (a merged request) through the dispatch = sum of both loop references."""
    x, out, A, B, ranks, slots0, scales0 = _inputs(torch.float32, 33, "zipf", seed=7)
    slots1 = make_slots("uniform", 33, seed=8)
    slots1[slots0 < 0] = -1  # tokens without an adapter have none in any column
    scales1 = torch.rand(33, device=DEVICE)
    idx = build_lora_indices(
        torch.stack([slots0, slots1], 1), torch.stack([scales0, scales1], 1), len(SLOT_RANKS), decode_only
    )
    got = out.clone()
    get_add_lora(backend)(got, x, A, B, ranks.tolist(), idx, ranks)
    expected = add_lora_loop(out, x, A, B, slots0, scales0, ranks)
    expected = add_lora_loop(expected, x, A, B, slots1, scales1, ranks)
    torch.testing.assert_close(got.cpu(), expected, atol=3e-5, rtol=3e-5)


def test_torch_path_does_no_work_without_adapters() -> None:
    """With no used slot the CPU path never touches the weights (NaN weights would show up)."""
    x, out, A, B, ranks, _, _ = _inputs(torch.float32, 7, "uniform", seed=9)
    A.fill_(float("nan"))
    idx = build_lora_indices(torch.full((7, 1), -1, dtype=torch.int32), torch.ones(7, 1), len(SLOT_RANKS), True)
    got = add_lora_torch(out.clone(), x, A, B, ranks.tolist(), idx)
    assert torch.equal(got, out)


def test_launchers_reject_bad_inputs() -> None:
    x, out, A, B, ranks, slots, scales = _inputs(torch.float32, 7, "uniform", seed=11)
    with pytest.raises(ValueError, match="dtype"):
        bgmv.bgmv_shrink(x.half(), A, slots, ranks)
    with pytest.raises(ValueError, match="int32"):
        bgmv.bgmv_shrink(x, A, slots.long(), ranks)
    with pytest.raises(ValueError, match="in-features"):
        bgmv.bgmv_shrink(x[:, :-1], A, slots, ranks)
    y = bgmv.bgmv_shrink(x, A, slots, ranks)
    with pytest.raises(ValueError, match="float32"):
        bgmv.bgmv_expand(out, y.half(), B, slots, scales, ranks)
    with pytest.raises(ValueError, match="out-features"):
        bgmv.bgmv_expand(out[:, :-1], y, B, slots, scales, ranks)
    with pytest.raises(ValueError, match="unknown LoRA kernel backend"):
        get_add_lora("cuda-magic")


def test_lora_linear_through_triton_matches_torch() -> None:
    """`LoRALinear` with the Triton backend equals the torch path on a prefill step and on a decode step."""
    from torch import nn

    from loraledger.inference.batch import SeqChunk, build_batch
    from loraledger.inference.lora.layers import LoRAContext, LoRALinear

    g = torch.Generator().manual_seed(0)
    base = nn.Linear(24, 40).to(DEVICE)
    ref, tri = (LoRALinear(base, LoRAContext(4, 16, b)) for b in ("torch", "triton"))
    for layer in (ref, tri):
        torch.manual_seed(1)
        layer.set_slot(0, torch.randn(24, 4) / 5, torch.randn(4, 40) / 2, 0.5)  # outputs O(1): fp32 rounding
        layer.set_slot(2, torch.randn(24, 16) / 5, torch.randn(16, 40) / 4, 2.0)  # stays far below 1e-5
    steps = (
        [SeqChunk(0, (1, 2, 3), 0, (0,), (2,), (1.0,)), SeqChunk(1, (4, 5), 0, (1,), (0, 2), (0.5, 0.5))],
        [SeqChunk(0, (1,), 3, (0,), (2,), (1.0,)), SeqChunk(1, (4,), 2, (1,), (), ())],
    )
    for chunks in steps:
        batch = build_batch(chunks, block_size=4, device=DEVICE)
        x = torch.randn(batch.num_tokens, 24, generator=g).to(DEVICE)
        torch.testing.assert_close(tri(x, batch), ref(x, batch), atol=1e-5, rtol=1e-5)
