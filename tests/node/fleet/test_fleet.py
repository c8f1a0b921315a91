"""A fleet of three `loraledger node run` processes of one operator on one PostgreSQL record log, behind HAProxy
(the config of scripts/fleet/), settling on the session anvil. One scenario, in order:

1. traffic through the proxy and to each node: every node's records settle in the same epochs, each once; one
   node settles and every node says which;
2. adapter affinity: each adapter is served by one node while the fleet is stable; a node sent SIGTERM leaves
   the rotation (health) while it still drains, its adapters move to the others, the others' stay;
3. kill -9 of the settling node while an epoch's transaction is signed and stored but not mined (and lost by the
   chain's mempool): the survivor takes the role, re-broadcasts the same signed bytes, the epoch lands once; no
   record is lost; every submitEpoch transaction the operator ever sent landed (no node raced another);
   every account claims exactly what an independent sum over all nodes' requests gives.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import grpc
import pytest

from loraledger.node.chain.keys import dev_account
from loraledger.node.commands.rewards import proof_from_node
from loraledger.node.ledger.claims import claim
from loraledger.node.serving.generation import request_id_bytes32
from loraledger.node.serving.settler_role import fleet_holder
from loraledger.proto.loraledger.v1 import loraledger_pb2 as pb
from loraledger.proto.loraledger.v1 import loraledger_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow

KEY_ENV = "LORALEDGER_FLEET_TEST_KEY"
HEADER = "x-loraledger-adapter"
NAMES = ("n1", "n2", "n3")
LOCAL_KEYS = tuple(f"k{i}" for i in range(6))  # local adapters (aliases): routing keys without records
KINDS: list[list[tuple[str, float]]] = [[("1", 1.0)], [("2", 1.0)], [("1", 0.5), ("2", 0.5)]]
REPO_ROOT = Path(__file__).resolve().parents[3]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Fleet:
    world: Any
    dsn: str
    nodes: dict[str, Any]  # name -> NodeProcess
    http: dict[str, str]  # name -> http://127.0.0.1:PORT
    proxy: subprocess.Popen[str]
    proxy_grpc: str
    proxy_http: str
    stats_socket: Path
    # every answered request through on-chain adapters: (client request id, adapters, prompt, completion)
    usage: list[tuple[str, list[tuple[str, float]], int, int]] = field(default_factory=list)

    def sql(self, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True) as conn:
            return [tuple(r) for r in conn.execute(query, params).fetchall()]

    def server_states(self) -> dict[str, str]:
        """grpc_nodes backend: server name -> UP / DOWN / ..., from HAProxy's stats socket."""
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(self.stats_socket))
            s.sendall(b"show stat\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        out = {}
        for line in data.decode().splitlines():
            parts = line.split(",")
            if len(parts) > 17 and parts[0] == "grpc_nodes" and parts[1] in NAMES:
                out[parts[1]] = parts[17]
        return out


def _node_config(world: Any, model_dir: Path, tmp: Path, name: str, aliases: dict[str, Path]) -> Path:
    q = lambda p: '"' + str(p) + '"'
    (tmp / "adapters").mkdir(parents=True)
    path = tmp / "node.toml"
    path.write_text("\n".join([
        "[server]", 'listen = "127.0.0.1:0"', "grace_seconds = 8.0",
        "[http]", 'listen = "127.0.0.1:0"',
        "[auth]", 'mode = "none"',
        "[model]", f"dir = {q(model_dir)}", 'device = "cpu"', "max_num_seqs = 16", "max_tokens_per_step = 256",
        "[adapters]", f"dir = {q(tmp / 'adapters')}", "slots = 4", "max_rank = 8",
        "[adapters.aliases]", *[f"{k} = {q(p)}" for k, p in aliases.items()],
        "[chain]", f"deployment = {q(world.deployment_file)}", f'key_env = "{KEY_ENV}"',
        "[records]", f"path = {q(tmp / 'unused.sqlite')}",
        "[settlement]", "enabled = true", "epoch_seconds = 1.0", "epoch_records = 1000",
        f'node_name = "{name}"', "role_poll_seconds = 0.3",
    ]) + "\n")
    return path


def _render_module() -> Any:
    """scripts/fleet/render_haproxy.py, the config renderer an operator runs."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("render_haproxy", REPO_ROOT / "scripts/fleet/render_haproxy.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclass resolves annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def _http_url(node: Any) -> str:
    deadline = time.monotonic() + 15  # printed right after the serving line
    while time.monotonic() < deadline:
        for line in list(node.lines):
            m = re.search(r"HTTP API on (http://[\d.]+:\d+)/v1", line)
            if m:
                return m.group(1)
        time.sleep(0.05)
    raise AssertionError("node printed no HTTP API line:\n" + "\n".join(node.lines[-20:]))


def _wait(pred: Callable[[], bool], timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while not pred():
        assert time.monotonic() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.05)
    return time.monotonic() - t0


@pytest.fixture(scope="module")
def fleet(chain_world: Any, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, pg_cluster: str,
          haproxy_bin: str, node_runner: Callable[..., Any], random_adapter: Callable[..., Path]) -> Iterator[Fleet]:
    import psycopg

    root = tmp_path_factory.mktemp("fleet")
    with psycopg.connect(f"{pg_cluster}/postgres", autocommit=True) as conn:
        conn.execute("CREATE DATABASE fleet_e2e")
    dsn = f"{pg_cluster}/fleet_e2e"
    aliases = {k: random_adapter(tiny_model_dir, root / "local" / k, 500 + i) for i, k in enumerate(LOCAL_KEYS)}
    env = {KEY_ENV: chain_world.operator_key(), "LORALEDGER_RECORDS_POSTGRES_DSN": dsn}
    started: dict[str, Any] = {}
    errors: list[BaseException] = []

    def start(name: str) -> None:
        try:
            cfg = _node_config(chain_world, tiny_model_dir, root / name, name, aliases)
            started[name] = node_runner(["--config", str(cfg)], env)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=start, args=(n,)) for n in NAMES]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    proxy = None
    try:
        assert not errors, errors
        http = {n: _http_url(started[n]) for n in NAMES}
        mod = _render_module()
        grpc_port, http_port = _free_port(), _free_port()
        stats = root / "haproxy.sock"
        cfg_text = mod.render([mod.FleetNode(n, started[n].address, http[n].removeprefix("http://")) for n in NAMES],
                              f"127.0.0.1:{grpc_port}", f"127.0.0.1:{http_port}", str(stats), check_interval_ms=200)
        (root / "haproxy.cfg").write_text(cfg_text)
        proxy = subprocess.Popen([haproxy_bin, "-db", "-f", str(root / "haproxy.cfg")], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
        f = Fleet(chain_world, dsn, started, http, proxy, f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}",
                  stats)
        _wait(lambda: stats.exists() or proxy.poll() is not None, 10, "HAProxy started")
        _wait(lambda: f.server_states() == {n: "UP" for n in NAMES} or proxy.poll() is not None, 30,
              "HAProxy: all nodes UP")
        assert proxy.poll() is None, f"HAProxy exited: {proxy.stdout.read() if proxy.stdout else ''}"

        yield f
    finally:
        for node in started.values():
            if node.proc.poll() is None:
                node.kill9()
        if proxy is not None:
            proxy.kill()
            proxy.wait(10)


def _generate(target: str, rid: str, adapters: list[tuple[str, float]], max_tokens: int = 3,
              header: str | None = None) -> tuple[Any, str]:
    """One Generate call; returns (final response, the x-loraledger-node header of the proxy or "")."""
    with grpc.insecure_channel(target) as ch:
        stub = pb_grpc.InferenceStub(ch)
        req = pb.GenerateRequest(prompt=f"{rid}: owls hunt at night", request_id=rid,
                                 adapters=[pb.AdapterRef(adapter=a, weight=w) for a, w in adapters],
                                 sampling=pb.SamplingParams(max_tokens=max_tokens))
        md = [(HEADER, header if header is not None else adapters[0][0])] if adapters else []
        resp, call = stub.Generate.with_call(req, metadata=md, timeout=60)
        node = dict(call.initial_metadata()).get("x-loraledger-node", "")
        return resp, str(node)


def _traffic(f: Fleet, prefix: str, per_target: int) -> None:
    """`per_target` paid requests to each live node directly and as many through the proxy, 4 at a time."""
    targets = [(n, node.address) for n, node in f.nodes.items() if node.proc.poll() is None]
    targets.append(("proxy", f.proxy_grpc))
    jobs = [(f"{prefix}-{n}-{k}", addr, KINDS[k % len(KINDS)]) for n, addr in targets for k in range(per_target)]
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker(part: list[tuple[str, str, list[tuple[str, float]]]]) -> None:
        for rid, addr, kind in part:
            try:
                r, _ = _generate(addr, rid, kind)
                assert r.HasField("attribution") and r.request_id == rid
                with lock:
                    f.usage.append((rid, kind, r.usage.prompt_tokens, r.usage.completion_tokens))
            except BaseException as e:  # noqa: BLE001 - re-raised below
                errors.append(e)

    threads = [threading.Thread(target=worker, args=(jobs[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]


def _all_settled(f: Fleet) -> bool:
    (total, unassigned), = f.sql("SELECT COUNT(*), COUNT(*) - COUNT(epoch) FROM records")
    open_epochs = f.sql("SELECT COUNT(*) FROM epochs WHERE state <> 'confirmed'")[0][0]
    return bool(unassigned == 0 and open_epochs == 0 and total > 0)


def _metric(url: str, name: str) -> list[tuple[str, float]]:
    text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
    return [(line.split(" ")[0], float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
            if line.startswith(name)]


def test_every_node_records_settle_in_shared_epochs_once(fleet: Fleet) -> None:
    f = fleet
    _traffic(f, "w1", per_target=6)
    _wait(lambda: _all_settled(f), 60, "every record settled")
    rids = {request_id_bytes32(rid): rid for rid, *_ in f.usage}
    rows = f.sql("SELECT request_id, epoch FROM records")
    assert {r for r, _ in rows} >= set(rids), "every answered request has its one record in the shared log"
    by_epoch: dict[int, set[str]] = {}
    for r, e in rows:
        if r in rids:
            by_epoch.setdefault(int(e), set()).add(rids[r].split("-")[1])
    assert any(len({n for n in origins if n in NAMES}) >= 2 for origins in by_epoch.values()), \
        f"records of several nodes share an epoch: {by_epoch}"
    epochs = f.sql("SELECT epoch, record_count, records_root, rewards_root FROM epochs ORDER BY epoch")
    ledger = f.world.bind(dev_account(0)).ledger
    operator = f.world.operator.address
    assert [e for e, *_ in epochs] == list(range(1, len(epochs) + 1)) == list(range(1, ledger.last_epoch(operator) + 1))
    for e, count, rr, wr in epochs:
        info = ledger.epoch(operator, e)
        assert (info.records_root, info.rewards_root, info.record_count) == (rr, wr, count)
    assert sum(c for _, c, *_ in epochs) == len(rows)
    # one settler, and every node says which
    holder = fleet_holder(f.dsn)
    assert holder in NAMES
    for n in NAMES:
        own = dict(_metric(f.http[n], "loraledger_settler "))
        assert own["loraledger_settler"] == (1.0 if n == holder else 0.0)
        seen = dict(_metric(f.http[n], "loraledger_settler_holder{"))
        assert seen == {f'loraledger_settler_holder{{node="{holder}"}}': 1.0}, seen
    out = subprocess.run([sys.executable, "-m", "loraledger.node.cli", "node", "settler", "--dsn",
                          f.dsn], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60, check=True)
    assert out.stdout.strip() == f"settler: {holder}"


def _route_all(f: Fleet, keys: tuple[str, ...], rounds: int) -> dict[str, set[str]]:
    """Each key `rounds` times through the proxy: key -> the nodes that served it."""
    served: dict[str, set[str]] = {}
    for r in range(rounds):
        for k in keys:
            resp, node = _generate(f.proxy_grpc, f"aff-{k}-{r}-{time.monotonic_ns()}", [(k, 1.0)], max_tokens=2)
            assert resp.usage.completion_tokens >= 1
            served.setdefault(k, set()).add(node)
    return served


def test_affinity_stable_then_a_draining_node_leaves(fleet: Fleet) -> None:
    f = fleet
    before = {n: dict(_metric(f.http[n], "loraledger_requests_total{")) for n in NAMES}
    served = _route_all(f, LOCAL_KEYS, rounds=4)
    assert all(len(nodes) == 1 for nodes in served.values()), f"stable fleet: one node per adapter: {served}"
    home = {k: next(iter(v)) for k, v in served.items()}
    assert len(set(home.values())) >= 2, f"the keys spread over the fleet: {home}"
    for n in NAMES:  # the nodes' own counters agree with the proxy's header
        after = dict(_metric(f.http[n], "loraledger_requests_total{"))
        for k in LOCAL_KEYS:
            key = f'loraledger_requests_total{{adapter="{k}",api="grpc",status="OK"}}'
            got = after.get(key, 0.0) - before[n].get(key, 0.0)
            assert got == (4.0 if home[k] == n else 0.0), (n, k, got)
    # HTTP API: the same header lands on the same node as gRPC (same server ids on the hash ring)
    for k in LOCAL_KEYS[:3]:
        req = urllib.request.Request(f"{f.proxy_http}/v1/completions", method="POST", headers={
            "content-type": "application/json", HEADER: k},
            data=json.dumps({"model": k, "prompt": "owls", "max_tokens": 2}).encode())
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert resp.headers["x-loraledger-node"] == home[k]

    # SIGTERM a node that does not settle while a long stream runs on it: the proxy takes it out while it drains
    holder = fleet_holder(f.dsn)
    leaving = next(n for n in NAMES if n != holder and n in home.values())
    key = next(k for k, n in home.items() if n == leaving)
    stream_done: list[Any] = []

    def long_stream() -> None:
        with grpc.insecure_channel(f.proxy_grpc) as ch:
            req = pb.GenerateRequest(prompt="a long answer", adapters=[pb.AdapterRef(adapter=key)],
                                     sampling=pb.SamplingParams(max_tokens=450, temperature=1.0, seed=7))
            final = None
            for msg in pb_grpc.InferenceStub(ch).GenerateStream(req, metadata=[(HEADER, key)], timeout=60):
                if msg.HasField("final"):
                    final = msg.final
            stream_done.append(final)

    streamer = threading.Thread(target=long_stream)
    streamer.start()
    node = f.nodes[leaving]
    _wait(lambda: dict(_metric(f.http[leaving], "loraledger_requests_in_flight")).get(
        "loraledger_requests_in_flight", 0.0) >= 1, 20, "the stream running on the leaving node")
    node.proc.send_signal(signal.SIGTERM)
    _wait(lambda: f.server_states().get(leaving) == "DOWN", 10, "HAProxy marking the draining node DOWN")
    alive_when_out = node.proc.poll() is None
    streamer.join(60)
    assert node.proc.wait(30) == 0
    assert stream_done and stream_done[0] is not None and stream_done[0].usage.completion_tokens >= 1
    assert alive_when_out, "the node left the rotation while it was still draining, before it stopped"
    moved = _route_all(f, LOCAL_KEYS, rounds=2)
    for k, nodes in moved.items():
        assert len(nodes) == 1 and leaving not in nodes, (k, nodes)
        if home[k] != leaving:
            assert nodes == {home[k]}, f"{k} moved from {home[k]} to {nodes} though its node stayed"


def _rpc(w3: Any, method: str, *params: Any) -> Any:
    resp = w3.provider.make_request(method, list(params))
    assert "error" not in resp, resp
    return resp.get("result")


def _expected(world: Any, usage: list[tuple[str, list[tuple[str, float]], int, int]]) -> tuple[
        dict[str, Fraction], int]:
    """Exact amounts per account over every node's requests, from the registry and the lineage only."""
    admin = world.bind(dev_account(0))
    s = admin.ledger.shares()
    infos = {i: admin.adapters.get_adapter(i) for i in (1, 2)}
    lineage = {a: Fraction(t) for a, t in world.lineage.items()}
    out: dict[str, Fraction] = {}
    total = 0

    def add(account: str, v: Fraction) -> None:
        out[account] = out.get(account, Fraction(0)) + v

    for _, adapters, prompt, completion in usage:
        nums = {int(a): round(w * 10_000) * int(infos[int(a)].fee_per_token) for a, w in adapters}
        fee = sum(nums.values()) * (prompt + completion) // 10_000
        total += fee
        add(world.operator.address, Fraction(fee * s.operator_bps, 10_000))
        for a, n in nums.items():
            part = Fraction(n, sum(nums.values()))
            add(infos[a].owner, fee * Fraction(s.adapter_owner_bps, 10_000) * part)
            for c, t in lineage.items():
                add(c, fee * Fraction(s.data_bps, 10_000) * part * t / sum(lineage.values()))
    return out, total


def test_kill9_of_the_settler_mid_submission_then_every_account_claims(fleet: Fleet) -> None:
    f = fleet
    w3 = f.world.w3
    holder = fleet_holder(f.dsn)
    assert holder in f.nodes
    _rpc(w3, "evm_setAutomine", False)
    try:
        _traffic(f, "w2", per_target=3)
        _wait(lambda: bool(f.sql("SELECT 1 FROM epochs WHERE state = 'submitted'")), 60,
              "an epoch signed, stored and sent, not mined")
        (epoch, tx_hash, nonce), = f.sql("SELECT epoch, tx_hash, tx_nonce FROM epochs "
                                               "WHERE state = 'submitted'")
        f.nodes[holder].kill9()
        t_kill = time.monotonic()
        # the chain loses the transaction too: only the log's stored bytes can bring it back
        _rpc(w3, "anvil_dropTransaction", tx_hash)
        failover = _wait(lambda: fleet_holder(f.dsn) not in ("", holder), 30, "another node taking the role")
        heir = fleet_holder(f.dsn)
        _wait(lambda: w3.eth.get_transaction_count(f.world.operator.address, "pending") > nonce, 30,
              "the heir re-broadcasting the stored transaction")
        _traffic(f, "w3", per_target=2)  # the survivors keep serving meanwhile
    finally:
        _rpc(w3, "evm_setAutomine", True)
    _rpc(w3, "evm_mine")
    _wait(lambda: _all_settled(f), 60, "everything settled by the heir")
    print(f"\nsettler failover {holder} -> {heir}: {failover:.2f} s after kill -9 "
          f"({time.monotonic() - t_kill:.1f} s to settled)")
    (tx_after, nonce_after), = f.sql("SELECT tx_hash, tx_nonce FROM epochs WHERE epoch = %s", (epoch,))
    assert (tx_after, nonce_after) == (tx_hash, nonce), "the epoch landed with the stored transaction, not a new one"
    receipt = w3.eth.get_transaction_receipt(tx_hash)
    assert receipt["status"] == 1

    operator = f.world.operator.address
    ledger = f.world.bind(dev_account(0)).ledger
    epochs = f.sql("SELECT epoch, record_count, records_root, rewards_root, cumulative_total FROM epochs "
                   "ORDER BY epoch")
    assert ledger.last_epoch(operator) == len(epochs) and [e[0] for e in epochs] == list(range(1, len(epochs) + 1))
    for e, count, rr, wr, _ in epochs:
        info = ledger.epoch(operator, e)
        assert (info.records_root, info.rewards_root, info.record_count) == (rr, wr, count)
    # every submitEpoch the operator ever signed landed: no node raced another, nothing was sent twice
    from eth_utils import function_abi_to_4byte_selector

    selector = function_abi_to_4byte_selector(next(x for x in ledger.contract.abi if x.get("name") == "submitEpoch"))
    sent = []
    for b in range(int(f.world.deployment.block_number), int(w3.eth.block_number) + 1):
        for tx in w3.eth.get_block(b, full_transactions=True)["transactions"]:
            if tx["from"] == operator and tx["to"] == ledger.address and bytes(tx["input"])[:4] == selector:
                sent.append(tx["hash"])
    assert len(sent) == len(epochs), (len(sent), len(epochs))
    assert all(w3.eth.get_transaction_receipt(h)["status"] == 1 for h in sent)

    # no record lost: every answered request of every node is in a confirmed epoch
    rows = dict(f.sql("SELECT request_id, epoch FROM records"))
    for rid, *_ in f.usage:
        assert rows.get(request_id_bytes32(rid)) is not None, rid
    fees = sum(int(x) for (x,) in f.sql("SELECT fee FROM records"))
    expected, total = _expected(f.world, f.usage)
    assert total == fees == int(epochs[-1][4]) == int(ledger.funded_total(operator))

    # every account claims exactly its share of all nodes' records (largest remainder: within 1 per epoch)
    survivor = next(n for n in f.nodes.values() if n.proc.poll() is None)
    payer = f.world.bind(dev_account(9)).ledger
    token = f.world.bind(dev_account(0)).token
    for a in expected:
        proof = proof_from_node(survivor.address, a)
        assert claim(payer, proof).paid == proof.cumulative_amount
        assert abs(int(ledger.claimed(operator, a)) - expected[a]) <= len(epochs), (a, float(expected[a]))
        assert claim(payer, proof_from_node(survivor.address, a)).paid == 0
    assert int(ledger.claimed_total(operator)) == fees and int(token.balance_of(ledger.address)) == 0
