"""Paged attention in pure torch: the CPU path and the oracle for the Triton kernel (`loraledger.kernels.paged_attention`).

For a flat batch of B sequences (prefill chunks and decodes mixed), sequence b owns the query tokens
[query_start[b], query_start[b+1]) and `context_lens[b]` cached tokens (its chunk already written), stored in
blocks `block_tables[b, :]`. Query i of b sits at absolute position p = context_lens[b] - q_len[b] + i and sees
keys 0..p (causal within the chunk, everything in the cached prefix):

    out[t, h] = softmax_j( scale * q[t, h] . K_b[j, h // G] ; j <= p ) @ V_b[:, h // G]      G = Hq / Hkv
    K_b[j] = k_cache[block_tables[b, j // bs], j % bs]

Implementation: gather every sequence's blocks into padded [B, L, Hkv, D] (L = max context rounded up to blocks),
scatter the queries into padded [B, Mq, Hq, D], one masked `scaled_dot_product_attention` call, un-pad.
The index tensors and the mask depend only on the step's layout: `plan_paged_attention` builds them once per
step and every layer passes the same plan.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PagedAttentionPlan:
    """The per-step index tensors and mask of `paged_attention_ref`; they depend only on the batch layout, so
    one plan serves every layer of a step (`plan_paged_attention` once, then `paged_attention_ref(..., plan=)`).

        seq_of_token[t]   sequence b of flat token t                                   [T] int64
        idx_in_seq[t]     t - query_start[b], its row in the padded query block         [T] int64
        tables[b, j]      block_tables[b, :n_blocks] as int64 (n_blocks = ceil(max_context_len / bs))  [B, nb]
        mask[b, 0, i, j]  key j visible to query i of b: j < ctx[b] and j <= ctx[b] - q_len[b] + i     [B, 1, Mq, L]
        decode_only       every sequence has exactly one query token (T == B, Mq == 1): the flat q is already
                          the padded [B, 1, Hq, D] block, so the scatter / gather of query rows is skipped
    """

    seq_of_token: torch.Tensor
    idx_in_seq: torch.Tensor
    tables: torch.Tensor
    mask: torch.Tensor
    num_tokens: int
    block_size: int
    max_query_len: int
    decode_only: bool = False


def plan_paged_attention(
    block_tables: torch.Tensor,
    query_start: torch.Tensor,
    context_lens: torch.Tensor,
    num_tokens: int,
    max_query_len: int,
    max_context_len: int,
    block_size: int,
) -> PagedAttentionPlan:
    """block_tables: [B, max_blocks]; query_start: [B+1] (query_start[B] == num_tokens); context_lens: [B]
    ->  the plan (see `PagedAttentionPlan`). Host ints only: no device-to-host copy."""
    b = context_lens.shape[0]
    device = context_lens.device
    t = num_tokens
    q_lens = (query_start[1:] - query_start[:-1]).long()  # [B]
    seq_of_token = torch.repeat_interleave(torch.arange(b, device=device), q_lens, output_size=t)  # [T]
    idx_in_seq = torch.arange(t, device=device) - query_start[:-1].long()[seq_of_token]  # [T]

    n_blocks = -(-max_context_len // block_size)
    tables = block_tables[:, :n_blocks].long()  # [B, nb]

    ctx = context_lens.long()[:, None, None]  # [B, 1, 1]
    first_pos = ctx - q_lens[:, None, None]  # [B, 1, 1] absolute position of query 0
    qi = torch.arange(max_query_len, device=device)[None, :, None]  # [1, Mq, 1]
    kj = torch.arange(n_blocks * block_size, device=device)[None, None, :]  # [1, 1, L]
    mask = (kj < ctx) & (kj <= first_pos + qi)  # [B, Mq, L]; padded query rows still see key 0
    decode_only = max_query_len == 1 and t == b  # q_len[b] <= 1 and sum(q_len) == B  =>  every q_len[b] == 1
    return PagedAttentionPlan(
        seq_of_token, idx_in_seq, tables, mask[:, None], t, block_size, max_query_len, decode_only
    )


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start: torch.Tensor,
    context_lens: torch.Tensor,
    max_query_len: int,
    max_context_len: int,
    scale: float,
    plan: PagedAttentionPlan | None = None,
) -> torch.Tensor:
    """q: [T, Hq, D]; k_cache, v_cache: [N, bs, Hkv, D]; block_tables: [B, max_blocks]; query_start: [B+1];
    context_lens: [B]  ->  out: [T, Hq, D] (dtype of q).

    `plan`: the step's `plan_paged_attention(...)` of the same layout (built here when None)."""
    t, hq, d = q.shape
    _, bs, hkv, _ = k_cache.shape
    b = context_lens.shape[0]
    if plan is None:
        plan = plan_paged_attention(block_tables, query_start, context_lens, t, max_query_len, max_context_len, bs)
    assert plan.num_tokens == t and plan.block_size == bs, "attention plan built for another batch layout"
    seq_of_token, idx_in_seq = plan.seq_of_token, plan.idx_in_seq
    length = plan.tables.shape[1] * bs
    keys = k_cache[plan.tables].reshape(b, length, hkv, d).transpose(1, 2)  # [B, Hkv, L, D]
    values = v_cache[plan.tables].reshape(b, length, hkv, d).transpose(1, 2)  # [B, Hkv, L, D]

    if plan.decode_only:
        q_pad = q.reshape(b, 1, hq, d)  # [B, 1, Hq, D]: token b is sequence b's only query
    else:
        q_pad = q.new_zeros(b, plan.max_query_len, hq, d)  # [B, Mq, Hq, D]
        q_pad[seq_of_token, idx_in_seq] = q
    q_pad = q_pad.transpose(1, 2)  # [B, Hq, Mq, D]

    out = F.scaled_dot_product_attention(
        q_pad, keys.to(q.dtype), values.to(q.dtype), attn_mask=plan.mask, scale=scale, enable_gqa=hq != hkv
    )  # [B, Hq, Mq, D]
    if plan.decode_only:
        return out.transpose(1, 2).reshape(t, hq, d)  # [T, Hq, D]
    return out.transpose(1, 2)[seq_of_token, idx_in_seq]  # [T, Hq, D]


def paged_attention_loop(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """The same result computed token by token in float32 with an explicit softmax (slow; a test oracle)."""
    t, hq, d = q.shape
    bs, hkv = k_cache.shape[1], k_cache.shape[2]
    group = hq // hkv
    out = torch.zeros(t, hq, d, dtype=torch.float32, device=q.device)
    starts = query_start.tolist()
    for b, ctx in enumerate(context_lens.tolist()):
        q_len = starts[b + 1] - starts[b]
        slots = [int(block_tables[b, j // bs]) * bs + j % bs for j in range(ctx)]
        k = k_cache.reshape(-1, hkv, d)[slots].float()  # [ctx, Hkv, D]
        v = v_cache.reshape(-1, hkv, d)[slots].float()
        for i in range(q_len):
            pos = ctx - q_len + i
            for h in range(hq):
                scores = (k[: pos + 1, h // group] @ q[starts[b] + i, h].float()) * scale  # [pos+1]
                out[starts[b] + i, h] = torch.softmax(scores, dim=0) @ v[: pos + 1, h // group]
    return out.to(q.dtype)
