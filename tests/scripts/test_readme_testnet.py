"""README.md's "Using a real testnet" walkthrough, run as written: every ```sh block of that section, in order, in
one bash process, in an empty folder, against a local stand-in for Sepolia (anvil with chain id 11155111 and 2 s
blocks, the project's anvil from node_modules). The only things set from outside are what the README itself asks
for: its environment (the repository's `.venv/bin` on the PATH) and `$LORALEDGER_CHAIN_RPC_URL`, which the
README tells the user to export. Nothing else of the caller's `LORALEDGER_*` environment reaches the script.

Afterwards the chain must show the whole path: an epoch of the operator confirmed on the ledger, its fees
pulled from the operator, and Alice, Bob and the adapter owner paid what the epoch's export says they earned,
each once."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from loraledger.node.chain.devnet import Anvil

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SECTION = "## Using a real testnet"
SEPOLIA = 11155111
PORTS = (50551, 8550)  # the walkthrough's node.toml: gRPC and HTTP
SCRIPT_TIMEOUT = 480.0


def readme_blocks(text: str, heading: str = SECTION) -> list[str]:
    """The ```sh blocks of the README section under `heading` (up to the next `## ` heading), in order."""
    start = text.index(heading + "\n")
    end = text.find("\n## ", start + len(heading))
    section = text[start:end if end >= 0 else len(text)]
    return [m.group(1) for m in re.finditer(r"^```sh\n(.*?)^```$", section, flags=re.DOTALL | re.MULTILINE)]


def test_the_section_has_the_walkthrough_blocks() -> None:
    blocks = readme_blocks((ROOT / "README.md").read_text())
    script = "\n".join(blocks)
    for command in ("loraledger key new", "loraledger deploy", "--mint-to", "loraledger contributor register",
                    "loraledger contribution sign", "loraledger datanet build", "loraledger datanet register",
                    "loraledger datanet index", "loraledger train", "loraledger adapter register",
                    "loraledger node run --config node.toml", "loraledger generate", "loraledger operator status",
                    "loraledger rewards show", "loraledger rewards claim"):
        assert command in script, f"the walkthrough lacks `{command}`"
    assert "node_modules" not in script and "cast " not in script  # no Foundry CLI, nothing from the repo


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture
def sepolia_standin(tmp_path: Path) -> Iterator[Anvil]:
    with Anvil(tmp_path / "anvil", chain_id=SEPOLIA, block_time=2) as node:
        yield node


def test_the_testnet_walkthrough_runs_as_written(sepolia_standin: Anvil, tmp_path: Path) -> None:
    busy = [p for p in PORTS if not _port_free(p)]
    if busy:
        pytest.skip(f"the walkthrough's node ports {busy} are taken on this machine")
    blocks = readme_blocks((ROOT / "README.md").read_text())
    assert len(blocks) >= 8
    work = tmp_path / "walkthrough"
    work.mkdir()
    script = work.parent / "walkthrough.sh"
    script.write_text("set -euo pipefail\n" + "\n".join(
        f"echo '+++ README block {i + 1}' >&2\n{b}" for i, b in enumerate(blocks)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORALEDGER_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["LORALEDGER_CHAIN_RPC_URL"] = sepolia_standin.rpc_url
    proc = subprocess.Popen(["bash", str(script)], cwd=work, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=SCRIPT_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"the walkthrough ran past {SCRIPT_TIMEOUT:g}s:\n{out[-6000:]}\n{_node_log(work)}")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # the node it started in the background, if still there
        except ProcessLookupError:
            pass
    (work.parent / "walkthrough.out").write_text(out)  # kept under pytest's basetemp for a look afterwards
    assert proc.returncode == 0, f"the walkthrough failed:\n{out[-8000:]}\n{_node_log(work)}"

    # what the README's commands said
    assert "wrote deployment.json" in out and "(no RPC URL in it" in out
    assert "registered adapter 1 " in out
    assert re.search(r"paid \d+ to 0x", out), out[-3000:]
    # before the one-day delay: pending, nothing claimable; after it: claimable
    assert re.search(r"claimable now: 0\n\s+pending until .*\(epoch 1\)", out), out[-3000:]
    assert re.search(r"claimable now: [1-9]\d*\n", out), out[-3000:]
    deployment = json.loads((work / "deployment.json").read_text())
    assert deployment["chainId"] == SEPOLIA and deployment["challengeDelay"] == 86_400
    assert sepolia_standin.rpc_url.rsplit(":", 1)[1] not in (work / "deployment.json").read_text()
    journal = json.loads((work / "deployment.journal.json").read_text())
    assert "mint:0" in journal["steps"] and not journal["pending"]

    # what the chain holds: an epoch confirmed, fees pulled once, every claimant paid its cumulative amount
    from web3 import Web3

    from loraledger.node.chain.bindings import Contracts
    from loraledger.node.chain.client import ChainClient
    from loraledger.node.chain.keys import dev_account
    from loraledger.node.ledger.epochs import EpochProofs
    from loraledger.node.ledger.record_log import RecordLog

    w3 = Web3(Web3.HTTPProvider(sepolia_standin.rpc_url))
    c = Contracts.at(ChainClient(w3, dev_account(9)), deployment["addresses"])
    operator = deployment["operator"]
    last = int(c.ledger.last_epoch(operator))
    assert last >= 1
    with RecordLog.open(work / "records.sqlite") as log_:
        confirmed = log_.last_confirmed()
        assert confirmed is not None and confirmed.epoch == last
        assert int(c.ledger.funded_total(operator)) == int(confirmed.cumulative_total or 0) > 0
        tree = EpochProofs(log_).trees(confirmed.epoch).rewards_tree
        earned = {a: int(v) for a, v in tree.values}
    claimants = {json.loads((work / f"{who}.json").read_text())["address"].lower(): who
                 for who in ("alice", "bob", "owner")}
    paid = {who: int(c.ledger.claimed(operator, Web3.to_checksum_address("0x" + a))) for a, who in claimants.items()}
    for a, who in claimants.items():
        owed = earned.get(Web3.to_checksum_address("0x" + a), 0)
        assert owed > 0, f"{who} earned nothing by epoch {confirmed.epoch}"
        assert paid[who] == owed, (who, paid[who], owed)
        assert int(c.token.balance_of("0x" + a)) == owed  # paid once: the balance is exactly the claim


def _node_log(work: Path) -> str:
    log = work / "node.log"
    return "node.log:\n" + log.read_text()[-4000:] if log.is_file() else "(no node.log)"
