"""Multi-LoRA shrink/expand in pure torch: the reference twins of the BGMV and SGMV Triton kernels
(`loraledger.kernels.bgmv`, `loraledger.kernels.sgmv`) and the float32 loop oracle both are tested against.

Weights of one target module, stacked over the adapter slots, ranks zero-padded to `max_rank`:

    A: [S, in, R]      B: [S, R, out]      ranks: [S] int32 (rank of the adapter in each slot, 0 = empty)

The adapter's own scaling (alpha/r or alpha/sqrt(r)) is folded into B when the slot is filled, so the kernels
only apply each token's merge weight. For one merge column with per-token `slot[t]` and `scale[t]`:

    shrink:  y[t, :]   = x[t, :] @ A[slot[t], :, :ranks[slot[t]]]            (y: [T, R] float32, rest 0)
    expand:  out[t, :] += scale[t] * (y[t, :rank] @ B[slot[t], :rank, :])     (rank = ranks[slot[t]])
    tokens with slot[t] == -1 are skipped: y[t] stays 0 and out[t] is not touched.

BGMV takes the slots per token; SGMV takes them as segments of consecutive tokens sharing one slot
(seg_starts, seg_lens, seg_slots [G]). Both compute the functions above, so one pair of twins serves both:
an SGMV call equals `shrink_ref` / `expand_ref` over the per-token slots
`slots_from_segments(T, seg_starts, seg_lens, seg_slots)`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def slots_from_segments(
    num_tokens: int, seg_starts: torch.Tensor, seg_lens: torch.Tensor, seg_slots: torch.Tensor
) -> torch.Tensor:
    """SGMV's segments as per-token slots [T] int32: slots[seg_starts[g] : seg_starts[g] + seg_lens[g]] =
    seg_slots[g], -1 outside every segment."""
    slots = torch.full((num_tokens,), -1, dtype=torch.int32, device=seg_slots.device)
    for start, length, slot in zip(seg_starts.tolist(), seg_lens.tolist(), seg_slots.tolist(), strict=True):
        slots[start : start + length] = slot
    return slots


def _tokens_by_slot(slots: torch.Tensor, ranks: torch.Tensor) -> list[tuple[int, int, torch.Tensor]]:
    """(slot, rank, token indices [n] int64) of every used slot of non-zero rank."""
    rank_list = ranks.tolist()
    used = torch.unique(slots[slots >= 0]).tolist()
    return [(s, rank_list[s], torch.nonzero(slots == s).flatten()) for s in used if rank_list[s]]


def shrink_ref(x: torch.Tensor, A: torch.Tensor, slots: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """y[t, :r] = x[t] @ A[slot[t], :, :r] with r = ranks[slot[t]]; y[t] = 0 where slot[t] == -1.

    x: [T, in], A: [S, in, R], slots: [T] int, ranks: [S] int -> y: [T, R] float32.
    """
    y = torch.zeros(x.shape[0], A.shape[2], dtype=torch.float32, device=x.device)
    for slot, r, idx in _tokens_by_slot(slots, ranks):
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
    for slot, r, idx in _tokens_by_slot(slots, ranks):
        delta = (y[idx, :r].to(B.dtype) @ B[slot, :r, :]) * scales[idx, None].to(B.dtype)
        out.index_add_(0, idx, delta.to(out.dtype))
    return out


def add_lora_loop(
    out: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    slots: torch.Tensor,
    scales: torch.Tensor,
    ranks: torch.Tensor | Sequence[int],
) -> torch.Tensor:
    """out[t] + sum_m scales[t, m] * (x[t] @ A[s, :, :r] @ B[s, :r, :]), s = slots[t, m] >= 0, r = ranks[s],
    token by token in float32 on the CPU with nothing shared between tokens (slow; the test oracle).

    out: [T, out], x: [T, in], A: [S, in, R], B: [S, R, out]; slots, scales: [T, M] (or [T]: one column);
    ranks: [S] -> a new [T, out] float32 CPU tensor; the inputs are not modified.
    """
    rank_list = ranks.tolist() if isinstance(ranks, torch.Tensor) else list(ranks)
    slot_rows = slots.reshape(slots.shape[0], -1).tolist()  # [T, M]
    scale_rows = scales.reshape(scales.shape[0], -1).tolist()
    res = out.float().cpu().clone()
    for t, (row_slots, row_scales) in enumerate(zip(slot_rows, scale_rows, strict=True)):
        for s, w in zip(row_slots, row_scales, strict=True):
            if s < 0 or rank_list[s] == 0:
                continue
            r = rank_list[s]
            a = A[s, :, :r].float().cpu()
            b = B[s, :r, :].float().cpu()
            res[t] += w * ((x[t].float().cpu() @ a) @ b)
    return res
