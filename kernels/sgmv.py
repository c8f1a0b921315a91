"""SGMV: segmented gather matrix multiply LoRA kernels, one small GEMM per segment (prefill / mixed steps).

A segment g is the tokens [seg_starts[g], seg_starts[g] + seg_lens[g]) that all use slot seg_slots[g] >= 0
(tokens without an adapter belong to no segment, so they launch nothing).

    sgmv_shrink:  Y[seg, :r] = X[seg] @ A[slot, :, :r]                         r = ranks[slot], Y: [T, R] fp32
    sgmv_expand:  OUT[seg]  += scale[seg, None] * (Y[seg, :r] @ B[slot, :r, :])  in place, per-token scale

Grid: (segment, row tile of BLOCK_M tokens, rank tile | out tile); tiles past a segment's length or its rank
exit before any load, so an empty segment or a padded rank costs a launch slot but no memory traffic.
fp32 inputs use IEEE dots (no TF32) so fp32 serving matches the reference to ~1e-6; see `_dot_in_f32`.
Reference twins: `loraledger.kernels.lora_ref.shrink_ref` / `expand_ref` over `slots_from_segments`.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from loraledger.kernels.launch import check_expand_inputs, check_segments, check_shrink_inputs, rank_block


@triton.jit
def _sgmv_shrink_kernel(
    x_ptr, a_ptr, y_ptr, start_ptr, len_ptr, seg_slot_ptr, rank_ptr,
    K,
    stride_xt, stride_xk,
    stride_as, stride_ak, stride_ar,
    stride_yt, stride_yr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, DOT_F32: tl.constexpr,
):
    g = tl.program_id(0)
    mb = tl.program_id(1)
    rb = tl.program_id(2)
    length = tl.load(len_ptr + g)
    if mb * BLOCK_M >= length:
        return
    slot = tl.load(seg_slot_ptr + g)
    rank = tl.load(rank_ptr + slot)
    if rb * BLOCK_R >= rank:
        return
    start = tl.load(start_ptr + g)
    rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < length
    toks = (start + rows).to(tl.int64)
    rs = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rs < rank
    a_base = a_ptr + slot.to(tl.int64) * stride_as
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        xt = tl.load(
            x_ptr + toks[:, None] * stride_xt + ks[None, :] * stride_xk,
            mask=row_mask[:, None] & kmask[None, :],
            other=0.0,
        )
        at = tl.load(
            a_base + ks[:, None] * stride_ak + rs[None, :] * stride_ar,
            mask=kmask[:, None] & rmask[None, :],
            other=0.0,
        )
        if DOT_F32:
            acc += tl.dot(xt.to(tl.float32), at.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(xt, at)
    tl.store(
        y_ptr + toks[:, None] * stride_yt + rs[None, :] * stride_yr,
        acc,
        mask=row_mask[:, None] & rmask[None, :],
    )


@triton.jit
def _sgmv_expand_kernel(
    y_ptr, b_ptr, out_ptr, start_ptr, len_ptr, seg_slot_ptr, scale_ptr, rank_ptr,
    N,
    stride_yt, stride_yr,
    stride_bs, stride_br, stride_bn,
    stride_ot, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr,
):
    g = tl.program_id(0)
    mb = tl.program_id(1)
    nb = tl.program_id(2)
    length = tl.load(len_ptr + g)
    if mb * BLOCK_M >= length:
        return
    slot = tl.load(seg_slot_ptr + g)
    rank = tl.load(rank_ptr + slot)
    if rank == 0:
        return
    start = tl.load(start_ptr + g)
    rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < length
    toks = (start + rows).to(tl.int64)
    ns = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = ns < N
    b_base = b_ptr + slot.to(tl.int64) * stride_bs
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, rank, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < rank
        yt = tl.load(
            y_ptr + toks[:, None] * stride_yt + ks[None, :] * stride_yr,
            mask=row_mask[:, None] & kmask[None, :],
            other=0.0,
        )
        bt = tl.load(
            b_base + ks[:, None] * stride_br + ns[None, :] * stride_bn,
            mask=kmask[:, None] & nmask[None, :],
            other=0.0,
        )
        if DOT_F32:
            acc += tl.dot(yt, bt.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(yt.to(bt.dtype), bt)
    scale = tl.load(scale_ptr + toks, mask=row_mask, other=0.0)
    o_ptrs = out_ptr + toks[:, None] * stride_ot + ns[None, :] * stride_on
    omask = row_mask[:, None] & nmask[None, :]
    o = tl.load(o_ptrs, mask=omask, other=0.0).to(tl.float32)
    tl.store(o_ptrs, (o + scale[:, None] * acc).to(out_ptr.dtype.element_ty), mask=omask)


def _dot_in_f32(dtype: torch.dtype) -> bool:
    """fp32 inputs: IEEE fp32 dots. bf16 under the interpreter: upcast too, because triton's CPU interpreter
    computes bf16 `tl.dot` wrongly (checked with triton 3.9); on the GPU bf16/fp16 use tensor cores."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and _interpreting())


def _interpreting() -> bool:
    """Triton's interpreter is on (`triton.knobs` from triton 3.4; the environment variable before it)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _block_m(max_seg_len: int) -> int:
    return 16 if max_seg_len <= 16 else (32 if max_seg_len <= 32 else 64)


def _num_warps(block_m: int, dot_f32: bool) -> int:
    """8 warps for 64-row fp32 tiles (fp32 dots run on FMA units, with far more registers per tile than tensor
    cores): with 4, the expand sits at 250 registers and the shrink spills 15 KB on sm_80; with 8 and 32-wide
    k tiles for the shrink, neither spills on sm_80 or sm_90 (`scripts/check_triton_compile.py`)."""
    return 8 if dot_f32 and block_m == 64 else 4


def sgmv_shrink(
    x: torch.Tensor,
    A: torch.Tensor,
    seg_starts: torch.Tensor,
    seg_lens: torch.Tensor,
    seg_slots: torch.Tensor,
    ranks: torch.Tensor,
    max_seg_len: int,
    max_rank: int | None = None,
) -> torch.Tensor:
    """Y = shrink(X) per segment; x: [T, in], A: [S, in, R], segments [G] int32 -> y [T, R] fp32 (0 off-segment).

    `max_seg_len` and `max_rank` (host ints, from the step's indices) size the grid without a device sync.
    """
    dummy_slots = torch.empty(x.shape[0], dtype=torch.int32, device=x.device)
    check_shrink_inputs(x, A, dummy_slots, ranks)
    check_segments(seg_starts, seg_lens, seg_slots, x.device)
    t, k = x.shape
    r_pad = A.shape[2]
    y = torch.zeros(t, r_pad, dtype=torch.float32, device=x.device)
    mr = r_pad if max_rank is None else min(max_rank, r_pad)
    g = seg_starts.shape[0]
    if g == 0 or max_seg_len == 0 or mr == 0:
        return y
    block_m = _block_m(max_seg_len)
    block_r = rank_block(mr)
    dot_f32 = _dot_in_f32(x.dtype)
    block_k = min(32 if dot_f32 else 64, max(16, triton.next_power_of_2(k)))
    grid = (g, triton.cdiv(max_seg_len, block_m), triton.cdiv(mr, block_r))
    _sgmv_shrink_kernel[grid](
        x, A, y, seg_starts, seg_lens, seg_slots, ranks,
        k,
        x.stride(0), x.stride(1),
        A.stride(0), A.stride(1), A.stride(2),
        y.stride(0), y.stride(1),
        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=block_r, DOT_F32=dot_f32, num_warps=_num_warps(block_m, dot_f32),
    )
    return y


def sgmv_expand(
    out: torch.Tensor,
    y: torch.Tensor,
    B: torch.Tensor,
    seg_starts: torch.Tensor,
    seg_lens: torch.Tensor,
    seg_slots: torch.Tensor,
    scales: torch.Tensor,
    ranks: torch.Tensor,
    max_seg_len: int,
    max_rank: int | None = None,
) -> torch.Tensor:
    """OUT += expand(Y) per segment, in place; out: [T, N], y: [T, R] fp32, B: [S, R, N], scales: [T] fp32."""
    dummy_slots = torch.empty(out.shape[0], dtype=torch.int32, device=out.device)
    check_expand_inputs(out, y, B, dummy_slots, scales, ranks)
    check_segments(seg_starts, seg_lens, seg_slots, out.device)
    _t, n = out.shape
    g = seg_starts.shape[0]
    if g == 0 or max_seg_len == 0 or n == 0:
        return out
    block_m = _block_m(max_seg_len)
    block_n = min(128, max(16, triton.next_power_of_2(n)))
    dot_f32 = _dot_in_f32(B.dtype)
    grid = (g, triton.cdiv(max_seg_len, block_m), triton.cdiv(n, block_n))
    _sgmv_expand_kernel[grid](
        y, B, out, seg_starts, seg_lens, seg_slots, scales, ranks,
        n,
        y.stride(0), y.stride(1),
        B.stride(0), B.stride(1), B.stride(2),
        out.stride(0), out.stride(1),
        BLOCK_M=block_m, BLOCK_K=16, BLOCK_N=block_n, DOT_F32=dot_f32, num_warps=_num_warps(block_m, dot_f32),
    )
    return out
