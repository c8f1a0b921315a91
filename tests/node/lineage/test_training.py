"""LoRA / QLoRA training on the tiny model: determinism, lineage weights, a PEFT adapter plain peft can
load."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loraledger.inference.identity import base_model_hash, config_hash, weights_hash
from loraledger.node.chain.keys import dev_account
from loraledger.node.errors import ConfigError
from loraledger.node.lineage.contributions import sign_contribution
from loraledger.node.lineage.datanet import TokenCounter, build_datanet, credited_records, load_manifest
from loraledger.node.lineage.training import (
    LINEAGE_FILE,
    LOSS_PLOT_FILE,
    TrainingResult,
    parse_targets,
    train_adapter,
)

T0 = 1_700_000_000 * 10**9
RECORDS = {
    2: [{"text": "the quick brown fox jumps over the lazy dog"}, {"text": "a stitch in time saves nine"}],
    3: [
        {"prompt": "Question: what colour is the sky?", "completion": " The sky is blue."},
        {"text": "a stitch in time saves nine"},
    ],  # duplicate of contributor 2's record: no credit here
    4: [{"text": "rivers run down to the sea and the sea never fills"}],
}


@pytest.fixture(scope="module")
def datanet_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("datanet")
    for k, (idx, recs) in enumerate(RECORDS.items()):
        f = root / "src" / f"c{idx}.jsonl"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("".join(json.dumps(r) + "\n" for r in recs))
        os.utime(f, ns=(T0 + k, T0 + k))
        sign_contribution(f, dev_account(idx))
    build_datanet("train-test", root / "src", root / "dn", tokenizer_dir=tiny_model_dir)
    return root / "dn"


def _train(
    base: Path,
    dn: Path,
    out: Path,
    method: str = "lora",
    seed: int = 0,
    max_seq_len: int = 64,
    epochs: int = 2,
) -> TrainingResult:
    return train_adapter(
        base,
        [dn],
        method,
        rank=4,
        alpha=8,
        targets="q,v,down",
        epochs=epochs,
        lr=1e-2,
        seed=seed,
        out_dir=out,
        max_seq_len=max_seq_len,
        batch_size=2,
        progress=False,
    )


def _assert_loads_in_plain_peft(adapter_dir: Path, tiny_model_dir: Path) -> None:
    """Plain transformers + peft load the adapter; it changes the base's logits; every lora_B is non-zero."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    lora_b = [v for k, v in tensors.items() if "lora_B" in k]
    assert lora_b and all(bool(torch.any(v != 0)) for v in lora_b)
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        before = base(ids).logits
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        after = model(ids).logits
    assert before.shape == after.shape
    assert not torch.allclose(before, after)


@pytest.mark.slow
def test_lora_is_deterministic_and_records_lineage(tmp_path: Path, tiny_model_dir: Path, datanet_dir: Path) -> None:
    a = _train(tiny_model_dir, datanet_dir, tmp_path / "a")
    b = _train(tiny_model_dir, datanet_dir, tmp_path / "b")
    assert a.weights_hash == b.weights_hash == weights_hash(tmp_path / "a")
    assert a.losses == b.losses and len(a.losses) == 2 * 2  # 4 credited examples, batch 2, 2 epochs
    c = _train(tiny_model_dir, datanet_dir, tmp_path / "c", seed=1)
    assert c.weights_hash != a.weights_hash

    lineage = json.loads((tmp_path / "a" / LINEAGE_FILE).read_text())
    manifest = load_manifest(datanet_dir)
    assert lineage["base_model_hash"] == base_model_hash(tiny_model_dir)
    assert lineage["training_config_hash"] == config_hash(lineage["training_config"])
    assert lineage["training_config"]["targets"] == ["down_proj", "q_proj", "v_proj"]
    assert lineage["training_config"]["datanets"] == [{"name": "train-test", "root": manifest.root}]
    assert lineage["datanets"][0]["datanet_id"] is None  # not registered yet
    # nothing truncated at 64 tokens: lineage weights are exactly the datanet's leaf weights
    expected = {e.contributor: e.weight for e in manifest.entries}
    assert {w["contributor"]: w["tokens"] for w in lineage["lineage_weights"]} == expected
    assert lineage["total_tokens"] == manifest.total_weight
    assert lineage["seed"] == 0 and lineage["final_loss"] == a.losses[-1]
    assert set(lineage["library_versions"]) >= {"torch", "transformers", "peft"}
    assert (tmp_path / "a" / LOSS_PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    _assert_loads_in_plain_peft(tmp_path / "a", tiny_model_dir)


def test_lineage_counts_only_tokens_inside_the_window(
    tmp_path: Path, tiny_model_dir: Path, datanet_dir: Path
) -> None:
    r = _train(tiny_model_dir, datanet_dir, tmp_path / "t", max_seq_len=6, epochs=1)
    tok = TokenCounter(tiny_model_dir)
    # each example is bos + ids + eos cut to 6 tokens: at most 5 content tokens per record, and a record whose
    # prompt fills the window (nothing left to learn) is dropped and credits nothing
    manifest = load_manifest(datanet_dir)
    per: dict[str, int] = {}
    dropped = 0
    for contributor, rec in credited_records(datanet_dir):
        p, c = tok.record_ids(rec)
        if 1 + len(p) >= 6:
            dropped += 1
            continue
        per[contributor] = per.get(contributor, 0) + min(len(p) + len(c), 5)
    assert dropped == 1  # the long prompt of contributor 3
    assert {w["contributor"]: w["tokens"] for w in r.lineage["lineage_weights"]} == per
    assert r.lineage["total_tokens"] < manifest.total_weight


def test_qlora_trains_on_cpu(tmp_path: Path, tiny_model_dir: Path, datanet_dir: Path) -> None:
    pytest.importorskip("bitsandbytes")
    r = _train(tiny_model_dir, datanet_dir, tmp_path / "q", method="qlora", epochs=1)
    lineage = r.lineage
    assert lineage["training_config"]["method"] == "qlora"
    assert lineage["training_config"]["quantization"]["type"] == "nf4"
    assert "bitsandbytes" in lineage["library_versions"]
    assert all(torch.isfinite(torch.tensor(r.losses)))
    _assert_loads_in_plain_peft(tmp_path / "q", tiny_model_dir)


def test_bad_arguments_are_refused(tmp_path: Path, tiny_model_dir: Path, datanet_dir: Path) -> None:
    assert parse_targets("q, k,gate_proj") == ["gate_proj", "k_proj", "q_proj"]
    with pytest.raises(ConfigError, match="unknown LoRA target 'qq'"):
        parse_targets("q,qq")
    with pytest.raises(ConfigError, match="method must be one of"):
        train_adapter(tiny_model_dir, [datanet_dir], "dora", 4, 8, "q", 1, 1e-3, 0, tmp_path / "x")
    with pytest.raises(ConfigError, match="rank must be a positive integer"):
        train_adapter(tiny_model_dir, [datanet_dir], "lora", 0, 8, "q", 1, 1e-3, 0, tmp_path / "x")
    with pytest.raises(ConfigError, match="same datanet is given twice"):
        train_adapter(tiny_model_dir, [datanet_dir, datanet_dir], "lora", 4, 8, "q", 1, 1e-3, 0, tmp_path / "x")
    (tmp_path / "exists").mkdir()
    with pytest.raises(ConfigError, match="already exists"):
        train_adapter(tiny_model_dir, [datanet_dir], "lora", 4, 8, "q", 1, 1e-3, 0, tmp_path / "exists")
    assert not (tmp_path / "x").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_training_is_deterministic_and_recorded(
    tmp_path: Path, tiny_model_dir: Path, datanet_dir: Path
) -> None:
    runs = [
        train_adapter(
            tiny_model_dir,
            [datanet_dir],
            "lora",
            4,
            8,
            "q,v",
            1,
            1e-2,
            0,
            tmp_path / f"g{i}",
            64,
            2,
            device="cuda",
            progress=False,
        )
        for i in range(2)
    ]
    assert runs[0].weights_hash == runs[1].weights_hash
    cfg = runs[0].lineage["training_config"]
    assert cfg["device"]["type"] == "cuda" and cfg["device"]["capability"]
    assert (
        cfg["determinism"]["cublas_workspace_config"] == ":4096:8"
        and cfg["determinism"]["attention"] == "eager"
    )
    cpu = _train(tiny_model_dir, datanet_dir, tmp_path / "cpu", epochs=1)
    assert cpu.lineage["training_config_hash"] != runs[0].lineage["training_config_hash"]
