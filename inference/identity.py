"""Content identities (docs/ARCHITECTURE.md, "Identities"): adapter weights hash, base model hash, config hash.

Every hash is sha256, written `0x` + 64 lowercase hex (a `bytes32` on chain).

Canonical tensor hash, byte framing (version 1). For a set of named tensors, sha256 over:

    b"loraledger.tensors.v1\\0"
    u64 number of tensors
    for name in sorted(names, by UTF-8 bytes):
        u32 len(name_utf8)   name_utf8
        u32 len(dtype)       dtype          # safetensors dtype name in ASCII: "F32", "BF16", "F16", "I64", ...
        u32 ndim             u64 dim[0] .. u64 dim[ndim-1]
        u64 nbytes           raw bytes      # C-contiguous, little-endian elements
    (all integers little-endian)

Length prefixes make the framing unambiguous (no name/dtype/shape/data boundary can be shifted), so any
change of a tensor byte, name, dtype or shape changes the hash, while re-saving the same tensors (another
file order, other metadata, other shard split) does not. `tensors_hash` (in-memory torch tensors) and
`safetensors_files_hash` (files, read without converting) give the same digest for the same tensors.

Base model hash: sha256(b"loraledger.base.v1\\0" || tensors_digest || sha256(canonical config.json)), over all
`*.safetensors` of the checkpoint dir; cached in `<model_dir>/.loraledger-hash.json`, keyed by the size and
mtime of every hashed file, because hashing a large model takes time.

Config hash: sha256 of the canonical JSON (sorted keys, separators "," and ":", UTF-8, no NaN).
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import struct
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NewType

import torch

from loraledger.inference.errors import AdapterFormatError, EngineError, ModelLoadError

log = logging.getLogger(__name__)

ContentHash = NewType("ContentHash", str)
"""`0x` + 64 lowercase hex digits: a sha256 digest as stored on chain (bytes32)."""

TENSORS_MAGIC = b"loraledger.tensors.v1\0"
BASE_MAGIC = b"loraledger.base.v1\0"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
HASH_CACHE_FILE = ".loraledger-hash.json"
_CACHE_VERSION = 1
_CHUNK = 1 << 24  # bytes hashed per update when streaming a file

# torch dtype -> safetensors dtype name (the dtype string of the framing).
_TORCH_TO_ST: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}


def to_hex(digest: bytes) -> ContentHash:
    """32-byte digest -> `0x` + 64 hex."""
    if len(digest) != 32:
        raise ValueError(f"a content hash is 32 bytes, got {len(digest)}")
    return ContentHash("0x" + digest.hex())


def parse_hash(value: str) -> ContentHash:
    """Validate and normalise a `0x` + 64 hex string (case-insensitive); raise ValueError naming the problem."""
    if not isinstance(value, str) or not value.startswith(("0x", "0X")) or len(value) != 66:
        raise ValueError(f"expected a content hash as '0x' + 64 hex digits, got {value!r}")
    try:
        bytes.fromhex(value[2:])
    except ValueError as e:
        raise ValueError(f"content hash {value!r} has non-hex digits") from e
    return ContentHash("0x" + value[2:].lower())


def _frame_header(name: str, dtype: str, shape: Iterable[int], nbytes: int) -> bytes:
    """The framing bytes that precede one tensor's raw data (see the module docstring)."""
    name_b = name.encode("utf-8")
    dtype_b = dtype.encode("ascii")
    dims = list(shape)
    parts = [struct.pack("<I", len(name_b)), name_b, struct.pack("<I", len(dtype_b)), dtype_b]
    parts.append(struct.pack("<I", len(dims)))
    parts.extend(struct.pack("<Q", int(d)) for d in dims)
    parts.append(struct.pack("<Q", nbytes))
    return b"".join(parts)


def _sorted_names(names: Iterable[str]) -> list[str]:
    return sorted(names, key=lambda n: n.encode("utf-8"))


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """Canonical 32-byte digest of in-memory tensors (module docstring framing)."""
    if sys.byteorder != "little":
        raise EngineError("canonical tensor hashing assumes a little-endian host")
    h = hashlib.sha256(TENSORS_MAGIC)
    h.update(struct.pack("<Q", len(tensors)))
    for name in _sorted_names(tensors):
        t = tensors[name]
        if t.dtype not in _TORCH_TO_ST:
            raise ValueError(f"tensor {name!r}: dtype {t.dtype} has no canonical name; convert it first")
        data = t.detach().to("cpu").contiguous()
        raw = data.reshape(-1).view(torch.uint8).numpy()  # a view: hashlib reads the buffer without a copy
        h.update(_frame_header(name, _TORCH_TO_ST[t.dtype], data.shape, raw.nbytes))
        h.update(raw.data)
    return h.digest()


def tensors_hash(tensors: Mapping[str, torch.Tensor]) -> ContentHash:
    """`0x` hex of `tensors_digest`."""
    return to_hex(tensors_digest(tensors))


def _read_safetensors_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(data_start, header) of a safetensors file; header maps name -> {dtype, shape, data_offsets}."""
    try:
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) != 8:
                raise ValueError("file shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", prefix)
            if n > os.path.getsize(path) - 8:
                raise ValueError(f"header length {n} exceeds the file")
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
    if not isinstance(header, dict):
        raise ValueError(f"{path}: safetensors header is not a JSON object")  # noqa: TRY004 - a malformed file
    header.pop("__metadata__", None)
    return 8 + n, header


def safetensors_files_digest(paths: Iterable[Path]) -> bytes:
    """Canonical digest over the union of tensors in safetensors files, read without conversion.

    Raises ValueError for a malformed file, a tensor name present in two files, or offsets outside the file.
    """
    if sys.byteorder != "little":
        raise EngineError("canonical tensor hashing assumes a little-endian host")
    entries: dict[str, tuple[Path, int, dict[str, Any]]] = {}
    for path in paths:
        start, header = _read_safetensors_header(path)
        for name, info in header.items():
            if name in entries:
                raise ValueError(f"tensor {name!r} appears in both {entries[name][0]} and {path}")
            entries[name] = (path, start, info)
    h = hashlib.sha256(TENSORS_MAGIC)
    h.update(struct.pack("<Q", len(entries)))
    maps: dict[Path, mmap.mmap | None] = {}
    files = []
    try:
        for name in _sorted_names(entries):
            path, start, info = entries[name]
            try:
                dtype, shape, (lo, hi) = str(info["dtype"]), list(info["shape"]), info["data_offsets"]
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{path}: tensor {name!r} has a malformed header entry") from e
            if path not in maps:
                f = path.open("rb")
                files.append(f)
                size = os.path.getsize(path)
                maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
            mm = maps[path]
            size = len(mm) if mm is not None else 0
            if not (0 <= lo <= hi and start + hi <= size):
                raise ValueError(f"{path}: tensor {name!r} offsets {lo}..{hi} lie outside the file")
            h.update(_frame_header(name, dtype, shape, hi - lo))
            for off in range(start + lo, start + hi, _CHUNK):
                assert mm is not None
                h.update(mm[off : min(off + _CHUNK, start + hi)])
    finally:
        for mm in maps.values():
            if mm is not None:
                mm.close()
        for f in files:
            f.close()
    return h.digest()


def weights_hash(adapter_dir: str | os.PathLike[str]) -> ContentHash:
    """Adapter weights hash: canonical digest of the tensors in `<adapter_dir>/adapter_model.safetensors`."""
    path = Path(adapter_dir) / ADAPTER_WEIGHTS_FILE
    if not path.is_file():
        raise AdapterFormatError(f"{adapter_dir}: no {ADAPTER_WEIGHTS_FILE}; an adapter dir needs it (PEFT format)")
    try:
        return to_hex(safetensors_files_digest([path]))
    except ValueError as e:
        raise AdapterFormatError(f"{adapter_dir}: cannot hash the adapter weights: {e}") from e


def canonical_json(obj: Any) -> bytes:
    """Canonical JSON bytes: sorted keys, no spaces, UTF-8, NaN/Infinity refused."""
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode(
            "utf-8"
        )
    except ValueError as e:
        raise ValueError(f"config cannot be written as canonical JSON: {e}") from e


def config_hash(config: Mapping[str, Any]) -> ContentHash:
    """sha256 of `canonical_json(config)`."""
    return to_hex(hashlib.sha256(canonical_json(dict(config))).digest())


def _model_files(model_dir: Path) -> tuple[Path, list[Path]]:
    config = model_dir / "config.json"
    if not config.is_file():
        raise ModelLoadError(f"{model_dir}: no config.json; pass a Hugging Face checkpoint directory")
    shards = sorted(p for p in model_dir.glob("*.safetensors") if p.is_file())
    if not shards:
        raise ModelLoadError(f"{model_dir}: no *.safetensors weights; convert the checkpoint to safetensors")
    return config, shards


def _file_keys(paths: list[Path]) -> dict[str, list[int]]:
    return {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in paths}


def base_model_hash(model_dir: str | os.PathLike[str], use_cache: bool = True) -> ContentHash:
    """Base model hash: sha256(BASE_MAGIC || tensors_digest(all shards) || sha256(canonical config.json)).

    With `use_cache`, the result is read from / written to `<model_dir>/.loraledger-hash.json` when the size and
    mtime of config.json and every shard are unchanged; an unwritable dir only skips the cache write.
    """
    root = Path(model_dir)
    config, shards = _model_files(root)
    keys = _file_keys([config, *shards])
    cache_path = root / HASH_CACHE_FILE
    if use_cache and cache_path.is_file():
        try:
            cached = json.loads(cache_path.read_text())
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable hash cache %s: %s", cache_path, e)
            cached = None
        if isinstance(cached, dict) and cached.get("version") == _CACHE_VERSION and cached.get("files") == keys:
            try:
                return parse_hash(str(cached.get("base_model_hash")))
            except ValueError as e:
                log.warning("ignoring hash cache %s: %s", cache_path, e)
    try:
        config_obj = json.loads(config.read_text(encoding="utf-8"))
        config_digest = hashlib.sha256(canonical_json(config_obj)).digest()
        tensors = safetensors_files_digest(shards)
    except ValueError as e:
        raise ModelLoadError(f"{model_dir}: cannot hash the checkpoint: {e}") from e
    result = to_hex(hashlib.sha256(BASE_MAGIC + tensors + config_digest).digest())
    if use_cache:
        record = {"version": _CACHE_VERSION, "files": keys, "base_model_hash": result}
        try:
            cache_path.write_text(json.dumps(record, sort_keys=True, indent=1))
        except OSError as e:  # read-only checkpoint: hashing still works, only the cache is skipped
            log.warning("cannot write hash cache %s: %s", cache_path, e)
    return result
