"""Adapter lineage on chain: register a trained adapter, and check an adapter against its registration.

    reg = register_adapter(adapter_dir, contracts, fee_per_token=3)
        # AdapterRegistry.commitAdapter(commitment), then in a later block
        # AdapterRegistry.registerAdapter(weightsHash, baseHash, trainingConfigHash, datanetIds, fee, uri, salt)
        # -> reg.adapter_id and reg.owner, also written into adapter_dir/lineage.json
    info = verify_adapter_against_chain(adapter_dir, adapter_id, contracts, base_model_dir)
        # what the node calls before serving adapter `adapter_id` from `adapter_dir` on `base_model_dir`

Verification, all differences collected and named in one error:

    chain = AdapterRegistry.getAdapter(adapter_id)                    # NotFoundError if no such id
    weights_hash(adapter files)      == chain.weightsHash              # tampered or other weights
    base_model_hash(base_model_dir)  == chain.baseModelHash            # trained on another base
    DatanetRegistry.exists(d) for d in chain.datanetIds                # lineage points at real datanets
    not chain.deprecated                                               # unless allow_deprecated
  and, when the adapter directory's lineage.json is at hand (it always is for a directory):
    config_hash(lineage.training_config) == chain.trainingConfigHash  # the training run it claims
    {DatanetRegistry root of d for d in chain.datanetIds} == {lineage.datanets[].root}
    chain.owner == lineage.registration.owner (or lineage.owner)       # when lineage.json names the owner
    chain.owner == expected_owner                                      # when the caller names one (adoption)

The owner check is what keeps a squatter's registration of the same weights (a copy of the file, registered
first from another account) from being served and paid: the registry's commit-reveal already stops a
registration copied from the mempool, and the node still adopts an id only if its owner, datanets and training
config are the ones the adapter's own lineage names.

`contracts` is a `loraledger.node.chain.bindings.Contracts` (any object with `.adapters` / `.datanets` clients fits).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraledger.inference.identity import base_model_hash, config_hash, parse_hash, weights_hash
from loraledger.node.errors import ConfigError, LineageMismatchError, NodeError, NotFoundError
from loraledger.node.lineage.datanet import MANIFEST_FILE, load_manifest
from loraledger.node.lineage.training import load_lineage, write_lineage
from loraledger.node.types import AdapterId, Address, DatanetId, TxHash, as_wei

if TYPE_CHECKING:
    from loraledger.node.chain.bindings import AdapterInfo, Contracts

__all__ = [
    "AdapterHashes",
    "AdapterLineageError",
    "AdapterNotRegisteredError",
    "AdapterRegistration",
    "LineageError",
    "LineageMismatchError",
    "register_adapter",
    "verify_adapter_against_chain",
]


class LineageError(NodeError, ValueError):
    """An adapter cannot be registered as asked (already registered, datanet not registered, lineage
    edited)."""


class AdapterLineageError(LineageMismatchError):
    """The adapter's files or base do not match its on-chain registration.

    `differences` maps each field that differs ("weightsHash", "baseModelHash", "datanet 3", "deprecated") to
    (on chain, local), so the caller can say exactly what is wrong.
    """

    def __init__(self, adapter_id: int, differences: dict[str, tuple[object, object]]) -> None:
        self.adapter_id = adapter_id
        self.differences = differences
        parts = [f"{k}: chain has {c}, local is {loc}" for k, (c, loc) in differences.items()]
        super().__init__(f"adapter {adapter_id} does not match its registration: " + "; ".join(parts))


class AdapterNotRegisteredError(NotFoundError):
    """No adapter with the asked id exists in the AdapterRegistry."""


@dataclass(frozen=True)
class AdapterHashes:
    """The two identities of an adapter copy, when the caller already computed them."""

    weights_hash: str
    base_model_hash: str | None = None


@dataclass(frozen=True)
class AdapterRegistration:
    """What `register_adapter` registered, as stored under `registration` in lineage.json."""

    adapter_id: AdapterId
    chain_id: int
    registry: Address
    tx_hash: TxHash
    fee_per_token: int
    uri: str
    datanet_ids: tuple[DatanetId, ...]
    owner: Address

    def to_dict(self) -> dict[str, Any]:
        return {
            "adapter_id": self.adapter_id,
            "owner": self.owner,
            "chain_id": self.chain_id,
            "registry": self.registry,
            "tx_hash": self.tx_hash,
            "fee_per_token": self.fee_per_token,
            "uri": self.uri,
            "datanet_ids": list(self.datanet_ids),
        }


def _datanet_ids(lineage: dict[str, Any], contracts: Contracts) -> list[DatanetId]:
    """The on-chain id of each datanet of `lineage`, checked against the chain (same chain, same root).

    A datanet registered after training is found through its manifest dir (recorded in lineage.json).
    """
    chain_id = contracts.datanets.client.chain_id
    ids: list[DatanetId] = []
    for d in lineage["datanets"]:
        did, dchain = d.get("datanet_id"), d.get("chain_id")
        if did is None:
            manifest_dir = Path(str(d.get("manifest_dir", "")))
            if (manifest_dir / MANIFEST_FILE).is_file():
                m = load_manifest(manifest_dir)
                if m.root == d["root"] and m.registration is not None:
                    did, dchain = m.registration.datanet_id, m.registration.chain_id
        if did is None:
            raise LineageError(
                f"datanet {d['name']!r} (root {d['root']}) is not registered; run "
                f"`loraledger datanet register {d.get('manifest_dir', 'MANIFEST_DIR')}` first"
            )
        if dchain != chain_id:
            raise LineageError(
                f"datanet {d['name']!r} is registered on chain {dchain}, not on chain {chain_id}"
            )
        if not contracts.datanets.exists(int(did)):
            raise LineageError(f"datanet {did} ({d['name']!r}) does not exist on chain {chain_id}")
        onchain_root = contracts.datanets.get_datanet(int(did)).contributions_root
        if onchain_root != d["root"]:
            raise LineageError(
                f"datanet {did} has root {onchain_root} on chain, but the adapter was trained on "
                f"root {d['root']}"
            )
        ids.append(DatanetId(int(did)))
    if len(set(ids)) != len(ids):
        raise LineageError(f"the adapter names datanet ids {ids} with a repeat")
    return ids


def register_adapter(
    adapter_dir: str | os.PathLike[str],
    contracts: Contracts,
    fee_per_token: int,
    uri: str | None = None,
) -> AdapterRegistration:
    """Register the adapter at `adapter_dir` (trained by `train_adapter`) in the AdapterRegistry.

    Recomputes the weights hash and training-config hash and refuses if they differ from lineage.json (files
    changed since training); resolves and checks the datanet ids; sends `registerAdapter` from the bound
    account (the adapter owner); writes the registration into lineage.json. `uri` defaults to the adapter
    directory's file:// URI. Raises LineageError, ContractRevertError (e.g. weights hash already registered).
    """
    root = Path(adapter_dir)
    lineage = load_lineage(root)
    if lineage.get("registration"):
        r = lineage["registration"]
        raise LineageError(
            f"{root} is already registered as adapter {r['adapter_id']} on chain {r['chain_id']}"
        )
    fee = int(as_wei(fee_per_token))
    wh = weights_hash(root)
    if wh != lineage["weights_hash"]:
        raise LineageError(
            f"{root}: weights hash is {wh} but lineage.json says {lineage['weights_hash']} "
            "(the weights changed after training)"
        )
    ch = config_hash(lineage["training_config"])
    if ch != lineage["training_config_hash"]:
        raise LineageError(
            f"{root}: training config hashes to {ch} but lineage.json says "
            f"{lineage['training_config_hash']} (lineage.json was edited)"
        )
    me = contracts.adapters.client.address
    if lineage.get("owner") and str(lineage["owner"]).lower() != me.lower():
        raise LineageError(f"{root}: lineage.json names owner {lineage['owner']}, but the registering account is {me}")
    ids = _datanet_ids(lineage, contracts)
    where = uri if uri is not None else root.resolve().as_uri()
    adapters = contracts.adapters
    result = adapters.register_adapter_tx(wh, parse_hash(lineage["base_model_hash"]), ch, [int(i) for i in ids],
                                          fee, where)
    found = [e["args"]["id"] for e in result["events"] if e["event"] == "AdapterRegistered"]
    if len(found) != 1:
        raise LineageError(
            f"registerAdapter tx {result['tx_hash']} emitted {len(found)} AdapterRegistered events"
        )
    reg = AdapterRegistration(
        adapter_id=AdapterId(int(str(found[0]))),
        chain_id=adapters.client.chain_id,
        registry=adapters.address,
        tx_hash=result["tx_hash"],
        fee_per_token=fee,
        uri=where,
        datanet_ids=tuple(ids),
        owner=Address(adapters.client.address),
    )
    for d, did in zip(lineage["datanets"], ids, strict=True):
        d["datanet_id"], d["chain_id"] = int(did), reg.chain_id
    lineage["registration"] = reg.to_dict()
    write_lineage(root, lineage)
    return reg


def verify_adapter_against_chain(
    adapter: str | os.PathLike[str] | AdapterHashes,
    adapter_id: int,
    contracts: Contracts,
    base_model_dir: str | os.PathLike[str] | None = None,
    *,
    allow_deprecated: bool = False,
    expected_owner: str | None = None,
) -> AdapterInfo:
    """Check an adapter copy against registration `adapter_id` before serving it (module docstring).

    `adapter`: the adapter directory (its weights are hashed now) or precomputed `AdapterHashes`. The base
    hash comes from `base_model_dir` (cached beside the checkpoint) or else from
    `AdapterHashes.base_model_hash`. Returns the on-chain `AdapterInfo`. Raises AdapterNotRegisteredError
    (unknown id), AdapterLineageError
    naming every field that differs, ConfigError when no base is given. `expected_owner`: the account the
    caller knows owns the adapter (adopting an id found on chain); its lineage.json's registration owner is
    checked in any case.
    """
    lineage: dict[str, Any] | None = None
    if isinstance(adapter, AdapterHashes):
        local_weights = parse_hash(adapter.weights_hash)
        local_base = parse_hash(adapter.base_model_hash) if adapter.base_model_hash else None
    else:
        local_weights = weights_hash(adapter)
        local_base = None
        if (Path(adapter) / "lineage.json").is_file():
            lineage = load_lineage(Path(adapter))
    if base_model_dir is not None:
        local_base = base_model_hash(base_model_dir)
    if local_base is None:
        raise ConfigError(
            "verify_adapter_against_chain needs the base model: pass base_model_dir "
            "(or AdapterHashes.base_model_hash)"
        )
    if not 0 < int(adapter_id) <= contracts.adapters.adapter_count():
        raise AdapterNotRegisteredError(
            f"no adapter {adapter_id} in the AdapterRegistry at {contracts.adapters.address}"
        )
    info = contracts.adapters.get_adapter(int(adapter_id))
    diff: dict[str, tuple[object, object]] = {}
    if info.weights_hash != local_weights:
        diff["weightsHash"] = (info.weights_hash, local_weights)
    if info.base_model_hash != local_base:
        diff["baseModelHash"] = (info.base_model_hash, local_base)
    for did in info.datanet_ids:
        if not contracts.datanets.exists(int(did)):
            diff[f"datanet {did}"] = ("named by the adapter", "not registered")
    if info.deprecated and not allow_deprecated:
        diff["deprecated"] = (True, "serving requested")
    if lineage is not None:
        diff.update(_lineage_differences(info, lineage, contracts))
    if expected_owner is not None and info.owner.lower() != expected_owner.lower():
        diff["owner"] = (info.owner, expected_owner)
    if diff:
        raise AdapterLineageError(int(adapter_id), diff)
    return info


def _lineage_differences(info: AdapterInfo, lineage: dict[str, Any],
                         contracts: Contracts) -> dict[str, tuple[object, object]]:
    """Where registration `info` disagrees with the adapter's lineage.json: training-config hash, the datanets'
    roots, and the owner its registration recorded."""
    diff: dict[str, tuple[object, object]] = {}
    ch = lineage.get("training_config_hash")
    if ch is not None and info.training_config_hash != parse_hash(str(ch)):
        diff["trainingConfigHash"] = (info.training_config_hash, ch)
    local_roots = sorted(str(d["root"]) for d in lineage.get("datanets", []))
    chain_roots = sorted(contracts.datanets.get_datanet(int(d)).contributions_root
                         for d in info.datanet_ids if contracts.datanets.exists(int(d)))
    if local_roots and chain_roots != local_roots:
        diff["datanets"] = (chain_roots, local_roots)
    reg = lineage.get("registration") or {}
    owner = reg.get("owner") or lineage.get("owner")
    if owner and info.owner.lower() != str(owner).lower():
        diff["owner"] = (info.owner, owner)
    return diff
