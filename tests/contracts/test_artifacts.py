"""The committed artifacts are exactly what the sources compile to, each carries a standard-JSON input that
recompiles it alone to the same bytes (what Etherscan/Sourcify verification takes), and the compile wrapper
behaves like solc."""

from __future__ import annotations

import json
import shutil
import subprocess
from typing import Any

import pytest
from eth_utils import keccak

from loraledger.node.chain.artifacts import (
    ARTIFACTS_DIR,
    CORE_CONTRACTS,
    FOUNDRY_DIR,
    REPO_ROOT,
    SOLC_WRAPPER,
    ArtifactError,
    artifact_bytes,
    compile_contracts,
    load_artifact,
    source_files,
)

needs_node = pytest.mark.skipif(shutil.which("node") is None, reason="node (Node.js) not on PATH")


@needs_node
@pytest.mark.slow
def test_recompiling_gives_the_committed_bytes() -> None:
    artifacts = compile_contracts()
    assert set(artifacts) == {p.stem for p in ARTIFACTS_DIR.glob("*.json")}, "stale or missing artifact files"
    for name, art in artifacts.items():
        committed = (ARTIFACTS_DIR / f"{name}.json").read_bytes()
        assert committed == artifact_bytes(art), f"{name}.json differs: run `loraledger contracts compile`"


@needs_node
def test_wrapper_answers_like_native_solc() -> None:
    out = subprocess.run([str(SOLC_WRAPPER), "--version"], capture_output=True, text=True, check=True).stdout
    assert "Version: 0.8.37+commit." in out
    bad = subprocess.run([str(SOLC_WRAPPER), "--bogus"], capture_output=True, text=True, check=False)
    assert bad.returncode != 0 and "unrecognised option '--bogus'" in bad.stderr


def test_load_artifact_fields_and_errors() -> None:
    for name in CORE_CONTRACTS:
        art = load_artifact(name)
        assert art.name == name and art.bytecode.startswith("0x60") and len(art.deployed_bytecode) > 100
        assert art.solc_version.startswith("0.8.37") and len(art.sha256) == 64 and len(art.source_sha256) == 64
        assert any(e.get("name") == name or e["type"] == "constructor" for e in art.abi)
    with pytest.raises(ArtifactError, match="no artifact for contract 'Nope'"):
        load_artifact("Nope")
    with pytest.raises(ValueError, match="not a contract name"):
        load_artifact("../etc")


_BARE_SOLCJS = "const solc = require('solc'); process.stdout.write(solc.compile(require('fs').readFileSync(0, 'utf8')));"


def _compile_without_imports(inp: dict[str, Any]) -> dict[str, Any]:
    """solcjs on `inp` with no import callback: a source the input does not carry is an error, not a disk read."""
    node = shutil.which("node")
    assert node is not None
    out = subprocess.run([node, "-e", _BARE_SOLCJS], input=json.dumps(inp), capture_output=True, text=True,
                         check=True, cwd=REPO_ROOT).stdout
    result: dict[str, Any] = json.loads(out)
    return result


@needs_node
@pytest.mark.slow
def test_artifacts_recompile_from_their_standard_json_inputs() -> None:
    """Each deployable artifact's input names exactly the sources its metadata hashed; compiled with nothing but
    those contents (no disk, no node_modules), they give the committed bytecode and metadata byte for byte."""
    arts = {p.stem: load_artifact(p.stem) for p in sorted(ARTIFACTS_DIR.glob("*.json"))}
    assert set(CORE_CONTRACTS) <= set(arts)
    for name, art in arts.items():
        assert art.metadata is not None and art.standard_json_input is not None, f"{name} lacks verification data"
        meta = json.loads(art.metadata)
        assert meta["settings"]["compilationTarget"] == {art.source_name: name}
        assert meta["compiler"]["version"] == art.solc_version
        sources = art.standard_json_input["sources"]
        assert set(sources) == set(meta["sources"]), name
        for src, info in meta["sources"].items():
            assert "0x" + keccak(sources[src]["content"].encode()).hex() == info["keccak256"], (name, src)
        # the deployed bytecode ends in the CBOR map holding the metadata's IPFS hash (bytecodeHash = ipfs)
        cbor_len = int(art.deployed_bytecode[-4:], 16)
        assert art.deployed_bytecode[-4 - 2 * cbor_len:-4].startswith("a264697066735822"), name

    # The deployed contracts, compiled from their own inputs. Their sources are merged into one compiler run
    # (one viaIR compile instead of five); each input is complete by the checks above, and a contract's bytes
    # depend only on the sources its metadata names, so this is what compiling each input alone gives.
    merged: dict[str, Any] = {"language": "Solidity", "sources": {}, "settings": None}
    selection: dict[str, dict[str, list[str]]] = {}
    for name in CORE_CONTRACTS:
        inp = arts[name].standard_json_input
        assert inp is not None
        merged["sources"].update(inp["sources"])
        settings = {k: v for k, v in inp["settings"].items() if k != "outputSelection"}
        assert merged["settings"] is None or merged["settings"] == settings, f"{name}: settings differ"
        merged["settings"] = settings
        for file, contracts in inp["settings"]["outputSelection"].items():
            selection.setdefault(file, {}).update(contracts)
    merged["settings"] = {**merged["settings"], "outputSelection": selection}
    out = _compile_without_imports(merged)
    errors = [e for e in out.get("errors", []) if e["severity"] == "error"]
    assert not errors, errors
    for name in CORE_CONTRACTS:
        art = arts[name]
        compiled = out["contracts"][art.source_name][name]
        assert "0x" + compiled["evm"]["bytecode"]["object"] == art.bytecode, f"{name}: creation bytecode differs"
        assert "0x" + compiled["evm"]["deployedBytecode"]["object"] == art.deployed_bytecode, name
        assert compiled["metadata"] == art.metadata, f"{name}: metadata differs"


@needs_node
def test_an_input_missing_a_source_does_not_compile() -> None:
    art = load_artifact("DatanetRegistry")
    assert art.standard_json_input is not None
    inp = json.loads(json.dumps(art.standard_json_input))
    dropped = next(n for n in inp["sources"] if n != art.source_name)
    del inp["sources"][dropped]
    out = _compile_without_imports(inp)
    assert any(e["severity"] == "error" for e in out["errors"]), "compiled without a source it imports"


def test_a_changed_source_does_not_match_the_artifact_input() -> None:
    """The verification input is content-checked: a tampered source no longer hashes to the metadata's keccak."""
    art = load_artifact("AttributionLedger")
    assert art.metadata is not None and art.standard_json_input is not None
    meta = json.loads(art.metadata)
    content = art.standard_json_input["sources"][art.source_name]["content"]
    tampered = content.replace("uint16 public constant BPS = 10_000;", "uint16 public constant BPS = 10_001;")
    assert tampered != content
    assert "0x" + keccak(tampered.encode()).hex() != meta["sources"][art.source_name]["keccak256"]
    # and what is committed is what is on disk now
    assert content == (REPO_ROOT / art.source_name).read_text(encoding="utf-8")


def test_foundry_suites_are_not_compiled_into_artifacts() -> None:
    names = {p.relative_to(REPO_ROOT).as_posix() for p in source_files()}
    assert "contracts/AttributionLedger.sol" in names and "contracts/test/FeeOnTransferToken.sol" in names
    assert not any(n.startswith(FOUNDRY_DIR.relative_to(REPO_ROOT).as_posix()) for n in names)
