"""Benchmark: multi-LoRA serving throughput and latency vs the base model (the ceiling) and peft (mixed batches).

Traffic as in S-LoRA and Punica (`scripts/traffic.py`): closed loop (default) or Poisson arrivals (--rate),
adapter choice by S-LoRA's power law (--distribution power --alpha 1 | 0.3) or Punica's modes (identical,
distinct, uniform, zipf with --alpha 1.5), N adapters in --num-adapters, lengths uniform in [lo, hi).

Side by side in one run, on the same random model and the same trace:
  base   the engine with no LoRA at all (every request on the base model): the throughput ceiling
  ours   the engine with LoRA slots, an `AdapterStore` over N adapters on disk (disk -> CPU -> slots)
  peft   transformers + peft with the N adapters loaded, static batches of --max-num-seqs requests in order,
         `generate(..., adapter_names=[one per row])` (peft's mixed-adapter batch)

Per (system, N): output tokens/s over the makespan, p50/p99 time to first token (TTFT) and time per output token
(TPOT = (t_last - t_first) / (n - 1)), memory (CUDA: peak allocated; CPU: process peak RSS), and for ours the
distinct adapters per decode step and the physical limit of the slowdown, decode being memory bound:

    limit = (base bytes + distinct adapters in the step * bytes of one adapter) / base bytes   (mean over steps)

base bytes = every weight a decode step reads (all but the input embedding). A decode-step table times B running
sequences spread over d distinct adapters against the same B requests naming no adapter, measured in turn three
times each (step ratio vs limit(d)), and
adapter load times are measured from the OS page cache and from the CPU tier into a slot.

Models are random (no downloads): the transformers Llama is built in memory (CPU sizes: tiny, 20m, 100m; CUDA:
a Llama-3-8B shape in bf16) and our runner shares its tensors; adapters (rank 16 on all 7 projections) are made
with peft on that model and saved to a temp dir (beyond --distinct-files adapters, directories link to earlier
files so that 1000 adapters of an 8B model fit the disk). Writes benchmarks/results/lora_<device>.json and a
PNG of throughput vs N with the ceiling and the limit drawn in.

    python scripts/bench_lora.py                                  # CPU: tiny, 20m, 100m: about 2.5 minutes
    python scripts/bench_lora.py --sizes tiny --num-adapters 1,8  # seconds
    python scripts/bench_lora.py --device cuda                    # Llama-3-8B shape, bf16, rank 16
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import json
import math
import os
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from benchlib import machine_info  # scripts/benchlib.py, beside this script
from benchmodels import SIZES, Models, build_models, sync, timed  # scripts/benchmodels.py, beside this script
from torch import nn
from traffic import ADAPTER_DISTRIBUTIONS, TrafficRequest, TrafficSpec, make_traffic  # scripts/traffic.py

from loraledger.inference.config import parse_dtype
from loraledger.inference.engine import Engine
from loraledger.inference.engine_config import EngineConfig
from loraledger.inference.identity import weights_hash
from loraledger.inference.lora.adapter import BaseDims
from loraledger.inference.lora.layers import LoRASlots, apply_lora
from loraledger.inference.lora.store import AdapterStore
from loraledger.inference.requests import GenerationRequest
from loraledger.inference.sequence import SamplingParams

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LOAD_SAMPLES = 5  # adapters timed per load path (page cache -> slot, CPU tier -> slot)
FIRST_ID = 6  # prompt ids start past the tiny tokenizer's special tokens


# ---- machine, timing ------------------------------------------------------------------------------------


def memory_mark(device: torch.device) -> None:
    """Start a new peak-memory window (CUDA); on CPU the process peak RSS cannot be reset."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {"cuda_peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30}
    return {"process_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def pct(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100, linear interpolation) of `values`; None when empty."""
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


# ---- random models and adapters ------------------------------------------------------------------------


def adapter_nbytes(dims: BaseDims, rank: int, dtype: torch.dtype) -> int:
    """Bytes of one rank-`rank` adapter on all 7 projections: sum over layers, modules of (in + out) * r * item."""
    item = torch.empty(0, dtype=dtype).element_size()
    return dims.num_layers * sum(sum(dims.module_shape(m)) * rank * item for m in TARGETS)


def make_adapters(hf: Any, n: int, rank: int, root: Path, distinct_files: int, dtype: torch.dtype) -> list[Path]:
    """`n` PEFT adapters of `hf` (rank, alpha = 2 * rank, all 7 projections): the first saved by peft, the next
    `distinct_files - 1` with the same keys and fresh N(0, 0.02) values, the rest linking to those files."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file

    first = root / "adapter_0"
    peft_model = get_peft_model(hf, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS,
                                               init_lora_weights=False, lora_dropout=0.0))
    peft_model.save_pretrained(str(first))
    peft_model.unload()  # hf is back to its plain modules (get_peft_model wrapped them in place)
    template = load_file(str(first / "adapter_model.safetensors"))
    config_text = (first / "adapter_config.json").read_text()
    g = torch.Generator().manual_seed(0)
    paths = [first]
    for i in range(1, n):
        out = root / f"adapter_{i}"
        out.mkdir()
        (out / "adapter_config.json").write_text(config_text)
        if i < distinct_files:
            tensors = {k: (torch.randn(t.shape, generator=g) * 0.02).to(dtype) for k, t in template.items()}
            save_file(tensors, str(out / "adapter_model.safetensors"))
        else:
            (out / "adapter_model.safetensors").symlink_to(paths[i % distinct_files] / "adapter_model.safetensors")
        paths.append(out)
    return paths


# ---- running our engine --------------------------------------------------------------------------------


@dataclass
class StepLog:
    """What each step's forward saw: decode-only or not, seqs, distinct adapters, seconds (synchronized).

    Plain steps are timed by forward pre/post hooks on the runner; fixed-shape decode steps (CUDA graphs) by
    wrapping the engine's graph runner, whose replays never call the runner's forward (and whose captures must
    not meet a hook that synchronizes, so the hooks stand aside while it runs)."""

    steps: list[tuple[bool, int, int, float]] = field(default_factory=list)  # decode_only, seqs, distinct, seconds
    _t0: float = 0.0
    _current: tuple[bool, int, int] = (False, 0, 0)
    _in_graph_runner: bool = False

    def attach(self, engine: Engine, device: torch.device, timed: bool = True) -> Callable[[], None]:
        """Hook `engine`; `timed=False` only counts (no synchronizing: steps run ahead as they would)."""
        model: nn.Module = engine.model
        wait = (lambda: sync(device)) if timed else (lambda: None)

        def pre(_m: nn.Module, args: tuple[Any, ...]) -> None:
            if self._in_graph_runner:
                return
            batch = args[0]
            slots = batch.token_adapter_slots
            distinct = int(torch.unique(slots[slots >= 0]).numel()) if slots.numel() else 0
            self._current = (batch.is_decode_only, batch.num_seqs, distinct)
            wait()
            self._t0 = time.perf_counter()

        def post(_m: nn.Module, _args: tuple[Any, ...], _out: Any) -> None:
            if self._in_graph_runner:
                return
            wait()
            self.steps.append((*self._current, time.perf_counter() - self._t0))

        h1, h2 = model.register_forward_pre_hook(pre), model.register_forward_hook(post)
        runner = engine.graphs
        if runner is not None:
            plain_run = runner.run

            def timed_run(chunks: list[Any], token_sources: list[int] | None = None) -> torch.Tensor:
                distinct = len({s for c in chunks for s in c.adapter_slots if s >= 0})
                wait()
                t0 = time.perf_counter()
                self._in_graph_runner = True
                try:
                    logits = plain_run(chunks, token_sources)
                finally:
                    self._in_graph_runner = False
                wait()
                self.steps.append((True, len(chunks), distinct, time.perf_counter() - t0))
                return logits

            runner.run = timed_run  # type: ignore[method-assign]  # an instance attribute, removed by detach

        def detach() -> None:
            h1.remove()
            h2.remove()
            if runner is not None:
                del runner.run

        return detach


@dataclass
class RequestTiming:
    arrival: float
    first: float | None = None
    last: float | None = None
    tokens: int = 0


def prompt_ids(r: TrafficRequest, vocab: int) -> list[int]:
    """A deterministic prompt of r.input_len ids in [FIRST_ID, vocab)."""
    g = torch.Generator().manual_seed(1000 + r.index)
    return torch.randint(FIRST_ID, vocab, (r.input_len,), generator=g).tolist()


async def _drive(engine: Engine, trace: list[TrafficRequest], keys: list[str] | None, concurrency: int,
                 vocab: int) -> tuple[list[RequestTiming], float]:
    """Send the trace to the running engine (open loop at arrival times, else `concurrency` in flight)."""
    timings: list[RequestTiming] = [RequestTiming(0.0) for _ in trace]
    start = time.perf_counter()

    async def one(r: TrafficRequest) -> None:
        adapters = [(keys[r.adapter], 1.0)] if keys is not None and r.adapter is not None else []
        params = SamplingParams(max_tokens=r.output_len, temperature=0.0, ignore_eos=True)
        t = timings[r.index]
        t.arrival = time.perf_counter()
        handle = engine.submit(GenerationRequest(prompt_ids(r, vocab), params, adapters=adapters))
        async for item in handle:
            now = time.perf_counter()
            if hasattr(item, "token_id"):
                t.first = t.first if t.first is not None else now
                t.last = now
                t.tokens += 1
            elif item.finish_reason != "length":  # a GenerationResult
                raise RuntimeError(f"request {r.index} ended with {item.finish_reason}: {item.error}")

    if trace and trace[0].arrival_s is not None:
        async def at(r: TrafficRequest) -> None:
            await asyncio.sleep(max(0.0, start + (r.arrival_s or 0.0) - time.perf_counter()))
            await one(r)

        await asyncio.gather(*(at(r) for r in trace))
    else:
        queue = list(reversed(trace))

        async def worker() -> None:
            while queue:
                await one(queue.pop())

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return timings, time.perf_counter() - start


def summarize(timings: list[RequestTiming], makespan: float) -> dict[str, Any]:
    ttft = [t.first - t.arrival for t in timings if t.first is not None]
    tpot = [(t.last - t.first) / (t.tokens - 1) for t in timings if t.first and t.last and t.tokens > 1]
    out_tokens = sum(t.tokens for t in timings)
    return {"requests": len(timings), "output_tokens": out_tokens, "makespan_s": makespan,
            "throughput_tok_s": out_tokens / makespan if makespan > 0 else 0.0,
            "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
            "tpot_p50_s": pct(tpot, 50), "tpot_p99_s": pct(tpot, 99)}


def engine_config(models: Models, device: torch.device, dtype: torch.dtype, args: argparse.Namespace) -> EngineConfig:
    max_len = args.input_len[1] + args.output_len[1]
    return EngineConfig(model_dir=models.tokenizer_dir, dtype=str(dtype).removeprefix("torch."), device=str(device),
                        max_num_seqs=args.max_num_seqs, max_tokens_per_step=args.max_tokens_per_step,
                        max_model_len=max_len, decode_graphs=args.decode_graphs,
                        async_decode={"auto": None, "on": True, "off": False}[args.async_decode],
                        num_blocks=args.max_num_seqs * -(-max_len // 16) + args.max_num_seqs if device.type == "cpu"
                        else None)


def run_engine(models: Models, store: AdapterStore | None, keys: list[str] | None, trace: list[TrafficRequest],
               cfg: EngineConfig, concurrency: int, limit: Callable[[int], float] | None) -> dict[str, Any]:
    """One trace through our engine (background loop); latency summary, memory and per-step adapter counts."""
    device = torch.device(cfg.device)
    memory_mark(device)
    engine = Engine(cfg, adapter_slots=store, model=models.runner, tokenizer=models.tokenizer)
    log = StepLog()
    detach = log.attach(engine, device, timed=False)  # counts only: the steps run ahead, undisturbed
    try:
        with engine:
            timings, makespan = asyncio.run(_drive(engine, trace, keys, concurrency, models.runner.config.vocab_size))
    finally:
        detach()
    result = summarize(timings, makespan)
    result.update(peak_memory(device))
    decode = [s for s in log.steps if s[0]]
    result["steps"] = len(log.steps)
    result["decode_steps"] = len(decode)
    result["mean_seqs_per_decode_step"] = statistics.fmean(s[1] for s in decode) if decode else None
    result["mean_distinct_adapters_per_decode_step"] = statistics.fmean(s[2] for s in decode) if decode else 0.0
    if limit is not None and decode:
        result["physical_limit"] = statistics.fmean(limit(s[2]) for s in decode)
    del engine
    return result


def decode_step_time(models: Models, store: AdapterStore | None, keys: list[str] | None, distinct: int,
                     cfg: EngineConfig, batch: int, new_tokens: int) -> float:
    """Fastest decode-step seconds of `batch` running sequences spread round-robin over `distinct` adapters."""
    device = torch.device(cfg.device)
    memory_mark(device)  # the previous engine's KV cache is gone before this one sizes its own
    engine = Engine(cfg, adapter_slots=store, model=models.runner, tokenizer=models.tokenizer)
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    reqs = [GenerationRequest(list(range(FIRST_ID, FIRST_ID + 16)), params,
                              adapters=[(keys[i % distinct], 1.0)] if keys else []) for i in range(batch)]
    log = StepLog()
    detach = log.attach(engine, device)
    try:
        engine.generate(reqs)
    finally:
        detach()
    times = [s[3] for s in log.steps if s[0] and s[1] == batch]
    if not times:
        raise RuntimeError(f"no decode step ran all {batch} sequences together; raise max_num_seqs")
    return min(times)  # the least disturbed step: CPUs here are shared, and noise only ever adds time


def load_times(store: AdapterStore, keys: list[str], device: torch.device, samples: int) -> dict[str, float | None]:
    """Median ms of acquire() for an adapter from the OS page cache (disk tier) and from the CPU tier into a slot."""
    fresh = keys[-samples:]
    disk, cpu = [], []
    st = store.stats

    def timed_acquire(k: str, tier: str) -> float:
        before = (st.disk_loads, st.cpu_hits, st.slot_misses)
        took = timed(lambda: store.acquire([k]), device)
        store.release([k])
        came = (st.disk_loads - before[0], st.cpu_hits - before[1], st.slot_misses - before[2])
        if came != ((1, 0, 1) if tier == "disk" else (0, 1, 1)):  # what was timed must be the load it claims
            raise RuntimeError(f"adapter {k!r}: expected a slot miss served from the {tier} tier, store counted "
                               f"(disk loads, CPU hits, slot misses) += {came}")
        return took

    for k in fresh:  # never acquired yet: parse + hash + copy into a slot (files just written: in page cache)
        disk.append(timed_acquire(k, "disk"))
    for k in fresh:  # push k out of its slot with other keys, keep it in the CPU tier, then time it again
        others = [o for o in keys if o not in fresh][: store.num_slots]
        for o in others:
            store.acquire([o])
            store.release([o])
        cpu.append(timed_acquire(k, "cpu"))
    return {"page_cache_to_slot_ms": statistics.median(disk) * 1e3 if disk else None,
            "cpu_tier_to_slot_ms": statistics.median(cpu) * 1e3 if cpu else None}


# ---- peft ------------------------------------------------------------------------------------------------


def run_peft(models: Models, adapter_paths: list[Path], trace: list[TrafficRequest], batch: int,
             device: torch.device) -> dict[str, Any]:
    """peft: N adapters loaded into the transformers model; FCFS static batches of `batch` requests, each row its
    own adapter via `generate(adapter_names=...)`; per-token times from a streamer."""
    from peft import PeftModel
    from transformers.generation.streamers import BaseStreamer

    memory_mark(device)
    base = models.hf
    pm = PeftModel.from_pretrained(base, str(adapter_paths[0]), adapter_name="a0").eval()
    for i, p in enumerate(adapter_paths[1:], start=1):
        pm.load_adapter(str(p), adapter_name=f"a{i}")

    class Stamps(BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value: torch.Tensor) -> None:
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    vocab = models.runner.config.vocab_size
    with torch.inference_mode():  # warm-up
        pm.generate(input_ids=torch.full((1, 8), FIRST_ID, device=device), adapter_names=["a0"], max_new_tokens=2,
                    do_sample=False, pad_token_id=0)
    timings: list[RequestTiming] = [RequestTiming(0.0) for _ in trace]
    start = time.perf_counter()
    pending = list(trace)
    while pending:
        now = time.perf_counter() - start
        if pending[0].arrival_s is not None and pending[0].arrival_s > now:
            time.sleep(pending[0].arrival_s - now)
            now = time.perf_counter() - start
        group = [r for r in pending[:batch] if r.arrival_s is None or r.arrival_s <= now]
        pending = pending[len(group):]
        width = max(r.input_len for r in group)
        new = max(r.output_len for r in group)
        ids = torch.zeros(len(group), width, dtype=torch.int64)
        mask = torch.zeros(len(group), width, dtype=torch.int64)
        for j, r in enumerate(group):  # left padding
            ids[j, width - r.input_len:] = torch.tensor(prompt_ids(r, vocab))
            mask[j, width - r.input_len:] = 1
        names = [f"a{r.adapter}" if r.adapter is not None else "__base__" for r in group]
        stamps = Stamps()
        t_submit = time.perf_counter()
        with torch.inference_mode():
            pm.generate(input_ids=ids.to(device), attention_mask=mask.to(device), adapter_names=names,
                        max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0,
                        streamer=stamps)
        sync(device)
        for r in group:
            t = timings[r.index]
            t.arrival = start + r.arrival_s if r.arrival_s is not None else t_submit
            t.first, t.last, t.tokens = stamps.times[1], stamps.times[r.output_len], r.output_len
    makespan = time.perf_counter() - start
    result = summarize(timings, makespan)
    result.update(peak_memory(device))
    models.hf = pm.unload()  # plain modules again for the next N
    del pm
    return result


# ---- main ------------------------------------------------------------------------------------------------


def bench_size(size: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype,
               workdir: Path, save: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """One model size's table. `save(report)` runs after each part, so that a run stopped by a time limit keeps
    the parts done (`complete` is set at the end only)."""
    t_start = time.perf_counter()
    models = build_models(size, dtype, device, workdir)
    dims = BaseDims.from_model_config(models.runner.config)
    ad_bytes = adapter_nbytes(dims, args.rank, dtype)
    ns = sorted(n for n in args.num_adapters if n <= args.max_adapters)
    print(f"[{size}] built in {time.perf_counter() - t_start:.1f} s: base {models.base_bytes / 2**20:.1f} MiB read per "
          f"step, adapter {ad_bytes / 2**20:.2f} MiB", flush=True)
    paths = make_adapters(models.hf, max(ns), args.rank, workdir / f"adapters_{size}", args.distinct_files, dtype)
    os.sync()  # the files stay in the page cache, clean: no writeback of them runs beside the timed loads
    cfg = engine_config(models, device, dtype, args)

    def limit(d: int) -> float:
        return (models.base_bytes + d * ad_bytes) / models.base_bytes

    report: dict[str, Any] = {
        "model": {"size": size, **SIZES[size], "dtype": str(dtype), "total_bytes": models.total_bytes,
                  "base_bytes_per_step": models.base_bytes},
        "adapter": {"rank": args.rank, "targets": TARGETS, "bytes": ad_bytes, "files": min(max(ns), args.distinct_files)},
        "runs": [],
        "complete": False,
    }

    def spec(n: int) -> TrafficSpec:
        return TrafficSpec(num_requests=args.num_requests, num_adapters=n, distribution=args.distribution,
                           alpha=args.alpha, batch=args.max_num_seqs, rate=args.rate, concurrency=args.concurrency,
                           input_len=tuple(args.input_len), output_len=tuple(args.output_len), seed=args.seed)

    base_trace = make_traffic(spec(0))
    run_engine(models, None, None, base_trace[: args.max_num_seqs], cfg, args.concurrency, None)  # warm-up
    report["base"] = run_engine(models, None, None, base_trace, cfg, args.concurrency, None)
    print(f"[{size}] base: {json.dumps(report['base'])}", flush=True)
    save(report)
    step_base = decode_step_time(models, None, None, 1, cfg, args.max_num_seqs, args.step_tokens)

    slots_n = min(max(ns), args.slots or 2 * args.max_num_seqs)
    # from here on the runner carries LoRA layers (the base runs above are done)
    slots: LoRASlots = apply_lora(models.runner, num_slots=slots_n, max_rank=args.rank, dtype=dtype)
    keys = [f"a{i}" for i in range(max(ns))]
    report["lora_slots"] = {"slots": slots_n, "slot_bytes": slots.slot_nbytes()}
    # adapter loads into a slot: LOAD_SAMPLES never-loaded keys, then the same keys again once other keys pushed
    # them out of their slots (CPU tier); keys past the largest N reuse its files under new names, so that loads
    # are timed also when every adapter of the runs fits the slots. Timed before the runs: it takes seconds,
    # and a run cut short by a time limit keeps it
    spare = max(0, slots_n + LOAD_SAMPLES - len(keys))
    load_keys = keys + [f"load{i}" for i in range(spare)]
    load_paths = paths + [paths[i % len(paths)] for i in range(spare)]
    store = AdapterStore(slots, dims, cpu_cache_bytes=args.cpu_cache_mb << 20)
    for k, p in zip(load_keys, load_paths, strict=True):
        store.register(k, p)
    report["adapter_load"] = load_times(store, load_keys, device, samples=LOAD_SAMPLES)
    store.close()
    # the floor of a first load: the sha256 of the weights that every first load verifies (one stream: one core)
    hashes = [timed(functools.partial(weights_hash, path), device) for path in load_paths[-3:]]
    report["adapter_load"]["weights_hash_ms"] = statistics.median(hashes) * 1e3
    print(f"[{size}] adapter load: {json.dumps(report['adapter_load'])}", flush=True)
    save(report)
    steps: list[dict[str, Any]] = []
    report["decode_step"] = steps
    for n in ns:
        # as the node builds it: first loads from disk on the store's loader thread, off the engine step
        store = AdapterStore(slots, dims, cpu_cache_bytes=args.cpu_cache_mb << 20, background_loads=True)
        for k, p in zip(keys[:n], paths[:n], strict=True):
            store.register(k, p)
        trace = make_traffic(spec(n))
        ours = run_engine(models, store, keys[:n], trace, cfg, args.concurrency, limit)
        ours["slowdown_vs_base"] = report["base"]["throughput_tok_s"] / ours["throughput_tok_s"]
        ours["store"] = asdict(store.stats)
        row: dict[str, Any] = {"num_adapters": n, "ours": ours}
        print(f"[{size}] N={n} ours: {json.dumps(ours)}", flush=True)
        d = min(n, args.max_num_seqs)  # a step of B sequences holds at most B distinct adapters
        if d not in {s["distinct_adapters"] for s in steps}:
            # interleaved with base steps (no request names an adapter: the LoRA layers do nothing) at the same
            # moment, fastest of 3 each: a shared machine's noise only ever adds time
            ts, bs = [], []
            for _ in range(3):
                ts.append(decode_step_time(models, store, keys[:n], d, cfg, args.max_num_seqs, args.step_tokens))
                bs.append(decode_step_time(models, None, None, 1, cfg, args.max_num_seqs, args.step_tokens))
            t, b = min(ts), min(bs)
            steps.append({"distinct_adapters": d, "batch": args.max_num_seqs, "step_s": t, "base_step_s": b,
                          "base_step_before_lora_layers_s": step_base, "step_ratio": t / b, "limit": limit(d),
                          "ratio_over_limit": t / b / limit(d)})
        if n <= args.peft_max_adapters:
            row["peft"] = run_peft(models, paths[:n], trace[: args.peft_max_requests], args.max_num_seqs, device)
            row["ours_over_peft"] = ours["throughput_tok_s"] / row["peft"]["throughput_tok_s"]
            print(f"[{size}] N={n} peft: {json.dumps(row['peft'])}", flush=True)
        report["runs"].append(row)
        store.close()
        save(report)
    report["seconds"] = time.perf_counter() - t_start
    report["complete"] = True
    save(report)
    return report


def plot(report: dict[str, Any], path: Path) -> None:
    """Throughput vs number of adapters per model size: ours, peft, the base ceiling and ceiling / limit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = report["sizes"]
    fig, axes = plt.subplots(1, len(sizes), figsize=(5.5 * len(sizes), 4.2), squeeze=False)
    for ax, (size, r) in zip(axes[0], sizes.items(), strict=True):
        ns = [row["num_adapters"] for row in r["runs"]]
        ceiling = r["base"]["throughput_tok_s"]
        ax.plot(ns, [row["ours"]["throughput_tok_s"] for row in r["runs"]], "o-", label="loraledger")
        peft = [(row["num_adapters"], row["peft"]["throughput_tok_s"]) for row in r["runs"] if "peft" in row]
        if peft:
            ax.plot(*zip(*peft, strict=True), "s-", label="peft (adapter_names)")
        ax.axhline(ceiling, color="k", ls="--", label="base model (ceiling)")
        lim = [ceiling / row["ours"]["physical_limit"] for row in r["runs"] if "physical_limit" in row["ours"]]
        if len(lim) == len(ns):
            ax.plot(ns, lim, "k:", label="ceiling / physical limit")
        ax.set_xscale("log")
        ax.set_xlabel("adapters (N)")
        ax.set_ylabel("output tokens/s")
        ax.set_title(f"{size} ({r['model']['dtype'].removeprefix('torch.')}, rank {r['adapter']['rank']})")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    fig.suptitle(f"multi-LoRA throughput on {report['device_name']} ({report['traffic']['distribution']}, "
                 f"alpha {report['traffic']['alpha']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", default=None, help=f"comma list of {', '.join(SIZES)} (CPU: tiny,20m,100m; CUDA: llama3-8b)")
    ap.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--num-adapters", default="1,8,32,100,1000", help="comma list of N")
    ap.add_argument("--max-adapters", type=int, default=None, help="drop N above this (default 1000)")
    ap.add_argument("--distinct-files", type=int, default=100, help="adapters beyond this link to earlier files")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--distribution", choices=ADAPTER_DISTRIBUTIONS, default="power")
    ap.add_argument("--alpha", type=float, default=1.0, help="power: 1 uniform, 0.3 skewed; zipf: growth (1.5)")
    ap.add_argument("--rate", type=float, default=None, help="Poisson arrivals in requests/s (default: closed loop)")
    ap.add_argument("--concurrency", type=int, default=None, help="closed loop: requests in flight (= max-num-seqs)")
    ap.add_argument("--num-requests", type=int, default=None, help="per run (CPU 32, CUDA 512)")
    ap.add_argument("--input-len", type=int, nargs=2, default=None, metavar=("LO", "HI"), help="CPU 8 32, CUDA 8 512")
    ap.add_argument("--output-len", type=int, nargs=2, default=None, metavar=("LO", "HI"), help="CPU 8 16, CUDA 8 512")
    ap.add_argument("--max-num-seqs", type=int, default=None, help="engine and peft batch (CPU 8, CUDA 64)")
    ap.add_argument("--max-tokens-per-step", type=int, default=None, help="CPU 256, CUDA 4096")
    ap.add_argument("--slots", type=int, default=None, help="LoRA slots (default 2 x max-num-seqs, at most max N)")
    ap.add_argument("--cpu-cache-mb", type=int, default=None, help="CPU tier size (CPU 512, CUDA 16384)")
    ap.add_argument("--peft-max-adapters", type=int, default=None, help="run peft only up to this N (CPU 32, CUDA 100)")
    ap.add_argument("--peft-max-requests", type=int, default=None,
                    help="peft runs the first this many requests of the trace (CPU all, CUDA 128: peft is slow)")
    ap.add_argument("--step-tokens", type=int, default=None, help="new tokens of the decode-step table (CPU 12, CUDA 32)")
    ap.add_argument("--decode-graphs", default="auto", choices=("auto", "off", "static", "graphs"),
                    help="our engine's decode steps: auto = CUDA graphs on CUDA, plain steps on the CPU")
    ap.add_argument("--async-decode", default="auto", choices=("auto", "on", "off"),
                    help="fixed-shape decode steps run ahead of the host: auto = with CUDA graphs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="default: benchmarks/results/lora_<device>.json (+ .png)")
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    defaults = {"sizes": "llama3-8b" if cuda else "tiny,20m,100m", "dtype": "bfloat16" if cuda else "float32",
                "max_adapters": 1000, "num_requests": 512 if cuda else 32,
                "input_len": [8, 512] if cuda else [8, 32], "output_len": [8, 512] if cuda else [8, 16],
                "max_num_seqs": 64 if cuda else 8, "max_tokens_per_step": 4096 if cuda else 256,
                "cpu_cache_mb": 16384 if cuda else 512, "peft_max_adapters": 100 if cuda else 32,
                "step_tokens": 32 if cuda else 12, "peft_max_requests": 128 if cuda else 1 << 30}
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.concurrency = args.concurrency or args.max_num_seqs
    args.num_adapters = [int(x) for x in str(args.num_adapters).split(",") if x]
    if not args.num_adapters or min(args.num_adapters) < 1:
        ap.error("--num-adapters must list positive integers")
    if not any(n <= args.max_adapters for n in args.num_adapters):
        ap.error(f"every N in --num-adapters is above --max-adapters {args.max_adapters}")
    unknown = [s for s in args.sizes.split(",") if s not in SIZES]
    if unknown:
        ap.error(f"unknown size(s) {unknown}; choose from {', '.join(SIZES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = parse_dtype(args.dtype)
    report: dict[str, Any] = {
        "benchmark": "multi-LoRA serving: loraledger engine vs base model (ceiling) vs peft adapter_names",
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else machine_info(str(device))["cpu"],
        "machine": machine_info(str(device)),
        "traffic": {"distribution": args.distribution, "alpha": args.alpha, "rate": args.rate,
                    "closed_loop_concurrency": args.concurrency if args.rate is None else None,
                    "num_requests": args.num_requests, "input_len": args.input_len, "output_len": args.output_len,
                    "max_num_seqs": args.max_num_seqs, "seed": args.seed},
        "decode_graphs": args.decode_graphs,
        "sizes": {},
    }
    out = Path(args.out or f"benchmarks/results/lora_{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench_lora_") as tmp:
        for size in args.sizes.split(","):
            def save(part: dict[str, Any], size: str = size) -> None:  # what is done stays if a later part fails
                report["sizes"][size] = part
                out.write_text(json.dumps(report, indent=2) + "\n")

            bench_size(size, args, device, dtype, Path(tmp), save)
    plot(report, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
