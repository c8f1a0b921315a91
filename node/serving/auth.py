"""Who may call what: API keys with scopes, rate limits per key, and the rule that keeps a public node closed.

    loraledger apikey create --name app1 --scope infer --account 0x… --rpm 600 --tpm 200000   # prints the key once
    Authorization: Bearer llk_…            (HTTP header; gRPC metadata `authorization`)

Keys file (`[auth] keys_file`, JSON, written atomically with mode 0600): only the sha256 of each key is kept.

    {"version": 1, "keys": [{"name", "sha256", "scope", "account", "rpm", "tpm", "created_at", "revoked_at"}]}

Scopes: `infer` (generation, adapter and attribution reads) and `admin` (LoadAdapter, UnloadAdapter; implies
infer). The file is re-read when it changes (size, mtime or inode differ), checked on every call: a revoked key
stops working on its next request, with no restart. Health (and, unless `[auth] metrics = "keyed"`, metrics)
stay open.

Enforcement (`[auth] mode`):
    "auto"  keys are required when the keys file holds at least one key; otherwise the node is open
    "keys"  keys are required (the node refuses to start without a keys file holding a key)
    "none"  the node is open, on any address, because the operator said so
A listener on a non-loopback address with no keys in force refuses to start unless mode = "none".

Rate limits (per key, sliding 60 s windows): `rpm` requests and `tpm` tokens (prompt + completion, counted when
a request ends). Over either, the request is refused with the seconds until the window has room.
"""

from __future__ import annotations

import collections
import hashlib
import ipaddress
import json
import os
import secrets
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from loraledger.inference.errors import CapacityError
from loraledger.node.errors import AuthenticationError, ConfigError, PermissionDeniedError
from loraledger.node.types import as_address

SCOPES = ("infer", "admin")
AUTH_MODES = ("auto", "keys", "none")
KEY_PREFIX = "llk_"
WINDOW_S = 60.0


class RateLimitedError(CapacityError):
    """A key went over its requests or tokens per minute; RESOURCE_EXHAUSTED / HTTP 429 after `retry_after` s."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class ApiKey:
    """One key as the keys file holds it (never the key itself)."""

    name: str
    sha256: str
    scope: str
    account: str = ""  # the client account every record made with this key names ("" = none)
    rpm: int = 0  # requests per minute (0 = unlimited)
    tpm: int = 0  # tokens per minute (0 = unlimited)
    created_at: float = 0.0
    revoked_at: float | None = None

    def allows(self, scope: str) -> bool:
        return self.scope == "admin" or self.scope == scope


@dataclass(frozen=True)
class Principal:
    """Who a request comes from: the key it used (None on an open node) and the account it is bound to."""

    key: ApiKey | None = None

    @property
    def account(self) -> str:
        return self.key.account if self.key is not None else ""


OPEN = Principal()


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class KeyStore:
    """The keys file: create, list and revoke keys (the CLI), and look a presented key up (the node)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._sig: tuple[int, int, int] | None = None
        self._keys: dict[str, ApiKey] = {}  # sha256 -> key
        self._active = 0

    # ---- reading -------------------------------------------------------------------------------------------
    def _signature(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _read(self) -> list[ApiKey]:
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
            return [ApiKey(**k) for k in doc["keys"]]
        except FileNotFoundError:
            return []
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"keys file {self.path} is unreadable or malformed ({e}); fix it or create keys "
                              "with `loraledger apikey create`") from e

    def refresh(self) -> None:
        """Re-read the file when it changed since the last read (one stat when it did not)."""
        sig = self._signature()
        with self._lock:
            if sig != self._sig:
                self._keys = {k.sha256: k for k in self._read()}
                self._active = sum(1 for k in self._keys.values() if k.revoked_at is None)
                self._sig = sig

    def keys(self) -> list[ApiKey]:
        """Every key in the file, revoked ones included."""
        self.refresh()
        with self._lock:
            return list(self._keys.values())

    def active_count(self, refresh: bool = True) -> int:
        if refresh:
            self.refresh()
        return self._active

    def lookup(self, presented: str, refresh: bool = True) -> ApiKey:
        """The key `presented` (the bearer token), or AuthenticationError saying why it is refused."""
        if refresh:
            self.refresh()
        with self._lock:
            key = self._keys.get(key_hash(presented))
        if key is None:
            raise AuthenticationError("the API key is not valid on this node; check it, or ask the operator for one "
                                      "(`loraledger apikey create`)")
        if key.revoked_at is not None:
            raise AuthenticationError(f"the API key {key.name!r} was revoked; ask the operator for a new one")
        return key

    # ---- writing (the CLI) ---------------------------------------------------------------------------------
    def _write(self, keys: list[ApiKey]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        doc = {"version": 1, "keys": [asdict(k) for k in keys]}
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def create(self, name: str, scope: str, account: str = "", rpm: int = 0, tpm: int = 0) -> tuple[str, ApiKey]:
        """A new key: returns (the key, shown once, and its stored record)."""
        if not name or any(c.isspace() for c in name):
            raise ConfigError(f"key name {name!r}: give a non-empty name without spaces")
        if scope not in SCOPES:
            raise ConfigError(f"scope {scope!r}: choose one of {', '.join(SCOPES)}")
        if rpm < 0 or tpm < 0:
            raise ConfigError("--rpm and --tpm must be >= 0 (0 = unlimited)")
        bound = str(as_address(account)) if account else ""
        keys = self._read()
        if any(k.name == name for k in keys):
            raise ConfigError(f"a key named {name!r} exists already; pick another name or revoke it first")
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        record = ApiKey(name, key_hash(secret), scope, bound, rpm, tpm, time.time())
        self._write([*keys, record])
        return secret, record

    def revoke(self, name: str) -> ApiKey:
        keys = self._read()
        for i, k in enumerate(keys):
            if k.name == name:
                if k.revoked_at is None:
                    keys[i] = replace(k, revoked_at=time.time())
                    self._write(keys)
                return keys[i]
        raise ConfigError(f"no key named {name!r} in {self.path}; `loraledger apikey list` shows them")


@dataclass
class _Usage:
    requests: collections.deque[float] = field(default_factory=collections.deque)
    tokens: collections.deque[tuple[float, int]] = field(default_factory=collections.deque)
    token_sum: int = 0


class RateLimiter:
    """Sliding 60 s windows of requests and tokens per key (module docstring). Thread-safe."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._usage: dict[str, _Usage] = {}

    def _pruned(self, name: str, now: float) -> _Usage:
        u = self._usage.setdefault(name, _Usage())
        while u.requests and now - u.requests[0] >= WINDOW_S:
            u.requests.popleft()
        while u.tokens and now - u.tokens[0][0] >= WINDOW_S:
            u.token_sum -= u.tokens.popleft()[1]
        return u

    def admit(self, key: ApiKey) -> None:
        """Count one request of `key`, or RateLimitedError with the seconds until there is room."""
        if not key.rpm and not key.tpm:
            return
        now = self._clock()
        with self._lock:
            u = self._pruned(key.name, now)
            if key.rpm and len(u.requests) >= key.rpm:
                wait = WINDOW_S - (now - u.requests[0])
                raise RateLimitedError(f"key {key.name!r} is over its {key.rpm} requests per minute; retry in "
                                       f"{wait:.1f} s", wait)
            if key.tpm and u.token_sum >= key.tpm:
                wait = WINDOW_S - (now - u.tokens[0][0])
                raise RateLimitedError(f"key {key.name!r} is over its {key.tpm} tokens per minute; retry in "
                                       f"{wait:.1f} s", wait)
            u.requests.append(now)

    def spent(self, key: ApiKey, tokens: int) -> None:
        """A request of `key` ended having used `tokens` (prompt + completion)."""
        if not key.tpm or tokens <= 0:
            return
        now = self._clock()
        with self._lock:
            u = self._pruned(key.name, now)
            u.tokens.append((now, tokens))
            u.token_sum += tokens


def is_loopback(listen: str) -> bool:
    """Whether HOST:PORT binds only the loopback interface."""
    host = listen.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Authorizer:
    """Checks each call's bearer key against the keys file (when keys are in force) and its rate limits."""

    def __init__(self, mode: str, keys: KeyStore | None, limiter: RateLimiter | None = None) -> None:
        if mode not in AUTH_MODES:
            raise ConfigError(f"auth.mode {mode!r}: choose one of {', '.join(AUTH_MODES)}")
        self.mode = mode
        self.keys = keys
        self.limiter = limiter or RateLimiter()

    @property
    def enforcing(self) -> bool:
        """Whether keys are required now (re-reads a changed keys file)."""
        if self.mode == "none" or self.keys is None:
            return False
        active = self.keys.active_count()  # refreshes the file in every mode but "none"
        return self.mode == "keys" or active > 0

    def check_startup(self, listens: dict[str, str]) -> None:
        """Refuse to start a node that would serve a non-loopback address with no keys in force."""
        if self.mode == "keys" and (self.keys is None or self.keys.active_count() == 0):
            raise ConfigError("auth.mode = \"keys\" but the keys file holds no key; create one with "
                              "`loraledger apikey create --name NAME --scope infer`")
        if self.enforcing or self.mode == "none":
            return
        public = {what: addr for what, addr in listens.items() if addr and not is_loopback(addr)}
        if public:
            shown = ", ".join(f"{w} {a}" for w, a in public.items())
            raise ConfigError(
                f"refusing to serve {shown} without authentication: anyone who reaches it could load adapters "
                "and spend this node's capacity. Create an API key (`loraledger apikey create --name NAME "
                "--scope admin`), or set [auth] mode = \"none\" to serve it open on purpose")

    def authorize(self, bearer: str | None, scope: str) -> Principal:
        """The caller of one request needing `scope`: OPEN when no keys are in force, else its key (rate
        limited), or AuthenticationError / PermissionDeniedError / RateLimitedError."""
        if not self.enforcing:  # the keys file was checked for changes here, once per call
            return OPEN
        assert self.keys is not None
        if not bearer:
            raise AuthenticationError("this node requires an API key: send `Authorization: Bearer KEY` (HTTP "
                                      "header, or gRPC metadata `authorization`)")
        key = self.keys.lookup(bearer, refresh=False)
        if not key.allows(scope):
            raise PermissionDeniedError(f"the API key {key.name!r} has scope {key.scope!r}; this call needs "
                                        f"{scope!r}")
        self.limiter.admit(key)
        return Principal(key)

    def spent(self, principal: Principal, tokens: int) -> None:
        if principal.key is not None:
            self.limiter.spent(principal.key, tokens)


def bearer_token(value: str | None) -> str | None:
    """The key of an `Authorization: Bearer KEY` value (None when absent or another scheme)."""
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None
