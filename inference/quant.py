"""QLoRA serving: the base projections in 4-bit NF4 through bitsandbytes, adapters kept in the compute dtype.

    quantize_nf4(model, compute_dtype)    every projection of `model.named_linears()` (q, k, v, o, gate, up,
                                          down) -> `bnb.nn.Linear4bit(quant_type="nf4")`; embeddings, norms and
                                          lm_head stay in the model's dtype
    load_model_quantized(dir, "nf4", ...) load on the CPU, quantize projection by projection onto `device`
                                          (the full-precision model never sits on the GPU), move the rest

NF4 per projection, W: [out, in] in the load dtype, split in blocks of 64 consecutive values (blocksize):

    absmax[b] = max |W[block b]|                                  # [out*in/64] float32
    code[i]   = argmin_q |W[i] / absmax[b(i)] - NF4[q]|,  q in 0..15  (16 normal-quantile levels in [-1, 1])
    weight    = code packed two per byte                          # [out*in/2, 1] uint8
    y = x @ (NF4[code] * absmax).T + bias                         # dequantized in `compute_dtype` per call

With `double_quant` the absmax themselves are quantized to 8 bits in blocks of 256 (QLoRA's double quantization,
~0.37 fewer bits per weight). The default (off) matches `transformers.BitsAndBytesConfig`'s default and
`loraledger train --method qlora`, so a base quantized here is bit-identical to the one peft trained over.

Quantization is triggered, as in bitsandbytes, by moving a not yet quantized `Params4bit` to a real device
(`.to("cpu")` or `.to("cuda")`): bitsandbytes >= 0.45 quantizes on the CPU as well as on CUDA.

LoRA over the quantized base: call `apply_lora(model, ..., dtype=model.dtype)` *after* `quantize_nf4`; each
`LoRALinear` wraps the `Linear4bit` unchanged (its weight is uint8, hence the explicit LoRA dtype). The base
cannot be quantized once LoRA layers are in place (a `QuantizationError` says so).
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from loraledger.inference.attention import AttentionBackend
from loraledger.inference.config import parse_dtype
from loraledger.inference.errors import QuantizationError
from loraledger.inference.loader import load_model
from loraledger.inference.model import LlamaModel

QUANTIZE_MODES: tuple[str, ...] = ("none", "nf4")
NF4_BLOCKSIZE = 64  # bitsandbytes' 4-bit block size: one absmax per 64 weights


def bitsandbytes() -> ModuleType:
    """The `bitsandbytes` module, or a `QuantizationError` saying how to install it."""
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise QuantizationError(
            "quantize='nf4' needs bitsandbytes (pip install 'loraledger[quant]'), which could not be imported: "
            f"{e}"
        ) from e
    return bnb


def check_quantize_mode(mode: str) -> str:
    """`mode` if it is one of QUANTIZE_MODES ("none" | "nf4"), else a `QuantizationError` listing them."""
    if mode not in QUANTIZE_MODES:
        raise QuantizationError(f"unknown quantize mode {mode!r}; choose one of {', '.join(QUANTIZE_MODES)}")
    return mode


def nf4_linear(
    linear: nn.Linear,
    compute_dtype: torch.dtype,
    double_quant: bool = False,
    device: torch.device | str | None = None,
) -> nn.Module:
    """`linear` (W: [out, in], bias: [out] | None) -> an NF4 `bnb.nn.Linear4bit` on `device` (default: W's).

    The weight is quantized from W's own dtype (see module docstring); the bias is kept as is (bitsandbytes casts
    it to `compute_dtype` per call). `linear` is left untouched; the caller drops it to free its memory.
    """
    bnb = bitsandbytes()
    if type(linear) is not nn.Linear:
        raise QuantizationError(
            f"only plain nn.Linear projections can be quantized, got {type(linear).__name__}; "
            "quantize the base before wrapping it (apply_lora after quantize_nf4)"
        )
    target = torch.device(device) if device is not None else linear.weight.device
    q = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=compute_dtype,
        compress_statistics=double_quant,
        quant_type="nf4",
        quant_storage=torch.uint8,
        device="meta",
    )
    weight = bnb.nn.Params4bit(
        linear.weight.detach().clone(),
        requires_grad=False,
        blocksize=NF4_BLOCKSIZE,
        compress_statistics=double_quant,
        quant_type="nf4",
        quant_storage=torch.uint8,
        module=q,
    )
    q.weight = weight.to(target)  # moving an unquantized Params4bit to a device quantizes it there
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.detach().to(target).clone(), requires_grad=False)
    q.eval()
    return q


def is_nf4(module: nn.Module) -> bool:
    """True for a bitsandbytes 4-bit linear (without importing bitsandbytes when it is not loaded)."""
    weight = getattr(module, "weight", None)
    return type(weight).__name__ == "Params4bit" and getattr(weight, "quant_type", None) == "nf4"


def quantize_nf4(
    model: LlamaModel,
    compute_dtype: torch.dtype | str | None = None,
    double_quant: bool = False,
    device: torch.device | str | None = None,
) -> LlamaModel:
    """Replace, in place, every projection of `model` (q,k,v,o,gate,up,down) with an NF4 `Linear4bit` on `device`.

    for name, W in model.named_linears(): model.set_linear(name, nf4_linear(W, compute_dtype, double_quant))

    compute_dtype: dtype of the dequantized matmul (default: the model's dtype, so outputs keep it).
    device: where the quantized weights go (default: where each weight is). Embeddings, norms, lm_head are not
    touched. Projections that are already NF4 are left as they are; LoRA-wrapped ones are refused.
    Returns `model`.
    """
    cdt = parse_dtype(compute_dtype) if compute_dtype is not None else model.dtype
    model.unfuse_projections()  # 4-bit projections run one by one; the full-precision fused weights go
    for name, layer in model.named_linears().items():
        if is_nf4(layer):
            continue
        if getattr(layer, "takes_batch", False):
            raise QuantizationError(
                f"{name} is already wrapped ({type(layer).__name__}); quantize the base first, then apply_lora"
            )
        model.set_linear(name, nf4_linear(layer, cdt, double_quant, device))  # type: ignore[arg-type]
        del layer  # the full-precision weight is freed once nothing else holds it
    return model


def _move_rest(model: LlamaModel, device: torch.device) -> None:
    """Move every parameter/buffer that is not a bitsandbytes weight to `device` (tied weights stay tied)."""
    for module in model.modules():
        if is_nf4(module):
            if module.bias is not None:
                module.bias.data = module.bias.data.to(device)
            continue
        for p in module.parameters(recurse=False):
            p.data = p.data.to(device)
        for key, b in module.named_buffers(recurse=False):
            module._buffers[key] = b.to(device)


def load_model_quantized(
    model_dir: str | Path,
    quantize: str = "none",
    dtype: str | torch.dtype | None = None,
    device: torch.device | str = "cpu",
    attention: AttentionBackend | None = None,
    double_quant: bool = False,
) -> LlamaModel:
    """`load_model(model_dir, dtype, device, attention)` with the base in `quantize` ("none" | "nf4").

    nf4: the checkpoint is loaded on the CPU in `dtype`, each projection is quantized straight onto `device`
    (the GPU never holds the full-precision base: peak device memory is the NF4 model plus one projection),
    then embeddings, norms and lm_head follow; the compute dtype is `dtype`.
    """
    mode = check_quantize_mode(quantize)
    if mode == "none":
        return load_model(model_dir, dtype, device, attention)
    bitsandbytes()  # fail before spending time on loading
    target = torch.device(device)
    model = load_model(model_dir, dtype, "cpu", attention)
    quantize_nf4(model, model.dtype, double_quant=double_quant, device=target)
    if target.type != "cpu":
        _move_rest(model, target)
        if attention is None:
            model.set_attention_backend(None)  # the default backend for `target`
    return model


def quant_state_nbytes(weight: Any) -> int:
    """Bytes of a `Params4bit`'s quantization statistics: absmax, code (+ nested absmax, code, offset)."""
    qs = getattr(weight, "quant_state", None)
    if qs is None:
        return 0
    total = 0
    for t in (qs.absmax, qs.code, getattr(qs, "offset", None)):
        if isinstance(t, torch.Tensor):
            total += t.nbytes
    state2 = getattr(qs, "state2", None)
    if state2 is not None:
        total += sum(t.nbytes for t in (state2.absmax, state2.code) if isinstance(t, torch.Tensor))
    return total


def module_nbytes(module: nn.Module) -> int:
    """Memory of `module`'s weights: every distinct parameter and buffer (tied ones once) + 4-bit statistics."""
    seen: set[int] = set()
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.nbytes + quant_state_nbytes(t)
    return total


def projections_nbytes(model: LlamaModel) -> int:
    """Memory of the base projections only (q,k,v,o,gate,up,down of every layer; LoRA wrappers' bases)."""
    total = 0
    for layer in model.named_linears().values():
        base = getattr(layer, "base", layer) if getattr(layer, "takes_batch", False) else layer
        total += module_nbytes(base)
    return total
