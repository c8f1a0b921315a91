"""`ModelConfig`: the one validated description of a Llama-family checkpoint, parsed from its HF `config.json`.

Supported `model_type`s and what differs between them (everything else is the Llama block):

    llama    attention_bias -> bias on q/k/v/o; mlp_bias; rope_scaling default | linear | llama3
    mistral  Llama without biases; `sliding_window` caps the usable context (full attention inside it)
    qwen2    bias on q/k/v (always), none on o
    qwen3    q/k RMSNorm over head_dim before RoPE; attention_bias -> bias on q/k/v/o

Both spellings of RoPE settings are read: transformers < 5 (`rope_theta` + `rope_scaling`) and >= 5
(`rope_parameters` holding `rope_theta` and the scaling keys).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loraledger.inference.errors import ModelLoadError

SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES: tuple[str, ...] = ("default", "linear", "llama3")

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """'fp32' | 'float32' | 'bf16' | 'bfloat16' | 'fp16' | 'float16' (or a torch.dtype) -> torch.dtype."""
    if isinstance(name, torch.dtype):
        if name not in _DTYPES.values():
            raise ModelLoadError(f"dtype {name} is not supported; use one of float32, bfloat16, float16")
        return name
    key = name.lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ModelLoadError(f"unknown dtype {name!r}; use one of {', '.join(sorted(_DTYPES))}")
    return _DTYPES[key]


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding settings.

    inv_freq[i] = 1 / theta ** (2i / head_dim), i in [0, head_dim/2), then rescaled by `rope_type`:
    linear: / factor; llama3: low frequencies / factor, high ones unchanged, a smooth blend in between.
    """

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """Sizes and switches of one Llama-family model (see module docstring for the per-type differences)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    torch_dtype: str | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ModelLoadError(f"config value {name}={getattr(self, name)} must be positive")
        if self.num_heads % self.num_kv_heads != 0:
            raise ModelLoadError(
                f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads="
                f"{self.num_kv_heads}; grouped-query attention needs whole groups"
            )
        if self.head_dim % 2 != 0:
            raise ModelLoadError(f"head_dim={self.head_dim} must be even for rotary embeddings")

    @property
    def q_size(self) -> int:
        """Width of the q projection output: num_heads * head_dim."""
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        """Width of each of the k and v projection outputs: num_kv_heads * head_dim."""
        return self.num_kv_heads * self.head_dim

    @property
    def max_context_len(self) -> int:
        """Longest sequence (prompt + generated) this runner serves exactly: max positions, capped by the
        sliding window where the model uses one (the runner attends over the full context)."""
        if self.sliding_window is not None:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings

    @property
    def dtype(self) -> torch.dtype | None:
        """The checkpoint's declared dtype, or None when config.json does not say."""
        return parse_dtype(self.torch_dtype) if self.torch_dtype else None

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        """Parse a HF `config.json` dict; `ModelLoadError` on an unsupported architecture or missing key."""
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelLoadError(
                f"unsupported model_type {model_type!r} in config.json; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise ModelLoadError(f"hidden_act {act!r} is not supported; the runner implements SwiGLU (silu)")

        def need(key: str) -> Any:
            if key not in raw:
                raise ModelLoadError(f"config.json of a {model_type} model lacks required key {key!r}")
            return raw[key]

        hidden = int(need("hidden_size"))
        heads = int(need("num_attention_heads"))
        head_dim = raw.get("head_dim") or hidden // heads
        attention_bias = bool(raw.get("attention_bias", False))
        qkv_bias = True if model_type == "qwen2" else attention_bias
        o_bias = False if model_type == "qwen2" else attention_bias
        sliding = raw.get("sliding_window")
        if model_type == "qwen2" or model_type == "qwen3":
            sliding = sliding if raw.get("use_sliding_window", False) else None
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return cls(
            model_type=model_type,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=int(need("num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            rope=_parse_rope(raw),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=bool(raw.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            sliding_window=int(sliding) if sliding else None,
            torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> ModelConfig:
        """Read `model_dir/config.json`; `ModelLoadError` if it is missing or not JSON."""
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ModelLoadError(f"{path} not found: a Hugging Face checkpoint directory needs a config.json")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ModelLoadError(f"{path} is not valid JSON: {e}") from e
        return cls.from_dict(raw)


def _parse_rope(raw: dict[str, Any]) -> RopeConfig:
    """Merge `rope_parameters` (transformers >= 5) or `rope_theta` + `rope_scaling` (older) into a RopeConfig."""
    params: dict[str, Any] = dict(raw.get("rope_parameters") or {})
    scaling = raw.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelLoadError(
            f"rope type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type == "default":
        return RopeConfig(theta=theta)
    if "factor" not in params:
        raise ModelLoadError(f"rope scaling of type {rope_type!r} needs a 'factor'")
    if rope_type == "linear":
        return RopeConfig(theta=theta, rope_type="linear", factor=float(params["factor"]))
    return RopeConfig(
        theta=theta,
        rope_type="llama3",
        factor=float(params["factor"]),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            params.get("original_max_position_embeddings", raw.get("max_position_embeddings", 8192))
        ),
    )
