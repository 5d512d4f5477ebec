"""Large LSH buckets kept as numpy arrays (`novelty._Rows`): the same candidates and the same
answers as buckets kept as sets, through inserts, shared buckets, evictions and replays."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.sampling import NoveltyWindow, novelty, shipped_record
from tests.factory import TokenCorpus


def records(n: int, seed: int) -> tuple[list[dict], list[frozenset[str]]]:
    """`n` shipped records of near-duplicates of six sessions (so buckets fill up), and queries."""
    corpus = TokenCorpus(seed)
    bases = [corpus.session() for _ in range(6)]
    sets = [corpus.near_duplicate(bases[i % 6]) for i in range(n)] + bases
    window = NoveltyWindow("site", size=1)
    shipped = [shipped_record(site_key="site", snapshot_id=f"snp_{i:032x}", trace_id=f"tr_oc_{i:032x}",
                              hashvalues=window.hasher.hashvalues(s), at=i) for i, s in enumerate(sets)]
    queries = [corpus.near_duplicate(b) for b in bases] + bases + [corpus.session() for _ in range(10)]
    return shipped, queries


def filled(size: int, shipped: list[dict], params: tuple[int, int]) -> NoveltyWindow:
    window = NoveltyWindow("site", size=size, lsh_params=params, buckets=True)
    for record in shipped:
        window.apply_shipped(record)
    return window


@pytest.mark.parametrize("params", [(59, 2), (42, 3)])
def test_array_buckets_answer_as_set_buckets(monkeypatch: pytest.MonkeyPatch, params: tuple[int, int]) -> None:
    shipped, queries = records(900, 21)
    monkeypatch.setattr(novelty, "ARRAY_BUCKET_MIN", 10**9)  # every bucket a set
    as_sets = filled(400, shipped, params)  # 500 evictions
    monkeypatch.setattr(novelty, "ARRAY_BUCKET_MIN", 3)
    as_arrays = filled(400, shipped, params)
    arrays = [rows for buckets in as_arrays._buckets for rows in buckets.map.values()
              if isinstance(rows, novelty._Rows)]
    assert len(arrays) > 10 and not any(isinstance(rows, novelty._Rows) for buckets in as_sets._buckets
                                        for rows in buckets.map.values())
    assert as_arrays.keys() == as_sets.keys()
    for q in queries:
        hv = as_sets.hasher.hashvalues(q)
        expected = set(as_sets._lsh.query(as_sets.hasher.minhash(hv)))
        assert as_arrays.candidates(hv) == expected == as_sets.candidates(hv)
        assert sorted(as_arrays._candidate_rows(hv).tolist()) == sorted(expected)
        assert as_arrays.score_hashvalues(hv) == as_sets.score_hashvalues(hv)
        for key in as_arrays.keys()[::97]:
            assert as_arrays.score_hashvalues(hv, exclude=key) == as_sets.score_hashvalues(hv, exclude=key)


def test_rows_add_and_discard_keep_each_row_once() -> None:
    rows = novelty._Rows([5, 3, 9])
    for row in [3, 11, 12, *range(20, 60)]:
        rows.add(row)
    for row in [5, 20, 59, 100, 3]:
        rows.discard(row)
    expected = {9, 11, 12, *range(21, 59)}
    assert len(rows) == len(expected) and set(rows) == expected
    assert sorted(rows.view().tolist()) == sorted(expected)
    assert 9 in rows and 5 not in rows


def test_an_emptied_array_bucket_leaves_the_index(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(novelty, "ARRAY_BUCKET_MIN", 3)
    window = NoveltyWindow("site", size=4, lsh_params=(59, 2), buckets=True)
    hv = np.arange(1, 129, dtype=np.uint32)
    for i in range(4):
        window.add(f"snp_{i}", hv)  # the same signature: every bucket holds every row
    assert all(isinstance(rows, novelty._Rows) for buckets in window._buckets for rows in buckets.map.values())
    for i in range(4, 8):
        window.add(f"snp_{i}", hv + np.uint32(1000 * i))  # evicts the four, one by one
    assert window.score_hashvalues(hv) == (1.0, None)
    assert all(type(rows) is int for buckets in window._buckets for rows in buckets.map.values())
