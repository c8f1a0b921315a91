"""Fixtures of the node-process tests: the tiny checkpoint, random PEFT adapters for it, and a thread that hosts
grpc.aio servers on its own asyncio loop (so tests can drive clients from theirs).

Helpers are handed out as fixtures since test modules are imported with --import-mode=importlib."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch
from safetensors.torch import save_file

T = TypeVar("T")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama checkpoint + tokenizer (init_tiny defaults: 2 layers, hidden 64, vocab 512, context
    512). Read-only."""
    from inference.tiny import init_tiny

    return init_tiny(tmp_path_factory.mktemp("tiny") / "model")


def write_random_adapter(model_dir: Path, out_dir: Path, seed: int, r: int = 4,
                         targets: tuple[str, ...] = ("q_proj", "v_proj")) -> Path:
    """A PEFT-format LoRA adapter for the checkpoint in `model_dir`: A ~ N(0, 0.3) [r, in], B ~ N(0, 0.3) [out, r]
    for `targets` of every layer (strong enough to change greedy tokens)."""
    cfg = json.loads((model_dir / "config.json").read_text())
    h, heads, kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    shapes = {"q_proj": (h, h), "k_proj": (h, kv * h // heads), "v_proj": (h, kv * h // heads), "o_proj": (h, h)}
    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(cfg["num_hidden_layers"]):
        for t in targets:
            fan_in, fan_out = shapes[t]
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{t}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(r, fan_in, generator=g) * 0.3
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, r, generator=g) * 0.3
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": list(targets), "bias": "none"}))
    save_file(tensors, str(out_dir / "adapter_model.safetensors"))
    return out_dir


@pytest.fixture(scope="session")
def random_adapter() -> Callable[..., Path]:
    """`write_random_adapter(model_dir, out_dir, seed, r=4, targets=...)`."""
    return write_random_adapter


class LoopThread:
    """An asyncio event loop running on a daemon thread; `run(coro)` executes a coroutine there and waits."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-grpc-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 120.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def server_loop() -> Iterator[LoopThread]:
    """A loop thread for the module's servers, stopped at the end of the module."""
    lt = LoopThread()
    yield lt
    lt.close()
