"""Novelty decision speed: MinHash LSH window against the reference's exact Jaccard scan.

    python bench/novelty.py [--sizes 200,10000,100000] [--queries 1000] [--seed 7]

For each window size: fill a NoveltyWindow with that many sessions, then time decisions on
queries (half near-duplicates of a window entry, half unrelated sessions). One LSH decision =
MinHash signature of the token set + LSH query + estimated-Jaccard check of the candidates,
exactly what NoveltyPolicy does per snapshot. The exact scan is the reference's loop (1 - max
Jaccard over every window set), run in the same process on the first queries. Writes a
markdown table to bench/results/novelty.md and prints it.

Sessions come from a seeded generator whose unrelated sessions share common words as real
prose does (Jaccard ~0.09 between two of them, as measured on English docstrings), so the
LSH meets the background it would meet in production rather than disjoint random tokens.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import os
import platform
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.sampling.novelty import (
    DEFAULT_NUM_PERM,
    DEFAULT_THRESHOLD,
    MinHasher,
    NoveltyWindow,
)

RESULTS = Path(__file__).resolve().parent / "results" / "novelty.md"
TARGET_P99_MS = 2.0
TARGET_SPEEDUP = 200.0


class Corpus:
    """Token sets: Zipf-distributed common words plus identifiers unique to each session."""

    def __init__(self, seed: int, vocab: int = 20_000, zipf: float = 1.1) -> None:
        self.rng = np.random.default_rng(seed)
        self.words = [f"w{i}" for i in range(vocab)]
        weights = np.arange(1, vocab + 1, dtype=np.float64) ** -zipf
        self.cdf = np.cumsum(weights) / weights.sum()
        self.next_id = 0

    def fresh(self, n_common: int, n_ids: int) -> set[str]:
        picks = np.searchsorted(self.cdf, self.rng.random(n_common))
        words = {self.words[i] for i in np.minimum(picks, len(self.words) - 1)}
        words.update(f"id{self.next_id + j}" for j in range(n_ids))
        self.next_id += n_ids
        return words

    def session(self) -> frozenset[str]:
        n_common, n_ids = int(self.rng.integers(150, 500)), int(self.rng.integers(20, 120))
        return frozenset(self.fresh(n_common, n_ids))

    def near_duplicate(self, base: frozenset[str]) -> frozenset[str]:
        """Keep 35-98% of `base`, add about as many new tokens: Jaccard ~0.25-0.97."""
        keep = self.rng.uniform(0.35, 0.98)
        ordered = sorted(base)
        kept = {t for t, u in zip(ordered, self.rng.random(len(ordered)), strict=True) if u < keep}
        added = int((1 - keep) * len(base) * self.rng.uniform(0.5, 1.5))
        return frozenset(kept | self.fresh(added // 2, added - added // 2))


def exact_novelty(query: frozenset[str], window: list[frozenset[str]]) -> float:
    """The reference: 1 - max Jaccard; an empty set or window is novel."""
    if not query or not window:
        return 1.0
    best = 0.0
    n = len(query)
    for other in window:
        inter = len(query & other)
        if inter:
            best = max(best, inter / (n + len(other) - inter))
    return 1.0 - best


def run(size: int, queries: int, exact_queries: int, seed: int,
        threshold: float) -> dict[str, float]:
    corpus = Corpus(seed)
    hasher = MinHasher(DEFAULT_NUM_PERM)
    sets = [corpus.session() for _ in range(size)]
    signatures = [hasher.hashvalues(s) for s in sets]
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    t0 = time.perf_counter()
    window = NoveltyWindow("bench", size, DEFAULT_NUM_PERM, threshold=threshold, hasher=hasher)
    for i, sig in enumerate(signatures):
        window.add(f"snp_{i:032x}", sig)
    build_s = time.perf_counter() - t0
    memory = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    del signatures

    qs = [corpus.near_duplicate(sets[int(corpus.rng.integers(size))]) if i % 2 == 0
          else corpus.session() for i in range(queries)]
    gc.collect()
    lsh_ns = np.empty(queries, dtype=np.int64)
    lsh_nov = np.empty(queries)
    for i, q in enumerate(qs):
        t = time.perf_counter_ns()
        lsh_nov[i], _ = window.score(q)
        lsh_ns[i] = time.perf_counter_ns() - t
    n_exact = min(exact_queries, queries)
    exact_ns = np.empty(n_exact, dtype=np.int64)
    exact_nov = np.empty(n_exact)
    for i in range(n_exact):
        t = time.perf_counter_ns()
        exact_nov[i] = exact_novelty(qs[i], sets)
        exact_ns[i] = time.perf_counter_ns() - t

    truth = exact_nov < threshold  # "not novel"
    pred = lsh_nov[:n_exact] < threshold
    tp = int((truth & pred).sum())
    lsh_ms = lsh_ns / 1e6
    exact_ms = exact_ns / 1e6
    return {
        "size": size, "lsh_b": window.lsh_params[0], "lsh_r": window.lsh_params[1],
        "build_s": build_s, "memory_mb": memory / 2**20,
        "lsh_per_s": queries / (lsh_ns.sum() / 1e9),
        "lsh_p50": float(np.percentile(lsh_ms, 50)), "lsh_p99": float(np.percentile(lsh_ms, 99)),
        "exact_per_s": n_exact / (exact_ns.sum() / 1e9),
        "exact_p50": float(np.percentile(exact_ms, 50)),
        "exact_p99": float(np.percentile(exact_ms, 99)),
        # Same queries on both sides, so the ratio is not skewed by the query mix.
        "speedup": float(exact_ns.sum() / lsh_ns[:n_exact].sum()),
        "n_exact": n_exact, "positives": int(truth.sum()),
        "precision": tp / max(int(pred.sum()), 1), "recall": tp / max(int(truth.sum()), 1),
    }


def table(rows: list[dict[str, float]], queries: int) -> str:
    cpu = os.cpu_count()
    lines = [
        "# Novelty decision benchmark",
        "",
        f"- date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {cpu} cores (shared with other work), {platform.machine()}, "
        f"Python {platform.python_version()}, numpy {np.__version__}",
        f"- command: `python bench/novelty.py --sizes {','.join(str(r['size']) for r in rows)} "
        f"--queries {queries}`",
        "- method: one process, one thread. Window filled with N generated sessions (Zipf common "
        "words + unique identifiers; unrelated sessions have Jaccard ~0.09). Queries: half "
        "near-duplicates of a window entry, half unrelated. LSH latency = signature "
        f"(num_perm={DEFAULT_NUM_PERM}) + MinHashLSH query + estimated-Jaccard check of the "
        "candidates; exact = Python set Jaccard against every window entry (the reference's "
        "loop), on the first queries only; speedup = exact time / LSH time on those same "
        "queries. Memory = tracemalloc growth while filling the window (signature matrix + "
        "LSH tables + keys). Agreement = precision/recall of the LSH \"not novel\" decision "
        "against the exact one on the exact-scanned queries.",
        "",
        "| window | LSH b x r | LSH decisions/s | LSH p50 ms | LSH p99 ms | exact decisions/s "
        "| exact p50 ms | exact p99 ms | speedup | window memory MB | agreement P / R (n) "
        "| target |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        target = ""
        if r["size"] >= 100_000:
            ok = r["lsh_p99"] <= TARGET_P99_MS and r["speedup"] >= TARGET_SPEEDUP
            target = ("met" if ok else "MISSED") + (
                f" (p99 <= {TARGET_P99_MS:g} ms, >= {TARGET_SPEEDUP:g}x)")
        lines.append(
            f"| {r['size']:,} | {r['lsh_b']} x {r['lsh_r']} | {r['lsh_per_s']:,.0f} "
            f"| {r['lsh_p50']:.3f} | {r['lsh_p99']:.3f} | {r['exact_per_s']:,.1f} "
            f"| {r['exact_p50']:.2f} | {r['exact_p99']:.2f} | {r['speedup']:,.0f}x "
            f"| {r['memory_mb']:.1f} | {r['precision']:.3f} / {r['recall']:.3f} "
            f"({r['n_exact']}, {r['positives']} not novel) | {target} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="200,10000,100000")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--exact-budget", type=int, default=4_000_000,
                        help="window entries the exact scan may visit per size (bounds its time)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    rows = []
    for size in sizes:
        exact_queries = max(20, args.exact_budget // size)
        row = run(size, args.queries, exact_queries, args.seed, args.threshold)
        print(f"size {size}: LSH p99 {row['lsh_p99']:.3f} ms, speedup {row['speedup']:.0f}x, "
              f"build {row['build_s']:.1f} s", file=sys.stderr)
        rows.append(row)
    text = table(rows, args.queries)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
