"""`loraledger datanet index` and `loraledger attribute`: build a datanet's suffix-array index, and show which
contributions a text matches (the token-level attribution a record would carry)."""

from __future__ import annotations

import argparse
import json
import time

from loraledger.node.attribution.index import open_index
from loraledger.node.attribution.manifest import LocalTokenizer, index_manifest
from loraledger.node.attribution.matcher import MatcherConfig, attribute
from loraledger.node.errors import AttributionError


def _datanet_actions(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    """The ACTION sub-parsers of `loraledger datanet`: the lineage module's when it registered `datanet`
    first, else a `datanet` group of our own."""
    existing = subparsers.choices.get("datanet")
    if existing is None:
        p = subparsers.add_parser("datanet", help="datanets: contributions -> manifest, root, index")
        return p.add_subparsers(dest="datanet_command", metavar="ACTION", required=True)
    for action in existing._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return existing.add_subparsers(dest="datanet_command", metavar="ACTION", required=True)


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ix = _datanet_actions(subparsers).add_parser(
        "index", help="build the suffix-array index of a datanet (MANIFEST_DIR/attribution_index/)")
    ix.add_argument("manifest_dir", metavar="MANIFEST_DIR", help="datanet folder holding manifest.json")
    ix.add_argument("--tokenizer", required=True, metavar="MODEL_DIR",
                    help="checkpoint folder whose tokenizer.json the datanet was counted with")
    ix.set_defaults(handler=_index)

    at = subparsers.add_parser("attribute", help="show which datanet contributions a text matches, and why")
    at.add_argument("--datanet", action="append", required=True, metavar="MANIFEST_DIR",
                    help="an indexed datanet (repeat for an adapter trained on several)")
    at.add_argument("--text", required=True, help="the answer text to attribute")
    at.add_argument("--tokenizer", metavar="MODEL_DIR",
                    help="tokenizer checkpoint (default: the one the first index was built with)")
    at.add_argument("--min-match", type=int, default=MatcherConfig.min_match,
                    help="shortest n-gram that earns credit (default: %(default)s)")
    at.add_argument("--json", action="store_true", help="print the attribution as JSON")
    at.set_defaults(handler=_attribute)


def _index(args: argparse.Namespace) -> int:
    tok = LocalTokenizer.load(args.tokenizer)
    t0 = time.perf_counter()
    out = index_manifest(args.manifest_dir, tok)
    index = open_index(out)
    took = time.perf_counter() - t0
    print(f"indexed {index.n_contributions} contributions, {int(index.lengths.sum())} tokens "
          f"({index.nbytes() / max(1, index.n_positions):.1f} bytes/token) in {took:.2f}s -> {out}")
    return 0


def _attribute(args: argparse.Namespace) -> int:
    indexes = [open_index(d) for d in args.datanet]
    source = args.tokenizer or indexes[0].tokenizer_source
    if not source:
        raise AttributionError("the index names no tokenizer folder; pass --tokenizer MODEL_DIR")
    tok = LocalTokenizer.load(source)
    for d, ix in zip(args.datanet, indexes, strict=True):
        if ix.tokenizer and ix.tokenizer != tok.sha256:
            raise AttributionError(f"{d} was indexed with tokenizer {ix.tokenizer}, not {tok.sha256} ({source}); "
                                   "pass the matching --tokenizer")
    ids = tok.encode(args.text)
    result = attribute(ids, indexes, MatcherConfig(min_match=args.min_match))
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    print(f"{result.n_tokens} tokens, {result.credited_positions} credited positions, "
          f"{result.very_common} very common")
    if not result.contributor_weights:
        print("no contribution matched: the record keeps the lineage split")
        return 0
    print("contributors (token-level weight):")
    for addr, w in sorted(result.contributor_weights.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"  {addr}  {w:.4f}")
    print("contributions (credit):")
    for c in result.contributions:
        print(f"  {c.datanet}  {c.contribution_hash}  {c.contributor}  {c.credit:.3f}")
    print("spans (answer tokens [start, end) -> contribution @ token offset):")
    for s in result.spans:
        text = tok.decode(ids[s.answer_start : s.answer_end])
        print(f"  [{s.answer_start}, {s.answer_end}) {s.contribution_hash[:12]}.. @{s.contribution_offset} "
              f"(in {s.holders}): {text!r}")
    return 0
