"""Shared fixtures: one real anvil devnet per test session, a web3 handle on it, and snapshot/revert per test.

Keep this file generic; area-specific fixtures belong in a conftest.py of the test sub-folder.
"""

from __future__ import annotations

import logging
import os

import torch

# Without CUDA, Triton kernels run in its interpreter; this must be set before anything imports triton
# (transformers does, early), or every interpreted kernel launch fails later in the session.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Every node a test starts (in process through load_config, or as a subprocess) serves its HTTP API on a free
# port, never on the default 8000 that another node or program may hold.
os.environ.setdefault("LORALEDGER_HTTP_LISTEN", "127.0.0.1:0")

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from loraledger.node.chain.devnet import Anvil

if TYPE_CHECKING:  # web3 is imported by the fixture that needs it: the engine tests also run where it is absent
    from web3 import Web3


@pytest.fixture(scope="session")
def anvil(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Anvil]:
    """A running anvil on a free loopback port (chain id 31337, 10 funded dev accounts), stopped at session end."""
    with Anvil(tmp_path_factory.mktemp("anvil")) as node:
        yield node


@pytest.fixture(scope="session")
def w3(anvil: Anvil) -> Web3:
    """A web3 client connected to the session's anvil."""
    from web3 import Web3

    client = Web3(Web3.HTTPProvider(anvil.rpc_url, request_kwargs={"timeout": 30}))
    assert client.is_connected(), f"cannot reach anvil at {anvil.rpc_url}"
    return client


@pytest.fixture
def chain_snapshot(w3: Web3) -> Iterator[str]:
    """`evm_snapshot` before the test and `evm_revert` after it, so each test sees the same chain state."""
    snap = w3.provider.make_request("evm_snapshot", [])  # type: ignore[arg-type]
    snap_id = snap["result"]
    yield snap_id
    reverted = w3.provider.make_request("evm_revert", [snap_id])  # type: ignore[arg-type]
    assert reverted.get("result") is True, f"evm_revert({snap_id}) failed: {reverted}"


@pytest.fixture(autouse=True)
def _command_log_handler_removed() -> Iterator[None]:
    """A test that runs a command in process (`main([...])`) gets the command's root log handler, bound to the
    stderr pytest captured for that test; it is taken off afterwards, so that a later test's server thread does
    not write to the closed capture ("--- Logging error ---" in the run's output). pytest's own handlers are
    left alone."""
    from loraledger.node.logs import HANDLER_NAME

    yield
    root = logging.getLogger()
    for h in [h for h in root.handlers if h.get_name() == HANDLER_NAME]:
        root.removeHandler(h)
