"""Squatting: a registration copied from the mempool cannot take the id (commit-reveal bound to the sender), and a
registration of the same weights by someone else is never adopted or served by the node (owner, training config
and datanets must be the ones the adapter's own lineage.json names)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraledger.node.chain.keys import dev_account
from loraledger.node.errors import ContractRevertError
from loraledger.node.lineage.registration import (
    AdapterLineageError,
    register_adapter,
    verify_adapter_against_chain,
)
from loraledger.node.lineage.training import load_lineage
from tests.node.conftest import ChainWorld, random_lineage_adapter

OWNER, SQUATTER = 5, 9


def _adapter(world: ChainWorld, tiny_model_dir: Path, tmp_path: Path, seed: int) -> Path:
    path = random_lineage_adapter(tiny_model_dir, tmp_path / f"a{seed}", seed, world.manifest_dir,
                                  dict(world.lineage), int(world.w3.eth.chain_id), world.datanet_id)
    lin = json.loads((path / "lineage.json").read_text())
    lin["owner"] = dev_account(OWNER).address  # the trainer names who will register it
    (path / "lineage.json").write_text(json.dumps(lin))
    return path


def test_copied_reveal_does_not_take_the_id(chain_world: ChainWorld, tiny_model_dir: Path, tmp_path: Path) -> None:
    path = _adapter(chain_world, tiny_model_dir, tmp_path, 901)
    lin = load_lineage(path)
    owner = chain_world.bind(dev_account(OWNER)).adapters
    squatter = chain_world.bind(dev_account(SQUATTER)).adapters
    salt = b"\x42" * 32
    commitment = owner.commitment(owner.client.address, lin["weights_hash"], lin["training_config_hash"], salt)
    # the squatter copies the owner's commit transaction and gets it mined first: the commitment binds the
    # owner's address, so it only helps the owner (whose own copy then finds it pending)
    assert squatter.commit_adapter(commitment) is not None
    assert owner.commit_adapter(commitment) is None  # already pending: the owner's reveal goes ahead
    args = (lin["weights_hash"], lin["base_model_hash"], lin["training_config_hash"], [chain_world.datanet_id], 3,
            "file://copied")
    # the squatter sends the owner's reveal, byte for byte, first: no commitment under its address
    with pytest.raises(ContractRevertError, match="AdapterNotCommitted"):
        squatter.register_adapter(*args, salt=salt)
    adapter_id = owner.register_adapter(*args, salt=salt)
    assert owner.get_adapter(adapter_id).owner == owner.client.address
    # a commitment is used once
    with pytest.raises(ContractRevertError, match="AdapterNotCommitted"):
        owner.register_adapter(*args, salt=salt)


def test_node_refuses_a_squatted_registration(chain_world: ChainWorld, tiny_model_dir: Path, tmp_path: Path) -> None:
    path = _adapter(chain_world, tiny_model_dir, tmp_path, 902)
    lin = load_lineage(path)
    squatter = chain_world.bind(dev_account(SQUATTER))
    # someone holding a copy of the files registers them first, with the same hashes and datanets
    squat_id = squatter.adapters.register_adapter(lin["weights_hash"], lin["base_model_hash"],
                                                  lin["training_config_hash"], [chain_world.datanet_id], 3, "file://x")
    with pytest.raises(AdapterLineageError, match="owner") as err:
        verify_adapter_against_chain(path, squat_id, squatter, tiny_model_dir)
    assert "owner" in err.value.differences
    # and the squatter cannot register it under the owner's lineage either
    with pytest.raises(Exception, match="names owner"):
        register_adapter(path, squatter, fee_per_token=1)


def test_lineage_commands_find_the_deployment_and_rpc_from_the_environment(
        chain_world: ChainWorld, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A public chain's deployment.json records no RPC URL: the lineage commands take $LORALEDGER_DEPLOYMENT (or
    ./deployment.json) and $LORALEDGER_CHAIN_RPC_URL, like the node's own commands."""
    from loraledger.node.cli import main as cli
    from loraledger.node.types import as_address

    dep = json.loads(chain_world.deployment_file.read_text())
    dep.get("extra", {}).pop("rpcUrl", None)
    (tmp_path / "public.json").write_text(json.dumps(dep))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LORALEDGER_CHAIN_RPC_URL", raising=False)
    monkeypatch.setenv("LORALEDGER_DEPLOYMENT", str(tmp_path / "public.json"))
    payout = ["contributor", "payout", "--dev-account", "9", "0x" + "cd" * 20]
    assert cli(payout) == 1  # no RPC URL anywhere: the error says where to give one
    monkeypatch.setenv("LORALEDGER_CHAIN_RPC_URL", chain_world.rpc_url)
    assert cli(["contributor", "register", "--dev-account", "9", "--profile", "ipfs://p9"]) == 0
    assert cli(payout) == 0
    reader = chain_world.bind(dev_account(0)).contributors
    assert reader.payout_of(dev_account(9).address) == as_address("0x" + "cd" * 20)
