"""pipeline/sampling/pairing.py: the pair window's rules, as properties."""

from __future__ import annotations

from dataclasses import asdict

from hypothesis import given
from hypothesis import strategies as st

from pipeline.sampling.pairing import HOUR_MS, PairWindow, Turn, pair_id

WINDOW = PairWindow(24 * HOUR_MS, max_turns=16)


def turn(n: int, agent: str, ended_at: int = 0) -> Turn:
    return Turn(trace_id=f"tr_oc_{n:032x}", agent_id=agent, host=f"h{n}", session_id=f"ses_{n}",
                snapshot_id=f"snp_{n:032x}", partition=0, offset=n, ended_at=ended_at)


def run(window: PairWindow, arrivals: list[Turn]) -> tuple[list[tuple[str, str]], list[Turn]]:
    """Feed turns in arrival order; the pairs formed (trace ids) and the window after."""
    turns: list[Turn] = []
    pairs: list[tuple[str, str]] = []
    for t in arrivals:
        turns = window.live(turns, t.ended_at)
        partner = window.partner(turns, t)
        if partner is not None:
            pairs.append((partner.trace_id, t.trace_id))
        turns = window.admit(turns, t, partner)
    return pairs, turns


def test_same_prompt_on_two_models_pairs_once_in_either_order() -> None:
    a, b = turn(1, "p/a"), turn(2, "p/b", ended_at=1000)
    for order in ([a, b], [b, a]):
        pairs, turns = run(WINDOW, order)
        assert len(pairs) == 1
        assert {t.pair_id for t in turns} == {pair_id(a.trace_id, b.trace_id)}


@given(st.lists(st.integers(0, 10 * HOUR_MS), min_size=1, max_size=12))
def test_same_model_never_pairs(ends: list[int]) -> None:
    pairs, _ = run(WINDOW, [turn(i, "p/a", e) for i, e in enumerate(ends)])
    assert pairs == []


@given(st.lists(st.booleans(), min_size=1, max_size=14), st.randoms(use_true_random=False))
def test_two_agents_pair_as_often_whatever_the_order(agents: list[bool], rng: object) -> None:
    arrivals = [turn(i, "p/a" if is_a else "p/b", ended_at=i) for i, is_a in enumerate(agents)]
    shuffled = list(arrivals)
    rng.shuffle(shuffled)  # type: ignore[attr-defined]
    expected = min(sum(agents), len(agents) - sum(agents))
    small = PairWindow(24 * HOUR_MS, max_turns=len(agents) + 1)
    for order in (arrivals, shuffled):
        pairs, _ = run(small, order)
        assert len(pairs) == expected
        in_pairs = [tid for pair in pairs for tid in pair]
        assert len(in_pairs) == len(set(in_pairs))  # a turn is in one pair at most


def test_turns_further_apart_than_the_window_do_not_pair() -> None:
    pairs, turns = run(WINDOW, [turn(1, "p/a", 0), turn(2, "p/b", 24 * HOUR_MS + 1)])
    assert pairs == [] and [t.agent_id for t in turns] == ["p/b"]  # the old one is evicted


@given(st.lists(st.tuples(st.sampled_from(["p/a", "p/b", "p/c"]), st.integers(0, 200 * HOUR_MS)), max_size=60),
       st.integers(2, 8))
def test_eviction_bounds_memory(arrivals: list[tuple[str, int]], max_turns: int) -> None:
    window = PairWindow(24 * HOUR_MS, max_turns=max_turns)
    turns: list[Turn] = []
    newest = 0
    for i, (agent, ended) in enumerate(arrivals):
        t = turn(i, agent, ended)
        newest = max(newest, ended)
        turns = window.live(turns, t.ended_at)
        turns = window.admit(turns, t, window.partner(turns, t))
        assert len(turns) <= max_turns
    assert all(t.ended_at >= (arrivals[-1][1] if arrivals else 0) - 24 * HOUR_MS for t in turns)


def test_a_turn_round_trips_through_the_table() -> None:
    t = turn(3, "p/a", 5)
    assert Turn.from_dict(t.to_dict()) == t


def reference_to_dict(t: Turn) -> dict[str, object]:
    """Turn.to_dict as it was: dataclasses.asdict (a deep copy), the decision copied one level."""
    data = asdict(t)
    data["decision"] = dict(t.decision) if t.decision is not None else None
    return data


JSON_LEAF = st.none() | st.booleans() | st.integers() | st.text(max_size=8)
DECISION = st.dictionaries(st.text(max_size=8), st.recursive(
    JSON_LEAF, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8), max_size=5)


@given(st.builds(Turn, trace_id=st.text(), agent_id=st.text(), host=st.text(), session_id=st.text(),
                 snapshot_id=st.text(), partition=st.integers(), offset=st.integers(), ended_at=st.integers(),
                 forwarded=st.none() | st.text(), decision=st.none() | DECISION, pair_id=st.none() | st.text()))
def test_a_turn_is_written_as_asdict_wrote_it(t: Turn) -> None:
    # the same keys in the same order (the changelog's bytes), the same values
    written = t.to_dict()
    expected = reference_to_dict(t)
    assert list(written) == list(expected) and written == expected
    assert Turn.from_dict(written) == t
