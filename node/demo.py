"""The end-to-end demo behind `make run`, one function per stage, so later stages (train, serve, settle, claim)
slot in without touching the earlier ones.

    stage_devnet        devnet up + deploy (reused when running)           -> ctx.devnet, ctx.deployment
    stage_contributors  anvil accounts 2..4 register as contributors       -> ctx.contributors
    stage_datanet       3 contribution files -> leaves (contributor, sha256(file), weight) -> Merkle root
                        -> DatanetRegistry.registerDatanet                  -> ctx.datanet_id
    stage_adapter       an adapter naming that datanet -> AdapterRegistry  -> ctx.adapter_id

Every stage is idempotent: re-running the demo on a running devnet finds what it registered before (by
contributor account, by datanet root and by adapter weights hash) instead of registering it again.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from web3 import Web3

from node import devnet_setup
from node.chain import ChainClient
from node.contracts_client import Contracts
from node.deploy import Deployment
from node.devnet_setup import DevnetStatus
from node.errors import NodeError
from node.keys import DEV_CONTRIBUTORS, DEV_OPERATOR, dev_account
from node.merkle import CONTRIBUTION_LEAF_ENCODING, StandardMerkleTree
from node.types import AdapterId, Address, Bytes32, DatanetId, Wei

DEMO_TEXTS: tuple[str, ...] = (
    '{"text": "LoRA adapters add a low-rank update B @ A to a frozen weight matrix."}\n',
    '{"prompt": "What does a Merkle proof show?", "completion": "That a leaf is under a given root."}\n',
    '{"text": "Paged KV caches split each sequence into fixed-size blocks."}\n',
)
DEMO_FEE_PER_TOKEN = Wei(10**12)  # reward-token units per prompt+completion token
DEMO_TRAINING_CONFIG = {"base": "tiny-llama", "rank": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"],
                        "epochs": 1, "lr": 2e-4}

Progress = Callable[[str], None]


def sha256_bytes32(data: bytes) -> Bytes32:
    return Bytes32("0x" + hashlib.sha256(data).hexdigest())


def canonical_json(obj: object) -> bytes:
    """Sorted keys, no spaces: the canonical JSON every config hash is taken over."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


@dataclass
class DemoContext:
    """What the stages hand each other."""

    state_dir: Path
    port: int | None = None
    devnet: DevnetStatus | None = None
    deployment: Deployment | None = None
    w3: Web3 | None = None
    contributors: list[Address] = field(default_factory=list)
    leaves: list[tuple[Address, Bytes32, int]] = field(default_factory=list)
    datanet_id: DatanetId | None = None
    datanet_root: Bytes32 | None = None
    datanet_uri: str = ""
    adapter_id: AdapterId | None = None
    adapter_weights_hash: Bytes32 | None = None
    notes: list[str] = field(default_factory=list)

    def contracts_as(self, dev_index: int) -> Contracts:
        """The deployment's contracts bound to anvil dev account `dev_index`."""
        if self.w3 is None or self.deployment is None:
            raise NodeError("the devnet stage has not run")
        return Contracts.at(ChainClient(self.w3, dev_account(dev_index)), self.deployment.addresses)

    @property
    def work_dir(self) -> Path:
        return self.state_dir / "demo"


def stage_devnet(ctx: DemoContext) -> str:
    st, reused = devnet_setup.up(ctx.state_dir / "devnet", port=ctx.port)
    assert st.deployment is not None and st.rpc_url is not None
    ctx.devnet, ctx.deployment = st, st.deployment
    ctx.w3 = devnet_setup.web3_for(st.rpc_url)
    return f"{'reused' if reused else 'started'} anvil at {st.rpc_url}; contracts " \
           f"{'reused' if reused else 'deployed'} from block {st.deployment.block_number}"


def stage_contributors(ctx: DemoContext) -> str:
    registered = 0
    for i in DEV_CONTRIBUTORS:
        c = ctx.contracts_as(i)
        address = Address(c.contributors.client.address)
        if not c.contributors.is_registered(address):
            c.contributors.register(f"demo://contributor/{i}")
            registered += 1
        ctx.contributors.append(address)
    return f"{len(ctx.contributors)} contributors ({registered} newly registered)"


def stage_datanet(ctx: DemoContext) -> str:
    """Write one contribution file per contributor, hash it, build the Merkle root, register (or find) it."""
    files_dir = ctx.work_dir / "contributions"
    files_dir.mkdir(parents=True, exist_ok=True)
    ctx.leaves = []
    for address, text in zip(ctx.contributors, DEMO_TEXTS):
        path = files_dir / f"{address}.jsonl"
        path.write_text(text)
        data = path.read_bytes()
        ctx.leaves.append((address, sha256_bytes32(data), len(data)))  # weight: bytes, a stand-in for tokens
    tree = StandardMerkleTree.of([list(leaf) for leaf in ctx.leaves], CONTRIBUTION_LEAF_ENCODING)
    ctx.datanet_root = Bytes32(tree.root_hex)
    manifest = ctx.work_dir / "datanet.json"
    manifest.write_text(json.dumps({
        "root": ctx.datanet_root, "leafEncoding": list(CONTRIBUTION_LEAF_ENCODING),
        "leaves": [{"contributor": a, "contributionHash": h, "weight": w} for a, h, w in ctx.leaves],
    }, indent=2) + "\n")
    ctx.datanet_uri = manifest.resolve().as_uri()
    curator = ctx.contracts_as(DEV_OPERATOR)
    for existing in range(1, curator.datanets.datanet_count() + 1):
        info = curator.datanets.get_datanet(existing)
        if info.contributions_root == ctx.datanet_root and info.curator == curator.datanets.client.address:
            ctx.datanet_id = DatanetId(existing)
            return f"datanet #{existing} already registered (root {ctx.datanet_root})"
    ctx.datanet_id = curator.datanets.register_datanet(ctx.datanet_root, len(ctx.leaves), ctx.datanet_uri)
    return f"registered datanet #{ctx.datanet_id} over {len(ctx.leaves)} contributions"


def stage_adapter(ctx: DemoContext) -> str:
    """Register a placeholder adapter (weights not trained yet) naming the demo datanet, or find it."""
    assert ctx.datanet_id is not None
    owner = ctx.contracts_as(DEV_OPERATOR)
    config = {**DEMO_TRAINING_CONFIG, "datanets": [int(ctx.datanet_id)]}
    ctx.adapter_weights_hash = sha256_bytes32(b"loraledger demo adapter weights v1|" + canonical_json(config))
    existing = owner.adapters.adapter_id_by_weights_hash(ctx.adapter_weights_hash)
    if existing:
        ctx.adapter_id = existing
        return f"adapter #{existing} already registered"
    ctx.adapter_id = owner.adapters.register_adapter(
        ctx.adapter_weights_hash,
        sha256_bytes32(b"loraledger demo base model v1"),
        sha256_bytes32(canonical_json(config)),
        [ctx.datanet_id],
        DEMO_FEE_PER_TOKEN,
        (ctx.work_dir / "adapter").resolve().as_uri(),
    )
    return f"registered adapter #{ctx.adapter_id} trained on datanet #{ctx.datanet_id}"


STAGES: tuple[tuple[str, Callable[[DemoContext], str]], ...] = (
    ("devnet", stage_devnet),
    ("contributors", stage_contributors),
    ("datanet", stage_datanet),
    ("adapter", stage_adapter),
)


def report(ctx: DemoContext) -> str:
    """The readable table of what is deployed and registered."""
    assert ctx.devnet is not None and ctx.deployment is not None
    d = ctx.deployment
    rows: list[tuple[str, str]] = [("rpc url", str(ctx.devnet.rpc_url)), ("chain id", str(d.chain_id))]
    rows += [(name, addr) for name, addr in sorted(d.addresses.items())]
    rows += [("deployer (account 0)", d.deployer), ("operator (account 1)", str(d.operator))]
    for i, (a, h, w) in zip(DEV_CONTRIBUTORS, ctx.leaves):
        rows.append((f"contributor (account {i})", f"{a}  weight {w}  contribution {h[:18]}..."))
    rows.append((f"datanet #{ctx.datanet_id}", f"root {ctx.datanet_root}"))
    adapter = f"weights {ctx.adapter_weights_hash}  fee/token {DEMO_FEE_PER_TOKEN}  datanets [{ctx.datanet_id}]"
    rows.append((f"adapter #{ctx.adapter_id}", adapter))
    width = max(len(k) for k, _ in rows)
    lines = ["", f"{'what':<{width}}  value", f"{'-' * width}  {'-' * 42}"]
    lines += [f"{k:<{width}}  {v}" for k, v in rows]
    lines += ["", f"deployment record: {ctx.devnet.state_dir / devnet_setup.DEPLOYMENT_FILE}",
              f"stop the devnet:   loraledger devnet down --state-dir {ctx.devnet.state_dir}"]
    return "\n".join(lines)


def run_demo(state_dir: str | os.PathLike[str], *, port: int | None = None,
             progress: Progress = print) -> DemoContext:
    """Run every stage in order, one progress line each; returns the filled context."""
    ctx = DemoContext(state_dir=Path(state_dir), port=port)
    for n, (name, stage) in enumerate(STAGES, 1):
        progress(f"[{n}/{len(STAGES)}] {name} ...")
        progress(f"[{n}/{len(STAGES)}] {name}: {stage(ctx)}")
    return ctx
