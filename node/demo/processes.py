"""The demo's node process: started detached, found again by its pid file, checked for health, stopped.

    STATE/node.toml   its config        STATE/node.pid   its pid        STATE/node.log   its output

A pid counts as the demo's node only while that process still runs `node run` on STATE/node.toml, so a
recycled pid is never signalled.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from loraledger.node.chain.devnet import pid_alive
from loraledger.node.chain.keys import ANVIL_DEV_KEYS, DEV_OPERATOR
from loraledger.node.errors import NodeError

NODE_CONFIG, NODE_PID, NODE_LOG = "node.toml", "node.pid", "node.log"  # in the state dir


def running_node_pid(state_dir: Path) -> int | None:
    """The pid in STATE/node.pid when that process still runs `node run` on STATE/node.toml; else None (a
    stale pid file is removed)."""
    pid_file = state_dir / NODE_PID
    if not pid_file.is_file():
        return None
    try:
        pid = int(pid_file.read_text().strip())
    except ValueError:
        pid_file.unlink()
        return None
    cmdline = Path(f"/proc/{pid}/cmdline")
    ours = True
    if cmdline.exists():
        try:
            ours = str(state_dir / NODE_CONFIG).encode() in cmdline.read_bytes()
        except OSError:
            ours = True
    if pid_alive(pid) and ours:
        return pid
    pid_file.unlink(missing_ok=True)
    return None


def health_serving(address: str, timeout: float = 2.0) -> bool:
    """True when the gRPC health service at `address` answers SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as ch:
        try:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError:
            return False
    return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)


def _log_tail(path: Path, lines: int = 25) -> str:
    """The last `lines` lines of a log file, for error messages."""
    if not path.is_file():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def start_node(state_dir: Path, address: str, timeout: float = 180.0) -> int:
    """`loraledger node run --config STATE/node.toml` as a detached process (its own session; output appended
    to STATE/node.log; operator key = anvil's dev key 1 in $LORALEDGER_OPERATOR_KEY); waits until health says
    SERVING at `address`. Returns the pid (also written to STATE/node.pid)."""
    log_path = state_dir / NODE_LOG
    env = {**os.environ, OPERATOR_KEY_ENV: ANVIL_DEV_KEYS[DEV_OPERATOR], "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "loraledger.node.cli", "node", "run", "--config", str(state_dir / NODE_CONFIG)]
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, cwd=Path(__file__).resolve().parents[2])
    (state_dir / NODE_PID).write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            (state_dir / NODE_PID).unlink(missing_ok=True)
            raise DemoError(f"the node exited with code {proc.returncode} before serving; {log_path} ends:\n"
                            f"{_log_tail(log_path)}")
        if health_serving(address):
            return proc.pid
        time.sleep(0.3)
    stop_node(state_dir)
    raise DemoError(f"the node did not report SERVING at {address} within {timeout:.0f}s; {log_path} ends:\n"
                    f"{_log_tail(log_path)}")


def stop_node(state_dir: Path, timeout: float = 30.0) -> bool:
    """SIGTERM the node of STATE/node.pid (it drains, then exits), SIGKILL after `timeout` s. False when none
    ran."""
    pid = running_node_pid(state_dir)
    if pid is None:
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if pid_alive(pid):
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if pid_alive(pid):
            raise DemoError(f"node pid {pid} did not stop after SIGTERM and SIGKILL")
    (state_dir / NODE_PID).unlink(missing_ok=True)
    return True


def configured_port(path: Path, section: str = "server") -> int | None:
    """The port of `section`.listen (server: gRPC, http: the HTTP API) in an existing node.toml, if any."""
    import tomllib

    if not path.is_file():
        return None
    try:
        listen = str(tomllib.loads(path.read_text())[section]["listen"])
        return int(listen.rpartition(":")[2])
    except (tomllib.TOMLDecodeError, KeyError, ValueError):
        return None


OPERATOR_KEY_ENV = "LORALEDGER_OPERATOR_KEY"


class DemoError(NodeError, RuntimeError):
    """A demo stage could not do its part; the message says which and what to look at."""
