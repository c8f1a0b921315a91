"""Bring the local devnet to "running with everything deployed", find it again, and take it down.

    up(state_dir)      anvil running (reused if it already runs) + contracts deployed (reused if still live)
                       + operator (anvil account 1) holds OPERATOR_ROLE and reward tokens
                       -> state_dir/deployment.json
    status(state_dir)  what runs where and what is deployed
    down(state_dir)    stop anvil, drop the (now meaningless) deployment.json

Accounts: anvil dev account 0 deploys and administers everything; account 1 is the node's operator.
The devnet keeps no chain state across restarts, so a deployment.json is trusted only while the anvil that
produced it runs and its addresses still hold code.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from web3 import Web3

from loraledger.node.chain.bindings import Contracts
from loraledger.node.chain.client import ChainClient
from loraledger.node.chain.deploy import Deployment, deploy_all
from loraledger.node.chain.devnet import DEFAULT_CHAIN_ID, Anvil
from loraledger.node.chain.keys import DEV_DEPLOYER, DEV_OPERATOR, dev_account
from loraledger.node.config import DEPLOYMENT_ENV
from loraledger.node.errors import ConfigError, DevnetError

log = logging.getLogger(__name__)

DEPLOYMENT_FILE = "deployment.json"
DEFAULT_STATE_DIR = Path(".loraledger") / "devnet"
DEFAULT_OPERATOR_FUNDING = 1_000_000 * 10**18  # reward-token units minted to the operator (1e6 tokens)


@dataclass(frozen=True)
class DevnetStatus:
    """`running`: anvil alive and answering; `deployment`: the record, when it is live on that anvil."""

    state_dir: Path
    running: bool
    rpc_url: str | None
    pid: int | None
    chain_id: int | None
    deployment: Deployment | None

    def describe(self) -> str:
        """Human-readable multi-line summary."""
        if not self.running:
            return f"devnet: not running (state dir {self.state_dir})"
        lines = [f"devnet: running pid {self.pid} at {self.rpc_url} (chain id {self.chain_id})"]
        if self.deployment is None:
            lines.append("deployment: none")
        else:
            d = self.deployment
            lines.append(f"deployment: {self.state_dir / DEPLOYMENT_FILE} (from block {d.block_number})")
            for name, addr in sorted(d.addresses.items()):
                lines.append(f"  {name:<20} {addr}")
            lines.append(f"  {'operator':<20} {d.operator}")
        return "\n".join(lines)


def web3_for(rpc_url: str, timeout: float = 30.0) -> Web3:
    """A Web3 over HTTP to `rpc_url`; DevnetError when it does not answer."""
    w3 = Web3(Web3.HTTPProvider(rpc_url, request_kwargs={"timeout": timeout}))
    if not w3.is_connected():
        raise DevnetError(f"no JSON-RPC node answers at {rpc_url}")
    return w3


def read_deployment(path: str | os.PathLike[str]) -> Deployment:
    """Parse a deployment.json; ConfigError naming the file when it is missing or malformed."""
    p = Path(path)
    if not p.is_file():
        hint = (f"pass --deployment PATH (the deployment.json `loraledger deploy` wrote) or set "
                f"${DEPLOYMENT_ENV}; looked in order at --deployment, ${DEPLOYMENT_ENV}, [chain] deployment, "
                f"./{DEPLOYMENT_FILE}")
        if p.resolve() == (DEFAULT_STATE_DIR / DEPLOYMENT_FILE).resolve():
            hint += "; for a local devnet, `loraledger devnet up` writes this one"
        raise ConfigError(f"no deployment record at {p}: {hint}")
    try:
        return Deployment.from_json(p.read_text())
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from e


def deployment_is_live(w3: Web3, deployment: Deployment) -> bool:
    """True when `w3`'s chain id matches the record and every recorded address holds code."""
    if int(w3.eth.chain_id) != deployment.chain_id:
        return False
    return all(len(w3.eth.get_code(Web3.to_checksum_address(a))) > 0 for a in deployment.addresses.values())


def _live_deployment(state_dir: Path, w3: Web3) -> Deployment | None:
    path = state_dir / DEPLOYMENT_FILE
    if not path.exists():
        return None
    try:
        dep = read_deployment(path)
    except ConfigError as e:
        log.warning("ignoring unreadable %s: %s", path, e)
        return None
    return dep if deployment_is_live(w3, dep) else None


def deploy_devnet(
    w3: Web3, rpc_url: str, *, challenge_delay: int | None = 0, operator_funding: int = DEFAULT_OPERATOR_FUNDING
) -> Deployment:
    """Deploy everything from dev account 0, grant OPERATOR_ROLE to dev account 1 and mint it `operator_funding`.

    Returns the Deployment with `extra = {"rpcUrl", "network": "devnet", "operatorFunding"}`.
    """
    deployer = dev_account(DEV_DEPLOYER)
    operator = dev_account(DEV_OPERATOR)
    dep = deploy_all(w3, deployer, challenge_delay=challenge_delay, operator=operator.address)
    if operator_funding > 0:
        admin = Contracts.at(ChainClient(w3, deployer), dep.addresses)
        admin.token.mint(operator.address, operator_funding)
    extra = {**dep.extra, "rpcUrl": rpc_url, "network": "devnet", "operatorFunding": str(operator_funding)}
    return dataclasses.replace(dep, extra=extra)


def up(
    state_dir: str | os.PathLike[str] = DEFAULT_STATE_DIR,
    *,
    port: int | None = None,
    chain_id: int = DEFAULT_CHAIN_ID,
    challenge_delay: int | None = 0,
    block_time: float | None = None,
    operator_funding: int = DEFAULT_OPERATOR_FUNDING,
) -> tuple[DevnetStatus, bool]:
    """Idempotently bring the devnet up; returns (status, reused) where `reused` means nothing new was done.

    A running anvil is reused when it matches `chain_id` (and `port`, when one is asked for); a different one
    raises DevnetError asking for `devnet down` first. Anvil is started detached, so it outlives this process.
    """
    state = Path(state_dir)
    anvil = Anvil.attach(state)
    started = False
    if anvil is not None:
        if anvil.chain_id != chain_id or (port and anvil.port != port):
            raise DevnetError(
                f"a devnet already runs from {state} at {anvil.rpc_url} with chain id {anvil.chain_id}; "
                f"run `loraledger devnet down --state-dir {state}` before asking for port {port} / chain id {chain_id}"
            )
        if not anvil.is_answering():
            raise DevnetError(f"devnet pid {anvil.pid} runs but does not answer at {anvil.rpc_url}; "
                              f"run `loraledger devnet down --state-dir {state}` and up again")
        log.info("reusing devnet pid %s at %s", anvil.pid, anvil.rpc_url)
    else:
        anvil = Anvil(state, port=port, chain_id=chain_id, block_time=block_time)
        anvil.start(detach=True)
        started = True
    w3 = web3_for(anvil.rpc_url)
    deployment = None if started else _live_deployment(state, w3)
    reused = deployment is not None
    if deployment is None:
        (state / DEPLOYMENT_FILE).unlink(missing_ok=True)
        deployment = deploy_devnet(w3, anvil.rpc_url, challenge_delay=challenge_delay,
                                   operator_funding=operator_funding)
        tmp = state / (DEPLOYMENT_FILE + ".tmp")
        tmp.write_text(deployment.to_json())
        tmp.replace(state / DEPLOYMENT_FILE)
        log.info("deployed to %s; wrote %s", anvil.rpc_url, state / DEPLOYMENT_FILE)
    elif challenge_delay is not None and deployment.challenge_delay != challenge_delay:
        log.warning("reused deployment has challenge delay %ds (asked %ds); `devnet down` to redeploy",
                    deployment.challenge_delay, challenge_delay)
    return DevnetStatus(state, True, anvil.rpc_url, anvil.pid, anvil.chain_id, deployment), reused


def status(state_dir: str | os.PathLike[str] = DEFAULT_STATE_DIR) -> DevnetStatus:
    """What runs from `state_dir` and, if it answers, whether its deployment.json is live on it."""
    state = Path(state_dir)
    anvil = Anvil.attach(state)
    if anvil is None or not anvil.is_answering():
        return DevnetStatus(state, False, None, anvil.pid if anvil else None, None, None)
    w3 = web3_for(anvil.rpc_url)
    return DevnetStatus(state, True, anvil.rpc_url, anvil.pid, anvil.chain_id, _live_deployment(state, w3))


def down(state_dir: str | os.PathLike[str] = DEFAULT_STATE_DIR) -> bool:
    """Stop the devnet of `state_dir` and remove its deployment.json; False when nothing was running."""
    state = Path(state_dir)
    anvil = Anvil.attach(state)
    stopped = anvil.stop() if anvil is not None else False
    (state / DEPLOYMENT_FILE).unlink(missing_ok=True)
    return stopped
