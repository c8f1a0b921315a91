"""`adapter reproduce` on the session anvil: a trained + registered adapter reproduces bit for bit on CPU; tampered
weights, claimed tokens, a swapped datanet file and another seed are each named as "differs"; another recorded
stack is "cannot reproduce here" (exit 3), never "differs"."""

from __future__ import annotations

import json
import shutil
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from loraledger.inference.identity import config_hash, weights_hash
from loraledger.node.chain.keys import dev_account
from loraledger.node.cli import main as cli
from loraledger.node.lineage.datanet import load_manifest
from loraledger.node.lineage.registration import register_adapter
from loraledger.node.lineage.reproduce import CANNOT_REPRODUCE_HERE, DIFFERS, REPRODUCED, reproduce_adapter
from loraledger.node.lineage.training import load_lineage, train_adapter, write_lineage

OWNER = 5


@dataclass
class Setup:
    world: Any  # tests/node/conftest.py ChainWorld
    base: Path
    adapter_dir: Path
    adapter_id: int
    train_seconds: float


def _train(world: Any, base: Path, out: Path, seed: int) -> Any:
    return train_adapter(
        base, [world.manifest_dir], "lora", 4, 8, "q,v", 1, 1e-2, seed, out, 64, 2, progress=False
    )


def _register(world: Any, adapter_dir: Path) -> int:
    return int(register_adapter(adapter_dir, world.bind(dev_account(OWNER)), fee_per_token=1).adapter_id)


def _edit_config(adapter_dir: Path, edit: Any) -> None:
    """Apply `edit` to lineage.json's training config and re-hash it (a self-consistent, edited record)."""
    lin = load_lineage(adapter_dir)
    edit(lin["training_config"])
    lin["training_config_hash"] = config_hash(lin["training_config"])
    write_lineage(adapter_dir, lin)


@pytest.fixture(scope="module")
def setup(chain_world: Any, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Setup:
    out = tmp_path_factory.mktemp("reproduce") / "good"
    t0 = time.perf_counter()
    _train(chain_world, tiny_model_dir, out, seed=0)
    seconds = time.perf_counter() - t0
    return Setup(chain_world, tiny_model_dir, out, _register(chain_world, out), seconds)


def test_a_registered_adapter_reproduces(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    lin = load_lineage(setup.adapter_dir)
    cfg = lin["training_config"]
    assert cfg["determinism"]["deterministic_algorithms"] is True and cfg["determinism"]["dtype"] == "float32"
    assert cfg["device"]["type"] == "cpu" and cfg["device"]["capability"]
    assert cfg["data_order"]["seed"] == 0 and "randperm" in cfg["data_order"]["rule"]
    assert cfg["software"] == lin["library_versions"] and "torch" in cfg["software"]

    r = reproduce_adapter(setup.adapter_id, setup.world.bind(dev_account(0)))
    assert (r.verdict, r.differences, r.exit_code) == (REPRODUCED, {}, 0)
    assert r.reproduced_weights_hash == r.registered_weights_hash == lin["weights_hash"]
    with capsys.disabled():
        print(
            f"\n  original training {setup.train_seconds:.2f}s, reproduction's retraining {r.train_seconds:.2f}s"
        )

    dep = ["--deployment", str(setup.world.deployment_file)]
    assert (
        cli(
            [
                "adapter",
                "reproduce",
                str(setup.adapter_id),
                "--base",
                str(setup.base),
                "--datanet",
                str(setup.world.manifest_dir),
                "--json",
                *dep,
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["verdict"] == "reproduced" and out["reproduced_weights_hash"] == lin["weights_hash"]


def test_a_qlora_adapter_reproduces(setup: Setup, tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "qlora"
    r = train_adapter(
        setup.base, [setup.world.manifest_dir], "qlora", 4, 8, "q,v", 1, 1e-2, 2, out, 64, 2, progress=False
    )
    assert "bitsandbytes" in r.lineage["training_config"]["software"]
    rep = reproduce_adapter(_register(setup.world, out), setup.world.bind(dev_account(0)))
    assert (rep.verdict, rep.differences) == (REPRODUCED, {})


def test_an_accumulated_bfloat16_adapter_reproduces(setup: Setup, tmp_path: Path) -> None:
    """The retraining takes the recorded dtype and gradient accumulation, not the defaults (float32, k = 1),
    which would give other weights and report a differing adapter."""
    out = tmp_path / "acc-bf16"
    r = train_adapter(
        setup.base, [setup.world.manifest_dir], "lora", 4, 8, "q,v", 1, 1e-2, 3, out, 64, 2, progress=False,
        grad_accum=2, dtype="bfloat16",
    )
    cfg = r.lineage["training_config"]
    assert (cfg["gradient_accumulation_steps"], cfg["determinism"]["dtype"]) == (2, "bfloat16")
    rep = reproduce_adapter(_register(setup.world, out), setup.world.bind(dev_account(0)))
    assert (rep.verdict, rep.differences) == (REPRODUCED, {})
    assert rep.reproduced_weights_hash == r.weights_hash


def test_registered_weights_that_training_does_not_give_differ(setup: Setup, tmp_path: Path) -> None:
    tampered = tmp_path / "tampered"
    shutil.copytree(setup.adapter_dir, tampered)
    path = tampered / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[8 + struct.unpack("<Q", data[:8])[0] + 5] ^= 0x01
    path.write_bytes(bytes(data))
    lin = load_lineage(tampered)
    lin["weights_hash"], lin["registration"] = weights_hash(tampered), None
    write_lineage(tampered, lin)
    r = reproduce_adapter(_register(setup.world, tampered), setup.world.bind(dev_account(0)))
    assert r.verdict == DIFFERS and set(r.differences) == {"weightsHash"}
    assert r.differences["weightsHash"] == (
        lin["weights_hash"],
        load_lineage(setup.adapter_dir)["weights_hash"],
    )

    # the published copy at the registered URI changed after registration: named without retraining
    shutil.copytree(setup.adapter_dir, tmp_path / "published")
    data = bytearray((tmp_path / "published" / "adapter_model.safetensors").read_bytes())
    (tmp_path / "published" / "adapter_model.safetensors").write_bytes(bytes(data[:-4]) + b"\0\0\0\1")
    lin = load_lineage(tmp_path / "published")
    lin["weights_hash"], lin["registration"] = weights_hash(tmp_path / "published"), None
    write_lineage(tmp_path / "published", lin)
    pid = _register(setup.world, tmp_path / "published")
    # the files at the URI are swapped after registration
    (tmp_path / "published" / "adapter_model.safetensors").write_bytes(bytes(data))
    r = reproduce_adapter(pid, setup.world.bind(dev_account(0)))
    assert r.verdict == DIFFERS and set(r.differences) == {"published weights"} and r.train_seconds is None


def test_claimed_token_counts_differ(setup: Setup, tmp_path: Path) -> None:
    lin = load_lineage(setup.adapter_dir)
    who = lin["lineage_weights"][1]["contributor"]
    lin["lineage_weights"][1]["tokens"] += 7
    edited = tmp_path / "lineage.json"
    edited.write_text(json.dumps(lin))
    r = reproduce_adapter(setup.adapter_id, setup.world.bind(dev_account(0)), lineage_path=edited)
    assert r.verdict == DIFFERS and set(r.differences) == {f"tokens of {who}"}
    claimed, counted = r.differences[f"tokens of {who}"]
    assert claimed == counted + 7
    assert r.reproduced_weights_hash == r.registered_weights_hash  # the weights themselves reproduce


def test_a_swapped_datanet_file_differs(setup: Setup, tmp_path: Path) -> None:
    dn = tmp_path / "datanet"
    shutil.copytree(setup.world.manifest_dir, dn)
    entry = load_manifest(dn).entries[0]
    f = dn / "contributions" / entry.file
    f.write_text(json.dumps({"text": "a different record under the same file name"}) + "\n")
    r = reproduce_adapter(setup.adapter_id, setup.world.bind(dev_account(0)), manifest_dirs=[dn])
    assert r.verdict == DIFFERS and set(r.differences) == {f"datanet {dn}"} and r.train_seconds is None
    assert "the file was changed" in r.differences[f"datanet {dn}"][1]


def test_another_seed_in_the_config_differs(setup: Setup, tmp_path: Path) -> None:
    other = tmp_path / "other-seed"
    shutil.copytree(setup.adapter_dir, other)
    _edit_config(other, lambda c: c.update(seed=1))
    r = reproduce_adapter(setup.adapter_id, setup.world.bind(dev_account(0)), lineage_path=other)
    assert r.verdict == DIFFERS and set(r.differences) == {"trainingConfigHash"}


def test_another_recorded_stack_cannot_be_reproduced_here(
    setup: Setup, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "old-torch"
    _train(setup.world, setup.base, out, seed=1)
    _edit_config(out, lambda c: c["software"].update(torch="1.13.1"))
    adapter_id = _register(setup.world, out)
    r = reproduce_adapter(adapter_id, setup.world.bind(dev_account(0)))
    assert r.verdict == CANNOT_REPRODUCE_HERE and r.verdict != DIFFERS and r.exit_code == 3
    assert set(r.differences) == {"software.torch"} and r.differences["software.torch"][0] == "1.13.1"
    assert r.train_seconds is None
    dep = ["--deployment", str(setup.world.deployment_file)]
    assert cli(["adapter", "reproduce", str(adapter_id), *dep]) == 3
    assert "cannot reproduce here" in capsys.readouterr().out
