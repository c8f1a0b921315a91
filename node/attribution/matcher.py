"""Which contributions shaped an answer: longest n-gram matches against datanet suffix arrays, and credit.

For an answer a[0:n] (token ids) and indexes D_1..D_K (see `index.py`):

1. Matching statistics, per index, all start positions at once:
       ms[i] = max { m : a[i:i+m] occurs in the text }, capped at max_match
   One vectorised binary search per index places every pattern a[i:i+W] in the suffix array; the longest
   common prefix with the two neighbouring suffixes is ms[i]. That is n patterns x log2(N) comparison steps,
   each step one numpy gather over all still-undecided rows, so never O(n^2) searches.
2. Longest match ending at each position (infini-gram's "longest suffix"):
       e[i] = i + ms[i]  (non-decreasing: ms[i+1] >= ms[i] - 1)
       s[j] = min { i : e[i] > j };   L[j] = j - s[j] + 1  (0 when s[j] > j)
3. Occurrences of a[s[j]:j+1], two more vectorised binary searches (lower and upper bound): the SA range
   [lo_j, hi_j), count c_j = hi_j - lo_j. The range always contains pos[s[j]], the rank found in step 1, and
   only counts up to occurrence_cap matter, so each bound is searched within occurrence_cap + 1 ranks of it
   (~7 steps instead of ~24). Over several indexes, L[j] is the maximum over them and only the
   indexes reaching it count.
4. Credit. A position j counts when L[j] >= min_match. If c_j > occurrence_cap the phrase is "very common"
   and earns nothing (its occurrences are not enumerated). Else the occurrences name d_j distinct
   contributions (of C contributions in all the indexes), and each of them receives

       credit_j = L[j] * ln(C / d_j) / d_j

   Length: a verbatim span of m tokens adds L = min_match..m at its successive end positions, so long copies
   dominate. Inverse frequency: the credit of a phrase is split over the d_j contributions that hold it, and
   scaled by ln(C / d_j), which is 0 for a phrase every contribution holds: common phrases earn nobody extra
   (and with a single contribution nothing can be told apart, so every credit is 0).
   A contribution's credit is the sum over positions; a contributor's token-level weight is the sum over its
   contributions divided by the total (weights sum to 1; empty when nothing was credited).
5. Spans, for people: for each credited position j and each contribution c holding a[s[j]:j+1], that span
   and the offset of its first occurrence in c, unless c also holds the longer match ending at j + 1 (only
   the maximal spans are listed).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from loraledger.node.attribution.index import DatanetIndex
from loraledger.node.errors import AttributionError

_NO_TOKEN = -3  # answer ids the index cannot hold (out of vocab): smaller than every text symbol, never equal


@dataclass(frozen=True)
class MatcherConfig:
    """min_match: shortest n-gram that earns credit; max_match: longest match measured (cap of the window);
    occurrence_cap: a phrase with more occurrences is "very common" and earns nothing; block: tokens compared
    per numpy step."""

    min_match: int = 4
    max_match: int = 256
    occurrence_cap: int = 64
    block: int = 16

    def __post_init__(self) -> None:
        if self.min_match < 1:
            raise AttributionError(f"min_match must be >= 1, got {self.min_match}")
        if self.max_match < self.min_match:
            raise AttributionError(f"max_match ({self.max_match}) must be >= min_match ({self.min_match})")
        if self.occurrence_cap < 1:
            raise AttributionError(f"occurrence_cap must be >= 1, got {self.occurrence_cap}")
        if self.block < 1:
            raise AttributionError(f"block must be >= 1, got {self.block}")


@dataclass(frozen=True)
class MatchedSpan:
    """answer[answer_start:answer_end] occurs in a contribution, first at token `contribution_offset` of it."""

    answer_start: int
    answer_end: int
    datanet: str
    contribution_hash: str
    contributor: str
    contribution_offset: int
    holders: int  # how many distinct contributions hold this span

    def to_dict(self) -> dict[str, object]:
        return {
            "answer_start": self.answer_start,
            "answer_end": self.answer_end,
            "datanet": self.datanet,
            "contribution_hash": self.contribution_hash,
            "contributor": self.contributor,
            "contribution_offset": self.contribution_offset,
            "holders": self.holders,
        }


@dataclass(frozen=True)
class ContributionCredit:
    """Summed credit of one contribution (see the module docstring for the formula)."""

    datanet: str
    contribution_hash: str
    contributor: str
    credit: float


@dataclass(frozen=True)
class Attribution:
    """The token-level attribution of one answer.

    longest: [n] L[j], the longest match ending at each answer position (0: none, capped at max_match);
    contributor_weights: address -> weight, summing to 1, empty when nothing earned credit;
    very_common: positions whose longest match had more than occurrence_cap occurrences.
    """

    n_tokens: int
    longest: list[int]
    contributions: list[ContributionCredit]
    contributor_weights: dict[str, float]
    spans: list[MatchedSpan]
    very_common: int
    credited_positions: int = field(default=0)

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form (what the node serves with a record)."""
        return {
            "n_tokens": self.n_tokens,
            "credited_positions": self.credited_positions,
            "very_common_positions": self.very_common,
            "contributor_weights": dict(self.contributor_weights),
            "contributions": [
                {"datanet": c.datanet, "contribution_hash": c.contribution_hash, "contributor": c.contributor,
                 "credit": c.credit}
                for c in self.contributions
            ],
            "spans": [s.to_dict() for s in self.spans],
        }


# ---------------------------------------------------------------------------------------------------------
# suffix-array searches, vectorised over rows (one row = one pattern)


def _patterns(answer: npt.NDArray[np.int64], width: int) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int64]]:
    """pats[i, k] = answer[i + k] (or padding past the end): [n, width] int32; plen[i] = min(width, n - i)."""
    n = answer.size
    padded = np.full(n + width, _NO_TOKEN, dtype=np.int32)
    padded[:n] = answer
    pats = np.ascontiguousarray(np.lib.stride_tricks.sliding_window_view(padded, width)[:n])
    plen = np.minimum(width, n - np.arange(n, dtype=np.int64))
    return pats, plen


def _compare(
    index: DatanetIndex,
    text_pos: npt.NDArray[np.int64],
    pats: npt.NDArray[np.int32],
    prow: npt.NDArray[np.int64],
    plen: npt.NDArray[np.int64],
    block: int,
) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.int64]]:
    """Per row r: compare the suffix text[text_pos[r]:] cut to plen[r] tokens with pats[prow[r], :plen[r]].

    Returns cmp[r] in {-1, 0, +1} (suffix < = > pattern) and lcp[r] (common prefix length, <= plen[r]).
    Rows are compared `block` tokens at a time; a row leaves as soon as it differs.
    """
    rows = text_pos.size
    cmp = np.zeros(rows, dtype=np.int8)
    lcp = np.zeros(rows, dtype=np.int64)
    tokens = index.tokens
    width = int(plen.max()) if rows else 0
    todo = np.arange(rows)
    for off in range(0, width, block):
        if todo.size == 0:
            break
        w = min(block, width - off)
        cols = off + np.arange(w)
        tp = text_pos[todo, None] + cols  # [u, w]
        # the text ends with SEP, which differs from every pattern token, so a row always differs at or
        # before the last position: reads past the end (clipped) come after its first difference
        s = np.take(tokens, tp, mode="clip")
        p = pats[prow[todo], off : off + w]
        lens = plen[todo]
        neq = (s != p) & (cols[None, :] < lens[:, None])
        differs = neq.any(axis=1)
        if differs.any():
            which = np.flatnonzero(differs)
            first = neq[which].argmax(axis=1)
            r = todo[which]
            lcp[r] = off + first
            cmp[r] = np.where(s[which, first] < p[which, first], -1, 1)
            keep = ~differs
        else:
            keep = np.ones(todo.size, dtype=bool)
        equal = keep & (lens <= off + w)
        lcp[todo[equal]] = lens[equal]
        todo = todo[keep & ~equal]
    return cmp, lcp


def _bound(
    index: DatanetIndex,
    pats: npt.NDArray[np.int32],
    prow: npt.NDArray[np.int64],
    plen: npt.NDArray[np.int64],
    upper: npt.NDArray[np.bool_],
    block: int,
    lo: npt.NDArray[np.int64] | None = None,
    hi: npt.NDArray[np.int64] | None = None,
) -> npt.NDArray[np.int64]:
    """Per row r (pattern pats[prow[r], :plen[r]]): the first SA rank in [lo[r], hi[r]] (default [0, N])
    whose suffix, cut to plen[r] tokens, is >= the pattern (> where upper[r]); hi[r] when there is none. [r].

    Vectorised binary search: every row halves its own [lo, hi) each step, ~log2(hi - lo) steps in all.
    """
    rows = prow.size
    lo = np.zeros(rows, dtype=np.int64) if lo is None else lo.astype(np.int64, copy=True)
    hi = np.full(rows, index.n_positions, dtype=np.int64) if hi is None else hi.astype(np.int64, copy=True)
    sa = index.sa
    active = np.flatnonzero(lo < hi)
    while active.size:
        mid = (lo[active] + hi[active]) // 2
        cmp, _ = _compare(index, sa[mid].astype(np.int64), pats, prow[active], plen[active], block)
        right = (cmp < 0) | (upper[active] & (cmp == 0))
        lo[active] = np.where(right, mid + 1, lo[active])
        hi[active] = np.where(right, hi[active], mid)
        active = active[lo[active] < hi[active]]
    return lo


def matching_statistics(
    index: DatanetIndex, answer: npt.NDArray[np.int64], max_match: int, block: int = 16
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """ms[i] = length of the longest prefix of answer[i:] (capped at max_match) occurring in the text, and
    pos[i] = the SA rank where P_i = answer[i:i+max_match] would be inserted. Both [n].

    The longest prefix of P shared with any suffix is shared with a neighbour of P's insertion rank.
    """
    n = answer.size
    if n == 0 or index.n_positions == 0:
        return np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    valid = (answer >= 0) & (answer < index.vocab_size)
    answer = np.where(valid, answer, _NO_TOKEN)  # an out-of-vocabulary id (or SEP) must match nothing
    pats, plen = _patterns(answer, min(max_match, n))
    prow = np.arange(n, dtype=np.int64)
    # start each row in the SA block of its first token; ids outside the vocabulary insert at rank 0, match 0
    first = index.first_rank()
    tok = np.where(valid, answer, 0)
    lo0 = np.where(valid, first[tok], 0)
    hi0 = np.where(valid, first[tok + 1], 0)
    pos = _bound(index, pats, prow, plen, np.zeros(n, dtype=bool), block, lo0, hi0)
    best = np.zeros(n, dtype=np.int64)
    sa = index.sa
    for neighbour in (pos - 1, pos):
        ok = (neighbour >= 0) & (neighbour < index.n_positions)
        rows = np.flatnonzero(ok)
        if rows.size:
            _, lcp = _compare(index, sa[neighbour[rows]].astype(np.int64), pats, rows, plen[rows], block)
            best[rows] = np.maximum(best[rows], lcp)
    return best, pos


@dataclass(frozen=True)
class IndexMatches:
    """Per answer position j, for one index: longest[j] = L[j], start[j] = s[j], SA range [lo[j], hi[j])
    of a[s[j]:j+1] (lo = hi = 0 where L[j] < min_match). All [n] int64.

    The range is exact when it holds at most occurrence_cap suffixes; otherwise it is a part of the true range
    still holding more than occurrence_cap (the search looks only cap + 1 ranks either side of pos[s[j]],
    which the true range always contains)."""

    longest: npt.NDArray[np.int64]
    start: npt.NDArray[np.int64]
    lo: npt.NDArray[np.int64]
    hi: npt.NDArray[np.int64]


def longest_suffix_matches(index: DatanetIndex, answer: npt.NDArray[np.int64], cfg: MatcherConfig) -> IndexMatches:
    """Steps 1-3 of the module docstring for one index."""
    answer = _as_answer(answer, index.vocab_size)
    n = answer.size
    ms, pos = matching_statistics(index, answer, cfg.max_match, cfg.block)
    j = np.arange(n, dtype=np.int64)
    ends = np.maximum.accumulate(j + ms) if n else ms
    start = np.searchsorted(ends, j, side="right").astype(np.int64)
    longest = np.where(start <= j, j - start + 1, 0).astype(np.int64)
    lo = np.zeros(n, dtype=np.int64)
    hi = np.zeros(n, dtype=np.int64)
    rows = np.flatnonzero(longest >= cfg.min_match)
    if rows.size:
        width = int(longest[rows].max())
        pats, _ = _patterns(answer, width)
        prow = np.concatenate([start[rows], start[rows]])  # lower and upper bounds in one search
        plen = np.concatenate([longest[rows], longest[rows]])
        upper = np.repeat(np.array([False, True]), rows.size)
        anchor = pos[start[rows]]  # lo <= anchor <= hi for every prefix of P_s
        reach = cfg.occurrence_cap + 1
        lo0 = np.concatenate([np.maximum(anchor - reach, 0), anchor])
        hi0 = np.concatenate([anchor, np.minimum(anchor + reach, index.n_positions)])
        both = _bound(index, pats, prow, plen, upper, cfg.block, lo0, hi0)
        lo[rows] = both[: rows.size]
        hi[rows] = both[rows.size :]
    return IndexMatches(longest=longest, start=np.minimum(start, j), lo=lo, hi=hi)


# ---------------------------------------------------------------------------------------------------------
# credit


def _as_answer(answer_ids: Sequence[int] | npt.NDArray[np.integer], vocab_size: int) -> npt.NDArray[np.int64]:
    """[n] int64 ids; ids outside [0, vocab_size) become a symbol that matches nothing."""
    a = np.asarray(answer_ids, dtype=np.int64).reshape(-1)
    return np.where((a >= 0) & (a < vocab_size), a, _NO_TOKEN)


def attribute(
    answer_ids: Sequence[int] | npt.NDArray[np.integer],
    indexes: Sequence[DatanetIndex],
    cfg: MatcherConfig | None = None,
) -> Attribution:
    """Token-level attribution of one answer over the datanets an adapter was trained on (module docstring).

    answer_ids: [n] token ids of the generated answer (the same tokenizer as the indexes).
    """
    cfg = cfg or MatcherConfig()
    if not indexes:
        raise AttributionError("attribute() needs at least one datanet index")
    vocab = {ix.vocab_size for ix in indexes}
    if len(vocab) != 1:
        raise AttributionError(f"the datanet indexes use different vocabularies {sorted(vocab)}: "
                               "attribute an answer only against datanets of one tokenizer")
    answer = _as_answer(answer_ids, vocab.pop())
    n = int(answer.size)
    per = [longest_suffix_matches(ix, answer, cfg) for ix in indexes]
    longest = np.max(np.stack([m.longest for m in per]), axis=0) if n else np.zeros(0, dtype=np.int64)
    eligible = longest >= cfg.min_match

    base = np.cumsum([0] + [ix.n_contributions for ix in indexes])
    total_contribs = int(base[-1])
    counts = np.zeros(n, dtype=np.int64)
    reach = [eligible & (m.longest == longest) for m in per]
    for m, r in zip(per, reach, strict=True):
        counts += np.where(r, m.hi - m.lo, 0)
    very_common = eligible & (counts > cfg.occurrence_cap)
    credited = eligible & ~very_common

    # enumerate occurrences of credited rows: (answer position j, global contribution id, offset in it)
    occ_j: list[npt.NDArray[np.int64]] = []
    occ_c: list[npt.NDArray[np.int64]] = []
    occ_off: list[npt.NDArray[np.int64]] = []
    for k, (ix, m, r) in enumerate(zip(indexes, per, reach, strict=True)):
        rows = np.flatnonzero(r & credited)
        if rows.size == 0:
            continue
        cnt = m.hi[rows] - m.lo[rows]
        total = int(cnt.sum())
        rep_rows = np.repeat(rows, cnt)
        first = np.repeat(np.cumsum(cnt) - cnt, cnt)
        ranks = np.repeat(m.lo[rows], cnt) + (np.arange(total, dtype=np.int64) - first)
        text_pos = ix.sa[ranks].astype(np.int64)
        contrib = ix.contribution_of(text_pos)
        occ_j.append(rep_rows)
        occ_c.append(contrib + int(base[k]))
        occ_off.append(text_pos - ix.starts[contrib])
    n_credited = int(credited.sum())
    if not occ_j:
        return Attribution(n, longest.tolist(), [], {}, [], int(very_common.sum()), n_credited)
    oj = np.concatenate(occ_j)
    oc = np.concatenate(occ_c)
    ooff = np.concatenate(occ_off)

    # distinct (j, contribution) pairs with the first offset of each: sort by (j, c, offset), keep firsts
    order = np.lexsort((ooff, oc, oj))
    oj, oc, ooff = oj[order], oc[order], ooff[order]
    keep = np.ones(oj.size, dtype=bool)
    keep[1:] = (oj[1:] != oj[:-1]) | (oc[1:] != oc[:-1])
    pj, pc, poff = oj[keep], oc[keep], ooff[keep]
    holders = np.bincount(pj, minlength=n)  # d_j
    d = holders[pj].astype(np.float64)
    pair_credit = longest[pj] * np.log(total_contribs / d) / d
    contrib_credit = np.bincount(pc, weights=pair_credit, minlength=total_contribs)

    starts_of = base.tolist()

    def name(g: int) -> tuple[str, str, str]:
        """global contribution id -> (datanet label, contribution hash, contributor)"""
        k = bisect.bisect_right(starts_of, g) - 1
        ix = indexes[k]
        return ix.label, ix.contribution_hashes[g - starts_of[k]], ix.contributors[g - starts_of[k]]

    credits = [
        ContributionCredit(*name(int(g)), float(contrib_credit[g])) for g in np.flatnonzero(contrib_credit > 0)
    ]
    credits.sort(key=lambda c: (-c.credit, c.datanet, c.contribution_hash))
    by_addr: dict[str, float] = {}
    for c in credits:
        by_addr[c.contributor] = by_addr.get(c.contributor, 0.0) + c.credit
    total_credit = sum(by_addr.values())
    weights = {a: w / total_credit for a, w in sorted(by_addr.items())} if total_credit > 0 else {}

    # spans: a (position j, contribution c) pair ends a span unless c also holds the match ending at j + 1
    # and that match extends this one (L[j + 1] == L[j] + 1)
    extends_next = np.zeros(n, dtype=bool)
    if n > 1:
        extends_next[:-1] = credited[1:] & (longest[1:] == longest[:-1] + 1)
    key = pj * max(1, total_contribs) + pc
    continued = extends_next[pj] & np.isin(key + max(1, total_contribs), key)
    sel = ~continued & (pair_credit > 0)  # a span every contribution holds explains nothing
    spans = [
        MatchedSpan(int(j - longest[j] + 1), int(j + 1), *name(c), contribution_offset=off, holders=int(holders[j]))
        for j, c, off in zip(pj[sel].tolist(), pc[sel].tolist(), poff[sel].tolist(), strict=True)
    ]
    return Attribution(n, longest.tolist(), credits, weights, spans, int(very_common.sum()), n_credited)
