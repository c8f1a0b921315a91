"""Fixtures of the LoRA tests: a tiny transformers Llama and real PEFT adapters saved from it (no downloads).

Helpers are handed out as fixtures (`make_adapter`, `derive_adapter`) since test modules are imported with
--import-mode=importlib and cannot import a sibling helper module."""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraledger.inference.lora.adapter import BaseDims

TINY = {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 128}
ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_dims() -> BaseDims:
    h, heads, kv = TINY["hidden_size"], TINY["num_attention_heads"], TINY["num_key_value_heads"]
    return BaseDims(num_layers=TINY["num_hidden_layers"], hidden_size=h, intermediate_size=TINY["intermediate_size"],
                    q_size=h, kv_size=kv * h // heads)


def tiny_hf_llama(seed: int = 0) -> Any:
    """A random `transformers.LlamaForCausalLM` of the TINY sizes, fp32, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**TINY))
    return model.eval()


def make_peft_adapter(
    base: Any,
    out_dir: Path,
    r: int = 4,
    alpha: float = 8,
    targets: list[str] | str | None = None,
    seed: int = 0,
    use_rslora: bool = False,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
    std: float = 0.3,
) -> Path:
    """Save a real PEFT LoRA adapter of `base` (deep-copied) with random A and B ~ N(0, std) (so it matters)."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=r, lora_alpha=alpha, target_modules=targets if targets is not None else ALL_TARGETS,
        use_rslora=use_rslora, rank_pattern=rank_pattern or {}, alpha_pattern=alpha_pattern or {},
        init_lora_weights=False, lora_dropout=0.0,
    )
    model = get_peft_model(copy.deepcopy(base), cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    model.save_pretrained(str(out_dir))
    return out_dir


@functools.lru_cache(maxsize=4)
def _read_template(template: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    return json.loads((template / "adapter_config.json").read_text()), load_file(str(template / "adapter_model.safetensors"))


def derive_adapter(template: Path, out_dir: Path, seed: int, rank: int | None = None) -> Path:
    """A new adapter in PEFT format: the template's config and keys with fresh random values (optionally a new
    rank for every module), written with safetensors. Cheap enough to make a thousand."""
    out_dir.mkdir(parents=True, exist_ok=True)
    raw, tensors = _read_template(template)
    raw = dict(raw)
    g = torch.Generator().manual_seed(seed)
    new: dict[str, torch.Tensor] = {}
    for k, t in tensors.items():
        shape = list(t.shape)
        if rank is not None:
            shape[0 if "lora_A" in k else 1] = rank
        new[k] = torch.randn(shape, generator=g) * 0.3
    if rank is not None:
        raw["r"] = rank
        raw["rank_pattern"] = {}
    (out_dir / "adapter_config.json").write_text(json.dumps(raw))
    save_file(new, str(out_dir / "adapter_model.safetensors"))
    return out_dir


@pytest.fixture(scope="session")
def tiny_base() -> Any:
    """The session's tiny transformers Llama (seed 0); read-only: `make_adapter` deep-copies it."""
    return tiny_hf_llama(seed=0)


@pytest.fixture(scope="session")
def dims() -> BaseDims:
    return tiny_dims()


@pytest.fixture(scope="session", name="make_adapter")
def make_adapter_fixture() -> Any:
    """`make_peft_adapter(base, out_dir, r=, alpha=, targets=, seed=, use_rslora=, rank_pattern=, alpha_pattern=, std=)`."""
    return make_peft_adapter


@pytest.fixture(scope="session", name="derive_adapter")
def derive_adapter_fixture() -> Any:
    """`derive_adapter(template_dir, out_dir, seed, rank=None)`."""
    return derive_adapter
