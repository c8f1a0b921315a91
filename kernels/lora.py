"""Multi-LoRA shrink/expand: per-step indices, pure-torch reference twins (the CPU path), backend dispatch.

Weights of one target module, stacked over the adapter slots, ranks zero-padded to `max_rank`:

    A: [S, in, R]      B: [S, R, out]      ranks: [S] int32 (rank of the adapter in each slot, 0 = empty)

The adapter's own scaling (alpha/r or alpha/sqrt(r)) is folded into B when the slot is filled, so the kernels
only apply each token's merge weight. Semantics, for one merge column m with per-token `slot[t]` and `scale[t]`:

    shrink:  y[t, :]   = x[t, :] @ A[slot[t], :, :ranks[slot[t]]]            (y: [T, R] float32, rest 0)
    expand:  out[t, :] += scale[t] * (y[t, :rank] @ B[slot[t], :rank, :])     (rank = ranks[slot[t]])
    tokens with slot[t] == -1 are skipped: y[t] stays 0 and out[t] is not touched.

and a token merging M adapters (`token_adapter_slots[t, m]`, DESIGN.md "per-request merge") gets
`out[t] += sum_m scale[t, m] * (x[t] @ A[s_m] @ B[s_m])`, one (shrink, expand) pair per column m.

Two encodings of the same slot assignment: BGMV (per token, used for decode-only steps) and SGMV (segments of
consecutive tokens with the same slot, used for prefill and mixed steps: one small GEMM per segment).

Padding cost. The torch path slices `A[s, :, :r]`, `B[s, :r, :]` per slot, so padding costs nothing there.
The Triton kernels read `ranks[slot]` and mask/stop their rank loop there: padded rank columns are never
loaded from memory, and compute is wasted only up to the next multiple of the rank tile (16), e.g. rank 4
computes a 16-wide tile in the shrink while moving only 4 columns of A.

"No adapter costs no LoRA work": `build_lora_indices` drops merge columns and segments whose slot is -1,
and the torch path only gathers the tokens of each used slot (`groups`), so a batch without adapters does
no LoRA work at all and an un-adapted token in a mixed batch is never gathered.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

BACKENDS = ("torch", "triton")


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


@dataclass(frozen=True)
class LoRAIndices:
    """Everything the LoRA layers need about a step's adapter assignment; `columns` is empty if none is used."""

    num_tokens: int
    columns: tuple[AdapterColumn, ...]
    decode_only: bool

    @property
    def active(self) -> bool:
        return bool(self.columns)


def segments_from_slots(slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Runs of equal consecutive slots, -1 runs dropped.

    slots: [T] int -> (seg_starts [G] int32, seg_lens [G] int32, seg_slots [G] int32), e.g.
    [3, 3, -1, 0, 0, 0, 3] -> starts [0, 3, 6], lens [2, 3, 1], slots [3, 0, 3].
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


def slots_from_segments(
    num_tokens: int, seg_starts: torch.Tensor, seg_lens: torch.Tensor, seg_slots: torch.Tensor
) -> torch.Tensor:
    """Inverse of `segments_from_slots`: per-token slots [T] int32, -1 outside every segment."""
    slots = torch.full((num_tokens,), -1, dtype=torch.int32, device=seg_slots.device)
    for start, length, slot in zip(seg_starts.tolist(), seg_lens.tolist(), seg_slots.tolist(), strict=True):
        slots[start : start + length] = slot
    return slots


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


def build_lora_indices(
    token_adapter_slots: torch.Tensor, token_adapter_scales: torch.Tensor, num_slots: int, decode_only: bool
) -> LoRAIndices:
    """Prepare a step's indices once (one host sync) from `BatchMetadata.token_adapter_slots/scales` [T, M].

    Columns in which no token uses an adapter are dropped. Raises ValueError for a slot outside [-1, num_slots).
    """
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


# ---------------------------------------------------------------------------------------------------------
# Reference twins (pure torch): the CPU path and the oracle of the Triton kernels.
# ---------------------------------------------------------------------------------------------------------


def shrink_ref(x: torch.Tensor, A: torch.Tensor, slots: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """y[t, :r] = x[t] @ A[slot[t], :, :r] with r = ranks[slot[t]]; y[t] = 0 where slot[t] == -1.

    x: [T, in], A: [S, in, R], slots: [T] int, ranks: [S] int -> y: [T, R] float32.
    """
    y = torch.zeros(x.shape[0], A.shape[2], dtype=torch.float32, device=x.device)
    rank_list = ranks.tolist()
    for slot, idx in groups_from_slots(slots):
        r = rank_list[slot]
        if r:
            y[idx, :r] = (x[idx] @ A[slot, :, :r]).float()
    return y


def expand_ref(
    out: torch.Tensor,
    y: torch.Tensor,
    B: torch.Tensor,
    slots: torch.Tensor,
    scales: torch.Tensor,
    ranks: torch.Tensor,
) -> torch.Tensor:
    """out[t] += scale[t] * (y[t, :r] @ B[slot[t], :r, :]) with r = ranks[slot[t]]; in place, returns out.

    out: [T, out], y: [T, R] (any float dtype), B: [S, R, out], slots: [T], scales: [T] float32, ranks: [S].
    """
    rank_list = ranks.tolist()
    for slot, idx in groups_from_slots(slots):
        r = rank_list[slot]
        if r:
            delta = (y[idx, :r].to(B.dtype) @ B[slot, :r, :]) * scales[idx, None].to(B.dtype)
            out.index_add_(0, idx, delta.to(out.dtype))
    return out


def add_lora_ref(
    out: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    ranks_host: list[int],
    indices: LoRAIndices,
) -> torch.Tensor:
    """The CPU path: out[t] += sum_m scale[t, m] * (x[t] @ A[s] @ B[s]) over used (column, slot) groups only.

    Each used slot costs one gather of its tokens and two small GEMMs at its true rank; unused tokens, empty
    slots and padded ranks cost nothing. `ranks_host` is the host copy of ranks (no device sync per layer).
    """
    for col in indices.columns:
        for slot, idx in col.groups:
            r = ranks_host[slot]
            if r == 0:
                continue
            if idx.numel() == x.shape[0]:  # one slot for the whole step (idx == arange(T)): no gather/scatter
                delta = (x @ A[slot, :, :r]) @ B[slot, :r, :]
                out.add_(delta * col.scales[:, None].to(delta.dtype))
                continue
            xs = x.index_select(0, idx)  # [n, in]
            delta = (xs @ A[slot, :, :r]) @ B[slot, :r, :]  # [n, out]
            delta = delta * col.scales.index_select(0, idx)[:, None].to(delta.dtype)
            out.index_add_(0, idx, delta.to(out.dtype))
    return out


def _add_lora_triton(
    out: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    ranks_host: list[int],
    indices: LoRAIndices,
    ranks: torch.Tensor,
) -> torch.Tensor:
    from kernels import bgmv, sgmv  # imported on use: triton is optional (the `gpu` extra)

    max_rank = max(ranks_host) if ranks_host else 0
    for col in indices.columns:
        if indices.decode_only:
            y = bgmv.bgmv_shrink(x, A, col.slots, ranks, max_rank=max_rank)
            bgmv.bgmv_expand(out, y, B, col.slots, col.scales, ranks, max_rank=max_rank)
        else:
            y = sgmv.sgmv_shrink(
                x, A, col.seg_starts, col.seg_lens, col.seg_slots, ranks, col.max_seg_len, max_rank=max_rank
            )
            sgmv.sgmv_expand(
                out, y, B, col.seg_starts, col.seg_lens, col.seg_slots, col.scales, ranks, col.max_seg_len,
                max_rank=max_rank,
            )
    return out


AddLoRA = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[int], LoRAIndices, torch.Tensor], torch.Tensor
]


def _add_lora_torch(
    out: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    ranks_host: list[int],
    indices: LoRAIndices,
    ranks: torch.Tensor,
) -> torch.Tensor:
    return add_lora_ref(out, x, A, B, ranks_host, indices)


def get_add_lora(backend: str) -> AddLoRA:
    """Backend factory: "torch" (reference, any device) or "triton" (CUDA, or CPU with TRITON_INTERPRET=1).

    The returned function computes `out += LoRA(x)` in place:
    fn(out [T, out], x [T, in], A [S, in, R], B [S, R, out], ranks_host, indices, ranks [S] int32) -> out.
    """
    if backend == "torch":
        return _add_lora_torch
    if backend == "triton":
        return _add_lora_triton
    raise ValueError(f"unknown LoRA kernel backend {backend!r}; choose one of {BACKENDS}")


def default_backend(device: torch.device) -> str:
    """'triton' on CUDA when triton is importable, else 'torch'."""
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "torch"
        return "triton"
    return "torch"
