"""The benchmark scripts the GPU runs depend on (`scripts/gpu_check.sh`) run end to end on a tiny model, over
the code paths a GPU takes: fixed-shape decode steps (CUDA graphs there, "static" here) run ahead of the host.
A device lease is too short to find a broken script there. They run on the CPU even where CUDA is visible (the
static variants they check exist there only)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_script(name: str, *args: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / name), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


@pytest.mark.slow
def test_bench_engine_runs_with_static_steps_waited_for_and_ahead(tmp_path: Path) -> None:
    out = tmp_path / "engine.json"
    run_script("bench_engine.py", "--device", "cpu", "--size", "tiny", "--batch", "4", "--prompt-len", "8", "--new-tokens", "4",
               "--repeats", "1", "--compare-static", "--out", str(out))
    report = json.loads(out.read_text())
    assert report["complete"] is True
    res = report["results"]
    assert res["engine_static_ahead"]["steps_ahead"] > 0 and res["engine_static"]["steps_ahead"] == 0
    assert res["engine_static_ahead"]["tokens_agreeing_with_engine"] == 1.0  # fp32: every variant agrees
    assert res["engine_static"]["tokens_agreeing_with_engine"] == 1.0
    assert report["ratio"]["decode_engine_static_ahead_ahead_over_waited"] > 0
    assert len(report["ratio_per_round"]) == 1 and report["ratio"]["decode_median_of_rounds"] > 0
    assert set(report["decode_step"]) >= {"bandwidth_bound_s", "engine", "engine_static", "engine_static_ahead"}
    phases = report["host_phases"]
    ahead, waited = phases["engine_static_ahead"], phases["engine_static"]
    assert ahead["collect"] > 0 and waited["collect"] == 0  # only steps run ahead collect a step in flight
    for row in (ahead, waited):
        assert row["forward"] > 0 and row["text"] > 0 and row["schedule"] > 0 and row["wait"] == 0  # no CUDA
        parts = sum(row[k] for k in ("schedule", "fill", "forward", "sample", "wait", "collect", "text", "other"))
        assert abs(parts - row["step"]) < 1e-9 and row["other"] > 0
        assert 0 < row["host_s"] < row["step"] and row["host_over_step"] == row["host_s"] / row["step"]
        assert row["decode_steps"] == 3  # 4 new tokens: the prefill step samples the first, 3 decode steps follow


@pytest.mark.slow
def test_bench_lora_runs_with_static_steps_ahead(tmp_path: Path) -> None:
    out = tmp_path / "lora.json"
    run_script("bench_lora.py", "--device", "cpu", "--sizes", "tiny", "--num-adapters", "2", "--num-requests", "6", "--input-len", "8",
               "16", "--output-len", "4", "8", "--step-tokens", "4", "--peft-max-adapters", "2",
               "--peft-max-requests", "2", "--max-num-seqs", "4", "--decode-graphs", "static", "--async-decode", "on",
               "--out", str(out))
    report = json.loads(out.read_text())
    assert out.with_suffix(".png").exists()
    tiny = report["sizes"]["tiny"]
    (run,) = tiny["runs"]
    assert run["num_adapters"] == 2 and run["ours"]["requests"] == 6 and run["ours"]["throughput_tok_s"] > 0
    assert run["ours"]["decode_steps"] > 0 and run["ours"]["mean_distinct_adapters_per_decode_step"] > 0
    assert all(row["step_s"] > 0 and row["limit"] >= 1.0 for row in tiny["decode_step"])
    assert tiny["complete"] is True
    # every adapter of the run fits the slots here (N = 2): the load times come from spare keys, not skipped
    load = tiny["adapter_load"]
    assert load["page_cache_to_slot_ms"] > 0 and load["cpu_tier_to_slot_ms"] > 0 and load["weights_hash_ms"] > 0


@pytest.mark.slow
def test_bench_serving_and_real_model_engine_bench_run_on_a_local_checkpoint(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """bench_serving.py end to end (node over gRPC from another process, transformers static batches) and
    bench_engine.py on a checkpoint folder (the path `--model smollm2` takes after fetching), on the tiny model."""
    out = tmp_path / "serving.json"
    run_script("bench_serving.py", "--model-dir", str(tiny_model_dir), "--rates", "4", "--requests", "6",
               "--adapters", "2", "--batch", "4", "--max-prompt", "24", "--max-output", "8", "--out", str(out))
    report = json.loads(out.read_text())
    assert report["complete"] and out.with_suffix(".png").is_file()
    row = report["rates"][0]
    for system in ("node", "transformers"):
        assert row[system]["requests"] == 6 and row[system]["completion_tokens"] > 0
        assert 0 < row[system]["ttft_p50_s"] <= row[system]["ttft_p99_s"]
    lengths = report["workload"]["lengths"]
    assert lengths["records"] > 1000 and lengths["sigma"] > 0  # fitted to the sample contributions
    engine_out = tmp_path / "engine.json"
    run_script("bench_engine.py", "--device", "cpu", "--model-dir", str(tiny_model_dir), "--batch", "2",
               "--prompt-len", "8", "--new-tokens", "4", "--repeats", "1", "--out", str(engine_out))
    engine = json.loads(engine_out.read_text())
    assert engine["model"]["real"] and engine["ratio"]["decode"] > 0
    assert engine["results"]["engine"]["tokens_agreeing_with_engine"] == 1.0


@pytest.mark.slow
def test_bench_training_runs_its_variants(tmp_path: Path) -> None:
    """scripts/gpu_check.sh d runs it with --device cuda; here the same variants on the CPU, on a tiny model."""
    out = tmp_path / "training.json"
    run_script("bench_training.py", "--device", "cpu", "--size", "tiny", "--records", "4", "--seq-len", "32",
               "--batch", "4", "--out", str(out))
    report = json.loads(out.read_text())
    assert report["complete"] is True
    variants = report["variants"]
    assert [(v["dtype"], v["micro_batch"], v["grad_accum"]) for v in variants] == [
        ("float32", 4, 1), ("bfloat16", 4, 1), ("bfloat16", 2, 2)]
    assert variants[0]["rate_vs_float32_here"] == 1.0
    assert all(v["tokens"] > 0 and v["steps"] == 3 and v["tokens_per_s"] > 0 for v in variants)
