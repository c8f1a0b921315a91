"""Training throughput of `train_adapter` (the `loraledger train` path: datanet verification, tokenization, peft
LoRA, the optimisation loop, the save and lineage) on one device, float32 against bfloat16 and gradient
accumulation, each as a ratio to float32 on the same device measured in the same run; with --cpu-baseline, the
CPU in float32 too (fewer records, scaled per token).

    python scripts/bench_training.py --device cpu --size tiny                       # a smoke run here
    python scripts/bench_training.py --device cuda --size 100m --records 96 --cpu-baseline \
        --out benchmarks/results/training_cuda.json                                 # scripts/gpu_check.sh d

The model is a random Llama of the named shape (scripts/benchmodels.py SIZES) written with its tokenizer by
init_tiny; the data are the demo's shipped sample contributions (node/demo/data/sample), signed by the anvil dev
contributors and built into a datanet with that tokenizer. Rates count the tokens trained on (the lineage's
`total_tokens`: prompt and completion inside the window) per second of the whole call, model load and save
included, since that is what a user waits for.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import machine_info
from benchmodels import SIZES

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DIR = REPO / "node" / "demo" / "data" / "sample"
CONTRIBUTORS = {"alice": 2, "bob": 3, "carol": 4}  # sample file -> anvil dev account


def build_inputs(work: Path, size: str, records: int) -> tuple[Path, Path]:
    """(model dir, datanet dir): a random checkpoint of `size` and a datanet of `records` records per contributor."""
    from loraledger.inference.tiny import init_tiny
    from loraledger.node.chain.keys import dev_account
    from loraledger.node.lineage.contributions import sign_contribution
    from loraledger.node.lineage.datanet import build_datanet

    shape = {k: v for k, v in SIZES[size].items() if k != "rope_theta"}
    model = init_tiny(work / "model", max_positions=1024, **shape)
    src = work / "contributions"
    src.mkdir()
    for name, idx in CONTRIBUTORS.items():
        lines = [ln for ln in (SAMPLE_DIR / f"{name}.jsonl").read_text().splitlines() if ln.strip()][:records]
        f = src / f"{name}.jsonl"
        f.write_text("\n".join(lines) + "\n")
        sign_contribution(f, dev_account(idx))
    build_datanet("bench-training", src, work / "datanet", tokenizer_dir=model)
    return model, work / "datanet"


def run_variant(model: Path, datanet: Path, out: Path, device: str, dtype: str, batch: int, grad_accum: int,
                seq_len: int, threads: int | None) -> dict[str, Any]:
    """One `train_adapter` call, timed whole; its tokens are the lineage's `total_tokens` (one epoch)."""
    from loraledger.node.lineage.training import train_adapter

    t0 = time.perf_counter()
    r = train_adapter(model, [datanet], "lora", 16, 32.0, "q,k,v,o", 1, 1e-3, 0, out, seq_len, batch,
                      device=device, threads=threads, progress=False, grad_accum=grad_accum, dtype=dtype)
    wall = time.perf_counter() - t0
    tokens = int(r.lineage["total_tokens"])
    return {"device": device, "dtype": r.lineage["training_config"]["determinism"]["dtype"],
            "micro_batch": batch, "grad_accum": grad_accum, "examples": r.lineage["examples"],
            "steps": len(r.losses), "tokens": tokens, "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 1), "first_loss": round(r.losses[0], 4),
            "last_loss": round(r.losses[-1], 4), "weights_hash": r.weights_hash}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", default="100m", choices=sorted(SIZES))
    ap.add_argument("--records", type=int, default=96, help="records per contributor (3 contributors)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None, help="torch threads on the CPU (default: torch's)")
    ap.add_argument("--cpu-baseline", action="store_true", help="also train on the CPU (float32, --cpu-records)")
    ap.add_argument("--cpu-records", type=int, default=16)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    out_path = args.out or REPO / "benchmarks" / "results" / f"training_{args.device.split(':')[0]}.json"

    from loraledger.node.lineage.training import resolve_device

    device = resolve_device(args.device)
    result: dict[str, Any] = {
        "what": "train_adapter: tokens trained on per second of the whole call; LoRA r=16 on q,k,v,o, one epoch, lr 1e-3",
        "machine": machine_info(device), "size": args.size, "shape": SIZES[args.size],
        "records_per_contributor": args.records, "max_seq_len": args.seq_len,
        "note": "random weights: the losses show the variants train alike, not what a real model learns "
                "(the real-model demo's held-out loss does that)",
        "variants": [], "complete": False,
    }

    def save() -> None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=2) + "\n")

    with tempfile.TemporaryDirectory(prefix="loraledger-bench-training-") as tmp:
        work = Path(tmp)
        model, datanet = build_inputs(work / "full", args.size, args.records)
        plan = [("float32", args.batch, 1), ("bfloat16", args.batch, 1), ("bfloat16", args.batch // 2 or 1, 2)]
        # untimed: the first call pays the imports, the CUDA context and kernel selection for every later one
        run_variant(model, datanet, work / "warmup", device, "float32", args.batch, 1, args.seq_len, args.threads)
        runs: list[tuple[str, dict[str, Any]]] = []
        for k, (dtype, batch, accum) in enumerate(plan):
            v = run_variant(model, datanet, work / f"adapter{k}", device, dtype, batch, accum, args.seq_len, args.threads)
            runs.append((f"{device} {dtype} batch {batch}x{accum}", v))
        if args.cpu_baseline and device != "cpu":
            small_model, small_datanet = build_inputs(work / "small", args.size, args.cpu_records)
            v = run_variant(small_model, small_datanet, work / "cpu", "cpu", "float32", args.batch, 1, args.seq_len,
                            args.threads)
            runs.append(("cpu float32 (fewer records)", v))
        base_rate = runs[0][1]["tokens_per_s"]
        for label, v in runs:
            v["label"] = label
            v["rate_vs_float32_here"] = round(v["tokens_per_s"] / base_rate, 3)
            result["variants"].append(v)
            save()
            print(f"{label:<34} {v['steps']:>4} steps  {v['wall_s']:>8.2f} s  loss {v['first_loss']:.3f} -> "
                  f"{v['last_loss']:.3f}  {v['tokens_per_s']} tok/s  x{v['rate_vs_float32_here']}")
    result["complete"] = True
    save()
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
