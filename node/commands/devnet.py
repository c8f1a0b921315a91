"""`loraledger devnet up|down|status`: the local anvil devnet with everything deployed."""

from __future__ import annotations

import argparse

from loraledger.node.chain import devnet_setup
from loraledger.node.chain.devnet import DEFAULT_CHAIN_ID


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("devnet", help="local anvil devnet: up (start + deploy), status, down")
    sub = p.add_subparsers(dest="devnet_command", metavar="ACTION", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--state-dir", default=str(devnet_setup.DEFAULT_STATE_DIR),
                        help="pid, log and deployment.json live here (default: %(default)s)")

    up = sub.add_parser("up", help="start anvil detached (or reuse it), deploy, write deployment.json")
    common(up)
    up.add_argument("--port", type=int, default=0, help="RPC port on 127.0.0.1 (0: a free one)")
    up.add_argument("--chain-id", type=int, default=DEFAULT_CHAIN_ID, help="chain id (default: %(default)s)")
    up.add_argument("--challenge-delay", type=int, default=None,
                    help="seconds before a rewards root takes effect (default: 0 on the dev chain ids 31337 and "
                         "1337, one day on any other --chain-id, where 0 is refused)")
    up.add_argument("--block-time", type=float, default=None, help="seconds per block (default: mine per tx)")
    up.set_defaults(handler=_up)

    st = sub.add_parser("status", help="say whether the devnet runs and what is deployed")
    common(st)
    st.set_defaults(handler=_status)

    dn = sub.add_parser("down", help="stop the devnet")
    common(dn)
    dn.set_defaults(handler=_down)


def _up(args: argparse.Namespace) -> int:
    st, reused = devnet_setup.up(args.state_dir, port=args.port or None, chain_id=args.chain_id,
                                 challenge_delay=args.challenge_delay, block_time=args.block_time)
    print(("reused running devnet" if reused else "devnet up") + f"; stop it with "
          f"`loraledger devnet down --state-dir {args.state_dir}`")
    print(st.describe())
    return 0


def _status(args: argparse.Namespace) -> int:
    st = devnet_setup.status(args.state_dir)
    print(st.describe())
    return 0 if st.running else 3


def _down(args: argparse.Namespace) -> int:
    stopped = devnet_setup.down(args.state_dir)
    print("devnet stopped" if stopped else f"devnet was not running (state dir {args.state_dir})")
    return 0
