"""What a CUDA graph captures is safe to replay, checked on the CPU.

A graph records one run of the fixed-shape decode step (`DecodeGraphRunner._capture`: the model's forward and
its logits over the static batch) and replays its kernels, over the same addresses, with the same scalar
arguments, every step after. Two things break that, and neither shows on the CPU in plain runs:

- reading device values on the host inside the step (`.item()`, `.tolist()`, `bool(t)`, `nonzero`, boolean
  masks, a new tensor from host data): capture fails with "operation not permitted when stream is capturing";
- anything the step reads that changes from step to step outside the static buffers (a per-step host value
  passed as a kernel argument, a tensor made fresh before the forward): the replay keeps the captured one.

So the engine runs in "static" mode (the same padded step, uncaptured) on the Triton backends the graphs use
(attention, fused layer ops, BGMV over `static_lora_indices`), and every static step is traced at the torch
dispatcher and at each Triton launch. The test asserts no host read happens, and that all steps of one
(bucket, merge columns) key issue the same op sequence with the same scalars over the same external storages,
as a replay would, while their contents (tokens, positions, adapters, contexts) differ."""

from __future__ import annotations

import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from loraledger.inference.attention import TritonPagedAttention
from loraledger.inference.engine import Engine
from loraledger.inference.engine_config import EngineConfig
from loraledger.inference.loader import load_model
from loraledger.inference.lora.adapter import BaseDims
from loraledger.inference.lora.layers import apply_lora
from loraledger.inference.lora.store import AdapterStore
from loraledger.inference.requests import GenerationRequest
from loraledger.inference.sequence import SamplingParams

# Python-level tensor calls that read device memory on the host, or make a device tensor from host data
HOST_CALLS = {"tolist", "item", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu", "tensor",
              "as_tensor", "nonzero", "unique", "masked_select"}
# aten ops that synchronize with the host or have data-dependent output shapes
HOST_OPS = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.unique", "aten._unique",
            "aten.is_nonzero", "aten.equal", "aten.repeat_interleave.Tensor")


class StepTracer:
    """Traces a code region: every aten op and Triton launch as (name, normalized arguments), and every host
    read as a violation (with where it happened). Tensors are normalized to (shape, stride, dtype, storage),
    the storage named by its address when it existed before the region (an external: weights, caches, the
    static buffers) and by its allocation order when the region made it."""

    def __init__(self) -> None:
        self.trace: list[tuple[Any, ...]] = []
        self.violations: list[str] = []
        self._new: dict[int, int] = {}  # storage address -> allocation order, for storages the region made
        self._ext: set[int] = set()  # storages read that existed before the region
        self._allocations = 0
        self.paused = False

    def storage(self, t: torch.Tensor) -> tuple[str, int]:
        ptr = t.untyped_storage().data_ptr()
        if ptr in self._new:
            return ("new", self._new[ptr])
        self._ext.add(ptr)
        return ("ext", ptr)

    def norm(self, x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return ("T", tuple(x.shape), tuple(x.stride()), x.storage_offset(), str(x.dtype), self.storage(x))
        if isinstance(x, (list, tuple)):
            return tuple(self.norm(v) for v in x)
        if isinstance(x, dict):
            return tuple((k, self.norm(v)) for k, v in sorted(x.items()))
        if isinstance(x, (int, float, bool, str, type(None), torch.dtype, torch.device, torch.layout)):
            return x
        return type(x).__name__

    def produced(self, out: Any, inputs: Any) -> None:
        """Name the fresh storages among an op's outputs (not a view or in-place result of an input) by their
        allocation order; an address the allocator hands out again gets the new name."""
        reused = {t.untyped_storage().data_ptr() for t in tree_flatten(inputs)[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                ptr = t.untyped_storage().data_ptr()
                if ptr not in reused and ptr not in self._ext:
                    self._new[ptr] = self._allocations
                    self._allocations += 1

    def violation(self, what: str) -> None:
        frames = [f for f in traceback.extract_stack() if "/tests/" not in f.filename
                  and ("/inference/" in f.filename or "/kernels/" in f.filename)]
        where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
        self.violations.append(f"{what} at {where}")


class _Functions(TorchFunctionMode):
    def __init__(self, tracer: StepTracer) -> None:
        super().__init__()
        self.tracer = tracer

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if not self.tracer.paused and getattr(func, "__name__", "") in HOST_CALLS:
            self.tracer.violation(f"host call {func.__name__}")
        return func(*args, **(kwargs or {}))


class _Dispatch(TorchDispatchMode):
    def __init__(self, tracer: StepTracer) -> None:
        super().__init__()
        self.tracer = tracer

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        tr = self.tracer
        if tr.paused:
            return func(*args, **kwargs)
        name = str(func)
        if name.startswith(HOST_OPS):
            tr.violation(f"host op {name}")
        if name.startswith("aten.index.Tensor") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in tree_flatten(args[1:])[0]
        ):
            tr.violation("boolean-mask indexing (aten.index with a bool tensor)")
        entry = (name, tr.norm(args), tr.norm(kwargs))
        out = func(*args, **kwargs)
        tr.produced(out, (args, kwargs))
        tr.trace.append((*entry, tr.norm(out)))
        return out


@contextmanager
def traced(tracer: StepTracer) -> Iterator[None]:
    """Trace torch calls and Triton launches (recorded, then run with tracing paused: the interpreter itself
    reads tensors on the host) inside the block."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    originals = {cls: cls.run for cls in (JITFunction, InterpretedFunction)}

    def launcher(cls: type) -> Any:
        def run(self: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
            name = self.fn.__name__
            tracer.trace.append(("triton:" + name, tracer.norm(grid), tracer.norm(args), tracer.norm(kwargs)))
            tracer.paused = True
            try:
                return originals[cls](self, *args, grid=grid, warmup=warmup, **kwargs)
            finally:
                tracer.paused = False
        return run

    for cls in originals:
        cls.run = launcher(cls)  # type: ignore[method-assign]
    try:
        with _Functions(tracer), _Dispatch(tracer):
            yield
    finally:
        for cls, run in originals.items():
            cls.run = run  # type: ignore[method-assign]


def trace_static_steps(model: Any) -> dict[tuple[int, int], list[StepTracer]]:
    """Hooks on `model`: each forward over a static batch, through its `compute_logits` (what `_capture`
    records), is traced; the traces are collected per (bucket P, merge columns M)."""
    steps: dict[tuple[int, int], list[StepTracer]] = {}
    state: dict[str, Any] = {}
    plain_logits = model.compute_logits

    def pre(_m: Any, args: tuple[Any, ...]) -> None:
        batch = args[0]
        if batch.static:
            tracer = StepTracer()
            key = (batch.num_seqs, batch.token_adapter_slots.shape[1])
            steps.setdefault(key, []).append(tracer)
            cm = traced(tracer)
            cm.__enter__()
            state["cm"] = cm

    def logits(hidden: torch.Tensor) -> torch.Tensor:
        out = plain_logits(hidden)
        cm = state.pop("cm", None)
        if cm is not None:
            cm.__exit__(None, None, None)
        return out

    model.register_forward_pre_hook(pre)
    model.compute_logits = logits
    return steps


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path, make_adapter: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    root = tmp_path_factory.mktemp("capture")
    return {"r4": make_adapter(hf, root / "r4", r=4, alpha=8, seed=1, std=0.1),
            "r16": make_adapter(hf, root / "r16", r=16, alpha=16, seed=2, std=0.1)}


def test_static_steps_read_nothing_on_the_host_and_replay_alike(tiny_model_dir: Path,
                                                                adapters: dict[str, Path]) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the Triton kernels run interpreted
    model = load_model(tiny_model_dir, dtype="fp32", device=device)
    model.set_layer_ops("triton")
    slots = apply_lora(model, num_slots=4, max_rank=16, backend="triton")
    store = AdapterStore(slots, BaseDims.from_model_config(model.config))
    for k, d in adapters.items():
        store.register(k, d)
    eng = Engine(EngineConfig(model_dir=tiny_model_dir, device=device, block_size=4, num_blocks=128, max_num_seqs=8,
                              decode_graphs="static", attention_backend="triton"), adapter_slots=store, model=model)
    model.attention = TritonPagedAttention(num_sms=132)  # split-KV decoding as an H100 would choose it
    steps = trace_static_steps(model)
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    g = torch.Generator().manual_seed(3)
    rounds = [  # three requests each (bucket 4), differing in prompts, adapters and merges
        [(5, [("r4", 1.0)]), (9, []), (3, [("r16", 1.0)])],
        [(11, [("r16", 1.0)]), (2, [("r4", 1.0)]), (7, [("r4", 1.0)])],
        [(4, [("r4", 0.5), ("r16", 0.5)]), (6, [("r16", 1.0)]), (13, [])],
        [(8, [("r16", 0.25), ("r4", 0.75)]), (3, [("r4", 1.0)]), (10, [("r4", 0.5), ("r16", 0.5)])],
    ]
    for reqs in rounds:
        eng.generate([GenerationRequest(torch.randint(6, 512, (n,), generator=g).tolist(), params, adapters=a)
                      for n, a in reqs])
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks

    assert {(4, 1), (4, 2)} <= set(steps), sorted(steps)  # one- and two-column steps were traced
    for key, tracers in sorted(steps.items()):
        assert len(tracers) >= 4, (key, len(tracers))
        for t in tracers:
            assert not t.violations, f"{key}: " + "; ".join(sorted(set(t.violations)))
        first = tracers[0].trace
        assert any(e[0] == "triton:_bgmv_shrink_kernel" for e in first) == (key[1] > 0)
        assert any(e[0] == "triton:_paged_decode_split_kernel" for e in first)  # the graph's full-width context
        for i, t in enumerate(tracers[1:], 1):
            diff = next((j for j, (a, b) in enumerate(zip(first, t.trace)) if a != b), None)
            assert diff is None and len(t.trace) == len(first), (
                f"{key}: step {i} differs from step 0 at op {diff}: {first[diff] if diff is not None else ''} vs "
                f"{t.trace[diff] if diff is not None else len(t.trace)}"
            )


def test_the_tracer_catches_host_reads_and_per_step_inputs() -> None:
    """The checks above can fail: a host read is reported, and a tensor made fresh each step (what a replay
    would not see) makes two traces differ."""
    weights = torch.randn(4, 4)
    bad = StepTracer()
    with traced(bad):
        y = weights @ torch.ones(4)
        if y.sum() > 0:  # bool() of a device value
            y = y * 2
        _ = y.max().item()
        _ = y[y > 0]
    found = " ".join(bad.violations)
    assert "__bool__" in found and "item" in found and "boolean-mask" in found

    traces = []
    keep = []
    for step in range(2):
        fresh = torch.full((4,), float(step))  # made per step outside the region, read inside it
        keep.append(fresh)
        t = StepTracer()
        with traced(t):
            _ = weights @ fresh
        traces.append(t.trace)
    assert traces[0] != traces[1]
    same = []
    for _step in range(2):
        t = StepTracer()
        with traced(t):
            _ = weights @ keep[0]
        same.append(t.trace)
    assert same[0] == same[1]
