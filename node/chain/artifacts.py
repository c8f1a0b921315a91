"""Compiled contracts: the deterministic compile step and the committed artifacts the rest of the node loads.

The compile step drives solcjs through `contracts/solc.js` (a native-solc look-alike) with py-solc-x, over every
`.sol` file under `contracts/` but the Foundry suites (`contracts/test/foundry/`; OpenZeppelin imports resolved
from `node_modules`), with fixed settings, and writes one `contracts/artifacts/<Name>.json` per deployable
contract:

    {"contractName", "sourceName", "abi", "bytecode", "deployedBytecode", "solcVersion", "settings",
     "sourceSha256", "inputSha256", "metadata", "standardJsonInput"}

`sourceSha256` is the sha256 of the contract's own `.sol` file; `inputSha256` the sha256 over every source the
compiler read (names and contents, imports included) plus the settings, i.e. everything the bytecode depends on.

Verification. `metadata` is the compiler's metadata JSON of the contract (the string whose hash ends the
bytecode); `standardJsonInput` is a standard-JSON compiler input holding, by content, exactly the sources that
metadata names, with the metadata's settings and the contract as compilation target. Compiling it with solc
`solcVersion` gives the committed bytecode byte for byte (tests/contracts/test_artifacts.py checks it), so it is
what a block explorer's "standard JSON input" verification (Etherscan) or Sourcify (metadata + sources) takes.

Artifacts are committed, so a user against a testnet needs no Node; `load_artifact` reads them.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraledger.node.errors import ConfigError, NodeError

REPO_ROOT = Path(__file__).resolve().parents[2]
CONTRACTS_DIR = REPO_ROOT / "contracts"
ARTIFACTS_DIR = CONTRACTS_DIR / "artifacts"
SOLC_WRAPPER = CONTRACTS_DIR / "solc.js"

# Fixed compiler settings: changing any of them changes every artifact (and fails the artifacts test until the
# artifacts are regenerated with `loraledger contracts compile`).
COMPILER_SETTINGS: dict[str, Any] = {
    "optimizer": {"enabled": True, "runs": 200},
    "viaIR": True,
    "evmVersion": "cancun",
    "metadata": {"bytecodeHash": "ipfs"},
}

# The contracts `deploy_all` deploys, in dependency order.
CORE_CONTRACTS: tuple[str, ...] = (
    "RewardToken",
    "ContributorRegistry",
    "DatanetRegistry",
    "AdapterRegistry",
    "AttributionLedger",
)


class CompileError(NodeError, RuntimeError):
    """The Solidity sources did not compile, or the compiler could not be run."""


class ArtifactError(NodeError, FileNotFoundError):
    """An artifact is missing or malformed; run `loraledger contracts compile`."""


@dataclass(frozen=True)
class Artifact:
    """One compiled contract as stored in `contracts/artifacts/<name>.json`.

    `bytecode` / `deployed_bytecode` are `0x`-prefixed hex; `sha256` is the sha256 of the artifact file's bytes
    (what a deployment records to say exactly which build it deployed).
    """

    name: str
    source_name: str
    abi: list[dict[str, Any]]
    bytecode: str
    deployed_bytecode: str
    solc_version: str
    source_sha256: str
    input_sha256: str
    sha256: str
    path: Path
    metadata: str | None = None  # solc metadata JSON (None in artifacts written before it was recorded)
    standard_json_input: dict[str, Any] | None = None  # the verification input (module docstring)


def _sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


FOUNDRY_DIR = CONTRACTS_DIR / "test" / "foundry"
"""Forge's fuzz and invariant suites: compiled by forge (contracts/foundry.toml), not by the artifact step."""


def source_files(contracts_dir: Path = CONTRACTS_DIR) -> list[Path]:
    """Every `.sol` file under `contracts_dir` (interfaces and test tokens included; not the Foundry suites under
    `test/foundry/`), sorted by path."""
    return sorted(
        p for p in contracts_dir.rglob("*.sol")
        if "artifacts" not in p.relative_to(contracts_dir).parts
        and not p.resolve().is_relative_to(FOUNDRY_DIR.resolve())
    )


def _source_name(path: Path) -> str:
    """Source unit name solc sees: the path relative to the repository root, with forward slashes."""
    return path.resolve().relative_to(REPO_ROOT).as_posix()


def standard_input(contracts_dir: Path = CONTRACTS_DIR) -> dict[str, Any]:
    """The standard-JSON compiler input: our sources by content, imports left to the wrapper's callback.

    input = {"language": "Solidity", "sources": {name: {"content": text}}, "settings": COMPILER_SETTINGS + outputs}
    """
    files = source_files(contracts_dir)
    if not files:
        raise CompileError(f"no .sol files under {contracts_dir}")
    sources = {_source_name(p): {"content": p.read_text(encoding="utf-8")} for p in files}
    settings = dict(COMPILER_SETTINGS)
    settings["outputSelection"] = {
        "*": {"*": ["abi", "metadata", "evm.bytecode.object", "evm.deployedBytecode.object"]}
    }
    return {"language": "Solidity", "sources": sources, "settings": settings}


def verification_input(metadata: str) -> dict[str, Any]:
    """The standard-JSON input that recompiles one contract to the same bytecode, built from its metadata.

    sources = every source the metadata names, by content (ours from the repository, `@scope/...` from
    node_modules; each checked against the metadata's keccak256); settings = the metadata's optimizer, viaIR,
    evmVersion, metadata and remappings settings, with the contract as the only output wanted.
    """
    from eth_utils import keccak

    meta = json.loads(metadata)
    sources: dict[str, dict[str, str]] = {}
    for name, info in sorted(meta["sources"].items()):
        content = _read_source_unit(name)
        expected = info.get("keccak256")
        if expected is not None and "0x" + keccak(content).hex() != expected:
            raise CompileError(f"source {name} on disk does not match the compiler's metadata ({expected})")
        sources[name] = {"content": content.decode("utf-8")}
    ms = meta["settings"]
    (target_file, target_name), = ms["compilationTarget"].items()
    settings: dict[str, Any] = {
        "optimizer": ms["optimizer"],
        "evmVersion": ms["evmVersion"],
        "metadata": ms["metadata"],
        "remappings": ms.get("remappings", []),
        "libraries": ms.get("libraries", {}),
        "outputSelection": {target_file: {target_name: ["abi", "metadata", "evm.bytecode.object",
                                                        "evm.deployedBytecode.object"]}},
    }
    if ms.get("viaIR"):
        settings["viaIR"] = True
    return {"language": "Solidity", "sources": sources, "settings": settings}


def _read_source_unit(name: str) -> bytes:
    """Bytes of a source unit the compiler used: ours from the repository, `@scope/...` from node_modules."""
    candidates = [REPO_ROOT / "node_modules" / name, REPO_ROOT / name] if name.startswith("@") else [REPO_ROOT / name]
    for c in candidates:
        if c.is_file():
            return c.read_bytes()
    raise CompileError(f"compiler used source {name!r} but it is not on disk (looked in {candidates})")


def _input_sha256(used_sources: list[str]) -> str:
    """sha256 over canonical JSON of {settings, sources: {name: sha256(content)}} for every source solc read."""
    digest = {name: _sha256_hex(_read_source_unit(name)) for name in sorted(used_sources)}
    blob = json.dumps({"settings": COMPILER_SETTINGS, "sources": digest}, sort_keys=True, separators=(",", ":"))
    return _sha256_hex(blob.encode())


def find_node() -> str:
    """Path of the `node` executable the wrapper needs; CompileError naming the fix when absent."""
    node = shutil.which("node")
    if node is None:
        raise CompileError("`node` (Node.js >= 18) is not on PATH; it is needed to run contracts/solc.js")
    if not (REPO_ROOT / "node_modules" / "solc").is_dir():
        raise CompileError("node_modules/solc is missing; run `npm ci` (or `make deps`) in the repository root")
    return node


def compile_contracts(contracts_dir: Path = CONTRACTS_DIR) -> dict[str, dict[str, Any]]:
    """Compile every source and return the artifacts (as JSON-ready dicts) by contract name.

    Only contracts defined in our own files with non-empty creation bytecode (no interfaces, no OpenZeppelin
    internals) get an artifact. Deterministic: same sources + settings -> same bytes.
    """
    import solcx
    from solcx.exceptions import SolcError
    from solcx.wrapper import get_version_str_from_solc_binary

    find_node()
    inp = standard_input(contracts_dir)
    try:
        version = get_version_str_from_solc_binary(SOLC_WRAPPER)
        out = solcx.compile_standard(inp, solc_binary=SOLC_WRAPPER, allow_paths=str(REPO_ROOT))
    except SolcError as e:
        detail = e.message if not e.stderr_data else f"{e.message}\n{e.stderr_data}"
        raise CompileError(f"solidity compilation failed:\n{detail}") from e
    except OSError as e:
        raise CompileError(f"cannot run {SOLC_WRAPPER} (is it executable and is node on PATH?): {e}") from e
    input_sha = _input_sha256(list(out.get("sources", {})))
    ours = set(inp["sources"])
    artifacts: dict[str, dict[str, Any]] = {}
    for source_name in sorted(out.get("contracts", {})):
        if source_name not in ours:
            continue
        source_sha = _sha256_hex((REPO_ROOT / source_name).read_bytes())
        for name, c in sorted(out["contracts"][source_name].items()):
            bytecode = c["evm"]["bytecode"]["object"]
            if not bytecode:
                continue
            if name in artifacts:
                raise CompileError(f"contract name {name!r} is defined twice ({artifacts[name]['sourceName']}, {source_name})")
            artifacts[name] = {
                "contractName": name,
                "sourceName": source_name,
                "abi": c["abi"],
                "bytecode": "0x" + bytecode,
                "deployedBytecode": "0x" + c["evm"]["deployedBytecode"]["object"],
                "solcVersion": version,
                "settings": COMPILER_SETTINGS,
                "sourceSha256": source_sha,
                "inputSha256": input_sha,
                "metadata": c["metadata"],
                "standardJsonInput": verification_input(c["metadata"]),
            }
    missing = [n for n in CORE_CONTRACTS if n not in artifacts]
    if missing:
        raise CompileError(f"compilation produced no bytecode for {missing}")
    return artifacts


def artifact_bytes(artifact: dict[str, Any]) -> bytes:
    """The exact bytes an artifact is stored as: 2-space-indented JSON, keys in insertion order, final newline."""
    return (json.dumps(artifact, indent=2) + "\n").encode()


def write_artifacts(artifacts: dict[str, dict[str, Any]], out_dir: Path = ARTIFACTS_DIR) -> list[Path]:
    """Write each artifact to `out_dir/<Name>.json` and remove stale `*.json` files; return the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, art in sorted(artifacts.items()):
        path = out_dir / f"{name}.json"
        data = artifact_bytes(art)
        if not path.is_file() or path.read_bytes() != data:
            path.write_bytes(data)
        written.append(path)
    for stale in out_dir.glob("*.json"):
        if stale not in written:
            stale.unlink()
    return written


def load_artifact(name: str, artifacts_dir: Path = ARTIFACTS_DIR) -> Artifact:
    """Read `artifacts_dir/<name>.json`; ArtifactError if it is missing or lacks a field."""
    if not name or "/" in name or "\\" in name:
        raise ConfigError(f"not a contract name: {name!r}")
    path = artifacts_dir / f"{name}.json"
    if not path.is_file():
        known = sorted(p.stem for p in artifacts_dir.glob("*.json")) if artifacts_dir.is_dir() else []
        raise ArtifactError(
            f"no artifact for contract {name!r} at {path} (known: {known}); run `loraledger contracts compile`"
        )
    raw = path.read_bytes()
    try:
        d = json.loads(raw)
        return Artifact(
            name=d["contractName"],
            source_name=d["sourceName"],
            abi=d["abi"],
            bytecode=d["bytecode"],
            deployed_bytecode=d["deployedBytecode"],
            solc_version=d["solcVersion"],
            source_sha256=d["sourceSha256"],
            input_sha256=d["inputSha256"],
            sha256=_sha256_hex(raw),
            path=path,
            metadata=d.get("metadata"),
            standard_json_input=d.get("standardJsonInput"),
        )
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ArtifactError(f"artifact {path} is malformed ({e!r}); run `loraledger contracts compile`") from e
