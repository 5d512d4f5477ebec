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
    window = NoveltyWindow("site", size=size, lsh_params=params)
    for i, s in enumerate(sets):
        window.add(f"snp_{i}", window.hasher.hashvalues(s))
        if i % 50 == 49 or i == len(sets) - 1:  # through the evictions, not only at the end
            for q in queries:
                hv = window.hasher.hashvalues(q)
                for exclude in [None, *window.keys()[::13]]:
                    monkeypatch.setattr(novelty, "SCAN_MAX_SIZE", 0)
                    by_buckets = window.score_hashvalues(hv, exclude)
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
    window = NoveltyWindow("site", size=150, lsh_params=params)
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
