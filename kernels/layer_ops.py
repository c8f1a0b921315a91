"""Fused Triton kernels for the small per-layer operations of a Llama-family block (decode at batch 1 to 32 on
a GPU launches more of these than GEMMs). Semantics, rounding included, are those of the torch twins in
`loraledger.kernels.layer_ops_ref`:

    rms_norm        one program per row: sum of squares in float32, y = x * rsqrt(mean + eps), in a 16-bit
                    dtype y is rounded to it before the weight multiplies (4 torch kernels -> 1)
    add_rms_norm    the residual add (rounded to the dtype, stored) and the next RMSNorm in one program per row
                    (5 -> 1)
    rope_and_cache  one program per (token, head) over q heads then kv heads: rotate q in place; rotate k and
                    write it, and v, to the cache slot of the token (10 + 2 torch kernels -> 1)
    silu_mul        silu(gate) rounded to the dtype, times up (2 -> 1)

Every intermediate that torch rounds to the tensor dtype is rounded here too (a no-op in float32), so in 16-bit
dtypes the kernels give torch's values up to the order of float32 sums. On CPU run with TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _rms_norm_kernel(x_ptr, r_ptr, w_ptr, out_ptr, h_ptr, n_cols, stride_x, stride_r, stride_o, stride_h, eps,
                     BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ROUND_BEFORE_WEIGHT: tl.constexpr):
    """One row: out = rms_norm(h) * w with h = x, or with HAS_RESIDUAL h = x + r (stored at h_ptr)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        h = (x + r).to(h_ptr.dtype.element_ty)  # the residual stream keeps the model's dtype, as torch's add does
        tl.store(h_ptr + row * stride_h + cols, h, mask=mask)
        x = h.to(tl.float32)
    var = tl.sum(x * x, axis=0) / n_cols
    y = x * (1.0 / tl.sqrt(var + eps))
    if ROUND_BEFORE_WEIGHT:
        y = y.to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (y * w).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_cache_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, slot_ptr,
                       stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ct,
                       stride_cs, stride_ch,
                       HQ: tl.constexpr, HALF: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    d = tl.arange(0, BLOCK)
    dm = d < HALF
    cos_row = cos_ptr + t * stride_ct
    sin_row = sin_ptr + t * stride_ct
    c1 = tl.load(cos_row + d, mask=dm, other=0.0).to(tl.float32)
    c2 = tl.load(cos_row + HALF + d, mask=dm, other=0.0).to(tl.float32)
    s1 = tl.load(sin_row + d, mask=dm, other=0.0).to(tl.float32)
    s2 = tl.load(sin_row + HALF + d, mask=dm, other=0.0).to(tl.float32)
    if h < HQ:
        base = q_ptr + t * stride_qt + h * stride_qh
        x1 = tl.load(base + d, mask=dm, other=0.0).to(tl.float32)
        x2 = tl.load(base + HALF + d, mask=dm, other=0.0).to(tl.float32)
        qt = q_ptr.dtype.element_ty  # each product and the sum rounded to the dtype, as torch does
        o1 = (x1 * c1).to(qt).to(tl.float32) - (x2 * s1).to(qt).to(tl.float32)
        o2 = (x2 * c2).to(qt).to(tl.float32) + (x1 * s2).to(qt).to(tl.float32)
        tl.store(base + d, o1.to(qt), mask=dm)
        tl.store(base + HALF + d, o2.to(qt), mask=dm)
    else:
        kh = h - HQ
        slot = tl.load(slot_ptr + t).to(tl.int64)
        kbase = k_ptr + t * stride_kt + kh * stride_kh
        x1 = tl.load(kbase + d, mask=dm, other=0.0).to(tl.float32)
        x2 = tl.load(kbase + HALF + d, mask=dm, other=0.0).to(tl.float32)
        kt = k_ptr.dtype.element_ty
        o1 = (x1 * c1).to(kt).to(tl.float32) - (x2 * s1).to(kt).to(tl.float32)
        o2 = (x2 * c2).to(kt).to(tl.float32) + (x1 * s2).to(kt).to(tl.float32)
        cbase = slot * stride_cs + kh * stride_ch
        tl.store(kc_ptr + cbase + d, o1.to(kt).to(kc_ptr.dtype.element_ty), mask=dm)
        tl.store(kc_ptr + cbase + HALF + d, o2.to(kt).to(kc_ptr.dtype.element_ty), mask=dm)
        vbase = v_ptr + t * stride_vt + kh * stride_vh
        v1 = tl.load(vbase + d, mask=dm, other=0.0)
        v2 = tl.load(vbase + HALF + d, mask=dm, other=0.0)
        tl.store(vc_ptr + cbase + d, v1.to(vc_ptr.dtype.element_ty), mask=dm)
        tl.store(vc_ptr + cbase + HALF + d, v2.to(vc_ptr.dtype.element_ty), mask=dm)


@triton.jit
def _silu_mul_kernel(g_ptr, u_ptr, o_ptr, n_cols, stride_g, stride_u, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(g_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    s = (g / (1.0 + tl.exp(-g))).to(o_ptr.dtype.element_ty).to(tl.float32)
    tl.store(o_ptr + row * stride_o + cols, (s * u).to(o_ptr.dtype.element_ty), mask=mask)


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [..., D] with contiguous rows, weight: [D] of x's dtype -> [..., D] (see `layer_ops_ref.rms_norm_ref`)."""
    return _norm(x, None, weight, eps)[0]


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) in one pass; x, residual: [..., D] of one shape and dtype with
    contiguous rows, weight: [D] of that dtype (see `layer_ops_ref.add_rms_norm_ref`)."""
    h, out = _norm(x, residual, weight, eps)
    assert out is not None
    return h, out


def _norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The launcher of both norms: (rms_norm(h) * weight, h or None), h = x (+ residual)."""
    d = x.shape[-1]
    if residual is not None:
        _need(residual.shape == x.shape and residual.dtype == x.dtype, f"residual {tuple(residual.shape)} "
              f"{residual.dtype} must match x {tuple(x.shape)} {x.dtype}")
        _need(residual.device == x.device, "x and residual must share one device")
    _need(x.dtype in _DTYPES and weight.dtype == x.dtype, f"rms_norm wants x in {_DTYPES} and a weight of the same "
          f"dtype, got {x.dtype} and {weight.dtype}")
    _need(weight.shape == (d,) and weight.is_contiguous(), f"weight must be [{d}] contiguous, got {tuple(weight.shape)}")
    _need(x.device == weight.device, f"x on {x.device}, weight on {weight.device}")
    _need(d <= 65536, f"rms_norm rows of {d} values are over the kernel's 65536")
    x2 = x.reshape(-1, d)
    r2 = residual.reshape(-1, d) if residual is not None else x2
    _need(x2.stride(-1) == 1 and r2.stride(-1) == 1, "x (and residual) rows must be contiguous")
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    h = torch.empty(x2.shape, dtype=x.dtype, device=x.device) if residual is not None else out
    rows = x2.shape[0]
    if rows:
        block = triton.next_power_of_2(d)
        _rms_norm_kernel[(rows,)](
            x2, r2, weight, out, h, d, x2.stride(0), r2.stride(0), out.stride(0), h.stride(0), eps,
            BLOCK=block, HAS_RESIDUAL=residual is not None, ROUND_BEFORE_WEIGHT=x.dtype != torch.float32,
            num_warps=4 if block <= 1024 else (8 if block <= 4096 else 16),
        )
    return out.view(x.shape), (h.view(x.shape) if residual is not None else None)


def rope_and_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> torch.Tensor:
    """Rotate q in place and write rotated k and v to the caches; returns q. Shapes as `rope_and_cache_ref`:
    q [T, Hq, D], k, v [T, Hkv, D] (last dim contiguous), cos, sin [T, 1, D], caches [N, bs, Hkv, D]."""
    t, hq, d = q.shape
    _need(k.dim() == 3 and k.shape[0] == t and k.shape[2] == d and v.shape == k.shape,
          f"k and v must be [T, Hkv, D] like q {tuple(q.shape)}, got {tuple(k.shape)}, {tuple(v.shape)}")
    hkv = k.shape[1]
    _need(k_cache.dim() == 4 and k_cache.shape[2:] == (hkv, d) and v_cache.shape == k_cache.shape,
          f"caches must be [N, bs, {hkv}, {d}], got {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    _need(d % 2 == 0, f"head_dim {d} must be even for rotary embeddings")
    _need(cos.shape == (t, 1, d) and sin.shape == cos.shape, f"cos/sin must be [{t}, 1, {d}], got {tuple(cos.shape)}")
    _need(q.dtype in _DTYPES and k.dtype == q.dtype and v.dtype == q.dtype and cos.dtype == q.dtype
          and sin.dtype == q.dtype, "q, k, v, cos and sin must share one float dtype")
    _need(slot_mapping.shape == (t,) and slot_mapping.dtype in (torch.int32, torch.int64), "slot_mapping must be [T] int")
    for name, x in (("q", q), ("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        _need(x.stride(-1) == 1, f"{name} must be contiguous in its last dim")
    _need(cos.stride(2) == 1 and sin.stride() == cos.stride(), "cos and sin must be laid out alike, last dim contiguous")
    _need(k_cache.stride() == v_cache.stride() and k_cache.is_contiguous(), "the caches must be contiguous and alike")
    _need(len({q.device, k.device, v.device, cos.device, k_cache.device, slot_mapping.device}) == 1,
          "rope_and_cache inputs must share one device")
    if t:
        half = d // 2
        _rope_cache_kernel[(t, hq + hkv)](
            q, k, v, cos, sin, k_cache, v_cache, slot_mapping,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
            k_cache.stride(1), k_cache.stride(2),
            HQ=hq, HALF=half, BLOCK=max(16, triton.next_power_of_2(half)),
        )
    return q


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up -> a new contiguous tensor. gate, up: [..., N] of one shape and dtype whose rows are
    contiguous (column views of a fused gate/up output are fine)."""
    _need(gate.shape == up.shape and gate.dtype == up.dtype and gate.dtype in _DTYPES,
          f"silu_mul wants gate and up of one shape and float dtype, got {tuple(gate.shape)} {gate.dtype}, "
          f"{tuple(up.shape)} {up.dtype}")
    _need(gate.device == up.device, "gate and up must be on one device")
    n = gate.shape[-1] if gate.dim() else 1
    g2, u2 = gate.reshape(-1, n), up.reshape(-1, n)
    _need(g2.stride(-1) == 1 and u2.stride(-1) == 1, "gate and up rows must be contiguous")
    out = torch.empty(g2.shape, dtype=gate.dtype, device=gate.device)
    if out.numel():
        block = min(1024, triton.next_power_of_2(n))
        _silu_mul_kernel[(g2.shape[0], triton.cdiv(n, block))](
            g2, u2, out, n, g2.stride(0), u2.stride(0), out.stride(0), BLOCK=block,
        )
    return out.view(gate.shape)
