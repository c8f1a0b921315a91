"""Random Llama-family models for the benchmarks, built in memory on the device (no checkpoint is written, so an
8B shape costs seconds, not a 16 GB file), shared by the scripts beside this one.

`build_models(size, dtype, device, workdir)` gives a transformers `LlamaForCausalLM` with random weights and our
runner holding the very same tensors (so both read the same bytes), plus a tokenizer of the same vocabulary.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loraledger.inference.config import ModelConfig
from loraledger.inference.model import LlamaModel
from loraledger.inference.quant import module_nbytes
from loraledger.inference.tiny import init_tiny
from loraledger.inference.tokenizer import Tokenizer

SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "intermediate": 128, "vocab": 512},
    "20m": {"layers": 4, "hidden": 512, "heads": 8, "kv_heads": 4, "intermediate": 1536, "vocab": 8192},
    "100m": {"layers": 12, "hidden": 768, "heads": 12, "kv_heads": 4, "intermediate": 2048, "vocab": 32000},
    "1b": {"layers": 16, "hidden": 2048, "heads": 32, "kv_heads": 8, "intermediate": 8192, "vocab": 32000},
    "llama3-8b": {"layers": 32, "hidden": 4096, "heads": 32, "kv_heads": 8, "intermediate": 14336, "vocab": 128256,
                  "rope_theta": 500000.0},
}

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds `fn()` takes, with the device's queued work finished before and after."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0



@dataclass
class Models:
    """The transformers model (peft's base), our runner sharing its tensors, the tokenizer, sizes in bytes."""

    hf: Any
    runner: LlamaModel
    tokenizer: Tokenizer
    tokenizer_dir: Path
    base_bytes: int  # weights a decode step reads: all but the input embedding
    total_bytes: int


def build_models(size: str, dtype: torch.dtype, device: torch.device, workdir: Path) -> Models:
    """A random transformers Llama of `size` built on `device`, and our runner holding the very same tensors.

    runner[name] is hf["model." + name] (lm_head as is), shared with `load_state_dict(assign=True)`.
    The tokenizer comes from a tiny init_tiny checkpoint of the same vocabulary (so every id decodes).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    sz = SIZES[size]
    tok_dir = init_tiny(workdir / f"tokenizer_{size}", layers=1, hidden=64, heads=2, kv_heads=1, intermediate=64,
                        vocab=sz["vocab"], max_positions=2048, overwrite=True)
    config = LlamaConfig(vocab_size=sz["vocab"], hidden_size=sz["hidden"], intermediate_size=sz["intermediate"],
                         num_hidden_layers=sz["layers"], num_attention_heads=sz["heads"],
                         num_key_value_heads=sz["kv_heads"], max_position_embeddings=2048, rms_norm_eps=1e-5,
                         rope_theta=sz.get("rope_theta", 10000.0),  # type: ignore[call-arg]  # -> rope_parameters
                         tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):
        hf = LlamaForCausalLM._from_config(config, dtype=dtype).eval()
    for p in hf.parameters():
        p.requires_grad_(False)
    cfg_dir = workdir / f"config_{size}"
    config.save_pretrained(cfg_dir)
    with torch.device("meta"):
        runner = LlamaModel(ModelConfig.from_pretrained(cfg_dir))
    state = {k.removeprefix("model."): v for k, v in hf.state_dict().items() if "rotary_emb" not in k}
    runner.load_state_dict(state, assign=True, strict=True)
    runner.tie_weights()
    runner.fuse_projections()  # as load_model does (q/k/v and gate/up then no longer share hf's storage)
    runner.set_attention_backend(None)
    runner.eval()
    total = module_nbytes(runner)
    return Models(hf, runner, Tokenizer.from_pretrained(tok_dir), tok_dir, total - runner.embed_tokens.weight.nbytes,
                  total)


def load_models(model_dir: Path, dtype: torch.dtype, device: torch.device) -> Models:
    """A real checkpoint (e.g. `loraledger model import` of a GGUF file) as transformers' model and our runner
    holding the very same tensors, plus its own tokenizer."""
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    for p in hf.parameters():
        p.requires_grad_(False)
    with torch.device("meta"):
        runner = LlamaModel(ModelConfig.from_pretrained(model_dir))
    state = {k.removeprefix("model."): v for k, v in hf.state_dict().items()
             if "rotary_emb" not in k and not (k == "lm_head.weight" and runner.config.tie_word_embeddings)}
    missing, unexpected = runner.load_state_dict(state, assign=True, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise ValueError(f"{model_dir}: tensors do not fit the runner (missing {missing}, unexpected {unexpected})")
    runner.tie_weights()
    runner.fuse_projections()
    runner.set_attention_backend(None)
    runner.eval()
    total = module_nbytes(runner)
    return Models(hf, runner, Tokenizer.from_pretrained(model_dir), model_dir,
                  total - runner.embed_tokens.weight.nbytes, total)
