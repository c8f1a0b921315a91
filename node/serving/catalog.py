"""The adapter catalog: which adapters this node serves, under which key, on what terms.

Adapters by on-chain id N: weights from `adapters.dir/N/` when that directory exists, else from the registered
URI when it is a local path or a `file:` URI; before first use the files are checked against the registry
(`loraledger.node.lineage.registration.verify_adapter_against_chain`: weights hash, base model, datanets).
Contributor weights come from the adapter's `lineage.json` (written by `loraledger train`); without it the data
share goes to the adapter owner. By local alias (`adapters.aliases = { name = "path" }` or LoadAdapter with a
path): served, but no record is kept (a record names on-chain adapters only).

    key       the store key: the decimal on-chain id, or the alias
    ServedAdapter   what the node knows of one adapter beyond its files (registration, fee, lineage, indexes)
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from loraledger.inference.errors import AdapterNotFoundError, EngineError, InvalidRequestError
from loraledger.inference.identity import weights_hash
from loraledger.inference.lora.adapter import read_adapter_config
from loraledger.inference.lora.store import AdapterStore
from loraledger.node.config import NodeConfig
from loraledger.node.errors import ConfigError, PermissionDeniedError
from loraledger.node.ledger.rewards import lineage_tokens
from loraledger.node.ledger.terms import RewardsError
from loraledger.node.serving.token_attribution import TokenAttribution
from loraledger.node.serving.views import AdapterDescription
from loraledger.node.types import AdapterId, Address, DatanetId

log = logging.getLogger(__name__)


@dataclass
class ServedAdapter:
    """What the node knows of one served adapter beyond its files (on-chain registration, lineage)."""

    key: str
    path: Path
    alias: str = ""
    onchain_id: AdapterId | None = None
    weights_hash: str = ""
    base_model_hash: str = ""
    fee_per_token: int = 0
    datanet_ids: tuple[DatanetId, ...] = ()
    owner: str = ""
    lineage: dict[Address, int] = field(default_factory=dict)  # contributor -> tokens trained on
    training_config_hash: str = ""  # as registered (and as its lineage.json hashes to: verified at load)
    index_dirs: tuple[Path, ...] = ()  # attribution indexes of its datanets (token-level attribution)

    @property
    def rank(self) -> int:
        """The adapter's LoRA rank r from its adapter_config.json (0 if unreadable)."""
        try:
            return int(read_adapter_config(self.path)[0].r)
        except EngineError:
            return 0


def local_uri_path(uri: str) -> Path | None:
    """The local path a registered URI names (`file:` URI or a plain path that exists), else None."""
    if uri.startswith("file:"):
        return Path(unquote(urlparse(uri).path))
    if uri and "://" not in uri and Path(uri).exists():
        return Path(uri)
    return None


class StoreCatalog:
    """The node's `AdapterCatalog` over its `AdapterStore` (see module docstring). Thread-safe."""

    def __init__(self, store: AdapterStore, cfg: NodeConfig, contracts: Any | None = None,
                 attribution: TokenAttribution | None = None) -> None:
        self.store = store
        self.adapters_dir = Path(cfg.adapters.dir)
        self.base_model_dir = Path(cfg.model.dir)
        self.deployment = cfg.chain.deployment
        self.contracts = contracts
        self.attribution = attribution
        self.roots = tuple(Path(r) for r in (cfg.adapters.roots or [cfg.adapters.dir]))
        self._lock = threading.Lock()
        self._terms: dict[str, ServedAdapter] = {}
        for alias, path in cfg.adapters.aliases.items():
            store.register(alias, path)  # read (and verified) on first use
            self._terms[alias] = ServedAdapter(key=alias, path=Path(path), alias=alias)

    def terms(self, key: str) -> ServedAdapter:
        with self._lock:
            t = self._terms.get(key)
        if t is None:
            raise AdapterNotFoundError(f"adapter {key!r} is not known to this node")
        return t

    def resolve(self, name: str) -> str:
        with self._lock:
            if name in self._terms:
                return name
            if not name.isdigit():
                raise AdapterNotFoundError(
                    f"unknown adapter {name!r}: not an on-chain id, not an alias in adapters.aliases, not loaded "
                    f"with LoadAdapter (aliases: {sorted(k for k, t in self._terms.items() if t.alias)})"
                )
            terms = self._onchain(int(name), None)
            self.store.register(terms.key, terms.path, terms.weights_hash, terms.base_model_hash)
            self._terms[terms.key] = terms
            return terms.key

    def _onchain(self, adapter_id: int, path: Path | None) -> ServedAdapter:
        """Look adapter `adapter_id` up in the AdapterRegistry, find its files, verify them against it."""
        from loraledger.node.lineage.registration import (
            AdapterNotRegisteredError,
            verify_adapter_against_chain,
        )
        from loraledger.node.lineage.training import load_lineage

        if self.contracts is None:
            raise AdapterNotFoundError(
                f"adapter {adapter_id}: this node has no chain deployment ({self.deployment} not found), so "
                "on-chain ids cannot be resolved; run `loraledger devnet up` or set chain.deployment"
            )
        if not 0 < adapter_id <= self.contracts.adapters.adapter_count():
            raise AdapterNotRegisteredError(f"no adapter {adapter_id} in the AdapterRegistry at "
                                            f"{self.contracts.adapters.address}")
        info = self.contracts.adapters.get_adapter(adapter_id)
        if path is None:
            local = self.adapters_dir / str(adapter_id)
            path = local if local.is_dir() else local_uri_path(info.uri)
            if path is None:
                raise AdapterNotFoundError(
                    f"adapter {adapter_id}: no local copy in {local} and its registered URI {info.uri!r} is not a "
                    f"local path; copy its files to {local}"
                )
        verify_adapter_against_chain(path, adapter_id, self.contracts, self.base_model_dir)
        tokens: dict[Address, int] = {}
        index_dirs: tuple[Path, ...] = ()
        try:
            doc = load_lineage(path)
            tokens = lineage_tokens(doc)
            if self.attribution is not None and tokens:
                index_dirs = self.attribution.index_dirs(adapter_id, doc)
        except (ConfigError, RewardsError) as e:
            log.warning("adapter %d: no usable lineage.json (%s); its data share goes to the adapter owner",
                        adapter_id, e)
        return ServedAdapter(
            key=str(adapter_id), path=Path(path), onchain_id=AdapterId(adapter_id), weights_hash=str(info.weights_hash),
            base_model_hash=str(info.base_model_hash), fee_per_token=int(info.fee_per_token),
            datanet_ids=tuple(DatanetId(int(d)) for d in info.datanet_ids), owner=str(info.owner), lineage=tokens,
            training_config_hash=str(info.training_config_hash), index_dirs=index_dirs,
        )

    def lineage_terms(self, adapter_id: int) -> dict[str, Any] | None:
        """What an epoch's terms record of on-chain adapter `adapter_id`'s lineage, so an auditor can check each
        record's contributor split without the adapter's files: {"trainingConfigHash", "tokenLevel", "weights":
        {contributor: tokens}}. None when the node holds no lineage for it (its data share went to the owner)."""
        with self._lock:
            t = self._terms.get(str(adapter_id))
        if t is None or t.onchain_id is None or not t.lineage:
            return None
        return {"trainingConfigHash": t.training_config_hash, "tokenLevel": bool(t.index_dirs),
                "weights": {a: str(n) for a, n in sorted(t.lineage.items())}}

    def confined(self, path: str) -> Path:
        """`path` (a LoadAdapter request's) when it lies below one of the adapter roots once `..` and symlinks
        are resolved, else PermissionDeniedError: a client never names a folder outside them."""
        real = Path(os.path.realpath(path))
        for root in self.roots:
            if real.is_relative_to(os.path.realpath(root)):
                return real
        raise PermissionDeniedError(
            f"LoadAdapter path {path!r} resolves to {real}, outside the adapter roots "
            f"{[str(r) for r in self.roots]}; copy the adapter below one of them (adapters.roots)")

    def load(self, name: str, path: str, expected_weights_hash: str) -> AdapterDescription:
        source_path = self.confined(path) if path else None
        with self._lock:
            if name.isdigit():
                terms = self._onchain(int(name), source_path)
            else:
                known = self._terms.get(name)
                source = source_path if source_path is not None else (known.path if known is not None else None)
                if source is None:
                    raise InvalidRequestError(f"LoadAdapter {name!r}: give `path`, the adapter directory to load")
                terms = ServedAdapter(key=name, path=source, alias=name,
                                     weights_hash=expected_weights_hash.lower())
            self.store.load(terms.key, terms.path, terms.weights_hash or None, terms.base_model_hash or None)
            if not terms.weights_hash:  # loaded fine: name the weights it holds
                terms.weights_hash = str(weights_hash(terms.path))
            self._terms[terms.key] = terms
            return self._describe(terms)

    def unload(self, name: str) -> bool:
        with self._lock:
            if name not in self._terms:
                return False
            self.store.unload(name)
            del self._terms[name]
            return True

    def list(self) -> list[AdapterDescription]:
        with self._lock:
            return [self._describe(t) for t in sorted(self._terms.values(), key=lambda t: t.key)]

    def _describe(self, t: ServedAdapter) -> AdapterDescription:
        info = {i.key: i for i in self.store.adapters()}.get(t.key)
        return AdapterDescription(
            key=t.key, alias=t.alias, onchain_id=t.onchain_id,
            weights_hash=t.weights_hash or (info.weights_hash if info and info.weights_hash else ""),
            base_model_hash=t.base_model_hash, rank=t.rank, resident=bool(info and info.tier == "gpu"),
            datanet_ids=t.datanet_ids, fee_per_token=t.fee_per_token, owner=t.owner,
        )
