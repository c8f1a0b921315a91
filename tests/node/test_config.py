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


def test_paths_in_the_toml_are_relative_to_the_file_not_the_current_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = tmp_path / "site"
    (site / "tls").mkdir(parents=True)
    for name in ("cert.pem", "key.pem", "ca.pem"):
        (site / "tls" / name).write_text("pem")
    toml = site / "node.toml"
    toml.write_text(
        '[auth]\nkeys_file = "api_keys.json"\n'
        '[tls]\ncert_file = "tls/cert.pem"\nkey_file = "./tls/key.pem"\nclient_ca_file = "tls/ca.pem"\n'
        '[model]\ndir = "model"\n'
        '[adapters]\ndir = "adapters"\nroots = ["adapters", "/srv/shared-adapters", "../elsewhere"]\n'
        'aliases = { support = "adapters/support", abs = "/opt/a" }\n'
        '[chain]\ndeployment = "deployment.json"\nkey_file = "keys/operator.json"\n'
        '[records]\npath = "records.sqlite"\n'
        '[settlement]\nexport_uri = "exports/{epoch}.json"\n')
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    env = {"LORALEDGER_RECORDS_PATH": "from-env.sqlite"}
    cfg = load_config("../site/node.toml", environ=env)
    s = str(site.resolve())
    assert cfg.auth.keys_file == f"{s}/api_keys.json"
    assert (cfg.tls.cert_file, cfg.tls.key_file, cfg.tls.client_ca_file) == (
        f"{s}/tls/cert.pem", f"{s}/tls/key.pem", f"{s}/tls/ca.pem")
    assert cfg.model.dir == f"{s}/model" and cfg.adapters.dir == f"{s}/adapters"
    assert cfg.adapters.roots == [f"{s}/adapters", "/srv/shared-adapters", f"{s}/../elsewhere"]
    assert cfg.adapters.aliases == {"support": f"{s}/adapters/support", "abs": "/opt/a"}
    assert cfg.chain.deployment == f"{s}/deployment.json" and cfg.chain.key_file == f"{s}/keys/operator.json"
    assert cfg.settlement.export_uri == f"{s}/exports/{{epoch}}.json"
    # the environment and the command line stay relative to the current directory
    assert cfg.records.path == "from-env.sqlite"
    cfg = load_config(toml, overrides={"model": {"dir": "cli-model"}}, environ={})
    assert cfg.records.path == f"{s}/records.sqlite" and cfg.model.dir == "cli-model"


def test_uris_home_paths_and_empty_values_in_the_toml_stay_as_written(tmp_path: Path) -> None:
    toml = tmp_path / "node.toml"
    toml.write_text('[settlement]\nexport_uri = "https://mirror.example/{chainId}/{epoch}.json"\n'
                    '[chain]\nkey_file = ""\n[model]\ndir = "~/models/tiny"\n')
    cfg = load_config(toml, environ={})
    assert cfg.settlement.export_uri == "https://mirror.example/{chainId}/{epoch}.json"
    assert cfg.chain.key_file == "" and cfg.model.dir == "~/models/tiny"
