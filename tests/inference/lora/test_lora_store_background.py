"""The adapter store's loader thread (`background_loads=True`): prefetched adapters become CPU hits, a key
still loading makes acquire return None without blocking, a failed background load fails only the requests
that need that adapter (same error as a synchronous load) and never poisons a slot. Real adapters on disk,
a real tiny model, a real engine."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from loraledger.inference.engine import Engine
from loraledger.inference.engine_config import EngineConfig
from loraledger.inference.errors import AdapterFormatError, AdapterMismatchError
from loraledger.inference.loader import load_model
from loraledger.inference.lora.adapter import BaseDims
from loraledger.inference.lora.layers import apply_lora
from loraledger.inference.lora.store import AdapterStore
from loraledger.inference.requests import GenerationRequest
from loraledger.inference.sequence import SamplingParams

N_ADAPTERS = 40


@pytest.fixture(scope="module")
def adapter_dirs(tiny_model_dir: Path, make_adapter: Any, derive_adapter: Any,
                 tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """N_ADAPTERS PEFT adapter dirs for the tiny checkpoint (one peft-saved template, the rest derived)."""
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    root = tmp_path_factory.mktemp("bg")
    template = make_adapter(hf, root / "template", r=4, alpha=8, seed=1, std=0.1)
    return [template] + [derive_adapter(template, root / f"a{i:03d}", seed=i, rank=(2, 4, 8)[i % 3])
                         for i in range(1, N_ADAPTERS)]


@pytest.fixture()
def corrupt_dir(adapter_dirs: list[Path], tmp_path: Path) -> Path:
    """A valid adapter_config.json next to a weights file that is not safetensors."""
    d = tmp_path / "corrupt"
    d.mkdir()
    (d / "adapter_config.json").write_text((adapter_dirs[0] / "adapter_config.json").read_text())
    (d / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    return d


def _store(tiny_model_dir: Path, num_slots: int) -> tuple[Any, AdapterStore]:
    model = load_model(tiny_model_dir, dtype="fp32", device="cpu")
    slots = apply_lora(model, num_slots=num_slots, max_rank=8, backend="torch")
    return model, AdapterStore(slots, BaseDims.from_model_config(model.config), background_loads=True)


@pytest.fixture()
def bg_store(tiny_model_dir: Path, adapter_dirs: list[Path]) -> Iterator[AdapterStore]:
    _, store = _store(tiny_model_dir, num_slots=2)
    for i, d in enumerate(adapter_dirs):
        store.register(f"k{i}", d)
    yield store
    store.close()


def test_prefetched_adapter_is_a_cpu_hit(bg_store: AdapterStore) -> None:
    store = bg_store
    store.prefetch(["k1", "k2"])
    assert store.wait_for_loads(timeout=30)
    assert store.loading() == []
    tiers = {i.key: i.tier for i in store.adapters()}
    assert tiers["k1"] == tiers["k2"] == "cpu" and tiers["k3"] == "disk"
    assert store.stats.prefetch_loads == 2 and store.stats.disk_loads == 2
    slots = store.acquire(["k1"])
    assert slots is not None
    assert store.stats.cpu_hits == 1 and store.stats.disk_loads == 2  # no disk read inside acquire
    store.release(["k1"])
    assert store.pinned() == {}


def test_key_still_loading_returns_none_without_blocking_others(bg_store: AdapterStore) -> None:
    store = bg_store
    (s0,) = store.acquire(["k0"])  # synchronous: nothing queued for it
    store.release(["k0"])
    queued = [f"k{i}" for i in range(1, N_ADAPTERS)]
    store.prefetch(queued)  # the loader works through them one by one, off this thread
    last = queued[-1]
    assert store.acquire([last]) is None  # still queued: the request waits, nothing changed
    assert store.resident() == {s0: "k0"} and store.pinned() == {}
    assert store.acquire(["k0"]) == (s0,)  # another request's adapter is served meanwhile
    store.release(["k0"])
    assert store.wait_for_loads(timeout=60)
    before = store.stats.disk_loads
    assert store.acquire([last]) is not None
    assert store.stats.disk_loads == before  # a CPU hit once loaded
    store.release([last])


def test_failed_background_load_fails_only_its_key(bg_store: AdapterStore, corrupt_dir: Path,
                                                   adapter_dirs: list[Path]) -> None:
    store = bg_store
    store.register("corrupt", corrupt_dir)
    store.register("wrong-hash", adapter_dirs[1], weights_hash="0x" + "00" * 32)
    store.prefetch(["corrupt", "wrong-hash", "k1"])
    assert store.wait_for_loads(timeout=30)
    assert store.stats.load_failures == 2
    with pytest.raises(AdapterFormatError, match="not a readable safetensors"):
        store.acquire(["corrupt"])
    with pytest.raises(AdapterMismatchError, match="weights hash"):
        store.acquire(["k1", "wrong-hash"])
    assert store.resident() == {} and store.pinned() == {}  # no slot was touched by the failures
    assert store.acquire(["k1"]) is not None  # the good one prefetched alongside is served
    with pytest.raises(AdapterFormatError):  # the kept failure was consumed: a later acquire retries from disk
        store.acquire(["corrupt"])
    store.release(["k1"])


def test_unload_while_loading_discards_the_result(bg_store: AdapterStore) -> None:
    store = bg_store
    queued = [f"k{i}" for i in range(1, N_ADAPTERS)]
    store.prefetch(queued)
    store.unload(queued[-1])
    assert store.wait_for_loads(timeout=60)
    assert queued[-1] not in store.cpu_keys() and queued[-1] not in {i.key for i in store.adapters()}


def test_engine_slow_and_failed_loads_do_not_block_other_requests(
    tiny_model_dir: Path, adapter_dirs: list[Path], corrupt_dir: Path
) -> None:
    """One slot: request 0 holds it; 1 and 2 wait for the slot and get their adapters prefetched on the loader
    thread; 2's adapter is corrupt and fails 2 alone; 3 has no adapter and runs from the first step."""
    model, store = _store(tiny_model_dir, num_slots=1)
    store.register("a", adapter_dirs[0])
    store.register("b", adapter_dirs[1])
    store.register("corrupt", corrupt_dir)
    engine = Engine(EngineConfig(model_dir=tiny_model_dir, dtype="float32", device="cpu", block_size=4,
                                 num_blocks=64), adapter_slots=store, model=model)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    try:
        results = engine.generate([
            GenerationRequest([7, 8, 9], params, adapters=(("a", 1.0),)),
            GenerationRequest([10, 11], params, adapters=(("b", 1.0),)),
            GenerationRequest([12, 13, 14], params, adapters=(("corrupt", 1.0),)),
            GenerationRequest([15, 16], params),
        ])
    finally:
        store.close()
    ok = [results[i] for i in (0, 1, 3)]
    assert all(r.finish_reason == "length" and len(r.token_ids) == 4 for r in ok)
    assert results[2].finish_reason == "error" and results[2].error is not None
    assert "not a readable safetensors" in results[2].error
    assert store.stats.prefetch_loads >= 1  # "b" came through the loader thread
    assert store.pinned() == {} and set(store.resident().values()) <= {"a", "b"}
