"""Input checks and tile choices shared by the BGMV and SGMV launchers (no triton import: cheap to test)."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def rank_block(max_rank: int) -> int:
    """Rank tile: the next power of two >= max_rank, at least 16 (tl.dot's minimum), at most 64."""
    p = 16
    while p < max_rank and p < 64:
        p *= 2
    return p


def check_shrink_inputs(x: torch.Tensor, A: torch.Tensor, slots: torch.Tensor, ranks: torch.Tensor) -> None:
    """x [T, in] float, A [S, in, R] same dtype and device, slots [T] int32, ranks [S] int32."""
    _need(x.dim() == 2, f"x must be [T, in], got shape {tuple(x.shape)}")
    _need(A.dim() == 3, f"A must be [num_slots, in, max_rank], got shape {tuple(A.shape)}")
    _need(x.dtype in FLOAT_DTYPES, f"x dtype {x.dtype} unsupported; use fp16, bf16 or fp32")
    _need(A.dtype == x.dtype, f"A dtype {A.dtype} differs from x dtype {x.dtype}; cast the slot weights")
    _need(A.shape[1] == x.shape[1], f"A in-features {A.shape[1]} != x features {x.shape[1]}")
    _check_index(slots, x.shape[0], "slots", x.device)
    _check_index(ranks, A.shape[0], "ranks", x.device)
    _need(A.device == x.device, f"A on {A.device} but x on {x.device}")


def check_expand_inputs(
    out: torch.Tensor, y: torch.Tensor, B: torch.Tensor, slots: torch.Tensor, scales: torch.Tensor, ranks: torch.Tensor
) -> None:
    """out [T, N], y [T, R] float32, B [S, R, N] float, slots [T] int32, scales [T] float32, ranks [S] int32."""
    _need(out.dim() == 2 and y.dim() == 2, f"out and y must be 2-D, got {tuple(out.shape)}, {tuple(y.shape)}")
    _need(B.dim() == 3, f"B must be [num_slots, max_rank, out], got shape {tuple(B.shape)}")
    _need(y.dtype == torch.float32, f"y must be float32 (the shrink output), got {y.dtype}")
    _need(out.dtype in FLOAT_DTYPES and B.dtype in FLOAT_DTYPES, f"unsupported dtypes out {out.dtype}, B {B.dtype}")
    _need(y.shape[0] == out.shape[0], f"y has {y.shape[0]} tokens, out has {out.shape[0]}")
    _need(B.shape[1] == y.shape[1], f"B rank dim {B.shape[1]} != y rank dim {y.shape[1]}")
    _need(B.shape[2] == out.shape[1], f"B out-features {B.shape[2]} != out features {out.shape[1]}")
    _check_index(slots, out.shape[0], "slots", out.device)
    _check_index(ranks, B.shape[0], "ranks", out.device)
    _need(scales.shape == (out.shape[0],) and scales.dtype == torch.float32, "scales must be [T] float32")
    _need(len({out.device, y.device, B.device, scales.device}) == 1, "out, y, B and scales must share a device")


def _check_index(t: torch.Tensor, n: int, name: str, device: torch.device) -> None:
    _need(t.shape == (n,), f"{name} must have shape [{n}], got {tuple(t.shape)}")
    _need(t.dtype == torch.int32, f"{name} must be int32, got {t.dtype}")
    _need(t.device == device, f"{name} on {t.device}, expected {device}")
    _need(t.is_contiguous(), f"{name} must be contiguous")


def check_segments(seg_starts: torch.Tensor, seg_lens: torch.Tensor, seg_slots: torch.Tensor, device: torch.device) -> None:
    """Three [G] int32 tensors on `device`."""
    g = seg_starts.shape[0] if seg_starts.dim() == 1 else -1
    for name, s in (("seg_starts", seg_starts), ("seg_lens", seg_lens), ("seg_slots", seg_slots)):
        _check_index(s, g, name, device)
