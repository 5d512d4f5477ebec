"""How collector replicas share hosts, without a broker: which partitions go to which replica
(pipeline/collector/hosts.py `assign_partitions`), which hosts a partition holds (`HostTable`),
the host records (no password in them), and a host handed from one collector to another through
a state store (`Collector.follow` / `unfollow`): nothing reported twice, nothing lost."""

from __future__ import annotations

import argparse
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import pytest

from devkit.clock import FakeClock
from pipeline import config as config_mod
from pipeline.collector.hosts import HostRecord, HostTable, assign_partitions, partition_of, records_of
from pipeline.collector.state import HostState
from pipeline.errors import ConfigError
from pipeline.kafka.partitioner import murmur2
from tests.unit.collector.fakes import (
    QUIET_S,
    FakeDaemon,
    MemorySink,
    collector,
    idle_frames,
    last_message_ids,
    running,
    turns_of,
    until,
)

# ---------------------------------------------------------------- the plan


def test_one_member_gets_every_partition() -> None:
    assert assign_partitions({p: p % 3 for p in range(16)}, ["only"]) == {"only": list(range(16))}


def test_hosts_are_balanced_before_partitions() -> None:
    # six hosts on four partitions of sixteen: a round robin of partitions could give one member five
    counts = dict.fromkeys(range(16), 0) | {0: 2, 5: 2, 9: 1, 14: 1}
    plan = assign_partitions(counts, ["b", "a", "c"])
    assert sorted(p for ps in plan.values() for p in ps) == list(range(16)), "every partition once"
    load = {m: sum(counts[p] for p in ps) for m, ps in plan.items()}
    assert sorted(load.values()) == [2, 2, 2]
    assert max(map(len, plan.values())) - min(map(len, plan.values())) <= 1, "empty partitions spread too"


def test_the_plan_is_the_same_whichever_member_computes_it() -> None:
    counts = {p: (p * 7) % 4 for p in range(16)}
    assert assign_partitions(counts, ["m1", "m2", "m3"]) == assign_partitions(dict(reversed(counts.items())),
                                                                              ["m3", "m1", "m2"])


def test_more_members_than_partitions_leaves_some_idle() -> None:
    plan = assign_partitions({0: 3, 1: 1}, ["a", "b", "c"])
    assert plan == {"a": [0], "b": [1], "c": []}
    assert assign_partitions({0: 1}, []) == {}


# ---------------------------------------------------------------- the table


def record(name: str, url: str = "https://h.example:4096", **kw: Any) -> HostRecord:
    return HostRecord(name=name, base_url=url, password_env=kw.pop("password_env", None), site_key="pk_x", **kw)


def test_the_table_keeps_the_last_record_and_forgets_on_a_tombstone() -> None:
    table = HostTable()
    table.partitions = list(range(4))
    assert table.apply(1, b"a", record("a").encode())
    assert not table.apply(1, b"a", record("a", updated_at_ms=5).encode()), "same host, only rewritten"
    assert table.apply(1, b"a", record("a", "https://moved.example").encode())
    assert table.apply(2, b"b", record("b").encode())
    assert table.on([1]) == {"a": record("a", "https://moved.example")}
    assert table.counts() == {0: 0, 1: 1, 2: 1, 3: 0}
    assert table.apply(1, b"a", None)
    assert table.on([1, 2]).keys() == {"b"}


@pytest.mark.parametrize("value", [b"{", b'{"schema": "collector.host/1"}', record("other").encode()])
def test_a_record_that_is_no_host_record_of_its_key_is_skipped(value: bytes) -> None:
    table = HostTable()
    assert not table.apply(0, b"a", value)
    assert table.hosts == {} and table.invalid == 1


def test_a_hosts_partition_is_kafkas_for_its_name() -> None:
    for name in ("a", "build-1", "bench-host-007"):
        assert partition_of(name, range(16)) == (murmur2(name.encode()) & 0x7FFFFFFF) % 16


# ---------------------------------------------------------------- records and passwords


def load(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> config_mod.Config:
    path = tmp_path / "pipeline.toml"
    path.write_text(text)
    return config_mod.load(path, env or {})


HOSTS = """
[[hosts]]
name = "shared"
base_url = "https://shared.example:4096"
password_env = "OPENCODE_PASSWORD_SHARED"

[[hosts]]
name = "inline"
base_url = "https://inline.example:4096"
password = "pw-inline"
"""


def test_records_name_the_password_variable_never_the_password(tmp_path: Path) -> None:
    cfg = load(tmp_path, HOSTS, {"OPENCODE_PASSWORD_SHARED": "pw-shared"})
    shared, inline = records_of(cfg, now_ms=7)
    assert (shared.password_env, inline.password_env) == ("OPENCODE_PASSWORD_SHARED", None)
    for r in (shared, inline):
        assert b"pw-" not in r.encode()
        assert HostRecord.decode(r.encode()) == r
    # a replica resolves the password from its own environment, or its own entry of that name
    assert shared.resolve(cfg).password is not None and shared.resolve(cfg).password.reveal() == "pw-shared"
    assert inline.resolve(cfg).password is not None and inline.resolve(cfg).password.reveal() == "pw-inline"
    elsewhere = load(tmp_path, "")
    with pytest.raises(ConfigError, match="OPENCODE_PASSWORD_SHARED is unset"):
        shared.resolve(elsewhere)
    assert inline.resolve(elsewhere).password is None


def test_a_record_cannot_talk_plain_http_to_a_remote_host_unasked(tmp_path: Path) -> None:
    cfg = load(tmp_path, "")
    with pytest.raises(ConfigError, match="http"):
        record("x", "http://remote.example:4096").resolve(cfg)
    assert record("x", "http://remote.example:4096", allow_insecure_http=True).resolve(cfg).base_url


def test_hosts_add_takes_the_config_entry_and_options_override_it(tmp_path: Path) -> None:
    from pipeline.cli.hosts import record_for

    cfg = load(tmp_path, HOSTS, {"OPENCODE_PASSWORD_SHARED": "pw"})

    def args(name: str, **kw: Any) -> argparse.Namespace:
        base = dict(base_url=None, password_env=None, site_key=None, model=None, agent=None,
                    allow_insecure_http=False)
        return argparse.Namespace(name=name, **{**base, **kw})

    assert record_for(cfg, args("shared"), 1).same_host(records_of(cfg, 1)[0])
    moved = record_for(cfg, args("shared", base_url="https://new.example:4096/"), 1)
    assert moved.base_url == "https://new.example:4096" and moved.password_env == "OPENCODE_PASSWORD_SHARED"
    fresh = record_for(cfg, args("new", base_url="https://n.example", password_env="PW_N"), 1)
    assert (fresh.site_key, fresh.password_env) == (cfg.site_key, "PW_N")
    with pytest.raises(ConfigError, match="--base-url"):
        record_for(cfg, args("unknown"), 1)
    with pytest.raises(ConfigError, match="--password-env"):
        record_for(cfg, args("new", base_url="https://n.example", password_env="not a name"), 1)


# ---------------------------------------------------------------- handing a host over


class MemoryStore:
    """A StateStore in memory, shared by the collectors of a test like the state topic is."""

    def __init__(self) -> None:
        self.saved: dict[str, dict[str, Any]] = {}

    async def load(self, hosts: Collection[str]) -> dict[str, HostState]:
        found = {h: HostState.from_dict(self.saved[h]) for h in hosts if h in self.saved}
        return {h: s for h, s in found.items() if s is not None}

    async def save(self, states: Mapping[str, Mapping[str, Any]]) -> None:
        self.saved.update({h: dict(d) for h, d in states.items()})


@pytest.mark.asyncio
async def test_a_host_handed_over_is_neither_repeated_nor_lost() -> None:
    clock, store = FakeClock(), MemoryStore()
    fake = FakeDaemon(clock)
    fake.put_session("ses_h", turns_of("ses_h", 1))
    first_sink, second_sink = MemorySink(), MemorySink()
    first = collector(clock, {"h": fake}, first_sink, store=store)
    second = collector(clock, {"h": fake}, second_sink, store=store)
    second_host = second._runners["h"].host
    second._initial = []  # knows the host (its client factory does) but follows it only when told
    async with running(first), running(second):
        await until(clock, lambda: len(first_sink.turns()) == 1)  # the first start's backfill
        fake.put_session("ses_h", turns_of("ses_h", 2), updated=clock.now_ms() + 1)
        fake.push(*idle_frames("ses_h"))
        await until(clock, lambda: len(first_sink.turns()) == 2)
        assert await first.unfollow(["h"]) == ["h"]
        assert first.followed == [] and "h" not in first.stats
        assert set(store.saved["h"]["sessions"]) == {"ses_h"}, "saved on the way out, after the flush"
        # ended while nobody followed the host: the next owner's reconcile reports it
        fake.put_session("ses_h", turns_of("ses_h", 3), updated=clock.now_ms() + 2)
        assert await second.follow([second_host]) == ["h"]
        await until(clock, lambda: len(second_sink.turns()) == 1)
        await clock.advance(QUIET_S)
        assert second.followed == ["h"]
    assert last_message_ids(first_sink.turns()) == ["msg_0001b", "msg_0002b"]
    assert last_message_ids(second_sink.turns()) == ["msg_0003b"]
    assert second_sink.turns()[0]["backfill"]


@pytest.mark.asyncio
async def test_following_a_host_twice_starts_one_task() -> None:
    clock = FakeClock()
    fake = FakeDaemon(clock)
    c = collector(clock, {"h": fake}, MemorySink())
    async with running(c):
        await until(clock, lambda: bool(fake.streams))
        assert await c.follow([c._runners["h"].host]) == []
        await clock.advance(30)
        assert fake.connections == 1
    assert c.stats["h"].connections == 1, "stopping keeps the counters for a last look"
