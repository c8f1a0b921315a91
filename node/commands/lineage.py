"""Lineage commands: contributors, contributions, datanets, training, adapter registration.

    loraledger contributor register --key-file F --profile URI
    loraledger contributor payout --key-file F ADDR
    loraledger contribution sign --key-file F FILE
    loraledger datanet build --name N --from DIR --out MANIFEST_DIR [--tokenizer MODEL_DIR] [--deployment F]
    loraledger datanet register MANIFEST_DIR
    loraledger datanet verify MANIFEST_DIR [--tokenizer MODEL_DIR] [--offline]
    loraledger train --base MODEL_DIR --datanet MANIFEST_DIR ... --method lora|qlora --out ADAPTER_DIR
                     [--device cpu|cuda|auto] [--dtype auto|float32|bfloat16] [--grad-accum K]
    loraledger adapter register ADAPTER_DIR --fee-per-token X
    loraledger adapter verify ADAPTER_DIR --id N --base MODEL_DIR
    loraledger adapter reproduce ID [--base MODEL_DIR] [--datanet MANIFEST_DIR ...] [--lineage PATH] [--json]
        exit 0 reproduced, 1 differs, 3 cannot reproduce here (other stack), 2 could not run

Chain access: `--deployment PATH` (deployment.json from `devnet up` or `deploy`; RPC URL from its record
unless `--rpc-url`). Keys (loraledger.node.chain.keys): `--key-file` keystore (password from $LORALEDGER_KEY_PASSWORD or
`--password-file`), else $LORALEDGER_PRIVATE_KEY; on a devnet `--dev-account I` picks anvil's account I.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from loraledger.node.chain.devnet_setup import DEFAULT_STATE_DIR, DEPLOYMENT_FILE
from loraledger.node.chain.keys import PASSWORD_ENV, PRIVATE_KEY_ENV
from loraledger.node.errors import ConfigError

DEFAULT_DEPLOYMENT = str(DEFAULT_STATE_DIR / DEPLOYMENT_FILE)
Parsers = argparse._SubParsersAction  # type: ignore[type-arg]


def _chain_args(p: argparse.ArgumentParser, *, default: str | None = DEFAULT_DEPLOYMENT) -> None:
    where = (f"$LORALEDGER_DEPLOYMENT, else ./deployment.json, else {default}" if default
             else "none: no chain check")
    p.add_argument("--deployment", default=default, metavar="PATH",
                   help=f"deployment.json of the contracts (default: {where})")
    p.add_argument("--rpc-url", help="JSON-RPC endpoint (default: $LORALEDGER_CHAIN_RPC_URL, else the one recorded "
                                     "in the deployment)")


def _key_args(p: argparse.ArgumentParser, *, required: bool = False) -> None:
    p.add_argument(
        "--key-file",
        required=required,
        help=f"keystore (password in ${PASSWORD_ENV} or --password-file); else ${PRIVATE_KEY_ENV}",
    )
    p.add_argument("--password-file", help="file whose first line is the keystore password")
    if not required:
        p.add_argument(
            "--dev-account", type=int, metavar="I", help="devnet only: sign with anvil's account I"
        )


def add_commands(subparsers: Parsers) -> None:
    _add_contributor(subparsers)
    _add_contribution(subparsers)
    _add_datanet(subparsers)
    _add_train(subparsers)
    _add_adapter(subparsers)


def _add_contributor(subparsers: Parsers) -> None:
    p = subparsers.add_parser(
        "contributor", help="data contributors: register on chain, set a payout address"
    )
    sub = p.add_subparsers(dest="contributor_command", metavar="ACTION", required=True)
    reg = sub.add_parser("register", help="register the key's account in the ContributorRegistry")
    _key_args(reg)
    reg.add_argument("--profile", default="", metavar="URI", help="public profile URI (may be empty)")
    _chain_args(reg)
    reg.set_defaults(handler=_contributor_register)
    pay = sub.add_parser("payout", help="compute the key's rewards to ADDR from the next epoch on")
    _key_args(pay)
    pay.add_argument("address", metavar="ADDR", help="payout address")
    _chain_args(pay)
    pay.set_defaults(handler=_contributor_payout)


def _add_contribution(subparsers: Parsers) -> None:
    p = subparsers.add_parser("contribution", help="contribution files: sign one with your key")
    sub = p.add_subparsers(dest="contribution_command", metavar="ACTION", required=True)
    sign = sub.add_parser("sign", help="write FILE.sig.json: EIP-191 signature over the file's sha256")
    _key_args(sign)
    sign.add_argument("file", metavar="FILE", help="the JSONL contribution")
    sign.add_argument("--force", action="store_true", help="replace an existing signature file")
    sign.set_defaults(handler=_contribution_sign)


def _add_datanet(subparsers: Parsers) -> None:
    p = subparsers.add_parser("datanet", help="datanets: contributions -> manifest, root, registration")
    sub = p.add_subparsers(dest="datanet_command", metavar="ACTION", required=True)
    build = sub.add_parser("build", help="validate signed contributions and write a datanet manifest")
    build.add_argument("--name", required=True, help="datanet name")
    build.add_argument(
        "--from", dest="from_dir", required=True, metavar="DIR", help="folder of *.jsonl + .sig.json"
    )
    build.add_argument("--out", required=True, metavar="MANIFEST_DIR", help="output folder (must not exist)")
    build.add_argument(
        "--tokenizer",
        metavar="MODEL_DIR",
        help="weigh records in tokens of this checkpoint's tokenizer (default: UTF-8 bytes)",
    )
    build.add_argument("--strict", action="store_true", help="fail when any file is rejected")
    build.add_argument("--force", action="store_true", help="replace an existing --out")
    _chain_args(build, default=None)
    build.set_defaults(handler=_datanet_build)
    reg = sub.add_parser("register", help="register a built datanet on chain (stores the id in the manifest)")
    reg.add_argument("manifest_dir", metavar="MANIFEST_DIR")
    reg.add_argument("--uri", help="where the contribution list is served (default: file:// of the manifest)")
    _key_args(reg)
    _chain_args(reg)
    reg.set_defaults(handler=_datanet_register)
    ver = sub.add_parser(
        "verify", help="recompute a datanet's root and compare with the manifest and the chain"
    )
    ver.add_argument("manifest_dir", metavar="MANIFEST_DIR")
    ver.add_argument("--tokenizer", metavar="MODEL_DIR", help="also recount the weights with this tokenizer")
    ver.add_argument("--offline", action="store_true", help="do not compare with the chain")
    _chain_args(ver)
    ver.set_defaults(handler=_datanet_verify)


def _add_train(subparsers: Parsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a LoRA/QLoRA adapter on datanets (peft), write its lineage"
    )
    p.add_argument("--base", required=True, metavar="MODEL_DIR", help="base checkpoint (Hugging Face format)")
    p.add_argument(
        "--datanet",
        action="append",
        required=True,
        metavar="MANIFEST_DIR",
        help="a built datanet (repeat for several)",
    )
    p.add_argument(
        "--method", choices=("lora", "qlora"), default="lora", help="qlora: base in nf4 (bitsandbytes)"
    )
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument(
        "--targets", default="q,k,v,o", help="comma list of q,k,v,o,gate,up,down (default: %(default)s)"
    )
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument(
        "--device", default="cpu", help="cpu, cuda, cuda:N or auto (cuda when present) (default: %(default)s)"
    )
    p.add_argument(
        "--dtype", default="float32", choices=("auto", "float32", "bfloat16"),
        help="base model dtype; auto = bfloat16 where the GPU supports it, else float32 (default: %(default)s)",
    )
    p.add_argument(
        "--grad-accum", type=int, default=1, metavar="K",
        help="micro-batches of --batch-size per optimizer step (default: %(default)s)",
    )
    p.add_argument("--threads", type=int, help="torch threads (default: torch's; recorded in the config)")
    p.add_argument("--out", required=True, metavar="ADAPTER_DIR", help="output adapter folder")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=_train)


def _add_adapter(subparsers: Parsers) -> None:
    p = subparsers.add_parser("adapter", help="adapters: register on chain, verify against the chain")
    sub = p.add_subparsers(dest="adapter_command", metavar="ACTION", required=True)
    reg = sub.add_parser("register", help="register a trained adapter (stores the id in lineage.json)")
    reg.add_argument("adapter_dir", metavar="ADAPTER_DIR")
    reg.add_argument("--fee-per-token", required=True, help="reward-token units per prompt+completion token")
    reg.add_argument("--uri", help="where the weights are served (default: file:// of ADAPTER_DIR)")
    _key_args(reg)
    _chain_args(reg)
    reg.set_defaults(handler=_adapter_register)
    ver = sub.add_parser("verify", help="check an adapter's weights and base against its registration")
    ver.add_argument("adapter_dir", metavar="ADAPTER_DIR")
    ver.add_argument("--id", type=int, help="adapter id (default: the one in lineage.json)")
    ver.add_argument("--base", required=True, metavar="MODEL_DIR", help="the base checkpoint it will run on")
    _chain_args(ver)
    ver.set_defaults(handler=_adapter_verify)
    rep = sub.add_parser(
        "reproduce",
        help="retrain a registered adapter from its recorded config and data; exit 0 reproduced, 1 differs, "
        "3 cannot reproduce here",
    )
    rep.add_argument("adapter_id", type=int, metavar="ID", help="on-chain adapter id")
    rep.add_argument("--base", metavar="MODEL_DIR", help="base checkpoint (default: the lineage's)")
    rep.add_argument(
        "--datanet",
        action="append",
        metavar="MANIFEST_DIR",
        help="a datanet of the adapter (default: the lineage's)",
    )
    rep.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: %(default)s)")
    rep.add_argument(
        "--lineage", metavar="PATH", help="lineage.json or its folder (default: at the registered file: URI)"
    )
    rep.add_argument("--json", action="store_true", help="print the verdict as JSON")
    _chain_args(rep)
    rep.set_defaults(handler=_adapter_reproduce)


# ----------------------------------------------------------------------------------------------- helpers


def _account(args: argparse.Namespace) -> Any:
    from loraledger.node.chain.keys import dev_account, load_account

    if getattr(args, "dev_account", None) is not None:
        if args.key_file:
            raise ConfigError("pass either --key-file or --dev-account, not both")
        return dev_account(args.dev_account)
    return load_account(key_file=args.key_file, password_file=args.password_file)


def _contracts(args: argparse.Namespace, account: Any | None = None) -> Any:
    """Contracts of `--deployment` over `--rpc-url` (or the recorded one), bound to `account` (a throwaway
    account for read-only use when None)."""
    from eth_account import Account

    from loraledger.node.chain.bindings import Contracts
    from loraledger.node.chain.client import ChainClient
    from loraledger.node.chain.devnet_setup import read_deployment, web3_for
    from loraledger.node.config import load_config

    cfg = load_config(None)  # the environment's deployment and RPC URL ($LORALEDGER_DEPLOYMENT, ...)
    path = args.deployment
    if path == DEFAULT_DEPLOYMENT:  # not given: $LORALEDGER_DEPLOYMENT, then ./deployment.json, then the devnet's
        path = cfg.chain.deployment
    dep = read_deployment(path)
    rpc = args.rpc_url or cfg.chain.rpc_url or dep.extra.get("rpcUrl")
    if not rpc:
        raise ConfigError(f"{path} records no RPC URL (a public chain's deployment never does); pass --rpc-url or "
                          "set $LORALEDGER_CHAIN_RPC_URL")
    w3 = web3_for(str(rpc))
    if int(w3.eth.chain_id) != dep.chain_id:
        raise ConfigError(f"{rpc} serves chain {w3.eth.chain_id}, but {path} is for chain {dep.chain_id}")
    return Contracts.at(ChainClient(w3, account if account is not None else Account.create()), dep.addresses)


# ---------------------------------------------------------------------------------------------- handlers


def _contributor_register(args: argparse.Namespace) -> int:
    account = _account(args)
    c = _contracts(args, account)
    if c.contributors.is_registered(account.address):
        print(f"{account.address} is already registered")
        return 0
    res = c.contributors.register(args.profile)
    print(f"registered contributor {account.address} (tx {res['tx_hash']})")
    return 0


def _contributor_payout(args: argparse.Namespace) -> int:
    from loraledger.node.types import as_address

    account = _account(args)
    payout = as_address(args.address)
    res = _contracts(args, account).contributors.set_payout_address(payout)
    print(f"rewards of {account.address} go to {payout} from the next epoch on (tx {res['tx_hash']})")
    return 0


def _contribution_sign(args: argparse.Namespace) -> int:
    from loraledger.node.lineage.contributions import sign_contribution

    account = _account(args)
    out = sign_contribution(args.file, account, overwrite=args.force)
    print(f"signed {args.file} as {account.address} -> {out}")
    return 0


def _datanet_build(args: argparse.Namespace) -> int:
    from loraledger.node.lineage.datanet import build_datanet

    if args.rpc_url and not args.deployment:
        raise ConfigError("--rpc-url needs --deployment (the ContributorRegistry address comes from it)")
    registry = _contracts(args).contributors if args.deployment else None
    m = build_datanet(args.name, args.from_dir, args.out, args.tokenizer, registry, overwrite=args.force)
    for r in m.rejected:
        print(f"rejected {r.file}: {r.reason}")
    print(
        f"datanet {m.name!r}: {m.contribution_count} contributions, weight {m.total_weight} {m.weight_unit}, "
        f"root {m.root} -> {Path(args.out) / 'manifest.json'}"
    )
    if args.strict and m.rejected:
        print(f"--strict: {len(m.rejected)} file(s) rejected")
        return 1
    return 0


def _datanet_register(args: argparse.Namespace) -> int:
    from loraledger.node.lineage.datanet import register_datanet

    reg = register_datanet(args.manifest_dir, _contracts(args, _account(args)), args.uri)
    print(f"registered datanet {reg.datanet_id} on chain {reg.chain_id} (tx {reg.tx_hash})")
    return 0


def _datanet_verify(args: argparse.Namespace) -> int:
    from loraledger.node.lineage.datanet import verify_manifest

    contracts = None if args.offline else _contracts(args)
    m = verify_manifest(args.manifest_dir, contracts, args.tokenizer)
    where = "manifest" if contracts is None else f"manifest and chain (datanet {m.datanet_id})"
    print(f"ok: root {m.root} over {m.contribution_count} contributions matches the {where}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from loraledger.node.lineage.training import train_adapter

    r = train_adapter(
        args.base,
        args.datanet,
        args.method,
        args.rank,
        args.alpha,
        args.targets,
        args.epochs,
        args.lr,
        args.seed,
        args.out,
        args.max_seq_len,
        args.batch_size,
        device=args.device,
        threads=args.threads,
        overwrite=args.force,
        progress=not args.no_progress,
        grad_accum=args.grad_accum,
        dtype=args.dtype,
    )
    weights = ", ".join(f"{w['contributor']}={w['tokens']}" for w in r.lineage["lineage_weights"])
    print(
        f"trained {args.method} adapter -> {r.out_dir}: {r.lineage['steps']} steps, final loss "
        f"{r.lineage['final_loss']:.4f}\n  weights hash {r.weights_hash}\n  lineage tokens {weights}"
    )
    return 0


def _adapter_register(args: argparse.Namespace) -> int:
    from loraledger.node.lineage.registration import register_adapter
    from loraledger.node.types import as_wei

    reg = register_adapter(
        args.adapter_dir, _contracts(args, _account(args)), as_wei(args.fee_per_token), args.uri
    )
    print(
        f"registered adapter {reg.adapter_id} on chain {reg.chain_id} (datanets {list(reg.datanet_ids)}, "
        f"tx {reg.tx_hash})"
    )
    return 0


def _adapter_verify(args: argparse.Namespace) -> int:
    from loraledger.node.lineage.registration import verify_adapter_against_chain
    from loraledger.node.lineage.training import load_lineage

    adapter_id = args.id
    if adapter_id is None:
        reg = load_lineage(args.adapter_dir).get("registration")
        if not reg:
            raise ConfigError(f"{args.adapter_dir} is not registered; pass --id N")
        adapter_id = int(reg["adapter_id"])
    info = verify_adapter_against_chain(args.adapter_dir, adapter_id, _contracts(args), args.base)
    print(
        json.dumps(
            {
                "adapter_id": adapter_id,
                "ok": True,
                "weights_hash": info.weights_hash,
                "base_model_hash": info.base_model_hash,
                "datanet_ids": [int(i) for i in info.datanet_ids],
            },
            indent=2,
        )
    )
    return 0


def _adapter_reproduce(args: argparse.Namespace) -> int:
    from loraledger.node.errors import NodeError
    from loraledger.node.lineage.reproduce import reproduce_adapter

    try:
        r = reproduce_adapter(
            args.adapter_id,
            _contracts(args),
            base_dir=args.base,
            manifest_dirs=args.datanet,
            lineage_path=args.lineage,
            device=args.device,
        )
    except (NodeError, OSError) as e:
        print(
            json.dumps({"adapter_id": args.adapter_id, "error": str(e)}) if args.json else f"cannot run: {e}"
        )
        return 2
    print(json.dumps(r.to_dict(), indent=2) if args.json else r.describe())
    return r.exit_code
