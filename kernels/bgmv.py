"""BGMV: batched gather matrix-vector LoRA kernels, one token per program row (decode steps).

    bgmv_shrink:  y[t, :r] = x[t] @ A[slot[t], :, :r]                    r = ranks[slot[t]], y: [T, R] fp32
    bgmv_expand:  out[t]  += scale[t] * (y[t, :r] @ B[slot[t], :r, :])   in place

Tokens with slot -1 return at once (no loads). Rank tiles at or past `ranks[slot]` exit before any load, and
columns past the rank inside the last tile are masked (never read), so padding to `max_rank` moves no bytes.
Reference twins: `loraledger.kernels.lora_ref.shrink_ref` / `expand_ref`. On CPU run with TRITON_INTERPRET=1 (tests
only).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from loraledger.kernels.launch import check_expand_inputs, check_shrink_inputs, rank_block


@triton.jit
def _bgmv_shrink_kernel(
    x_ptr, a_ptr, y_ptr, slot_ptr, rank_ptr,
    K,
    stride_xt, stride_xk,
    stride_as, stride_ak, stride_ar,
    stride_yt, stride_yr,
    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    t = tl.program_id(0)
    rb = tl.program_id(1)
    slot = tl.load(slot_ptr + t)
    if slot < 0:
        return
    rank = tl.load(rank_ptr + slot)
    if rb * BLOCK_R >= rank:
        return
    rs = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rs < rank
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    a_base = a_ptr + slot.to(tl.int64) * stride_as
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        xv = tl.load(x_ptr + t * stride_xt + ks * stride_xk, mask=kmask, other=0.0).to(tl.float32)
        at = tl.load(
            a_base + ks[:, None] * stride_ak + rs[None, :] * stride_ar,
            mask=kmask[:, None] & rmask[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(xv[:, None] * at, axis=0)
    tl.store(y_ptr + t * stride_yt + rs * stride_yr, acc, mask=rmask)


@triton.jit
def _bgmv_expand_kernel(
    y_ptr, b_ptr, out_ptr, slot_ptr, scale_ptr, rank_ptr,
    N,
    stride_yt, stride_yr,
    stride_bs, stride_br, stride_bn,
    stride_ot, stride_on,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    t = tl.program_id(0)
    nb = tl.program_id(1)
    slot = tl.load(slot_ptr + t)
    if slot < 0:
        return
    rank = tl.load(rank_ptr + slot)
    if rank == 0:
        return
    ns = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = ns < N
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    b_base = b_ptr + slot.to(tl.int64) * stride_bs
    for k0 in range(0, rank, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < rank
        yv = tl.load(y_ptr + t * stride_yt + ks * stride_yr, mask=kmask, other=0.0)
        bt = tl.load(
            b_base + ks[:, None] * stride_br + ns[None, :] * stride_bn,
            mask=kmask[:, None] & nmask[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(yv[:, None] * bt, axis=0)
    scale = tl.load(scale_ptr + t)
    o_ptrs = out_ptr + t * stride_ot + ns * stride_on
    o = tl.load(o_ptrs, mask=nmask, other=0.0).to(tl.float32)
    tl.store(o_ptrs, (o + scale * acc).to(out_ptr.dtype.element_ty), mask=nmask)


def bgmv_shrink(
    x: torch.Tensor, A: torch.Tensor, slots: torch.Tensor, ranks: torch.Tensor, max_rank: int | None = None
) -> torch.Tensor:
    """y = shrink(x) per token; x: [T, in], A: [S, in, R], slots: [T] int32, ranks: [S] int32 -> y [T, R] fp32.

    `max_rank` (largest rank in use, host int) bounds the rank grid; default R.
    """
    check_shrink_inputs(x, A, slots, ranks)
    t, k = x.shape
    r_pad = A.shape[2]
    y = torch.zeros(t, r_pad, dtype=torch.float32, device=x.device)
    mr = r_pad if max_rank is None else min(max_rank, r_pad)
    if t == 0 or mr == 0:
        return y
    block_r = rank_block(mr)
    block_k = 128 if k >= 128 else max(16, triton.next_power_of_2(k))
    grid = (t, triton.cdiv(mr, block_r))
    _bgmv_shrink_kernel[grid](
        x, A, y, slots, ranks,
        k,
        x.stride(0), x.stride(1),
        A.stride(0), A.stride(1), A.stride(2),
        y.stride(0), y.stride(1),
        BLOCK_K=block_k, BLOCK_R=block_r,
    )
    return y


def bgmv_expand(
    out: torch.Tensor,
    y: torch.Tensor,
    B: torch.Tensor,
    slots: torch.Tensor,
    scales: torch.Tensor,
    ranks: torch.Tensor,
    max_rank: int | None = None,
) -> torch.Tensor:
    """out += expand(y) per token, in place; out: [T, N], y: [T, R] fp32, B: [S, R, N], scales: [T] fp32."""
    check_expand_inputs(out, y, B, slots, scales, ranks)
    t, n = out.shape
    if t == 0 or n == 0:
        return out
    block_n = min(256, max(16, triton.next_power_of_2(n)))
    grid = (t, triton.cdiv(n, block_n))
    _bgmv_expand_kernel[grid](
        y, B, out, slots, scales, ranks,
        n,
        y.stride(0), y.stride(1),
        B.stride(0), B.stride(1), B.stride(2),
        out.stride(0), out.stride(1),
        BLOCK_K=16, BLOCK_N=block_n,
    )
    return out
