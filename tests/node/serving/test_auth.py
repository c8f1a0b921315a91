"""Who may call what, against a real node over real sockets: API keys (none, wrong, revoked, wrong scope), TLS
and mTLS, EIP-712 signed requests (replayed, expired, for another node), on-chain adapter access (denied, then
allowlisted while the node runs), rate limits, LoadAdapter paths, and the refusal to serve a public address
open. After every denial the node keeps serving a well-formed request."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import trustme

from loraledger.node.chain.keys import dev_account
from loraledger.node.config import load_config
from loraledger.node.errors import ConfigError
from loraledger.node.serving.app import NodeApp
from loraledger.node.serving.auth import Authorizer, KeyStore
from loraledger.node.serving.signing import sign_fields, sign_proto_request
from loraledger.proto.loraledger.v1 import loraledger_pb2 as pb
from loraledger.proto.loraledger.v1 import loraledger_pb2_grpc as pb_grpc

KEY_ENV = "LORALEDGER_AUTH_TEST_OPERATOR_KEY"
ROOT = Path(__file__).resolve().parents[3]


@dataclass
class Secured:
    app: NodeApp
    grpc_address: str
    http_url: str
    world: Any
    store: KeyStore
    keys: dict[str, str]  # name -> key
    ca: trustme.CA
    client_cert: trustme.LeafCert  # signed by the client CA (mTLS)
    adapter_root: Path
    chain_id: int
    operator: str

    def channel(self, with_client_cert: bool = True) -> grpc.Channel:
        creds = grpc.ssl_channel_credentials(
            root_certificates=self.ca.cert_pem.bytes(),
            private_key=self.client_cert.private_key_pem.bytes() if with_client_cert else None,
            certificate_chain=self.client_cert.cert_chain_pems[0].bytes() if with_client_cert else None)
        return grpc.secure_channel(self.grpc_address, creds)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.http_url, verify=self._ssl(), timeout=30)

    def _ssl(self) -> Any:
        import ssl

        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        return ctx


def _meta(key: str | None) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")] if key else []


@pytest.fixture(scope="module")
def secured(chain_world: Any, tiny_model_dir: Path, random_adapter: Callable[..., Path],
            tmp_path_factory: pytest.TempPathFactory, server_loop: Any,
            start_app: Callable[..., Any]) -> Iterator[Secured]:
    tmp = tmp_path_factory.mktemp("auth-node")
    ca, client_ca = trustme.CA(), trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    server_cert.private_key_pem.write_to_path(str(tmp / "server.key"))
    server_cert.cert_chain_pems[0].write_to_path(str(tmp / "server.pem"))
    client_ca.cert_pem.write_to_path(str(tmp / "client-ca.pem"))
    store = KeyStore(tmp / "keys.json")
    keys = {name: store.create(name, scope, account, rpm=rpm)[0] for name, scope, account, rpm in [
        ("user", "infer", "", 0), ("admin", "admin", "", 0), ("bound", "infer", dev_account(7).address, 0),
        ("slow", "infer", "", 2), ("doomed", "infer", "", 0)]}
    root = tmp / "adapter-root"
    root.mkdir()
    random_adapter(tiny_model_dir, root / "inside", seed=51)
    cfg = load_config(None, {
        "server": {"listen": "127.0.0.1:0", "grace_seconds": 1.0},
        "http": {"listen": "127.0.0.1:0"},
        "auth": {"mode": "auto", "keys_file": str(tmp / "keys.json")},
        "tls": {"cert_file": str(tmp / "server.pem"), "key_file": str(tmp / "server.key"),
                "client_ca_file": str(tmp / "client-ca.pem")},
        "model": {"dir": str(tiny_model_dir), "device": "cpu", "default_max_tokens": 4},
        "adapters": {"dir": str(tmp / "adapters"), "slots": 4, "max_rank": 8, "roots": [str(root)]},
        "chain": {"deployment": str(chain_world.deployment_file), "key_env": KEY_ENV},
        "records": {"path": str(tmp / "records.sqlite")},
        "settlement": {"enabled": False},
    }, environ={})
    app, port = start_app(server_loop, cfg, chain_world.operator_key())
    yield Secured(app, f"127.0.0.1:{port}", f"https://127.0.0.1:{app.http_port}", chain_world, store, keys, ca,
                  client_ca.issue_cert("loraledger-admin"), root, int(chain_world.w3.eth.chain_id),
                  chain_world.operator.address)
    server_loop.run(app.stop(1.0))


def _generate(s: Secured, key: str | None, adapter: str = "2", sign_with: Any = None,
              **sign: Any) -> pb.GenerateResponse:
    req = pb.GenerateRequest(prompt="Who may call?", adapters=[pb.AdapterRef(adapter=adapter)],
                             sampling=pb.SamplingParams(max_tokens=2))
    if sign_with is not None:
        sign_proto_request(req, sign_with, chain_id=sign.get("chain_id", s.chain_id),
                           operator=sign.get("operator", s.operator), now=sign.get("now"))
    with s.channel() as ch:
        return pb_grpc.InferenceStub(ch).Generate(req, metadata=_meta(key), timeout=60)


def _code(fn: Callable[[], Any]) -> tuple[grpc.StatusCode, str, Any]:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code(), e.value.details(), e.value.trailing_metadata()


def _serves_everyone_else(s: Secured) -> None:
    assert _generate(s, s.keys["user"]).usage.completion_tokens == 2
    r = s.http().post("/v1/completions", json={"model": "2", "prompt": "still up", "max_tokens": 1},
                      headers={"authorization": f"Bearer {s.keys['user']}"})
    assert r.status_code == 200, r.text


def test_keys_over_grpc_and_http(secured: Secured) -> None:
    s = secured
    for key, code, words in [(None, grpc.StatusCode.UNAUTHENTICATED, "requires an API key"),
                             ("llk_wrong", grpc.StatusCode.UNAUTHENTICATED, "not valid")]:
        got, details, _ = _code(lambda k=key: _generate(s, k))
        assert got == code and words in details
        _serves_everyone_else(s)
    with s.http() as http:
        assert http.post("/v1/completions", json={"model": "2", "prompt": "x"}).status_code == 401
        r = http.get("/v1/models", headers={"authorization": "Bearer llk_wrong"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert http.get("/health").status_code == 200  # open
        assert http.get("/metrics").status_code == 200  # open unless [auth] metrics = "keyed"
    # the wrong scope: an infer key may not load adapters (and an admin key may, with a client certificate)
    with s.channel(with_client_cert=True) as ch:
        stub = pb_grpc.InferenceStub(ch)
        code, details, _ = _code(lambda: stub.LoadAdapter(pb.LoadAdapterRequest(
            adapter="x", path=str(s.adapter_root / "inside")), metadata=_meta(s.keys["user"]), timeout=30))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "scope 'infer'" in details
    _serves_everyone_else(s)


def test_a_revoked_key_stops_at_once(secured: Secured) -> None:
    s = secured
    assert _generate(s, s.keys["doomed"]).usage.completion_tokens == 2
    s.store.revoke("doomed")  # the running node re-reads the file on the next request
    code, details, _ = _code(lambda: _generate(s, s.keys["doomed"]))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "revoked" in details
    r = s.http().get("/v1/models", headers={"authorization": f"Bearer {s.keys['doomed']}"})
    assert r.status_code == 401 and "revoked" in r.json()["error"]["message"]
    _serves_everyone_else(s)


def test_tls_and_mtls(secured: Secured) -> None:
    s = secured
    # a client that does not trust the node's CA cannot even talk to it
    with grpc.secure_channel(s.grpc_address, grpc.ssl_channel_credentials()) as ch:
        code, _, _ = _code(lambda: pb_grpc.InferenceStub(ch).ListAdapters(
            pb.ListAdaptersRequest(), metadata=_meta(s.keys["user"]), timeout=10))
        assert code == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(httpx.ConnectError):
        httpx.get(s.http_url + "/health", timeout=10)  # default trust store: the node's CA is unknown
    with grpc.insecure_channel(s.grpc_address) as ch:  # plaintext against a TLS port
        code, _, _ = _code(lambda: pb_grpc.InferenceStub(ch).ListAdapters(pb.ListAdaptersRequest(), timeout=10))
        assert code == grpc.StatusCode.UNAVAILABLE
    load = pb.LoadAdapterRequest(adapter="mtls", path=str(s.adapter_root / "inside"))
    with s.channel(with_client_cert=False) as ch:  # the admin key without a client certificate: no handshake
        code, _, _ = _code(lambda: pb_grpc.InferenceStub(ch).LoadAdapter(
            load, metadata=_meta(s.keys["admin"]), timeout=30))
        assert code == grpc.StatusCode.UNAVAILABLE
    with s.channel(with_client_cert=True) as ch:
        loaded = pb_grpc.InferenceStub(ch).LoadAdapter(load, metadata=_meta(s.keys["admin"]), timeout=30)
        assert loaded.adapter.key == "mtls"
    _serves_everyone_else(s)


def test_load_adapter_paths_stay_below_the_roots(secured: Secured, tmp_path: Path) -> None:
    s = secured
    outside = tmp_path / "outside"
    outside.mkdir()
    (s.adapter_root / "escape").symlink_to(outside, target_is_directory=True)
    with s.channel(with_client_cert=True) as ch:
        stub = pb_grpc.InferenceStub(ch)
        for path in (str(s.adapter_root / ".." / "adapters"), str(outside), str(s.adapter_root / "escape"),
                     "/etc"):
            code, details, _ = _code(lambda p=path: stub.LoadAdapter(pb.LoadAdapterRequest(adapter="evil", path=p),
                                                                      metadata=_meta(s.keys["admin"]), timeout=30))
            assert code == grpc.StatusCode.PERMISSION_DENIED and "outside the adapter roots" in details, path
    _serves_everyone_else(s)


def test_rate_limit_per_key(secured: Secured) -> None:
    s = secured
    for _ in range(2):
        _generate(s, s.keys["slow"])
    code, details, trailing = _code(lambda: _generate(s, s.keys["slow"]))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "2 requests per minute" in details
    assert 1 <= int(dict(trailing)["retry-after"]) <= 60
    r = s.http().post("/v1/completions", json={"model": "2", "prompt": "x", "max_tokens": 1},
                      headers={"authorization": f"Bearer {s.keys['slow']}"})
    assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 60
    _serves_everyone_else(s)


def test_signed_requests(secured: Secured) -> None:
    s = secured
    signer = dev_account(9)
    req = pb.GenerateRequest(prompt="signed", adapters=[pb.AdapterRef(adapter="2")],
                             sampling=pb.SamplingParams(max_tokens=2))
    sign_proto_request(req, signer, chain_id=s.chain_id, operator=s.operator)
    with s.channel() as ch:
        stub = pb_grpc.InferenceStub(ch)
        assert stub.Generate(req, metadata=_meta(s.keys["user"]), timeout=60).usage.completion_tokens == 2
        code, details, _ = _code(lambda: stub.Generate(req, metadata=_meta(s.keys["user"]), timeout=60))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "already" in details  # replayed
    code, details, _ = _code(lambda: _generate(s, s.keys["user"], sign_with=signer, now=time.time() - 3600))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "expired" in details
    other = dev_account(8).address  # a signature made for another node (operator)
    code, details, _ = _code(lambda: _generate(s, s.keys["user"], sign_with=signer, operator=other))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "operator" in details
    code, details, _ = _code(lambda: _generate(s, s.keys["user"], sign_with=signer, chain_id=1))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    # an account claimed without a signature is refused, not believed
    claimed = pb.GenerateRequest(prompt="x", adapters=[pb.AdapterRef(adapter="2")], client_account=signer.address)
    with s.channel() as ch:
        code, details, _ = _code(lambda: pb_grpc.InferenceStub(ch).Generate(
            claimed, metadata=_meta(s.keys["user"]), timeout=60))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "signature" in details
    _serves_everyone_else(s)


def test_on_chain_access_denied_then_allowlisted_while_running(secured: Secured) -> None:
    s = secured
    owner = s.world.bind(dev_account(5))  # owns adapters 1 and 3
    owner.adapters.set_public(3, False)
    allowed = dev_account(7)  # the account bound to the "bound" key
    _wait(lambda: not s.app.access.allowed(3, allowed.address))  # type: ignore[union-attr]
    code, details, _ = _code(lambda: _generate(s, s.keys["user"], adapter="3"))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "adapter 3" in details
    code, details, _ = _code(lambda: _generate(s, s.keys["bound"], adapter="3"))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    r = s.http().post("/v1/completions", json={"model": "3", "prompt": "x", "max_tokens": 1},
                      headers={"authorization": f"Bearer {s.keys['user']}"})
    assert r.status_code == 403 and "adapter 3" in r.json()["error"]["message"]
    _serves_everyone_else(s)

    owner.adapters.set_allowed(3, [allowed.address], True)  # on chain, while the node runs
    _wait(lambda: s.app.access.allowed(3, allowed.address))  # type: ignore[union-attr]
    assert _generate(s, s.keys["bound"], adapter="3").usage.completion_tokens == 2  # the key's bound account
    assert _generate(s, s.keys["user"], adapter="3", sign_with=allowed).usage.completion_tokens == 2  # signed
    fields = sign_fields(allowed, "over http", [["3", 1]], max_tokens=1, chain_id=s.chain_id, operator=s.operator)
    r = s.http().post("/v1/completions", headers={"authorization": f"Bearer {s.keys['user']}"}, json={
        "model": "3", "prompt": "over http", "max_tokens": 1, "loraledger_signature": {
            "account": fields.client_account, "deadline": fields.signature_deadline,
            "signature": fields.client_signature}})
    assert r.status_code == 200, r.text
    code, _, _ = _code(lambda: _generate(s, s.keys["user"], adapter="3"))  # still closed to everyone else
    assert code == grpc.StatusCode.PERMISSION_DENIED


def _wait(cond: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "the node's access cache did not follow the chain"
        time.sleep(0.1)


def test_a_public_address_without_keys_refuses_to_start(tmp_path: Path) -> None:
    authorizer = Authorizer("auto", KeyStore(tmp_path / "no-keys.json"))
    with pytest.raises(ConfigError, match="without authentication"):
        authorizer.check_startup({"server.listen": "0.0.0.0:50051", "http.listen": "127.0.0.1:8000"})
    authorizer.check_startup({"server.listen": "127.0.0.1:50051", "http.listen": "[::1]:8000"})  # loopback: open
    Authorizer("none", None).check_startup({"server.listen": "0.0.0.0:50051"})  # said on purpose
    with pytest.raises(ConfigError, match="holds no key"):
        Authorizer("keys", KeyStore(tmp_path / "no-keys.json")).check_startup({"server.listen": "127.0.0.1:1"})
    # the real command refuses before it loads anything, and says why
    env = {**os.environ, "LORALEDGER_AUTH_KEYS_FILE": str(tmp_path / "no-keys.json")}
    proc = subprocess.run([sys.executable, "-m", "loraledger.node.cli", "node", "run", "--listen", "0.0.0.0:0",
                           "--http-listen", "", "--model", str(tmp_path / "no-model")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 1 and "without authentication" in proc.stderr, proc.stderr[-2000:]


def test_keys_mode_sees_a_revocation_on_the_next_call(tmp_path: Path) -> None:
    """In mode "keys" too (where keys are in force whatever the file holds) the file is re-read per call."""
    from loraledger.node.errors import AuthenticationError

    store = KeyStore(tmp_path / "keys.json")
    secret, _ = store.create("k", "infer")
    authorizer = Authorizer("keys", KeyStore(tmp_path / "keys.json"))
    assert authorizer.authorize(secret, "infer").key is not None
    store.revoke("k")
    with pytest.raises(AuthenticationError, match="revoked"):
        authorizer.authorize(secret, "infer")
