"""The small per-layer operations of a Llama-family block in pure torch: the CPU path and the oracle of their
fused Triton kernels (`loraledger.kernels.layer_ops`).

    rms_norm(x, w, eps)     y = w * (x / sqrt(mean(x^2, -1) + eps)), normalised in float32; in a 16-bit dtype
                            the normalised value is rounded to x's dtype before the weight multiplies it (HF order)
    add_rms_norm(x, r, w, eps)
                            h = x + r (in x's dtype: the residual stream); (rms_norm(h, w, eps), h)
    rotary(x, cos, sin)     x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])
    rope_and_cache(q, k, v, cos, sin, k_cache, v_cache, slot_mapping)
                            q <- rotary(q) in place; k_cache.flat[slot[t]] = rotary(k[t]); v_cache.flat[slot[t]] = v[t]
    silu_mul(gate, up)      silu(gate) * up (SwiGLU's gating)

Each is a handful of small kernels in torch (a 16-bit RMSNorm is four, RoPE of q and k plus the cache write
twelve); at decode sizes on a GPU those launches cost more than their bytes, hence the fused twins.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [..., D], weight: [D] -> [..., D]. float32 in and weight: one fused `F.rms_norm` call (same formula);
    otherwise normalise in float32, cast back to x's dtype, then scale by the weight (the HF order)."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    y = F.rms_norm(x.float(), weight.shape, None, eps)
    return weight * y.to(x.dtype)


def add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual: [..., D] -> (rms_norm(x + residual), x + residual): the residual add of a decoder block
    followed by the next norm."""
    h = x + residual
    return rms_norm_ref(h, weight, eps), h


def rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, H, D]; cos, sin: [T, 1, D] -> x * cos + rotate_half(x) * sin (non-interleaved layout)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def rope_and_cache_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> torch.Tensor:
    """q: [T, Hq, D], k, v: [T, Hkv, D], cos/sin: [T, 1, D], caches [N, bs, Hkv, D], slot_mapping [T] int64.

    Returns rotary(q); writes rotary(k) and v to the caches at the flat slots (one layer's cache)."""
    hkv, d = k_cache.shape[2], k_cache.shape[3]
    k_rot = rotary_ref(k, cos, sin)
    k_cache.view(-1, hkv, d).index_copy_(0, slot_mapping, k_rot.to(k_cache.dtype))
    v_cache.view(-1, hkv, d).index_copy_(0, slot_mapping, v.to(v_cache.dtype))
    return rotary_ref(q, cos, sin)


def silu_mul_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, elementwise (same shapes and dtype)."""
    return F.silu(gate) * up
