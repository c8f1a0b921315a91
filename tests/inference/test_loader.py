"""Checkpoint loading: config parsing across model types and RoPE spellings, sharded safetensors, and clear
`ModelLoadError`s for a missing file, a missing tensor, a wrong shape and an unsupported architecture."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

from loraledger.inference.config import ModelConfig, parse_dtype
from loraledger.inference.errors import ModelLoadError
from loraledger.inference.loader import load_model
from loraledger.inference.model import LlamaModel


@pytest.fixture
def ckpt(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny checkpoint that a test may damage."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "ckpt"))


def edit_config(path: Path, **changes: object) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def same_weights(a: LlamaModel, b: LlamaModel) -> bool:
    sb = b.state_dict()
    return all(torch.equal(v, sb[k]) for k, v in a.state_dict().items())


def test_loads_every_tensor_of_the_tiny_checkpoint(tiny_model_dir: Path, tiny_model: LlamaModel) -> None:
    raw = load_file(str(tiny_model_dir / "model.safetensors"))
    assert torch.equal(tiny_model.layers[1].self_attn.k_proj.weight, raw["model.layers.1.self_attn.k_proj.weight"])
    assert torch.equal(tiny_model.lm_head.weight, raw["lm_head.weight"])
    assert torch.equal(tiny_model.norm.weight, raw["model.norm.weight"])
    assert tiny_model.config.eos_token_ids == (2,) and tiny_model.config.bos_token_id == 1


def test_sharded_checkpoint_loads_the_same(tiny_model_dir: Path, tiny_model: LlamaModel, tmp_path: Path) -> None:
    hf = LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and not (tmp_path / "model.safetensors").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    assert same_weights(load_model(tmp_path), tiny_model)


def test_missing_weights_file_names_what_was_expected(ckpt: Path) -> None:
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"no weights in .*model\.safetensors or model\.safetensors\.index"):
        load_model(ckpt)


def test_missing_shard_is_named(tiny_model_dir: Path, tmp_path: Path) -> None:
    LlamaForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(tmp_path, max_shard_size="100KB")
    victim = max(tmp_path.glob("model-*.safetensors"))
    victim.unlink()
    with pytest.raises(ModelLoadError, match=f"shard.*{victim.name}"):
        load_model(tmp_path)


def test_missing_tensor_is_named(ckpt: Path) -> None:
    tensors = load_file(str(ckpt / "model.safetensors"))
    del tensors["model.layers.1.mlp.gate_proj.weight"]
    save_file(tensors, str(ckpt / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"'model\.layers\.1\.mlp\.gate_proj\.weight' is missing"):
        load_model(ckpt)


def test_wrong_shape_is_named(ckpt: Path) -> None:
    edit_config(ckpt, intermediate_size=96)
    with pytest.raises(ModelLoadError, match=r"gate_proj\.weight' .* shape \(128, 64\).*\(96, 64\)"):
        load_model(ckpt)


def test_unknown_model_type_names_the_supported_ones(ckpt: Path) -> None:
    edit_config(ckpt, model_type="gpt2")
    with pytest.raises(ModelLoadError, match="unsupported model_type 'gpt2'.*llama, mistral, qwen2, qwen3"):
        load_model(ckpt)


def test_missing_config_and_bad_dtype(tmp_path: Path, ckpt: Path) -> None:
    with pytest.raises(ModelLoadError, match="config.json not found"):
        load_model(tmp_path)
    with pytest.raises(ModelLoadError, match="unknown dtype 'int8'"):
        load_model(ckpt, dtype="int8")
    assert parse_dtype("bfloat16") is torch.bfloat16 and parse_dtype("torch.float16") is torch.float16


def test_config_parses_old_and_new_rope_spellings() -> None:
    base = {"model_type": "llama", "vocab_size": 10, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2}
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    old = ModelConfig.from_dict({**base, "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", **scaling}})
    new = ModelConfig.from_dict({**base, "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0,
                                                             **scaling}})
    assert old.rope == new.rope and old.rope.theta == 500000.0 and old.rope.rope_type == "llama3"
    assert old.head_dim == 8 and old.num_kv_heads == 2
    with pytest.raises(ModelLoadError, match="rope type 'yarn' is not supported"):
        ModelConfig.from_dict({**base, "rope_scaling": {"type": "yarn", "factor": 2.0}})
    with pytest.raises(ModelLoadError, match="not a multiple of num_key_value_heads"):
        ModelConfig.from_dict({**base, "num_key_value_heads": 3})
    with pytest.raises(ModelLoadError, match="lacks required key 'vocab_size'"):
        ModelConfig.from_dict({k: v for k, v in base.items() if k != "vocab_size"})


def test_config_flags_per_model_type() -> None:
    base = {"vocab_size": 10, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 4}
    qwen2 = ModelConfig.from_dict({**base, "model_type": "qwen2", "sliding_window": 16, "use_sliding_window": False})
    assert qwen2.qkv_bias and not qwen2.o_bias and not qwen2.qk_norm and qwen2.sliding_window is None
    qwen3 = ModelConfig.from_dict({**base, "model_type": "qwen3", "attention_bias": False})
    assert qwen3.qk_norm and not qwen3.qkv_bias
    mistral = ModelConfig.from_dict({**base, "model_type": "mistral", "sliding_window": 64,
                                     "max_position_embeddings": 1024})
    assert mistral.max_context_len == 64
