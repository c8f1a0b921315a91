"""`import_gguf`: a GGUF file (llama.cpp, Ollama) -> a Hugging Face Llama-family checkpoint the node can serve.

    out_dir/config.json, model.safetensors, generation_config.json     dequantized weights, in the dtype asked
    out_dir/tokenizer.json, tokenizer_config.json, chat_template.jinja tokenizer and chat template from the GGUF
    out_dir/gguf_import.json                                           provenance (below)

The GGUF header is read first (the `gguf` package): the architecture and every tensor's quantization type
must be ones this importer supports, else `GGUFImportError` names what was found and what is supported, before
any weight is read. `transformers` then dequantizes the tensors (undoing llama.cpp's q/k row permutation) and
converts the tokenizer; the checkpoint is written without its GGUF quantization config, so that it loads as a
plain checkpoint, with a tied `lm_head` left to the config (`tie_word_embeddings`), as `save_pretrained` does.

Provenance (`gguf_import.json`): the source file's name, size and sha256, the GGUF architecture, file type
(`general.file_type`, e.g. `MOSTLY_Q4_1`) and the count of tensors per quantization type, the dtype written,
the library versions that did the conversion, and the base model hash of the result
(`loraledger.inference.identity.base_model_hash`). The provenance file is not part of that hash.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from loraledger.inference.errors import ModelLoadError
from loraledger.inference.identity import ContentHash, base_model_hash

log = logging.getLogger(__name__)

PROVENANCE_FILE = "gguf_import.json"
PROVENANCE_FORMAT = "loraledger.gguf-import.v1"

# GGUF `general.architecture` values whose tensors map onto the runner (inference/model.py).
SUPPORTED_ARCHITECTURES: tuple[str, ...] = ("llama",)
# Tensor types the importer dequantizes: plain floats, the legacy block formats and the K-quants.
SUPPORTED_TENSOR_TYPES: tuple[str, ...] = (
    "F32", "F16", "BF16",
    "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
)
OUTPUT_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_CHUNK = 1 << 24


class GGUFImportError(ModelLoadError):
    """A GGUF file cannot be imported: not a GGUF file, an unsupported architecture or quantization type, or
    an output directory that already holds a checkpoint."""


@dataclass(frozen=True)
class GGUFHeader:
    """What the importer checks before reading any weight."""

    architecture: str
    name: str | None
    file_type: str | None
    tensor_types: dict[str, int]
    tensor_count: int


@dataclass(frozen=True)
class ImportResult:
    out_dir: Path
    base_model_hash: ContentHash
    provenance: dict[str, Any]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _field_value(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return None
    return field.contents()


def read_header(path: str | Path) -> GGUFHeader:
    """Read a GGUF file's architecture and tensor types; `GGUFImportError` if it is not a readable GGUF file."""
    import gguf

    src = Path(path)
    if not src.is_file():
        raise GGUFImportError(f"{src}: no such file; pass the path of a .gguf model file")
    try:
        reader = gguf.GGUFReader(str(src))
    except (ValueError, OSError, EOFError) as e:
        raise GGUFImportError(f"{src} is not a readable GGUF file ({e}); pass a GGUF v2/v3 model file") from e
    arch = _field_value(reader, "general.architecture")
    if not isinstance(arch, str):
        raise GGUFImportError(f"{src} has no general.architecture key; it is not a GGUF model file")
    raw_type = _field_value(reader, "general.file_type")
    file_type: str | None = None
    if raw_type is not None:
        try:
            file_type = gguf.LlamaFileType(int(raw_type)).name
        except ValueError:
            file_type = f"unknown({int(raw_type)})"
    name = _field_value(reader, "general.name")
    types = Counter(t.tensor_type.name for t in reader.tensors)
    return GGUFHeader(
        architecture=arch,
        name=name if isinstance(name, str) else None,
        file_type=file_type,
        tensor_types=dict(sorted(types.items())),
        tensor_count=len(reader.tensors),
    )


def check_supported(header: GGUFHeader, source: Path) -> None:
    """`GGUFImportError` naming an unsupported architecture or quantization type."""
    if header.architecture not in SUPPORTED_ARCHITECTURES:
        raise GGUFImportError(
            f"{source.name}: GGUF architecture {header.architecture!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} (Llama-family models)"
        )
    if header.tensor_count == 0:
        raise GGUFImportError(f"{source.name} holds no tensors; it is a vocabulary-only GGUF, not a model")
    bad = sorted(t for t in header.tensor_types if t not in SUPPORTED_TENSOR_TYPES)
    if bad:
        raise GGUFImportError(
            f"{source.name}: quantization type(s) {', '.join(bad)} not supported "
            f"({sum(header.tensor_types[t] for t in bad)} tensors); supported: {', '.join(SUPPORTED_TENSOR_TYPES)}. "
            "Re-quantize the model to one of these with llama.cpp's llama-quantize"
        )


def _versions() -> dict[str, str]:
    return {pkg: metadata.version(pkg) for pkg in ("gguf", "transformers", "torch", "safetensors")}


def import_gguf(
    gguf_file: str | Path, out_dir: str | Path, dtype: str = "float32", overwrite: bool = False
) -> ImportResult:
    """Convert `gguf_file` into a safetensors checkpoint in `out_dir` (see the module docstring)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in OUTPUT_DTYPES:
        raise GGUFImportError(f"dtype {dtype!r} is not supported; choose one of {', '.join(OUTPUT_DTYPES)}")
    src = Path(gguf_file).resolve()
    header = read_header(src)
    check_supported(header, src)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise GGUFImportError(f"{out} exists and is not a directory; choose an output directory")
    if (out / "config.json").exists() and not overwrite:
        raise GGUFImportError(
            f"{out} already holds a checkpoint (config.json); choose another directory or overwrite it (--force)"
        )
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("*.safetensors"), out / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)  # overwriting: no shard of the old checkpoint may enter the new hash

    sha = file_sha256(src)
    log.info("importing %s (%s, %s) into %s as %s", src.name, header.architecture, header.file_type, out, dtype)
    folder, name = str(src.parent), src.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=OUTPUT_DTYPES[dtype])
    # The weights are dequantized now: the GGUF quantization config would make loaders look for the GGUF file.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None  # type: ignore[assignment]  # (nn.Module attribute typing)
    model.config.dtype = OUTPUT_DTYPES[dtype]
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if not tokenizer.chat_template:
        log.warning("%s carries no chat template; chat requests to this model will be refused", src.name)

    config = json.loads((out / "config.json").read_text())
    if "quantization_config" in config:  # belt and braces: a saved GGUF quantization config is never wanted
        del config["quantization_config"]
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    model_hash = base_model_hash(out)
    provenance: dict[str, Any] = {
        "format": PROVENANCE_FORMAT,
        "source": {"file": src.name, "bytes": src.stat().st_size, "sha256": "0x" + sha},
        "gguf": {
            "architecture": header.architecture,
            "name": header.name,
            "file_type": header.file_type,
            "tensor_types": header.tensor_types,
            "tensor_count": header.tensor_count,
        },
        "dtype": dtype,
        "base_model_hash": model_hash,
        "software": _versions(),
    }
    (out / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")
    return ImportResult(out_dir=out, base_model_hash=model_hash, provenance=provenance)
