"""A suffix-array index over one datanet's contributions, for infini-gram style n-gram lookups.

Layout (C contributions, contribution k of length len_k, SEP the largest value of the token dtype):

    text  = c_0 SEP c_1 SEP ... c_{C-1} SEP                      # N = sum(len_k) + C positions
    start = [0, len_0 + 1, len_0 + len_1 + 2, ...]               # [C] offset of contribution k in text
    sa    = argsort of all suffixes text[i:], lexicographic      # [N] uint32 (uint64 at >= 4G positions)

Order used everywhere (the build and the lookups): tokens compare as integers, SEP is larger than every token
id, and the end of the text is smaller than everything (a proper prefix sorts first). An answer never holds
SEP (ids must be < vocab_size <= SEP), so no match can cross from one contribution into the next.

On disk, in `<dir>/` (normally `<manifest_dir>/attribution_index/`):

    header.json   format, version, dtypes, N, vocab size, tokenizer, and per contribution: hash, contributor,
                  start, length
    tokens.npy    [N] uint16 when vocab_size <= 65535, else uint32
    sa.npy        [N] uint32 when N < 2**32, else uint64

so an index costs 2 + 4 = 6 bytes per token with a small vocabulary. Both arrays are memory-mapped on open.
The build is deterministic: the same contributions give byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt

from loraledger.node.errors import AttributionError

INDEX_DIRNAME = "attribution_index"
"""Name of the index folder inside a datanet's manifest folder."""

FORMAT = "loraledger-attribution-index"
VERSION = 1
RECORD_BREAK = -1
"""A token id a contribution may hold between its records: stored as SEP, so no match spans two records."""
_HEADER = "header.json"
_TOKENS = "tokens.npy"
_SA = "sa.npy"


@dataclass(frozen=True)
class Contribution:
    """One contribution as the index sees it: its content hash, its contributor, its token ids (RECORD_BREAK
    between records or other pieces that were never adjacent in training)."""

    contribution_hash: str
    contributor: str
    token_ids: Sequence[int] | npt.NDArray[np.integer]


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id and the separator fit (vocab_size <= 65535), else uint32."""
    if vocab_size <= 0:
        raise AttributionError(f"vocab_size must be positive, got {vocab_size}")
    if vocab_size <= np.iinfo(np.uint16).max:
        return np.dtype(np.uint16)
    if vocab_size <= np.iinfo(np.uint32).max:
        return np.dtype(np.uint32)
    raise AttributionError(f"vocab_size {vocab_size} does not fit 32-bit token ids")


def suffix_array(text: npt.NDArray[np.unsignedinteger]) -> npt.NDArray[np.signedinteger]:
    """sa[r] = start of the r-th smallest suffix of `text` ([N] -> [N] int32/int64), via libdivsufsort.

    pydivsufsort sorts a uint16/uint32 array as big-endian bytes and keeps the suffixes that start on a token
    boundary; big-endian byte order equals integer order, so this is the token-level suffix array.
    Falls back to `suffix_array_doubling` when pydivsufsort is not installed.
    """
    if text.size == 0:
        return np.zeros(0, dtype=np.int64)
    try:
        from pydivsufsort import divsufsort
    except ImportError:  # the optional extra `attribution` is missing: slower but identical result
        return suffix_array_doubling(text)
    return np.asarray(divsufsort(np.ascontiguousarray(text)))  # int32 below 2**31 positions, else int64


def suffix_array_doubling(text: npt.NDArray[np.integer]) -> npt.NDArray[np.int64]:
    """The same suffix array by prefix doubling in numpy (O(N log^2 N), no Python loop over suffixes).

    rank_k[i] = rank of text[i:i+k]; rank_2k[i] = rank of the pair (rank_k[i], rank_k[i+k] or -1 past the end);
    stop when all ranks are distinct. Used as a fallback and as the oracle in tests.
    """
    n = int(text.size)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    # dense ranks of single tokens
    _, rank = np.unique(np.asarray(text, dtype=np.int64), return_inverse=True)
    rank = rank.astype(np.int64).reshape(-1)
    k = 1
    while True:
        second = np.full(n, -1, dtype=np.int64)
        if k < n:
            second[: n - k] = rank[k:]
        order = np.lexsort((second, rank))  # primary key rank, then second
        r1, r2 = rank[order], second[order]
        new_group = np.empty(n, dtype=np.int64)
        new_group[0] = 0
        new_group[1:] = (r1[1:] != r1[:-1]) | (r2[1:] != r2[:-1])
        new_rank = np.empty(n, dtype=np.int64)
        new_rank[order] = np.cumsum(new_group)
        rank = new_rank
        if rank[order[-1]] == n - 1 or k >= n:
            return order.astype(np.int64)
        k *= 2


@dataclass
class DatanetIndex:
    """A loaded (or freshly built) index; see the module docstring for the layout.

    tokens: [N] uint16|uint32, sa: [N] uint32|uint64, starts/lengths: [C] int64, contributors: [C] str.
    """

    tokens: npt.NDArray[np.unsignedinteger]
    sa: npt.NDArray[np.unsignedinteger]
    starts: npt.NDArray[np.int64]
    lengths: npt.NDArray[np.int64]
    contribution_hashes: list[str]
    contributors: list[str]
    vocab_size: int
    tokenizer: str = ""
    label: str = ""
    tokenizer_source: str = ""
    _first_rank: npt.NDArray[np.int64] | None = field(default=None, repr=False, compare=False)

    def first_rank(self) -> npt.NDArray[np.int64]:
        """[vocab_size + 1]: first_rank[t] = the first SA rank of the suffixes starting with token t, so those
        suffixes are sa[first_rank[t]:first_rank[t + 1]]. One counting pass over the tokens, cached."""
        if self._first_rank is None:
            v = self.vocab_size
            counts = np.bincount(np.minimum(self.tokens, v), minlength=v + 1)[:v]
            first = np.zeros(v + 1, dtype=np.int64)
            np.cumsum(counts, out=first[1:])
            self._first_rank = first
        return self._first_rank

    @property
    def separator(self) -> int:
        """The separator id: the largest value of the token dtype, never a real token id."""
        return int(np.iinfo(self.tokens.dtype).max)

    @property
    def n_positions(self) -> int:
        """N: tokens plus one separator per contribution."""
        return int(self.tokens.size)

    @property
    def n_contributions(self) -> int:
        return len(self.contribution_hashes)

    def contribution_of(self, positions: npt.NDArray[np.integer]) -> npt.NDArray[np.int64]:
        """Contribution index holding each text position: searchsorted(starts, pos, 'right') - 1."""
        return np.searchsorted(self.starts, positions, side="right").astype(np.int64) - 1

    def nbytes(self) -> int:
        """Bytes of the two arrays (what the index costs on disk and in the page cache)."""
        return int(self.tokens.nbytes + self.sa.nbytes)


def build_index(
    contributions: Iterable[Contribution],
    vocab_size: int,
    tokenizer: str = "",
    label: str = "",
    tokenizer_source: str = "",
) -> DatanetIndex:
    """Concatenate the contributions (SEP after each) and suffix-sort them; see the module docstring.

    tokenizer: an identifier of the tokenizer (its tokenizer.json sha256), checked by users of the index;
    tokenizer_source: where it was loaded from (a hint for the CLI); label: the datanet's name in results.
    Raises AttributionError when a token id is outside [0, vocab_size) (RECORD_BREAK aside).
    """
    dtype = token_dtype(vocab_size)
    sep = int(np.iinfo(dtype).max)
    parts: list[npt.NDArray[np.unsignedinteger]] = []
    hashes: list[str] = []
    owners: list[str] = []
    lengths: list[int] = []
    sep_arr = np.array([sep], dtype=dtype)
    for c in contributions:
        ids = np.asarray(c.token_ids, dtype=np.int64).reshape(-1)
        brk = ids == RECORD_BREAK
        ids = np.where(brk, sep, ids)
        bad_mask = ((ids < 0) | (ids >= vocab_size)) & ~brk
        if bad_mask.any():
            bad = int(ids[bad_mask][0])
            raise AttributionError(
                f"contribution {c.contribution_hash} holds token id {bad} outside [0, {vocab_size}): "
                "index it with the tokenizer the datanet was built with"
            )
        parts.append(ids.astype(dtype))
        parts.append(sep_arr)
        hashes.append(c.contribution_hash)
        owners.append(c.contributor)
        lengths.append(int(ids.size))
    text = np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
    lens = np.asarray(lengths, dtype=np.int64)
    starts = np.zeros(len(lengths), dtype=np.int64)
    if lens.size:
        starts[1:] = np.cumsum(lens[:-1] + 1)
    sa = suffix_array(text)
    sa_dtype = np.uint32 if text.size < 2**32 else np.uint64
    return DatanetIndex(
        tokens=text,
        sa=sa.astype(sa_dtype),
        starts=starts,
        lengths=lens,
        contribution_hashes=hashes,
        contributors=owners,
        vocab_size=int(vocab_size),
        tokenizer=tokenizer,
        label=label,
        tokenizer_source=tokenizer_source,
    )


def write_index(index: DatanetIndex, out_dir: str | Path) -> Path:
    """Write header.json, tokens.npy, sa.npy into `out_dir` (created; files replaced atomically)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    header = {
        "format": FORMAT,
        "version": VERSION,
        "label": index.label,
        "tokenizer": index.tokenizer,
        "tokenizer_source": index.tokenizer_source,
        "vocab_size": index.vocab_size,
        "token_dtype": index.tokens.dtype.name,
        "sa_dtype": index.sa.dtype.name,
        "n_positions": index.n_positions,
        "n_tokens": int(index.lengths.sum()),
        "tokens_sha256": "0x" + hashlib.sha256(np.ascontiguousarray(index.tokens).tobytes()).hexdigest(),
        "contributions": [
            {"hash": h, "contributor": a, "start": int(s), "length": int(n)}
            for h, a, s, n in zip(
                index.contribution_hashes, index.contributors, index.starts, index.lengths, strict=True
            )
        ],
    }
    for name, arr in ((_TOKENS, index.tokens), (_SA, index.sa)):
        tmp = out / (name + ".tmp")
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(arr), allow_pickle=False)
        os.replace(tmp, out / name)
    tmp = out / (_HEADER + ".tmp")
    tmp.write_text(json.dumps(header, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, out / _HEADER)  # header last: its presence means the arrays are complete
    return out


def open_index(index_dir: str | Path, mmap: bool = True) -> DatanetIndex:
    """Load an index written by `write_index`; arrays memory-mapped read-only unless mmap=False.

    Accepts the index folder itself or a manifest folder holding `attribution_index/`.
    """
    root = Path(index_dir)
    if not (root / _HEADER).is_file() and (root / INDEX_DIRNAME / _HEADER).is_file():
        root = root / INDEX_DIRNAME
    header_path = root / _HEADER
    if not header_path.is_file():
        raise AttributionError(
            f"no attribution index in {Path(index_dir)}: expected {_HEADER} there or in {INDEX_DIRNAME}/; "
            "build it with `loraledger datanet index MANIFEST_DIR`"
        )
    try:
        header = json.loads(header_path.read_text())
    except json.JSONDecodeError as e:
        raise AttributionError(f"{header_path} is not valid JSON: {e}") from e
    if header.get("format") != FORMAT or header.get("version") != VERSION:
        raise AttributionError(
            f"{header_path} is not a {FORMAT} v{VERSION} header (format={header.get('format')!r}, "
            f"version={header.get('version')!r}); rebuild the index"
        )
    mode: Literal["r"] | None = "r" if mmap else None
    try:
        tokens = np.load(root / _TOKENS, mmap_mode=mode, allow_pickle=False)
        sa = np.load(root / _SA, mmap_mode=mode, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise AttributionError(f"cannot read the index arrays in {root}: {e}; rebuild the index") from e
    n = int(header["n_positions"])
    if tokens.shape != (n,) or sa.shape != (n,) or tokens.dtype.name != header["token_dtype"] \
            or sa.dtype.name != header["sa_dtype"]:
        raise AttributionError(
            f"index arrays in {root} do not match its header (tokens {tokens.dtype}{tokens.shape}, "
            f"sa {sa.dtype}{sa.shape}, header N={n}); rebuild the index"
        )
    if n and int(tokens[-1]) != int(np.iinfo(tokens.dtype).max):
        raise AttributionError(f"{root / _TOKENS} does not end with the separator: not a built index; rebuild it")
    contribs = header["contributions"]
    return DatanetIndex(
        tokens=np.asarray(tokens),  # a plain ndarray view over the memmap: cheaper fancy indexing
        sa=np.asarray(sa),
        starts=np.asarray([c["start"] for c in contribs], dtype=np.int64),
        lengths=np.asarray([c["length"] for c in contribs], dtype=np.int64),
        contribution_hashes=[c["hash"] for c in contribs],
        contributors=[c["contributor"] for c in contribs],
        vocab_size=int(header["vocab_size"]),
        tokenizer=str(header.get("tokenizer", "")),
        label=str(header.get("label", "")),
        tokenizer_source=str(header.get("tokenizer_source", "")),
    )
