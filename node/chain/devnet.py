"""The local EVM devnet: an anvil process on loopback, started, found again and stopped by its state dir.

    state_dir/
        anvil.pid     the process id (also its process-group id: anvil runs in a session of its own)
        anvil.json    {"pid", "rpc_url", "port", "chain_id", "host"}: how another process finds this devnet
        anvil.log     anvil's stdout and stderr

`Anvil(...)` is a context manager for a child that lives as long as its owner (tests); `start(detach=True)`
leaves it running after the starting process exits (`loraledger devnet up`), and `Anvil.attach(state_dir)`
plus `stop()` bring it down later from another process.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from loraledger.node.errors import DevnetError

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
DEFAULT_CHAIN_ID = 31337
PID_FILE = "anvil.pid"
INFO_FILE = "anvil.json"
LOG_FILE = "anvil.log"

# Where the npm package `@foundry-rs/anvil` puts things, relative to the repository root. The native binary is
# preferred over the Node wrapper in `.bin`, so that the pid we hold is anvil itself.
_NATIVE_GLOB = "node_modules/@foundry-rs/anvil-*/bin/anvil"
_NPM_WRAPPER = "node_modules/.bin/anvil"


def repo_root() -> Path:
    """The repository root: the parent of the `node` package directory."""
    return Path(__file__).resolve().parents[2]


def find_anvil(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Locate the anvil executable.

    Order: `explicit` path (must exist) -> native binary from `node_modules/@foundry-rs/anvil-<platform>` ->
    `node_modules/.bin/anvil` -> `anvil` on PATH. Raises DevnetError naming what to do when none exists.
    """
    if explicit is not None:
        path = Path(explicit)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise DevnetError(f"anvil binary {path} does not exist or is not executable")
        return path
    root = repo_root()
    for candidate in sorted(root.glob(_NATIVE_GLOB)):
        if os.access(candidate, os.X_OK):
            return candidate
    wrapper = root / _NPM_WRAPPER
    if wrapper.exists() and os.access(wrapper, os.X_OK):
        return wrapper
    on_path = shutil.which("anvil")
    if on_path:
        return Path(on_path)
    raise DevnetError(
        f"anvil not found (looked in {root / _NATIVE_GLOB}, {wrapper} and PATH); "
        "run `make deps` (npm ci installs @foundry-rs/anvil) or pass the binary path explicitly"
    )


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port on `host` that was free a moment ago (bind to port 0, read it back, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _die_with_parent_hook() -> Callable[[], None] | None:
    """A pre-exec hook (Linux) that asks the kernel to SIGTERM the child when its parent dies, so an attached
    anvil never outlives a killed test run; None elsewhere. libc is resolved here, in the parent, so the
    child between fork and exec only makes the one prctl system call."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    pr_set_pdeathsig = 1

    def hook() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGTERM))

    return hook


def _port_free(host: str, port: int) -> bool:
    """True when nothing listens on host:port (a bind without SO_REUSEADDR semantics beyond TIME_WAIT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def rpc_call(rpc_url: str, method: str, params: list[object] | None = None, timeout: float = 2.0) -> object:
    """One JSON-RPC request over HTTP, without web3: `POST {"method", "params"}` -> `result`.

    Raises DevnetError on an RPC error object, OSError/URLError when nothing answers.
    """
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params or []}).encode()
    req = urllib.request.Request(rpc_url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        reply = json.loads(resp.read())
    if "error" in reply:
        raise DevnetError(f"{method} at {rpc_url} failed: {reply['error']}")
    return reply["result"]


def pid_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie; reaps it when it is our own exited child."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    except ChildProcessError:
        pass  # not our child: fall through to the signal-0 probe
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    if stat.exists():
        try:
            state = stat.read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return True
        return state != "Z"
    return True


def _is_anvil_process(pid: int) -> bool:
    """Best-effort guard against a recycled pid: the command line of `pid` mentions anvil (True if unknown)."""
    cmdline = Path(f"/proc/{pid}/cmdline")
    if not cmdline.exists():
        return True
    try:
        return b"anvil" in cmdline.read_bytes()
    except OSError:
        return True


@dataclass(frozen=True)
class DevnetInfo:
    """What `anvil.json` records about a running devnet."""

    pid: int
    rpc_url: str
    port: int
    chain_id: int
    host: str = LOOPBACK

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DevnetInfo:
        d = json.loads(text)
        return cls(pid=int(d["pid"]), rpc_url=str(d["rpc_url"]), port=int(d["port"]),
                   chain_id=int(d["chain_id"]), host=str(d.get("host", LOOPBACK)))


class Anvil:
    """One anvil devnet process bound to loopback.

    Args:
        state_dir: where the pid, info and log files go (created if missing).
        port: TCP port; 0 or None picks a free one.
        chain_id: EIP-155 chain id.
        block_time: seconds per block; None mines one block per transaction (instant).
        accounts: number of funded dev accounts (anvil's default mnemonic, so keys are the well-known ones).
        balance_eth: balance of each dev account, in ether.
        binary: explicit anvil path; else see `find_anvil`.
        startup_timeout: seconds to wait for `eth_chainId` to answer.
    """

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        *,
        port: int | None = None,
        chain_id: int = DEFAULT_CHAIN_ID,
        block_time: float | None = None,
        accounts: int = 10,
        balance_eth: int = 10_000,
        binary: str | os.PathLike[str] | None = None,
        startup_timeout: float = 30.0,
    ) -> None:
        if chain_id <= 0:
            raise DevnetError(f"chain id must be positive, got {chain_id}")
        if accounts < 1:
            raise DevnetError(f"need at least one dev account, got {accounts}")
        if block_time is not None and block_time <= 0:
            raise DevnetError(f"block time must be positive seconds or None (instant mining), got {block_time}")
        if port is not None and not 0 <= port < 65536:
            raise DevnetError(f"port must be in 0..65535, got {port}")
        self.state_dir = Path(state_dir)
        self.requested_port = port or 0
        self.chain_id = chain_id
        self.block_time = block_time
        self.accounts = accounts
        self.balance_eth = balance_eth
        self.binary = binary
        self.startup_timeout = startup_timeout
        self.host = LOOPBACK
        self.port: int | None = None
        self.pid: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    # ----- paths and addresses

    @property
    def pid_file(self) -> Path:
        return self.state_dir / PID_FILE

    @property
    def info_file(self) -> Path:
        return self.state_dir / INFO_FILE

    @property
    def log_file(self) -> Path:
        return self.state_dir / LOG_FILE

    @property
    def rpc_url(self) -> str:
        if self.port is None:
            raise DevnetError("anvil has not been started; call start() first")
        return f"http://{self.host}:{self.port}"

    # ----- lifecycle

    def start(self, *, detach: bool = False) -> Anvil:
        """Spawn anvil in its own session (process group), wait for `eth_chainId`, write pid/info files.

        detach=True: the process is meant to outlive this one (nothing here stops it at exit).
        detach=False (Linux): the kernel SIGTERMs anvil when the thread that started it dies, so start an
        attached devnet from a long-lived thread (the main thread, a session fixture).
        A random port that was taken between probing and binding is retried twice with a new port.
        """
        if self.pid is not None and self.is_running():
            raise DevnetError(f"anvil already running (pid {self.pid}) at {self.rpc_url}")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        binary = find_anvil(self.binary)
        attempts = 1 if self.requested_port else 3
        last_error: DevnetError | None = None
        for _ in range(attempts):
            port = self.requested_port or free_port(self.host)
            try:
                self._spawn(binary, port, detach=detach)
                return self
            except DevnetError as e:
                last_error = e
                if "in use" not in str(e).lower():
                    raise
        assert last_error is not None
        raise last_error

    def _spawn(self, binary: Path, port: int, *, detach: bool) -> None:
        argv = [
            str(binary),
            "--host", self.host,
            "--port", str(port),
            "--chain-id", str(self.chain_id),
            "--accounts", str(self.accounts),
            "--balance", str(self.balance_eth),
        ]
        if self.block_time is not None:
            argv += ["--block-time", f"{self.block_time:g}"]
        log.debug("starting %s", " ".join(argv))
        if not _port_free(self.host, port):
            raise DevnetError(f"port {port} on {self.host} is already in use; pick another --port (0: a free one)")
        with open(self.log_file, "ab") as logf:
            logf.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n".encode())
            logf.flush()
            self._log_offset = logf.tell()
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: survives the CLI, and killpg reaches wrappers too
                close_fds=True,
                # Only a single prctl call runs in the child (see _die_with_parent_hook), so it is fork-safe.
                preexec_fn=None if detach else _die_with_parent_hook(),  # noqa: PLW1509
            )
        self.pid = self._proc.pid
        self.port = port
        try:
            self._wait_ready()
        except DevnetError:
            self._terminate(timeout=5.0)
            self.pid = None
            self.port = None
            raise
        self.pid_file.write_text(f"{self.pid}\n")
        info = DevnetInfo(pid=self.pid, rpc_url=self.rpc_url, port=port, chain_id=self.chain_id, host=self.host)
        self.info_file.write_text(info.to_json() + "\n")
        if detach:
            # Forget the handle so Popen's finalizer never waits on it; the process belongs to its session.
            self._proc = None
        log.info("anvil pid %d listening at %s (chain id %d)", self.pid, self.rpc_url, self.chain_id)

    def _listening(self) -> bool:
        """True once this run's part of the log has anvil's "Listening on host:port" line (it bound the port)."""
        with open(self.log_file, "rb") as f:
            f.seek(self._log_offset)
            return f"Listening on {self.host}:{self.port}".encode() in f.read()

    def _wait_ready(self) -> None:
        """Wait until our own anvil logged that it listens and `eth_chainId` answers this chain id.

        Raises with the log tail if anvil exits first or the timeout passes. Checking our log (not only the
        port) keeps another node that holds the port from passing for ours.
        """
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self._proc is not None and self._proc.poll() is not None:
                raise DevnetError(
                    f"anvil exited with code {self._proc.returncode} before answering; "
                    f"log {self.log_file}:\n{self.log_tail()}"
                )
            if not self._listening():
                if time.monotonic() > deadline:
                    raise DevnetError(
                        f"anvil did not start listening on {self.rpc_url} within {self.startup_timeout:g}s; "
                        f"log {self.log_file}:\n{self.log_tail()}"
                    )
                time.sleep(0.05)
                continue
            try:
                got = rpc_call(self.rpc_url, "eth_chainId", timeout=1.0)
                if int(str(got), 16) != self.chain_id:
                    raise DevnetError(
                        f"{self.rpc_url} answered chain id {got}, expected {self.chain_id}: "
                        "another node holds this port; pick another --port"
                    )
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise DevnetError(
                    f"anvil did not answer eth_chainId at {self.rpc_url} within {self.startup_timeout:g}s; "
                    f"log {self.log_file}:\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def is_running(self) -> bool:
        """True while the anvil process is alive (not necessarily answering)."""
        return self.pid is not None and pid_alive(self.pid)

    def is_answering(self) -> bool:
        """True when the RPC answers `eth_chainId` with this devnet's chain id."""
        if self.port is None:
            return False
        try:
            return int(str(rpc_call(self.rpc_url, "eth_chainId", timeout=1.0)), 16) == self.chain_id
        except (urllib.error.URLError, ConnectionError, TimeoutError, DevnetError):
            return False

    def stop(self, timeout: float = 10.0) -> bool:
        """SIGTERM the process group, SIGKILL after `timeout` s; remove pid/info files. False if not running."""
        was_running = self.is_running()
        if was_running:
            self._terminate(timeout)
            log.info("anvil pid %s stopped", self.pid)
        for f in (self.pid_file, self.info_file):
            f.unlink(missing_ok=True)
        self.pid = None
        self._proc = None
        return was_running

    def _terminate(self, timeout: float) -> None:
        pid = self.pid
        if pid is None:
            return
        if not _is_anvil_process(pid):
            raise DevnetError(
                f"pid {pid} from {self.pid_file} is not an anvil process (stale pid file?); "
                f"remove {self.pid_file} and {self.info_file} by hand"
            )
        for sig, wait_s in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                break
            except PermissionError:
                os.kill(pid, sig)
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                if self._proc is not None and self._proc.poll() is not None:
                    return
                if self._proc is None and not pid_alive(pid):
                    return
                time.sleep(0.05)
        if pid_alive(pid):
            raise DevnetError(f"anvil pid {pid} did not stop after SIGTERM and SIGKILL")

    def log_tail(self, lines: int = 20) -> str:
        """The last `lines` lines of anvil's log ('' if none yet)."""
        if not self.log_file.exists():
            return ""
        return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])

    # ----- finding a running devnet from another process

    @classmethod
    def attach(cls, state_dir: str | os.PathLike[str]) -> Anvil | None:
        """The devnet recorded in `state_dir/anvil.json` if its process is still alive, else None.

        A stale record (process gone) is removed.
        """
        state = Path(state_dir)
        info_path = state / INFO_FILE
        if not info_path.exists():
            return None
        try:
            info = DevnetInfo.from_json(info_path.read_text())
        except (ValueError, KeyError) as e:
            raise DevnetError(f"{info_path} is malformed ({e}); delete it and run `loraledger devnet up`") from e
        anvil = cls(state, port=info.port, chain_id=info.chain_id)
        anvil.port = info.port
        anvil.pid = info.pid
        anvil.host = info.host
        if not anvil.is_running() or not _is_anvil_process(info.pid):
            log.info("removing stale devnet record %s (pid %d is gone)", info_path, info.pid)
            for f in (state / PID_FILE, info_path):
                f.unlink(missing_ok=True)
            return None
        return anvil

    def __enter__(self) -> Self:
        if self.pid is None:
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.rpc_url if self.port is not None else "not started"
        return f"Anvil(pid={self.pid}, {where}, chain_id={self.chain_id}, state_dir={str(self.state_dir)!r})"
