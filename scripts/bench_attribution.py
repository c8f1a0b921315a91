"""Benchmark token-level attribution on one CPU core: index build speed and size, latency per answer.

Synthetic datanet: Zipf-distributed token ids (like natural text) split into contributions of random length.
Answers of --answer-len tokens: half copy 2-4 spans of the corpus between fresh Zipf tokens, half are all
fresh. Baseline in the same run: a naive numpy scan over the whole corpus for each start position (what one
would do without an index) on a few answers, also checked to give the same longest matches.

    python scripts/bench_attribution.py                      # 10M tokens (the issue's size)
    python scripts/bench_attribution.py --tokens 1000000     # smaller, for a quick look

Writes JSON to benchmarks/results/attribution_cpu.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt
from benchlib import machine_info  # scripts/benchlib.py, beside this script

from loraledger.node.attribution import (
    Contribution,
    MatcherConfig,
    attribute,
    build_index,
    open_index,
    write_index,
)
from loraledger.node.attribution.matcher import longest_suffix_matches


def zipf_tokens(rng: np.random.Generator, n: int, vocab: int, s: float) -> npt.NDArray[np.int64]:
    """n ids with P(id = k) proportional to 1 / (k + 1)^s over the vocabulary."""
    p = 1.0 / np.arange(1, vocab + 1, dtype=np.float64) ** s
    cdf = np.cumsum(p / p.sum())
    return np.minimum(np.searchsorted(cdf, rng.random(n)), vocab - 1).astype(np.int64)


def make_answers(rng: np.random.Generator, corpus: npt.NDArray[np.int64], count: int, length: int, vocab: int,
                 s: float) -> list[npt.NDArray[np.int64]]:
    answers = []
    for k in range(count):
        a = zipf_tokens(rng, length, vocab, s)
        if k % 2 == 0:
            for _ in range(int(rng.integers(2, 5))):
                m = int(rng.integers(16, 64))
                src = int(rng.integers(0, corpus.size - m))
                dst = int(rng.integers(0, length - m))
                a[dst : dst + m] = corpus[src : src + m]
        answers.append(a)
    return answers


def naive_longest(corpus: npt.NDArray[np.unsignedinteger], answer: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """Longest match ending at each answer position by scanning the corpus for every start position."""
    n = answer.size
    ms = np.zeros(n, dtype=np.int64)
    for i in range(n):
        cand = np.flatnonzero(corpus == answer[i])
        length = 0
        while cand.size:
            length += 1
            if i + length >= n:
                break
            nxt = cand + length
            nxt = nxt[nxt < corpus.size]
            cand = nxt[corpus[nxt] == answer[i + length]] - length
        ms[i] = length
    j = np.arange(n)
    ends = np.maximum.accumulate(j + ms)
    start = np.searchsorted(ends, j, side="right")
    return np.where(start <= j, j - start + 1, 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=10_000_000, help="datanet size in tokens")
    ap.add_argument("--vocab", type=int, default=32_000)
    ap.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of the token distribution")
    ap.add_argument("--contributions", type=int, default=5_000)
    ap.add_argument("--answers", type=int, default=200)
    ap.add_argument("--answer-len", type=int, default=256)
    ap.add_argument("--baseline-answers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/attribution_cpu.json")
    args = ap.parse_args()

    rng = np.random.default_rng(args.seed)
    info = machine_info(numpy=np.__version__)
    corpus = zipf_tokens(rng, args.tokens, args.vocab, args.zipf)
    cuts = np.sort(rng.choice(np.arange(1, args.tokens), size=args.contributions - 1, replace=False))
    parts = np.split(corpus, cuts)
    contribs = [Contribution(f"0x{k:064x}", f"0x{k % 997:040x}", p) for k, p in enumerate(parts)]

    t0, c0 = time.perf_counter(), time.process_time()
    built = build_index(contribs, args.vocab, label="bench")
    build_s, build_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        out_dir = write_index(built, Path(tmp) / "attribution_index")
        write_s = time.perf_counter() - t0
        disk = sum(f.stat().st_size for f in out_dir.iterdir())
        index = open_index(out_dir)  # memory-mapped, as served
        answers = make_answers(rng, corpus, args.answers, args.answer_len, args.vocab, args.zipf)
        cfg = MatcherConfig()
        attribute(answers[0], [index], cfg)  # warm the page cache
        lat, cpu = [], []
        for a in answers:
            t0, c0 = time.perf_counter(), time.thread_time()
            attribute(a, [index], cfg)
            cpu.append(time.thread_time() - c0)
            lat.append(time.perf_counter() - t0)
        lat_ms = np.asarray(lat) * 1e3
        cpu_ms = np.asarray(cpu) * 1e3

        base_ms = []
        agree = True
        for a in answers[: args.baseline_answers]:
            t0 = time.perf_counter()
            naive = naive_longest(built.tokens, a)
            base_ms.append((time.perf_counter() - t0) * 1e3)
            ours = longest_suffix_matches(index, a, MatcherConfig(max_match=args.answer_len)).longest
            agree &= bool(np.array_equal(naive, ours))

    n_tok = int(built.lengths.sum())
    result = {
        "benchmark": "token-level attribution (suffix array, infini-gram style longest matches)",
        "machine": info,
        "config": {k: getattr(args, k) for k in ("tokens", "vocab", "zipf", "contributions", "answers",
                                                  "answer_len", "baseline_answers", "seed")},
        "index": {
            "tokens": n_tok,
            "build_s": round(build_s, 3),
            "build_tokens_per_s": round(n_tok / build_s),
            "build_cpu_s": round(build_cpu_s, 3),
            "build_tokens_per_cpu_s": round(n_tok / build_cpu_s),
            "write_s": round(write_s, 3),
            "bytes_on_disk": disk,
            "bytes_per_token": round(disk / n_tok, 3),
            "array_bytes_per_token": round(built.nbytes() / n_tok, 3),
            "build_s_per_million_tokens": round(build_s / (n_tok / 1e6), 3),
            "mib_per_million_tokens": round(disk / 2**20 / (n_tok / 1e6), 3),
        },
        "attribution_ms": {
            "answer_len": args.answer_len,
            "p50": round(float(np.percentile(lat_ms, 50)), 3),
            "p99": round(float(np.percentile(lat_ms, 99)), 3),
            "mean": round(float(lat_ms.mean()), 3),
            "max": round(float(lat_ms.max()), 3),
            "note": "wall clock, one thread; see attribution_cpu_ms for CPU time when the machine is shared",
        },
        "attribution_cpu_ms": {
            "p50": round(float(np.percentile(cpu_ms, 50)), 3),
            "p99": round(float(np.percentile(cpu_ms, 99)), 3),
            "mean": round(float(cpu_ms.mean()), 3),
        },
        "baseline_naive_scan_ms": {
            "answers": len(base_ms),
            "mean": round(float(np.mean(base_ms)), 1) if base_ms else None,
            "same_longest_matches": agree,
        },
        "targets": {"build_tokens_per_s": 1_000_000, "bytes_per_token": 6, "p99_ms": 20},
        "load_avg_1m_at_end": os.getloadavg()[0],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
