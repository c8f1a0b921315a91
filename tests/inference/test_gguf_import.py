"""GGUF import: a GGUF file written here with the `gguf` package (llama.cpp's layout: q/k rows permuted, one
projection family Q8_0) is imported back to the original tensors, tokenizer and chat template; unsupported
architectures and quantization types are refused by name."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from loraledger.inference.gguf_import import PROVENANCE_FILE, GGUFImportError, import_gguf, read_header
from loraledger.inference.identity import base_model_hash
from loraledger.inference.loader import load_model
from loraledger.inference.tiny import CHAT_TEMPLATE
from loraledger.inference.tokenizer import Tokenizer

# HF name (after "model.layers.N.") -> GGUF name (after "blk.N.")
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_QUANTIZED = ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")  # written as Q8_0


def _rope_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp stores q/k rows with each head's two rotary halves interleaved."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_name(hf: str) -> str:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = hf.split(".", 3)
    return f"blk.{layer}.{_LAYER_NAMES[rest]}"


def write_gguf(
    model_dir: Path, path: Path, arch: str = "llama", odd_tensor: gguf.GGMLQuantizationType | None = None
) -> dict[str, torch.Tensor]:
    """Write `model_dir` (the tiny checkpoint) as a GGUF file; returns the tensors an exact import must give."""
    config = json.loads((model_dir / "config.json").read_text())
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    vocab: dict[str, int] = tok["model"]["vocab"]
    for added in tok["added_tokens"]:
        vocab[added["content"]] = added["id"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {a["content"] for a in tok["added_tokens"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny test model")
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(config["hidden_size"] // heads)
    w.add_vocab_size(len(tokens))
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(config["bos_token_id"])
    w.add_eos_token_id(config["eos_token_id"])
    w.add_pad_token_id(config["pad_token_id"])
    w.add_chat_template(CHAT_TEMPLATE)

    expected: dict[str, torch.Tensor] = {}
    for name, t in load_file(str(model_dir / "model.safetensors")).items():
        arr = t.float().numpy()
        stored = arr
        if name.endswith("q_proj.weight"):
            stored = _rope_permute(arr, heads)
        elif name.endswith("k_proj.weight"):
            stored = _rope_permute(arr, kv_heads)
        if name.endswith(_QUANTIZED):
            q = gguf.quants.quantize(stored, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(_gguf_name(name), q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            expected[name] = torch.from_numpy(gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0).copy())
        else:
            w.add_tensor(_gguf_name(name), np.ascontiguousarray(stored))
            expected[name] = t.float()
    if odd_tensor is not None:
        w.add_tensor("blk.0.odd.weight", np.zeros(36, dtype=np.uint8), raw_shape=(1, 36), raw_dtype=odd_tensor)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    path = tmp_path_factory.mktemp("gguf") / "tiny.Q8_0.gguf"
    return path, write_gguf(tiny_model_dir, path)


def test_import_round_trips_tensors_tokenizer_and_provenance(
    tiny_gguf: tuple[Path, dict[str, torch.Tensor]], tiny_model_dir: Path, tmp_path: Path
) -> None:
    path, expected = tiny_gguf
    result = import_gguf(path, tmp_path / "out")
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == torch.float32
        assert torch.equal(got[name], tensor), name
    # the GGUF's Q8_0 projections are not the originals bit for bit, but close: the file really was quantized
    orig = load_file(str(tiny_model_dir / "model.safetensors"))
    gate = "model.layers.0.mlp.gate_proj.weight"
    assert not torch.equal(got[gate], orig[gate])
    assert torch.allclose(got[gate], orig[gate], atol=0.05)

    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["num_key_value_heads"] == 2 and config["model_type"] == "llama"

    prov = json.loads((tmp_path / "out" / PROVENANCE_FILE).read_text())
    assert prov["source"]["sha256"] == "0x" + hashlib.sha256(path.read_bytes()).hexdigest()
    assert prov["gguf"]["file_type"] == "MOSTLY_Q8_0"
    assert prov["gguf"]["tensor_types"] == {"F32": len(expected) - 3 * 2, "Q8_0": 3 * 2}
    assert prov["base_model_hash"] == result.base_model_hash == base_model_hash(tmp_path / "out", use_cache=False)

    ours, theirs = Tokenizer.from_pretrained(tmp_path / "out"), Tokenizer.from_pretrained(tiny_model_dir)
    text = "The ledger pays the contributors whose data shaped the answer."
    assert ours.encode(text, add_special_tokens=False) == theirs.encode(text, add_special_tokens=False)
    assert ours.has_chat_template
    assert ours.eos_token_id == theirs.eos_token_id

    model = load_model(tmp_path / "out", dtype="fp32")  # the node's own loader takes the result
    assert model.config.num_layers == config["num_hidden_layers"]


def test_import_in_bfloat16(tiny_gguf: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path) -> None:
    path, expected = tiny_gguf
    import_gguf(path, tmp_path / "bf16", dtype="bfloat16")
    got = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    for name, tensor in expected.items():
        assert got[name].dtype == torch.bfloat16
        assert torch.equal(got[name], tensor.to(torch.bfloat16)), name
    assert json.loads((tmp_path / "bf16" / PROVENANCE_FILE).read_text())["dtype"] == "bfloat16"


def test_refuses_unsupported_architecture(tiny_model_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "other.gguf"
    write_gguf(tiny_model_dir, path, arch="falcon")
    with pytest.raises(GGUFImportError, match="architecture 'falcon' is not supported"):
        import_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_refuses_unsupported_quantization_type(tiny_model_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "iq.gguf"
    write_gguf(tiny_model_dir, path, odd_tensor=gguf.GGMLQuantizationType.IQ4_NL)
    assert read_header(path).tensor_types["IQ4_NL"] == 1
    with pytest.raises(GGUFImportError, match=r"quantization type\(s\) IQ4_NL not supported"):
        import_gguf(path, tmp_path / "out")


def test_refuses_non_gguf_file_and_existing_checkpoint(
    tiny_gguf: tuple[Path, dict[str, torch.Tensor]], tiny_model_dir: Path, tmp_path: Path
) -> None:
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(GGUFImportError, match="not a readable GGUF file"):
        import_gguf(bogus, tmp_path / "out")
    with pytest.raises(GGUFImportError, match="no such file"):
        import_gguf(tmp_path / "missing.gguf", tmp_path / "out")
    with pytest.raises(GGUFImportError, match="already holds a checkpoint"):
        import_gguf(tiny_gguf[0], tiny_model_dir)
    with pytest.raises(GGUFImportError, match="dtype 'float16' is not supported"):
        import_gguf(tiny_gguf[0], tmp_path / "out", dtype="float16")


def test_model_import_command(
    tiny_gguf: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from loraledger.node.cli import main

    out = tmp_path / "cli"
    assert main(["model", "import", str(tiny_gguf[0]), "--out", str(out), "--dtype", "bfloat16"]) == 0
    printed = capsys.readouterr().out
    assert f"base model hash {base_model_hash(out)}" in printed and "MOSTLY_Q8_0" in printed
    assert main(["model", "import", str(tiny_gguf[0]), "--out", str(out)]) == 1  # no --force: refused
    assert "already holds a checkpoint" in capsys.readouterr().err
