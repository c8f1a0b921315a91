"""Measure QLoRA serving's cost and error: the base in bitsandbytes NF4 vs the same base unquantized.

For each model size (random init_tiny checkpoints, no downloads), loaded by `load_model_quantized(dir, "none" |
"nf4", "fp32")`:
  memory    bytes of the base projections and of the whole model, before/after (+ with double quantization)
  weights   ||deq(W) - W|| / ||W|| over all projections (NF4's own error)
  outputs   on --prompts random prompts of --prompt-len ids, teacher-forced (every position's next-token logits):
            max |logits diff|, relative error ||dl|| / ||l||, greedy agreement (argmax equal), for
            (a) the checkpoint as written (init_tiny: N(0, 0.25) weights, chaotic: errors grow layer by layer) and
            (b) the same model rescaled to W ~ N(0, 1/fan_in), embeddings N(0, 1) (well conditioned)
  exactness our NF4 runner vs transformers' own bitsandbytes 4-bit model of the checkpoint (max |logits diff|)
Writes benchmarks/results/qlora_<device>.json.

    python scripts/bench_qlora.py                 # tiny + 20m, about a minute on 2 cores
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from loraledger.inference.batch import SeqChunk, build_batch
from loraledger.inference.kv_cache import PagedKVCache
from loraledger.inference.loader import load_model
from loraledger.inference.model import LlamaModel
from loraledger.inference.quant import load_model_quantized, module_nbytes, projections_nbytes, quantize_nf4
from loraledger.inference.tiny import init_tiny

SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "intermediate": 128, "vocab": 512},
    "20m": {"layers": 4, "hidden": 512, "heads": 8, "kv_heads": 4, "intermediate": 1536, "vocab": 8192},
}


def prompt_logits(model: LlamaModel, ids: list[int]) -> torch.Tensor:
    """One prefill of `ids` -> next-token logits at every position [L, vocab] float32."""
    blocks = -(-len(ids) // 16)
    batch = build_batch([SeqChunk(0, tuple(ids), 0, tuple(range(blocks)))], 16)
    return model.compute_logits(model(batch, PagedKVCache.for_model(model.config, blocks, 16)))


def compare(ref: LlamaModel, quant: LlamaModel, prompts: list[list[int]]) -> dict[str, float]:
    """max |dl|, ||dl|| / ||l|| and greedy agreement of `quant` vs `ref` over all positions of `prompts`."""
    want = torch.cat([prompt_logits(ref, p) for p in prompts])
    got = torch.cat([prompt_logits(quant, p) for p in prompts])
    return {"max_abs_logits_diff": float((got - want).abs().max()), "max_abs_logits": float(want.abs().max()),
            "relative_error": float((got - want).norm() / want.norm()),
            "greedy_agreement": float((got.argmax(-1) == want.argmax(-1)).float().mean()),
            "positions": int(want.shape[0])}


def weight_error(ref: LlamaModel, quant: LlamaModel) -> float:
    """sqrt(sum ||deq(W) - W||^2 / sum ||W||^2) over every projection."""
    import bitsandbytes.functional as F

    num = den = 0.0
    refs: dict[str, Any] = ref.named_linears()
    quants: dict[str, Any] = quant.named_linears()
    for name, q in quants.items():
        w = refs[name].weight.detach().float()
        deq = F.dequantize_4bit(q.weight.data, q.weight.quant_state).float()
        num += float((deq - w).pow(2).sum())
        den += float(w.pow(2).sum())
    return math.sqrt(num / den)


def well_conditioned(model: LlamaModel) -> LlamaModel:
    """A copy with every projection rescaled to std 1/sqrt(fan_in) and the embeddings to std 1."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in out.named_parameters():
            if p.dim() == 2:
                p.mul_((1.0 if "embed" in name else 1 / math.sqrt(p.shape[1])) / p.std())
    return out


def bench_size(size: str, root: Path, n_prompts: int, prompt_len: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    model_dir = init_tiny(root / size, **SIZES[size])
    ref = load_model(model_dir, "fp32")
    nf4 = load_model_quantized(model_dir, "nf4", "fp32")
    nf4_dq = load_model_quantized(model_dir, "nf4", "fp32", double_quant=True)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(6, ref.config.vocab_size, (prompt_len,), generator=g).tolist() for _ in range(n_prompts)]
    wc_ref = well_conditioned(ref)
    wc_nf4 = quantize_nf4(copy.deepcopy(wc_ref))

    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, device_map="cpu",
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_compute_dtype=torch.float32)).eval()
    with torch.no_grad():
        hf_logits = torch.cat([hf(torch.tensor([p])).logits[0].float() for p in prompts])
    ours = torch.cat([prompt_logits(nf4, p) for p in prompts])
    return {
        "model": {"size": size, **SIZES[size], "parameters": sum(p.numel() for p in ref.parameters()),
                  "dtype": "float32"},
        "memory_bytes": {
            "projections_fp32": projections_nbytes(ref), "projections_nf4": projections_nbytes(nf4),
            "projections_nf4_double_quant": projections_nbytes(nf4_dq),
            "model_fp32": module_nbytes(ref), "model_nf4": module_nbytes(nf4),
            "model_nf4_double_quant": module_nbytes(nf4_dq),
        },
        "projections_ratio_nf4_over_fp32": projections_nbytes(nf4) / projections_nbytes(ref),
        "weight_relative_error": weight_error(ref, nf4),
        "as_written_init_std_0.25": compare(ref, nf4, prompts),
        "well_conditioned_fan_in_init": compare(wc_ref, wc_nf4, prompts),
        "nf4_vs_transformers_bitsandbytes_max_abs_logits_diff": float((ours - hf_logits).abs().max()),
        "seconds": time.perf_counter() - t0,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="tiny,20m", help=f"comma list of {', '.join(SIZES)}")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--out", default="benchmarks/results/qlora_cpu.json")
    args = ap.parse_args(argv)
    import bitsandbytes

    report: dict[str, Any] = {"benchmark": "NF4 base (bitsandbytes) vs unquantized, CPU", "device": "cpu",
                              "bitsandbytes": bitsandbytes.__version__, "torch": torch.__version__,
                              "compute_dtype": "float32", "blocksize": 64, "sizes": {}}
    with tempfile.TemporaryDirectory(prefix="bench_qlora_") as tmp:
        for size in args.sizes.split(","):
            report["sizes"][size] = bench_size(size, Path(tmp), args.prompts, args.prompt_len)
            print(size, json.dumps(report["sizes"][size], indent=1), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
