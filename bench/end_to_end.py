"""Idle to delivered: the whole pipeline after ingest, with zero-latency stubs.

    python bench/end_to_end.py [--burst 0] [--duration 20] [--levels 0.25,0.5,0.9]

One fresh local broker; `sample`, `scrub`, `sign`, `breaker` and `deliver` as real worker
processes (devkit/local_stack.py's Stack), the stub scrubber and stub panel with no added
latency, sampling rate 1.0 (every snapshot is forwarded). Snapshots are 25-message
`session.snapshot/1` records (bench/common.py), each produced to `sessions.idle` with its
`emitted_at` set to the wall-clock millisecond it is handed to the producer (the produce
timestamp); a trace's latency is the stub panel's accept time (`first_at`: when its POST
arrived) minus that. Every process runs on this machine's clock.

1. Max sustainable throughput: a burst of snapshots produced at once; the rate the panel
   accepted them at between the 10th and the 90th percentile of their accept times (the
   pipeline's steady drain rate, start-up and tail left out). `--burst 0`: 25 s worth, sized
   from a 300-snapshot probe.
2. Latency: snapshots produced open-loop at 25 %, 50 % and 90 % of that rate for `--duration`
   seconds each (evenly spaced, sent on schedule whatever the pipeline does), then drained;
   p50 / p90 / p99 / max of idle-to-accepted. The panel's records are reset between levels.
   A level run while the machine was busy is run once more; both attempts are listed.
3. Where the CPU goes: during the max-throughput burst every process's user + system CPU
   (/proc/<pid>/stat, all threads; a worker's or stub's child processes through its session) is
   read every 0.25 s; per process, CPU µs per delivered trace and its share of the machine's cores
   over the burst's timed window (10th to 90th percentile accept time) and over the whole burst.
Writes bench/results/end_to_end.md and prints it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    CORES,
    load_is_high,
    loadavg,
    local_broker,
    md_table,
    producer,
    publish,
    result_header,
    snapshot_record,
    wait_for_calm,
)
from devkit.local_stack import Stack, StackSettings
from pipeline.model.records import encode

STAGES = ("sample", "scrub", "sign", "breaker", "deliver")
STUB_ROWS = {"panel": "stub panel", "scrubber": "stub scrubber"}
TARGET_P99_MS = 1000.0  # at 50 % of the max sustainable rate


class Snapshots:
    """Fresh 25-message snapshots (unique sessions, so the sampler never sees a repeat)."""

    def __init__(self) -> None:
        self.next = 0

    def take(self, n: int) -> list[dict[str, Any]]:
        out = [snapshot_record(i, prefix="ses_e2e", emitted_at_ms=0) for i in range(self.next, self.next + n)]
        self.next += n
        return out


CLK_TCK = os.sysconf("SC_CLK_TCK")
CPU_SAMPLE_S = 0.25  # /proc is read this often during the burst; CPU times tick at 1/CLK_TCK s anyway


def _proc_cpu(stat: str) -> tuple[int, int]:
    """(session id, utime + stime ticks) from a /proc/<pid>/stat line. The command name in
    parentheses may contain spaces, so fields are counted from its closing parenthesis."""
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[3]), int(fields[11]) + int(fields[12])


def _machine_busy_ticks() -> int:
    """Every core's non-idle ticks since boot (/proc/stat: all but idle and iowait)."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:9]]
    return sum(values) - values[3] - values[4]


class CpuMeter:
    """Samples the CPU time of named process groups during a burst.

    Each worker, stub and the broker was started with `start_new_session=True`, so its pid is its
    session id and any child process it forks shares it: summing the live processes of a session
    counts the children too (a child that exits between two samples takes its last ticks with it).
    The bench driver itself (producer, panel polling, this sampler) is counted by its own pid."""

    def __init__(self, sessions: dict[str, int]) -> None:
        self.sessions = sessions  # row name -> session id
        self.samples: list[tuple[float, dict[str, int], int]] = []  # (epoch s, name -> ticks, machine busy)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> None:
        by_session = {sid: name for name, sid in self.sessions.items()}
        ticks = dict.fromkeys(self.sessions, 0)
        ticks["bench driver"] = 0
        me = os.getpid()
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    sid, cpu = _proc_cpu(f.read())
            except (FileNotFoundError, ProcessLookupError, ValueError):
                continue  # gone between scandir and open
            if int(entry.name) == me:
                ticks["bench driver"] += cpu
            elif sid in by_session:
                ticks[by_session[sid]] += cpu
        self.samples.append((time.time(), ticks, _machine_busy_ticks()))

    def _run(self) -> None:
        while not self._stop.wait(CPU_SAMPLE_S):
            self.sample()

    def __enter__(self) -> CpuMeter:
        self.sample()
        self._thread = threading.Thread(target=self._run, name="cpu-meter", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        self.sample()

    def at(self, t: float) -> tuple[dict[str, float], float]:
        """Every row's CPU seconds and the machine's busy CPU seconds at epoch `t`, linearly
        interpolated between the two samples around it."""
        samples = self.samples
        i = next((k for k, s in enumerate(samples) if s[0] >= t), len(samples) - 1)
        (t1, c1, m1), (t0, c0, m0) = samples[i], samples[max(0, i - 1)]
        f = 0.0 if t1 == t0 else min(1.0, max(0.0, (t - t0) / (t1 - t0)))
        cpu = {k: (c0[k] + f * (c1[k] - c0[k])) / CLK_TCK for k in c1}
        return cpu, (m0 + f * (m1 - m0)) / CLK_TCK


@dataclass
class CpuWindow:
    """CPU seconds per row between two moments, and how many traces the panel accepted in between."""

    name: str
    seconds: float
    traces: int
    cpu_s: dict[str, float]
    machine_busy_s: float

    @classmethod
    def between(cls, meter: CpuMeter, name: str, t0: float, t1: float, traces: int) -> CpuWindow:
        (c0, m0), (c1, m1) = meter.at(t0), meter.at(t1)
        return cls(name, t1 - t0, traces, {k: c1[k] - c0[k] for k in c1}, m1 - m0)

    def us_per_trace(self, cpu_s: float) -> float:
        return cpu_s / self.traces * 1e6

    def cores(self, cpu_s: float) -> float:
        """Share of all the machine's cores over the window."""
        return cpu_s / (self.seconds * CORES)


class Panel:
    """The stub panel's inspection endpoints."""

    def __init__(self, url: str) -> None:
        self.client = httpx.Client(base_url=url, timeout=120)

    def count(self) -> int:
        return int(self.client.get("/_stub/stats").json()["accepted_traces"])

    def accepted_at(self) -> dict[str, float]:
        """session id -> accept time (epoch seconds) of every accepted trace."""
        traces = self.client.get("/_stub/accepted").json()["traces"]
        return {t["body"]["blob"]["session_id"]: float(t["first_at"]) for t in traces}

    def reset(self) -> None:
        self.client.post("/_stub/reset").raise_for_status()

    def wait_for(self, n: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self.count() < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the panel accepted {self.count()} of {n} traces in {timeout_s:.0f} s")
            time.sleep(0.5)


async def produce(bootstrap: str, snaps: list[dict[str, Any]], rate: float | None) -> dict[str, int]:
    """Send every snapshot to sessions.idle (at `rate`/s, or at once), stamping `emitted_at`
    when each is handed to the producer. Returns session id -> emitted_at ms."""
    prod = producer(bootstrap, linger_ms=0)
    await prod.start()
    emitted: dict[str, int] = {}
    pending: list[asyncio.Future[Any]] = []
    try:
        start = time.monotonic()
        for i, snap in enumerate(snaps):
            if rate:
                delay = start + i / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            snap["emitted_at"] = int(time.time() * 1000)
            emitted[snap["session_id"]] = snap["emitted_at"]
            pending.append(await prod.send("sessions.idle", encode(snap),
                                           key=f"{snap['host']}:{snap['session_id']}".encode()))
        await asyncio.gather(*pending)
    finally:
        await prod.stop()
    return emitted


@dataclass
class Level:
    share: float
    rate: float
    sent: int
    seconds: float
    latencies_ms: list[float]
    load: str
    attempt: int

    def pct(self, q: float) -> float:
        xs = sorted(self.latencies_ms)
        return xs[min(len(xs) - 1, max(0, round(q / 100 * len(xs)) - 1))]


def run_level(stack: Stack, panel: Panel, bootstrap: str, snaps: Snapshots, share: float, max_rate: float,
              duration_s: float, attempt: int, timeout_s: float) -> Level:
    rate = share * max_rate
    batch = snaps.take(max(1, round(rate * duration_s)))
    wait_for_calm(10)
    panel.reset()
    load_before = loadavg()
    began = time.monotonic()
    emitted = asyncio.run(produce(bootstrap, batch, rate))
    seconds = time.monotonic() - began
    panel.wait_for(len(batch), timeout_s)
    accepted = panel.accepted_at()
    latencies = [accepted[sid] * 1000 - at for sid, at in emitted.items()]
    level = Level(share=share, rate=rate, sent=len(batch), seconds=seconds, latencies_ms=latencies,
                  load=f"{load_before} -> {loadavg()}", attempt=attempt)
    print(f"{share:.0%} ({rate:,.1f}/s, {len(batch)} sent in {seconds:.1f} s): p50 {level.pct(50):,.0f} ms, "
          f"p99 {level.pct(99):,.0f} ms (load {level.load})", file=sys.stderr)
    return level


def burst_rate(panel: Panel, bootstrap: str, snaps: Snapshots, n: int, timeout_s: float,
               cpu: dict[str, int] | None = None) -> tuple[float, str, list[CpuWindow]]:
    """Produce `n` snapshots at once; the panel's accept rate between its 10th and 90th
    percentile accept times. With `cpu` (row name -> session id), also the CPU each of those
    process groups used in that window and over the whole burst (first produce to last accept)."""
    wait_for_calm(10)
    panel.reset()
    load_before = loadavg()
    meter = CpuMeter(cpu or {})
    with meter if cpu else contextlib.nullcontext():
        began = time.time()
        asyncio.run(produce(bootstrap, snaps.take(n), None))
        panel.wait_for(n, timeout_s)
    times = sorted(panel.accepted_at().values())
    lo, hi = round(0.1 * (n - 1)), round(0.9 * (n - 1))
    rate = (hi - lo) / (times[hi] - times[lo])
    windows = [CpuWindow.between(meter, "p10-p90 accept window", times[lo], times[hi], hi - lo),
               CpuWindow.between(meter, "whole burst", began, times[-1], n)] if cpu else []
    return rate, f"{load_before} -> {loadavg()}", windows


def cpu_table(windows: list[CpuWindow]) -> list[str]:
    """Per process: CPU µs per delivered trace and share of the cores, in each window."""
    if not windows:
        return []

    def row(name: str, cpu_s: Callable[[CpuWindow], float]) -> list[str]:  # cpu_s: a window's CPU s of the row
        return [name, *[c for w in windows for c in (f"{w.us_per_trace(cpu_s(w)):,.0f}", f"{w.cores(cpu_s(w)):.0%}")]]

    rows = [row(name, lambda w, n=name: w.cpu_s[n]) for name in windows[0].cpu_s]
    rows.append(row("**all of the above**", lambda w: sum(w.cpu_s.values())))
    rows.append(row("rest of the machine (other users)", lambda w: w.machine_busy_s - sum(w.cpu_s.values())))
    rows.append(["idle", *[c for w in windows for c in ("", f"{1 - w.machine_busy_s / (w.seconds * CORES):.0%}")]])
    header = ["process"]
    for w in windows:
        header += [f"{w.name}: CPU us/trace", f"share of {CORES} cores"]
    spans = "; ".join(f"{w.name}: {w.seconds:.1f} s, {w.traces:,} traces" for w in windows)
    return ["", f"Where the CPU goes during the burst (user + system, /proc/<pid>/stat every "
                f"{CPU_SAMPLE_S:g} s; {spans}):", "",
            *md_table(header, "l" + "rr" * len(windows), rows)]


def table(capacity: float, capacity_n: int, capacity_load: str, probe: float, levels: list[Level],
          args: argparse.Namespace, cpu: list[CpuWindow] | None = None) -> str:
    halves = [lv for lv in levels if abs(lv.share - 0.5) < 1e-9]
    lines = [
        *result_header("End to end: idle to delivered",
                       f"python bench/end_to_end.py --burst {args.burst} --duration {args.duration:g} "
                       f"--levels {args.levels}"),
        "- method: one fresh local broker (4 partitions), sample, scrub, sign, breaker and deliver as real "
        "worker processes (Stack from devkit/local_stack.py), the stub scrubber and stub panel with zero "
        "added latency, sampling rate 1.0, so every snapshot is scrubbed, signed and delivered. Each "
        "25-message snapshot gets `emitted_at` = the wall-clock ms it is handed to the producer; latency = "
        "the stub panel's `first_at` (when the trace's POST arrived) - `emitted_at`, same machine clock. "
        "Max sustainable throughput = the panel's accept rate between the 10th and 90th percentile accept "
        "times of a burst produced at once. Each level then produces snapshots open-loop, evenly spaced, for "
        f"{args.duration:g} s and drains; a level run under high load is run again (every attempt listed).",
        "",
        f"Max sustainable throughput: **{capacity:,.1f} traces/s** (burst of {capacity_n:,} snapshots; "
        f"probe of 300: {probe:,.1f}/s; load avg {capacity_load}).",
        *cpu_table(cpu or []),
        "",
    ]
    lines += md_table(
        ["share of max", "offered traces/s", "snapshots", "p50 ms", "p90 ms", "p99 ms", "max ms", "attempt",
         "load avg before -> after"], "rrrrrrrrl",
        [[f"{lv.share:.0%}", f"{lv.rate:,.1f}", f"{lv.sent:,}", f"{lv.pct(50):,.0f}", f"{lv.pct(90):,.0f}",
          f"{lv.pct(99):,.0f}", f"{max(lv.latencies_ms):,.0f}", lv.attempt, lv.load] for lv in levels])
    if halves:
        verdicts = "; ".join(f"attempt {lv.attempt}: {lv.pct(99):,.0f} ms ("
                             f"{'met' if lv.pct(99) <= TARGET_P99_MS else 'MISSED'}, load {lv.load})" for lv in halves)
        lines += ["", f"Target p99 <= {TARGET_P99_MS:,.0f} ms at 50 % of the max rate: {verdicts}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--burst", type=int, default=0, help="snapshots in the throughput burst (0: 25 s worth)")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per latency level")
    parser.add_argument("--levels", default="0.25,0.5,0.9")
    parser.add_argument("--timeout", type=float, default=120.0, help="drain timeout per level")
    parser.add_argument("--no-repeat", action="store_true")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    shares = [float(x) for x in args.levels.split(",") if x]
    begun = time.monotonic()
    print(f"load before: {loadavg()}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        with local_broker(workdir) as broker:
            settings = StackSettings(bootstrap=broker.bootstrap, workdir=workdir, stages=STAGES, sampling_rate=1.0)
            with Stack(settings).start() as stack:
                panel = Panel(stack.panel_url)
                snaps = Snapshots()
                # warm-up: every stage has joined its group and delivered once
                asyncio.run(produce(broker.bootstrap, snaps.take(20), None))
                panel.wait_for(20, 180)
                probe, _, _ = burst_rate(panel, broker.bootstrap, snaps, 300, args.timeout)
                n = args.burst or max(300, round(probe * 25))
                sessions = {**{name: proc.proc.pid for name, proc in stack.procs.items() if proc.proc},
                            "broker (Java)": broker.pid() or -1}
                sessions = {STUB_ROWS.get(name, name): sid for name, sid in sessions.items()}
                capacity, capacity_load, cpu = burst_rate(panel, broker.bootstrap, snaps, n, args.timeout * 2,
                                                          sessions)
                print(f"max sustainable: {capacity:,.1f}/s ({n} burst; probe {probe:,.1f}/s)", file=sys.stderr)
                print("\n".join(cpu_table(cpu)), file=sys.stderr)
                levels: list[Level] = []
                for share in shares:
                    levels.append(run_level(stack, panel, broker.bootstrap, snaps, share, capacity, args.duration,
                                            1, args.timeout))
                    if not args.no_repeat and load_is_high():
                        levels.append(run_level(stack, panel, broker.bootstrap, snaps, share, capacity,
                                                args.duration, 2, args.timeout))
                panel.client.close()
    text = table(capacity, n, capacity_load, probe, levels, args, cpu)
    return publish("end_to_end", text, begun)


if __name__ == "__main__":
    sys.exit(main())
