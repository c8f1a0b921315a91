"""Fixtures of the fleet tests: one throw-away PostgreSQL cluster per session (initdb / pg_ctl of the installed
server, on loopback, in a temporary folder), a fresh database per test, and the HAProxy the project's bootstrap
installs (`make deps` -> scripts/fleet/install_haproxy.sh)."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[3]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                        key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    return candidates[-1] if candidates else None


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[str]:
    """The DSN (without database) of a throw-away cluster: `postgresql://loraledger@127.0.0.1:PORT`. Skips only
    when the PostgreSQL server binaries are not installed; any other failure to start it is an error."""
    pytest.importorskip("psycopg")
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("the PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    prefix: list[str] = []
    base = Path(tempfile.mkdtemp(prefix="loraledger-fleet-pg-"))  # outside pytest's 0700 tree
    if os.geteuid() == 0:  # initdb refuses root: run the cluster as the `postgres` user (or nobody)
        user = "postgres"
        try:
            pw = pwd.getpwnam(user)
        except KeyError:
            user, pw = "nobody", pwd.getpwnam("nobody")
        prefix = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups"]
        os.chown(base, pw.pw_uid, pw.pw_gid)
    data = base / "data"
    port = free_port()

    def run(*cmd: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*prefix, *cmd], capture_output=True, text=True, timeout=120, check=False, cwd=base)

    res = run(initdb, "-D", str(data), "-A", "trust", "-U", "loraledger", "--no-sync")
    assert res.returncode == 0, f"initdb failed: {res.stdout[-800:]} {res.stderr[-800:]}"
    opts = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
    res = run(pg_ctl, "-D", str(data), "-o", opts, "-l", str(base / "pg.log"), "-w", "start")
    log = (base / "pg.log").read_text()[-800:] if (base / "pg.log").exists() else ""
    assert res.returncode == 0, f"pg_ctl start failed: {res.stderr[-800:]} {log}"
    try:
        yield f"postgresql://loraledger@127.0.0.1:{port}"
    finally:
        run(pg_ctl, "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def fresh_db(pg_cluster: str) -> Callable[[], str]:
    """`fresh_db()` -> the DSN of a new, empty database on the session cluster."""
    import psycopg

    def make() -> str:
        name = "fleet_" + uuid.uuid4().hex[:12]
        with psycopg.connect(f"{pg_cluster}/postgres", autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return f"{pg_cluster}/{name}"

    return make


@pytest.fixture(scope="session")
def haproxy_bin() -> str:
    """The HAProxy binary: the one the bootstrap unpacked under .tools/ (`make deps`), else one on PATH."""
    local = REPO_ROOT / ".tools" / "bin" / "haproxy"
    if local.is_file():
        return str(local)
    found = shutil.which("haproxy")
    assert found, ("no HAProxy: `make deps` installs it under .tools/ (scripts/fleet/install_haproxy.sh); run "
                   "`make deps` or that script")
    return found
