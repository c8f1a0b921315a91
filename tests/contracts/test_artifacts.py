"""The committed artifacts are exactly what the sources compile to, and the compile wrapper behaves like solc."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from loraledger.node.chain.artifacts import (
    ARTIFACTS_DIR,
    CORE_CONTRACTS,
    SOLC_WRAPPER,
    ArtifactError,
    artifact_bytes,
    compile_contracts,
    load_artifact,
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
