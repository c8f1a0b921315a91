"""Paged attention as one Triton kernel for prefill chunks and decodes in the same flat batch.

Semantics are those of `loraledger.kernels.paged_attention_ref.paged_attention_ref` (the oracle):

    for sequence b, query token i (absolute position p = context_lens[b] - q_len[b] + i), query head h:
        out[t, h] = softmax_j(scale * q[t, h] . K_b[j, h // G]; j <= p) @ V_b[:, h // G]

Work split: one program per (sequence b, tile of BLOCK_M rows, kv head). A row is a pair (query token i,
head g of the kv head's group), row = i * G + g, so the G query heads sharing one kv head read each K/V block
once and a decode (q_len 1) still fills G rows of the tile. Each program streams the sequence's keys
BLOCK_N at a time through the block table (token j lives at block_tables[b, j // bs], offset j % bs) with
an online softmax in float32, and stops at the last key its rows can see.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    block_tables_ptr,
    query_start_ptr,
    context_lens_ptr,
    scale,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_bt,
    head_dim,
    PAGE: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    m_blk = tl.program_id(1)
    kvh = tl.program_id(2)
    q_start = tl.load(query_start_ptr + b)
    q_len = tl.load(query_start_ptr + b + 1) - q_start
    num_rows = q_len * GROUP
    if m_blk * BLOCK_M < num_rows:
        ctx = tl.load(context_lens_ptr + b)
        rows = m_blk * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
        qi = rows // GROUP
        head = kvh * GROUP + rows % GROUP
        row_ok = rows < num_rows
        d = tl.arange(0, BLOCK_D)
        d_ok = d < head_dim
        q = tl.load(
            q_ptr + (q_start + qi)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
            mask=row_ok[:, None] & d_ok[None, :],
            other=0.0,
        )  # [BLOCK_M, BLOCK_D]
        q_pos = ctx - q_len + qi  # [BLOCK_M] absolute position of each row's token
        last_row = tl.minimum(m_blk * BLOCK_M + BLOCK_M, num_rows) - 1
        kv_end = ctx - q_len + last_row // GROUP + 1  # keys [0, kv_end) are visible to some row

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for start in range(0, kv_end, BLOCK_N):
            kpos = start + tl.arange(0, BLOCK_N)  # [BLOCK_N]
            k_ok = kpos < kv_end
            blk = tl.load(block_tables_ptr + b * stride_bt + kpos // PAGE, mask=k_ok, other=0).to(tl.int64)
            k_off = blk * stride_kb + (kpos % PAGE) * stride_ks + kvh * stride_kh  # [BLOCK_N]
            v_off = blk * stride_vb + (kpos % PAGE) * stride_vs + kvh * stride_vh
            k = tl.load(
                k_ptr + k_off[None, :] + d[:, None], mask=k_ok[None, :] & d_ok[:, None], other=0.0
            )  # [BLOCK_D, BLOCK_N]
            s = tl.dot(q, k, input_precision=DOT_PRECISION) * scale  # [BLOCK_M, BLOCK_N]
            visible = (kpos[None, :] <= q_pos[:, None]) & k_ok[None, :]
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(
                v_ptr + v_off[:, None] + d[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0
            )  # [BLOCK_N, BLOCK_D]
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(
            out_ptr + (q_start + qi)[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=row_ok[:, None] & d_ok[None, :],
        )


@triton.jit
def _paged_decode_split_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    part_o_ptr,
    part_m_ptr,
    part_l_ptr,
    block_tables_ptr,
    context_lens_ptr,
    scale,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_bt,
    head_dim,
    num_heads,
    split_len,
    PAGE: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Decode only (token b is sequence b's one query): program (b, kv head, split s) runs the online softmax
    over keys [s * split_len, (s + 1) * split_len) of the context and writes its unnormalised partial
    (acc, max, sum)."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    s = tl.program_id(2)
    ctx = tl.load(context_lens_ptr + b)
    rows = tl.arange(0, BLOCK_G)
    head = kvh * GROUP + rows
    row_ok = rows < GROUP
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    q = tl.load(
        q_ptr + b * stride_qt + head[:, None] * stride_qh + d[None, :],
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )  # [BLOCK_G, BLOCK_D]
    start = s * split_len
    end = tl.minimum(start + split_len, ctx)  # every key of the context is visible to the decode query
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for kstart in range(start, end, BLOCK_N):
        kpos = kstart + tl.arange(0, BLOCK_N)
        k_ok = kpos < end
        blk = tl.load(block_tables_ptr + b * stride_bt + kpos // PAGE, mask=k_ok, other=0).to(tl.int64)
        k_off = blk * stride_kb + (kpos % PAGE) * stride_ks + kvh * stride_kh
        v_off = blk * stride_vb + (kpos % PAGE) * stride_vs + kvh * stride_vh
        k = tl.load(k_ptr + k_off[None, :] + d[:, None], mask=k_ok[None, :] & d_ok[:, None], other=0.0)
        sc = tl.dot(q, k, input_precision=DOT_PRECISION) * scale  # [BLOCK_G, BLOCK_N]
        sc = tl.where(k_ok[None, :], sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, axis=1))
        p = tl.exp(sc - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + v_off[:, None] + d[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    part = (b * num_heads + head) * NUM_SPLITS + s  # [BLOCK_G] row of (sequence, head, split)
    tl.store(part_o_ptr + part[:, None] * head_dim + d[None, :], acc, mask=row_ok[:, None] & d_ok[None, :])
    tl.store(part_m_ptr + part, m_i, mask=row_ok)
    tl.store(part_l_ptr + part, l_i, mask=row_ok)


@triton.jit
def _paged_decode_reduce_kernel(
    part_o_ptr,
    part_m_ptr,
    part_l_ptr,
    out_ptr,
    stride_ot,
    stride_oh,
    head_dim,
    num_heads,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[b, h] = sum_s exp(m_s - M) acc_s / sum_s exp(m_s - M) l_s, M = max_s m_s (empty splits: m_s = -inf)."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    ss = tl.arange(0, BLOCK_S)
    s_ok = ss < NUM_SPLITS
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    base = (b * num_heads + h) * NUM_SPLITS
    m = tl.load(part_m_ptr + base + ss, mask=s_ok, other=float("-inf"))
    l = tl.load(part_l_ptr + base + ss, mask=s_ok, other=0.0)
    big = tl.max(m, axis=0)  # finite: split 0 holds at least key 0
    w = tl.where(s_ok, tl.exp(m - big), 0.0)
    o = tl.load(part_o_ptr + (base + ss)[:, None] * head_dim + d[None, :], mask=s_ok[:, None] & d_ok[None, :],
                other=0.0)  # [BLOCK_S, BLOCK_D]
    out = tl.sum(w[:, None] * o, axis=0) / tl.sum(w * l, axis=0)
    tl.store(out_ptr + b * stride_ot + h * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d_ok)


_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Keys per split of the split-KV decode path (at least): contexts longer than this, in decode batches too small
# to give every SM a (sequence, kv head) program, are cut into spans that run side by side
SPLIT_TOKENS = 256
MAX_SPLITS = 64


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start: torch.Tensor,
    context_lens: torch.Tensor,
    max_query_len: int,
    scale: float,
    out: torch.Tensor | None = None,
    num_splits: int = 1,
    split_len: int = 0,
) -> torch.Tensor:
    """Launch the kernel. q: [T, Hq, D]; k_cache, v_cache: [N, bs, Hkv, D]; block_tables: [B, max_blocks] int32;
    query_start: [B+1] int32; context_lens: [B] int32  ->  out: [T, Hq, D] (written in place when given).

    num_splits > 1 (decode-only batches: max_query_len == 1, T == B) cuts each context into that many spans of
    `split_len` keys run by separate programs, then one reduce kernel merges them (split-KV decoding); the
    spans must cover every context (num_splits * split_len >= the longest). The caller picks both from static
    sizes (`decode_splits`), so a CUDA graph's launch shapes never change."""
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"paged_attention wants q [T, Hq, D] and k/v caches [N, bs, Hkv, D] of equal shape; got q "
            f"{tuple(q.shape)}, k {tuple(k_cache.shape)}, v {tuple(v_cache.shape)}"
        )
    t, hq, d = q.shape
    _, page, hkv, d_cache = k_cache.shape
    if d != d_cache or hq % hkv != 0:
        raise ValueError(f"head_dim {d} vs cache {d_cache}, or Hq={hq} not a multiple of Hkv={hkv}")
    if q.dtype not in _SUPPORTED_DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"q/k/v dtypes must match and be one of {_SUPPORTED_DTYPES}; got {q.dtype}, "
                         f"{k_cache.dtype}, {v_cache.dtype}")
    b = context_lens.shape[0]
    if query_start.shape != (b + 1,) or block_tables.dim() != 2 or block_tables.shape[0] != b:
        raise ValueError(f"query_start must be [B+1] and block_tables [B, max_blocks] for B={b}; got "
                         f"{tuple(query_start.shape)}, {tuple(block_tables.shape)}")
    for name, x in (("block_tables", block_tables), ("query_start", query_start), ("context_lens", context_lens)):
        if x.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be int32 or int64, got {x.dtype}")
    devices = {x.device for x in (q, k_cache, v_cache, block_tables, query_start, context_lens)}
    if len(devices) != 1:
        raise ValueError(f"all paged_attention inputs must be on one device, got {devices}")
    if q.stride(2) != 1 or k_cache.stride(3) != 1 or v_cache.stride(3) != 1 or block_tables.stride(1) != 1:
        raise ValueError("q, k_cache, v_cache (last dim) and block_tables (rows) must be contiguous")
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(2) != 1:
        raise ValueError(f"out must match q: shape {tuple(q.shape)}, dtype {q.dtype}, contiguous last dim")
    if t == 0:
        return out

    group = hq // hkv
    block_d = max(16, triton.next_power_of_2(d))
    dot_precision = "ieee" if q.dtype == torch.float32 else "tf32"
    if num_splits > 1:
        if max_query_len != 1 or t != b:
            raise ValueError(f"num_splits={num_splits} is for decode-only batches (one query per sequence), got "
                             f"{t} tokens for {b} sequences, max_query_len {max_query_len}")
        if split_len < 1:
            raise ValueError(f"num_splits={num_splits} needs split_len >= 1 keys per span, got {split_len}")
        part_o = torch.empty(b * hq * num_splits, d, dtype=torch.float32, device=q.device)
        part_m = torch.empty(b * hq * num_splits, dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        _paged_decode_split_kernel[(b, hkv, num_splits)](
            q, k_cache, v_cache, part_o, part_m, part_l, block_tables, context_lens, scale,
            q.stride(0), q.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            block_tables.stride(0), d, hq, split_len,
            PAGE=page, GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=32, BLOCK_D=block_d,
            NUM_SPLITS=num_splits, DOT_PRECISION=dot_precision,
        )
        _paged_decode_reduce_kernel[(b, hq)](
            part_o, part_m, part_l, out, out.stride(0), out.stride(1), d, hq,
            NUM_SPLITS=num_splits, BLOCK_S=max(2, triton.next_power_of_2(num_splits)), BLOCK_D=block_d,
        )
        return out
    block_m = 16 if max_query_len * group <= 16 else 64
    block_n = 32
    # fp32 tiles of 64 query rows over head_dim >= 64 hold more than 4 warps' registers (ptxas spills 1 to 38 KB
    # on sm_80/sm_90, `scripts/check_triton_compile.py`); 8 warps halve each thread's share
    num_warps = 8 if q.dtype == torch.float32 and block_m == 64 and block_d >= 64 else 4
    grid = (b, triton.cdiv(max_query_len * group, block_m), hkv)
    _paged_attention_kernel[grid](
        q, k_cache, v_cache, out, block_tables, query_start, context_lens, scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), d,
        PAGE=page, GROUP=group, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        DOT_PRECISION=dot_precision, num_warps=num_warps,
    )
    return out


def decode_splits(num_seqs: int, num_kv_heads: int, max_context_len: int, num_sms: int) -> tuple[int, int]:
    """(num_splits, split_len) for a decode-only step: (1, 0) when the (sequence, kv head) programs already give
    every SM one or the contexts are short, else up to `MAX_SPLITS` spans of at least `SPLIT_TOKENS` keys (a
    multiple of 32) that together cover `max_context_len`. Static sizes only (a CUDA graph passes its bucket and
    full table width), so the choice never changes in a captured step."""
    programs = num_seqs * num_kv_heads
    if programs >= num_sms or max_context_len <= SPLIT_TOKENS:
        return 1, 0
    splits = min(-(-max_context_len // SPLIT_TOKENS), MAX_SPLITS)
    split_len = -(-max_context_len // splits)
    return splits, -(-split_len // 32) * 32
