"""The demo's closing summary: what was deployed, registered and settled, who earned what, and the commands
to talk to the node and devnet it leaves running."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from loraledger.node.chain.keys import ANVIL_DEV_KEYS, DEV_CONTRIBUTORS, DEV_OPERATOR, dev_account
from loraledger.node.demo.processes import NODE_CONFIG, OPERATOR_KEY_ENV
from loraledger.node.demo.stages import DATANET_NAME, DemoContext, EarningsRow
from loraledger.node.lineage.training import load_lineage


def earnings_table(rows: Sequence[EarningsRow]) -> str:
    """The who-earned-what table; amounts in reward-token base units (1 token = 10**18)."""
    head = ("who", "account", "earned", "claimed", "balance")
    body = [(r.role, r.account, str(r.earned), str(r.claimed), str(r.balance)) for r in rows]
    widths = [max(len(x[k]) for x in (head, *body)) for k in range(len(head))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if k < 2 else c.rjust(w) for k, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(head), line(["-" * w for w in widths]), *(line(b) for b in body)])


def report(ctx: DemoContext) -> str:
    """The closing summary: deployment, datanet, adapters, epoch, the earnings table, and what to do next."""
    assert ctx.devnet is not None and ctx.deployment is not None
    rel = os.path.relpath(ctx.state)
    shown = str(ctx.state) if rel.startswith("..") else rel
    cfg = f"--config {shown}/{NODE_CONFIG}"
    ids = [str(a.adapter_id) for a in ctx.adapters] or ["1", "2"]
    addr = ctx.node_address
    alice = dev_account(DEV_CONTRIBUTORS[0]).address
    request_json = json.dumps({"prompt": "Hello", "adapters": [{"adapter": ids[0]}]})
    lines = [
        "", "== loraledger demo: summary ==",
        (f"devnet       {ctx.devnet.rpc_url} (chain id {ctx.deployment.chain_id}); "
         f"ledger {ctx.deployment.addresses.get('AttributionLedger')}"),
        f"datanet      #{ctx.datanet_id} {DATANET_NAME}, root {ctx.datanet_root}",
    ]
    for a in ctx.adapters:
        lines.append(f"adapter      #{a.adapter_id} {a.plan.name}: {a.plan.method} r={a.plan.rank} "
                     f"fee/token {a.plan.fee_per_token}, weights {a.weights_hash}")
        ev = load_lineage(a.path).get("evaluation")  # held-out losses, written by the real-model demo
        if isinstance(ev, dict):
            lines.append(f"             held-out loss {ev['base_loss']:.4f} (base) -> {ev['adapter_loss']:.4f} "
                         f"(adapter) on {ev['held_out']['records']} records not in the datanet "
                         f"(lineage.json: evaluation)")
    lines.append(f"node         {addr} (pid {ctx.node_pid}); HTTP API http://{ctx.http_address}/v1")
    lines.append(f"settled      {ctx.epoch_line}")
    lines.append("")
    lines.append("Who earned what (reward-token base units; 1 token = 10^18). earned = cumulative amount in the "
                 "latest")
    lines.append("rewards root, claimed = AttributionLedger.claimed(operator, account), balance = "
                 "RewardToken.balanceOf:")
    lines += ["", earnings_table(ctx.earnings), "", "The node and the devnet keep running. Talk to them:"]
    lines.append(f"  loraledger generate --server {addr} --adapter {ids[0]} --stream 'The logging module'")
    if len(ids) > 1:  # two adapters merged for one request
        lines.append(f"  loraledger generate --server {addr} --adapter {ids[0]}:0.5 --adapter {ids[1]}:0.5 'Unicode'")
    lines.append(f"  grpcurl -plaintext {addr} list")
    lines.append(f"  curl -s http://{ctx.http_address}/v1/completions -H 'content-type: application/json' "
                 f"-d '{{\"model\": \"{ids[0]}\", \"prompt\": \"The logging module\"}}'")
    lines.append(f"  curl -s http://{ctx.http_address}/metrics | grep loraledger_requests")
    lines.append(f"  grpcurl -plaintext -d '{request_json}' {addr} loraledger.v1.Inference/Generate")
    lines.append(f"  loraledger rewards show {alice} {cfg}")
    lines.append(f"  {OPERATOR_KEY_ENV}={ANVIL_DEV_KEYS[DEV_OPERATOR]} loraledger epoch settle {cfg}")
    if rel == ".loraledger":
        stop = "make stop"
    elif rel.startswith(".loraledger-") and "/" not in rel:  # the Makefile's state of `make run MODEL=NAME`
        stop = f"make stop MODEL={rel.removeprefix('.loraledger-')}"
    else:
        stop = f"loraledger demo --stop --state-dir {shown}"
    lines.append(f"Stop them (node, then devnet): {stop}")
    return "\n".join(lines)
