"""PEFT adapter parsing and validation, on real adapters saved by peft from a tiny transformers Llama."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraledger.inference.errors import AdapterFormatError, AdapterMismatchError
from loraledger.inference.identity import weights_hash
from loraledger.inference.lora.adapter import AdapterConfig, BaseDims, load_adapter, read_adapter_config

DIMS = BaseDims(num_layers=2, hidden_size=32, intermediate_size=48, q_size=32, kv_size=16)  # conftest's TINY


@pytest.fixture(scope="module")
def base(tiny_base: Any) -> Any:
    return tiny_base


@pytest.fixture(scope="module")
def patterned(base: Any, make_adapter: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """All seven projections, r=8 except down_proj (r=2) and alpha 16 except v_proj (alpha 4)."""
    return make_adapter(base, tmp_path_factory.mktemp("ad") / "patterned", r=8, alpha=16, seed=1,
                             rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 4})


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(d: Path, **changes: Any) -> Path:
    raw = json.loads((d / "adapter_config.json").read_text())
    raw.update(changes)
    (d / "adapter_config.json").write_text(json.dumps(raw))
    return d


def _edit_tensors(d: Path, fn: Any) -> Path:
    t = load_file(str(d / "adapter_model.safetensors"))
    save_file(fn(t), str(d / "adapter_model.safetensors"))
    return d


def test_parse_patterned_adapter(patterned: Path) -> None:
    ad = load_adapter(patterned, DIMS, max_rank=16)
    assert len(ad.modules) == 2 * 7
    q, v, down = (ad.modules[f"layers.1.{n}"] for n in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"))
    assert q.A.shape == (32, 8) and q.B.shape == (8, 32) and q.scaling == 16 / 8
    assert v.B.shape == (8, 16) and v.scaling == 4 / 8
    assert down.rank == 2 and down.A.shape == (48, 2) and down.scaling == 16 / 2
    assert ad.max_rank == 8
    assert ad.weights_hash == weights_hash(patterned)
    raw = load_file(str(patterned / "adapter_model.safetensors"))
    assert torch.equal(q.A, raw["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"].t())


def test_delta_matches_peft_module(base: Any, patterned: Path) -> None:
    """x @ A @ B * scaling equals what the peft-wrapped projection adds to its base output."""
    from peft import PeftModel

    pm = PeftModel.from_pretrained(copy.deepcopy(base), str(patterned)).eval()
    ad = load_adapter(patterned, DIMS, max_rank=16)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 32, generator=gen)
    for name in ("self_attn.v_proj", "mlp.gate_proj"):
        mod = pm.base_model.model.model.layers[0].get_submodule(name)
        with torch.no_grad():
            expected = mod(x) - mod.base_layer(x)
        w = ad.modules[f"layers.0.{name}"]
        torch.testing.assert_close(x @ w.A @ w.B, expected, atol=1e-5, rtol=1e-5)  # B carries the scaling
    x = torch.randn(5, 48, generator=gen)
    mod = pm.base_model.model.model.layers[1].mlp.down_proj
    with torch.no_grad():
        expected = mod(x) - mod.base_layer(x)
    w = ad.modules["layers.1.mlp.down_proj"]
    torch.testing.assert_close(x @ w.A @ w.B, expected, atol=1e-5, rtol=1e-5)


def test_rslora_and_regex_targets(base: Any, make_adapter: Any, tmp_path: Path) -> None:
    d = make_adapter(base, tmp_path / "rs", r=4, alpha=6, use_rslora=True, seed=2,
                          targets=r".*layers\.1\.self_attn\.(q|k)_proj")
    cfg, _ = read_adapter_config(d)
    assert isinstance(cfg.target_modules, str)
    ad = load_adapter(d, DIMS, max_rank=4)
    assert sorted(ad.modules) == ["layers.1.self_attn.k_proj", "layers.1.self_attn.q_proj"]
    assert ad.modules["layers.1.self_attn.q_proj"].scaling == pytest.approx(6 / math.sqrt(4))


def test_dtype_conversion(patterned: Path) -> None:
    ad = load_adapter(patterned, DIMS, max_rank=8, dtype=torch.bfloat16)
    assert all(w.A.dtype == torch.bfloat16 and w.B.is_contiguous() for w in ad.modules.values())


def test_pattern_matching_rules() -> None:
    cfg = AdapterConfig.from_dict({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "mlp.up_proj"],
                                   "rank_pattern": {"layers.0.self_attn.q_proj": 4, "q_proj": 6}})
    assert cfg.rank_for("model.layers.0.self_attn.q_proj") == 4  # first matching key wins
    assert cfg.rank_for("model.layers.1.self_attn.q_proj") == 6
    assert cfg.rank_for("model.layers.1.self_attn.k_proj") == 8
    assert cfg.rank_for("model.layers.1.self_attn.xq_proj") == 8  # no match across a dot boundary
    assert cfg.targets("model.layers.3.mlp.up_proj") and not cfg.targets("model.layers.3.mlp.gate_proj")


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"r": 0}, "r must be a positive integer"),
        ({"lora_alpha": "x"}, "lora_alpha"),
        ({"bias": "all"}, "bias='all'"),
        ({"use_dora": True}, "use_dora"),
        ({"lora_bias": True}, "lora_bias"),
        ({"peft_type": "IA3"}, "peft_type"),
        ({"target_modules": []}, "target_modules"),
        ({"target_modules": "(["}, "does not compile"),
        ({"rank_pattern": {"q_proj": -1}}, r"rank_pattern\['q_proj'\]"),
        ({"layer_replication": [[0, 1]]}, "layer_replication"),
    ],
)
def test_bad_configs(patterned: Path, tmp_path: Path, changes: dict[str, Any], match: str) -> None:
    d = _edit_config(_copy(patterned, tmp_path / "a"), **changes)
    with pytest.raises(AdapterFormatError, match=match):
        load_adapter(d, DIMS, max_rank=16)


def test_missing_and_malformed_files(patterned: Path, tmp_path: Path) -> None:
    with pytest.raises(AdapterFormatError, match="adapter_config.json"):
        load_adapter(tmp_path, DIMS, max_rank=16)
    d = _copy(patterned, tmp_path / "a")
    (d / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterFormatError, match="not valid JSON"):
        load_adapter(d, DIMS, max_rank=16)
    d = _copy(patterned, tmp_path / "b")
    (d / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterFormatError, match="adapter_model.safetensors"):
        load_adapter(d, DIMS, max_rank=16)
    d = _copy(patterned, tmp_path / "c")
    (d / "adapter_model.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(AdapterFormatError, match="not a readable safetensors"):
        load_adapter(d, DIMS, max_rank=16)


def test_rank_over_max_and_shape_mismatch(patterned: Path) -> None:
    with pytest.raises(AdapterFormatError, match="over the configured max_rank 4"):
        load_adapter(patterned, DIMS, max_rank=4)
    wider = dataclasses.replace(DIMS, intermediate_size=64)
    with pytest.raises(AdapterFormatError, match="do not fit the base"):
        load_adapter(patterned, wider, max_rank=16)
    fewer = dataclasses.replace(DIMS, num_layers=1)
    with pytest.raises(AdapterFormatError, match="layer 1 but the base has 1 layers"):
        load_adapter(patterned, fewer, max_rank=16)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda t: {**t, "base_model.model.lm_head.weight": torch.zeros(96, 32)}, "unexpected tensor"),
        (lambda t: {k: v for k, v in t.items() if not k.endswith("layers.0.mlp.up_proj.lora_B.weight")},
         "not both lora_A and lora_B"),
        (lambda t: {**t, "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.ones(32)},
         "DoRA"),
        (lambda t: {k: (v.T.contiguous() if "q_proj.lora_A" in k else v) for k, v in t.items()}, "do not fit"),
        (lambda t: {k: (v * float("nan") if "k_proj.lora_B" in k else v) for k, v in t.items()}, "NaN"),
        (lambda t: {}, "no LoRA weights"),
        (lambda t: {**t, "extra": torch.zeros(2, dtype=torch.uint16)}, "cannot hash the adapter weights"),
    ],
)
def test_bad_tensors(patterned: Path, tmp_path: Path, edit: Any, match: str) -> None:
    d = _edit_tensors(_copy(patterned, tmp_path / "a"), edit)
    with pytest.raises(AdapterFormatError, match=match):
        load_adapter(d, DIMS, max_rank=16)


def test_modules_to_save_and_untargeted_weights(patterned: Path, tmp_path: Path) -> None:
    d = _edit_config(_copy(patterned, tmp_path / "a"), modules_to_save=["lm_head"])
    _edit_tensors(d, lambda t: {**t, "base_model.model.lm_head.modules_to_save.weight": torch.zeros(96, 32)})
    with pytest.raises(AdapterFormatError, match="modules_to_save"):
        load_adapter(d, DIMS, max_rank=16)
    d = _edit_config(_copy(patterned, tmp_path / "b"), target_modules=["q_proj"])
    with pytest.raises(AdapterFormatError, match="does not select it"):
        load_adapter(d, DIMS, max_rank=16)
    d = _edit_config(_copy(patterned, tmp_path / "c"), rank_pattern={})
    with pytest.raises(AdapterFormatError, match="adapter_config.json gives r=8"):
        load_adapter(d, DIMS, max_rank=16)


def test_hash_checks(patterned: Path) -> None:
    good = weights_hash(patterned)
    assert load_adapter(patterned, DIMS, 16, expected_weights_hash=good.upper().replace("0X", "0x"))
    with pytest.raises(AdapterMismatchError, match="weights hash"):
        load_adapter(patterned, DIMS, 16, expected_weights_hash="0x" + "00" * 32)
    with pytest.raises(AdapterMismatchError, match="base model"):
        load_adapter(patterned, DIMS, 16, expected_base_hash="0x" + "11" * 32, base_hash="0x" + "22" * 32)
    assert load_adapter(patterned, DIMS, 16, expected_base_hash="0x" + "11" * 32, base_hash="0x" + "11" * 32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_one_non_finite_value_anywhere_is_refused_and_its_module_named(patterned: Path, tmp_path: Path,
                                                                       dtype: torch.dtype) -> None:
    """The values are checked by one min/max reduction over the whole laid-out buffer: a single NaN or
    infinity in any module, at any position (vector body or tail of the reduction), is found and named."""
    names = sorted(load_file(str(patterned / "adapter_model.safetensors")))
    g = torch.Generator().manual_seed(7)
    for i, bad in enumerate([float("nan"), float("inf"), -float("inf"), float("nan"), 1e6]):
        key = names[int(torch.randint(len(names), (1,), generator=g))]

        def poison(t: dict[str, torch.Tensor], key: str = key, bad: float = bad) -> dict[str, torch.Tensor]:
            v = t[key].clone()
            v.view(-1)[int(torch.randint(v.numel(), (1,), generator=g))] = bad
            return {**t, key: v}

        d = _edit_tensors(_copy(patterned, tmp_path / f"a{i}"), poison)
        module = key.removeprefix("base_model.model.model.").rsplit(".lora_", 1)[0]
        if bad == 1e6 and dtype != torch.float16:  # finite in fp32 and bf16; past fp16's range, so inf there
            assert load_adapter(d, DIMS, max_rank=16, dtype=dtype)
            continue
        with pytest.raises(AdapterFormatError, match=f"{module} holds NaN or infinite values"):
            load_adapter(d, DIMS, max_rank=16, dtype=dtype)


def test_modules_are_aligned_views_of_one_buffer(base: Any, make_adapter: Any, tmp_path: Path) -> None:
    odd = make_adapter(base, tmp_path / "r3", r=3, alpha=6, seed=4)  # bf16 [48, 3]: 288 bytes, not a multiple of 64
    ad = load_adapter(odd, DIMS, max_rank=16, dtype=torch.bfloat16)
    storages = {w.A.untyped_storage().data_ptr() for w in ad.modules.values()}
    storages |= {w.B.untyped_storage().data_ptr() for w in ad.modules.values()}
    assert len(storages) == 1  # one allocation (pinned as a whole on CUDA)
    for w in ad.modules.values():
        assert w.A.is_contiguous() and w.B.is_contiguous()
        assert w.A.data_ptr() % 64 == 0 and w.B.data_ptr() % 64 == 0


def test_a_hash_mismatch_is_reported_before_a_format_error(patterned: Path, tmp_path: Path) -> None:
    """The documented order of errors: a hash mismatch is reported before a format error."""
    d = _edit_tensors(_copy(patterned, tmp_path / "a"), lambda t: {**t, "base_model.model.lm_head.weight": torch.zeros(3)})
    with pytest.raises(AdapterFormatError, match="unexpected tensor"):
        load_adapter(d, DIMS, max_rank=16)
    with pytest.raises(AdapterMismatchError, match="weights hash"):
        load_adapter(d, DIMS, max_rank=16, expected_weights_hash=weights_hash(patterned))
    assert load_adapter(patterned, DIMS, max_rank=16).weights_hash == weights_hash(patterned)


def test_base_dims_from_model_config() -> None:
    from loraledger.inference.config import ModelConfig

    cfg = ModelConfig.from_dict({"model_type": "llama", "vocab_size": 96, "hidden_size": 32,
                                 "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
                                 "num_key_value_heads": 2})
    assert BaseDims.from_model_config(cfg) == DIMS
    assert DIMS.module_shape("o_proj") == (32, 32) and DIMS.module_shape("k_proj") == (32, 16)


@pytest.mark.parametrize("file_dtype, dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                                               (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32)])
def test_b_carries_its_scaling_rounded_once_in_the_serving_dtype(base: Any, make_adapter: Any, tmp_path: Path,
                                                                 file_dtype: torch.dtype, dtype: torch.dtype) -> None:
    """B = lora_B.T * scaling as the slots computed it before: converted to the serving dtype, then scaled in it
    (a bf16 file served in fp32 keeps fp32's product; 5 / 3 is not a power of two, so rounding would show)."""
    d = make_adapter(base, tmp_path / "a", r=3, alpha=5, seed=5)
    _edit_tensors(d, lambda t: {k: v.to(file_dtype) for k, v in t.items()})
    raw = load_file(str(d / "adapter_model.safetensors"))
    ad = load_adapter(d, DIMS, max_rank=16, dtype=dtype)
    for name, w in ad.modules.items():
        lora_b = raw[f"base_model.model.model.{name}.lora_B.weight"]
        assert w.scaling == pytest.approx(5 / 3)
        assert torch.equal(w.B, lora_b.t().to(dtype) * w.scaling), name
        assert torch.equal(w.A, raw[f"base_model.model.model.{name}.lora_A.weight"].t().to(dtype))
