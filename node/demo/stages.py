"""The whole path on embedded defaults, behind `make run` (`loraledger demo`): one function per stage.

    devnet        anvil up + contracts deployed (reused while it runs)                        STATE/devnet/
    model         init_tiny: a small random Llama + byte-level BPE tokenizer                  STATE/model/
    contributors  anvil accounts 2..4 register; each signs its sample file                    STATE/contributions/
    datanet       build (weights in tokens of the tiny tokenizer), suffix-array index, register  STATE/datanet/
    train         two LoRA adapters and one QLoRA adapter on the datanet                      STATE/adapters/<name>/
    register      AdapterRegistry.registerAdapter (fee per token) from account 5, the adapter owner
    reproduce     `loraledger adapter reproduce` of the smallest adapter: retrained from its registered data and
                  config, weights hash and tokens compared with the chain and its lineage; prints the verdict
    node          `loraledger node run --config STATE/node.toml`, detached; waits for health SERVING
    requests      one streamed gRPC request per adapter, one merging all three
    settle        the pending records -> one epoch on the AttributionLedger (loraledger.node.ledger.settler.Settler)
    claim         every account in the epoch's rewards tree claims from its own key
    summary       who earned what, read back from the record log and the chain

Accounts (anvil's dev keys, loraledger.node.chain.keys): 0 deploys and administers, 1 is the node operator (pays the epochs,
earns the operator share), 2..4 are the data contributors (alice, bob, carol), 5 curates the datanet and owns
the adapters (earns the adapter-owner share).

Idempotence: every stage first looks for what it would make and reuses it when it is still valid (running
anvil with a live deployment, model dir, contribution files with valid signatures, a manifest over the same
files registered on this chain, adapters trained on that root with the planned config and registered on this
chain, a running node with the same config). A registration that no longer holds on chain (the devnet was
restarted) is forgotten and made again; a record log whose epochs the chain does not hold is moved aside.
Each run sends new requests, settles a new epoch and claims again, so the amounts grow from run to run.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from web3 import Web3

from loraledger.node.chain import devnet_setup
from loraledger.node.chain.bindings import Contracts
from loraledger.node.chain.client import ChainClient
from loraledger.node.chain.deploy import Deployment
from loraledger.node.chain.devnet_setup import DevnetStatus
from loraledger.node.chain.keys import ANVIL_DEV_KEYS, DEV_CONTRIBUTORS, DEV_OPERATOR, dev_account
from loraledger.node.demo.data_files import sample_records
from loraledger.node.demo.processes import (
    NODE_CONFIG,
    NODE_LOG,
    OPERATOR_KEY_ENV,
    DemoError,
    configured_port,
    health_serving,
    running_node_pid,
    start_node,
    stop_node,
)
from loraledger.node.types import AdapterId, Address, DatanetId

# ---------------------------------------------------------------------------------------------------- plan

DEV_ADAPTER_OWNER = 5  # curates the demo datanet, trains and owns the adapters
CONTRIBUTOR_NAMES: dict[int, str] = {2: "alice", 3: "bob", 4: "carol"}  # dev account -> sample file stem
DATANET_NAME = "python-docs-demo"
RECORDS_DB = "records.sqlite"
TOKEN = 10**18  # reward-token base units per token (18 decimals)


@dataclass(frozen=True)
class DemoSizes:
    """How much work the demo does: `--small` (CI) or the default."""

    records_per_contributor: int  # first N records of each sample file
    max_seq_len: int
    batch_size: int
    prompts_per_adapter: int
    max_tokens: int


FULL = DemoSizes(records_per_contributor=200, max_seq_len=128, batch_size=8, prompts_per_adapter=2, max_tokens=32)
SMALL = DemoSizes(records_per_contributor=24, max_seq_len=64, batch_size=8, prompts_per_adapter=1, max_tokens=12)


@dataclass(frozen=True)
class AdapterPlan:
    """One adapter the demo trains: `train_adapter` arguments and the fee it is registered with."""

    name: str
    method: str  # "lora" or "qlora"
    rank: int
    alpha: float
    targets: str
    seed: int
    lr: float
    fee_per_token: int  # reward-token base units per prompt + completion token


PLANS: tuple[AdapterPlan, ...] = (
    AdapterPlan("lora-attn", "lora", 8, 16.0, "q,v", seed=1, lr=1e-2, fee_per_token=TOKEN // 1000),
    AdapterPlan("lora-mlp", "lora", 4, 8.0, "gate,up,down", seed=2, lr=1e-2, fee_per_token=2 * TOKEN // 1000),
    AdapterPlan("qlora-attn", "qlora", 4, 8.0, "q,k,v,o", seed=3, lr=1e-2, fee_per_token=3 * TOKEN // 1000),
)
MERGE_WEIGHTS: tuple[float, ...] = (0.5, 0.3, 0.2)  # the merged request: all three adapters, these weights
PROMPTS: tuple[str, ...] = (
    "A list comprehension is",
    "The logging module",
    "Exceptions in Python",
    "Unicode strings",
    "A dictionary maps",
    "The interpreter",
)

Out = Callable[[str], None]


# ------------------------------------------------------------------------------------------------ context


@dataclass
class TrainedAdapter:
    """An adapter the train stage produced or reused, and its on-chain id once registered."""

    plan: AdapterPlan
    path: Path
    weights_hash: str
    adapter_id: AdapterId | None = None


@dataclass
class RequestOutcome:
    """One demo request through the node: what it asked, what came back, what its record charged."""

    label: str
    adapters: tuple[tuple[int, float], ...]
    text: str
    request_id: str
    prompt_tokens: int
    completion_tokens: int
    fee: int
    record_hash: str


@dataclass
class EarningsRow:
    """One line of the summary: `earned` is the cumulative amount in the latest confirmed rewards root (what
    `loraledger rewards show` calls owed), `claimed` and `balance` are read from the chain."""

    role: str
    account: Address
    earned: int
    claimed: int
    balance: int


@dataclass
class DemoContext:
    """What the stages hand each other."""

    state_dir: Path
    sizes: DemoSizes = FULL
    plans: tuple[AdapterPlan, ...] = PLANS  # the adapters to train (the real-model demo: node/demo/smollm2.py)
    merge_weights: tuple[float, ...] = MERGE_WEIGHTS  # of the merged request, one per adapter
    port: int | None = None  # devnet port when it has to start
    node_port: int | None = None  # gRPC port when the node has to start (default: the last one, else a free one)
    write: Callable[[str], None] = print  # raw text to the terminal (streamed tokens); set by run_demo
    devnet: DevnetStatus | None = None
    deployment: Deployment | None = None
    w3: Web3 | None = None
    chain_reused: bool = False
    changed: bool = False  # something the node reads was made anew: a running node must restart
    contributors: dict[int, Address] = field(default_factory=dict)
    datanet_root: str = ""
    datanet_id: DatanetId | None = None
    adapters: list[TrainedAdapter] = field(default_factory=list)
    node_address: str = ""
    http_address: str = ""
    node_pid: int | None = None
    requests: list[RequestOutcome] = field(default_factory=list)
    epoch: int | None = None
    epoch_line: str = ""
    earnings: list[EarningsRow] = field(default_factory=list)
    _contracts: dict[int, Contracts] = field(default_factory=dict)

    # paths
    @property
    def state(self) -> Path:
        return self.state_dir.resolve()

    @property
    def devnet_dir(self) -> Path:
        return self.state / "devnet"

    @property
    def model_dir(self) -> Path:
        return self.state / "model"

    @property
    def contributions_dir(self) -> Path:
        return self.state / "contributions"

    @property
    def datanet_dir(self) -> Path:
        return self.state / "datanet"

    @property
    def adapters_dir(self) -> Path:
        return self.state / "adapters"

    @property
    def records_path(self) -> Path:
        return self.state / RECORDS_DB

    @property
    def node_config(self) -> Path:
        return self.state / NODE_CONFIG

    def contracts_as(self, dev_index: int) -> Contracts:
        """The deployment's contracts bound to anvil dev account `dev_index` (one client per account)."""
        if self.w3 is None or self.deployment is None:
            raise DemoError("the devnet stage has not run")
        if dev_index not in self._contracts:
            client = ChainClient(self.w3, dev_account(dev_index))
            self._contracts[dev_index] = Contracts.at(client, self.deployment.addresses)
        return self._contracts[dev_index]

    @property
    def operator(self) -> Address:
        return Address(dev_account(DEV_OPERATOR).address)


# ------------------------------------------------------------------------------------------- chain + data


def stage_devnet(ctx: DemoContext) -> str:
    """anvil running + contracts deployed (loraledger.node.chain.devnet_setup.up; reused when live)."""
    st, reused = devnet_setup.up(ctx.devnet_dir, port=ctx.port)
    assert st.deployment is not None and st.rpc_url is not None
    ctx.devnet, ctx.deployment, ctx.chain_reused = st, st.deployment, reused
    ctx.w3 = devnet_setup.web3_for(st.rpc_url)
    ctx.changed |= not reused
    return (f"{'reused' if reused else 'started'} anvil at {st.rpc_url}; contracts "
            f"{'reused' if reused else 'deployed'} from block {st.deployment.block_number}")


def stage_model(ctx: DemoContext) -> str:
    """The tiny random Llama + tokenizer in STATE/model (loraledger.inference.tiny.init_tiny), unless already there."""
    from loraledger.inference.tiny import init_tiny

    d = ctx.model_dir
    if (d / "config.json").is_file() and (d / "model.safetensors").is_file() and (d / "tokenizer.json").is_file():
        return f"reused tiny model in {d}"
    init_tiny(d, overwrite=True)
    ctx.changed = True
    return f"wrote a tiny random Llama (2 layers, hidden 64, vocab 512) and its tokenizer to {d}"


def _signature_valid(path: Path, account: Address) -> bool:
    """True when `path.sig.json` exists and is `account`'s signature over the file's current bytes."""
    from loraledger.node.lineage.contributions import (
        ContributionError,
        read_signature,
        recover_signer,
        sha256_hex,
        signature_path,
    )

    sig_path = signature_path(path)
    if not sig_path.is_file():
        return False
    try:
        sig = read_signature(sig_path)
        digest = sha256_hex(path.read_bytes())
        return sig.sha256 == digest and recover_signer(digest, sig.signature) == account == sig.contributor
    except ContributionError:
        return False


def stage_contributors(ctx: DemoContext) -> str:
    """Accounts 2..4 register (if not yet) and sign their sample file copied to STATE/contributions/."""
    from loraledger.node.lineage.contributions import sign_contribution

    ctx.contributions_dir.mkdir(parents=True, exist_ok=True)
    registered = signed = 0
    for i in DEV_CONTRIBUTORS:
        c = ctx.contracts_as(i)
        address = Address(c.contributors.client.address)
        if not c.contributors.is_registered(address):
            c.contributors.register(f"demo://contributor/{CONTRIBUTOR_NAMES[i]}")
            registered += 1
        ctx.contributors[i] = address
        path = ctx.contributions_dir / f"{CONTRIBUTOR_NAMES[i]}.jsonl"
        data = sample_records(CONTRIBUTOR_NAMES[i], ctx.sizes.records_per_contributor)
        if not path.is_file() or path.read_bytes() != data:
            path.write_bytes(data)
        if not _signature_valid(path, address):
            sign_contribution(path, dev_account(i), overwrite=True)
            signed += 1
    return (f"{len(ctx.contributors)} contributors ({registered} newly registered), "
            f"{ctx.sizes.records_per_contributor} records each ({signed} files newly signed)")


def _manifest_matches_files(ctx: DemoContext) -> bool:
    """True when STATE/datanet holds a manifest over exactly the current signed files, weighed with the tiny
    model's tokenizer, with its suffix-array index beside it."""
    from loraledger.node.attribution import INDEX_DIRNAME
    from loraledger.node.lineage.contributions import sha256_hex
    from loraledger.node.lineage.datanet import DatanetError, TokenCounter, load_manifest

    try:
        m = load_manifest(ctx.datanet_dir)
    except DatanetError:
        return False
    files = {p.name: sha256_hex(p.read_bytes()) for p in ctx.contributions_dir.glob("*.jsonl")}
    return ({e.file: e.contribution_hash for e in m.entries} == files and not m.rejected
            and m.tokenizer_sha256 == TokenCounter(ctx.model_dir).sha256
            and (ctx.datanet_dir / INDEX_DIRNAME).is_dir())


def forget_datanet_registration(manifest_dir: Path) -> None:
    """Drop a registration the chain no longer holds (devnet restarted) so that `register_datanet` runs again."""
    from loraledger.node.lineage.datanet import load_manifest, write_manifest

    m = load_manifest(manifest_dir)
    m.registration = None
    write_manifest(manifest_dir, m)


def stage_datanet(ctx: DemoContext) -> str:
    """Build (tokens of the tiny tokenizer), index and register the datanet of the three files, or reuse it."""
    from loraledger.node.attribution import LocalTokenizer, index_manifest
    from loraledger.node.lineage.datanet import (
        DatanetMismatchError,
        build_datanet,
        load_manifest,
        register_datanet,
        verify_manifest,
    )

    notes: list[str] = []
    if _manifest_matches_files(ctx):
        notes.append("reused manifest and index")
    else:
        reader = ctx.contracts_as(DEV_ADAPTER_OWNER)
        m = build_datanet(DATANET_NAME, ctx.contributions_dir, ctx.datanet_dir, tokenizer_dir=ctx.model_dir,
                          registry=reader.contributors, overwrite=True)
        if m.rejected:
            raise DemoError(f"datanet build rejected {[(r.file, r.reason) for r in m.rejected]}")
        index_manifest(ctx.datanet_dir, LocalTokenizer.load(ctx.model_dir))
        ctx.changed = True
        notes.append(f"built over {m.contribution_count} files, {m.total_weight} tokens; indexed")
    curator = ctx.contracts_as(DEV_ADAPTER_OWNER)
    m = load_manifest(ctx.datanet_dir)
    if m.registration is not None:
        try:
            verify_manifest(ctx.datanet_dir, curator)
            notes.append(f"datanet #{m.registration.datanet_id} already registered")
        except DatanetMismatchError as e:
            notes.append(f"stale registration forgotten ({e})")
            forget_datanet_registration(ctx.datanet_dir)
            m = load_manifest(ctx.datanet_dir)
    if m.registration is None:
        reg = register_datanet(ctx.datanet_dir, curator)
        ctx.changed = True
        notes.append(f"registered as datanet #{reg.datanet_id}")
        m = load_manifest(ctx.datanet_dir)
    assert m.registration is not None
    ctx.datanet_root, ctx.datanet_id = m.root, m.registration.datanet_id
    return f"{'; '.join(notes)} (root {m.root[:18]}...)"


# --------------------------------------------------------------------------------------------- adapters


def _trained_as_planned(ctx: DemoContext, plan: AdapterPlan, path: Path) -> str | None:
    """The weights hash of the adapter at `path` when it was trained as `plan` on the current datanet and
    model and its files are intact; None otherwise."""
    from loraledger.inference.errors import EngineError
    from loraledger.inference.identity import base_model_hash, weights_hash
    from loraledger.node.errors import ConfigError
    from loraledger.node.lineage.training import TRAINING_FORMAT, load_lineage, parse_targets

    try:
        lin = load_lineage(path)
        actual = weights_hash(path)
    except (ConfigError, EngineError, OSError):
        return None
    cfg = lin.get("training_config", {})
    wanted = {"format": TRAINING_FORMAT, "method": plan.method, "rank": plan.rank, "alpha": plan.alpha, "targets": parse_targets(plan.targets),
              "epochs": 1, "lr": plan.lr, "seed": plan.seed, "max_seq_len": ctx.sizes.max_seq_len,
              "batch_size": ctx.sizes.batch_size, "base_model_hash": str(base_model_hash(ctx.model_dir))}
    if any(cfg.get(k) != v for k, v in wanted.items()):
        return None
    if [d.get("root") for d in cfg.get("datanets", [])] != [ctx.datanet_root]:
        return None
    return str(actual) if actual == lin.get("weights_hash") else None


def stage_train(ctx: DemoContext) -> str:
    """Train the planned adapters on the datanet (1 epoch each), reusing those already trained as planned."""
    from loraledger.node.lineage.training import train_adapter

    ctx.adapters = []
    notes: list[str] = []
    for plan in ctx.plans:
        path = ctx.adapters_dir / plan.name
        wh = _trained_as_planned(ctx, plan, path)
        if wh is not None:
            notes.append(f"{plan.name} reused")
        else:
            t0 = time.perf_counter()
            r = train_adapter(ctx.model_dir, [ctx.datanet_dir], plan.method, plan.rank, plan.alpha, plan.targets,
                              1, plan.lr, plan.seed, path, ctx.sizes.max_seq_len, ctx.sizes.batch_size,
                              overwrite=True, progress=False)
            wh = r.weights_hash
            ctx.changed = True
            notes.append(f"{plan.name} ({plan.method} r={plan.rank} on {plan.targets}: {len(r.losses)} steps, "
                         f"loss {r.losses[0]:.2f} -> {r.losses[-1]:.2f}, {time.perf_counter() - t0:.1f}s)")
        ctx.adapters.append(TrainedAdapter(plan, path, wh))
    return "; ".join(notes)


def forget_adapter_registration(adapter_dir: Path) -> None:
    """Drop a registration (and the datanet ids it resolved) that the chain no longer holds."""
    from loraledger.node.lineage.training import load_lineage, write_lineage

    lin = load_lineage(adapter_dir)
    lin["registration"] = None
    for d in lin.get("datanets", []):
        d["datanet_id"], d["chain_id"] = None, None
    write_lineage(adapter_dir, lin)


def _adopt_adapter_registration(ctx: DemoContext, a: TrainedAdapter, adapter_id: int) -> None:
    """Record in lineage.json an on-chain registration of these very weights whose record was lost locally
    (e.g. a run cut off between the transaction and writing the file); `tx_hash` stays unknown (null)."""
    from loraledger.node.lineage.registration import verify_adapter_against_chain
    from loraledger.node.lineage.training import load_lineage, write_lineage

    owner = ctx.contracts_as(DEV_ADAPTER_OWNER)
    # adopt only our own registration: owner, training config and datanets must be the ones lineage.json names
    info = verify_adapter_against_chain(a.path, adapter_id, owner, ctx.model_dir,
                                        expected_owner=owner.adapters.client.address)
    lin = load_lineage(a.path)
    lin["registration"] = {
        "adapter_id": adapter_id, "owner": info.owner, "chain_id": owner.adapters.client.chain_id,
        "registry": owner.adapters.address,
        "tx_hash": None, "fee_per_token": int(info.fee_per_token), "uri": info.uri,
        "datanet_ids": [int(d) for d in info.datanet_ids],
    }
    for d, did in zip(lin["datanets"], info.datanet_ids, strict=True):
        d["datanet_id"], d["chain_id"] = int(did), owner.adapters.client.chain_id
    write_lineage(a.path, lin)


def stage_register(ctx: DemoContext) -> str:
    """Register each adapter (owner: account 5, fee per token from its plan), or find its registration."""
    from loraledger.node.lineage.registration import register_adapter
    from loraledger.node.lineage.training import load_lineage

    owner = ctx.contracts_as(DEV_ADAPTER_OWNER)
    notes: list[str] = []
    for a in ctx.adapters:
        reg = load_lineage(a.path).get("registration")
        onchain = int(owner.adapters.adapter_id_by_weights_hash(a.weights_hash))
        if reg and onchain == int(reg["adapter_id"]) and reg.get("registry") == owner.adapters.address:
            a.adapter_id = AdapterId(onchain)
            notes.append(f"{a.plan.name} = #{onchain} (reused)")
            continue
        if reg:
            forget_adapter_registration(a.path)
        if onchain:
            _adopt_adapter_registration(ctx, a, onchain)
            a.adapter_id = AdapterId(onchain)
            notes.append(f"{a.plan.name} = #{onchain} (found on chain)")
        else:
            a.adapter_id = register_adapter(a.path, owner, fee_per_token=a.plan.fee_per_token).adapter_id
            notes.append(f"{a.plan.name} = #{a.adapter_id} (registered)")
        ctx.changed = True
    return "; ".join(notes)


def stage_reproduce(ctx: DemoContext) -> str:
    """Reproduce the adapter with the smallest weights file from the chain's registration (verdict printed);
    DemoError when it differs (on the machine that trained it, it must reproduce)."""
    from loraledger.inference.identity import ADAPTER_WEIGHTS_FILE
    from loraledger.node.lineage.reproduce import DIFFERS, reproduce_adapter

    a = min(ctx.adapters, key=lambda x: (x.path / ADAPTER_WEIGHTS_FILE).stat().st_size)
    assert a.adapter_id is not None
    r = reproduce_adapter(a.adapter_id, ctx.contracts_as(DEV_ADAPTER_OWNER), base_dir=ctx.model_dir,
                          manifest_dirs=[ctx.datanet_dir], work_dir=ctx.state)
    if r.verdict == DIFFERS:
        raise DemoError(f"{a.plan.name}: {r.describe()}")
    return f"{a.plan.name} " + r.describe().replace("\n", ";")


# ------------------------------------------------------------------------------------------------- node


def node_config_text(ctx: DemoContext, port: int, http_port: int) -> str:
    """The node.toml the demo's node runs with (absolute paths; settlement by the demo, not the node)."""
    def q(v: str) -> str:
        return json.dumps(v)

    return "\n".join([
        "# Written by `loraledger demo`: the demo's node (see node/config.py for every key).",
        "[server]", f"listen = {q(f'127.0.0.1:{port}')}", "grace_seconds = 5.0", "",
        "[http]", f"listen = {q(f'127.0.0.1:{http_port}')}", "",
        "[model]", f"dir = {q(str(ctx.model_dir))}", 'device = "cpu"',
        f"default_max_tokens = {ctx.sizes.max_tokens}", "",
        "[adapters]", f"dir = {q(str(ctx.adapters_dir))}", "",
        "[chain]", f"deployment = {q(str(ctx.devnet_dir / devnet_setup.DEPLOYMENT_FILE))}",
        f"key_env = {q(OPERATOR_KEY_ENV)}", "",
        "[records]", f"path = {q(str(ctx.records_path))}", "",
        "# The demo settles epochs itself (`loraledger epoch settle --config` this file); set enabled = true",
        "# to let the node settle every epoch_seconds.",
        "[settlement]", "enabled = false", "",
    ])


def records_match_chain(ctx: DemoContext) -> bool:
    """True when the record log's confirmed epochs are on the ledger (no log yet counts as a match): the ledger
    holds at least the log's last confirmed epoch, with the same rewards root."""
    from loraledger.node.ledger.record_log import RecordLog

    if not ctx.records_path.exists():
        return True
    ledger = ctx.contracts_as(DEV_OPERATOR).ledger
    with RecordLog.open(ctx.records_path) as log_:
        last = log_.last_confirmed()
    if last is None:
        return True
    if ledger.last_epoch(ctx.operator) < last.epoch:
        return False
    return ledger.epoch(ctx.operator, last.epoch).rewards_root == last.rewards_root


def set_records_aside(path: Path) -> Path:
    """Rename a record log (with its -wal / -shm files) to `<name>.stale-<unix time>`; returns the new path."""
    stamp = int(time.time())
    target = path.with_name(f"{path.name}.stale-{stamp}")
    for suffix in ("", "-wal", "-shm"):
        p = Path(str(path) + suffix)
        if p.exists():
            p.rename(Path(str(target) + suffix))
    return target


def stage_node(ctx: DemoContext) -> str:
    """Write STATE/node.toml; reuse the running node when nothing it reads changed, else (re)start it."""
    from loraledger.node.chain.devnet import free_port

    port = ctx.node_port or configured_port(ctx.node_config) or free_port()
    http_port = configured_port(ctx.node_config, "http") or free_port()
    ctx.http_address = f"127.0.0.1:{http_port}"
    text = node_config_text(ctx, port, http_port)
    same_config = ctx.node_config.is_file() and ctx.node_config.read_text() == text
    address = f"127.0.0.1:{port}"
    pid = running_node_pid(ctx.state)
    fresh_log = not records_match_chain(ctx)
    if pid is not None and same_config and not ctx.changed and not fresh_log and health_serving(address):
        ctx.node_address, ctx.node_pid = address, pid
        return f"reused node pid {pid} serving on {address}"
    notes = []
    if pid is not None:
        stop_node(ctx.state)
        notes.append(f"stopped node pid {pid}")
    if fresh_log:
        notes.append(f"record log from an earlier chain moved to {set_records_aside(ctx.records_path).name}")
    ctx.node_config.write_text(text)
    ctx.node_pid = start_node(ctx.state, address)
    ctx.node_address = address
    notes.append(f"started node pid {ctx.node_pid} serving on {address} (log {ctx.state / NODE_LOG})")
    return "; ".join(notes)


# ------------------------------------------------------------------------------------------- requests


def _request_plan(ctx: DemoContext) -> list[tuple[str, tuple[tuple[int, float], ...], str]]:
    """(label, ((adapter id, weight), ...), prompt): `prompts_per_adapter` per adapter, then one merged
    when there are two adapters or more."""
    plan: list[tuple[str, tuple[tuple[int, float], ...], str]] = []
    k = 0
    for a in ctx.adapters:
        assert a.adapter_id is not None
        for _ in range(ctx.sizes.prompts_per_adapter):
            plan.append((f"adapter #{a.adapter_id} {a.plan.name}", ((int(a.adapter_id), 1.0),),
                         PROMPTS[k % len(PROMPTS)]))
            k += 1
    merged = tuple((int(a.adapter_id), w) for a, w in zip(ctx.adapters, ctx.merge_weights, strict=True)
                   if a.adapter_id is not None)
    if len(merged) > 1:  # with one adapter (the real-model demo) a merge would repeat its own request
        plan.append(("merged " + " + ".join(f"#{i}x{w:g}" for i, w in merged), merged, PROMPTS[k % len(PROMPTS)]))
    return plan


def stream_request(address: str, prompt: str, adapters: Sequence[tuple[int, float]], max_tokens: int,
                   write: Callable[[str], None], seed: int, timeout: float = 120.0) -> Any:
    """GenerateStream one request (temperature 0.8, top-p 0.95, fixed `seed`: the same text every run), writing
    each text delta as it arrives; returns the final GenerateResponse (usage and attribution summary)."""
    import grpc

    from loraledger.proto.loraledger.v1 import loraledger_pb2 as pb
    from loraledger.proto.loraledger.v1 import loraledger_pb2_grpc as pb_grpc

    request = pb.GenerateRequest(
        prompt=prompt, adapters=[pb.AdapterRef(adapter=str(i), weight=w) for i, w in adapters],
        sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0.8, top_p=0.95, seed=seed))
    final = None
    with grpc.insecure_channel(address) as ch:
        try:
            for msg in pb_grpc.InferenceStub(ch).GenerateStream(request, timeout=timeout):
                if msg.HasField("delta"):
                    write(msg.delta.text)
                else:
                    final = msg.final
        except grpc.RpcError as e:
            raise DemoError(f"request to {address} failed: {e.code().name}: {e.details()}") from e
    if final is None:
        raise DemoError(f"the stream from {address} ended without a final message")
    return final


def stage_requests(ctx: DemoContext) -> str:
    """One streamed request per adapter (x prompts_per_adapter) and one merging all three, through gRPC."""
    ctx.requests = []
    for k, (label, adapters, prompt) in enumerate(_request_plan(ctx)):
        ctx.write(f"      [{label}] {prompt!r} => ")
        final = stream_request(ctx.node_address, prompt, adapters, ctx.sizes.max_tokens, ctx.write, seed=k)
        if not final.HasField("attribution"):
            raise DemoError(f"request {final.request_id} through on-chain adapters came back without a record")
        a = final.attribution
        ctx.write(f"\n        -> {final.usage.prompt_tokens}+{final.usage.completion_tokens} tokens, fee {a.fee}, "
                  f"record {a.record_hash[:18]}...\n")
        ctx.requests.append(RequestOutcome(label, adapters, final.text, final.request_id, final.usage.prompt_tokens,
                                           final.usage.completion_tokens, int(a.fee), a.record_hash))
    fees = sum(r.fee for r in ctx.requests)
    return f"{len(ctx.requests)} requests, {fees} in fees ({fees / TOKEN:.6f} tokens) recorded"


# ------------------------------------------------------------------------------------ settle, claim, show


def stage_settle(ctx: DemoContext) -> str:
    """Close the pending records into the next epoch and submit it from the operator's account."""
    from loraledger.node.ledger.audit import AuditChain, audit_epoch
    from loraledger.node.ledger.export import canonical_export
    from loraledger.node.ledger.record_log import RecordLog
    from loraledger.node.ledger.settler import Settler

    with RecordLog.open(ctx.records_path) as log_:
        outcome = Settler(log_, ctx.contracts_as(DEV_OPERATOR)).settle()
        if outcome is None:
            raise DemoError(f"no pending records in {ctx.records_path} to settle")
        export = canonical_export(log_, outcome.epoch)
    ctx.epoch = outcome.epoch
    ctx.epoch_line = (f"epoch {outcome.epoch}: {outcome.record_count} records, cumulative total "
                      f"{outcome.cumulative_total}, rewards root {outcome.rewards_root[:18]}..., tx {outcome.tx_hash}")
    # what anyone can check with `loraledger audit`: the export against the chain, recomputed independently
    contracts = ctx.contracts_as(DEV_OPERATOR)
    report = audit_epoch(AuditChain(contracts), contracts.ledger.client.address, outcome.epoch, export)
    verdict = "PASS" if report.ok else "FAIL: " + "; ".join(report.lines()[:3])
    return f"{ctx.epoch_line}; audit from its export and the chain: {verdict}"


def _roles(ctx: DemoContext) -> dict[Address, str]:
    """account -> its role label in the summary, in table order (operator, adapter owner, contributors)."""
    roles = {ctx.operator: f"operator (#{DEV_OPERATOR})",
             Address(dev_account(DEV_ADAPTER_OWNER).address): f"adapter owner (#{DEV_ADAPTER_OWNER})"}
    for i in DEV_CONTRIBUTORS:
        roles[Address(dev_account(i).address)] = f"contributor {CONTRIBUTOR_NAMES[i]} (#{i})"
    return roles


def _dev_index(address: str) -> int | None:
    """The anvil dev account index holding `address`, None for any other account."""
    for i in range(len(ANVIL_DEV_KEYS)):
        if dev_account(i).address == address:
            return i
    return None


def stage_claim(ctx: DemoContext) -> str:
    """Every account of the latest rewards tree claims what it is owed, each sending from its own key."""
    from loraledger.node.ledger.claims import claim
    from loraledger.node.ledger.epochs import EpochProofs
    from loraledger.node.ledger.record_log import RecordLog

    with RecordLog.open(ctx.records_path) as log_:
        last = log_.last_confirmed()
        if last is None:
            raise DemoError("no confirmed epoch in the record log: nothing to claim")
        proofs = EpochProofs(log_)
        accounts = [a for a, _ in proofs.trees(last.epoch).rewards_tree.values]
        owed = [proofs.reward_proof(a, last.epoch) for a in accounts]
    paid = sent = 0
    for p in owed:
        assert p is not None
        i = _dev_index(p.account)
        sender = ctx.contracts_as(i if i is not None else DEV_OPERATOR)  # anyone may claim for an account
        res = claim(sender.ledger, p)
        paid += int(res.paid)
        sent += res.tx_hash is not None
    return f"{sent} claims sent for {len(owed)} accounts, {paid} paid ({paid / TOKEN:.6f} tokens)"


def stage_summary(ctx: DemoContext) -> str:
    """Read back who earned what: cumulative amount in the latest root (log), claimed and balance (chain)."""
    from loraledger.node.ledger.epochs import EpochProofs
    from loraledger.node.ledger.record_log import RecordLog

    c = ctx.contracts_as(DEV_OPERATOR)
    rows: list[EarningsRow] = []
    with RecordLog.open(ctx.records_path) as log_:
        proofs = EpochProofs(log_)
        for account, role in _roles(ctx).items():
            p = proofs.reward_proof(account)
            rows.append(EarningsRow(role, account, int(p.cumulative_amount) if p else 0,
                                    int(c.ledger.claimed(ctx.operator, account)), int(c.token.balance_of(account))))
    ctx.earnings = rows
    earned, claimed = sum(r.earned for r in rows), sum(r.claimed for r in rows)
    funded, paid_out = int(c.ledger.funded_total(ctx.operator)), int(c.ledger.claimed_total(ctx.operator))
    if earned != funded or claimed != paid_out:
        raise DemoError(f"the table does not add up to the ledger: earned {earned} vs funded {funded}, claimed "
                        f"{claimed} vs claimed on chain {paid_out}")
    return f"earned {earned} = funded by the operator on chain; claimed {claimed} = paid out by the ledger"


STAGES: tuple[tuple[str, Callable[[DemoContext], str]], ...] = (
    ("devnet", stage_devnet),
    ("model", stage_model),
    ("contributors", stage_contributors),
    ("datanet", stage_datanet),
    ("train", stage_train),
    ("register", stage_register),
    ("reproduce", stage_reproduce),
    ("node", stage_node),
    ("requests", stage_requests),
    ("settle", stage_settle),
    ("claim", stage_claim),
    ("summary", stage_summary),
)


def run_demo(state_dir: str | os.PathLike[str], *, sizes: DemoSizes = FULL, port: int | None = None,
             node_port: int | None = None, out: TextIO | None = None, model: str = "tiny") -> DemoContext:
    """Run every stage in order with a progress line each (`[n/N] stage: what happened (seconds)`); returns
    the filled context. Text streamed from the node goes to `out` as it arrives."""
    stream = out if out is not None else sys.stdout

    def write(text: str) -> None:
        stream.write(text)
        stream.flush()

    ctx = DemoContext(state_dir=Path(state_dir), sizes=sizes, port=port, node_port=node_port, write=write)
    stages = STAGES
    if model != "tiny":  # a real model: its own sizes, adapters and stages (node/demo/smollm2.py)
        from loraledger.node.demo import smollm2

        stages = smollm2.configure(ctx, model, STAGES)
    ctx.state.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    for n, (name, stage) in enumerate(stages, 1):
        write(f"[{n}/{len(stages)}] {name} ...\n")
        t0 = time.perf_counter()
        message = stage(ctx)
        write(f"[{n}/{len(stages)}] {name}: {message} ({time.perf_counter() - t0:.1f}s)\n")
    write(f"demo done in {time.perf_counter() - t_all:.1f}s\n")
    return ctx


def stop_demo(state_dir: str | os.PathLike[str]) -> list[str]:
    """Stop the demo's node (drain, then exit), then its devnet; one line per thing stopped or found stopped."""
    state = Path(state_dir).resolve()
    lines = []
    pid = running_node_pid(state)
    lines.append(f"node pid {pid} stopped" if stop_node(state) else "node: not running")
    devnet_dir = state / "devnet"
    lines.append(f"devnet at {devnet_dir} stopped" if devnet_setup.down(devnet_dir) else "devnet: not running")
    return lines
