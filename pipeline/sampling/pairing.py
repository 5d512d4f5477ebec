"""The pair window: turns of one prompt (`prompt_ref`) answered by different agents (`agent_id`)
within a window of time, whichever hosts they ran on, become a pair the panel's raters compare.

Pure state over one prompt's recent turns. The sample stage keeps it per prompt_ref in its
changelog table (sessions.idle is keyed by prompt_ref, so one partition, and one replica, sees
every turn of a prompt); `pipeline replay` keeps it in memory. A turn is remembered by where it
sits in sessions.idle, not by its content, so the window costs a few hundred bytes a turn; a
partner's snapshot is read back from the topic when the pair forms.

Rules:
- two turns pair when their agent_ids differ and they ended at most `window_ms` apart; a turn
  is in at most one pair (a third agent waits for a fourth turn);
- a new turn pairs with the earliest-arrived turn still unpaired (so for two agents the number
  of pairs is the same whatever the order of arrival);
- turns older than the window behind the newest one seen are forgotten, and at most
  `max_turns` are kept per prompt (the oldest go first): memory is bounded by the prompts seen
  within a window, which the stage's sweep bounds (pipeline/sampling/pairing.py: `expired`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from pipeline.sampling.base import Decision

HOUR_MS = 3_600_000
DEFAULT_WINDOW_HOURS = 24.0
DEFAULT_MAX_TURNS = 16


@dataclass(frozen=True)
class Turn:
    """One decided turn of a prompt, as the window remembers it."""

    trace_id: str
    agent_id: str
    host: str
    session_id: str
    snapshot_id: str
    partition: int  # where its snapshot sits in sessions.idle
    offset: int
    ended_at: int  # epoch ms
    forwarded: str | None = None  # the reason it was forwarded for, None: not forwarded
    decision: Mapping[str, Any] | None = None  # its decision as forwarded, to send again with the pair
    pair_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        # Every field but `decision` is a str, an int or None, which `dataclasses.asdict` would
        # only deep-copy into an equal value; `decision` was always copied one level (`dict`),
        # so a dict of the fields as they are is what asdict gave, without its deep copy
        # (a tenth of the sample stage's decision; tests/unit/sampling/test_pairing.py).
        data = {name: getattr(self, name) for name in _TURN_FIELDS}
        data["decision"] = dict(self.decision) if self.decision is not None else None
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Turn:
        return cls(**{name: data.get(name) for name in cls.__dataclass_fields__})  # type: ignore[arg-type]


_TURN_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Turn))


def pair_id(a: str, b: str) -> str:
    """`pair_<24 hex>` of two trace ids, the same whichever comes first."""
    return "pair_" + hashlib.sha256("|".join(sorted((a, b))).encode()).hexdigest()[:24]


def pair_facts(turn: Turn, partner: Turn, prompt_ref: str, pid: str) -> dict[str, Any]:
    """The `decision.pair` object of `turn`'s trace (trace-sampled.v2.json)."""
    return {"pair_id": pid, "prompt_ref": prompt_ref, "partner_trace_id": partner.trace_id,
            "partner_agent_id": partner.agent_id, "partner_host": partner.host}


class PairWindow:
    def __init__(self, window_ms: int, max_turns: int = DEFAULT_MAX_TURNS) -> None:
        if window_ms <= 0 or max_turns < 2:
            raise ValueError(f"window_ms must be > 0 and max_turns >= 2, got {window_ms}, {max_turns}")
        self.window_ms, self.max_turns = window_ms, max_turns

    def live(self, turns: Sequence[Turn], newest_ms: int) -> list[Turn]:
        """`turns` without those that ended more than the window before `newest_ms`."""
        return [t for t in turns if t.ended_at >= newest_ms - self.window_ms]

    def partner(self, turns: Sequence[Turn], turn: Turn) -> Turn | None:
        """The turn `turn` pairs with: the earliest arrived, unpaired, of another agent, within
        the window; None when there is none (or `turn` is already among them)."""
        if any(t.trace_id == turn.trace_id for t in turns):
            return None
        for t in turns:
            if t.pair_id is None and t.agent_id != turn.agent_id and abs(t.ended_at - turn.ended_at) <= self.window_ms:
                return t
        return None

    def admit(self, turns: Sequence[Turn], turn: Turn, partner: Turn | None = None) -> list[Turn]:
        """`turns` with `turn` added, and `partner` (if any) marked paired with it; the oldest
        dropped past `max_turns`."""
        kept = [t for t in turns if t.trace_id != turn.trace_id]
        if partner is not None:
            pid = pair_id(turn.trace_id, partner.trace_id)
            turn = replace(turn, pair_id=pid)
            kept = [replace(t, pair_id=pid) if t.trace_id == partner.trace_id else t for t in kept]
        kept.append(turn)
        if len(kept) > self.max_turns:
            kept = sorted(kept, key=lambda t: t.ended_at)[-self.max_turns:]
        return kept

    def expired(self, newest_ms: int, now_ms: int) -> bool:
        """A prompt whose newest turn ended more than the window before `now_ms` can pair no more."""
        return newest_ms < now_ms - self.window_ms


# The key under which the sample stage shows the pair policy a turn's partner (a view of the
# snapshot: `{**snapshot, PARTNER: turn}`); absent, the policy has nothing to say.
PARTNER = "pair_partner"


class PairPolicy:
    """Forwards a turn the window paired (`PARTNER` in the snapshot view). Between error_flag and
    novelty: a paired error is forwarded as error_flag, with the pair among its facts."""

    name = "pair"

    def evaluate(self, snapshot: Mapping[str, Any]) -> Decision | None:
        partner = snapshot.get(PARTNER)
        if not isinstance(partner, Turn):
            return None
        return Decision(forward=True, reason="pair",
                        detail=f"same prompt as {partner.trace_id} answered by {partner.agent_id} on {partner.host}")
