"""Batch-aware LoRA layers: a base projection plus per-slot stacked adapter weights, applied per token.

    LoRALinear(x [T, in], batch) = base(x) + sum_m scale[t, m] * (x[t] @ A[s] @ B[s]),  s = slots[t, m] >= 0

with A: [S, in, R], B: [S, R, out] (B already multiplied by the adapter's alpha/r scaling) and ranks [S].
The step's `BatchMetadata.token_adapter_slots/scales` (and its host copy `adapter_runs`) are turned into
`loraledger.inference.lora.plan.LoRAIndices` once per step by the shared `LoRAContext` (not once per layer),
then each layer calls the add-LoRA backend (`loraledger.inference.lora.backend`); on the torch path the
per-rank plans (`LoRAIndices.plan`) are memoized per step as well.

`apply_lora(model, num_slots, max_rank)` wraps the projections of an `loraledger.inference.model.LlamaModel` (through its
`named_linears()` / `set_linear()` hook) and returns the `LoRASlots` the adapter store fills.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from loraledger.inference.batch import BatchMetadata
from loraledger.inference.errors import AdapterFormatError
from loraledger.inference.lora.adapter import LORA_MODULES, LoRAAdapter
from loraledger.inference.lora.backend import get_add_lora
from loraledger.inference.lora.plan import LoRAIndices, build_lora_indices, static_lora_indices
from loraledger.kernels import default_backend, to_device


class LoRAContext:
    """State shared by every LoRA layer of one model: slot count, max rank, kernel backend, the step's indices."""

    def __init__(self, num_slots: int, max_rank: int, backend: str) -> None:
        if num_slots <= 0 or max_rank <= 0:
            raise ValueError(f"num_slots ({num_slots}) and max_rank ({max_rank}) must be positive")
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.backend = backend
        self.add_lora = get_add_lora(backend)
        self._batch: BatchMetadata | None = None
        self._indices: LoRAIndices | None = None

    def set_backend(self, backend: str) -> None:
        """Switch every LoRA layer of the model to kernel backend `backend` ("torch" | "triton")."""
        self.add_lora = get_add_lora(backend)  # raises on an unknown name, changing nothing
        self.backend = backend
        self._batch, self._indices = None, None

    def indices_for(self, batch: BatchMetadata) -> LoRAIndices:
        """The step's indices, built on the first layer's call and reused by the others (keyed by the batch).

        A static step (`batch.static`) on the triton backend gets `static_lora_indices` (no host reads, every
        column kept: what a CUDA graph can replay); on the torch backend it is planned from its host runs."""
        if batch is not self._batch or self._indices is None:
            if batch.static and self.backend == "triton":  # a CUDA-graph step: indices from tensors only
                self._indices = static_lora_indices(batch.token_adapter_slots, batch.token_adapter_scales)
                self._batch = batch
                return self._indices
            self._indices = build_lora_indices(
                batch.token_adapter_slots, batch.token_adapter_scales, self.num_slots, batch.is_decode_only,
                runs=batch.adapter_runs,
            )
            self._batch = batch
        return self._indices


class LoRALinear(nn.Module):
    """A projection plus `num_slots` adapter slots; `takes_batch` tells the model runner to pass the batch."""

    takes_batch = True
    lora_A: torch.Tensor  # [S, in, R] buffers, registered in __init__
    lora_B: torch.Tensor  # [S, R, out]
    ranks: torch.Tensor  # [S] int32

    def __init__(self, base: nn.Module, context: LoRAContext, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        in_f, out_f = base.in_features, base.out_features  # nn.Linear, bnb Linear4bit, ... all carry these
        if not isinstance(in_f, int) or not isinstance(out_f, int):
            raise TypeError(f"cannot wrap {type(base).__name__}: it has no integer in_features/out_features")
        weight = getattr(base, "weight", None)
        if dtype is None:
            if weight is None or not weight.is_floating_point():
                raise ValueError("cannot infer the LoRA dtype from a quantized base layer; pass dtype=")
            dtype = weight.dtype
        device = weight.device if weight is not None else torch.device("cpu")
        self.base = base
        self.context = context
        self.in_features, self.out_features = in_f, out_f
        s, r = context.num_slots, context.max_rank
        self.register_buffer("lora_A", torch.zeros(s, in_f, r, dtype=dtype, device=device), persistent=False)
        self.register_buffer("lora_B", torch.zeros(s, r, out_f, dtype=dtype, device=device), persistent=False)
        self.register_buffer("ranks", torch.zeros(s, dtype=torch.int32, device=device), persistent=False)
        self.ranks_host: list[int] = [0] * s

    def set_slot(self, slot: int, A: torch.Tensor, B: torch.Tensor, scale: float = 1.0, *,
                 device_rank: bool = True) -> None:
        """Fill `slot` with A: [in, r], B: [r, out]; stores B * scale (no pass over B at scale 1, as adapters
        come: `LoRAModuleWeights.B` is scaled); zero-pads ranks up to max_rank. `device_rank=False` leaves the
        device copy of the rank to the caller (`LoRASlots.load` writes all layers' in one copy).

        Copies are non-blocking (from pinned memory they overlap with compute on the current stream).
        """
        self._check_slot(slot)
        r = int(A.shape[1]) if A.dim() == 2 else -1
        if A.shape != (self.in_features, r) or B.shape != (r, self.out_features):
            raise AdapterFormatError(
                f"LoRA weights A {tuple(A.shape)}, B {tuple(B.shape)} do not fit this projection "
                f"({self.in_features} -> {self.out_features}); expected [in, r] and [r, out]"
            )
        if r > self.context.max_rank:
            raise AdapterFormatError(f"rank {r} is over this model's max_rank {self.context.max_rank}")
        self.lora_A[slot, :, :r].copy_(A, non_blocking=True)
        self.lora_B[slot, :r, :].copy_(B, non_blocking=True)
        if scale != 1.0:
            self.lora_B[slot, :r, :].mul_(scale)
        if r < self.context.max_rank:  # a full-rank adapter has no padding (each op is a launch on CUDA)
            self.lora_A[slot, :, r:].zero_()
            self.lora_B[slot, r:, :].zero_()
        if device_rank:
            self.ranks[slot] = r
        self.ranks_host[slot] = r

    def clear_slot(self, slot: int) -> None:
        """Empty `slot`: rank 0 (the kernels skip it) and zeroed weights."""
        self._check_slot(slot)
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        self.ranks[slot] = 0
        self.ranks_host[slot] = 0

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.context.num_slots:
            raise IndexError(f"slot {slot} outside [0, {self.context.num_slots})")

    def forward(self, x: torch.Tensor, batch: BatchMetadata | None = None) -> torch.Tensor:
        """x: [T, in] -> [T, out] = base(x) + the LoRA of each token's slots (none when batch is None)."""
        out = self.base(x)
        if batch is None:
            return out
        return self.add_delta(out, x, batch)

    def add_delta(self, out: torch.Tensor, x: torch.Tensor, batch: BatchMetadata) -> torch.Tensor:
        """out += the LoRA of each token's slots, in place; returns out. out: [T, out] (may be a column view of a
        fused q/k/v or gate/up output, `loraledger.inference.fused_linear`), x: [T, in]."""
        indices = self.context.indices_for(batch)
        if not indices.active:
            return out
        x2 = x.reshape(-1, self.in_features)
        out2 = out if out.dim() == 2 else out.view(-1, self.out_features)  # a view: the adds land in out
        if x2.dtype != self.lora_A.dtype:
            x2 = x2.to(self.lora_A.dtype)
        self.context.add_lora(out2, x2, self.lora_A, self.lora_B, self.ranks_host, indices, self.ranks)
        return out

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, slots={self.context.num_slots}, "
                f"max_rank={self.context.max_rank}, backend={self.context.backend}")


class LoRASlots:
    """The LoRA layers of one model by projection name; fills and clears whole adapters in slots.

    Every layer's device `ranks` is a row of one [layers, slots] tensor, so that a fill writes the ranks of all
    layers with one copy instead of one launch per layer."""

    def __init__(self, context: LoRAContext, layers: dict[str, LoRALinear]) -> None:
        self.context = context
        self.layers = layers
        self._ranks: torch.Tensor | None = None
        if layers:
            self._ranks = torch.stack([layer.ranks for layer in layers.values()])
            for i, layer in enumerate(layers.values()):
                layer.ranks = self._ranks[i]  # the registered buffer, now a view (same values)

    def _ranks_shared(self) -> bool:
        """Each layer's ranks is still its row of `_ranks` (a `module.to()` would have replaced them)."""
        rows = self._ranks
        return rows is not None and all(
            layer.ranks.data_ptr() == rows[i].data_ptr() for i, layer in enumerate(self.layers.values())
        )

    @property
    def num_slots(self) -> int:
        return self.context.num_slots

    def load(self, slot: int, adapter: LoRAAdapter) -> None:
        """Write every module of `adapter` into `slot`; modules it does not adapt get rank 0 there.

        Raises AdapterFormatError (slot left empty) if the adapter names a module this model did not wrap.
        """
        unknown = sorted(set(adapter.modules) - set(self.layers))
        if unknown:
            raise AdapterFormatError(
                f"adapter {adapter.path} adapts {unknown[:3]} which this model has no LoRA layer for; "
                "widen apply_lora(targets=...)"
            )
        shared = self._ranks_shared()
        try:
            for name, layer in self.layers.items():
                w = adapter.modules.get(name)
                if w is None:
                    layer.clear_slot(slot)
                else:
                    layer.set_slot(slot, w.A, w.B, device_rank=not shared)  # B carries its scaling
            if shared and self._ranks is not None:
                ranks = [layer.ranks_host[slot] for layer in self.layers.values()]
                self._ranks[:, slot] = to_device(ranks, torch.int32, self._ranks.device)
        except BaseException:
            self.clear(slot)  # never leave a half-written slot behind
            raise

    def clear(self, slot: int) -> None:
        for layer in self.layers.values():
            layer.clear_slot(slot)

    def slot_nbytes(self) -> int:
        """Bytes of one slot across all layers (A and B of every wrapped projection)."""
        return sum((layer.lora_A[0].nbytes + layer.lora_B[0].nbytes) for layer in self.layers.values())


def slot_nbytes(named_shapes: Iterable[tuple[int, int]], max_rank: int, dtype: torch.dtype) -> int:
    """Bytes one adapter slot takes: sum over projections (in, out) of (in + out) * max_rank * itemsize."""
    item = torch.empty(0, dtype=dtype).element_size()
    return sum((i + o) * max_rank * item for i, o in named_shapes)


def apply_lora(
    model: nn.Module,
    num_slots: int,
    max_rank: int,
    targets: Iterable[str] = LORA_MODULES,
    backend: str | None = None,
    dtype: torch.dtype | None = None,
) -> LoRASlots:
    """Wrap each projection of `model` whose last name part is in `targets` with a `LoRALinear`.

    `model` exposes `named_linears() -> {name: module}` and `set_linear(name, module)` (loraledger.inference.model).
    `backend`: "torch" | "triton" | None (triton on CUDA, torch elsewhere). Idempotence is refused: wrapping an
    already wrapped model raises ValueError.
    """
    wanted = set(targets)
    bad = wanted - set(LORA_MODULES)
    if bad:
        raise ValueError(f"unknown LoRA targets {sorted(bad)}; choose from {', '.join(LORA_MODULES)}")
    named: dict[str, nn.Module] = model.named_linears()  # type: ignore[operator]
    if any(isinstance(m, LoRALinear) for m in named.values()):
        raise ValueError("this model already has LoRA layers; call apply_lora once per model")
    device = next(model.parameters()).device
    context = LoRAContext(num_slots, max_rank, backend or default_backend(device))
    layers: dict[str, LoRALinear] = {}
    for name, module in named.items():
        if name.rsplit(".", 1)[-1] not in wanted:
            continue
        layer = LoRALinear(module, context, dtype=dtype)
        model.set_linear(name, layer)  # type: ignore[operator]
        layers[name] = layer
    return LoRASlots(context, layers)
