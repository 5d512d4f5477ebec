"""Two sampler replicas on a multi-partition topic decide like one: the novelty window is
shared through sampler.shipped, so a session forwarded by one replica is in the other's window
once it has propagated (the bound documented in the README; waves here are spaced past it)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from devkit.kafka_local import LocalBroker, free_port
from devkit.local_stack import PipelineProcess, wait_for
from pipeline.config import DEFAULT_CACHE_DIR
from pipeline.kafka import admin
from pipeline.model.records import encode
from pipeline.model.trace import sampled_trace
from pipeline.sampling import NoveltyWindows, reference_sampler
from pipeline.sampling.novelty import NoveltyPolicy
from tests.factory import text_snapshot, text_turn_envelope
from tests.kafka_util import produce, read_all

pytestmark = pytest.mark.integration
# aiokafka's info line when the group hands this replica partitions of the stage's input
ASSIGNED = r"newly assigned partitions .*TopicPartition\(topic='sessions\.idle'"
PROPAGATION_BOUND_S = 2.0


def corpus(seed: int = 11) -> list[list[dict]]:
    """Three waves: fresh topics; near-duplicates of wave-1 sessions plus fresh ones; and again."""
    rng = random.Random(seed)
    base = [[f"t{k}w{rng.randrange(10**6)}" for _ in range(60)] for k in range(8)]
    waves: list[list[dict]] = [[], [], []]
    n = 0
    for k, words in enumerate(base):
        waves[0].append(text_snapshot(n := n + 1, " ".join(words[:30]), " ".join(words[30:])))
        if k % 2 == 0:  # a near-duplicate a wave later: not novel
            near = words[:55] + [f"x{rng.randrange(10**6)}" for _ in range(5)]
            waves[1].append(text_snapshot(n := n + 1, " ".join(near[:30]), " ".join(near[30:])))
    for wave in (1, 2):
        for _ in range(4):
            fresh = [f"f{wave}w{rng.randrange(10**6)}" for _ in range(60)]
            waves[wave].append(text_snapshot(n := n + 1, " ".join(fresh[:30]), " ".join(fresh[30:])))
    last = waves[1][-1]["messages"]  # a near-duplicate of a wave-2 session in wave 3
    text = " ".join(p["text"] for m in last for p in m["parts"]).split()
    waves[2].append(text_snapshot(n + 1, " ".join(text[:30]), " ".join([*text[30:55], "y1", "y2", "y3"])))
    return waves


def expected_forwarded(waves: list[list[dict]]) -> set[str]:
    """What one sampler deciding the waves in order forwards (the pure logic, in process)."""
    windows = NoveltyWindows(size=200)
    sampler = reference_sampler(windows, rate=0.0)
    novelty = next(p for p in sampler.policies if isinstance(p, NoveltyPolicy))
    forwarded = set()
    for wave in waves:
        for snap in wave:
            decision = sampler.decide(snap)
            if decision.forward:
                forwarded.add(snap["snapshot_id"])
                trace = sampled_trace(snap, decision, 25, 0)
                windows.apply_shipped(novelty.shipped_record(snap, trace["trace_id"], 0))
    return forwarded


@contextlib.contextmanager
def sample_replicas(tmp_path: Path, also: Sequence[str] = ()) -> Iterator[tuple[LocalBroker, list[PipelineProcess]]]:
    """A broker with the topics on four partitions, two sample replicas (each already holding
    partitions of sessions.idle) and the `also` stages; stopped on the way out."""
    broker = LocalBroker("127.0.0.1", free_port(), free_port(), tmp_path / "kafka", DEFAULT_CACHE_DIR)
    broker.start()
    env = {"PIPELINE_KAFKA__BOOTSTRAP": broker.bootstrap, "PIPELINE_KAFKA__PARTITIONS": "4",
           "PIPELINE_SAMPLING_RATE": "0.0", "PIPELINE_KAFKA__CACHE_DIR": str(tmp_path / "cache")}
    workers = [PipelineProcess(["worker", "sample", "--loglevel", "info"], env, tmp_path, f"sample-{i}")
               for i in range(2)]
    workers += [PipelineProcess(["worker", stage, "--loglevel", "info"], env, tmp_path, stage) for stage in also]
    try:
        asyncio.run(admin.create_topics(broker.bootstrap, 4, 1))
        for w in workers:
            w.start()
        for w in workers[:2]:
            w.wait_for_log(ASSIGNED, 120)
        yield broker, workers
    finally:
        for w in workers:
            w.stop()
        broker.stop()


def test_two_replicas_decide_like_one(tmp_path: Path) -> None:
    waves = corpus()
    expected = expected_forwarded(waves)
    assert 0 < len(expected) < sum(len(w) for w in waves), "the corpus must exercise both outcomes"
    with sample_replicas(tmp_path) as (broker, workers):
        forwarded_so_far = 0
        for wave in waves:
            asyncio.run(produce(broker.bootstrap, "sessions.idle",
                                [(f"h1:{s['session_id']}".encode(), encode(s)) for s in wave]))
            wave_expected = len([s for s in wave if s["snapshot_id"] in expected])
            forwarded_so_far += wave_expected
            wait_for(lambda n=forwarded_so_far: len(asyncio.run(
                read_all(broker.bootstrap, "traces.sampled", n, 5))) >= n, 90, what="the wave's decisions")
            # past the propagation bound, every replica's window holds this wave's forwards
            asyncio.run(asyncio.sleep(PROPAGATION_BOUND_S))
        got = {json.loads(m.value)["snapshot_id"]
               for m in asyncio.run(read_all(broker.bootstrap, "traces.sampled", len(expected) + 1, 5))}
        assert got == expected
        assert all(w.alive() for w in workers), [w.log()[-2000:] for w in workers]
        # both replicas really decided: each was assigned partitions of sessions.idle
        for w in workers:
            assert re.search(ASSIGNED, w.log()), f"{w.name} got no partition"


PAIRED_PROMPTS = [f"prompt {k}: " + " ".join(f"p{k}w{j}" for j in range(25)) for k in range(4)]


def test_two_replicas_pair_turns_of_one_prompt_from_two_hosts(tmp_path: Path) -> None:
    """Ingest and two sample replicas on four partitions: each prompt answered by two models on
    two hosts (their sessions on different opencode.events partitions) is forwarded as one pair;
    a prompt answered twice by the same model is not."""
    envelopes = []
    for k, prompt in enumerate(PAIRED_PROMPTS):
        envelopes.append(text_turn_envelope(100 + k, prompt, f"answer a {k} " * 20, host="host-a", model="prov/a"))
        envelopes.append(text_turn_envelope(200 + k, prompt, f"answer b {k} " * 20, host="host-b", model="prov/b"))
    same = "same model twice: " + " ".join(f"s{j}" for j in range(25))
    envelopes.append(text_turn_envelope(300, same, "one " * 20, host="host-a", model="prov/a"))
    envelopes.append(text_turn_envelope(301, same, "two " * 20, host="host-b", model="prov/a"))
    keys = {f"{e['host']}:{e['session_id']}".encode() for e in envelopes}
    with sample_replicas(tmp_path, also=["ingest"]) as (broker, workers):
        # the first turn of each prompt goes in first, so its partner arrives to a window that has it
        firsts = [e for e in envelopes if e["host"] == "host-a"]
        asyncio.run(produce(broker.bootstrap, "opencode.events",
                            [(f"{e['host']}:{e['session_id']}".encode(), encode(e)) for e in firsts]))
        wait_for(lambda: len(asyncio.run(read_all(broker.bootstrap, "sessions.idle", len(firsts), 3))) >= len(firsts),
                 90, what="the first turns' snapshots")
        seconds = [e for e in envelopes if e["host"] == "host-b"]
        asyncio.run(produce(broker.bootstrap, "opencode.events",
                            [(f"{e['host']}:{e['session_id']}".encode(), encode(e)) for e in seconds]))

        def paired() -> dict[str, list[dict]]:
            by_pair: dict[str, dict[str, dict]] = {}
            for m in asyncio.run(read_all(broker.bootstrap, "traces.sampled", 64, 3)):
                trace = json.loads(m.value)
                pair = trace["decision"]["pair"]
                if pair is not None:
                    by_pair.setdefault(pair["pair_id"], {})[trace["trace_id"]] = trace
            return {pid: list(traces.values()) for pid, traces in by_pair.items()}

        wait_for(lambda: len(paired()) >= len(PAIRED_PROMPTS) and all(len(t) == 2 for t in paired().values()),
                 120, what="a pair per prompt")
        pairs = paired()
        assert len(pairs) == len(PAIRED_PROMPTS)
        for traces in pairs.values():
            assert {t["host"] for t in traces} == {"host-a", "host-b"}
            assert len({t["prompt_ref"] for t in traces}) == 1
            assert {t["agent_id"] for t in traces} == {"prov/a:build", "prov/b:build"}
        same_model = [json.loads(m.value) for m in asyncio.run(read_all(broker.bootstrap, "traces.sampled", 64, 3))]
        assert not any(t["decision"]["pair"] for t in same_model if t["session_id"] in ("ses_txt000300",
                                                                                       "ses_txt000301"))
        # the sessions really came in on different partitions of opencode.events
        partitions = {m.partition for m in asyncio.run(read_all(broker.bootstrap, "opencode.events", len(keys), 3))}
        assert len(partitions) > 1
        assert all(w.alive() for w in workers), [w.log()[-2000:] for w in workers]
