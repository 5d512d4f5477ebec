"""The soak's invariant checker: pure functions over what was read from the topics and the stub
panel after a fault campaign (tests/faults/test_soak.py), unit-tested there with synthetic input.

Every ended turn must have exactly one fate:

- `delivered`: its trace id is at the panel (repeats only as upserts of that id);
- `dead`: a dead letter (any `*.dead` topic, `traces.dead`) whose original record is that turn,
  with the dead letter's reason;
- `not_forwarded`: the sampler decided not to forward it. The pipeline records that decision in
  no per-turn form (traces.sampled holds forwarded turns only; the decision of a turn that is not
  forwarded is visible only in the `pipeline_sampler_decisions_total` counter, which has no turn
  in it and restarts with the process), so the caller passes the set it knows of; the soak runs
  with samplingRate 1.0, where every turn is forwarded (by novelty or, failing that, by the
  `sample` policy) and that set is empty.

A turn is identified as the sampler identifies it: the trace id derived from host, session and
the turn's last message (pipeline.model.trace.trace_id). Anything else is a violation: a turn with no
fate (`unexplained`), with two (`conflicting`), a trace at the panel that is no turn's
(`strays`: a repeat that is not an upsert), an injected poison record that no dead-letter topic
holds (`poison_missing`).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.model.trace import trace_id

DELIVERED, DEAD, NOT_FORWARDED = "delivered", "dead", "not_forwarded"


@dataclass(frozen=True)
class Turn:
    """One ended turn: where it came from and how it is known downstream."""

    trace_id: str
    host: str
    session_id: str
    last_message_id: str
    source: str = "opencode"  # opencode | oversize | warmup | ...
    ended_at: float | None = None  # epoch seconds, when known
    message_ids: frozenset[str] = frozenset()

    @property
    def key(self) -> str:
        """The record key of the turn's records before signing (host:session_id)."""
        return f"{self.host}:{self.session_id}"


def make_turn(host: str, session_id: str, last_message_id: str, **kw: Any) -> Turn:
    return Turn(trace_id(host, session_id, last_message_id), host, session_id, last_message_id, **kw)


def listing_turns(host: str, session_id: str, listing: Sequence[Mapping[str, Any]],
                  **kw: Any) -> list[Turn]:
    """The turns of a session from its full message listing (`[{info, parts}]`, oldest first),
    defined independently of the collector's code: a user message and the messages after it up
    to the next user message, when at least one of them answered. Its last message names it."""
    turns: list[Turn] = []
    current: list[str] = []

    def close() -> None:
        if len(current) > 1:
            turns.append(make_turn(host, session_id, current[-1], message_ids=frozenset(current), **kw))

    for message in listing:
        info = message.get("info") or {}
        role, message_id = info.get("role"), info.get("id")
        if not isinstance(message_id, str):
            continue
        if role == "user":
            close()
            current = [message_id]
        elif current:
            current.append(message_id)
    close()
    return turns


def trace_id_of(record: Any) -> str | None:
    """The turn a pipeline record belongs to: a trace (sampled, scrubbed, signed) names it; a
    snapshot or a collector `pipeline.turn_ended` envelope is cut at the turn's last message.
    None for anything else (other events, poison)."""
    if not isinstance(record, Mapping):
        return None
    tid = record.get("trace_id")
    if isinstance(tid, str) and tid:
        return tid
    messages = record.get("messages")
    if messages is None and isinstance(record.get("properties"), Mapping):
        if record.get("type") != "pipeline.turn_ended":
            return None
        messages = record["properties"].get("messages")
    host, session_id = record.get("host"), record.get("session_id")
    if not (isinstance(messages, list) and messages and isinstance(host, str) and isinstance(session_id, str)):
        return None
    last = messages[-1].get("info") if isinstance(messages[-1], Mapping) else None
    last_id = last.get("id") if isinstance(last, Mapping) else None
    return trace_id(host, session_id, last_id) if isinstance(last_id, str) else None


def trace_id_of_bytes(raw: bytes) -> str | None:
    try:
        return trace_id_of(json.loads(raw))
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None


@dataclass(frozen=True)
class DeadLetter:
    topic: str
    stage: str
    reason: str
    key: str | None
    original: bytes
    dead_id: str
    trace_id: str | None  # the turn its original record is, when it can be told

    @classmethod
    def from_record(cls, topic: str, record: Mapping[str, Any]) -> DeadLetter:
        try:
            original = base64.b64decode(record.get("original_b64") or "", validate=False)
        except (binascii.Error, ValueError):
            original = b""
        return cls(topic, str(record.get("stage")), str(record.get("reason")), record.get("key"), original,
                   str(record.get("dead_id")), trace_id_of_bytes(original))


@dataclass(frozen=True)
class Poison:
    """A record produced straight onto a stage's input that can never be processed."""

    topic: str
    key: str
    value: bytes
    dead_topic: str  # where the stage reading `topic` must put it

    def matches(self, dead: DeadLetter) -> bool:
        # a dead letter may hold only the start of a large original
        return (dead.topic == self.dead_topic and dead.key == self.key and bool(self.value)
                and (dead.original == self.value or (bool(dead.original) and self.value.startswith(dead.original))))


@dataclass
class Accounting:
    turns: int
    fates: dict[str, tuple[str, ...]]  # trace id -> its fates ("delivered", "dead:<topic>:<reason>", ...)
    delivered: int
    dead_by_reason: Counter[str]  # "<topic>:<reason>" -> turns
    not_forwarded: int
    repeats: int  # upserts beyond the first, summed over delivered turns
    unexplained: list[Turn]
    conflicting: list[tuple[Turn, tuple[str, ...]]]
    strays: list[str]  # trace ids at the panel that are no turn's
    poison_dead: Counter[str]  # "<topic>:<reason>" -> injected poison records
    poison_missing: list[Poison]
    stray_dead: list[DeadLetter] = field(default_factory=list)  # dead letters of no turn and no poison

    @property
    def ok(self) -> bool:
        return not (self.unexplained or self.conflicting or self.strays or self.poison_missing)

    def problems(self) -> list[str]:
        out = []
        if self.unexplained:
            out.append(f"{len(self.unexplained)} unexplained turns: "
                       + ", ".join(f"{t.trace_id} ({t.source} {t.key} last {t.last_message_id})"
                                   for t in self.unexplained[:10]))
        if self.conflicting:
            out.append(f"{len(self.conflicting)} turns with more than one fate: "
                       + ", ".join(f"{t.trace_id} {fates}" for t, fates in self.conflicting[:10]))
        if self.strays:
            out.append(f"{len(self.strays)} traces at the panel that are no turn's (a repeat that is not an "
                       f"upsert): {self.strays[:10]}")
        if self.poison_missing:
            out.append(f"{len(self.poison_missing)} poison records in no dead-letter topic: "
                       + ", ".join(f"{p.key} on {p.topic} (expected in {p.dead_topic})" for p in self.poison_missing))
        return out


def account(turns: Iterable[Turn], delivered: Mapping[str, int], dead: Iterable[DeadLetter], *,
            not_forwarded: Iterable[str] = (), poison: Iterable[Poison] = ()) -> Accounting:
    """Give every turn its fates. `delivered`: trace id -> upserts at the panel (1 = delivered
    once); `dead`: every dead letter read (any topic; the same letter written twice, recognised by
    its dead_id, counts once); `not_forwarded`: trace ids the sampler decided not to forward;
    `poison`: records injected that must end in a dead-letter topic."""
    by_id: dict[str, Turn] = {}
    for turn in turns:
        by_id.setdefault(turn.trace_id, turn)
    by_key: dict[str, list[Turn]] = {}
    for turn in by_id.values():
        by_key.setdefault(turn.key, []).append(turn)
    poison = list(poison)
    skipped = set(not_forwarded)

    fates: dict[str, list[str]] = {tid: [] for tid in by_id}
    for tid in by_id:
        if delivered.get(tid, 0) > 0:
            fates[tid].append(DELIVERED)
        if tid in skipped:
            fates[tid].append(NOT_FORWARDED)

    poison_dead: Counter[str] = Counter()
    matched_poison: set[int] = set()
    stray_dead: list[DeadLetter] = []
    seen_dead: set[str] = set()
    for letter in dead:
        if letter.dead_id in seen_dead:
            continue
        seen_dead.add(letter.dead_id)
        hit = next((i for i, p in enumerate(poison) if p.matches(letter)), None)
        if hit is not None:
            if hit not in matched_poison:
                matched_poison.add(hit)
                poison_dead[f"{letter.topic}:{letter.reason}"] += 1
            continue
        owner = letter.trace_id if letter.trace_id in by_id else None
        if owner is None and letter.trace_id is None and letter.key is not None:
            # an original too large to keep whole: its key, when it names one turn only
            # (before signing host:session_id, after it the trace id)
            if letter.key in by_id:
                owner = letter.key
            elif len(by_key.get(letter.key, [])) == 1:
                owner = by_key[letter.key][0].trace_id
        if owner is None:
            stray_dead.append(letter)
            continue
        fate = f"{DEAD}:{letter.topic}:{letter.reason}"
        if fate not in fates[owner]:
            fates[owner].append(fate)

    unexplained, conflicting = [], []
    dead_by_reason: Counter[str] = Counter()
    n_delivered = n_skipped = repeats = 0
    for tid, turn in by_id.items():
        got = fates[tid]
        kinds = {f.split(":", 1)[0] for f in got}
        if not got:
            unexplained.append(turn)
        elif len(kinds) > 1:
            conflicting.append((turn, tuple(got)))
        if DELIVERED in kinds:
            n_delivered += 1
            repeats += delivered[tid] - 1
        if NOT_FORWARDED in kinds:
            n_skipped += 1
        for fate in got:
            if fate.startswith(DEAD + ":"):
                dead_by_reason[fate.split(":", 1)[1]] += 1
    strays = sorted(tid for tid, n in delivered.items() if n > 0 and tid not in by_id)
    return Accounting(
        turns=len(by_id), fates={tid: tuple(f) for tid, f in fates.items()}, delivered=n_delivered,
        dead_by_reason=dead_by_reason, not_forwarded=n_skipped, repeats=repeats,
        unexplained=sorted(unexplained, key=lambda t: (t.ended_at or 0.0, t.trace_id)), conflicting=conflicting,
        strays=strays, poison_dead=poison_dead,
        poison_missing=[p for i, p in enumerate(poison) if i not in matched_poison], stray_dead=stray_dead)


def last_seen(trace_ids: Iterable[str], seen_by_topic: Mapping[str, set[str]],
              order: Sequence[str]) -> dict[str, str | None]:
    """For each trace id, the furthest topic along `order` (the pipeline's topics, upstream
    first) that holds a record of it; None when none does. Says where an unexplained turn was
    lost."""
    out: dict[str, str | None] = {}
    for tid in trace_ids:
        out[tid] = None
        for topic in order:
            if tid in seen_by_topic.get(topic, set()):
                out[tid] = topic
    return out


def leaks(bodies: Mapping[str, str], forbidden: Iterable[str]) -> list[str]:
    """`trace_id: secret` for every forbidden string found in a delivered body (JSON text)."""
    forbidden = list(forbidden)
    return [f"{tid}: {secret}" for tid, body in bodies.items() for secret in forbidden if secret in body]


def recovery_s(fault_end: float, ended: Mapping[str, float], first_seen: Mapping[str, float],
               horizon_s: float = 0.0) -> float | None:
    """How long the pipeline took to bring turns through after a fault: over the turns that ended
    before the fault's end or within `horizon_s` after it (those a stall after the fault, such as a
    rebalance waiting out a killed member's session, holds up), the longest wait from the fault's
    end, or from the turn's own end when later, to its first acceptance at the panel. 0 when every
    one of them was there at once; None while one of them is not there yet."""
    worst = 0.0
    for tid, at in ended.items():
        if at <= fault_end + horizon_s:
            seen = first_seen.get(tid)
            if seen is None:
                return None
            worst = max(worst, seen - max(at, fault_end))
    return worst
