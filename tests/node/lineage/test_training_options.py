"""Training options on the CPU: gradient accumulation (k micro-batches follow one batch k times larger),
bfloat16 bases, `--device auto`, and the `train` command passing them through."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loraledger.inference.identity import config_hash
from loraledger.node.chain.keys import dev_account
from loraledger.node.errors import ConfigError
from loraledger.node.lineage.contributions import sign_contribution
from loraledger.node.lineage.datanet import build_datanet
from loraledger.node.lineage.training import (
    TrainingResult,
    resolve_device,
    resolve_dtype,
    train_adapter,
)

T0 = 1_700_000_000 * 10**9
LINES = [
    "the quick brown fox jumps over the lazy dog",
    "a stitch in time saves nine",
    "rivers run down to the sea and the sea never fills",
    "the early bird catches the worm",
    "all that glitters is not gold",
    "where there is smoke there is fire",
    "the pen is mightier than the sword",
    "actions speak louder than words",
]


@pytest.fixture(scope="module")
def datanet_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("datanet")
    for k, idx in enumerate((2, 3)):
        f = root / "src" / f"c{idx}.jsonl"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("".join(json.dumps({"text": t}) + "\n" for t in LINES[k::2]))
        os.utime(f, ns=(T0 + k, T0 + k))
        sign_contribution(f, dev_account(idx))
    build_datanet("options-test", root / "src", root / "dn", tokenizer_dir=tiny_model_dir)
    return root / "dn"


def _train(base: Path, dn: Path, out: Path, batch_size: int, grad_accum: int = 1, dtype: str = "float32",
           device: str = "cpu") -> TrainingResult:
    return train_adapter(
        base, [dn], "lora", rank=4, alpha=8, targets="q,v,down", epochs=2, lr=1e-2, seed=0, out_dir=out,
        max_seq_len=64, batch_size=batch_size, device=device, threads=1, progress=False,
        grad_accum=grad_accum, dtype=dtype,
    )


def _weights(r: TrainingResult) -> dict[str, torch.Tensor]:
    return load_file(str(r.out_dir / "adapter_model.safetensors"))


def test_gradient_accumulation_follows_the_larger_batch(tmp_path: Path, tiny_model_dir: Path, datanet_dir: Path) -> None:
    big = _train(tiny_model_dir, datanet_dir, tmp_path / "b4", batch_size=4)
    acc = _train(tiny_model_dir, datanet_dir, tmp_path / "b2x2", batch_size=2, grad_accum=2)
    small = _train(tiny_model_dir, datanet_dir, tmp_path / "b2", batch_size=2)
    assert acc.lineage["steps"] == big.lineage["steps"] == 4  # 8 records / (2 * 2) per step, 2 epochs
    assert small.lineage["steps"] == 8
    assert acc.lineage["losses"] == pytest.approx(big.lineage["losses"], rel=1e-4)
    wb, wa, ws = _weights(big), _weights(acc), _weights(small)
    for name in wb:
        assert torch.allclose(wa[name], wb[name], rtol=1e-3, atol=1e-5), name
    assert any(not torch.allclose(ws[n], wb[n], rtol=1e-3, atol=1e-5) for n in wb)

    cfg = acc.lineage["training_config"]
    assert cfg["gradient_accumulation_steps"] == 2
    assert acc.lineage["training_config_hash"] == config_hash(cfg)
    assert "gradient_accumulation_steps" not in big.lineage["training_config"]  # k = 1: the config of before


def test_bfloat16_base_trains_deterministically(tmp_path: Path, tiny_model_dir: Path, datanet_dir: Path) -> None:
    a = _train(tiny_model_dir, datanet_dir, tmp_path / "a", batch_size=4, dtype="bfloat16")
    b = _train(tiny_model_dir, datanet_dir, tmp_path / "b", batch_size=4, dtype="bfloat16")
    f32 = _train(tiny_model_dir, datanet_dir, tmp_path / "f32", batch_size=4)
    assert a.weights_hash == b.weights_hash
    assert a.weights_hash != f32.weights_hash
    assert a.lineage["training_config"]["determinism"]["dtype"] == "bfloat16"
    assert a.lineage["training_config_hash"] != f32.lineage["training_config_hash"]
    assert all(t.dtype == torch.float32 for t in _weights(a).values())  # LoRA weights stay float32


def test_auto_device_and_dtype_resolve_here() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto") == expected
    assert resolve_dtype("auto", "cpu") == "float32"
    assert resolve_dtype("bfloat16", "cpu") == "bfloat16"
    with pytest.raises(ConfigError, match="device must be cpu, cuda or cuda:N"):
        resolve_device("tpu")
    with pytest.raises(ConfigError, match="dtype must be auto, float32 or bfloat16"):
        resolve_dtype("float16", "cpu")


def test_train_command_passes_the_options(
    tmp_path: Path, tiny_model_dir: Path, datanet_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from loraledger.node.cli import main

    out = tmp_path / "cli"
    argv = ["train", "--base", str(tiny_model_dir), "--datanet", str(datanet_dir), "--out", str(out), "--rank", "4",
            "--targets", "q,v", "--batch-size", "2", "--grad-accum", "2", "--device", "auto", "--dtype", "auto",
            "--lr", "1e-2", "--threads", "1", "--no-progress"]
    assert main(argv) == 0
    lineage = json.loads((out / "lineage.json").read_text())
    assert lineage["steps"] == 2 and lineage["training_config"]["gradient_accumulation_steps"] == 2
    assert lineage["training_config"]["device"]["type"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert main([*argv[:-1], "--grad-accum", "0", "--force", "--no-progress"]) == 1
    assert "grad_accum must be a positive integer" in capsys.readouterr().err


# --- the same on a GPU (scripts/gpu_check.sh, stage d); skipped without CUDA -----------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu_check.sh d)")


@cuda
def test_cuda_bfloat16_training_is_deterministic(tmp_path: Path, tiny_model_dir: Path, datanet_dir: Path) -> None:
    """Twice on the GPU in bf16: the same weights, so an adapter trained there can be reproduced there; the
    config names the GPU and the settings that make it so (eager attention, the cuBLAS workspace)."""
    before = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    a = _train(tiny_model_dir, datanet_dir, tmp_path / "a", batch_size=4, dtype="auto", device="auto")
    b = _train(tiny_model_dir, datanet_dir, tmp_path / "b", batch_size=4, dtype="auto", device="auto")
    cfg = a.lineage["training_config"]
    assert cfg["device"]["type"] == "cuda" and cfg["determinism"]["dtype"] == resolve_dtype("auto", "cuda")
    assert cfg["determinism"]["attention"] == "eager" and cfg["determinism"]["cublas_workspace_config"]
    assert a.weights_hash == b.weights_hash
    assert a.lineage["losses"][-1] < a.lineage["losses"][0]
    assert all(t.dtype == torch.float32 for t in _weights(a).values())
    assert os.environ.get("CUBLAS_WORKSPACE_CONFIG") == before  # set for the run only


@cuda
def test_cuda_accumulation_and_float32_follow_the_cpu(tmp_path: Path, tiny_model_dir: Path, datanet_dir: Path) -> None:
    """float32 on the GPU follows the CPU's loss curve (other kernels, so close, not equal), and two
    accumulated micro-batches follow one batch twice as large there too."""
    cpu = _train(tiny_model_dir, datanet_dir, tmp_path / "cpu", batch_size=4)
    gpu = _train(tiny_model_dir, datanet_dir, tmp_path / "gpu", batch_size=4, device="cuda")
    acc = _train(tiny_model_dir, datanet_dir, tmp_path / "acc", batch_size=2, grad_accum=2, device="cuda")
    assert gpu.lineage["losses"] == pytest.approx(cpu.lineage["losses"], rel=1e-3)
    assert acc.lineage["losses"] == pytest.approx(gpu.lineage["losses"], rel=1e-3)
    wg, wa = _weights(gpu), _weights(acc)
    for name in wg:
        assert torch.allclose(wa[name], wg[name], rtol=1e-3, atol=1e-5), name
    # the device class is part of the config: a GPU run never passes for the CPU's registration
    assert gpu.lineage["training_config"]["device"] != cpu.lineage["training_config"]["device"]
    assert gpu.lineage["training_config_hash"] != cpu.lineage["training_config_hash"]
