"""Regenerate README.md's "CLI reference" block from the parser itself (`loraledger COMMAND --help`).

    python scripts/gen_cli_reference.py          # rewrites the fenced block under "## CLI reference"
    python scripts/gen_cli_reference.py --check  # exit 1 when the README is stale
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

from loraledger.node.cli import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"
WIDTH = 106


def _groups(usage: str) -> list[str]:
    """`usage` split at the spaces outside brackets: an option and its argument stay on one line."""
    out, cur, depth = [], "", 0
    for ch in usage:
        depth += ch in "[{("
        depth -= ch in "]})"
        if ch == " " and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return [*out, cur] if cur else out


def _wrap(usage: str) -> list[str]:
    lines = [""]
    for g in _groups(usage):
        if lines[-1] and len(lines[-1]) + 1 + len(g) > WIDTH:
            lines.append("      " + g)
        else:
            lines[-1] = f"{lines[-1]} {g}" if lines[-1] else g
    return lines


def _leaves(parser: argparse.ArgumentParser, path: list[str], help_text: str) -> Iterator[tuple[str, str]]:
    """(usage line without "usage: ", help) of every runnable command below `parser`, in definition order."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        usage = parser.format_usage().removeprefix("usage: ").strip()
        yield " ".join(usage.split()), help_text
        return
    helps = {c.dest: c.help or "" for c in subs[0]._choices_actions}
    for name, child in subs[0].choices.items():
        yield from _leaves(child, [*path, name], helps.get(name, ""))


def reference() -> str:
    parser = build_parser()
    parser.prog = "loraledger"
    lines = ["loraledger [-v] [--log-format {text,json}] COMMAND ...",
             "    # every command: -v for debug logging; --log-format json for one JSON object per line"]
    for usage, help_text in _leaves(parser, [], ""):
        if usage.startswith("loraledger [-h]"):
            continue
        usage = usage.replace(" [-h]", "")
        lines += _wrap(usage)
        if help_text:
            lines.append(f"    # {help_text}")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="exit 1 when the README's block is stale")
    args = ap.parse_args()
    text = README.read_text(encoding="utf-8")
    head = text.index("## CLI reference")
    start = text.index("```\n", head) + 4
    end = text.index("```\n", start)
    new = text[:start] + reference() + text[end:]
    if args.check:
        return 0 if new == text else 1
    README.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
