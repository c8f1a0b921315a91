"""Render the fleet's HAProxy config (haproxy.cfg.template) for a list of nodes.

    python scripts/fleet/render_haproxy.py --node a=10.0.0.1:50051,10.0.0.1:8000 --node b=10.0.0.2:50051,10.0.0.2:8000 \
        --grpc-listen 0.0.0.0:50050 --http-listen 0.0.0.0:8080 --stats-socket /run/haproxy-fleet.sock > haproxy.cfg
    haproxy -f haproxy.cfg

Each node is NAME=GRPC_HOST:PORT,HTTP_HOST:PORT. The node's /health on its HTTP port decides for both of its
backends, and each node keeps the same server id in both, so an adapter hashes to the same node on both APIs.
Keep a node's NAME and its place in the list when the fleet changes: the hash ring is built from server ids.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from string import Template

TEMPLATE = Path(__file__).with_name("haproxy.cfg.template")
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")
_ADDR = re.compile(r"^[^\s:,]+:\d{1,5}$")


@dataclass(frozen=True)
class FleetNode:
    name: str
    grpc: str  # HOST:PORT of `server.listen`
    http: str  # HOST:PORT of `http.listen` (its /health is the check of both backends)


def parse_node(spec: str) -> FleetNode:
    """"a=127.0.0.1:50051,127.0.0.1:8000" -> FleetNode; ValueError saying what is wrong."""
    name, sep, addrs = spec.partition("=")
    grpc, sep2, http = addrs.partition(",")
    if not sep or not sep2 or not _NAME.match(name) or not _ADDR.match(grpc) or not _ADDR.match(http):
        raise ValueError(f"--node {spec!r}: give NAME=GRPC_HOST:PORT,HTTP_HOST:PORT (name: letters, digits, "
                         "'_.-', at most 32), e.g. a=10.0.0.1:50051,10.0.0.1:8000")
    return FleetNode(name, grpc, http)


def render(nodes: list[FleetNode], grpc_listen: str, http_listen: str, stats_socket: str,
           check_interval_ms: int = 500) -> str:
    """The config text. Server ids are the nodes' 1-based positions."""
    if not nodes:
        raise ValueError("a fleet needs at least one node")
    if len({n.name for n in nodes}) != len(nodes):
        raise ValueError("node names must be unique")
    grpc_lines, http_lines = [], []
    for i, n in enumerate(nodes, start=1):
        http_port = n.http.rpartition(":")[2]
        grpc_lines.append(f"    server {n.name} {n.grpc} id {i} proto h2 check port {http_port} check-proto h1")
        http_lines.append(f"    server {n.name} {n.http} id {i} check")
    return Template(TEMPLATE.read_text()).substitute(
        STATS_SOCKET=stats_socket, CHECK_INTERVAL_MS=int(check_interval_ms), GRPC_LISTEN=grpc_listen,
        HTTP_LISTEN=http_listen, GRPC_SERVERS="\n".join(grpc_lines), HTTP_SERVERS="\n".join(http_lines))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--node", action="append", required=True, metavar="NAME=GRPC,HTTP")
    p.add_argument("--grpc-listen", default="0.0.0.0:50050")
    p.add_argument("--http-listen", default="0.0.0.0:8080")
    p.add_argument("--stats-socket", default="/run/haproxy-loraledger.sock")
    p.add_argument("--check-interval-ms", type=int, default=500)
    args = p.parse_args(argv)
    try:
        text = render([parse_node(s) for s in args.node], args.grpc_listen, args.http_listen, args.stats_socket,
                      args.check_interval_ms)
    except ValueError as e:
        print(f"render_haproxy: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
