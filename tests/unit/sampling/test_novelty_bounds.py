"""The bounds that prune a large window's candidates before the full comparison (issue 17):
the low 5 bits' planes copied into the large buckets (`NoveltyWindow._bounded_buckets`), then
the low byte's planes (`NoveltyWindow._bounded`). A bound may keep rows that cannot be best,
never drop one that can: the answer (best match count, ties to the newest entry) must be the one
comparing every candidate in full gives, whatever the values' low bits share."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.sampling import NoveltyWindow, novelty

# (num_perm, LSH bands x rows): whole 64-bit words, a part word, and more than a byte of words
SHAPES = [(128, (42, 3)), (128, (64, 2)), (20, (10, 2)), (16, (4, 4)), (256, (128, 2))]


def variants(rng: np.random.Generator, q: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """A signature near `q`, each value one of: q's own, the same low byte (a higher bit
    flipped), the same low 4 to 7 bits but not the same byte, or anything: the equal-low-bits
    cases are what make a bound loose."""
    kind = rng.choice(4, size=len(q), p=weights)
    high = np.uint32(1) << rng.integers(8, 32, size=len(q)).astype(np.uint32)
    low = np.uint32(1) << rng.integers(4, 8, size=len(q)).astype(np.uint32)
    other = rng.integers(0, 2**32, size=len(q), dtype=np.uint64).astype(np.uint32)
    return np.select([kind == 0, kind == 1, kind == 2], [q, q ^ high, q ^ low], other).astype(np.uint32)


def full_comparison(window: NoveltyWindow, hv: np.ndarray, exclude: str | None) -> tuple[float, str | None]:
    """What score_hashvalues must answer: every candidate compared in full."""
    skip = window._slots.get(exclude) if exclude is not None else None
    rows = sorted(window.candidates(hv) - {skip})
    if not rows:
        return 1.0, None
    matches = [int(np.count_nonzero(window._sig[r] == hv)) for r in rows]
    best = max(matches)
    newest = max((int(window._seq[r]), r) for r, m in zip(rows, matches, strict=True) if m == best)[1]
    return (window.num_perm - best) / window.num_perm, window._keys[newest]


@settings(max_examples=150, deadline=None)
@given(shape=st.sampled_from(SHAPES), seed=st.integers(0, 2**32 - 1), size=st.integers(3, 40),
       entries=st.integers(1, 70), weights=st.lists(st.integers(0, 6), min_size=4, max_size=4).filter(any),
       array_min=st.sampled_from([2, 3, 10]), planes_min=st.sampled_from([2, 5, 20]),
       bound_min=st.sampled_from([0, 8, 30]), peek=st.sampled_from([(1, 0), (2, 1), (32, 3)]),
       strip=st.booleans())
def test_the_bounds_answer_as_the_full_comparison(shape: tuple[int, tuple[int, int]], seed: int, size: int,
                                                  entries: int, weights: list[int], array_min: int,
                                                  planes_min: int, bound_min: int, peek: tuple[int, int],
                                                  strip: bool) -> None:
    num_perm, params = shape
    rng = np.random.default_rng(seed)
    p = np.array(weights, dtype=float) / sum(weights)
    bases = [rng.integers(0, 2**32, size=num_perm, dtype=np.uint64).astype(np.uint32) for _ in range(3)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(novelty, "ARRAY_BUCKET_MIN", array_min)  # large buckets early
        patch.setattr(novelty, "PLANES_BUCKET_MIN", planes_min)  # and their copies of the planes
        patch.setattr(novelty, "BOUND_BUCKETS_MIN", bound_min)  # read from the copies, or not
        patch.setattr(novelty, "PREFILTER_MIN_CANDIDATES", 0)  # bound every candidate set
        patch.setattr(novelty, "SCAN_MAX_SIZE", 0)  # read the buckets at any size
        patch.setattr(novelty, "PEEK_CANDIDATES", peek[0])  # a poorer first count prunes less
        patch.setattr(novelty, "PEEK_SLACK", peek[1])
        window = NoveltyWindow("site", size=size, num_perm=num_perm, lsh_params=params, buckets=True)
        for i in range(entries):  # more entries than places: evictions move rows within buckets
            signature = None if rng.random() < 0.05 else variants(rng, bases[i % 3], p)
            window.add(f"snp_{i}", signature)
            if rng.random() < 0.1 and signature is not None:
                window.add(f"twin_{i}", signature.copy())  # the same values: ties to the newest
        if strip:
            # a large bucket without its planes (as _Buckets.insert makes them) is read as rows
            for rows_of in window._maps:
                for key, rows in list(rows_of.items()):
                    if isinstance(rows, novelty._Rows) and rng.random() < 0.5:
                        rows_of[key] = novelty._Rows(list(rows))
        queries = [variants(rng, bases[k % 3], p) for k in range(6)] + [bases[0]]
        queries += [window._sig[r].copy() for r in range(min(size, 3))]  # an entry's own values
        for hv in queries:
            for exclude in [None, *window.keys()[::7]]:
                assert window.score_hashvalues(hv, exclude) == full_comparison(window, hv, exclude)
            check_each_bound(window, hv)


def check_each_bound(window: NoveltyWindow, hv: np.ndarray) -> None:
    """Each stage alone keeps every row that matches as many values as the best candidate."""
    candidates = sorted(window.candidates(hv))
    if not candidates:
        return
    matches = {r: int(np.count_nonzero(window._sig[r] == hv)) for r in candidates}
    best = max(matches.values())
    q = window._query_planes(hv)
    _, large = window._lookup(hv)
    copied = [rows for rows in large if rows.planes is not None]
    if copied:
        kept, reached = window._bounded_buckets(copied, q, hv, None)
        in_buckets = {r for rows in copied for r in rows}
        assert reached <= max(matches[r] for r in in_buckets)
        assert {r for r in in_buckets if matches[r] >= reached} <= set(kept.tolist())
    rows = np.array(candidates, dtype=np.intp)
    for reached in (0, best):
        kept_rows = set(window._bounded(rows, hv, q, reached).tolist())
        assert {r for r in candidates if matches[r] == best} <= kept_rows


@settings(max_examples=200, deadline=None)
@given(num_perm=st.sampled_from([16, 20, 64, 128, 200]), data=st.data())
def test_low_planes_hold_each_bit_of_each_low_byte(num_perm: int, data: st.DataObject) -> None:
    words = -(-num_perm // 64)
    low = np.array(data.draw(st.lists(st.integers(0, 255), min_size=64 * words, max_size=64 * words)), dtype=np.uint8)
    planes = novelty._low_planes(low)
    assert planes.shape == (8 * words,) and planes.dtype == np.uint64
    for column in range(64 * words):
        for plane in range(8):
            word = int(planes[column // 64 * 8 + plane])
            assert (word >> (column % 64)) & 1 == (int(low[column]) >> plane) & 1


@settings(max_examples=100, deadline=None)
@given(planes_min=st.integers(1, 40), ops=st.lists(st.tuples(st.booleans(), st.integers(0, 59)), max_size=300))
def test_a_large_buckets_planes_follow_its_rows(planes_min: int, ops: list[tuple[bool, int]]) -> None:
    source = np.arange(60 * 2 * 5, dtype=np.uint64).reshape(60, 2, 5) * np.uint64(0x9E3779B97F4A7C15)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(novelty, "PLANES_BUCKET_MIN", planes_min)
        rows = novelty._Rows([7, 3, 50], source)
        reached = len(rows) >= planes_min
        for add, row in ops:  # grows past its room, and moves the last row into each gap
            if add:
                rows.add(row)
            else:
                rows.discard(row)
            reached = reached or len(rows) >= planes_min
            assert (rows.planes is not None) == reached  # copied once big enough, kept after
            if rows.planes is not None:
                assert rows.planes.shape[2] == len(rows.array)
                assert (rows.planes[..., :len(rows)] == source[rows.view()].transpose(1, 2, 0)).all()
