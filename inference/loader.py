"""Load a local Hugging Face Llama-family checkpoint into `loraledger.inference.model.LlamaModel`.

    model_dir/config.json                                  -> ModelConfig (architecture checked there)
    model_dir/model.safetensors                            one file, or
    model_dir/model.safetensors.index.json + its shards    {"weight_map": {tensor name: shard file}}

Name mapping: checkpoint "model.X" -> runner "X"; "lm_head.weight" -> "lm_head.weight" (skipped when the config
ties it to the embedding). Tensors the runner has no place for (e.g. old `rotary_emb.inv_freq`) are ignored;
a runner parameter the checkpoint lacks, or a shape mismatch, is a `ModelLoadError` naming the tensor.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open

from loraledger.inference.attention import AttentionBackend, get_attention_backend
from loraledger.inference.config import ModelConfig, parse_dtype
from loraledger.inference.errors import ModelLoadError
from loraledger.inference.model import LlamaModel

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def checkpoint_name(param_name: str) -> str:
    """Runner parameter name -> checkpoint tensor name ("layers.0.mlp.up_proj.weight" -> "model.layers...")."""
    return param_name if param_name.startswith("lm_head.") else f"model.{param_name}"


def weight_files(model_dir: str | Path) -> dict[str, Path]:
    """Map each checkpoint tensor name to the safetensors file holding it; `ModelLoadError` if files are missing."""
    root = Path(model_dir)
    index = root / INDEX_FILE
    if index.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ModelLoadError(f"{index} is malformed (needs a 'weight_map' object): {e}") from e
        missing = sorted({f for f in weight_map.values() if not (root / f).is_file()})
        if missing:
            raise ModelLoadError(f"{index} names shard(s) not found in {root}: {', '.join(missing)}")
        return {name: root / f for name, f in weight_map.items()}
    single = root / SINGLE_FILE
    if not single.is_file():
        found = sorted(p.name for p in root.glob("*")) if root.is_dir() else []
        raise ModelLoadError(
            f"no weights in {root}: expected {SINGLE_FILE} or {INDEX_FILE} (safetensors only; "
            f"found: {', '.join(found) or 'nothing'})"
        )
    with safe_open(str(single), framework="pt") as f:
        return {name: single for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)


def load_model(
    model_dir: str | Path,
    dtype: str | torch.dtype | None = None,
    device: torch.device | str = "cpu",
    attention: AttentionBackend | None = None,
) -> LlamaModel:
    """Build the runner for `model_dir` and fill it with the checkpoint's tensors, cast to `dtype`.

    dtype: "fp32" | "bf16" | "fp16" (or a torch.dtype); None = the checkpoint's torch_dtype, else float32.
    The model is built on the meta device and materialised on `device`, so no random init is spent.
    """
    config = ModelConfig.from_pretrained(model_dir)
    target = parse_dtype(dtype) if dtype is not None else (config.dtype or torch.float32)
    files = weight_files(model_dir)
    with torch.device("meta"):
        model = LlamaModel(config, attention=attention or get_attention_backend(None, device))
    model.to(target).to_empty(device=device)
    model.tie_weights()  # leaving the meta device makes new Parameters, which unties lm_head

    params = dict(model.named_parameters())  # a tied lm_head.weight is listed once, as embed_tokens.weight
    by_file: dict[Path, list[str]] = {}
    for name in params:
        ckpt = checkpoint_name(name)
        if ckpt not in files:
            raise ModelLoadError(f"tensor {ckpt!r} is missing from the checkpoint in {model_dir}")
        by_file.setdefault(files[ckpt], []).append(name)
    for path, names in by_file.items():
        with safe_open(str(path), framework="pt") as f:
            for name in names:
                tensor = f.get_tensor(checkpoint_name(name))
                param = params[name]
                if tensor.shape != param.shape:
                    raise ModelLoadError(
                        f"tensor {checkpoint_name(name)!r} in {path.name} has shape {tuple(tensor.shape)}, "
                        f"the config implies {tuple(param.shape)}"
                    )
                with torch.no_grad():
                    param.copy_(tensor.to(target))
    unused = sorted(set(files) - {checkpoint_name(n) for n in params} - {"lm_head.weight"})
    if unused:
        log.debug("ignored %d checkpoint tensors the runner does not use: %s", len(unused), unused[:8])
    model.fuse_projections()  # q/k/v and gate/up as one GEMM each (their weights become views: no extra memory)
    model.eval()
    return model
