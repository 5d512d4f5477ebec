"""What the collector keeps per host: `HostStats`, in-memory counters for the metrics module, and
`HostState`, what it last reported per session, which survives restarts and handovers.

Where `HostState` lives is a `StateStore`: `pipeline collect` keeps it in the compacted topic
`collector.state` (`pipeline.collector.store.KafkaStateStore`), so whichever replica follows a
host next reads it; `FileStateStore` (one file per host in `state_dir`) is what a collector built
in-process without Kafka uses, and the Kafka store's read-only fallback for state files left by
collectors from before the topic. Either is written by the `Collector` only after the sink has
flushed the records the state covers."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)


STATE_VERSION = 1


@dataclass
class HostStats:
    """Plain counters per host for the metrics module, lost on restart; they only grow, except
    `connected`, `last_error` and `last_frame_at_ms`, which say how things are now."""

    host: str
    connected: bool = False
    connections: int = 0
    reconnects: int = 0
    events_in: int = 0
    events_out: int = 0
    events_filtered: int = 0
    events_malformed: int = 0
    turns_emitted: int = 0
    turns_unchanged: int = 0
    backfills: int = 0
    reconciles: int = 0
    polls: int = 0
    fetch_failures: int = 0
    unsettled_turns: int = 0
    trimmed_turns: int = 0
    oversize_drops: int = 0
    last_error: str | None = None
    last_frame_at_ms: int | None = None


@dataclass
class HostState:
    """What one host's collector has reported, persisted so a restart neither loses nor doubles.

    `sessions[id]` = {snapshot_id, last_message_id, last_message_digest, session_updated,
    reported_at}: the last reported turn is known by its final message (id and digest), which
    stays in later listings unchanged, not by `snapshot_id`, whose window moves once a session
    outgrows `max_messages`. An entry without `last_message_digest` is still understood (see
    `already_reported`), and `snapshot_id` is still written so a collector that reads only it
    can use the file.
    `watermark_ms` is the newest session `time.updated` handled; reconcile looks at sessions
    updated after it (minus a slack) and at none older, except on first start.
    """

    watermark_ms: int | None = None
    sessions: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self, host: str) -> dict[str, Any]:
        return {"version": STATE_VERSION, "host": host, "watermark_ms": self.watermark_ms,
                "sessions": {k: dict(v) for k, v in self.sessions.items()}}

    @classmethod
    def load(cls, path: Path) -> HostState:
        """A missing or unreadable file starts fresh: that re-emits, which ingest absorbs."""
        state = cls.read(path)
        return state if state is not None else cls()

    @classmethod
    def read(cls, path: Path) -> HostState | None:
        """The file's state; None when there is no usable file (missing, unreadable, unknown)."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("collector state %s unreadable (%s); starting fresh", path, exc)
            return None
        state = cls.from_dict(data)
        if state is None:
            log.warning("collector state %s has an unknown layout; starting fresh", path)
        return state

    @classmethod
    def from_dict(cls, data: Any) -> HostState | None:
        """`to_dict`'s output read back; None for anything of another layout or version."""
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            return None
        watermark = data.get("watermark_ms")
        sessions = data.get("sessions")
        return cls(watermark_ms=watermark if isinstance(watermark, int) else None,
                   sessions={k: v for k, v in sessions.items() if isinstance(v, dict)}
                   if isinstance(sessions, dict) else {})

    @staticmethod
    def save(path: Path, data: Mapping[str, Any]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump(data, out, separators=(",", ":"))
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def state_file(state_dir: Path, host: str) -> Path:
    """Where the state of `host` lives in `state_dir`."""
    # Host names are free text; the hash keeps two names that sanitise alike apart.
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", host)[:64]
    digest = hashlib.sha256(host.encode("utf-8")).hexdigest()[:8]
    return state_dir / f"collector-{safe}-{digest}.json"


class StateStore(Protocol):
    """Where `HostState` is kept between the collector's runs and between the replicas that
    follow a host one after the other. `save` is called only once what the states cover has
    been acknowledged by the sink; when it returns, a later `load` (by any replica) sees them."""

    async def load(self, hosts: Collection[str]) -> dict[str, HostState]:
        """The saved state of each of `hosts` that has one; the others start fresh."""
        ...

    async def save(self, states: Mapping[str, Mapping[str, Any]]) -> None:
        """Persist `HostState.to_dict` of each host, by host name."""
        ...


class FileStateStore:
    """One atomically replaced file per host in `state_dir`: a collector's own disk.

    What the collector used before state moved to a topic; still what an in-process collector
    with `state_dir` (unit tests, a single process without Kafka) uses."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir

    def path(self, host: str) -> Path:
        return state_file(self.state_dir, host)

    async def load(self, hosts: Collection[str]) -> dict[str, HostState]:
        found = {h: HostState.read(self.path(h)) for h in hosts}
        return {h: s for h, s in found.items() if s is not None}

    async def save(self, states: Mapping[str, Mapping[str, Any]]) -> None:
        for host, data in states.items():
            HostState.save(self.path(host), data)
