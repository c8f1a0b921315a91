"""The add-LoRA op of the LoRA layers, by backend: `out[t] += sum_m scale[t, m] * (x[t] @ A[s] @ B[s])` over a
step's `LoRAIndices` (`loraledger.inference.lora.plan`), in place. Chosen by name through `get_add_lora`:

    "torch"   `add_lora_torch`: runs the step's torch-path plan (`LoRAIndices.plan` buckets); any device, the
              CPU path. It slices `A[s, :, :r]`, `B[s, :r, :]` per slot, so padded rank columns, empty slots
              and tokens without an adapter are never read.
    "triton"  `add_lora_triton`: the BGMV (decode-only steps) and SGMV (prefill / mixed steps) Triton kernels
              (`loraledger.kernels.bgmv`, `loraledger.kernels.sgmv`); CUDA, or CPU under TRITON_INTERPRET=1

Both take the same arguments (`AddLoRA`):

    fn(out [T, out], x [T, in], A [S, in, R], B [S, R, out], ranks_host: list[int] [S], indices,
       ranks [S] int32) -> out

`ranks_host` is the host copy of `ranks` (no device sync per layer).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from loraledger.inference.errors import BackendError
from loraledger.inference.lora.plan import LoRABucket, LoRAIndices

LORA_BACKENDS: tuple[str, ...] = ("torch", "triton")

AddLoRA = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[int], LoRAIndices, torch.Tensor], torch.Tensor
]


def add_lora_torch(
    out: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    ranks_host: list[int],
    indices: LoRAIndices,
    ranks: torch.Tensor | None = None,
) -> torch.Tensor:
    """The torch backend: out[t] += sum_m scale[t, m] * (x[t] @ A[s] @ B[s]) over used (column, slot) pairs.

    out: [T, out], x: [T, in], A: [S, in, R], B: [S, R, out]; in place, returns out. Works through
    `indices.plan(m, ranks_host)`: unused tokens, empty slots and padded rank columns are never read. `ranks`
    (the device copy) is not read. Raises ValueError for static indices (a CUDA-graph step: triton only).
    """
    if indices.static:
        raise ValueError("static LoRA indices (a CUDA-graph decode step) run on the triton backend only; build "
                         "the step's indices with build_lora_indices for the torch backend")
    for m in range(len(indices.columns)):
        for bucket in indices.plan(m, ranks_host):
            _add_bucket(out, x, A, B, bucket)
    return out


def _add_bucket(out: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, bucket: LoRABucket) -> None:
    """out[t] += scale[t] * (x[t] @ A[slot, :, :r] @ B[slot, :r, :]) for the tokens of one rank-r bucket."""
    r, scales = bucket.rank, bucket.scales
    if bucket.form == "runs":  # contiguous token ranges: slice, never gather
        for slot, start, end in bucket.parts:
            y = x[start:end] @ A[slot, :, :r]  # [len, r]
            if scales is not None:
                y.mul_(scales[start:end].to(y.dtype))
            _add_rows(out[start:end], y, B[slot, :r, :])
        return
    rows = bucket.rows
    assert rows is not None
    xs = x.index_select(0, rows)  # [n, in], sorted by slot
    if bucket.form == "bmm":  # few rows per slot: one batched GEMM over rows, no loop over slots
        assert bucket.slot_of_row is not None
        a = A[:, :, :r].index_select(0, bucket.slot_of_row)  # [n, in, r]
        y = torch.bmm(xs.unsqueeze(1), a)  # [n, 1, r]
        if scales is not None:
            y.mul_(scales.to(y.dtype).unsqueeze(2))
        b = B[:, :r, :].index_select(0, bucket.slot_of_row)  # [n, r, out]
        delta = torch.bmm(y, b).squeeze(1)  # [n, out]
    else:  # "loop": each slot's GEMMs write their slice of one buffer
        y = xs.new_empty(xs.shape[0], r)
        for slot, start, end in bucket.parts:
            torch.mm(xs[start:end], A[slot, :, :r], out=y[start:end])
        if scales is not None:
            y.mul_(scales.to(y.dtype))
        delta = xs.new_empty(xs.shape[0], B.shape[2])
        for slot, start, end in bucket.parts:
            torch.mm(y[start:end], B[slot, :r, :], out=delta[start:end])
    out.index_add_(0, rows, delta if delta.dtype == out.dtype else delta.to(out.dtype))


def _add_rows(out: torch.Tensor, y: torch.Tensor, b: torch.Tensor) -> None:
    """out += y @ b in place (out: a contiguous row range [n, out], y: [n, r], b: [r, out])."""
    if out.dtype == b.dtype:
        out.addmm_(y, b)
    else:
        out.add_((y @ b).to(out.dtype))


def add_lora_triton(
    out: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    ranks_host: list[int],
    indices: LoRAIndices,
    ranks: torch.Tensor,
) -> torch.Tensor:
    """The triton backend: per merge column, BGMV over the per-token slots on a decode-only step, else SGMV
    over the segments (CUDA, or CPU under TRITON_INTERPRET=1). `ranks` [S] int32 is read on the device;
    `ranks_host` bounds the rank grid (a static step's grid spans every rank instead)."""
    from loraledger.kernels import bgmv, sgmv  # imported on use: triton is optional (the `gpu` extra)

    # a static step (CUDA graph) must not bake the ranks of this step into its grid: span every rank
    max_rank: int | None = None if indices.static else (max(ranks_host) if ranks_host else 0)
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


def get_add_lora(backend: str) -> AddLoRA:
    """"torch" | "triton" -> that backend's add-LoRA function (see the module docstring); raises BackendError
    (a ValueError) for any other name."""
    if backend == "torch":
        return add_lora_torch
    if backend == "triton":
        return add_lora_triton
    raise BackendError(f"unknown LoRA kernel backend {backend!r}; choose one of {', '.join(LORA_BACKENDS)}")
