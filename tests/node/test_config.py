"""The node config: defaults < TOML < environment < command line, and clear errors for bad values."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraledger.node.config import load_config
from loraledger.node.errors import ConfigError


def test_defaults_are_valid_and_work_with_the_devnet() -> None:
    cfg = load_config(environ={})
    assert cfg.server.listen == "127.0.0.1:50051"
    assert cfg.chain.deployment.endswith("devnet/deployment.json")
    assert cfg.model.quantize == "none" and cfg.attribution.token_level_lambda == 0.0


def test_sources_layer_in_order(tmp_path: Path) -> None:
    toml = tmp_path / "node.toml"
    toml.write_text(
        '[server]\nlisten = "0.0.0.0:6000"\nmax_queue = 10\n'
        '[model]\ndtype = "bfloat16"\nkv_cache_mb = 64\n'
        '[adapters]\naliases = { support = "/adapters/support" }\n'
        "[settlement]\nenabled = false\n"
    )
    env = {"LORALEDGER_SERVER_MAX_QUEUE": "20", "LORALEDGER_SETTLEMENT_ENABLED": "yes"}
    cfg = load_config(toml, overrides={"server": {"max_queue": 30, "listen": None}}, environ=env)
    assert cfg.server.listen == "0.0.0.0:6000"  # file; a None flag leaves it alone
    assert cfg.server.max_queue == 30  # flag > env > file
    assert cfg.settlement.enabled is True  # env > file
    assert cfg.model.dtype == "bfloat16" and cfg.model.kv_cache_mb == 64
    assert cfg.adapters.aliases == {"support": "/adapters/support"}


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ("[sever]\nlisten = 'x'\n", {}, r"unknown config section \[sever\]"),
        ("[server]\nport = 1\n", {}, r"unknown key server.port"),
        ("[server]\nmax_queue = 'many'\n", {}, r"server.max_queue .* must be an integer"),
        ("[server]\nlisten = 'nohost'\n", {}, r"server.listen must be HOST:PORT"),
        ("[model]\nquantize = 'int3'\n", {}, r"model.quantize must be 'none' or 'nf4'"),
        ("[model]\nasync_decode = 'yes'\n", {}, r"model.async_decode must be auto, on or off"),
        ("[attribution]\ntoken_level_lambda = 1.5\n", {}, r"token_level_lambda must be in \[0, 1\]"),
        ("[adapters]\naliases = { 42 = '/x' }\n", {}, r"all digits"),
        ("", {"LORALEDGER_SETTLEMENT_ENABLED": "maybe"}, r"settlement.enabled \(from environment\) must be a boolean"),
        ("[model\n", {}, r"not valid TOML"),
    ],
)
def test_bad_values_name_the_key_and_the_fix(tmp_path: Path, text: str, env: dict[str, str], message: str) -> None:
    toml = tmp_path / "node.toml"
    toml.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(toml, environ=env)


def test_missing_file_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found; pass --config PATH"):
        load_config(tmp_path / "absent.toml", environ={})
