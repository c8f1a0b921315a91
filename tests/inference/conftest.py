"""Fixtures of the engine tests: the tiny checkpoint (written once per session) and its loaded runner.

Without CUDA, Triton kernels run in the interpreter. Triton reads TRITON_INTERPRET when a kernel (and its own
standard library: tl.max, tl.sum, ...) is decorated, i.e. on first import, and importing a transformers model
already imports triton (through torch._dynamo); so the flag is set here, before any test module is imported.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from loraledger.inference.loader import load_model
from loraledger.inference.model import LlamaModel
from loraledger.inference.tiny import init_tiny


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama checkpoint + tokenizer (init_tiny defaults: 2 layers, hidden 64, vocab 512, fp32).

    Shared by the whole session: treat it as read-only (copy it before editing files)."""
    return init_tiny(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir: Path) -> LlamaModel:
    """The runner loaded from `tiny_model_dir` in float32 on CPU with the torch attention backend.

    Shared: do not replace its layers in a test (load your own copy with `load_model` for that)."""
    return load_model(tiny_model_dir, dtype="fp32", device="cpu")
