"""`loraledger node run` (the server process) and `loraledger generate` (its command-line client).

    loraledger node run --config node.toml [--listen HOST:PORT] [--model DIR] [--device cpu|cuda] ...
    loraledger node settler [--config node.toml | --dsn DSN]
    loraledger generate [--server ADDR] [--adapter ID[:WEIGHT]]... [--stream] [--max-tokens N]
                        [--temperature T] [--seed S] [--chat]
                        [--key-file KEYSTORE [--password-file F] [--deployment F] [--chain-id N] [--operator ADDR]]
                        PROMPT

`node run` prints one line `loraledger node: serving on HOST:PORT` once health is SERVING (scripts wait for it)
and exits 0 after a clean SIGTERM / SIGINT shutdown (in-flight requests get `server.grace_seconds`; the record of
every request that produced tokens is durable before exit). With a deployment (`chain.deployment`), an operator
key (`$LORALEDGER_OPERATOR_KEY` or `chain.key_file`) and `settlement.enabled`, the node also settles epochs
itself (`[settlement]` epoch_seconds / epoch_records / push_threshold; see loraledger.node.serving.app.SettlementLoop), and
`attribution.token_level_lambda` > 0 turns token-level attribution on. `generate` prints the text (streamed as it comes with
--stream), then usage and the attribution summary on stderr-free stdout lines starting with `#`. With --key-file
it signs the request (EIP-712, loraledger.node.serving.signing) for the node's chain id and operator (--chain-id,
--operator, else the --deployment record's), valid for 120 s, so that the record names the key's account.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any

from loraledger.node.chain.keys import PASSWORD_ENV
from loraledger.node.errors import ConfigError

DEFAULT_SERVER = "127.0.0.1:50051"
ADAPTER_HEADER = "x-loraledger-adapter"
"""The request header (gRPC metadata) naming the adapter a fleet's proxy hashes on (scripts/fleet/)."""


def routing_key(adapters: list[tuple[str, float]]) -> str:
    """The value of ADAPTER_HEADER for a request's adapters: the one with the largest weight (the first of equal
    ones; a lone adapter's weight 0 means 1), so that a mix is served where its main adapter is hot."""
    if not adapters:
        return ""
    return max(adapters, key=lambda a: (a[1] or 1.0, -adapters.index(a)))[0]


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    node = subparsers.add_parser("node", help="the node process: engine + gRPC and HTTP APIs + records + settlement")
    sub = node.add_subparsers(dest="node_command", metavar="ACTION", required=True)
    run = sub.add_parser("run", help="serve until SIGTERM / SIGINT (then drain and exit 0)")
    run.add_argument("--config", help="node.toml (default: built-in defaults + LORALEDGER_* env vars)")
    run.add_argument("--listen", help="HOST:PORT to serve on (server.listen; port 0 picks a free one)")
    run.add_argument("--http-listen", help="HOST:PORT of the OpenAI-compatible HTTP API and /metrics "
                                           "(http.listen; port 0 picks a free one; \"\" turns it off)")
    run.add_argument("--model", help="model checkpoint directory (model.dir)")
    run.add_argument("--device", help="auto, cpu or cuda (model.device)")
    run.add_argument("--records", help="SQLite record log path (records.path)")
    run.add_argument("--adapters-dir", help="directory of adapters by on-chain id (adapters.dir)")
    run.add_argument("--deployment", help="deployment.json of the contracts (chain.deployment)")
    run.add_argument("--max-queue", type=int, help="requests in flight before RESOURCE_EXHAUSTED (server.max_queue)")
    run.add_argument("--grace", type=float, help="seconds in-flight requests get on shutdown (server.grace_seconds)")
    run.set_defaults(handler=_run)
    who = sub.add_parser("settler", help="which node of a fleet settles (the holder of the settler role on the "
                                         "shared PostgreSQL record log)")
    who.add_argument("--config", help="node.toml of a fleet node (its [records] postgres_dsn)")
    who.add_argument("--dsn", help="the fleet's PostgreSQL DSN (default: records.postgres_dsn of --config / env)")
    who.set_defaults(handler=_settler)

    gen = subparsers.add_parser("generate", help="ask a running node for a completion (gRPC client)")
    gen.add_argument("prompt", metavar="PROMPT", help="the prompt text (with --chat: one user message)")
    gen.add_argument("--server", default=DEFAULT_SERVER, help="node address (default: %(default)s)")
    gen.add_argument("--adapter", action="append", default=[], metavar="ID[:WEIGHT]",
                     help="adapter by on-chain id or alias, with an optional weight; repeat to merge (weights sum to 1)")
    gen.add_argument("--stream", action="store_true", help="print the text as it is generated")
    gen.add_argument("--chat", action="store_true", help="send PROMPT as a user chat message (chat template)")
    gen.add_argument("--max-tokens", type=int, default=0, help="tokens to generate (0: the node's default)")
    gen.add_argument("--temperature", type=float, default=None, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--seed", type=int, default=None, help="same seed, same text")
    gen.add_argument("--timeout", type=float, default=120.0, help="deadline in seconds (default: %(default)s)")
    gen.add_argument("--key-file", help=f"sign the request with this keystore's account (password in "
                                        f"${PASSWORD_ENV} or --password-file); the record then names it")
    gen.add_argument("--password-file", help="file whose first line is the keystore password")
    gen.add_argument("--chain-id", type=int, help="chain id the node settles on (default: --deployment's)")
    gen.add_argument("--operator", help="the node operator's address (default: --deployment's operator)")
    gen.add_argument("--deployment", help="deployment.json giving the chain id and operator to sign for")
    gen.add_argument("--api-key", default=os.environ.get("LORALEDGER_API_KEY", ""),
                     help="API key of the node (default: $LORALEDGER_API_KEY)")
    gen.add_argument("--tls-ca", help="CA certificate (PEM) of a node serving TLS")
    gen.add_argument("--tls-cert", help="client certificate (PEM) for a node that requires one (mTLS)")
    gen.add_argument("--tls-key", help="the client certificate's private key (PEM)")
    gen.set_defaults(handler=_generate)


# ---- node run ----------------------------------------------------------------------------------------------


def _overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    return {
        "server": {"listen": args.listen, "max_queue": args.max_queue, "grace_seconds": args.grace},
        "http": {"listen": args.http_listen},
        "model": {"dir": args.model, "device": args.device},
        "records": {"path": args.records},
        "adapters": {"dir": args.adapters_dir},
        "chain": {"deployment": args.deployment},
    }


def _run(args: argparse.Namespace) -> int:
    from loraledger.node.config import load_config
    from loraledger.node.serving.app import NodeApp

    cfg = load_config(args.config, _overrides(args))
    app = NodeApp(cfg)

    host = cfg.server.listen.rpartition(":")[0]

    def ready(port: int) -> None:
        print(f"loraledger node: serving on {host}:{port}", flush=True)
        if app.http_port is not None:
            http_host = cfg.http.listen.rpartition(":")[0]
            print(f"loraledger node: HTTP API on http://{http_host}:{app.http_port}/v1", flush=True)

    asyncio.run(app.run_until_signal(ready))
    print("loraledger node: stopped", flush=True)
    return 0


def _settler(args: argparse.Namespace) -> int:
    from loraledger.node.config import load_config
    from loraledger.node.serving.settler_role import fleet_holder

    dsn = args.dsn or load_config(args.config).records.postgres_dsn
    if not dsn:
        raise ConfigError("no fleet: the settler role exists only on a shared PostgreSQL record log; set "
                          "[records] postgres_dsn (or pass --dsn postgresql://...)")
    holder = fleet_holder(dsn)
    print(f"settler: {holder}" if holder else "settler: none (no node holds the role now)")
    return 0


# ---- generate ----------------------------------------------------------------------------------------------


def parse_adapter(spec: str) -> tuple[str, float]:
    """"7" -> ("7", 0.0) (a lone adapter's 0 means 1); "7:0.25" -> ("7", 0.25); ConfigError if malformed."""
    name, sep, weight = spec.partition(":")
    if not name:
        raise ConfigError(f"--adapter {spec!r}: give ID or ID:WEIGHT, e.g. --adapter 3:0.7")
    if not sep:
        return name, 0.0
    try:
        return name, float(weight)
    except ValueError as e:
        raise ConfigError(f"--adapter {spec!r}: weight {weight!r} is not a number") from e


def signing_target(chain_id: int | None, operator: str | None, deployment: str | None) -> tuple[int, str]:
    """(chain id, operator address) a request is signed for: the options, else the deployment record's;
    ConfigError naming what is missing."""
    from loraledger.node.types import as_address

    if (chain_id is None or operator is None) and deployment is not None:
        from loraledger.node.chain.devnet_setup import read_deployment

        dep = read_deployment(deployment)
        chain_id = dep.chain_id if chain_id is None else chain_id
        operator = dep.operator if operator is None else operator
    if chain_id is None or operator is None:
        missing = " and ".join(n for n, v in (("--chain-id", chain_id), ("--operator", operator)) if v is None)
        hint = " (the deployment record names no operator)" if deployment is not None else ""
        raise ConfigError(f"signing a request (--key-file) needs the node's chain id and operator: pass {missing} "
                          f"or --deployment deployment.json{hint}")
    return int(chain_id), as_address(operator)


def _generate(args: argparse.Namespace) -> int:
    import grpc

    from loraledger.proto.loraledger.v1 import loraledger_pb2 as pb
    from loraledger.proto.loraledger.v1 import loraledger_pb2_grpc as pb_grpc

    sampling = pb.SamplingParams(max_tokens=max(0, args.max_tokens))
    if args.temperature is not None:
        sampling.temperature = args.temperature
    if args.top_p is not None:
        sampling.top_p = args.top_p
    if args.seed is not None:
        sampling.seed = args.seed
    adapters = [pb.AdapterRef(adapter=n, weight=w) for n, w in (parse_adapter(s) for s in args.adapter)]
    request = pb.GenerateRequest(adapters=adapters, sampling=sampling)
    if args.chat:
        request.chat.messages.append(pb.ChatMessage(role="user", content=args.prompt))
    else:
        request.prompt = args.prompt
    if args.key_file is not None:
        from loraledger.node.chain.keys import load_account
        from loraledger.node.serving.signing import sign_proto_request

        chain_id, operator = signing_target(args.chain_id, args.operator, args.deployment)
        account = load_account(key_file=args.key_file, password_file=args.password_file)
        sign_proto_request(request, account, chain_id=chain_id, operator=operator)
    metadata = [("authorization", f"Bearer {args.api_key}")] if args.api_key else []
    if adapters:  # a fleet's proxy routes on it: the same adapter reaches the node that has it loaded
        metadata.append((ADAPTER_HEADER, routing_key([(a.adapter, a.weight) for a in adapters])))
    with _channel(args) as channel:
        stub = pb_grpc.InferenceStub(channel)
        try:
            if args.stream:
                final = None
                for msg in stub.GenerateStream(request, timeout=args.timeout, metadata=metadata):
                    if msg.HasField("delta"):
                        sys.stdout.write(msg.delta.text)
                        sys.stdout.flush()
                    else:
                        final = msg.final
                print()
            else:
                final = stub.Generate(request, timeout=args.timeout, metadata=metadata)
                print(final.text)
        except grpc.RpcError as e:
            print(f"loraledger generate: {e.code().name}: {e.details()}", file=sys.stderr)
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                print(f"  no node answers at {args.server}: start one with `loraledger node run` "
                      "(or `make run`), or pass --server HOST:PORT", file=sys.stderr)
            return 1
    if final is not None:
        _print_final(final)
    return 0


def _channel(args: argparse.Namespace) -> Any:
    """A plaintext channel, or TLS when --tls-ca is given (with a client certificate when --tls-cert is)."""
    import grpc

    if not args.tls_ca:
        return grpc.insecure_channel(args.server)
    def read(path: str | None) -> bytes | None:
        return Path(path).read_bytes() if path else None

    creds = grpc.ssl_channel_credentials(read(args.tls_ca), read(args.tls_key), read(args.tls_cert))
    return grpc.secure_channel(args.server, creds)


def _print_final(final: Any) -> None:
    print(f"# request {final.request_id}  finish={final.finish_reason}  "
          f"prompt_tokens={final.usage.prompt_tokens}  completion_tokens={final.usage.completion_tokens}")
    if final.HasField("attribution"):
        a = final.attribution
        pairs = ", ".join(f"{i} ({w} bps)" for i, w in zip(a.adapter_ids, a.weights_bps, strict=True))
        print(f"# record {a.record_hash}  adapters {pairs}  datanets {', '.join(a.datanet_ids) or '-'}  fee {a.fee}")
        for c in a.top_contributors:
            print(f"#   {c.account}  {c.share:.2%}")
    else:
        print("# no attribution record (base model or local adapter only)")
