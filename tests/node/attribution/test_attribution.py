"""Token-level attribution: suffix-array index, longest-match lookups, credit, weight mixing, pool, CLI."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loraledger.node.attribution import (
    RECORD_BREAK,
    WEIGHT_SCALE,
    AttributionPool,
    Contribution,
    MatcherConfig,
    attribute,
    build_index,
    mix_weights,
    open_index,
    write_index,
)
from loraledger.node.attribution.index import suffix_array, suffix_array_doubling
from loraledger.node.attribution.matcher import longest_suffix_matches
from loraledger.node.errors import AttributionError

A, B, C = "0x" + "a" * 40, "0x" + "b" * 40, "0x" + "c" * 40
VOCAB = 1000


def _occurrences(docs: list[list[int]], pat: list[int]) -> int:
    m = len(pat)
    return sum(1 for d in docs for i in range(len(d) - m + 1) if d[i : i + m] == pat)


def _brute_longest(docs: list[list[int]], answer: list[int], j: int, cap: int) -> int:
    best = 0
    for start in range(j, max(-1, j - cap), -1):
        if _occurrences(docs, answer[start : j + 1]) == 0:
            break
        best = j - start + 1
    return best


@pytest.fixture(scope="module")
def corpus() -> dict[str, list[int]]:
    """Three contributors' texts over disjoint token ranges, plus one phrase every contribution holds."""
    rng = np.random.default_rng(7)
    common = list(range(900, 910))
    texts = {}
    for k, who in enumerate((A, B, C)):
        own = rng.integers(k * 300, k * 300 + 300, size=400).tolist()
        texts[who] = own[:200] + common + own[200:]
    return texts


@pytest.fixture(scope="module")
def index(corpus: dict[str, list[int]]):  # type: ignore[no-untyped-def]
    return build_index(
        [Contribution(f"0x{i:064x}", who, ids) for i, (who, ids) in enumerate(corpus.items())],
        vocab_size=VOCAB, label="toy",
    )


def test_suffix_array_is_sorted_and_equals_doubling() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        text = rng.integers(0, 3, size=int(rng.integers(1, 40))).astype(np.uint16)
        text[rng.random(text.size) < 0.15] = np.iinfo(np.uint16).max  # separators sort last
        sa = suffix_array(text)
        assert sa.tolist() == sorted(range(text.size), key=lambda i: text[i:].tolist())
        assert np.array_equal(sa, suffix_array_doubling(text))
    wide = rng.integers(0, 70_000, size=500).astype(np.uint32)
    assert np.array_equal(suffix_array(wide), suffix_array_doubling(wide))


def test_index_build_is_deterministic_and_compact(tmp_path: Path, corpus: dict[str, list[int]]) -> None:
    contribs = [Contribution(f"0x{i:064x}", who, ids) for i, (who, ids) in enumerate(corpus.items())]
    d1 = write_index(build_index(contribs, VOCAB, tokenizer="0xtok"), tmp_path / "one")
    d2 = write_index(build_index(list(contribs), VOCAB, tokenizer="0xtok"), tmp_path / "two")
    names = sorted(p.name for p in d1.iterdir())
    assert names == ["header.json", "sa.npy", "tokens.npy"]
    for name in names:
        assert (d1 / name).read_bytes() == (d2 / name).read_bytes(), name
    ix = open_index(tmp_path / "one")
    assert ix.tokens.dtype == np.uint16 and ix.sa.dtype == np.uint32
    assert ix.nbytes() == 6 * ix.n_positions
    assert ix.n_positions == sum(len(v) for v in corpus.values()) + 3
    assert ix.contributors == [A, B, C] and ix.tokenizer == "0xtok"
    # every contribution's tokens sit at its start offset
    for k, ids in enumerate(corpus.values()):
        assert ix.tokens[ix.starts[k] : ix.starts[k] + len(ids)].tolist() == ids


def test_open_index_errors_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(AttributionError, match="loraledger datanet index"):
        open_index(tmp_path)
    with pytest.raises(AttributionError, match="outside"):
        build_index([Contribution("0x01", A, [1, 2, VOCAB])], VOCAB)


@settings(max_examples=60, deadline=None)
@given(
    docs=st.lists(st.lists(st.integers(0, 3), max_size=14), max_size=4),
    answer=st.lists(st.integers(0, 4), max_size=12),  # 4 never occurs in the corpus
    block=st.integers(1, 4),
)
def test_lookups_agree_with_brute_force(docs: list[list[int]], answer: list[int], block: int) -> None:
    ix = build_index([Contribution(f"0x{i:02x}", A, d) for i, d in enumerate(docs)], vocab_size=4)
    cfg = MatcherConfig(min_match=1, max_match=6, block=block)
    m = longest_suffix_matches(ix, np.asarray(answer, dtype=np.int64), cfg)
    for j in range(len(answer)):
        want = _brute_longest(docs, answer, j, cap=6)
        assert m.longest[j] == want, (docs, answer, j)
        if want:
            assert m.hi[j] - m.lo[j] == _occurrences(docs, answer[j - want + 1 : j + 1])


def test_record_breaks_stop_matches_and_separators_never_match() -> None:
    ix = build_index([Contribution("0x01", A, [1, 2, 3, RECORD_BREAK, 4, 5, 6])], vocab_size=10)
    m = longest_suffix_matches(ix, np.asarray([1, 2, 3, 4, 5, 6]), MatcherConfig(min_match=1))
    assert m.longest.tolist() == [1, 2, 3, 1, 2, 3]
    sep = ix.separator
    only_seps = build_index([Contribution("0x01", A, []), Contribution("0x02", B, [])], vocab_size=10)
    for index in (ix, only_seps):
        m = longest_suffix_matches(index, np.asarray([3, sep, sep, 4]), MatcherConfig(min_match=1))
        assert m.longest.tolist()[1:3] == [0, 0]


def test_verbatim_copy_gets_the_largest_share(index, corpus: dict[str, list[int]]) -> None:  # type: ignore[no-untyped-def]
    copied = corpus[A][50:90]
    answer = [950, 951] + copied + [952] + corpus[B][10:16] + [953]
    result = attribute(answer, [index])
    w = result.contributor_weights
    assert pytest.approx(sum(w.values())) == 1.0
    assert max(w, key=w.__getitem__) == A and w[A] > 0.8 and w.get(B, 0) > 0 and C not in w
    span = next(s for s in result.spans if s.contributor == A)
    assert (span.answer_start, span.answer_end, span.contribution_offset) == (2, 42, 50)
    assert span.holders == 1 and span.datanet == "toy"
    assert result.contributions[0].contributor == A
    json.dumps(result.to_dict())  # servable as is


def test_common_phrase_earns_nobody_extra(index, corpus: dict[str, list[int]]) -> None:  # type: ignore[no-untyped-def]
    common = list(range(900, 910))
    only_common = attribute([990] + common + [991], [index])
    assert only_common.longest[1:11] == list(range(1, 11))  # it is found ...
    assert only_common.contributor_weights == {} and only_common.contributions == []  # ... and earns nothing
    own = corpus[A][20:30]
    with_common = attribute(own + [990] + common, [index])
    without = attribute(own, [index])
    assert with_common.contributor_weights == without.contributor_weights == {A: 1.0}


def test_no_match_falls_back_to_lineage(index) -> None:  # type: ignore[no-untyped-def]
    result = attribute([999, 998, 997, 996, 995, 5000, -1], [index])  # out-of-vocab ids match nothing either
    assert result.contributor_weights == {} and result.spans == [] and max(result.longest) == 0
    lineage = {A: 400, B: 410, C: 7}
    assert mix_weights(lineage, result.contributor_weights, 0.5) == lineage


def test_very_common_phrases_are_not_enumerated() -> None:
    rep = [1, 2, 3, 4] * 20  # the 4-gram occurs 20 times in A
    ix = build_index([Contribution("0x01", A, rep), Contribution("0x02", B, [7, 8, 9, 6, 5])], vocab_size=10)
    capped = attribute([1, 2, 3, 4], [ix], MatcherConfig(occurrence_cap=8))
    assert capped.very_common == 1 and capped.contributor_weights == {}
    counted = attribute([1, 2, 3, 4], [ix], MatcherConfig(occurrence_cap=64))
    assert counted.very_common == 0 and counted.contributor_weights == {A: 1.0}


def test_several_datanets_credit_the_longest(index, corpus: dict[str, list[int]]) -> None:  # type: ignore[no-untyped-def]
    other = build_index([Contribution("0xff", C, corpus[A][100:108]), Contribution("0xfe", B, [5, 6, 7, 8])],
                        VOCAB, label="other")
    result = attribute(corpus[A][100:120], [index, other])
    assert set(result.contributor_weights) == {A, C}
    assert result.contributor_weights[A] > result.contributor_weights[C]
    assert {s.datanet for s in result.spans} == {"toy", "other"}
    with pytest.raises(AttributionError, match="vocabularies"):
        attribute([1], [index, build_index([], 70_000)])


@settings(max_examples=80, deadline=None)
@given(
    lineage=st.dictionaries(st.sampled_from([A, B, C, "0x" + "d" * 40]), st.integers(0, 10**24), min_size=1),
    raw=st.lists(st.floats(0, 1e6, allow_nan=False), min_size=4, max_size=4),
    lam=st.fractions(0, 1),
)
def test_mix_weights_exact(lineage: dict[str, int], raw: list[float], lam: Fraction) -> None:
    if sum(lineage.values()) == 0:
        with pytest.raises(AttributionError):
            mix_weights(lineage, {}, lam)
        return
    token = {a: r for a, r in zip(sorted(lineage), raw, strict=False)}
    out = mix_weights(lineage, token, lam)
    if lam == 0 or sum(token.values()) == 0:
        assert out == lineage
        return
    assert sum(out.values()) == WEIGHT_SCALE and set(out) == set(lineage)
    assert out == mix_weights(dict(reversed(list(lineage.items()))), token, lam)  # order-independent
    total_l, total_t = sum(lineage.values()), sum(Fraction(v) for v in token.values())
    for a, w in lineage.items():
        exact = ((1 - lam) * Fraction(w, total_l) + lam * Fraction(token.get(a, 0.0)) / total_t) * WEIGHT_SCALE
        assert abs(out[a] - exact) < 1


def test_mix_weights_examples_and_errors() -> None:
    lineage = {A: 3, B: 1}
    assert mix_weights(lineage, {A: 0.0, B: 1.0}, 0) == lineage
    assert mix_weights(lineage, {B: 1.0}, 0.5) == {A: 375 * 10**15, B: 625 * 10**15}  # A keeps half of 3/4
    assert mix_weights({A: 1, B: 1, C: 1}, {A: 1.0}, 0) == {A: 1, B: 1, C: 1}
    thirds = mix_weights({A: 1, B: 1, C: 1}, {A: 1.0, B: 1.0, C: 1.0}, 1)
    assert sum(thirds.values()) == WEIGHT_SCALE and max(thirds.values()) - min(thirds.values()) == 1
    with pytest.raises(AttributionError, match="no lineage weight"):
        mix_weights(lineage, {C: 1.0}, 0.5)
    with pytest.raises(AttributionError, match=r"\[0, 1\]"):
        mix_weights(lineage, {A: 1.0}, 1.5)


def test_pool_attributes_off_thread_like_inline(tmp_path: Path, index, corpus: dict[str, list[int]]) -> None:  # type: ignore[no-untyped-def]
    write_index(index, tmp_path / "dn" / "attribution_index")
    answers = [corpus[A][0:30], corpus[B][5:25] + corpus[C][40:60], [999] * 8]
    with AttributionPool(workers=2) as pool:
        futures = [pool.submit(a, [tmp_path / "dn"]) for a in answers]
        results = [f.result(timeout=60) for f in futures]
        assert pool.index(tmp_path / "dn") is pool.index(str(tmp_path / "dn"))  # opened once
    for a, r in zip(answers, results, strict=True):
        assert r == attribute(a, [index])
    assert set(results[1].contributor_weights) == {B, C}
    strict = AttributionPool(tokenizer_sha256="0x" + "1" * 64)
    with pytest.raises(AttributionError, match="tokenizer"):
        strict.submit(answers[0], [tmp_path / "dn"]).result(timeout=60)
    strict.close()


def test_manifest_to_index_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A real datanet (signed JSONL, lineage's build) -> `datanet index` -> `attribute` credits the copied text."""
    from eth_account import Account

    from loraledger.inference.tiny import train_tokenizer
    from loraledger.node.cli import main
    from loraledger.node.lineage.contributions import sign_contribution
    from loraledger.node.lineage.datanet import build_datanet

    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    train_tokenizer(512).save(str(tok_dir / "tokenizer.json"))  # type: ignore[attr-defined]
    src = tmp_path / "src"
    src.mkdir()
    texts = {
        "alice": ["The quick brown fox jumps over the lazy dog near the riverbank every single morning.",
                  "Shared boilerplate line."],
        "bob": ["Suffix arrays answer substring queries with a binary search over sorted suffixes.",
                {"prompt": "What is a datanet?", "completion": "A signed set of contributions."}],
    }
    accounts = {}
    for i, (name, records) in enumerate(texts.items()):
        acct = Account.from_key(bytes([i + 1]) * 32)
        accounts[name] = acct.address
        path = src / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r if isinstance(r, dict) else {"text": r}) + "\n" for r in records))
        sign_contribution(path, acct)
    dn = tmp_path / "dn"
    build_datanet("demo", src, dn, tokenizer_dir=tok_dir)

    assert main(["datanet", "index", str(dn), "--tokenizer", str(tok_dir)]) == 0
    assert "indexed 2 contributions" in capsys.readouterr().out
    ix = open_index(dn)
    assert ix.label == "demo" and sorted(ix.contributors) == sorted(accounts.values())

    text = "As they say, the quick brown fox jumps over the lazy dog near the riverbank, or so."
    assert main(["attribute", "--datanet", str(dn), "--text", text, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out["contributor_weights"]) == [accounts["alice"]]
    assert main(["attribute", "--datanet", str(dn), "--text", text]) == 0
    assert "quick brown fox" in capsys.readouterr().out
    assert main(["datanet", "index", str(tmp_path), "--tokenizer", str(tok_dir)]) == 1  # no manifest: clean error
    assert "manifest.json" in capsys.readouterr().err
