"""Soak: N concurrent streams cycle through a gateway for M minutes, with faults injected.

Setup, all on 127.0.0.1: a ``gateway serve`` subprocess with two engines, ``scripted`` (a
deterministic script, a short delay per update) and ``wlk`` (the WhisperLiveKit engine, pointed at
the fake WhisperLiveKit server of tests/fakes/wlk_server.py, which runs in this process). N client
tasks each run one stream after another until the time is up: a WAV of 5-30 s (distinct random
words, so every upload is new bytes and its transcript is known), a random engine, raw
``POST /v1/transcriptions/stream?use_cache=false``. Faults:

- client disconnects: a fraction of streams (``--disconnect-rate``) are abandoned at a random
  moment (the socket is closed, during the upload or mid-stream);
- upstream 1011: the fake closes a fraction of WhisperLiveKit connections (``--drop-rate``) with
  1011 "keepalive ping timeout" at a random moment; the engine resumes, so those streams must
  still complete with the exact transcript.

It reports completed, errored (unexpected: an HTTP error, an ``error`` event, a stream without
``done``, a wrong transcript, a hang) and disconnected (injected) streams; leaks once the load
stopped (``gateway_active_streams`` and the engines' session and queue gauges back to 0, the fake's
open connections back to 0, the gateway's open descriptors back to their idle count after warm-up);
RSS drift (the median RSS over the last ``--window`` seconds of load against the median over the
``--window`` seconds after ``--warmup``: minute 1 by default) and the same for descriptors.

Targets: 0 unexpected errors, RSS drift at most ``--max-drift`` % (5), no leaks. The exit status
is 1 when one is missed. ``--seed`` fixes every random choice (per client task).

Memory: with glibc's default malloc arenas (8 per core, taken by the gateway's decoding and store
threads) RSS creeps up for minutes through arena fragmentation while the Python heap stays flat
(tracemalloc), so ``gateway serve`` caps them at 2 itself unless ``MALLOC_ARENA_MAX`` is set.
``--malloc-arena-max 16`` runs the gateway with ``MALLOC_ARENA_MAX=16``, glibc's own default on a
2-core machine (8 per core), for comparison. By default the gateway gets this process's environment.

Run from the repository root: ``python bench/soak.py`` (defaults: 8 minutes, 50 streams; about
9 minutes in all).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections import defaultdict
from contextlib import aclosing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from random import Random
from typing import Any

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent / "tests"))

from _common import (  # noqa: E402
    SSEReader,
    fd_count,
    machine,
    markdown_table,
    raise_fd_limit,
    rss_bytes,
    start_gateway,
    upload_request,
    wait_until,
)
from fakes.wlk_server import Drop, FakeWlkServer, expected_text, pcm_words, wav_bytes  # noqa: E402

__all__ = ["Options", "Report", "run_soak"]

STREAM_PATH = "/v1/transcriptions/stream"
ENGINES = ("scripted", "wlk")
WORD_SECONDS = 0.5
SCRIPT = [f"s{i}" for i in range(1, 61)]
# A hung stream counts as an unexpected error after this long.
STREAM_TIMEOUT = 60.0
# How long leaks get to settle once the load stopped (closed sockets, finishing sessions).
SETTLE_TIMEOUT = 15.0
# Drops are decided per WhisperLiveKit connection index, this many indices ahead of the fake.
DROP_LOOKAHEAD = 1_000


@dataclass(frozen=True)
class Options:
    minutes: float = 8.0
    streams: int = 50
    seed: int = 1
    disconnect_rate: float = 0.1
    drop_rate: float = 0.2
    # Seconds of load before the RSS baseline window, and the length of both windows.
    warmup: float = 60.0
    window: float = 30.0
    max_drift: float = 5.0
    # Audio per stream: a random number of 0.5 s words in this range.
    min_words: int = 10
    max_words: int = 60
    # MALLOC_ARENA_MAX for the gateway process; 0 leaves its environment as it is.
    malloc_arena_max: int = 0

    @property
    def arenas(self) -> str:
        """The glibc malloc arena setting the gateway runs with, for the report."""
        value = str(self.malloc_arena_max or os.environ.get("MALLOC_ARENA_MAX", ""))
        return f"MALLOC_ARENA_MAX={value}" if value else "2 malloc arenas (gateway serve's cap)"


@dataclass
class Tally:
    started: int = 0
    completed: int = 0
    errored: int = 0
    disconnected: int = 0


@dataclass
class Report:
    options: Options
    wall: float = 0.0
    tallies: dict[str, Tally] = field(default_factory=lambda: {e: Tally() for e in ENGINES})
    errors: list[str] = field(default_factory=list)
    outcomes: dict[str, float] = field(default_factory=dict)
    drops_injected: int = 0
    reconnects: float = 0.0
    active_streams_end: float = math.nan
    engine_sessions_end: float = math.nan
    engine_queue_end: float = math.nan
    wlk_open_end: int = -1
    fd_idle_before: int = 0
    fd_idle_after: int = 0
    rss_idle_before: int = 0
    rss_base: float = math.nan
    rss_end: float = math.nan
    rss_max: int = 0
    fd_base: float = math.nan
    fd_end: float = math.nan
    samples: list[tuple[float, int, int]] = field(default_factory=list)

    @property
    def total(self) -> Tally:
        t = Tally()
        for x in self.tallies.values():
            t.started += x.started
            t.completed += x.completed
            t.errored += x.errored
            t.disconnected += x.disconnected
        return t

    @property
    def rss_drift(self) -> float:
        return (self.rss_end - self.rss_base) / self.rss_base * 100

    @property
    def fd_leaked(self) -> int:
        return max(0, self.fd_idle_after - self.fd_idle_before)

    @property
    def leaks(self) -> int:
        gauges = (self.active_streams_end, self.engine_sessions_end, self.engine_queue_end)
        stuck = sum(int(g) if math.isfinite(g) else 1 for g in gauges)
        return stuck + max(0, self.wlk_open_end) + (self.wlk_open_end < 0) + self.fd_leaked

    def missed(self, max_drift: float | None = None) -> list[str]:
        """The targets this run missed (empty when all were met)."""
        limit = self.options.max_drift if max_drift is None else max_drift
        missed = []
        if self.total.errored:
            missed.append(f"{self.total.errored} unexpected errors")
        if not self.rss_drift <= limit:
            missed.append(f"RSS drift {self.rss_drift:+.1f} % > {limit:g} %")
        if self.leaks:
            missed.append(f"{self.leaks} leaked sessions/connections/descriptors")
        return missed


@dataclass(frozen=True)
class Plan:
    engine: str
    values: list[int]
    cut_at: float | None

    def expected(self) -> str:
        if self.engine == "wlk":
            return str(expected_text(self.values))
        return " ".join(SCRIPT[: len(self.values)])


def plan(rng: Random, options: Options) -> Plan:
    n = rng.randint(options.min_words, options.max_words)
    values = [rng.randint(1, 30_000) for _ in range(n)]
    engine = rng.choice(ENGINES)
    # A cut somewhere in the stream's expected life: upload, queue, transcription or after done.
    cut = rng.uniform(0.0, 2.0) if rng.random() < options.disconnect_rate else None
    return Plan(engine, values, cut)


class DropSchedule:
    """Which WhisperLiveKit connections the fake closes with 1011, and when after accept.

    Decided per connection index, in index order from one seeded generator, and written into the
    fake's ``drops`` a stretch ahead of the connections it has seen.
    """

    def __init__(self, fake: FakeWlkServer, rate: float, rng: Random) -> None:
        self.fake, self.rate, self.rng = fake, rate, rng
        self.next_index = 1

    def top_up(self) -> None:
        while self.next_index <= len(self.fake.connections) + DROP_LOOKAHEAD:
            if self.rng.random() < self.rate:
                self.fake.drops[self.next_index] = Drop(at=self.rng.uniform(0.05, 1.0))
            self.next_index += 1


async def one_stream(host: str, port: int, p: Plan) -> str:
    """Run one stream; ``"completed"``, ``"disconnected"`` or a description of what went wrong."""
    target = f"{STREAM_PATH}?engine={p.engine}&use_cache=false"
    request = upload_request(host, port, target, wav_bytes(pcm_words(p.values)), "audio/wav")
    done = b""
    with trio.move_on_after(math.inf if p.cut_at is None else p.cut_at) as cut:
        try:
            with trio.fail_after(STREAM_TIMEOUT):
                stream = await trio.open_tcp_stream(host, port)
                async with stream:
                    reader = SSEReader(stream)
                    await stream.send_all(request)
                    if await reader.head() != 200:
                        return f"HTTP {reader.status}: {(await reader.body())[:200]!r}"
                    async with aclosing(reader.events()) as events:
                        async for frame, _ in events:
                            if frame.startswith(b"event: done"):
                                done = frame
                            elif frame.startswith(b"event: error"):
                                return f"{p.engine}: {frame.strip()!r}"
        except trio.TooSlowError:
            return f"{p.engine}: no done within {STREAM_TIMEOUT:g} s"
        except (OSError, EOFError) as exc:
            return f"{p.engine}: {exc!r}"
    if not done:
        return "disconnected" if cut.cancelled_caught else f"{p.engine}: no done event"
    text = json.loads(done.split(b"data: ", 1)[1])["text"]
    if text != p.expected():
        return f"{p.engine}: wrong transcript ({len(text.split())} words, {len(p.values)} expected)"
    return "completed"


async def scrape(client: httpx.AsyncClient, url: str) -> dict[str, float]:
    """``name{labels}`` -> value, with per-engine gauges summed as ``name``."""
    text = (await client.get(url + "/metrics")).text
    values: defaultdict[str, float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[sample.name] += sample.value
            if sample.name == "gateway_stream_outcomes_total":
                values[f"outcome:{sample.labels['code']}"] += sample.value
    return values


def _median(samples: list[tuple[float, int, int]], lo: float, hi: float, i: int) -> float:
    window = [s[i] for s in samples if lo <= s[0] <= hi]
    return statistics.median(window) if window else math.nan


async def run_soak(options: Options, *, log: Any = sys.stderr) -> Report:
    """Run the soak and return its report (it never raises for a missed target)."""
    report = Report(options)
    raise_fd_limit(max(4096, options.streams * 16))
    fake = FakeWlkServer(speed=20.0, tick=0.05, word_seconds=WORD_SECONDS)
    drops = DropSchedule(fake, options.drop_rate, Random(f"{options.seed}-drops"))
    drops.top_up()
    async with trio.open_nursery() as nursery:
        wlk_url = await nursery.start(fake.serve_tcp)
        config = {
            "server": {"default_engine": "scripted", "shutdown_grace": 2.0},
            "engines": {
                "scripted": {
                    "kind": "scripted",
                    "words": SCRIPT,
                    "seconds_per_word": WORD_SECONDS,
                    "delay": 0.02,
                },
                "wlk": {
                    "kind": "whisperlivekit",
                    "urls": [wlk_url],
                    "max_sessions": options.streams,
                    "backoff_initial": 0.05,
                    "backoff_max": 1.0,
                },
            },
        }
        env = (
            {"MALLOC_ARENA_MAX": str(options.malloc_arena_max)} if options.malloc_arena_max else {}
        )
        with start_gateway(config, env=env) as gateway:
            host, port = gateway.host_port
            async with httpx.AsyncClient(timeout=30.0) as metrics:
                await _soak(report, options, drops, gateway.pid, host, port, log)
                await _settle(report, metrics, gateway.url, gateway.pid, fake)
        nursery.cancel_scope.cancel()
    report.drops_injected = sum(1 for c in fake.connections if c.closed_by_server == 1011)
    return report


async def _soak(
    report: Report,
    options: Options,
    drops: DropSchedule,
    pid: int,
    host: str,
    port: int,
    log: Any,
) -> None:
    # Warm-up: one stream per engine (opens the store's WAL, the engines' first sessions), so
    # the idle descriptor count below is the steady one.
    for engine in ENGINES:
        outcome = await one_stream(host, port, Plan(engine, list(range(1, 11)), None))
        if outcome != "completed":
            report.errors.append(f"warm-up: {outcome}")
            report.tallies[engine].errored += 1
    # The lowest count over a second: a socket the warm-up's client just closed may linger briefly.
    counts = []
    for _ in range(10):
        counts.append(fd_count(pid))
        await trio.sleep(0.1)
    report.fd_idle_before = min(counts)
    report.rss_idle_before = rss_bytes(pid)

    start = time.monotonic()
    deadline = start + options.minutes * 60.0

    async def client(worker: int) -> None:
        rng = Random(f"{options.seed}-{worker}")
        while time.monotonic() < deadline:
            p = plan(rng, options)
            if p.engine == "wlk":
                drops.top_up()
            tally = report.tallies[p.engine]
            tally.started += 1
            outcome = await one_stream(host, port, p)
            if outcome == "completed":
                tally.completed += 1
            elif outcome == "disconnected":
                tally.disconnected += 1
            else:
                tally.errored += 1
                if len(report.errors) < 20:
                    report.errors.append(outcome)

    async def sampler() -> None:
        next_print = start + 60.0
        while True:
            now = time.monotonic()
            report.samples.append((now - start, rss_bytes(pid), fd_count(pid)))
            if now >= next_print:
                t = report.total
                print(
                    f"{(now - start) / 60:.0f} min: {t.started} streams, {t.completed} completed, "
                    f"{t.errored} errors, RSS {rss_bytes(pid) / 2**20:.1f} MiB",
                    file=log,
                )
                next_print += 60.0
            await trio.sleep(1.0)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sampler)
        async with trio.open_nursery() as clients:
            for worker in range(options.streams):
                clients.start_soon(client, worker)
        nursery.cancel_scope.cancel()
    report.wall = time.monotonic() - start
    load = options.minutes * 60.0
    report.rss_base = _median(report.samples, options.warmup, options.warmup + options.window, 1)
    report.rss_end = _median(report.samples, load - options.window, load, 1)
    report.fd_base = _median(report.samples, options.warmup, options.warmup + options.window, 2)
    report.fd_end = _median(report.samples, load - options.window, load, 2)
    report.rss_max = max(s[1] for s in report.samples)


async def _settle(
    report: Report, client: httpx.AsyncClient, url: str, pid: int, fake: FakeWlkServer
) -> None:
    """Wait (bounded) for every stream, session and connection to be gone; record what is left."""

    async def idle() -> bool:
        m = await scrape(client, url)
        return (
            m["gateway_active_streams"] == 0
            and m["gateway_engine_sessions"] == 0
            and m["gateway_engine_queue_length"] == 0
            and fake.active == 0
        )

    async def fds_back() -> bool:
        return fd_count(pid) <= report.fd_idle_before

    # Bounded: what has not settled by then is reported as leaked.
    with trio.move_on_after(SETTLE_TIMEOUT):
        await wait_until(idle, 0.1)
    await client.aclose()  # its keep-alive connection is one of the gateway's descriptors
    with trio.move_on_after(SETTLE_TIMEOUT):
        await wait_until(fds_back, 0.1)
    report.fd_idle_after = fd_count(pid)
    async with httpx.AsyncClient(timeout=30.0) as fresh:
        m = await scrape(fresh, url)
    report.active_streams_end = m["gateway_active_streams"]
    report.engine_sessions_end = m["gateway_engine_sessions"]
    report.engine_queue_end = m["gateway_engine_queue_length"]
    report.wlk_open_end = fake.active
    report.reconnects = m["gateway_wlk_reconnects_total"]
    report.outcomes = {k[8:]: v for k, v in sorted(m.items()) if k.startswith("outcome:")}


def mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def print_report(report: Report) -> None:
    o = report.options
    rows = []
    for name, t in [*report.tallies.items(), ("all", report.total)]:
        rows.append([name, str(t.started), str(t.completed), str(t.errored), str(t.disconnected)])
    print(
        markdown_table(
            f"Streams: {o.streams} concurrent for {o.minutes:g} min (seed {o.seed}; "
            f"{o.disconnect_rate:.0%} abandoned by the client at a random moment, "
            f"{o.drop_rate:.0%} of WhisperLiveKit connections closed with 1011; gateway with "
            f"{o.arenas})",
            ["engine", "streams", "completed", "errored (unexpected)", "disconnected (injected)"],
            rows,
        )
    )
    outcomes = ", ".join(f"{k} {v:.0f}" for k, v in report.outcomes.items())
    print(
        f"\nGateway outcome counters: {outcomes}. 1011 closes injected: {report.drops_injected}; "
        f"WhisperLiveKit reconnects: {report.reconnects:.0f}."
    )
    print(
        markdown_table(
            f"Leaks once the load stopped, and drift (median over {o.window:g} s after "
            f"{o.warmup:g} s of load vs over the last {o.window:g} s of load; RSS in MiB)",
            ["what", "value"],
            [
                ["gateway_active_streams", f"{report.active_streams_end:g}"],
                [
                    "engine sessions / queued",
                    f"{report.engine_sessions_end:g} / {report.engine_queue_end:g}",
                ],
                ["fake WhisperLiveKit open connections", str(report.wlk_open_end)],
                [
                    "open fds idle: after warm-up -> after the load",
                    f"{report.fd_idle_before} -> {report.fd_idle_after}",
                ],
                ["open fds under load: start -> end", f"{report.fd_base:g} -> {report.fd_end:g}"],
                ["RSS idle after warm-up", mib(report.rss_idle_before)],
                [
                    "RSS under load: start -> end (max)",
                    f"{mib(report.rss_base)} -> {mib(report.rss_end)} ({mib(report.rss_max)})",
                ],
                ["RSS drift", f"{report.rss_drift:+.2f} %"],
            ],
        )
    )
    if report.errors:
        print("\nFirst unexpected errors:")
        for e in report.errors[:10]:
            print(f"- {e}")
    missed = report.missed()
    print(
        f"\nTargets (0 unexpected errors, RSS drift <= {o.max_drift:g} %, 0 leaks): "
        + ("met" if not missed else "MISSED: " + "; ".join(missed))
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = Options()
    parser.add_argument("--minutes", type=float, default=defaults.minutes)
    parser.add_argument("--streams", type=int, default=defaults.streams)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--disconnect-rate", type=float, default=defaults.disconnect_rate)
    parser.add_argument("--drop-rate", type=float, default=defaults.drop_rate)
    parser.add_argument(
        "--warmup", type=float, help="seconds of load before the RSS baseline (default: 60)"
    )
    parser.add_argument("--window", type=float, help="seconds per median window (default: 30)")
    parser.add_argument("--max-drift", type=float, default=defaults.max_drift)
    parser.add_argument(
        "--malloc-arena-max",
        type=int,
        default=defaults.malloc_arena_max,
        help="MALLOC_ARENA_MAX for the gateway (default: its environment's, else serve's cap of 2)",
    )
    parser.add_argument("--json", type=Path, help="also write the report here as JSON")
    args = parser.parse_args()
    load = args.minutes * 60.0
    # Short runs scale the windows down: warm-up a third of the load, windows a sixth.
    warmup = args.warmup if args.warmup is not None else min(defaults.warmup, load / 3)
    window = args.window if args.window is not None else min(defaults.window, load / 6)
    options = Options(
        minutes=args.minutes,
        streams=args.streams,
        seed=args.seed,
        disconnect_rate=args.disconnect_rate,
        drop_rate=args.drop_rate,
        warmup=warmup,
        window=window,
        max_drift=args.max_drift,
        malloc_arena_max=args.malloc_arena_max,
    )
    print("Soak: gateway serve subprocess and an in-process fake WhisperLiveKit on 127.0.0.1")
    print(machine())
    report = trio.run(run_soak, options)
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=1, default=str))
    sys.exit(1 if report.missed() else 0)


if __name__ == "__main__":
    main()
