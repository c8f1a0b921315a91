"""The node's configuration: one validated dataclass per subsystem, built once at start-up.

Sources, later ones winning: built-in defaults (which work with `loraledger devnet up` and
`loraledger model init-tiny`), a TOML file (`--config node.toml`), environment variables
`LORALEDGER_<SECTION>_<KEY>` (e.g. `LORALEDGER_SERVER_LISTEN=0.0.0.0:50051`), then command-line flags.

    [server]      listen, max_queue, grace_seconds, max_message_bytes, workers   (gRPC; max_queue is shared)
    [http]        listen (empty: off), max_body_bytes                            (OpenAI-compatible API)
    [metrics]     listen (Prometheus /metrics on its own port; used when [http] is off)
    [auth]        mode (auto | keys | none), keys_file, metrics (open | keyed), signature_ttl_seconds
    [tls]         cert_file, key_file, client_ca_file (both listeners; client certs for gRPC admin calls)
    [model]       name, dir, dtype, device, quantize, attention, decode_graphs, async_decode, block_size,
                  kv_cache_mb, max_num_seqs, max_tokens_per_step, default_max_tokens
    [adapters]    dir, slots, max_rank, aliases = { alias = "path" }, roots (LoadAdapter path folders)
    [chain]       deployment, rpc_url, key_env, key_file, password_env, confirmations
                  (deployment, when the TOML does not name it: $LORALEDGER_DEPLOYMENT, ./deployment.json, then
                  the devnet's .loraledger/devnet/deployment.json)
    [records]     path, postgres_dsn
    [settlement]  enabled, epoch_seconds, epoch_records, push_threshold, node_name, role_poll_seconds
    [attribution] token_level_lambda, min_match, workers
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraledger.node.errors import ConfigError

DEFAULT_STATE_DIR = Path(".loraledger")
DEPLOYMENT_ENV = "LORALEDGER_DEPLOYMENT"  # the deployment record, when the config does not name one
DEV_CHAIN_IDS = (31337, 1337)  # local dev chains: no confirmations needed, a zero challenge delay allowed
DEPLOYMENT_FILE = "deployment.json"  # found in the current directory when neither the config nor the env names one


@dataclass
class ServerConfig:
    listen: str = "127.0.0.1:50051"
    max_queue: int = 256  # requests waiting or running; beyond it RESOURCE_EXHAUSTED
    grace_seconds: float = 10.0  # SIGTERM: time for in-flight requests to finish before they are cancelled
    max_message_bytes: int = 4 * 1024 * 1024
    workers: int = 16

    def validate(self) -> None:
        _check_listen("server.listen", self.listen)
        _positive("server.max_queue", self.max_queue)
        _positive("server.max_message_bytes", self.max_message_bytes)
        _positive("server.workers", self.workers)
        if self.grace_seconds < 0:
            raise ConfigError(f"server.grace_seconds must be >= 0, got {self.grace_seconds}")


def _check_listen(name: str, listen: str) -> None:
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{name} must be HOST:PORT, got {listen!r}")


@dataclass
class HttpConfig:
    listen: str = "127.0.0.1:8000"  # the OpenAI-compatible API and /metrics; "" turns it off
    max_body_bytes: int = 1024 * 1024  # a larger request body is refused with 413 before it is parsed

    def validate(self) -> None:
        if self.listen:
            _check_listen("http.listen", self.listen)
        _positive("http.max_body_bytes", self.max_body_bytes)


@dataclass
class MetricsConfig:
    listen: str = ""  # Prometheus /metrics on its own HOST:PORT (for a node whose HTTP API is off)

    def validate(self) -> None:
        if self.listen:
            _check_listen("metrics.listen", self.listen)


@dataclass
class AuthConfig:
    mode: str = "auto"  # "auto": keys when the keys file holds one; "keys": always; "none": open on purpose
    keys_file: str = str(DEFAULT_STATE_DIR / "api_keys.json")
    metrics: str = "open"  # "open" or "keyed" (any valid key) for /metrics
    signature_ttl_seconds: float = 300.0  # a signed request's deadline may be at most this far ahead

    def validate(self) -> None:
        if self.mode not in ("auto", "keys", "none"):
            raise ConfigError(f"auth.mode must be auto, keys or none, got {self.mode!r}")
        if self.metrics not in ("open", "keyed"):
            raise ConfigError(f"auth.metrics must be open or keyed, got {self.metrics!r}")
        _positive("auth.signature_ttl_seconds", self.signature_ttl_seconds)


@dataclass
class TlsConfig:
    cert_file: str = ""  # PEM certificate chain of both listeners; empty = plaintext
    key_file: str = ""
    client_ca_file: str = ""  # CA of client certificates: the gRPC listener then requires one (mTLS)

    def validate(self) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            raise ConfigError("tls.cert_file and tls.key_file go together: set both, or neither")
        if self.client_ca_file and not self.cert_file:
            raise ConfigError("tls.client_ca_file needs tls.cert_file and tls.key_file (mTLS runs over TLS)")
        for name in ("cert_file", "key_file", "client_ca_file"):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                raise ConfigError(f"tls.{name} {path} does not exist")


@dataclass
class ModelConfigSection:
    name: str = ""  # the base model's name in the APIs (`model`); "" = the checkpoint folder's name
    dir: str = str(DEFAULT_STATE_DIR / "model")

    @property
    def served_name(self) -> str:
        """The base model's name in the APIs: `name`, else the checkpoint folder's name."""
        return self.name or Path(self.dir).resolve().name
    dtype: str = "float32"
    device: str = "auto"  # "auto" = cuda when available, else cpu
    quantize: str = "none"  # "none" or "nf4"
    attention: str = "auto"  # "auto", "torch", "triton"
    decode_graphs: str = "auto"  # "auto" (CUDA graphs on CUDA), "off", "static", "graphs" (loraledger.inference.graph_runner)
    async_decode: str = "auto"  # "auto" (with CUDA graphs), "on", "off": decode steps run ahead of the host
    block_size: int = 16
    kv_cache_mb: int = 256
    max_num_seqs: int = 64
    max_tokens_per_step: int = 2048
    default_max_tokens: int = 64

    def validate(self) -> None:
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"model.dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.quantize not in ("none", "nf4"):
            raise ConfigError(f"model.quantize must be 'none' or 'nf4', got {self.quantize!r}")
        if self.attention not in ("auto", "torch", "triton"):
            raise ConfigError(f"model.attention must be auto, torch or triton, got {self.attention!r}")
        if self.decode_graphs not in ("auto", "off", "static", "graphs"):
            raise ConfigError(f"model.decode_graphs must be auto, off, static or graphs, got {self.decode_graphs!r}")
        if self.async_decode not in ("auto", "on", "off"):
            raise ConfigError(f"model.async_decode must be auto, on or off, got {self.async_decode!r}")
        for name in ("block_size", "kv_cache_mb", "max_num_seqs", "max_tokens_per_step", "default_max_tokens"):
            _positive(f"model.{name}", getattr(self, name))


@dataclass
class AdaptersConfig:
    dir: str = str(DEFAULT_STATE_DIR / "adapters")
    slots: int = 8
    max_rank: int = 64
    aliases: dict[str, str] = field(default_factory=dict)
    # LoadAdapter with a local path (admin) reads only below these folders; empty = `dir` alone
    roots: list[str] = field(default_factory=list)

    def validate(self) -> None:
        _positive("adapters.slots", self.slots)
        _positive("adapters.max_rank", self.max_rank)
        for alias in self.aliases:
            if alias.isdigit():
                raise ConfigError(f"adapter alias {alias!r} is all digits and would shadow an on-chain id")


@dataclass
class ChainConfig:
    deployment: str = str(DEFAULT_STATE_DIR / "devnet" / "deployment.json")
    rpc_url: str = ""  # empty: the rpc_url written in deployment.json
    key_env: str = "LORALEDGER_OPERATOR_KEY"  # env var holding the operator's hex key
    key_file: str = ""  # or an encrypted keystore file
    password_env: str = "LORALEDGER_KEY_PASSWORD"
    confirmations: int = -1  # blocks on top of an epoch's receipt before it counts; -1: 0 on dev chains, else 2

    def validate(self) -> None:
        if self.confirmations < -1:
            raise ConfigError(f"chain.confirmations must be >= 0 (or -1: automatic), got {self.confirmations}")

    def confirmations_for(self, chain_id: int) -> int:
        """`confirmations`, or when automatic (-1): 0 on local dev chains (31337, 1337), 2 elsewhere."""
        if self.confirmations >= 0:
            return self.confirmations
        return 0 if chain_id in DEV_CHAIN_IDS else 2


@dataclass
class RecordsConfig:
    path: str = str(DEFAULT_STATE_DIR / "records.sqlite")
    postgres_dsn: str = ""

    def validate(self) -> None:
        return None


@dataclass
class SettlementConfig:
    enabled: bool = True
    epoch_seconds: float = 300.0
    epoch_records: int = 10_000
    push_threshold: int = 0  # push claims after each epoch to accounts owed more than this (0 = off)
    # a fleet on one PostgreSQL log ([records] postgres_dsn): this node's name in it ("" = HOSTNAME:GRPC_PORT),
    # and how often a standby tries to take the settler role (bounds the failover time)
    node_name: str = ""
    role_poll_seconds: float = 2.0
    # where mirrors keep each epoch's canonical export (`loraledger audit` fetches it there): a file path or
    # file:// / http(s):// URI with {chainId}, {ledger}, {operator} and {epoch} ("" = none published)
    export_uri: str = ""

    def validate(self) -> None:
        if self.export_uri and "{epoch}" not in self.export_uri:
            raise ConfigError(f"settlement.export_uri {self.export_uri!r} must contain {{epoch}} (one file per epoch)")
        if len(self.node_name) > 40:
            raise ConfigError(f"settlement.node_name must be at most 40 characters, got {len(self.node_name)}")
        if self.role_poll_seconds <= 0:
            raise ConfigError(f"settlement.role_poll_seconds must be > 0, got {self.role_poll_seconds}")
        if self.epoch_seconds <= 0:
            raise ConfigError(f"settlement.epoch_seconds must be > 0, got {self.epoch_seconds}")
        _positive("settlement.epoch_records", self.epoch_records)
        if self.push_threshold < 0:
            raise ConfigError("settlement.push_threshold must be >= 0")


@dataclass
class AttributionConfig:
    token_level_lambda: float = 0.0
    min_match: int = 4
    workers: int = 2

    def validate(self) -> None:
        if not 0.0 <= self.token_level_lambda <= 1.0:
            raise ConfigError(f"attribution.token_level_lambda must be in [0, 1], got {self.token_level_lambda}")
        _positive("attribution.min_match", self.min_match)
        _positive("attribution.workers", self.workers)


@dataclass
class NodeConfig:
    server: ServerConfig = field(default_factory=ServerConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    model: ModelConfigSection = field(default_factory=ModelConfigSection)
    adapters: AdaptersConfig = field(default_factory=AdaptersConfig)
    chain: ChainConfig = field(default_factory=ChainConfig)
    records: RecordsConfig = field(default_factory=RecordsConfig)
    settlement: SettlementConfig = field(default_factory=SettlementConfig)
    attribution: AttributionConfig = field(default_factory=AttributionConfig)

    def validate(self) -> NodeConfig:
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _positive(name: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{name} must be > 0, got {value}")


def _coerce(section: str, key: str, current: Any, value: Any, source: str) -> Any:
    """Convert `value` (from TOML, env or CLI) to the type of the default `current`."""
    where = f"{section}.{key} (from {source})"
    if isinstance(current, bool):
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{where} must be a boolean (true/false), got {value!r}")
    if isinstance(current, int):
        try:
            return int(value)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where} must be an integer, got {value!r}") from e
    if isinstance(current, float):
        try:
            return float(value)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where} must be a number, got {value!r}") from e
    if isinstance(current, list):
        items = value if isinstance(value, list) else [v for v in str(value).split(",") if v.strip()]
        return [str(v).strip() for v in items]
    if isinstance(current, dict):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a table of name = value")
        return {str(k): str(v) for k, v in value.items()}
    return str(value)


def _apply(cfg: NodeConfig, updates: Mapping[str, Mapping[str, Any]], source: str) -> None:
    sections = {f.name for f in dataclasses.fields(cfg)}
    for section, values in updates.items():
        if section not in sections:
            raise ConfigError(f"unknown config section [{section}] in {source}; known: {sorted(sections)}")
        if not isinstance(values, Mapping):
            raise ConfigError(f"[{section}] in {source} must be a table")
        target = getattr(cfg, section)
        known = {f.name for f in dataclasses.fields(target)}
        for key, value in values.items():
            if key not in known:
                raise ConfigError(f"unknown key {section}.{key} in {source}; known: {sorted(known)}")
            setattr(target, key, _coerce(section, key, getattr(target, key), value, source))


def _env_overrides(cfg: NodeConfig, environ: Mapping[str, str]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for f in dataclasses.fields(cfg):
        for g in dataclasses.fields(getattr(cfg, f.name)):
            name = f"LORALEDGER_{f.name.upper()}_{g.name.upper()}"
            if name in environ and g.name != "aliases":
                out.setdefault(f.name, {})[g.name] = environ[name]
    return out


# Keys whose values are file-system paths: in a TOML file they are relative to the file's folder (not the current
# directory), so a node.toml can sit beside what it names and be used from anywhere. Values from the environment
# or the command line stay relative to the current directory. `settlement.export_uri` counts when it is a plain
# path (no scheme); `adapters.aliases` maps names to paths; `adapters.roots` is a list of paths.
PATH_KEYS: dict[str, tuple[str, ...]] = {
    "auth": ("keys_file",),
    "tls": ("cert_file", "key_file", "client_ca_file"),
    "model": ("dir",),
    "adapters": ("dir", "roots", "aliases"),
    "chain": ("deployment", "key_file"),
    "records": ("path",),
    "settlement": ("export_uri",),
}


def _relative_to(base: Path, value: Any) -> Any:
    """`value` (a path string, a list of them, or a table of them) resolved against `base`; absolute paths,
    `~` paths, URIs (`scheme://`) and empty strings are left as they are."""
    if isinstance(value, list):
        return [_relative_to(base, v) for v in value]
    if isinstance(value, Mapping):
        return {k: _relative_to(base, v) for k, v in value.items()}
    if not isinstance(value, str) or not value or "://" in value or value.startswith("~"):
        return value
    p = Path(value)
    return value if p.is_absolute() else str(base / p)


def resolve_paths(data: Mapping[str, Any], base: Path) -> dict[str, Any]:
    """A copy of the parsed TOML `data` whose path-valued keys (PATH_KEYS) are resolved against `base`."""
    out: dict[str, Any] = {}
    for section, values in data.items():
        keys = PATH_KEYS.get(section, ())
        if isinstance(values, Mapping) and keys:
            values = {k: (_relative_to(base, v) if k in keys else v) for k, v in values.items()}
        out[section] = values
    return out


def load_config(
    path: str | Path | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    environ: Mapping[str, str] | None = None,
) -> NodeConfig:
    """Build the validated config: defaults < TOML file < env vars < `overrides` (CLI flags).

    Paths in the TOML file (PATH_KEYS) are relative to the file's folder, not to the current directory."""
    cfg = NodeConfig()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} not found; pass --config PATH or omit it to use the defaults")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {p} is not valid TOML: {e}") from e
        _apply(cfg, resolve_paths(data, p.resolve().parent), str(p))
    env = os.environ if environ is None else environ
    _apply(cfg, _env_overrides(cfg, env), "environment")
    if cfg.chain.deployment == ChainConfig.deployment:
        # Not named by the TOML or LORALEDGER_CHAIN_DEPLOYMENT: $LORALEDGER_DEPLOYMENT, then ./deployment.json
        # (what `loraledger deploy` writes), then the devnet's record.
        if env.get(DEPLOYMENT_ENV):
            cfg.chain.deployment = env[DEPLOYMENT_ENV]
        elif Path(DEPLOYMENT_FILE).is_file():
            cfg.chain.deployment = DEPLOYMENT_FILE
    if overrides:
        cleaned = {s: {k: v for k, v in kv.items() if v is not None} for s, kv in overrides.items()}
        _apply(cfg, cleaned, "command line")
    return cfg.validate()
