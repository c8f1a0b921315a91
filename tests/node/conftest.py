"""Fixtures of the node-process tests: the tiny checkpoint, random PEFT adapters for it, a thread that hosts
grpc.aio servers on its own asyncio loop (so tests can drive clients from theirs), and a fresh on-chain world per
module (deployment, funded operator, three contributors, an indexed datanet, registered adapters).

Helpers are handed out as fixtures since test modules are imported with --import-mode=importlib."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch
from safetensors.torch import save_file

T = TypeVar("T")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama checkpoint + tokenizer (init_tiny defaults: 2 layers, hidden 64, vocab 512, context
    512). Read-only."""
    from loraledger.inference.tiny import init_tiny

    return init_tiny(tmp_path_factory.mktemp("tiny") / "model")


def write_random_adapter(model_dir: Path, out_dir: Path, seed: int, r: int = 4,
                         targets: tuple[str, ...] = ("q_proj", "v_proj")) -> Path:
    """A PEFT-format LoRA adapter for the checkpoint in `model_dir`: A ~ N(0, 0.3) [r, in], B ~ N(0, 0.3) [out, r]
    for `targets` of every layer (strong enough to change greedy tokens)."""
    cfg = json.loads((model_dir / "config.json").read_text())
    h, heads, kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    shapes = {"q_proj": (h, h), "k_proj": (h, kv * h // heads), "v_proj": (h, kv * h // heads), "o_proj": (h, h)}
    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(cfg["num_hidden_layers"]):
        for t in targets:
            fan_in, fan_out = shapes[t]
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{t}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(r, fan_in, generator=g) * 0.3
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, r, generator=g) * 0.3
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": list(targets), "bias": "none"}))
    save_file(tensors, str(out_dir / "adapter_model.safetensors"))
    return out_dir


@pytest.fixture(scope="session")
def random_adapter() -> Callable[..., Path]:
    """`write_random_adapter(model_dir, out_dir, seed, r=4, targets=...)`."""
    return write_random_adapter


class LoopThread:
    """An asyncio event loop running on a daemon thread; `run(coro)` executes a coroutine there and waits."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-grpc-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 120.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def server_loop() -> Iterator[LoopThread]:
    """A loop thread for the module's servers, stopped at the end of the module."""
    lt = LoopThread()
    yield lt
    lt.close()


# ---- an on-chain world: deployment, operator, 3 contributors, a datanet with its index, adapters ----------------

CONTRIBUTOR_TEXTS: dict[int, list[str]] = {  # dev account -> the records of its contribution file
    2: ["Owls hunt at night and glide without a sound over the frozen meadow near the old mill.",
        "The lighthouse keeper counted ships by the color of their lanterns."],
    3: ["Copper kettles whistle louder when the water inside is nearly boiling over.",
        "Marmalade keeps for months in a cool cellar if the jars are sealed with wax."],
    4: ["Glaciers carve valleys slowly, grinding stone into fine grey flour for the rivers below.",
        "Every spring the orchard bees return to the same crooked plum tree first."],
}
SHARES = (6000, 2500, 1500)  # data contributors / adapter owner / operator, basis points


@dataclass
class ChainWorld:
    """A fresh deployment on the session anvil with everything the node's money path needs.

    adapters: on-chain id -> adapter dir (random PEFT weights, lineage.json naming the datanet, registered with a
    file:// URI); lineage: contributor -> tokens (the manifest's weights: every adapter used the whole datanet).
    """

    w3: Any
    rpc_url: str
    deployment: Any  # loraledger.node.chain.deploy.Deployment (extra.rpcUrl set)
    deployment_file: Path
    operator: Any  # LocalAccount: OPERATOR_ROLE, ETH, reward tokens, ledger pre-approved
    contributors: list[Any]  # LocalAccounts (dev 2, 3, 4)
    manifest_dir: Path
    datanet_id: int
    lineage: dict[str, int]
    adapters: dict[int, Path]
    fees: dict[int, int]
    owners: dict[int, str]
    texts: dict[str, list[str]]  # contributor address -> records

    def bind(self, account: Any) -> Any:
        from loraledger.node.chain.bindings import Contracts
        from loraledger.node.chain.client import ChainClient

        return Contracts.at(ChainClient(self.w3, account), self.deployment.addresses)

    def operator_key(self, operator: Any = None) -> str:
        return "0x" + bytes((operator or self.operator).key).hex()

    def new_operator(self) -> Any:
        """Another operator (its own epoch stream from 1): ETH, OPERATOR_ROLE, reward tokens, ledger approved."""
        from eth_account import Account

        from loraledger.node.chain.keys import dev_account

        op = Account.create()
        admin = self.bind(dev_account(0))
        self.w3.provider.make_request("anvil_setBalance", [op.address, hex(10**21)])
        admin.token.mint(op.address, 10**30)
        admin.ledger.grant_operator(op.address)
        self.bind(op).token.approve(admin.ledger.address, 10**30)  # epochs then need no approve transaction
        return op


def random_lineage_adapter(model_dir: Path, out_dir: Path, seed: int, manifest_dir: Path,
                           contributors: dict[str, int], chain_id: int, datanet_id: int) -> Path:
    """A random PEFT adapter plus the lineage.json `loraledger train` would write for it (the whole datanet)."""
    from loraledger.inference.identity import base_model_hash, config_hash, weights_hash
    from loraledger.node.lineage.datanet import load_manifest

    write_random_adapter(model_dir, out_dir, seed)
    manifest = load_manifest(manifest_dir)
    training = {"method": "random-test", "seed": seed, "rank": 4}
    lineage = {
        "version": 1, "weights_hash": weights_hash(out_dir), "base_model_hash": base_model_hash(model_dir),
        "base_model_dir": str(model_dir), "training_config": training, "training_config_hash": config_hash(training),
        "datanets": [{"name": manifest.name, "root": manifest.root, "datanet_id": datanet_id, "chain_id": chain_id,
                      "registry": None, "manifest_dir": str(manifest_dir.resolve()),
                      "tokens_used": sum(contributors.values()), "contributors": contributors}],
        "lineage_weights": [{"contributor": a, "tokens": n} for a, n in sorted(contributors.items())],
        "total_tokens": sum(contributors.values()), "seed": seed, "registration": None,
    }
    (out_dir / "lineage.json").write_text(json.dumps(lineage, indent=1))
    return out_dir


def build_chain_world(w3: Any, rpc_url: str, model_dir: Path, root: Path, fees: dict[int, int],
                      owners: dict[int, int]) -> ChainWorld:
    """Deploy, make a funded operator, register contributors 2..4, build + index + register their datanet, and
    register one random adapter per entry of `fees` (id -> fee per token) owned by dev account `owners[id]`."""
    import dataclasses
    import os

    from loraledger.node.attribution.manifest import LocalTokenizer, index_manifest
    from loraledger.node.chain.deploy import deploy_all
    from loraledger.node.chain.keys import dev_account
    from loraledger.node.lineage.contributions import sign_contribution
    from loraledger.node.lineage.datanet import build_datanet, load_manifest, register_datanet
    from loraledger.node.lineage.registration import register_adapter

    deployment = deploy_all(w3, dev_account(0), shares=SHARES)
    deployment = dataclasses.replace(deployment, extra={"rpcUrl": rpc_url})
    dep_file = root / "deployment.json"
    dep_file.write_text(deployment.to_json())
    world = ChainWorld(w3, rpc_url, deployment, dep_file, None, [dev_account(i) for i in (2, 3, 4)],
                       root / "datanet", 0, {}, {}, dict(fees), {}, {})
    world.operator = world.new_operator()

    src = root / "contributions"
    src.mkdir(parents=True)
    for k, acct in enumerate(world.contributors):
        world.bind(acct).contributors.register(f"ipfs://contributor-{k}")
        texts = CONTRIBUTOR_TEXTS[2 + k]
        world.texts[acct.address] = texts
        f = src / f"c{k}.jsonl"
        f.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        t0 = 1_700_000_000 * 10**9 + k
        os.utime(f, ns=(t0, t0))
        sign_contribution(f, acct)
    curator = world.bind(dev_account(8))
    build_datanet("e2e-datanet", src, world.manifest_dir, tokenizer_dir=model_dir, registry=curator.contributors)
    world.datanet_id = int(register_datanet(world.manifest_dir, curator).datanet_id)
    index_manifest(world.manifest_dir, LocalTokenizer.load(model_dir))
    manifest = load_manifest(world.manifest_dir)
    for e in manifest.entries:
        world.lineage[e.contributor] = world.lineage.get(e.contributor, 0) + int(e.weight)
    for n, (expected_id, fee) in enumerate(sorted(fees.items())):
        path = random_lineage_adapter(model_dir, root / "adapters-src" / f"a{expected_id}", 100 + n,
                                      world.manifest_dir, dict(world.lineage), int(w3.eth.chain_id),
                                      world.datanet_id)
        owner = dev_account(owners[expected_id])
        reg = register_adapter(path, world.bind(owner), fee_per_token=fee)
        assert reg.adapter_id == expected_id, (reg.adapter_id, expected_id)
        world.adapters[expected_id] = path
        world.owners[expected_id] = owner.address
    return world


@pytest.fixture(scope="module")
def chain_world(w3: Any, anvil: Any, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> ChainWorld:
    """A fresh on-chain world per test module: adapters 1 (fee 3, owner dev 5), 2 (fee 5, owner dev 6) and
    3 (fee 2, owner dev 5)."""
    return build_chain_world(w3, anvil.rpc_url, tiny_model_dir, tmp_path_factory.mktemp("world"),
                             fees={1: 3, 2: 5, 3: 2}, owners={1: 5, 2: 6, 3: 5})


# ---- `loraledger node run` as a subprocess ---------------------------------------------------------------------

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class NodeProcess:
    """A running `loraledger node run`: the process, its address once serving, and its output lines so far."""

    proc: Any  # subprocess.Popen[str]
    address: str
    lines: list[str]
    reader: threading.Thread

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait(30)
        self.reader.join(10)

    def terminate(self, timeout: float = 60.0) -> int:
        import signal

        self.proc.send_signal(signal.SIGTERM)
        rc = int(self.proc.wait(timeout))
        self.reader.join(10)
        return rc


def start_node(args: list[str], env: dict[str, str] | None = None, timeout: float = 180.0) -> NodeProcess:
    """`python -m loraledger.node.cli node run ARGS` from the repo root; returns once it prints its serving line."""
    import os
    import subprocess
    import sys

    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "loraledger.node.cli", "node", "run", *args], cwd=REPO_ROOT, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    address: list[str] = []
    ready = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if "loraledger node: serving on " in line:
                address.append(line.rsplit(" ", 1)[-1].strip())
                ready.set()
        ready.set()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    if not ready.wait(timeout) or not address:
        proc.kill()
        proc.wait(10)
        raise AssertionError("node did not start:\n" + "\n".join(lines[-40:]))
    return NodeProcess(proc, address[0], lines, reader)


@pytest.fixture(scope="session")
def node_runner() -> Callable[..., NodeProcess]:
    """`start_node(args, env=None, timeout=180)`: a `loraledger node run` subprocess, serving."""
    return start_node


@pytest.fixture(scope="session")
def start_app() -> Callable[..., Any]:
    """`start_app(loop, cfg, operator_key) -> (app, grpc port)`: a NodeApp started on `loop` (a LoopThread) with
    the operator key in the env var `cfg.chain.key_env` only while it starts (stop it with `loop.run(app.stop())`)."""
    import os

    from loraledger.node.serving.app import NodeApp

    def start(loop: Any, cfg: Any, operator_key: str) -> tuple[Any, int]:
        app = NodeApp(cfg)
        os.environ[cfg.chain.key_env] = operator_key
        try:
            port = loop.run(app.start())
        finally:
            del os.environ[cfg.chain.key_env]
        return app, int(port)

    return start
