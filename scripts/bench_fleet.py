"""Benchmark: a fleet of CPU nodes behind HAProxy (scripts/fleet/) against one node, and the settler's failover.

Throughput. The tiny random model and `--adapters` local adapters (aliases), the same on every node; closed-loop
clients (`--clients` threads, each one gRPC channel) send Generate calls for `--seconds`, request i naming adapter
i % A in the routing header. Configurations, in one run:

    baseline   one node, clients connected to it directly
    fleet-N    N = 1, 2, 3 nodes behind the proxy (consistent hash on the adapter header)

    throughput = generated tokens / wall time;  scaling = fleet-N / baseline (mean of a run before and after)

Each node runs with `--threads` torch threads. On a machine with fewer cores than nodes x threads the nodes
share cores and the fleet cannot scale; the JSON records the cores so the figure is read with them.

Failover. A holder of the settler role (SettlerRole on a throw-away PostgreSQL, the object the node's settlement
loop is gated by) in its own process is killed with SIGKILL while two standbys poll at `role_poll_seconds`; the
time until one holds the role, `--failovers` times, for the default poll of 2 s and for 0.3 s.

    python scripts/bench_fleet.py                          # writes benchmarks/results/fleet_cpu.json
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import pwd
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc
from benchlib import machine_info  # scripts/benchlib.py, beside this script

from loraledger.proto.loraledger.v1 import loraledger_pb2 as pb
from loraledger.proto.loraledger.v1 import loraledger_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
HEADER = "x-loraledger-adapter"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_node(model: Path, aliases: dict[str, Path], work: Path, threads: int) -> tuple[subprocess.Popen[str], str,
                                                                                         str]:
    """A `loraledger node run` (no chain, auth off); returns (process, gRPC address, HTTP host:port)."""
    work.mkdir(parents=True)
    q = lambda p: '"' + str(p) + '"'
    cfg = work / "node.toml"
    cfg.write_text("\n".join([
        "[server]", 'listen = "127.0.0.1:0"', "grace_seconds = 1.0", "max_queue = 1024",
        "[http]", 'listen = "127.0.0.1:0"', "[auth]", 'mode = "none"',
        "[model]", f"dir = {q(model)}", 'device = "cpu"', "max_num_seqs = 64",
        "[adapters]", f"dir = {q(work / 'adapters')}", f"slots = {len(aliases)}", "max_rank = 8",
        "[adapters.aliases]", *[f"{k} = {q(p)}" for k, p in aliases.items()],
        "[chain]", f"deployment = {q(work / 'none.json')}", "[records]", f"path = {q(work / 'records.sqlite')}",
        "[settlement]", "enabled = false",
    ]) + "\n")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads),
           "TORCH_NUM_THREADS": str(threads), "LORALEDGER_HTTP_LISTEN": "127.0.0.1:0"}
    proc = subprocess.Popen([sys.executable, "-m", "loraledger.node.cli", "node", "run", "--config", str(cfg)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    grpc_addr = http_addr = ""
    assert proc.stdout is not None
    for line in proc.stdout:
        if "HTTP API on http://" in line:
            http_addr = line.split("http://", 1)[1].split("/", 1)[0]
        if "serving on " in line:
            grpc_addr = line.rsplit(" ", 1)[-1].strip()
        if grpc_addr and http_addr:
            break
    if not grpc_addr:
        raise RuntimeError(f"node did not start (exit {proc.poll()})")
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # type: ignore[union-attr]
    return proc, grpc_addr, http_addr


def load(target: str, keys: list[str], clients: int, seconds: float, max_tokens: int) -> dict[str, float]:
    """Closed-loop Generate calls from `clients` threads for `seconds`: tokens/s and requests/s."""
    stop = time.monotonic() + seconds
    tokens = [0] * clients
    requests = [0] * clients

    def client(c: int) -> None:
        with grpc.insecure_channel(target) as ch:
            stub = pb_grpc.InferenceStub(ch)
            i = c
            while time.monotonic() < stop:
                key = keys[i % len(keys)]
                req = pb.GenerateRequest(prompt=f"request {i}: owls hunt at night", adapters=[
                    pb.AdapterRef(adapter=key)], sampling=pb.SamplingParams(max_tokens=max_tokens))
                r = stub.Generate(req, metadata=[(HEADER, key)], timeout=120)
                tokens[c] += r.usage.completion_tokens
                requests[c] += 1
                i += clients

    t0 = time.monotonic()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    return {"tokens_per_s": round(sum(tokens) / wall, 1), "requests_per_s": round(sum(requests) / wall, 2),
            "requests": sum(requests), "wall_s": round(wall, 2), "load_average_1m": round(os.getloadavg()[0], 2)}


def pg_cluster(base: Path) -> tuple[str, list[str], str]:
    """initdb + pg_ctl start of a throw-away cluster under `base`; (dsn, run prefix, pg_ctl)."""
    def find(name: str) -> str:
        found = shutil.which(name) or (sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or [""])[-1]
        if not found:
            raise SystemExit(f"bench_fleet: no {name} (install the PostgreSQL server package)")
        return found

    initdb, pg_ctl = find("initdb"), find("pg_ctl")
    prefix: list[str] = []
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres") if "postgres" in {p.pw_name for p in pwd.getpwall()} else pwd.getpwnam("nobody")
        prefix = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups"]
        os.chown(base, pw.pw_uid, pw.pw_gid)
    port = free_port()
    run = lambda *c: subprocess.run([*prefix, *c], check=True, capture_output=True, cwd=base, timeout=120)
    run(initdb, "-D", str(base / "data"), "-A", "trust", "-U", "loraledger", "--no-sync")
    run(pg_ctl, "-D", str(base / "data"), "-o", f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off",
        "-l", str(base / "pg.log"), "-w", "start")
    return f"postgresql://loraledger@127.0.0.1:{port}/postgres", prefix, pg_ctl


def failover_times(dsn: str, poll: float, n: int) -> list[float]:
    """kill -9 of a role holder process -> one of two standbys holds the role: seconds, `n` times."""
    from loraledger.node.serving.settler_role import SettlerRole

    out = []
    code = ("import sys, time; from loraledger.node.serving.settler_role import SettlerRole; "
            "r = SettlerRole(sys.argv[1], 'holder', 0.05)\nwhile not r.acquire(): time.sleep(0.05)\n"
            "print('held', flush=True); time.sleep(600)")
    for k in range(n):
        proc = subprocess.Popen([sys.executable, "-c", code, dsn], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        standbys = [SettlerRole(dsn, f"standby{k}-{i}", poll) for i in range(2)]
        for s in standbys:
            assert not s.acquire()
        time.sleep(poll * (k % 3) / 3)  # the kill lands at various points of the standbys' poll cycle
        os.kill(proc.pid, signal.SIGKILL)
        t0 = time.monotonic()
        proc.wait()
        while not any(s.acquire() for s in standbys):
            time.sleep(0.01)
        out.append(time.monotonic() - t0)
        for s in standbys:
            s.release()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--clients", type=int, default=12)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--adapters", type=int, default=6)
    p.add_argument("--threads", type=int, default=1, help="torch threads per node")
    p.add_argument("--failovers", type=int, default=6)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fleet_cpu.json"))
    args = p.parse_args()

    sys.path.insert(0, str(ROOT / "scripts" / "fleet"))
    sys.path.insert(0, str(ROOT / "tests" / "node"))
    from conftest import write_random_adapter  # the test suite's random PEFT adapter writer
    from render_haproxy import FleetNode, render

    from loraledger.inference.tiny import init_tiny

    haproxy = ROOT / ".tools" / "bin" / "haproxy"
    if not haproxy.is_file():
        raise SystemExit("bench_fleet: no .tools/bin/haproxy; run `make deps` (scripts/fleet/install_haproxy.sh)")
    tmp = Path(tempfile.mkdtemp(prefix="loraledger-bench-fleet-"))
    procs: list[subprocess.Popen[Any]] = []
    result: dict[str, Any] = {"benchmark": "fleet", "machine": machine_info(node_threads=args.threads),
                              "config": vars(args), "throughput": {}}
    try:
        model = init_tiny(tmp / "model")
        aliases = {f"a{i}": write_random_adapter(model, tmp / "adapters" / f"a{i}", 900 + i)
                   for i in range(args.adapters)}
        keys = list(aliases)
        nodes = []
        for i in range(3):
            proc, g, h = start_node(model, aliases, tmp / f"node{i}", args.threads)
            procs.append(proc)
            nodes.append(FleetNode(f"n{i}", g, h))
        load(nodes[0].grpc, keys, 2, 2.0, args.max_tokens)  # warm-up: adapters loaded, code paths hot
        base = load(nodes[0].grpc, keys, args.clients, args.seconds, args.max_tokens)
        result["throughput"]["baseline_one_node_direct"] = base
        print("baseline", base, flush=True)
        for n in (1, 2, 3):
            gport, hport = free_port(), free_port()
            cfg = tmp / f"haproxy{n}.cfg"
            cfg.write_text(render(nodes[:n], f"127.0.0.1:{gport}", f"127.0.0.1:{hport}", str(tmp / f"hs{n}.sock")))
            hp = subprocess.Popen([str(haproxy), "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
            time.sleep(1.5)  # first health checks
            target = f"127.0.0.1:{gport}"
            load(target, keys, 2, 2.0, args.max_tokens)
            r = load(target, keys, args.clients, args.seconds, args.max_tokens)
            r["scaling_vs_baseline"] = round(r["tokens_per_s"] / base["tokens_per_s"], 3)
            result["throughput"][f"fleet_{n}_nodes_via_proxy"] = r
            print(f"fleet-{n}", r, flush=True)
            hp.kill()
            hp.wait()
        again = load(nodes[0].grpc, keys, args.clients, args.seconds, args.max_tokens)  # drift check
        result["throughput"]["baseline_one_node_direct_again"] = again
        print("baseline again", again, flush=True)
        for r in result["throughput"].values():
            if "scaling_vs_baseline" in r:  # against the mean of both baseline runs
                r["scaling_vs_baseline"] = round(2 * r["tokens_per_s"] / (base["tokens_per_s"] +
                                                                          again["tokens_per_s"]), 3)
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(60)
        procs.clear()

        pg = Path(tempfile.mkdtemp(prefix="loraledger-bench-pg-"))  # outside the 0700 folder, for the db user
        dsn, prefix, pg_ctl = pg_cluster(pg)
        try:
            result["failover"] = {}
            for poll in (2.0, 0.3):
                times = failover_times(dsn, poll, args.failovers)
                result["failover"][f"role_poll_{poll:g}s"] = {
                    "median_s": round(statistics.median(times), 3), "max_s": round(max(times), 3),
                    "samples_s": [round(t, 3) for t in times]}
                print(f"failover poll {poll}", result["failover"][f"role_poll_{poll:g}s"], flush=True)
        finally:
            subprocess.run([*prefix, pg_ctl, "-D", str(pg / "data"), "-m", "immediate", "stop"],
                           capture_output=True, cwd=pg, check=False)
            shutil.rmtree(pg, ignore_errors=True)
    finally:
        for proc in procs:
            proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
