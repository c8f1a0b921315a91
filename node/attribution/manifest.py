"""From a datanet manifest folder to an attribution index beside it.

The datanet is read with the datanet's own reader (`loraledger.node.lineage.datanet`: `load_manifest`,
`read_entry_records`), so both agree on what a datanet credits:

    MANIFEST_DIR/manifest.json           the entries (file, contributor, contribution hash, duplicate lines)
    MANIFEST_DIR/contributions/<file>    the accepted JSONL copies: {"text"} or {"prompt", "completion"} per line

Each entry becomes one `Contribution` whose token ids are its credited records (lines not listed as duplicates),
each record as `prompt ids, BREAK, completion ids` and records joined by BREAK, so a match never spans two
records. The index is written to `MANIFEST_DIR/attribution_index/`.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from loraledger.node.attribution.index import (
    INDEX_DIRNAME,
    RECORD_BREAK,
    Contribution,
    build_index,
    write_index,
)
from loraledger.node.errors import AttributionError
from loraledger.node.lineage.contributions import ContributionError, ContributionLine
from loraledger.node.lineage.datanet import DatanetError, DatanetManifest, load_manifest, read_entry_records


class TextEncoder(Protocol):
    """Anything that turns text into token ids without special tokens."""

    def encode(self, text: str) -> list[int]: ...


@dataclass
class LocalTokenizer:
    """A checkpoint's `tokenizer.json` (Hugging Face `tokenizers`): encode without special tokens.

    sha256: `0x` sha256 of the tokenizer.json bytes (how manifests name their tokenizer);
    vocab_size: ids it can produce, added tokens included.
    """

    source: str
    sha256: str
    vocab_size: int
    _tok: Any

    @classmethod
    def load(cls, model_dir: str | os.PathLike[str]) -> LocalTokenizer:
        from tokenizers import Tokenizer

        path = Path(model_dir) / "tokenizer.json"
        if not path.is_file():
            raise AttributionError(
                f"{model_dir}: no tokenizer.json; pass the checkpoint directory whose tokenizer the datanet was "
                "counted with (e.g. one written by `loraledger model init-tiny`)"
            )
        raw = path.read_bytes()
        tok = Tokenizer.from_str(raw.decode("utf-8"))
        return cls(str(Path(model_dir)), "0x" + hashlib.sha256(raw).hexdigest(),
                   int(tok.get_vocab_size(with_added_tokens=True)), tok)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no BOS/EOS."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        """Text of `ids` (special tokens skipped)."""
        return str(self._tok.decode(ids, skip_special_tokens=True))


def _line_ids(line: ContributionLine, tokenizer: TextEncoder) -> list[int]:
    """A credited line as token ids: plain text as its ids; a pair as `prompt ids, BREAK, completion ids`."""
    if not line.prompt:
        return list(tokenizer.encode(line.completion))
    return list(tokenizer.encode(line.prompt)) + [RECORD_BREAK] + list(tokenizer.encode(line.completion))


def _manifest(manifest_dir: str | os.PathLike[str]) -> DatanetManifest:
    try:
        return load_manifest(manifest_dir)
    except DatanetError as e:
        raise AttributionError(str(e)) from e


def contributions_from_manifest(manifest_dir: str | os.PathLike[str], tokenizer: TextEncoder) -> list[Contribution]:
    """One `Contribution` per manifest entry, in manifest order (module docstring for the token layout).

    The entries' files are read by the datanet's own reader (`read_entry_records`), which checks each copied
    file's sha256 and signature against its entry: the index holds exactly the committed data.
    """
    manifest = _manifest(manifest_dir)
    out: list[Contribution] = []
    for entry in manifest.entries:
        try:
            lines = read_entry_records(manifest_dir, entry, manifest.limits)
        except (DatanetError, ContributionError) as e:
            raise AttributionError(str(e)) from e
        dup = set(entry.duplicate_lines)
        ids: list[int] = []
        for lineno, line in enumerate(lines, start=1):
            if lineno in dup:
                continue
            if ids:
                ids.append(RECORD_BREAK)
            ids.extend(_line_ids(line, tokenizer))
        out.append(Contribution(str(entry.contribution_hash).lower(), str(entry.contributor), ids))
    return out


def index_manifest(manifest_dir: str | os.PathLike[str], tokenizer: LocalTokenizer) -> Path:
    """Build the suffix-array index of a datanet and write it to `manifest_dir/attribution_index/`.

    Refuses a tokenizer other than the one the manifest counted its weights with (when it names one).
    Returns the index folder.
    """
    manifest = _manifest(manifest_dir)
    named = manifest.tokenizer_sha256
    if named and str(named).lower() != tokenizer.sha256:
        raise AttributionError(
            f"{manifest_dir}: the datanet was counted with tokenizer {named}, not {tokenizer.sha256} "
            f"({tokenizer.source}); index it with the same checkpoint's tokenizer"
        )
    contributions = contributions_from_manifest(manifest_dir, tokenizer)
    label = manifest.name or Path(manifest_dir).name
    index = build_index(contributions, tokenizer.vocab_size, tokenizer=tokenizer.sha256, label=label,
                        tokenizer_source=str(Path(tokenizer.source).resolve()))
    return write_index(index, Path(manifest_dir) / INDEX_DIRNAME)
