"""`reproduce_adapter`: re-derive a registered adapter from its registered data and config; say whether it
comes out the same.

Nothing local is trusted beyond the inputs named: the chain's registration is the reference, the lineage
record, the base checkpoint and the datanet folders are only inputs, each checked against it.

    info    = AdapterRegistry.getAdapter(id)
    lineage = lineage.json at `lineage_path`, else the one at the registered URI (a local path or file: URI)
    inputs (any difference -> DIFFERS, nothing is trained):
        config_hash(lineage.training_config)   == info.trainingConfigHash          "trainingConfigHash"
        base_model_hash(base_dir)              == info.baseModelHash               "baseModelHash"
        tokenizer sha256 of base_dir           == config.tokenizer_sha256          "tokenizer"
        DatanetRegistry roots of info.datanetIds == config.datanets[*].root       "datanets"
        verify_manifest(each datanet dir, chain) passes (files, signatures, root)  "datanet <dir>"
        weights_hash(files at the registered URI, when local) == info.weightsHash "published weights"
    stack (any difference -> CANNOT_REPRODUCE_HERE, named; never DIFFERS):
        config.format, .software (torch, transformers, peft, ... versions), .device (cpu arch + kernel capability,
        or GPU name + compute capability + CUDA / cuDNN), .determinism  == this machine's for `device`
    retrain (train_adapter with the recorded arguments, thread count, dtype and gradient accumulation, into a
    temp dir):
        weights_hash(retrained)                == info.weightsHash                 "weightsHash"
        config_hash(retrained config)          == info.trainingConfigHash          "trainingConfigHash (retrained)"
        tokens per contributor (per datanet and summed) == the lineage's claims   "tokens of <addr>[ in <datanet>]"
    -> REPRODUCED when nothing differs, else DIFFERS

Exit codes of `loraledger adapter reproduce`: 0 reproduced, 1 differs, 3 cannot reproduce here (2: it could not
run, e.g. no lineage found or a datanet missing from the inputs).

What a REPRODUCED verdict proves: these weights follow from these datanets' records, this base and this config
on this stack. It says nothing about the data's quality or the adapter's usefulness.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

from loraledger.inference.identity import ADAPTER_WEIGHTS_FILE, base_model_hash, config_hash, weights_hash
from loraledger.node.errors import ConfigError
from loraledger.node.lineage.datanet import DatanetMismatchError, TokenCounter, verify_manifest
from loraledger.node.lineage.registration import AdapterNotRegisteredError
from loraledger.node.lineage.training import (
    TRAINING_FORMAT,
    check_device,
    load_lineage,
    run_environment,
    train_adapter,
)

if TYPE_CHECKING:
    from loraledger.node.chain.bindings import AdapterInfo, Contracts

__all__ = [
    "CANNOT_REPRODUCE_HERE",
    "DIFFERS",
    "EXIT_CODES",
    "REPRODUCED",
    "Reproduction",
    "reproduce_adapter",
]

REPRODUCED = "reproduced"
DIFFERS = "differs"
CANNOT_REPRODUCE_HERE = "cannot reproduce here"
EXIT_CODES: dict[str, int] = {REPRODUCED: 0, DIFFERS: 1, CANNOT_REPRODUCE_HERE: 3}


@dataclass(frozen=True)
class Reproduction:
    """The verdict on one adapter and what it rests on.

    `differences` maps each thing that differs to (registered or recorded, found or reproduced here); for
    CANNOT_REPRODUCE_HERE they are the stack entries ("software.torch", "device.capability", ...).
    """

    adapter_id: int
    verdict: str
    differences: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    registered_weights_hash: str = ""
    reproduced_weights_hash: str | None = None  # None when nothing was trained
    train_seconds: float | None = None

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.verdict]

    def to_dict(self) -> dict[str, Any]:
        return {
            "adapter_id": self.adapter_id,
            "verdict": self.verdict,
            "exit_code": self.exit_code,
            "differences": {k: {"registered": c, "here": h} for k, (c, h) in self.differences.items()},
            "registered_weights_hash": self.registered_weights_hash,
            "reproduced_weights_hash": self.reproduced_weights_hash,
            "train_seconds": self.train_seconds,
        }

    def describe(self) -> str:
        """One line for the verdict, then one per difference."""
        lines = [f"adapter {self.adapter_id}: {self.verdict}"]
        if self.verdict == REPRODUCED:
            lines[0] += f" (weights {self.registered_weights_hash}, retrained in {self.train_seconds:.1f}s)"
        label = "recorded" if self.verdict == CANNOT_REPRODUCE_HERE else "registered"
        lines += [f"  {k}: {label} {c}, here {h}" for k, (c, h) in self.differences.items()]
        return "\n".join(lines)


def _local_path(uri: str) -> Path | None:
    """The local path a registered URI names (a `file:` URI or a plain path), None for a remote one."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "" and uri:
        return Path(uri)
    return None


def _registration(contracts: Contracts, adapter_id: int) -> AdapterInfo:
    if not 0 < int(adapter_id) <= contracts.adapters.adapter_count():
        raise AdapterNotRegisteredError(
            f"no adapter {adapter_id} in the AdapterRegistry at {contracts.adapters.address}"
        )
    return contracts.adapters.get_adapter(int(adapter_id))


def _stack_differences(config: dict[str, Any], device: str) -> dict[str, tuple[Any, Any]]:
    """Recorded stack vs this machine's, entry by entry (the thread count and dtype are applied, not compared)."""
    diff: dict[str, tuple[Any, Any]] = {}
    if config.get("format") != TRAINING_FORMAT:
        diff["format"] = (config.get("format"), TRAINING_FORMAT)
        return diff
    recorded_threads = int(config["determinism"]["torch_threads"])
    recorded_dtype = str(config["determinism"].get("dtype", "float32"))
    here = run_environment(str(config["method"]), device, recorded_threads, recorded_dtype)
    for section in ("software", "device", "determinism"):
        rec, cur = config.get(section) or {}, here[section]
        for k in sorted(set(rec) | set(cur)):
            if rec.get(k) != cur.get(k):
                diff[f"{section}.{k}"] = (rec.get(k), cur.get(k))
    return diff


def _order_datanets(
    manifest_dirs: Sequence[Path],
    config: dict[str, Any],
    contracts: Contracts,
    diff: dict[str, tuple[Any, Any]],
) -> list[Path]:
    """The given datanet folders in the config's order, each verified against the chain; a failed check goes
    into `diff`. ConfigError when one of the adapter's datanets is not among them."""
    by_root: dict[str, Path] = {}
    for d in manifest_dirs:
        try:
            m = verify_manifest(d, contracts)
        except DatanetMismatchError as e:
            diff[f"datanet {d}"] = ("files, signatures and root of the registered datanet", str(e))
            continue
        by_root[m.root] = d
    wanted = [str(d["root"]) for d in config.get("datanets", [])]
    extra = [str(p) for r, p in by_root.items() if r not in wanted]
    if extra:
        diff["datanets (extra)"] = ("none", extra)
    if diff:
        return []
    missing = [r for r in wanted if r not in by_root]
    if missing:
        raise ConfigError(f"no --datanet given for root(s) {missing}; pass the adapter's datanet folders")
    return [by_root[r] for r in wanted]


def _token_claims(lineage: dict[str, Any]) -> dict[str, int]:
    """ "tokens of ADDR" / "tokens of ADDR in NAME" -> count, as a lineage record states them."""
    out = {f"tokens of {w['contributor']}": int(w["tokens"]) for w in lineage.get("lineage_weights", [])}
    for d in lineage.get("datanets", []):
        for a, n in (d.get("contributors") or {}).items():
            out[f"tokens of {a} in {d['name']}"] = int(n)
    return out


def reproduce_adapter(
    adapter_id: int,
    contracts: Contracts,
    *,
    base_dir: str | os.PathLike[str] | None = None,
    manifest_dirs: Sequence[str | os.PathLike[str]] | None = None,
    lineage_path: str | os.PathLike[str] | None = None,
    device: str = "cpu",
    work_dir: str | os.PathLike[str] | None = None,
) -> Reproduction:
    """Retrain registered adapter `adapter_id` from its recorded config and compare (module docstring).

    `base_dir` / `manifest_dirs` default to the folders the lineage names (checked like given ones);
    `lineage_path` (a lineage.json or its folder) defaults to the registered URI's. The retrained adapter goes
    into a temp dir under `work_dir` and is removed. Raises AdapterNotRegisteredError, ConfigError when an
    input cannot be found.
    """
    device = check_device(device)
    info = _registration(contracts, adapter_id)
    published = _local_path(info.uri)
    if lineage_path is None:
        if published is None:
            raise ConfigError(
                f"adapter {adapter_id} is registered at {info.uri!r}, not a local path; fetch its lineage.json "
                "and pass --lineage PATH"
            )
        lineage_path = published
    lineage = load_lineage(lineage_path)
    config: dict[str, Any] = lineage.get("training_config") or {}
    base = Path(base_dir if base_dir is not None else str(lineage.get("base_model_dir", "")))
    mdirs = (
        [Path(m) for m in manifest_dirs]
        if manifest_dirs
        else [Path(str(d.get("manifest_dir", ""))) for d in lineage.get("datanets", [])]
    )
    aid, registered = int(adapter_id), str(info.weights_hash)

    # --- inputs against the chain
    diff: dict[str, tuple[Any, Any]] = {}
    ch = config_hash(config)
    if ch != info.training_config_hash:
        diff["trainingConfigHash"] = (info.training_config_hash, ch)
    bh = base_model_hash(base, use_cache=False)  # the cache beside the checkpoint is local state, not trusted
    if bh != info.base_model_hash:
        diff["baseModelHash"] = (info.base_model_hash, bh)
    tok = TokenCounter(base).sha256
    if tok != config.get("tokenizer_sha256"):
        diff["tokenizer"] = (config.get("tokenizer_sha256"), tok)
    onchain_roots = [contracts.datanets.get_datanet(int(i)).contributions_root for i in info.datanet_ids]
    if onchain_roots != [d.get("root") for d in config.get("datanets", [])]:
        diff["datanets"] = (onchain_roots, [d.get("root") for d in config.get("datanets", [])])
    ordered = _order_datanets(mdirs, config, contracts, diff)
    if published is not None and (published / ADAPTER_WEIGHTS_FILE).is_file():
        ph = weights_hash(published)
        if ph != info.weights_hash:
            diff["published weights"] = (info.weights_hash, ph)
    if diff:
        return Reproduction(aid, DIFFERS, diff, registered)

    # --- the stack the config records vs this machine's
    stack = _stack_differences(config, device)
    if stack:
        return Reproduction(aid, CANNOT_REPRODUCE_HERE, stack, registered)

    # --- retrain with exactly the recorded config, compare
    with tempfile.TemporaryDirectory(prefix="loraledger-reproduce-", dir=work_dir) as tmp:
        t0 = time.perf_counter()
        r = train_adapter(
            base,
            ordered,
            str(config["method"]),
            int(config["rank"]),
            float(config["alpha"]),
            list(config["targets"]),
            int(config["epochs"]),
            float(config["lr"]),
            int(config["seed"]),
            Path(tmp) / "adapter",
            int(config["max_seq_len"]),
            int(config["batch_size"]),
            device=device,
            threads=int(config["determinism"]["torch_threads"]),
            progress=False,
            grad_accum=int(config.get("gradient_accumulation_steps", 1)),  # absent in configs of k = 1
            dtype=str(config["determinism"].get("dtype", "float32")),
        )
        seconds = time.perf_counter() - t0
    if r.weights_hash != info.weights_hash:
        diff["weightsHash"] = (info.weights_hash, r.weights_hash)
    if r.lineage["training_config_hash"] != info.training_config_hash:
        diff["trainingConfigHash (retrained)"] = (
            info.training_config_hash,
            r.lineage["training_config_hash"],
        )
    claimed, counted = _token_claims(lineage), _token_claims(r.lineage)
    for k in sorted(set(claimed) | set(counted)):
        if claimed.get(k, 0) != counted.get(k, 0):
            diff[k] = (claimed.get(k, 0), counted.get(k, 0))
    return Reproduction(aid, DIFFERS if diff else REPRODUCED, diff, registered, r.weights_hash, seconds)
