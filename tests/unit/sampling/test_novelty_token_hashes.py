"""The remembered token hashes (`novelty._TokenHashes`): always sha1_hash32, bounded, and the
common words kept across a generation change."""

from __future__ import annotations

import numpy as np
from datasketch.hashfunc import sha1_hash32

from pipeline.sampling import novelty


def expected(tokens: list[str]) -> list[int]:
    return [sha1_hash32(t.encode("utf-8", "surrogatepass")) for t in tokens]


def test_values_are_sha1_hash32_through_generation_changes() -> None:
    hashes = novelty._TokenHashes(generation=50)
    common = ["the", "a", "\ud800", "ünïcødé"]
    for i in range(40):
        tokens = common + [f"id{i}_{j}" for j in range(7)] + ["x" * 100]
        assert hashes(tokens).tolist() == expected(tokens)
        assert len(hashes.young) <= 50 and len(hashes.old) <= 50
    assert all(t in hashes.young or t in hashes.old for t in common)  # seen in every call: kept
    assert "x" * 100 not in hashes.young and "x" * 100 not in hashes.old  # blobs are not kept
    assert "id0_0" not in hashes.young and "id0_0" not in hashes.old  # one-off ids age out


def test_a_token_only_in_the_old_generation_moves_back() -> None:
    hashes = novelty._TokenHashes(generation=3)
    hashes(["w", "a", "b"])
    hashes(["c"])  # young was full: w, a, b become the old generation
    assert "w" in hashes.old and hashes.young == {"c": sha1_hash32(b"c")}
    assert hashes(["w"]).tolist() == expected(["w"]) and "w" in hashes.young
    assert hashes(frozenset()).dtype == np.uint32
