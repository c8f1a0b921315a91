"""Claim rewards: a thin wrapper over `loraledger rewards claim`.

    python scripts/claim_rewards.py --key-file me.json --epoch-file epoch-7.json [--operator ADDR] \
        [--deployment deployment.json] [--rpc-url URL] [--account ADDR]      # from an exported epoch file
    python scripts/claim_rewards.py --key-file me.json --server NODE:50051 [...]  # from the node (GetRewardProof)

The proof (from the epoch file or the node) is checked against the operator's rewards root on chain before anything is sent; a
claim with nothing new to pay sends no transaction.
"""

from __future__ import annotations

import sys

from loraledger.node.cli import main

if __name__ == "__main__":
    sys.exit(main(["rewards", "claim", *sys.argv[1:]]))
