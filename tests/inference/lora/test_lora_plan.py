"""A step's LoRA indices (`loraledger.inference.lora.plan`): columns and segments built from per-token slots or
from host runs, validated; and the torch path: how `LoRAIndices.plan` splits a step into "runs" / "bmm" /
"loop" buckets, and that every form adds exactly the LoRA of each token (against the float32 per-token loop
`add_lora_loop`) without reading padded rank columns or empty slots (they hold NaN here) and without touching
tokens that use no adapter."""

from __future__ import annotations

import pytest
import torch

from loraledger.inference.lora.backend import add_lora_torch
from loraledger.inference.lora.plan import (
    BMM_ROWS_PER_SLOT,
    RUN_MIN_ROWS,
    LoRAIndices,
    build_lora_indices,
    groups_from_slots,
)
from loraledger.kernels.lora_ref import add_lora_loop

IN_F, OUT_F, MAX_RANK = 24, 40, 16
SLOT_RANKS = [8, 8, 8, 8, 4, 0, 16, 8]  # slot 5 is empty (rank 0)


def make_weights(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """A [S, in, R], B [S, R, out]; columns past each slot's rank and the empty slot are NaN."""
    g = torch.Generator().manual_seed(seed)
    s = len(SLOT_RANKS)
    A = torch.full((s, IN_F, MAX_RANK), float("nan"))
    B = torch.full((s, MAX_RANK, OUT_F), float("nan"))
    for i, r in enumerate(SLOT_RANKS):
        A[i, :, :r] = torch.randn(IN_F, r, generator=g) / IN_F**0.5
        B[i, :r, :] = torch.randn(r, OUT_F, generator=g) / max(r, 1) ** 0.5
    return A, B, list(SLOT_RANKS)


def run_case(slots_rows: list[list[int]], scales_rows: list[list[float]] | None = None, decode_only: bool = True,
             seed: int = 0) -> tuple[LoRAIndices, torch.Tensor, torch.Tensor]:
    """Indices for per-token slots [T, M], and (got, expected) outputs of add_lora_torch vs the loop reference."""
    slots = torch.tensor(slots_rows, dtype=torch.int32)
    scales = torch.ones(slots.shape) if scales_rows is None else torch.tensor(scales_rows)
    A, B, ranks = make_weights(seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(slots.shape[0], IN_F, generator=g)
    out = torch.randn(slots.shape[0], OUT_F, generator=g)
    idx = build_lora_indices(slots, scales, len(SLOT_RANKS), decode_only)
    got = add_lora_torch(out.clone(), x, A, B, ranks, idx)
    expected = add_lora_loop(out, x, A, B, slots, scales, ranks)
    assert not torch.isnan(got).any(), "a padded rank column or an empty slot was read"
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5)
    untouched = ((slots < 0) | (torch.tensor(ranks)[slots.clamp(min=0).long()] == 0)).all(1)
    assert torch.equal(got[untouched], out[untouched])  # tokens with no (non-empty) adapter: bit-identical
    return idx, got, expected


def forms(idx: LoRAIndices, column: int = 0) -> list[str]:
    return [b.form for b in idx.plan(column, SLOT_RANKS)]


def test_indices_skip_unused_columns_and_validate() -> None:
    slots = torch.tensor([[2, -1], [2, -1], [-1, -1], [0, -1]], dtype=torch.int32)
    idx = build_lora_indices(slots, torch.ones(4, 2), num_slots=3, decode_only=False)
    assert len(idx.columns) == 1 and idx.active  # the all -1 column costs nothing
    col = idx.columns[0]
    assert col.seg_starts.tolist() == [0, 3] and col.seg_lens.tolist() == [2, 1] and col.max_seg_len == 2
    assert [(s, i.tolist()) for s, i in col.groups] == [(0, [3]), (2, [0, 1])]
    assert not build_lora_indices(torch.full((4, 1), -1, dtype=torch.int32), torch.ones(4, 1), 3, True).active
    assert not build_lora_indices(torch.zeros(4, 0, dtype=torch.int32), torch.zeros(4, 0), 3, True).active
    with pytest.raises(ValueError, match=r"\[-1, 3\)"):
        build_lora_indices(torch.tensor([[3]], dtype=torch.int32), torch.ones(1, 1), 3, True)
    assert groups_from_slots(torch.tensor([-1, -1], dtype=torch.int32)) == ()



def test_decode_over_distinct_slots_is_one_batched_gemm() -> None:
    idx, _, _ = run_case([[s] for s in (3, 0, 7, 1, 2, 3, 1, 0)])  # 8 decodes, 5 slots of rank 8
    (bucket,) = idx.plan(0, SLOT_RANKS)
    assert bucket.form == "bmm" and bucket.rows is not None and bucket.slot_of_row is not None
    assert bucket.rows.numel() <= BMM_ROWS_PER_SLOT * len(set(bucket.slot_of_row.tolist()))
    # rows are grouped by slot and each carries its own slot
    assert bucket.slot_of_row.tolist() == sorted(bucket.slot_of_row.tolist())
    assert [int(idx.columns[0].slots[t]) for t in bucket.rows.tolist()] == bucket.slot_of_row.tolist()
    assert bucket.scales is None  # every merge weight is 1: no scaling call


def test_many_decodes_on_few_slots_loop_over_slots() -> None:
    idx, _, _ = run_case([[s] for s in (0, 1) * 6])  # 12 decodes alternating over 2 slots: too many rows for bmm
    (bucket,) = idx.plan(0, SLOT_RANKS)
    assert bucket.form == "loop"
    assert [(slot, end - start) for slot, start, end in bucket.parts] == [(0, 6), (1, 6)]


def test_prefill_chunks_are_sliced_and_decodes_batched() -> None:
    # prompts of 6 and RUN_MIN_ROWS tokens (slots 1, 6), then decodes on slots 0, none, 2, 3, 7 (rank 8) and 4
    slots = [[1]] * 6 + [[6]] * RUN_MIN_ROWS + [[0], [-1], [2], [3], [7], [4]]
    idx, _, _ = run_case(slots, decode_only=False)
    plan = idx.plan(0, SLOT_RANKS)
    runs = sorted(p for b in plan if b.form == "runs" for p in b.parts)
    assert runs == [(1, 0, 6), (4, 15, 16), (6, 6, 10)]  # chunks (and a lone rank-4 decode): sliced in place
    assert all(b.rows is None for b in plan if b.form == "runs")
    (bmm,) = [b for b in plan if b.form == "bmm"]
    assert bmm.rank == 8 and bmm.rows is not None and bmm.slot_of_row is not None
    assert bmm.rows.tolist() == [10, 12, 13, 14] and bmm.slot_of_row.tolist() == [0, 2, 3, 7]


def test_two_lone_decodes_are_cheaper_as_runs() -> None:
    idx, _, _ = run_case([[0], [-1], [2]])
    (bucket,) = idx.plan(0, SLOT_RANKS)
    assert bucket.form == "runs" and bucket.parts == ((0, 0, 1), (2, 2, 3))


def test_one_slot_for_every_token_is_a_single_run() -> None:
    idx, _, _ = run_case([[2]] * 9)
    (bucket,) = idx.plan(0, SLOT_RANKS)
    assert bucket.form == "runs" and bucket.parts == ((2, 0, 9),) and bucket.rows is None


def test_merged_columns_with_weights_and_an_empty_slot() -> None:
    slots = [[0, 6], [0, 6], [3, -1], [5, 1], [-1, -1], [7, 4], [7, 4], [7, 4], [7, 4], [2, -1]]
    scales = [[0.3, 0.7], [0.3, 0.7], [1.0, 0.0], [0.5, 0.5], [0.0, 0.0], [0.25, 0.75], [0.25, 0.75],
              [0.25, 0.75], [0.25, 0.75], [1.0, 0.0]]
    idx, _, _ = run_case(slots, scales, decode_only=False)
    assert len(idx.columns) == 2
    for m in range(2):
        for bucket in idx.plan(m, SLOT_RANKS):
            assert bucket.scales is not None  # merge weights != 1 are applied
            used = [p[0] for p in bucket.parts] + (bucket.slot_of_row.tolist() if bucket.slot_of_row is not None else [])
            assert 5 not in used  # the empty slot is never planned


def test_plan_is_memoized_per_rank_signature() -> None:
    idx = build_lora_indices(torch.tensor([[0], [1], [0], [6]], dtype=torch.int32), torch.ones(4, 1), 8, True)
    first = idx.plan(0, SLOT_RANKS)
    assert idx.plan(0, list(SLOT_RANKS)) is first  # same ranks of the used slots: the same plan object
    other = list(SLOT_RANKS)
    other[6] = 0  # a projection that slot 6's adapter does not adapt
    plan = idx.plan(0, other)
    assert plan is not first and all(6 not in [p[0] for p in b.parts] for b in plan)
    assert all(b.slot_of_row is None or 6 not in b.slot_of_row.tolist() for b in plan)


@pytest.mark.parametrize("seed", range(12))
def test_random_steps_match_the_loop_reference(seed: int) -> None:
    """Random mixes of prefill chunks and decodes, merges, gaps and empty slots: every form, exact sums."""
    g = torch.Generator().manual_seed(100 + seed)
    rows: list[list[int]] = []
    scales: list[list[float]] = []
    merged = seed % 3 == 0
    while len(rows) < 5 + seed * 3:
        n = int(torch.randint(1, 9, (1,), generator=g)) if torch.rand(1, generator=g) < 0.4 else 1
        s0 = int(torch.randint(-1, len(SLOT_RANKS), (1,), generator=g))
        s1 = int(torch.randint(0, len(SLOT_RANKS), (1,), generator=g)) if merged and s0 >= 0 else -1
        if s1 == s0:
            s1 = -1
        w = [0.4, 0.6] if s1 >= 0 else [1.0 if s0 >= 0 else 0.0, 0.0]
        rows.extend([[s0, s1]] * n)
        scales.extend([w] * n)
    if not any(s >= 0 for row in rows for s in row):
        rows[0], scales[0] = [1, -1], [1.0, 0.0]
    run_case(rows, scales, decode_only=False, seed=seed)


@pytest.mark.parametrize("seed", range(6))
def test_indices_from_host_runs_equal_indices_from_tensors(seed: int) -> None:
    """`build_batch`'s host runs give the same indices (columns, segments, groups, plans) as the device scan."""
    from loraledger.inference.batch import SeqChunk, build_batch

    g = torch.Generator().manual_seed(seed)
    chunks = []
    for i in range(7):
        n = int(torch.randint(1, 6, (1,), generator=g))
        k = int(torch.randint(0, 3, (1,), generator=g))  # 0: no adapter, 1: one, 2: merged
        slots = tuple(int(s) for s in torch.randperm(len(SLOT_RANKS), generator=g)[:k])
        if i == 2 and chunks and chunks[-1].adapter_slots:  # the same slot as the previous sequence: one run
            slots = chunks[-1].adapter_slots
        weights = {0: (), 1: (1.0,), 2: (0.25, 0.75)}[len(slots)]
        chunks.append(SeqChunk(i, tuple(range(1, n + 1)), 0, (i,), slots, weights))
    batch = build_batch(chunks, block_size=8)
    assert batch.adapter_runs is not None
    fast = build_lora_indices(batch.token_adapter_slots, batch.token_adapter_scales, len(SLOT_RANKS), False,
                              runs=batch.adapter_runs)
    slow = build_lora_indices(batch.token_adapter_slots, batch.token_adapter_scales, len(SLOT_RANKS), False)
    assert len(fast.columns) == len(slow.columns)
    for m, (f, s) in enumerate(zip(fast.columns, slow.columns, strict=True)):
        for name in ("slots", "scales", "seg_starts", "seg_lens", "seg_slots"):
            assert torch.equal(getattr(f, name), getattr(s, name)), name
        assert f.max_seg_len == s.max_seg_len
        assert [(k, i.tolist()) for k, i in f.groups] == [(k, i.tolist()) for k, i in s.groups]
        assert [(b.form, b.parts) for b in fast.plan(m, SLOT_RANKS)] == [(b.form, b.parts) for b in slow.plan(m, SLOT_RANKS)]
    A, B, ranks = make_weights(seed)
    x = torch.randn(batch.num_tokens, IN_F, generator=g)
    out = torch.randn(batch.num_tokens, OUT_F, generator=g)
    torch.testing.assert_close(add_lora_torch(out.clone(), x, A, B, ranks, fast),
                               add_lora_loop(out, x, A, B, batch.token_adapter_slots, batch.token_adapter_scales,
                                             ranks), atol=2e-5, rtol=2e-5)


def test_host_runs_are_validated() -> None:
    slots, scales = torch.tensor([[0], [0]], dtype=torch.int32), torch.ones(2, 1)
    with pytest.raises(ValueError, match=r"outside \[0, 8\) slots or \[0, 2\) tokens"):
        build_lora_indices(slots, scales, 8, True, runs=(((0, 0, 3),),))
    with pytest.raises(ValueError, match="outside"):
        build_lora_indices(slots, scales, 8, True, runs=(((9, 0, 2),),))
    with pytest.raises(ValueError, match="columns"):
        build_lora_indices(slots, scales, 8, True, runs=())
