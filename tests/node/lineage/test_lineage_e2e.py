"""End to end on a real anvil: three contributors' signed files -> datanet build/register -> LoRA and QLoRA
training on the tiny model -> adapter registration -> verification against the chain (and the engine's loader)
passes for both; a tampered copy, another base, an unknown id are refused. Driven through the CLI where a
user would type it."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
from web3 import Web3

from loraledger.inference.errors import AdapterMismatchError
from loraledger.inference.identity import base_model_hash
from loraledger.inference.lora.adapter import BaseDims, load_adapter
from loraledger.inference.tiny import init_tiny
from loraledger.node.chain.bindings import Contracts
from loraledger.node.chain.client import ChainClient
from loraledger.node.chain.deploy import Deployment, deploy_all
from loraledger.node.chain.keys import PASSWORD_ENV, dev_account, write_keystore
from loraledger.node.cli import main as cli
from loraledger.node.errors import ContractRevertError
from loraledger.node.lineage.datanet import load_manifest, verify_manifest
from loraledger.node.lineage.registration import (
    AdapterHashes,
    AdapterLineageError,
    AdapterNotRegisteredError,
    LineageError,
    LineageMismatchError,
    register_adapter,
    verify_adapter_against_chain,
)
from loraledger.node.lineage.training import load_lineage, train_adapter

CURATOR, OWNER = 1, 5
CONTRIBUTORS = (2, 3, 4)
T0 = 1_700_000_000 * 10**9
TEXTS = {
    2: [{"text": "the quick brown fox jumps over the lazy dog"}, {"text": "a stitch in time saves nine"}],
    3: [{"prompt": "Q: sky?", "completion": " blue"}, {"text": "a stitch in time saves nine"}],
    4: [{"text": "rivers run down to the sea"}],
}


@pytest.fixture(scope="module")
def deployment(w3: Web3) -> Deployment:
    return deploy_all(w3, dev_account(0))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_tiny(tmp_path_factory.mktemp("base") / "model")


def _contracts(w3: Web3, deployment: Deployment, index: int) -> Contracts:
    return Contracts.at(ChainClient(w3, dev_account(index)), deployment.addresses)


def _flip_one_weight_byte(adapter_dir: Path) -> None:
    """Change one byte of tensor data (past the safetensors header) in adapter_model.safetensors."""
    path = adapter_dir / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    (header_len,) = struct.unpack("<Q", data[:8])
    data[8 + header_len + 5] ^= 0x01
    path.write_bytes(bytes(data))


def _dims(base_dir: Path) -> BaseDims:
    c = json.loads((base_dir / "config.json").read_text())
    head = c["hidden_size"] // c["num_attention_heads"]
    return BaseDims(
        c["num_hidden_layers"],
        c["hidden_size"],
        c["intermediate_size"],
        c["num_attention_heads"] * head,
        c["num_key_value_heads"] * head,
    )


@pytest.mark.slow
def test_contributions_to_verified_adapters(
    tmp_path: Path,
    w3: Web3,
    anvil: object,
    deployment: Deployment,
    base_dir: Path,
    chain_snapshot: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dep_file = tmp_path / "deployment.json"
    dep = dataclasses.replace(deployment, extra={"rpcUrl": anvil.rpc_url})  # type: ignore[attr-defined]
    dep_file.write_text(dep.to_json())
    chain = ["--deployment", str(dep_file)]

    # --- contributors register and sign (contributor 2 through an encrypted keystore, the others by dev key)
    keystore = tmp_path / "alice.json"
    write_keystore(keystore, dev_account(2), "pw", kdf="pbkdf2", iterations=2)
    monkeypatch.setenv(PASSWORD_ENV, "pw")
    src = tmp_path / "contributions"
    src.mkdir()
    for k, idx in enumerate(CONTRIBUTORS):
        key = ["--key-file", str(keystore)] if idx == 2 else ["--dev-account", str(idx)]
        assert cli(["contributor", "register", *key, "--profile", f"ipfs://profile{idx}", *chain]) == 0
        f = src / f"c{idx}.jsonl"
        f.write_text("".join(json.dumps(r) + "\n" for r in TEXTS[idx]))
        os.utime(f, ns=(T0 + k, T0 + k))
        assert cli(["contribution", "sign", *key, str(f)]) == 0
    assert cli(["contributor", "payout", "--dev-account", "4", "0x" + "ab" * 20, *chain]) == 0
    assert (
        _contracts(w3, deployment, 0).contributors.payout_of(dev_account(4).address).lower()
        == "0x" + "ab" * 20
    )

    # --- datanet: build with the registry check, register, verify against the chain
    dn = tmp_path / "datanet"
    assert (
        cli(
            [
                "datanet",
                "build",
                "--name",
                "e2e",
                "--from",
                str(src),
                "--out",
                str(dn),
                "--tokenizer",
                str(base_dir),
                *chain,
            ]
        )
        == 0
    )
    manifest = load_manifest(dn)
    assert [e.contributor for e in manifest.entries] == [dev_account(i).address for i in CONTRIBUTORS]
    assert manifest.entries[1].duplicate_lines == (2,)  # contributor 3 repeated contributor 2's record
    assert cli(["datanet", "register", str(dn), "--dev-account", str(CURATOR), *chain]) == 0
    assert cli(["datanet", "verify", str(dn), "--tokenizer", str(base_dir), *chain]) == 0
    curator = _contracts(w3, deployment, CURATOR)
    datanet_id = verify_manifest(dn, curator).datanet_id
    assert (
        datanet_id is not None
        and curator.datanets.get_datanet(datanet_id).contributions_root == manifest.root
    )

    # --- training: LoRA through the CLI, QLoRA through the library
    lora_dir, qlora_dir = tmp_path / "lora", tmp_path / "qlora"
    assert (
        cli(
            [
                "train",
                "--base",
                str(base_dir),
                "--datanet",
                str(dn),
                "--method",
                "lora",
                "--rank",
                "4",
                "--alpha",
                "8",
                "--targets",
                "q,k,v,o",
                "--epochs",
                "1",
                "--lr",
                "1e-2",
                "--seed",
                "7",
                "--max-seq-len",
                "64",
                "--batch-size",
                "2",
                "--out",
                str(lora_dir),
                "--no-progress",
            ]
        )
        == 0
    )
    train_adapter(
        base_dir, [dn], "qlora", 4, 8, "q,v,gate,up,down", 1, 1e-2, 7, qlora_dir, 64, 2, progress=False
    )
    lineage = load_lineage(lora_dir)
    assert lineage["datanets"][0]["datanet_id"] == datanet_id  # the manifest was registered before training
    assert sum(w["tokens"] for w in lineage["lineage_weights"]) == manifest.total_weight

    # --- registration: CLI for LoRA, library for QLoRA; ids land in lineage.json
    assert (
        cli(
            [
                "adapter",
                "register",
                str(lora_dir),
                "--fee-per-token",
                "3",
                "--dev-account",
                str(OWNER),
                *chain,
            ]
        )
        == 0
    )
    lora_id = int(load_lineage(lora_dir)["registration"]["adapter_id"])
    owner = _contracts(w3, deployment, OWNER)
    qreg = register_adapter(qlora_dir, owner, fee_per_token=5, uri="https://example.org/qlora")
    assert load_lineage(qlora_dir)["registration"]["adapter_id"] == qreg.adapter_id != lora_id
    info = owner.adapters.get_adapter(qreg.adapter_id)
    qlineage = load_lineage(qlora_dir)
    assert (info.weights_hash, info.base_model_hash, info.training_config_hash) == (
        qlineage["weights_hash"],
        qlineage["base_model_hash"],
        qlineage["training_config_hash"],
    )
    assert (
        list(info.datanet_ids) == [datanet_id]
        and info.fee_per_token == 5
        and info.owner == dev_account(OWNER).address
    )
    with pytest.raises(LineageError, match="already registered"):
        register_adapter(qlora_dir, owner, fee_per_token=5)

    # --- verification before serving passes for both, by on-chain id
    base_hash = base_model_hash(base_dir)
    for adapter_dir, adapter_id in ((lora_dir, lora_id), (qlora_dir, qreg.adapter_id)):
        onchain = verify_adapter_against_chain(adapter_dir, adapter_id, owner, base_dir)
        # the engine's own loader accepts the files against the registered hashes
        loaded = load_adapter(
            adapter_dir,
            _dims(base_dir),
            max_rank=8,
            expected_weights_hash=onchain.weights_hash,
            expected_base_hash=onchain.base_model_hash,
            base_hash=base_hash,
        )
        assert loaded.weights_hash == onchain.weights_hash and loaded.modules
    assert cli(["adapter", "verify", str(lora_dir), "--base", str(base_dir), *chain]) == 0
    verify_adapter_against_chain(AdapterHashes(qlineage["weights_hash"], base_hash), qreg.adapter_id, owner)

    # --- refusals: a tampered copy, another base, the wrong id, an unknown id
    tampered = tmp_path / "tampered"
    shutil.copytree(lora_dir, tampered)
    _flip_one_weight_byte(tampered)
    with pytest.raises(AdapterLineageError, match="weightsHash") as e:
        verify_adapter_against_chain(tampered, lora_id, owner, base_dir)
    assert set(e.value.differences) == {"weightsHash"}
    assert isinstance(e.value, LineageMismatchError)  # mapped to FAILED_PRECONDITION by loraledger.node.serving.status
    with pytest.raises(AdapterMismatchError):
        load_adapter(tampered, _dims(base_dir), max_rank=8, expected_weights_hash=lineage["weights_hash"])
    assert cli(["adapter", "verify", str(tampered), "--base", str(base_dir), *chain]) == 1
    _clear_registration(tampered)
    with pytest.raises(LineageError, match="weights changed after training"):
        register_adapter(tampered, owner, fee_per_token=1)

    other_base = init_tiny(tmp_path / "other-base", seed=1)
    with pytest.raises(AdapterLineageError, match="baseModelHash") as e:
        verify_adapter_against_chain(lora_dir, lora_id, owner, other_base)
    assert set(e.value.differences) == {"baseModelHash"}
    with pytest.raises(AdapterLineageError, match="weightsHash"):
        verify_adapter_against_chain(lora_dir, qreg.adapter_id, owner, base_dir)
    with pytest.raises(AdapterNotRegisteredError, match="no adapter 99"):
        verify_adapter_against_chain(lora_dir, 99, owner, base_dir)

    # the same weights cannot be registered twice (the chain refuses the duplicate hash)
    copy = tmp_path / "copy"
    shutil.copytree(qlora_dir, copy)
    _clear_registration(copy)
    with pytest.raises(ContractRevertError, match="AdapterDuplicateWeightsHash"):
        register_adapter(copy, owner, fee_per_token=1)


def _clear_registration(adapter_dir: Path) -> None:
    """Drop the registration from a copied adapter's lineage.json (as if it had never been registered)."""
    path = adapter_dir / "lineage.json"
    d = json.loads(path.read_text())
    d["registration"] = None
    path.write_text(json.dumps(d))
