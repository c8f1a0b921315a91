"""One GEMM for the projections that read the same input: q, k, v of attention; gate and up of the MLP.

    fused = FusedLinear([q_proj, k_proj, v_proj])      # their weights concatenated into one [sum(out_i), in]
    q, k, v = fused(modules, x, batch)                 # x @ W.T (+ b), split into column views [T, out_i]

After fusion each projection's own weight (and bias) is a view of the concatenated matrix, so no byte is stored
twice and checkpoint names (and `LlamaModel.named_linears()`) stay as they were. At decode sizes on a GPU, three
or two small GEMMs become one larger one that reads the same bytes with fewer launches.

The hook of `loraledger.inference.model` still works: a projection replaced by a batch-aware layer over the same base that
can add its own term to a slice of the output (`add_delta(out, x, batch)`, e.g. `LoRALinear`) is served by the
fused GEMM plus its delta; any other replacement makes `usable` false and the group runs one projection at a time.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from loraledger.inference.batch import BatchMetadata


class FusedLinear:
    """The concatenated weight of several `nn.Linear`s of one input (a plain object: not in the state dict)."""

    def __init__(self, linears: Sequence[nn.Linear]) -> None:
        if not linears or not all(type(m) is nn.Linear for m in linears):
            raise TypeError("FusedLinear takes plain nn.Linear projections (not quantized or wrapped ones)")
        first = linears[0].weight
        if any(m.in_features != linears[0].in_features or m.weight.dtype != first.dtype
               or m.weight.device != first.device for m in linears):
            raise ValueError("fused projections must share in_features, dtype and device")
        with_bias = [m.bias is not None for m in linears]
        if any(with_bias) and not all(with_bias):
            raise ValueError("fused projections must all have a bias or all have none")
        self.sizes = [m.out_features for m in linears]
        self.weight = torch.cat([m.weight.detach() for m in linears], dim=0)  # [sum(out), in]
        self.bias = torch.cat([m.bias.detach() for m in linears]) if all(with_bias) else None  # type: ignore[misc]
        start = 0
        for m, n in zip(linears, self.sizes, strict=True):  # each projection now views its rows
            m.weight = nn.Parameter(self.weight[start : start + n], requires_grad=False)
            if self.bias is not None:
                m.bias = nn.Parameter(self.bias[start : start + n], requires_grad=False)
            start += n
        self.bases = tuple(linears)
        # the views handed out, and where each must start: a weight replaced or re-stored disables fusion
        self._params = tuple((m.weight, m.bias) for m in linears)
        self._ptrs = tuple(m.weight.data_ptr() for m in linears)

    def usable(self, modules: Sequence[nn.Module]) -> bool:
        """True if every module is its original projection, or a delta layer (`add_delta`) over it, and every
        projection still holds the view of the fused matrix it was given (identity and address checks, a few
        hundred nanoseconds per group and step)."""
        for m, base, (w, b), ptr in zip(modules, self.bases, self._params, self._ptrs, strict=True):
            if m is not base and not (getattr(m, "base", None) is base and hasattr(m, "add_delta")):
                return False
            if base.weight is not w or base.bias is not b or w.data_ptr() != ptr:
                return False
        return True

    def __deepcopy__(self, memo: dict[int, object]) -> FusedLinear:
        """A deep copy fuses the copied projections anew (a copied Parameter gets storage of its own)."""
        return FusedLinear([copy.deepcopy(m, memo) for m in self.bases])

    def __call__(self, modules: Sequence[nn.Module], x: torch.Tensor, batch: BatchMetadata) -> list[torch.Tensor]:
        """x: [T, in] -> one [T, out_i] column view per projection (their deltas added in place)."""
        out = F.linear(x, self.weight, self.bias)  # [T, sum(out)]
        parts = list(out.split(self.sizes, dim=-1))
        for m, base, part in zip(modules, self.bases, parts, strict=True):
            if m is not base:
                m.add_delta(part, x, batch)  # type: ignore[operator]
        return parts
