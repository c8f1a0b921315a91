"""Backends for the small per-layer operations of the runner (RMSNorm, residual add + RMSNorm, RoPE + KV-cache
write, SiLU gating), chosen by name through `get_layer_ops`:

    "torch"   the torch twins (`loraledger.kernels.layer_ops_ref`): any device, the CPU path
    "triton"  the fused kernels (`loraledger.kernels.layer_ops`): CUDA, or CPU under TRITON_INTERPRET=1 (tests)

Default (`name=None`): "triton" on CUDA when triton is importable, "torch" otherwise. Inputs the fused kernels do
not take (a norm weight in another dtype than its input, q, k, v, cos, sin of mixed dtypes) go to the torch twin.
"""

from __future__ import annotations

import importlib.util
from typing import Protocol

import torch

from loraledger.inference.errors import BackendError
from loraledger.kernels import default_backend
from loraledger.kernels import layer_ops_ref as ref

LAYER_OPS_BACKENDS: tuple[str, ...] = ("torch", "triton")


class LayerOps(Protocol):
    name: str

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x: [..., D], weight: [D] -> [..., D]."""
        ...

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(rms_norm(x + residual), x + residual)."""
        ...

    def rope_and_cache(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
        k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    ) -> torch.Tensor:
        """Rotated q [T, Hq, D]; rotated k and v written to one layer's caches at `slot_mapping`."""
        ...

    def silu_mul(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up."""
        ...


class TorchLayerOps:
    name = "torch"

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return ref.rms_norm_ref(x, weight, eps)

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return ref.add_rms_norm_ref(x, residual, weight, eps)

    def rope_and_cache(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
        k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    ) -> torch.Tensor:
        return ref.rope_and_cache_ref(q, k, v, cos, sin, k_cache, v_cache, slot_mapping)

    def silu_mul(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return ref.silu_mul_ref(gate, up)


class TritonLayerOps:
    name = "triton"

    def __init__(self) -> None:
        if importlib.util.find_spec("triton") is None:
            raise BackendError("layer ops backend 'triton' needs the triton package (pip extra 'gpu'); use 'torch'")
        from loraledger.kernels import layer_ops

        self._k = layer_ops

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if weight.dtype != x.dtype or x.stride(-1) != 1:
            return ref.rms_norm_ref(x, weight, eps)
        return self._k.rms_norm(x, weight, eps)

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if (weight.dtype != x.dtype or residual.dtype != x.dtype or x.stride(-1) != 1
                or residual.stride(-1) != 1 or residual.shape != x.shape):
            return ref.add_rms_norm_ref(x, residual, weight, eps)
        return self._k.add_rms_norm(x, residual, weight, eps)

    def rope_and_cache(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
        k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    ) -> torch.Tensor:
        if cos.dtype != q.dtype or sin.dtype != q.dtype or k.dtype != q.dtype or v.dtype != q.dtype:
            return ref.rope_and_cache_ref(q, k, v, cos, sin, k_cache, v_cache, slot_mapping)
        return self._k.rope_and_cache(q, k, v, cos, sin, k_cache, v_cache, slot_mapping)

    def silu_mul(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if gate.stride(-1) != 1 or up.stride(-1) != 1 or gate.dtype != up.dtype:
            return ref.silu_mul_ref(gate, up)
        return self._k.silu_mul(gate, up)


def get_layer_ops(name: str | None = None, device: torch.device | str = "cpu") -> LayerOps:
    """"torch" | "triton" -> a backend; None picks triton on CUDA (when installed), torch elsewhere."""
    if name is None:
        name = default_backend(device)
    if name == "torch":
        return TorchLayerOps()
    if name == "triton":
        return TritonLayerOps()
    raise BackendError(f"unknown layer ops backend {name!r}; choose one of {', '.join(LAYER_OPS_BACKENDS)}")
