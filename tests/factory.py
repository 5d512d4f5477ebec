"""Session data in the daemon's shapes (as in tests/fixtures/opencode), for tests and benchmarks."""

from __future__ import annotations

import random
from typing import Any

import numpy as np

from pipeline.model.envelope import turn_ended
from pipeline.model.snapshot import SessionState, build_snapshot

_VOCABULARY = """
refactor parser module tests failing build cache deploy config schema kafka topic stream sampler
novelty scrub panel rater diff patch commit branch merge lint types docs readme install package
version upgrade release error trace span metric log alert
"""
WORDS = tuple(_VOCABULARY.split())

SEEDED_SECRETS = [
    "alice.jones@example.com",
    "sk-proj-4fJ9aQ2xZ7vB1nM8kL3pR6tY0wE5uI2oP9aS4dF7gH1jK",
    "AKIAIOSFODNN7EXAMPLE",
    "ghp_16C7e42F292c6912E7710c838347Ae178B4a",
]
SEEDED_ASSIGNMENT = "OPENAI_API_KEY=sk-live-abcdefghijklmnopqrstuvwxyz0123456789"


def _part(sid: str, mid: str, n: int, **fields: Any) -> dict[str, Any]:
    return {"id": f"prt_{mid[4:]}{n:03d}", "sessionID": sid, "messageID": mid, **fields}


def messages(session_id: str, turns: int = 2, *, seed: int = 0, tool_error: bool = False,
             api_error: bool = False, with_secrets: bool = False, words: int = 40) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    t0 = 1795236913836 + seed * 1000
    for turn in range(turns):
        uid, aid = f"msg_{seed:04d}{turn:03d}u", f"msg_{seed:04d}{turn:03d}a"
        text = " ".join(rng.choice(WORDS) for _ in range(words))
        if with_secrets:
            text += f" contact {SEEDED_SECRETS[0]} key {SEEDED_SECRETS[1]}"
        out.append({"info": {"id": uid, "sessionID": session_id, "role": "user", "time": {"created": t0 + turn},
                             "agent": "build", "model": {"providerID": "stub", "modelID": "stub-model"}},
                    "parts": [_part(session_id, uid, 0, type="text", text=text)]})
        status = "error" if tool_error and turn == turns - 1 else "completed"
        state: dict[str, Any] = {"status": status, "input": {"command": "ls -la", "description": "List"},
                                 "time": {"start": t0, "end": t0 + 1}}
        if status == "error":
            state["error"] = "File not found: missing.txt"
        else:
            state["output"] = "a.txt\nb.txt" + (f"\n{SEEDED_ASSIGNMENT}\n{SEEDED_SECRETS[2]}" if with_secrets else "")
            state["metadata"] = {"exit": 0}
        info: dict[str, Any] = {"id": aid, "sessionID": session_id, "role": "assistant", "parentID": uid,
                                "modelID": "stub-model", "providerID": "stub", "mode": "build", "agent": "build",
                                "time": {"created": t0 + turn, "completed": t0 + turn + 1}, "finish": "stop"}
        if api_error and turn == turns - 1:
            info["error"] = {"name": "APIError", "data": {"message": "Bad Request", "statusCode": 400,
                                                          "isRetryable": False}}
        reply = " ".join(rng.choice(WORDS) for _ in range(words))
        if with_secrets:
            reply += f" token {SEEDED_SECRETS[3]}"
        out.append({"info": info, "parts": [
            _part(session_id, aid, 0, type="step-start"),
            _part(session_id, aid, 1, type="text", text=reply),
            _part(session_id, aid, 2, type="tool", tool="bash", callID=f"call_{turn}", state=state),
        ]})
    return out


def turn_ended_envelope(i: int, *, host: str = "h1", site_key: str = "pk_test_thirdparty",
                        **kw: Any) -> dict[str, Any]:
    """The collector's `pipeline.turn_ended` envelope for session i (what ingest reads)."""
    sid = f"ses_test{i:06d}"
    msgs = messages(sid, seed=i, **kw)
    session = {"id": sid, "projectID": "global", "directory": "/home/dev/project", "title": f"session {i}"}
    return turn_ended(host=host, site_key=site_key, session=session, messages=msgs, trigger="session.idle",
                      received_at_ms=1795236913836 + i)


def snapshot(i: int, *, host: str = "h1", site_key: str = "pk_test_thirdparty", **kw: Any) -> dict[str, Any]:
    """The snapshot ingest makes of turn_ended_envelope(i, ...)."""
    env = turn_ended_envelope(i, host=host, site_key=site_key, **kw)
    return build_snapshot(env, SessionState(), max_messages=25, now_ms=1795236913836 + i)


def text_turn_envelope(i: int, user_text: str, reply_text: str, *, host: str = "h1",
                       site_key: str = "pk_test_thirdparty", model: str | None = None, ended_at: int = 3,
                       tool_error: bool = False) -> dict[str, Any]:
    """The `pipeline.turn_ended` envelope of a one-turn session with exactly this text; `model`
    (`provider/model`) names who answered, so the turn can pair; `tool_error` adds a failed tool
    call to the answer."""
    sid = f"ses_txt{i:06d}"
    uid, aid = f"msg_{i:06d}u", f"msg_{i:06d}a"
    answered: dict[str, Any] = {}
    if model is not None:
        provider, model_id = model.split("/", 1)
        answered = {"providerID": provider, "modelID": model_id, "agent": "build", "mode": "build"}
    reply = [_part(sid, aid, 0, type="text", text=reply_text)]
    if tool_error:
        reply.append(_part(sid, aid, 1, type="tool", tool="bash", callID="call_1",
                           state={"status": "error", "input": {"command": "false"}, "error": "exit 1"}))
    msgs = [
        {"info": {"id": uid, "sessionID": sid, "role": "user", "time": {"created": 1}},
         "parts": [_part(sid, uid, 0, type="text", text=user_text)]},
        {"info": {"id": aid, "sessionID": sid, "role": "assistant", "time": {"created": 2, "completed": ended_at},
                  "finish": "stop", **answered},
         "parts": reply},
    ]
    session = {"id": sid, "projectID": "global", "directory": "/w", "title": f"text {i}"}
    return turn_ended(host=host, site_key=site_key, session=session, messages=msgs, trigger="session.idle",
                      received_at_ms=1795236913836 + i)


def text_snapshot(i: int, user_text: str, reply_text: str, **kw: Any) -> dict[str, Any]:
    """The snapshot ingest makes of text_turn_envelope(i, ...) (for novelty tests: the token sets
    are known)."""
    env = text_turn_envelope(i, user_text, reply_text, **kw)
    return build_snapshot(env, SessionState(), max_messages=25, now_ms=1795236913836 + i)


class TokenCorpus:
    """Seeded token sets of sessions: Zipf-distributed common words (unrelated sessions share ~9% of
    their tokens, as English prose does) plus identifiers of their own; near-duplicates keep 35-98%
    of one. The novelty tests and bench/novelty.py draw from it."""

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
