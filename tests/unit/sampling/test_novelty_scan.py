"""The sample stage's cheaper novelty paths against the ones they replace (issue 17): a small
window scored by scanning every row (`NoveltyWindow._scan`) answers as the LSH buckets do; the
buckets, filled without MinHashLSH.insert/remove, hold what MinHashLSH's own would; the token
set, the shipped values and a forwarded turn's signature are what they were."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pytest
from datasketch import MinHashLSH
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pipeline.model.trace import visible_text
from pipeline.sampling import NoveltyPolicy, NoveltyWindow, NoveltyWindows, novelty, session_tokens, shipped_record
from tests.factory import TokenCorpus, text_snapshot


def corpus_sets(n: int, seed: int) -> tuple[list[frozenset[str]], list[frozenset[str]]]:
    """`n` near-duplicates of six sessions, a few empty sets (not indexed), and queries."""
    corpus = TokenCorpus(seed)
    bases = [corpus.session() for _ in range(6)]
    sets = [corpus.near_duplicate(bases[i % 6]) if i % 37 else frozenset() for i in range(n)] + bases
    queries = [corpus.near_duplicate(b) for b in bases] + bases + [corpus.session() for _ in range(10)]
    return sets, queries


@pytest.mark.parametrize("params", [(59, 2), (42, 3), (10, 2)])
@pytest.mark.parametrize("size", [5, 60, 400])
def test_a_scanned_window_answers_as_its_buckets(monkeypatch: pytest.MonkeyPatch, params: tuple[int, int],
                                                 size: int) -> None:
    sets, queries = corpus_sets(500, size)
    window = NoveltyWindow("site", size=size, lsh_params=params, buckets=True)
    bare = NoveltyWindow("site", size=size, lsh_params=params, buckets=False)  # scanned whatever its size
    assert not bare._maps[0] and not NoveltyWindow("site", size=size, lsh_params=params).keeps_buckets
    for i, s in enumerate(sets):
        window.add(f"snp_{i}", window.hasher.hashvalues(s))
        bare.add(f"snp_{i}", window.hasher.hashvalues(s))
        if i % 50 == 49 or i == len(sets) - 1:  # through the evictions, not only at the end
            assert not any(bare._maps)
            for q in queries:
                hv = window.hasher.hashvalues(q)
                assert bare.candidates(hv) == window.candidates(hv)
                assert sorted(bare._candidate_rows(hv).tolist()) == sorted(window.candidates(hv))
                for exclude in [None, *window.keys()[::13]]:
                    monkeypatch.setattr(novelty, "SCAN_MAX_SIZE", 0)
                    by_buckets = window.score_hashvalues(hv, exclude)
                    assert bare.score_hashvalues(hv, exclude) == by_buckets
                    monkeypatch.setattr(novelty, "SCAN_MAX_SIZE", 10**9)
                    assert window.score_hashvalues(hv, exclude) == by_buckets
    hv = window.hasher.hashvalues(frozenset({"nothing", "shared", "here"}))
    assert window.score_hashvalues(hv) == (1.0, None) and window.score_hashvalues(None) == (1.0, None)


@pytest.mark.parametrize("params", [(59, 2), (42, 3)])
def test_the_buckets_hold_what_minhashlsh_would(monkeypatch: pytest.MonkeyPatch, params: tuple[int, int]) -> None:
    # the window fills its buckets itself; a MinHashLSH with its own storage, fed the same
    # inserts and removes through its API, must return the same candidates for every query
    monkeypatch.setattr(novelty, "ARRAY_BUCKET_MIN", 3)
    sets, queries = corpus_sets(700, 5)
    window = NoveltyWindow("site", size=150, lsh_params=params, buckets=True)
    lsh = MinHashLSH(num_perm=window.num_perm, params=params)
    held: list[str] = []
    for i, s in enumerate(sets):
        hv = window.hasher.hashvalues(s)
        if len(held) == window.size:
            gone = held.pop(0)
            if gone in lsh:
                lsh.remove(gone)
        window.add(f"snp_{i}", hv)
        held.append(f"snp_{i}")
        if hv is not None:
            lsh.insert(f"snp_{i}", window.hasher.minhash(hv))
    for q in queries + sets[-40:]:
        hv = window.hasher.hashvalues(q)
        if hv is None:
            continue
        rows = window.candidates(hv)
        assert sorted(window._keys[r] or "" for r in rows) == sorted(lsh.query(window.hasher.minhash(hv)))
        assert sorted(window._candidate_rows(hv).tolist()) == sorted(rows)


def test_an_array_bucket_grows_while_a_view_of_it_is_held() -> None:
    rows = novelty._Rows(range(16))
    held = rows.view()
    for row in range(16, 100):
        rows.add(row)  # grows past its room more than once
    assert held.tolist() == list(range(16)) and sorted(rows.view().tolist()) == list(range(100))
    for row in range(0, 100, 3):
        rows.discard(row)
    assert sorted(rows.view().tolist()) == [r for r in range(100) if r % 3] and rows.view().dtype == np.intp


def reference_tokens(messages: Sequence[Mapping[str, Any]], last: int = 8) -> frozenset[str]:
    """session_tokens as it was: each visible text lower-cased and split on its own."""
    tokens: set[str] = set()
    for message in messages[max(0, len(messages) - last):]:
        for part in message.get("parts") or []:
            text = visible_text(part)
            if text:
                tokens.update(text.lower().split())
    return frozenset(tokens)


# capital and final sigma (lower() reads its neighbours), letters whose lower case is longer,
# kinds of whitespace, case-ignorable marks
LETTERS = "a\u03a3\u03c3\u03c2\u0391\u0130\u0131\u00df \t\n\u00a0\u2028\u3000xY'.-\u01c5\u0345\u00ad"
TEXT = st.text(alphabet=st.sampled_from(list(LETTERS)), max_size=12)
PART = st.fixed_dictionaries({"type": st.sampled_from(["text", "tool", "reasoning"]), "text": TEXT | st.none()},
                             optional={"synthetic": st.booleans(), "ignored": st.booleans()})
MESSAGES = st.lists(st.fixed_dictionaries({"parts": st.lists(PART, max_size=4)}), max_size=10)


@settings(max_examples=500, deadline=None)
@given(MESSAGES, st.integers(min_value=1, max_value=9))
@example([{"parts": [{"type": "text", "text": "\u0391\u03a3"}, {"type": "text", "text": "\u03a3a"}]}], 8)
@example([{"parts": [{"type": "text", "text": "x\u03a3'"}, {"type": "text", "text": "'\u03a3"}]}], 8)
def test_the_token_set_is_the_text_by_text_one(messages: list[dict[str, Any]], last: int) -> None:
    assert session_tokens(messages, last) == reference_tokens(messages, last)


def test_shipped_values_are_the_same_ints_whatever_the_signature_type() -> None:
    values = [0, 1, 2**31, 2**32 - 1] * 32
    kwargs: dict[str, Any] = {"site_key": "s", "snapshot_id": "snp", "trace_id": "tr", "at": 1}
    records = [shipped_record(hashvalues=v, **kwargs)
               for v in (values, np.array(values, dtype=np.uint32), np.array(values, dtype=np.uint64),
                         np.array(values, dtype=np.int64), tuple(np.array(values, dtype=np.uint32)))]
    assert all(r == records[0] for r in records)
    assert all(type(v) is int for r in records for v in r["hashvalues"])


def test_a_forwarded_turns_shipped_signature_is_the_one_it_was_scored_with() -> None:
    policy = NoveltyPolicy(NoveltyWindows(size=50))
    first = text_snapshot(1, "fix the parser tests", "the parser tests pass now")
    other = text_snapshot(2, "write the release notes", "the notes are in CHANGES.md")
    fresh = NoveltyPolicy(NoveltyWindows(size=50))
    policy.evaluate(first)
    # scored first, shipped: the scored signature; another snapshot: its own
    assert policy.shipped_record(first, "tr_1", 5) == fresh.shipped_record(first, "tr_1", 5)
    policy.evaluate(first)
    assert policy.shipped_record(other, "tr_2", 5) == fresh.shipped_record(other, "tr_2", 5)
    assert policy.shipped_record(first, "tr_1", 5) == fresh.shipped_record(first, "tr_1", 5)
    # a decision's view of the snapshot (`{**snapshot, ...}`) shares its messages: the same values
    policy.evaluate({**first, "pair_partner": None})
    assert policy.shipped_record(first, "tr_1", 5)["hashvalues"] == fresh.signature(first).tolist()


def test_only_a_window_too_large_to_scan_keeps_buckets() -> None:
    assert not NoveltyWindow("site", size=novelty.SCAN_MAX_SIZE).keeps_buckets
    assert NoveltyWindow("site", size=novelty.SCAN_MAX_SIZE + 1).keeps_buckets


@pytest.mark.parametrize("num_perm", [128, 16, 20, 248, 256])
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_equal_values_counted_by_words_are_counted(num_perm: int, data: st.DataObject) -> None:
    # 128, 16, 248: counted from 64-bit words; 20 (not whole words) and 256 (a count past a byte):
    # np.count_nonzero itself
    window = NoveltyWindow("site", size=4, num_perm=num_perm, lsh_params=(num_perm // 2, 2))
    rows = data.draw(st.integers(0, 9))
    equal = np.array(data.draw(st.lists(st.lists(st.booleans(), min_size=num_perm, max_size=num_perm),
                                        min_size=rows, max_size=rows)), dtype=bool).reshape(rows, num_perm)
    assert window._count_equal(equal).tolist() == np.count_nonzero(equal, axis=1).tolist()
    full = np.ones((3, num_perm), dtype=bool)
    assert window._count_equal(full).tolist() == [num_perm] * 3


def test_a_forward_learnt_from_its_own_signature_is_the_record_read_back() -> None:
    # ConfiguredSampler learns its own forwards from the array the record was written from;
    # another replica reads the record's list: the same window either way
    sets, _ = corpus_sets(260, 3)
    own, other = NoveltyWindows(size=200), NoveltyWindows(size=200)
    for i, s in enumerate(sets):
        hv = own.hasher.hashvalues(s)
        record = shipped_record(site_key="site", snapshot_id=f"snp_{i}", trace_id=f"tr_{i}", hashvalues=hv, at=i)
        assert own.apply_shipped(record, hv) == other.apply_shipped(record)
    a, b = own.get("site"), other.get("site")
    assert a.keys() == b.keys() and (a._sig == b._sig).all() and (a._indexed == b._indexed).all()
    assert (a._planes == b._planes).all() and (a._seq == b._seq).all()
    values = np.array([0, 1, 2**32 - 1] * 42 + [7, 8], dtype=np.uint32)
    assert a._hashvalues(values).tolist() == a._hashvalues(values.tolist()).tolist()
    assert a._hashvalues(values) is not values
