"""From a datanet manifest folder to an attribution index beside it.

Reads only the manifest file format (see node/lineage/datanet.py's module docstring):

    MANIFEST_DIR/manifest.json           {"name", "tokenizer_sha256", "entries": [{"file", "contributor",
                                           "contribution_hash", "duplicate_lines"}, ...], ...}
    MANIFEST_DIR/contributions/<file>    the accepted JSONL copies: {"text"} or {"prompt", "completion"} per line

Each entry becomes one `Contribution` whose token ids are its credited records (lines not listed as duplicates),
each record as `prompt ids, BREAK, completion ids` and records joined by BREAK, so a match never spans two
records. The index is written to `MANIFEST_DIR/attribution_index/`.
"""

from __future__ import annotations

import hashlib
import json
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

MANIFEST_FILE = "manifest.json"
FILES_DIR = "contributions"


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


def read_manifest(manifest_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed manifest.json (AttributionError naming the file when missing or malformed)."""
    path = Path(manifest_dir) / MANIFEST_FILE
    if not path.is_file():
        raise AttributionError(f"{manifest_dir}: no {MANIFEST_FILE}; build the datanet with `loraledger datanet build`")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AttributionError(f"{path}: not JSON ({e})") from e
    if not isinstance(d, dict) or not isinstance(d.get("entries"), list):
        raise AttributionError(f"{path}: not a datanet manifest (no 'entries' list)")
    return d


def _record_ids(line: str, where: str, tokenizer: TextEncoder) -> list[int]:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise AttributionError(f"{where}: not JSON ({e})") from e
    if isinstance(rec, dict) and isinstance(rec.get("text"), str):
        return list(tokenizer.encode(rec["text"]))
    if isinstance(rec, dict) and isinstance(rec.get("prompt"), str) and isinstance(rec.get("completion"), str):
        return list(tokenizer.encode(rec["prompt"])) + [RECORD_BREAK] + list(tokenizer.encode(rec["completion"]))
    raise AttributionError(f"{where}: expected {{'text'}} or {{'prompt', 'completion'}}")


def contributions_from_manifest(manifest_dir: str | os.PathLike[str], tokenizer: TextEncoder) -> list[Contribution]:
    """One `Contribution` per manifest entry, in manifest order (module docstring for the token layout).

    Checks each copied file's sha256 against the entry's contribution hash (the index must hold exactly the
    committed data).
    """
    root = Path(manifest_dir)
    manifest = read_manifest(root)
    out: list[Contribution] = []
    for i, e in enumerate(manifest["entries"]):
        try:
            rel, contributor, chash = str(e["file"]), str(e["contributor"]), str(e["contribution_hash"]).lower()
            dup = {int(x) for x in e.get("duplicate_lines", [])}
        except (KeyError, TypeError, ValueError) as err:
            raise AttributionError(f"{root / MANIFEST_FILE}: entry {i} is malformed ({err!r})") from err
        path = root / FILES_DIR / rel
        if not path.is_file():
            raise AttributionError(f"{root}: contribution file {FILES_DIR}/{rel} of entry {i} is missing")
        data = path.read_bytes()
        actual = "0x" + hashlib.sha256(data).hexdigest()
        if actual != chash:
            raise AttributionError(f"{path}: sha256 {actual} is not the manifest's {chash} (the file was changed)")
        ids: list[int] = []
        lines = data.decode("utf-8").splitlines()
        for lineno, line in enumerate(lines, start=1):
            if lineno in dup or not line.strip():
                continue
            if ids:
                ids.append(RECORD_BREAK)
            ids.extend(_record_ids(line, f"{path}:{lineno}", tokenizer))
        out.append(Contribution(chash, contributor, ids))
    return out


def index_manifest(manifest_dir: str | os.PathLike[str], tokenizer: LocalTokenizer) -> Path:
    """Build the suffix-array index of a datanet and write it to `manifest_dir/attribution_index/`.

    Refuses a tokenizer other than the one the manifest counted its weights with (when it names one).
    Returns the index folder.
    """
    manifest = read_manifest(manifest_dir)
    named = manifest.get("tokenizer_sha256")
    if named and str(named).lower() != tokenizer.sha256:
        raise AttributionError(
            f"{manifest_dir}: the datanet was counted with tokenizer {named}, not {tokenizer.sha256} "
            f"({tokenizer.source}); index it with the same checkpoint's tokenizer"
        )
    contributions = contributions_from_manifest(manifest_dir, tokenizer)
    label = str(manifest.get("name", "")) or Path(manifest_dir).name
    index = build_index(contributions, tokenizer.vocab_size, tokenizer=tokenizer.sha256, label=label,
                        tokenizer_source=str(Path(tokenizer.source).resolve()))
    return write_index(index, Path(manifest_dir) / INDEX_DIRNAME)
