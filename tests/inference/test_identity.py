"""Content identities: canonical tensor hash, adapter weights hash, base model hash (+ cache), config hash."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from loraledger.inference.errors import AdapterFormatError, ModelLoadError
from loraledger.inference.identity import (
    HASH_CACHE_FILE,
    base_model_hash,
    config_hash,
    parse_hash,
    safetensors_files_digest,
    tensors_hash,
    weights_hash,
)


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "b.weight": torch.randn(3, 5, generator=g),
        "a.weight": torch.randn(4, 2, generator=g).to(torch.bfloat16),
        "c.idx": torch.arange(6, dtype=torch.int64).reshape(2, 3),
    }


def _adapter(tmp: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata=metadata)
    return tmp


def test_hash_format_and_known_framing() -> None:
    t = {"x": torch.tensor([1.0, 2.0], dtype=torch.float32)}
    expected = hashlib.sha256(
        b"loraledger.tensors.v1\0"
        + struct.pack("<Q", 1)
        + struct.pack("<I", 1) + b"x"
        + struct.pack("<I", 3) + b"F32"
        + struct.pack("<I", 1) + struct.pack("<Q", 2)
        + struct.pack("<Q", 8) + struct.pack("<ff", 1.0, 2.0)
    ).hexdigest()
    assert tensors_hash(t) == "0x" + expected


def test_stable_across_resave_and_file_matches_memory(tmp_path: Path) -> None:
    t = _tensors()
    one = _adapter(tmp_path / "one", t)
    # same tensors, other insertion order and extra metadata: the file differs, the hash does not
    two = _adapter(tmp_path / "two", dict(reversed(list(t.items()))), metadata={"note": "resaved"})
    assert (one / "adapter_model.safetensors").read_bytes() != (two / "adapter_model.safetensors").read_bytes()
    assert weights_hash(one) == weights_hash(two) == tensors_hash(t)


@pytest.mark.parametrize("change", ["byte", "name", "dtype", "shape"])
def test_hash_changes_with_any_tensor_property(change: str) -> None:
    t = _tensors()
    base = tensors_hash(t)
    u = dict(t)
    if change == "byte":
        w = u["b.weight"].clone()
        w.view(torch.int32)[1, 2] ^= 1  # flip one bit of one float
        u["b.weight"] = w
    elif change == "name":
        u["b.weight2"] = u.pop("b.weight")
    elif change == "dtype":
        u["c.idx"] = u["c.idx"].to(torch.int32)
    else:
        u["c.idx"] = u["c.idx"].reshape(3, 2)
    assert tensors_hash(u) != base


def test_sharded_union_equals_single_file(tmp_path: Path) -> None:
    t = _tensors()
    save_file({"a.weight": t["a.weight"]}, str(tmp_path / "s1.safetensors"))
    save_file({"b.weight": t["b.weight"], "c.idx": t["c.idx"]}, str(tmp_path / "s2.safetensors"))
    paths = [tmp_path / "s2.safetensors", tmp_path / "s1.safetensors"]
    assert "0x" + safetensors_files_digest(paths).hex() == tensors_hash(t)
    save_file({"a.weight": t["a.weight"]}, str(tmp_path / "dup.safetensors"))
    with pytest.raises(ValueError, match="appears in both"):
        safetensors_files_digest([tmp_path / "s1.safetensors", tmp_path / "dup.safetensors"])


def test_weights_hash_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(AdapterFormatError, match="adapter_model.safetensors"):
        weights_hash(tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{bad")
    with pytest.raises(AdapterFormatError, match="cannot hash"):
        weights_hash(tmp_path)
    # header claims a tensor whose bytes lie beyond the end of the file
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    (tmp_path / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    with pytest.raises(AdapterFormatError, match="outside the file"):
        weights_hash(tmp_path)


def _checkpoint(d: Path, config: dict[str, object]) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(config, indent=2))
    save_file(_tensors(), str(d / "model.safetensors"))
    return d


def test_base_model_hash_config_and_cache(tmp_path: Path) -> None:
    d = _checkpoint(tmp_path / "m", {"hidden_size": 8, "model_type": "llama"})
    h = base_model_hash(d)
    assert (d / HASH_CACHE_FILE).is_file()
    assert base_model_hash(d) == h == base_model_hash(d, use_cache=False)
    # the same config written with other key order / spacing hashes the same
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    assert base_model_hash(d) == h
    # a config value change changes it (the cache is keyed on size+mtime, so it is recomputed)
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 9}))
    assert base_model_hash(d) != h


def test_base_model_hash_cache_is_keyed_on_files(tmp_path: Path) -> None:
    d = _checkpoint(tmp_path / "m", {"hidden_size": 8})
    h = base_model_hash(d)
    # a stale cache whose keys no longer match is ignored: rewrite weights, bump mtime
    t = _tensors()
    t["b.weight"] = t["b.weight"] + 1
    save_file(t, str(d / "model.safetensors"))
    st = (d / "model.safetensors").stat()
    os.utime(d / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert base_model_hash(d) != h
    # a cache whose keys match is trusted (that is its purpose): prove it by planting a value
    cache = json.loads((d / HASH_CACHE_FILE).read_text())
    cache["base_model_hash"] = "0x" + "ab" * 32
    (d / HASH_CACHE_FILE).write_text(json.dumps(cache))
    assert base_model_hash(d) == "0x" + "ab" * 32
    assert base_model_hash(d, use_cache=False) != "0x" + "ab" * 32


def test_base_model_hash_missing_files(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="config.json"):
        base_model_hash(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="safetensors"):
        base_model_hash(tmp_path)


def test_config_hash_canonical() -> None:
    a = config_hash({"lr": 0.001, "r": 8, "targets": ["q_proj", "v_proj"]})
    b = config_hash({"targets": ["q_proj", "v_proj"], "r": 8, "lr": 0.001})
    assert a == b
    assert a == "0x" + hashlib.sha256(b'{"lr":0.001,"r":8,"targets":["q_proj","v_proj"]}').hexdigest()
    assert config_hash({"r": 16}) != config_hash({"r": 8})
    with pytest.raises(ValueError, match="canonical JSON"):
        config_hash({"x": float("nan")})


def test_parse_hash() -> None:
    assert parse_hash("0X" + "AB" * 32) == "0x" + "ab" * 32
    for bad in ["ab" * 32, "0x" + "ab" * 31, "0x" + "zz" * 32]:
        with pytest.raises(ValueError):
            parse_hash(bad)
