"""Compile every Triton kernel the engine launches for real GPU targets, on a machine without a GPU.

Triton's interpreter (how the tests run kernels on the CPU) checks what a kernel computes, not whether it
compiles: it accepts tile shapes `tl.dot` refuses, globals the compiler rejects, and tiles that overflow shared
memory. This script runs the engine on the CPU with the Triton backends (attention, fused layer ops, LoRA
kernels), at the shapes of the models we serve, with every launch recorded instead of run. Each distinct
specialization (the signature, constexprs, alignment and launch options Triton's JIT would key a compile on)
is then compiled ahead of time for each target, through ptxas, as Triton would on that GPU. The report lists
per variant its shared memory, registers and spills, and fails on any error or over-limit tile.

    python scripts/check_triton_compile.py                          # sizes 1b, llama3-8b, tiny; sm90 and sm80
    python scripts/check_triton_compile.py --sizes tiny --targets sm90 --out /tmp/report.json

Run it without TRITON_INTERPRET (it unsets it): the interpreter replaces the jit functions `tl.sum` and
friends are made of, and the compiler cannot use them then. The specialization step uses Triton's JIT
internals (`create_function_from_signature`, `JITFunction._pack_args`), stable within the pinned triton.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import io
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported (transformers imports it early)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from scripts.benchlib import machine_info

# Shapes of the served models; vocab is left small, since no Triton kernel sees it (embedding and lm_head are
# torch ops). head_dim = hidden / heads unless given.
SHAPES: dict[str, dict[str, int]] = {
    "tiny": {"hidden": 64, "heads": 4, "kv_heads": 2, "intermediate": 128},  # the GPU tests' model
    "1b": {"hidden": 2048, "heads": 32, "kv_heads": 8, "intermediate": 8192},  # Llama-3.2-1B: head_dim 64
    "llama3-8b": {"hidden": 4096, "heads": 32, "kv_heads": 8, "intermediate": 14336},  # head_dim 128, GQA 4
    "qwen2.5-7b": {"hidden": 3584, "heads": 28, "kv_heads": 4, "intermediate": 18944},  # head_dim 128, GQA 7
}
# (compute capability, shared memory a block may opt in to, in bytes), from CUDA's per-architecture tables
TARGETS: dict[str, tuple[int, int]] = {"sm90": (90, 232448), "sm80": (80, 166912), "sm89": (89, 101376)}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
LORA_RANKS = (8, 16, 64, 128)
SMS = 132  # the SM count split-KV decoding assumes (H100 / H200 SXM)


@dataclasses.dataclass
class Launch:
    kernel: Any  # triton.runtime.jit.JITFunction
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    where: str  # which exercise launched it


@contextlib.contextmanager
def recorded_launches(into: list[Launch], where: list[str]) -> Iterator[None]:
    """Every `kernel[grid](...)` appends a Launch and runs nothing (outputs keep what torch.empty gave them)."""
    from triton.runtime.jit import JITFunction

    original = JITFunction.run

    def record(self: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
        into.append(Launch(self, args, dict(kwargs), where[0]))

    JITFunction.run = record  # type: ignore[method-assign]
    try:
        yield
    finally:
        JITFunction.run = original  # type: ignore[method-assign]


@functools.cache
def backend_for(arch: int) -> tuple[Any, Any]:
    """(GPUTarget, Triton's compiler backend) of CUDA compute capability `arch`, made once."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    target = GPUTarget("cuda", arch, 32)
    return target, make_backend(target)


@functools.cache
def _binder(jit: Any, arch: int) -> Any:
    """The argument binder Triton's JIT builds per kernel and backend (made once per pair here too)."""
    from triton.runtime.jit import create_function_from_signature

    return create_function_from_signature(jit.signature, jit.params, backend_for(arch)[1])


def specialize(launch: Launch, arch: int) -> tuple[Any, dict[str, str], dict[Any, Any], dict[Any, Any]]:
    """What Triton's JIT derives from one launch for `arch`: (options, signature, constexprs, attrs)."""
    jit = launch.kernel
    bound, spec, options = _binder(jit, arch)(*launch.args, **launch.kwargs)
    return jit._pack_args(backend_for(arch)[1], launch.kwargs, bound, spec, options)


_REGS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_variant(launch: Launch, arch: int) -> dict[str, Any]:
    """Compile one launch's specialization for compute capability `arch`; shared bytes, registers, spills."""
    import triton
    from triton import knobs
    from triton.compiler import ASTSource

    target = backend_for(arch)[0]
    options, signature, constexprs, attrs = specialize(launch, arch)
    log = io.StringIO()
    t0 = time.perf_counter()
    knobs.nvidia.dump_ptxas_log = True  # ptxas -v: registers and spills of the kernel
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(launch.kernel, signature, constexprs, attrs), target=target,
                                      options=options.__dict__)
    finally:
        knobs.nvidia.dump_ptxas_log = False
    seconds = time.perf_counter() - t0
    text = log.getvalue()
    regs = [int(m) for m in _REGS.findall(text)]
    spills = [(int(a), int(b)) for a, b in _SPILLS.findall(text)]
    return {
        "shared_bytes": int(compiled.metadata.shared),
        "num_warps": int(compiled.metadata.num_warps),
        "num_stages": int(compiled.metadata.num_stages),
        "registers": max(regs) if regs else None,
        "spill_bytes": sum(a + b for a, b in spills) if spills else None,
        "compile_s": round(seconds, 2),
    }


def variant_key(launch: Launch) -> tuple[str, str]:
    """(kernel name, a stable text of its specialization) — what Triton's kernel cache keys a compile on."""
    options, signature, constexprs, attrs = specialize(launch, 90)
    opts = {k: v for k, v in sorted(options.__dict__.items()) if k in ("num_warps", "num_stages", "num_ctas")}
    names = launch.kernel.arg_names  # constexpr paths are (argument index,): name them
    named = {names[k[0]] if len(k) == 1 else str(k): repr(v) for k, v in constexprs.items()}
    text = json.dumps({"sig": signature, "constexprs": dict(sorted(named.items())),
                       "attrs": {str(k): repr(v) for k, v in attrs.items()}, "options": opts}, sort_keys=True)
    return launch.kernel.fn.__name__, text


# ---- what the engine launches ---------------------------------------------------------------------------


def build_model(tok_dir: Path, shape: dict[str, int], dtype: torch.dtype) -> Any:
    """A one-layer runner of `shape` with zero weights (no Triton kernel reads values, only shapes)."""
    from loraledger.inference.config import ModelConfig
    from loraledger.inference.model import LlamaModel

    base = ModelConfig.from_pretrained(tok_dir)
    cfg = dataclasses.replace(base, hidden_size=shape["hidden"], num_heads=shape["heads"],
                              num_kv_heads=shape["kv_heads"], head_dim=shape["hidden"] // shape["heads"],
                              intermediate_size=shape["intermediate"], num_layers=1, max_position_embeddings=8192)
    with torch.device("meta"):
        model = LlamaModel(cfg)
    model.to(dtype).to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    model.tie_weights()
    model.fuse_projections()
    return model.eval()


def write_adapter(out: Path, dims: Any, rank: int) -> Path:
    """A PEFT-format adapter of `rank` on all 7 projections of a one-layer model (zero weights)."""
    from safetensors.torch import save_file

    from loraledger.inference.lora.adapter import LORA_MODULES, module_name

    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for m in LORA_MODULES:
        fan_in, fan_out = dims.module_shape(m)
        prefix = f"base_model.model.model.{module_name(0, m)}"
        tensors[f"{prefix}.lora_A.weight"] = torch.zeros(rank, fan_in)
        tensors[f"{prefix}.lora_B.weight"] = torch.zeros(fan_out, rank)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(LORA_MODULES)}))
    return out


def exercise(size: str, dtype_name: str, work: Path, launches: list[Launch]) -> None:
    """Run the engine over one model shape and dtype on the Triton backends, recording every launch: chunked
    prefill mixed with decodes, eager and fixed-shape (CUDA-graph) decode steps, base-only, single-adapter and
    merged requests over ranks 8..128, and contexts long enough for split-KV decoding."""
    from loraledger.inference.attention import TritonPagedAttention
    from loraledger.inference.engine import Engine
    from loraledger.inference.engine_config import EngineConfig
    from loraledger.inference.lora.adapter import BaseDims
    from loraledger.inference.lora.layers import apply_lora
    from loraledger.inference.lora.store import AdapterStore
    from loraledger.inference.requests import GenerationRequest
    from loraledger.inference.sequence import SamplingParams
    from loraledger.inference.tiny import init_tiny

    tok_dir = work / "tokenizer"
    if not tok_dir.exists():
        init_tiny(tok_dir, layers=1, hidden=64, heads=2, kv_heads=1, intermediate=64, vocab=512, max_positions=8192)
    dtype = DTYPES[dtype_name]
    model = build_model(tok_dir, SHAPES[size], dtype)
    model.set_layer_ops("triton")
    slots = apply_lora(model, num_slots=4, max_rank=max(LORA_RANKS), backend="triton")
    store = AdapterStore(slots, BaseDims.from_model_config(model.config))
    for r in LORA_RANKS:
        store.register(f"r{r}", write_adapter(work / f"{size}-r{r}", BaseDims.from_model_config(model.config), r))
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    adapters: list[list[tuple[str, float]]] = [[], [("r8", 1.0)], [("r16", 1.0)], [("r64", 1.0)], [("r128", 1.0)],
                                               [("r16", 0.5), ("r64", 0.5)], []]
    lengths = [3, 17, 40, 5, 9, 600, 2]  # 600 > the step's token budget: a chunked prefill beside decodes
    for mode in ("off", "static"):
        eng = Engine(EngineConfig(model_dir=tok_dir, dtype=dtype_name.replace("bf16", "bfloat16").replace(
            "fp16", "float16").replace("fp32", "float32"), block_size=16, num_blocks=600, max_num_seqs=8,
            max_tokens_per_step=256, max_model_len=4096, decode_graphs=mode), adapter_slots=store, model=model)
        model.attention = TritonPagedAttention(num_sms=SMS)  # split-KV choices as on an H100/H200
        reqs = [GenerationRequest([10 + i % 400 for i in range(n)], params, adapters=a) for n, a in zip(lengths, adapters,
                                                                                              strict=True)]
        eng.generate(reqs)
        eng.generate([GenerationRequest(list(range(10, 13)), params)])  # a lone decode: few programs, splits
        assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="tiny,1b,llama3-8b,qwen2.5-7b", help=f"comma list of {', '.join(SHAPES)}")
    p.add_argument("--dtypes", default="bf16,fp16,fp32", help="comma list of bf16, fp16, fp32")
    p.add_argument("--targets", default="sm90,sm80", help=f"comma list of {', '.join(TARGETS)}")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/triton_compile.json"))
    args = p.parse_args(argv)
    sizes, dtypes, targets = (s.split(",") for s in (args.sizes, args.dtypes, args.targets))
    for name, allowed in ((sizes, SHAPES), (dtypes, DTYPES), (targets, TARGETS)):
        bad = [x for x in name if x not in allowed]
        if bad:
            p.error(f"unknown {bad}; choose from {', '.join(allowed)}")

    launches: list[Launch] = []
    where = [""]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, recorded_launches(launches, where):
        for size in sizes:
            for dt in dtypes:
                where[0] = f"{size}/{dt}"
                exercise(size, dt, Path(tmp), launches)
    run_s = time.perf_counter() - t0
    variants: dict[tuple[str, str], Launch] = {}
    seen_in: dict[tuple[str, str], set[str]] = {}
    for launch in launches:
        key = variant_key(launch)
        variants.setdefault(key, launch)
        seen_in.setdefault(key, set()).add(launch.where)

    results: list[dict[str, Any]] = []
    failures = 0
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache  # a fresh cache: every variant really compiles (and logs ptxas)
        for (name, text), launch in sorted(variants.items()):
            spec = json.loads(text)
            for t in targets:
                arch, shared_limit = TARGETS[t]
                row: dict[str, Any] = {"kernel": name, "target": t, "constexprs": spec["constexprs"],
                                       "options": spec["options"], "used_by": sorted(seen_in[(name, text)])}
                try:
                    row.update(compile_variant(launch, arch))
                except Exception as e:  # noqa: BLE001  (any compiler error: reported per variant, fails the run)
                    row["error"] = f"{type(e).__name__}: {str(e)[-2000:]}"
                    failures += 1
                else:
                    if row["shared_bytes"] > shared_limit:
                        row["error"] = f"needs {row['shared_bytes']} B of shared memory, {t} allows {shared_limit}"
                        failures += 1
                results.append(row)
                status = row.get("error") or (f"shared {row['shared_bytes']} B, {row['registers']} regs, "
                                              f"spills {row['spill_bytes']} B, {row['compile_s']} s")
                print(f"{t} {name} {spec['constexprs']} {spec['options']}: {status}", flush=True)
    report = {
        "what": "AOT compile of every Triton kernel specialization the engine launched, per GPU target",
        "triton": __import__("triton").__version__,
        "sizes": sizes, "dtypes": dtypes, "targets": targets,
        "launches_recorded": len(launches), "variants": len(variants), "failures": failures,
        "engine_run_s": round(run_s, 1), "kernels": sorted({k for k, _ in variants}),
        "machine": machine_info(),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"{len(variants)} variants of {len(report['kernels'])} kernels x {len(targets)} targets, "
          f"{failures} failed; report: {args.out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
