"""Attention backends over the paged KV cache, chosen by name through `get_attention_backend`.

Every backend computes, for the flat batch described by `BatchMetadata` (prefill chunks and decodes mixed):

    out[t, h] = softmax_j(scale * q[t, h] . K_b[j, h // G]; j <= pos[t]) @ V_b[:, h // G]      -> [T, Hq, D]

where b is the sequence of token t, K_b / V_b its cached keys/values (this step's already written) and
G = Hq / Hkv (grouped-query attention).

    "torch"   pure torch (`loraledger.kernels.paged_attention_ref`): gather blocks, one masked SDPA call; any device
    "triton"  the Triton kernel (`loraledger.kernels.paged_attention`); CUDA, or CPU under TRITON_INTERPRET=1 (tests)

Default (`name=None`): "triton" on CUDA when triton is importable, "torch" otherwise.
"""

from __future__ import annotations

import importlib.util
import weakref
from typing import Protocol

import torch
import torch.nn.functional as F

from loraledger.inference.batch import BatchMetadata
from loraledger.inference.errors import BackendError
from loraledger.kernels import default_backend
from loraledger.kernels.paged_attention_ref import (
    PagedAttentionPlan,
    paged_attention_ref,
    plan_paged_attention,
)

ATTENTION_BACKENDS: tuple[str, ...] = ("torch", "triton")


class AttentionBackend(Protocol):
    name: str

    def __call__(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: BatchMetadata, scale: float
    ) -> torch.Tensor:
        """q: [T, Hq, D]; k_cache, v_cache: [N, bs, Hkv, D]  ->  [T, Hq, D]."""
        ...


class TorchPagedAttention:
    """The reference backend; the CPU path.

    The gather indices and mask (`PagedAttentionPlan`) depend only on the step's layout, so the first layer
    of a step builds them and the later layers reuse them: the plan is kept for the last `BatchMetadata` seen
    (held by a weak reference, so a later step's batch can never pick up a stale plan).
    """

    name = "torch"

    def __init__(self) -> None:
        self._plan_batch: weakref.ref[BatchMetadata] | None = None
        self._plan: PagedAttentionPlan | None = None

    def plan(self, batch: BatchMetadata, block_size: int) -> PagedAttentionPlan:
        """The step's plan for `batch` (built on the first call for this batch and block size, then reused)."""
        plan = self._plan
        if (
            plan is None
            or self._plan_batch is None
            or self._plan_batch() is not batch
            or plan.block_size != block_size
        ):
            plan = plan_paged_attention(
                batch.block_tables, batch.query_start, batch.context_lens, batch.num_tokens,
                batch.max_query_len, batch.max_context_len, block_size,
            )
            self._plan, self._plan_batch = plan, weakref.ref(batch)
        return plan

    def __call__(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: BatchMetadata, scale: float
    ) -> torch.Tensor:
        plan = self.plan(batch, k_cache.shape[1])
        if plan.decode_only:
            return _decode_attention(q, k_cache, v_cache, plan, scale)
        return paged_attention_ref(
            q, k_cache, v_cache, batch.block_tables, batch.query_start, batch.context_lens,
            batch.max_query_len, batch.max_context_len, scale, plan=plan,
        )


def _decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: PagedAttentionPlan, scale: float
) -> torch.Tensor:
    """`paged_attention_ref` of a decode-only step (one query per sequence), the same values: the blocks are
    gathered with one `index_select` over the flattened block tables, which on the CPU costs a fraction of the
    advanced indexing `k_cache[tables]` (profiled at batch 16: a quarter of the time, 60 gathers per step)."""
    t, hq, d = q.shape
    _, bs, hkv, _ = k_cache.shape
    b, nb = plan.tables.shape
    flat = plan.tables.reshape(-1)
    keys = k_cache.index_select(0, flat).view(b, nb * bs, hkv, d).transpose(1, 2)  # [B, Hkv, L, D]
    values = v_cache.index_select(0, flat).view(b, nb * bs, hkv, d).transpose(1, 2)  # [B, Hkv, L, D]
    out = F.scaled_dot_product_attention(
        q.reshape(b, 1, hq, d).transpose(1, 2), keys.to(q.dtype), values.to(q.dtype), attn_mask=plan.mask,
        scale=scale, enable_gqa=hq != hkv,
    )  # [B, Hq, 1, D]
    return out.transpose(1, 2).reshape(t, hq, d)


class TritonPagedAttention:
    """The Triton kernel backend: one kernel for prefill chunks and decodes, and split-KV decoding (spans of
    each context run side by side, then merged) for decode steps with too few (sequence, kv head) programs to
    fill the GPU's SMs and contexts long enough to cut (`loraledger.kernels.paged_attention.decode_splits`).

    `num_sms`: the SM count that choice assumes (default: the device's; 1 on the CPU, i.e. never split)."""

    name = "triton"

    def __init__(self, num_sms: int | None = None) -> None:
        if importlib.util.find_spec("triton") is None:
            raise BackendError(
                "attention backend 'triton' needs the triton package (pip extra 'gpu'); use backend 'torch'"
            )
        from loraledger.kernels.paged_attention import decode_splits, paged_attention

        self._launch = paged_attention
        self._splits = decode_splits
        self._num_sms = num_sms

    def _sms(self, device: torch.device) -> int:
        if self._num_sms is None:
            cuda = device.type == "cuda"
            self._num_sms = torch.cuda.get_device_properties(device).multi_processor_count if cuda else 1
        return self._num_sms

    def __call__(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: BatchMetadata, scale: float
    ) -> torch.Tensor:
        splits, split_len = 1, 0
        if batch.is_decode_only:  # static sizes only: a captured step keeps its choice
            splits, split_len = self._splits(batch.num_seqs, k_cache.shape[2], batch.max_context_len,
                                             self._sms(q.device))
        return self._launch(  # the kernel takes q's row and head strides: a view of a fused q/k/v output is fine
            q if q.stride(2) == 1 else q.contiguous(), k_cache, v_cache, batch.block_tables, batch.query_start,
            batch.context_lens, batch.max_query_len, scale, num_splits=splits, split_len=split_len,
        )


def get_attention_backend(name: str | None = None, device: torch.device | str = "cpu") -> AttentionBackend:
    """"torch" | "triton" -> a backend; None picks triton on CUDA (when installed), torch elsewhere."""
    if name is None:
        name = default_backend(device)
    if name == "torch":
        return TorchPagedAttention()
    if name == "triton":
        return TritonPagedAttention()
    raise BackendError(f"unknown attention backend {name!r}; choose one of {', '.join(ATTENTION_BACKENDS)}")
