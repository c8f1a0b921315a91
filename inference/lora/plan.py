"""A step's adapter assignment as the LoRA layers use it: indices for the kernels, built once per step, and
the torch path's plan of the work.

Every token t carries M merge columns (`BatchMetadata.token_adapter_slots/scales` [T, M]; M > 1 for a request
merging adapters): slot `slots[t, m]` (-1 = none) with merge weight `scales[t, m]`, so that the LoRA layers
compute `out[t] += sum_m scales[t, m] * (x[t] @ A[s] @ B[s])` (semantics: `loraledger.kernels.lora_ref`).
`build_lora_indices` turns them into one `AdapterColumn` per used column, in both encodings of the slots:

    BGMV  per token: slots [T] int32, scales [T] float32 (decode-only steps)
    SGMV  segments of consecutive tokens sharing a slot: seg_starts, seg_lens, seg_slots [G] int32
          (prefill and mixed steps: one small GEMM per segment), slot -1 runs dropped

"No adapter costs no LoRA work": columns and segments whose slot is -1 are dropped, so a batch without
adapters launches nothing and an un-adapted token in a mixed batch is never gathered. `static_lora_indices`
is the exception: a CUDA-graph step keeps every column (BGMV skips -1 tokens on the device).

The torch path (the CPU path) is bound by the number of small torch calls, not by bytes: looping over the
slots of a decode step costs ~6 calls per slot and projection, i.e. thousands per step. So, once per step and
per rank signature (the ranks of the used slots, shared by the projections of one adapter set),
`LoRAIndices.plan` splits each merge column into `LoRABucket`s that take a few calls whatever the number of
adapters (see RUN_MIN_ROWS below for the cost model):

    runs  prefill chunks (long runs of one slot): x[start:end] @ A @ B added into out[start:end]; no gather
    bmm   decodes over many slots: gather each row's A and B, two batched GEMMs, one scatter; no slot loop
    loop  many rows on few slots: rows sorted by slot, two GEMMs per slot into one buffer, one scatter

`loraledger.inference.lora.backend` runs the buckets (torch) or the kernels over the columns (triton).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from loraledger.kernels import to_device


@dataclass(frozen=True)
class AdapterColumn:
    """Indices of one merge column m of a step (both encodings, built once, shared by every LoRA layer)."""

    slots: torch.Tensor  # [T] int32, -1 = none
    scales: torch.Tensor  # [T] float32
    seg_starts: torch.Tensor  # [G] int32: first token of each segment (slot -1 runs dropped)
    seg_lens: torch.Tensor  # [G] int32
    seg_slots: torch.Tensor  # [G] int32, all >= 0
    max_seg_len: int
    groups: tuple[tuple[int, torch.Tensor], ...]  # (slot, token indices [n] int64) per used slot, slot-sorted


# How the torch path runs the tokens of one rank, counted in torch calls (each ~5 us on a CPU at decode sizes,
# more than the arithmetic of a rank-16 LoRA on a few rows):
#   runs   a run of >= RUN_MIN_ROWS consecutive tokens on one slot: 3 calls (GEMM, scale, GEMM-accumulate into
#          the run's rows of out), no gather nor scatter; every prefill chunk is one such run
#   bmm    the other tokens (decodes: runs of 1), when at most BMM_ROWS_PER_SLOT per distinct slot: gather each
#          row's A and B, two batched GEMMs over rows: ~7 calls whatever the number d of slots, and at most
#          BMM_ROWS_PER_SLOT times the bytes of the d adapters moved
#   loop   else: rows sorted by slot, two GEMMs per slot into one buffer, one scatter: 2 * d + 4 calls
RUN_MIN_ROWS = 4
BMM_ROWS_PER_SLOT = 2


@dataclass(frozen=True)
class LoRABucket:
    """Tokens of one merge column whose slots share one rank `r`, and how the torch path runs them.

        form         "runs" | "bmm" | "loop" (see RUN_MIN_ROWS above)
        parts        ((slot, start, end), ...): runs: token rows [start, end) of x and out use `slot`;
                     loop: rows [start, end) of the gathered, slot-sorted `rows` use `slot`; bmm: ()
        rows         [n] int64 gathered token rows (bmm, loop); None for runs
        scales       [n, 1] float32 merge weight per gathered row (bmm, loop); [T, 1] of every token for runs;
                     None when every weight is 1 (single-adapter requests: no scaling call)
        slot_of_row  [n] int64 slot of each gathered row (bmm only)
    """

    rank: int
    form: str
    parts: tuple[tuple[int, int, int], ...]
    rows: torch.Tensor | None
    scales: torch.Tensor | None
    slot_of_row: torch.Tensor | None = None


@dataclass(frozen=True)
class LoRAIndices:
    """Everything the LoRA layers need about a step's adapter assignment; `columns` is empty if none is used."""

    num_tokens: int
    columns: tuple[AdapterColumn, ...]
    decode_only: bool
    static: bool = False  # built by `static_lora_indices`: tensors only, for the BGMV kernels (CUDA graphs)
    _plans: dict[tuple[int, tuple[int, ...]], tuple[LoRABucket, ...]] = field(
        default_factory=dict, compare=False, repr=False
    )
    _runs: dict[int, tuple[tuple[int, int, int], ...]] = field(default_factory=dict, compare=False, repr=False)
    _unit: dict[int, bool] = field(default_factory=dict, compare=False, repr=False)

    @property
    def active(self) -> bool:
        return bool(self.columns)

    def plan(self, column: int, ranks_host: list[int]) -> tuple[LoRABucket, ...]:
        """The buckets of merge column `column` for a projection whose slots have ranks `ranks_host` [S].

        Memoized by the ranks of the column's used slots: the 7 projections x L layers of a model usually
        share one signature, so the index tensors are built once per step, not once per projection.
        """
        col = self.columns[column]
        key = (column, tuple(ranks_host[slot] for slot, _ in col.groups))
        buckets = self._plans.get(key)
        if buckets is None:
            runs = self._runs.get(column)
            if runs is None:  # host copy of the runs (given by build_batch, else read back once per step)
                runs = _runs_from_segments(col)
                self._runs[column] = runs
            unit = self._unit.get(column)
            if unit is None:
                unit = bool(((col.slots < 0) | (col.scales == 1.0)).all())
                self._unit[column] = unit
            rank_of = {slot: r for (slot, _), r in zip(col.groups, key[1], strict=True)}
            buckets = _plan_column(runs, rank_of, None if unit else col.scales[:, None], col.slots.device)
            self._plans[key] = buckets
        return buckets


def _plan_column(
    runs: tuple[tuple[int, int, int], ...],
    rank_of: dict[int, int],
    scales: torch.Tensor | None,
    device: torch.device,
) -> tuple[LoRABucket, ...]:
    """Buckets for one column: its runs (slot, start, end) grouped by rank (rank 0: skipped), each rank's long
    runs as a "runs" bucket and its other tokens as one "bmm" or "loop" bucket. scales: [T, 1] or None (all 1)."""
    by_rank: dict[int, list[tuple[int, int, int]]] = {}
    for run in runs:
        r = rank_of[run[0]]
        if r > 0:  # an empty slot (or a projection this adapter does not adapt) costs nothing
            by_rank.setdefault(r, []).append(run)
    buckets = []
    for r, rank_runs in by_rank.items():
        long = tuple(run for run in rank_runs if run[2] - run[1] >= RUN_MIN_ROWS)
        if long:
            buckets.append(LoRABucket(r, "runs", long, None, scales))
        short = tuple(run for run in rank_runs if run[2] - run[1] < RUN_MIN_ROWS)
        by_slot: dict[int, list[int]] = {}
        for slot, start, end in short:
            by_slot.setdefault(slot, []).extend(range(start, end))
        if not by_slot:
            continue
        order = sorted(by_slot)
        rows_host = [t for slot in order for t in by_slot[slot]]
        bmm = len(order) > 1 and len(rows_host) <= BMM_ROWS_PER_SLOT * len(order)
        if 3 * len(short) <= (7 if bmm else 2 * len(order) + 4):  # few short runs: cheaper sliced as runs too
            buckets.append(LoRABucket(r, "runs", short, None, scales))
            continue
        rows = to_device(rows_host, torch.int64, device)
        row_scales = scales.index_select(0, rows) if scales is not None else None  # [n, 1]
        if bmm:
            slot_of_row = to_device([slot for slot in order for _ in by_slot[slot]], torch.int64, rows.device)
            buckets.append(LoRABucket(r, "bmm", (), rows, row_scales, slot_of_row))
            continue
        parts, start = [], 0
        for slot in order:
            parts.append((slot, start, start + len(by_slot[slot])))
            start += len(by_slot[slot])
        buckets.append(LoRABucket(r, "loop", tuple(parts), rows, row_scales))
    return tuple(buckets)


def segments_from_slots(slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Runs of equal consecutive slots, -1 runs dropped.

    slots: [T] int -> (seg_starts [G] int32, seg_lens [G] int32, seg_slots [G] int32), e.g.
    [3, 3, -1, 0, 0, 0, 3] -> starts [0, 3, 6], lens [2, 3, 1], slots [3, 0, 3].
    Inverse: `loraledger.kernels.lora_ref.slots_from_segments`.
    """
    t = int(slots.shape[0])
    if t == 0:
        empty = torch.zeros(0, dtype=torch.int32, device=slots.device)
        return empty, empty.clone(), empty.clone()
    change = torch.ones(t, dtype=torch.bool, device=slots.device)
    change[1:] = slots[1:] != slots[:-1]
    starts = torch.nonzero(change).flatten()  # [G0] int64
    ends = torch.cat([starts[1:], torch.tensor([t], device=slots.device)])
    seg_slots = slots[starts]
    keep = seg_slots >= 0
    return (
        starts[keep].to(torch.int32),
        (ends - starts)[keep].to(torch.int32),
        seg_slots[keep].to(torch.int32),
    )


def groups_from_slots(slots: torch.Tensor) -> tuple[tuple[int, torch.Tensor], ...]:
    """Token indices of each used slot: ((slot, idx [n] int64), ...) sorted by slot, slot -1 left out."""
    active = torch.nonzero(slots >= 0).flatten()
    if active.numel() == 0:
        return ()
    sub = slots[active]
    order = torch.argsort(sub, stable=True)
    uniq, counts = torch.unique_consecutive(sub[order], return_counts=True)
    parts = torch.split(active[order], counts.tolist())
    return tuple((int(s), p) for s, p in zip(uniq.tolist(), parts, strict=True))


def _runs_from_segments(col: AdapterColumn) -> tuple[tuple[int, int, int], ...]:
    """The column's segments as host tuples (slot, start, end)."""
    starts, lens = col.seg_starts.tolist(), col.seg_lens.tolist()
    return tuple((slot, st, st + n) for slot, st, n in zip(col.seg_slots.tolist(), starts, lens, strict=True))


def build_lora_indices(
    token_adapter_slots: torch.Tensor,
    token_adapter_scales: torch.Tensor,
    num_slots: int,
    decode_only: bool,
    runs: tuple[tuple[tuple[int, int, int], ...], ...] | None = None,
) -> LoRAIndices:
    """Prepare a step's indices once from `BatchMetadata.token_adapter_slots/scales` [T, M].

    `runs` (`BatchMetadata.adapter_runs`, the same assignment as host runs (slot, start, end) per column)
    lets the indices be built from host lists in a few calls instead of sorting and scanning the device
    tensors. Columns in which no token uses an adapter are dropped. Raises ValueError for a slot outside
    [-1, num_slots).
    """
    if runs is not None:
        return _indices_from_runs(token_adapter_slots, token_adapter_scales, num_slots, decode_only, runs)
    if token_adapter_slots.dim() != 2 or token_adapter_slots.shape != token_adapter_scales.shape:
        raise ValueError(
            f"token adapter slots/scales must both be [T, M], got {tuple(token_adapter_slots.shape)} "
            f"and {tuple(token_adapter_scales.shape)}"
        )
    t, m = token_adapter_slots.shape
    columns: list[AdapterColumn] = []
    if t and m:
        lo, hi = int(token_adapter_slots.min()), int(token_adapter_slots.max())
        if lo < -1 or hi >= num_slots:
            raise ValueError(f"adapter slots must lie in [-1, {num_slots}), got values in [{lo}, {hi}]")
    for j in range(m):
        slots = token_adapter_slots[:, j].to(torch.int32).contiguous()
        groups = groups_from_slots(slots)
        if not groups:
            continue
        starts, lens, seg_slots = segments_from_slots(slots)
        columns.append(
            AdapterColumn(
                slots=slots,
                scales=token_adapter_scales[:, j].to(torch.float32).contiguous(),
                seg_starts=starts,
                seg_lens=lens,
                seg_slots=seg_slots,
                max_seg_len=int(lens.max()),
                groups=groups,
            )
        )
    return LoRAIndices(num_tokens=int(t), columns=tuple(columns), decode_only=decode_only)


def _indices_from_runs(
    token_adapter_slots: torch.Tensor,
    token_adapter_scales: torch.Tensor,
    num_slots: int,
    decode_only: bool,
    runs: tuple[tuple[tuple[int, int, int], ...], ...],
) -> LoRAIndices:
    """`build_lora_indices` from host runs: per used column one tensor for the segments and one for the
    slot-sorted token rows (split into `groups`), no sort, scan or read-back on the device."""
    t, m = token_adapter_slots.shape
    if len(runs) != m or token_adapter_scales.shape != (t, m):
        raise ValueError(f"adapter runs name {len(runs)} columns but the slot/scale tensors are "
                         f"{tuple(token_adapter_slots.shape)} and {tuple(token_adapter_scales.shape)}")
    device = token_adapter_slots.device
    columns: list[AdapterColumn] = []
    host_runs: dict[int, tuple[tuple[int, int, int], ...]] = {}
    for j, col_runs in enumerate(runs):
        if not col_runs:
            continue
        for slot, start, end in col_runs:
            if not (0 <= slot < num_slots and 0 <= start < end <= t):
                raise ValueError(f"adapter run (slot {slot}, tokens [{start}, {end})) outside [0, {num_slots}) "
                                 f"slots or [0, {t}) tokens")
        seg = to_device([[r[0] for r in col_runs], [r[1] for r in col_runs], [r[2] - r[1] for r in col_runs]],
                        torch.int32, device)  # [3, G]: slots, starts, lens
        by_slot: dict[int, list[int]] = {}
        for slot, start, end in col_runs:
            by_slot.setdefault(slot, []).extend(range(start, end))
        order = sorted(by_slot)
        rows = to_device([i for s in order for i in by_slot[s]], torch.int64, device)
        parts = torch.split(rows, [len(by_slot[s]) for s in order])
        host_runs[len(columns)] = col_runs
        columns.append(
            AdapterColumn(
                slots=token_adapter_slots[:, j].to(torch.int32).contiguous(),
                scales=token_adapter_scales[:, j].to(torch.float32).contiguous(),
                seg_starts=seg[1],
                seg_lens=seg[2],
                seg_slots=seg[0],
                max_seg_len=max(r[2] - r[1] for r in col_runs),
                groups=tuple(zip(order, parts, strict=True)),
            )
        )
    return LoRAIndices(num_tokens=int(t), columns=tuple(columns), decode_only=decode_only, _runs=host_runs)


def static_lora_indices(token_adapter_slots: torch.Tensor, token_adapter_scales: torch.Tensor) -> LoRAIndices:
    """Indices of a fixed-shape decode step (`BatchMetadata.static`, a step a CUDA graph replays): every one of
    the M columns is kept, whatever its slots hold, and nothing is read back to the host, so the work is the
    same launches over the same buffers every step. Only the BGMV kernels run from them: tokens whose slot is -1
    return at once, and the rank grid spans max_rank (a later load of a larger-rank adapter is still covered).

    token_adapter_slots: [T, M] int32 whose columns are contiguous (stored [M, T] and transposed);
    token_adapter_scales: [T, M] float32 laid out the same way.
    """
    if token_adapter_slots.dim() != 2 or token_adapter_slots.shape != token_adapter_scales.shape:
        raise ValueError(
            f"token adapter slots/scales must both be [T, M], got {tuple(token_adapter_slots.shape)} "
            f"and {tuple(token_adapter_scales.shape)}"
        )
    t, m = token_adapter_slots.shape
    empty = token_adapter_slots.new_zeros(0)
    columns = []
    for j in range(m):
        slots, scales = token_adapter_slots[:, j], token_adapter_scales[:, j]
        if not slots.is_contiguous() or not scales.is_contiguous():
            raise ValueError("static LoRA indices need contiguous columns: store the slots/scales as [M, T]")
        columns.append(AdapterColumn(slots, scales, empty, empty, empty, 0, ()))
    return LoRAIndices(num_tokens=int(t), columns=tuple(columns), decode_only=True, static=True)
