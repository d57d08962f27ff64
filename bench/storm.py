"""Disconnect storm: N clients leave a gateway at random points; nothing may be left behind.

Setup, all in this process on 127.0.0.1: the gateway as ``gateway serve`` runs it (hypercorn on
trio, tests/conftest.py's ``run_gateway``) with two engines, ``scripted`` (a short delay per
update) and ``wlk`` (the WhisperLiveKit engine on the fake server of tests/fakes/wlk_server.py),
each capped at ``--sessions`` sessions so that most clients queue. ``--clients`` clients, at most
``--concurrency`` at a time, each upload a WAV of 4-12 s (raw ``POST /v1/transcriptions/stream``,
a random engine) and leave, by closing the socket, at one of four points chosen at random:

- ``upload``: part way through the request body (a fifth of them: the whole body, but before
  reading anything of the answer);
- ``queued``: a random moment (up to ``QUEUED_LINGER`` s) after the first ``queued`` event;
- ``stream``: after a random number of ``transcription`` events, before ``done``;
- ``done``: as soon as ``done`` arrives (before the end of the response).

The table counts the point where each client really left: a ``queued`` client admitted before
its moment leaves at its first transcription (``stream``), a ``stream`` client that gets ``done``
first leaves then (``done``).

Why in-process. Everything that could be left behind is then visible directly:

- engine sessions (the engines' own figures, what /metrics exports), the slots and queue places
  held in each engine's admission, and the gateway's count of jobs in flight;
- upstream connections: the fake's open sessions;
- descriptors: ``/proc/self/fd`` (the clients' sockets are closed by then, so what is left over
  the baseline is the gateway's or the fake's) and the spool directory's files;
- tasks: the whole trio task tree, walked from the root task. A ``gateway serve`` subprocess would
  show gauges and descriptors but not its tasks; here a task stuck in a cancelled stream (a
  hypercorn connection, an engine reader, a keepalive) shows up by name.

Each leak is what is over the baseline taken after a warm-up (one complete stream per engine),
once everything had ``SETTLE_TIMEOUT`` s to finish.

Close latency. Each upstream session must close within 1 s of its client leaving. The engine's
connector is wrapped to send the request's X-Request-ID (one per client) as a header to the fake,
which records when it saw each session open and close, on the same trio clock the client stamps
its departure with. A session that closed before its client left (``done``: the session ends
before ``done`` is sent) counts 0. The percentiles are over sessions still open when their client
left.

Targets: 0 unexpected outcomes (an HTTP error, an ``error`` event, a stream cut by the gateway, a
hang), 0 leaks, every upstream session closed within ``MAX_CLOSE_LATENCY`` s of its client
leaving. The exit status is 1 when one is missed. ``--seed`` fixes every random choice.

Run from the repository root: ``python bench/storm.py`` (1,000 clients, 50 at a time; about a
minute on 2 cores).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, aclosing, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from random import Random
from typing import Any

import msgspec
import trio

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent / "tests"))

from _common import (  # noqa: E402
    SSEReader,
    fd_count,
    machine,
    markdown_table,
    percentile,
    raise_fd_limit,
    upload_request,
)
from conftest import Gateway, run_gateway  # noqa: E402
from fakes.wlk_server import FakeConnection, FakeWlkServer, pcm_words, wav_bytes  # noqa: E402
from soak import ENGINES, SCRIPT, STREAM_PATH, WORD_SECONDS  # noqa: E402
from trio_websocket import WebSocketConnection  # noqa: E402

from gateway.admission import Admission  # noqa: E402
from gateway.config import Config  # noqa: E402
from gateway.engines._upstream import Connector  # noqa: E402
from gateway.engines.base import Engine  # noqa: E402
from gateway.engines.whisperlivekit import WhisperLiveKitEngine  # noqa: E402
from gateway.logs import current_request  # noqa: E402

__all__ = ["LEAVE_POINTS", "Options", "Report", "run_storm"]

LEAVE_POINTS = ("upload", "queued", "stream", "done")
# The header that carries a client's X-Request-ID to the fake WhisperLiveKit server.
TAG_HEADER = "x-storm-client"
# A client leaving while queued stays up to this long after its first queued event.
QUEUED_LINGER = 0.5
# A client leaving mid-upload waits up to this long after its partial body.
UPLOAD_LINGER = 0.1
# The share of those that send the whole body and leave before reading the answer (the gateway
# then admits the job and starts the stream before it notices).
WHOLE_BODY_SHARE = 0.2
# A client that has not left after this long counts as a hang.
CLIENT_TIMEOUT = 60.0
# How long leaks get to settle once the last client left; what is left then is leaked.
SETTLE_TIMEOUT = 10.0
# The target: every upstream session closed within this long of its client leaving.
MAX_CLOSE_LATENCY = 1.0
# Seconds between two samples of what the gateway holds during the storm.
PEAK_INTERVAL = 0.1


@dataclass(frozen=True)
class Options:
    clients: int = 1000
    concurrency: int = 50
    seed: int = 1
    # Sessions per engine: far fewer than the concurrency, so that clients queue.
    sessions: int = 4
    # Audio per client: a random number of 0.5 s words (16 words = 256 KiB, one spool batch).
    min_words: int = 8
    max_words: int = 24
    # How long leaks get to settle once the last client left (see SETTLE_TIMEOUT).
    settle: float = SETTLE_TIMEOUT


@dataclass(frozen=True)
class Plan:
    index: int
    engine: str
    leave: str
    values: list[int]
    # upload: the share of the body sent; queued and upload: seconds before leaving; stream: the
    # number of transcription events read before leaving.
    fraction: float
    linger: float
    events: int

    @property
    def request_id(self) -> str:
        return f"storm-{self.index}"


def plan(index: int, options: Options) -> Plan:
    rng = Random(f"{options.seed}-{index}")
    n = rng.randint(options.min_words, options.max_words)
    leave = rng.choice(LEAVE_POINTS)
    return Plan(
        index=index,
        engine=rng.choice(ENGINES),
        leave=leave,
        values=[rng.randint(1, 30_000) for _ in range(n)],
        fraction=1.0 if rng.random() < WHOLE_BODY_SHARE else rng.uniform(0.05, 0.95),
        linger=rng.uniform(0.0, QUEUED_LINGER if leave == "queued" else UPLOAD_LINGER),
        events=rng.randint(1, max(1, n // 2)),
    )


@dataclass
class Outcome:
    """What one client did: where it really left and when, or what went wrong."""

    plan: Plan
    point: str = ""
    left_at: float = math.nan
    error: str = ""


@dataclass
class Leaks:
    """What is over the baseline once the storm settled (all 0 when nothing leaked)."""

    jobs: int = 0
    sessions: int = 0
    leases: int = 0
    queued: int = 0
    upstream: int = 0
    spool_files: int = 0
    fds: int = 0
    tasks: Counter[str] = field(default_factory=Counter)

    @property
    def total(self) -> int:
        counts = (
            self.jobs,
            self.sessions,
            self.leases,
            self.queued,
            self.upstream,
            self.spool_files,
            self.fds,
        )
        return sum(counts) + sum(self.tasks.values())


@dataclass
class Report:
    options: Options
    wall: float = 0.0
    outcomes: list[Outcome] = field(default_factory=list)
    leaks: Leaks = field(default_factory=Leaks)
    settled_in: float = math.nan
    fds_before: int = 0
    fds_after: int = 0
    tasks_before: int = 0
    tasks_after: int = 0
    # The most held at once during the storm (sampled every PEAK_INTERVAL s): proof that the
    # measures see what the storm creates.
    peak: dict[str, int] = field(default_factory=dict)
    # Per client index: its upstream sessions (the fake's records), for the wlk engine.
    upstream: dict[int, list[FakeConnection]] = field(default_factory=dict)
    untagged: int = 0

    @property
    def errors(self) -> list[str]:
        return [
            f"client {o.plan.index} ({o.plan.engine}): {o.error}" for o in self.outcomes if o.error
        ]

    def by_point(self) -> dict[str, list[Outcome]]:
        groups: dict[str, list[Outcome]] = {p: [] for p in LEAVE_POINTS}
        for o in self.outcomes:
            if not o.error:
                groups.setdefault(o.point, []).append(o)
        return groups

    def close_latency(self, outcome: Outcome) -> float | None:
        """Seconds from the client leaving to its last upstream session closing (0 when all closed
        first); None when it had no upstream session; inf when one never closed."""
        conns = self.upstream.get(outcome.plan.index, [])
        if not conns:
            return None
        ends = [c.ended_at for c in conns]
        if any(e is None for e in ends):
            return math.inf
        return max(0.0, max(e for e in ends if e is not None) - outcome.left_at)

    def open_at_leave(self, outcomes: list[Outcome]) -> list[float]:
        """Close latencies of the upstream sessions still open when their client left."""
        latencies = []
        for o in outcomes:
            latency = self.close_latency(o)
            if latency is not None and latency > 0:
                latencies.append(latency)
        return latencies

    @property
    def latencies(self) -> list[float]:
        return self.open_at_leave(self.outcomes)

    def missed(self) -> list[str]:
        """The targets this run missed (empty when all were met)."""
        missed = []
        if errors := self.errors:
            missed.append(f"{len(errors)} unexpected outcomes")
        if self.leaks.total:
            missed.append(f"{self.leaks.total} leaked jobs/sessions/connections/files/tasks")
        if self.untagged:
            missed.append(f"{self.untagged} upstream sessions not attributable to a client")
        slow = [x for x in self.latencies if not x <= MAX_CLOSE_LATENCY]
        if slow:
            missed.append(
                f"{len(slow)} upstream sessions closed more than {MAX_CLOSE_LATENCY:g} s "
                f"after their client left (max {max(slow):.3f} s)"
            )
        return missed


# --- what the process holds ---------------------------------------------------------------------


def task_names() -> Counter[str]:
    """Every task of this trio run, by name (the walk of the task tree from its root)."""
    names: Counter[str] = Counter()
    root = trio.lowlevel.current_root_task()
    assert root is not None, "called from inside a trio run"
    stack = [root]
    while stack:
        task = stack.pop()
        names[task.name] += 1
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return names


@dataclass(frozen=True)
class Holdings:
    """What the gateway and the fake hold at one moment."""

    jobs: int
    sessions: int
    leases: int
    queued: int
    upstream: int
    spool_files: int
    fds: int
    tasks: Counter[str]

    @classmethod
    def now(cls, gw: Gateway, fake: FakeWlkServer, spool: Path) -> Holdings:
        sessions = leases = queued = 0
        for engine in gw.state.engines.values():
            sessions += _total(engine.stats().get("sessions", 0))
            admission = _admission(engine)
            if admission is not None:
                leases += admission.active
                queued += admission.queue_length
        return cls(
            jobs=gw.state.active_jobs,
            sessions=sessions,
            leases=leases,
            queued=queued,
            upstream=fake.active,
            spool_files=len(os.listdir(spool)),
            fds=fd_count(os.getpid()),
            tasks=task_names(),
        )

    def over(self, base: Holdings) -> Leaks:
        """What is held now beyond ``base`` (less than it counts 0)."""
        return Leaks(
            jobs=max(0, self.jobs - base.jobs),
            sessions=max(0, self.sessions - base.sessions),
            leases=max(0, self.leases - base.leases),
            queued=max(0, self.queued - base.queued),
            upstream=max(0, self.upstream - base.upstream),
            spool_files=max(0, self.spool_files - base.spool_files),
            fds=max(0, self.fds - base.fds),
            tasks=self.tasks - base.tasks,
        )


def _admission(engine: Engine) -> Admission | None:
    """The engine's admission: its session slots (leases) and its queue."""
    # With admission as one rule (issue 13, part 2) every engine has ``admission``; before it, the
    # scripted engine kept its own ``_admission`` (None without max_sessions).
    admission = getattr(engine, "admission", None) or getattr(engine, "_admission", None)
    return admission if isinstance(admission, Admission) else None


def _total(value: Any) -> int:
    return int(sum(value.values())) if isinstance(value, dict) else int(value)


async def _settled(
    measure: Callable[[], Holdings], done: Callable[[Holdings], bool], within: float
) -> Holdings:
    """Re-measure every 50 ms until ``done`` holds or ``within`` seconds pass; the last measure.

    Polling, because closing sockets, threads and tasks that finish have no one event to wait on.
    """
    held = measure()
    with trio.move_on_after(within):
        while not done(held):
            await trio.sleep(0.05)
            held = measure()
    return held


def tagging(connector: Connector) -> Connector:
    """``connector``, sending the current request's X-Request-ID to the upstream as TAG_HEADER."""

    def connect(
        url: str, *, extra_headers: list[tuple[bytes, bytes]], connect_timeout: float
    ) -> AbstractAsyncContextManager[WebSocketConnection]:
        entry = current_request()
        tag = [(TAG_HEADER.encode(), entry.request_id.encode())] if entry is not None else []
        return connector(url, extra_headers=[*extra_headers, *tag], connect_timeout=connect_timeout)

    return connect


# --- one client ---------------------------------------------------------------------------------


async def one_client(host: str, port: int, p: Plan, outcome: Outcome) -> None:
    """Run one client to its leave point; sets ``outcome``'s point and departure, or its error."""
    body = wav_bytes(pcm_words(p.values))
    target = f"{STREAM_PATH}?engine={p.engine}&use_cache=false"
    request = upload_request(
        host, port, target, body, "audio/wav", headers={"X-Request-ID": p.request_id}
    )
    stream = await trio.open_tcp_stream(host, port)
    try:
        with trio.fail_after(CLIENT_TIMEOUT):
            if p.leave == "upload":
                await stream.send_all(
                    request[: len(request) - len(body) + int(len(body) * p.fraction)]
                )
                await trio.sleep(p.linger)
                outcome.point = "upload"
                return
            await stream.send_all(request)
            reader = SSEReader(stream)
            if await reader.head() != 200:
                outcome.error = f"HTTP {reader.status}: {(await reader.body())[:200]!r}"
                return
            outcome.point = await _read_until_leaving(reader, p)
    except trio.TooSlowError:
        outcome.error = f"still connected after {CLIENT_TIMEOUT:g} s"
    except (OSError, EOFError) as exc:
        outcome.error = repr(exc)
    except _Unexpected as exc:
        outcome.error = str(exc)
    finally:
        outcome.left_at = trio.current_time()
        await stream.aclose()


class _Unexpected(Exception):
    pass


async def _read_until_leaving(reader: SSEReader, p: Plan) -> str:
    """Read events until the plan says to leave; the point where the client left."""
    point = "head"
    seen = 0
    with trio.CancelScope() as linger:
        async with aclosing(reader.events()) as events:
            async for frame, _ in events:
                if frame.startswith(b"event: queued"):
                    point = "queued" if point == "head" else point
                    if p.leave == "queued" and linger.deadline == math.inf:
                        linger.deadline = trio.current_time() + p.linger
                elif frame.startswith(b"event: transcription"):
                    point, seen = "stream", seen + 1
                    if p.leave == "queued" or (p.leave == "stream" and seen >= p.events):
                        return point
                elif frame.startswith(b"event: done"):
                    return "done"
                elif frame.startswith(b"event: error"):
                    raise _Unexpected(frame.strip().decode(errors="replace"))
            raise _Unexpected("the response ended without done")
    return point


# --- the storm ----------------------------------------------------------------------------------


def gateway_config(wlk_url: str, workdir: Path, options: Options) -> Config:
    """Both engines configured explicitly (whatever the default engine is)."""
    queue = {"max_sessions": options.sessions, "max_queue": options.clients, "queue_timeout": 600}
    data = {
        "server": {"default_engine": "scripted", "spool_dir": str(workdir / "spool")},
        "store": {"path": str(workdir / "gateway.sqlite3")},
        "engines": {
            "scripted": {
                "kind": "scripted",
                "words": SCRIPT,
                "seconds_per_word": WORD_SECONDS,
                "delay": 0.02,
                **queue,
            },
            "wlk": {
                "kind": "whisperlivekit",
                "urls": [wlk_url],
                "backoff_initial": 0.05,
                "backoff_max": 1.0,
                **queue,
            },
        },
    }
    return msgspec.convert(data, Config)


@asynccontextmanager
async def storm_setup(options: Options) -> AsyncIterator[tuple[Gateway, FakeWlkServer, Path]]:
    """The fake WhisperLiveKit server and the gateway, with the wlk connector tagging sessions."""
    fake = FakeWlkServer(speed=20.0, tick=0.05, word_seconds=WORD_SECONDS)
    with tempfile.TemporaryDirectory(prefix="bench-storm-") as tmp:
        workdir = Path(tmp)
        (workdir / "spool").mkdir()
        async with trio.open_nursery() as nursery:
            wlk_url = await nursery.start(fake.serve_tcp)
            async with run_gateway(gateway_config(wlk_url, workdir, options)) as gw:
                engine = gw.state.engines["wlk"]
                assert isinstance(engine, WhisperLiveKitEngine)
                engine.connector = tagging(engine.connector)
                yield gw, fake, workdir / "spool"
            nursery.cancel_scope.cancel()


async def run_storm(options: Options, *, log: Any = sys.stderr) -> Report:
    """Run the storm and return its report (it never raises for a missed target)."""
    report = Report(options)
    raise_fd_limit(max(4096, options.concurrency * 16))
    async with storm_setup(options) as (gw, fake, spool):
        host, port = gw.url.removeprefix("http://").rsplit(":", 1)
        await _storm(report, options, gw, fake, spool, host, int(port), log)
    for conn in fake.connections:
        tag = conn.headers.get(TAG_HEADER, "")
        if not tag.startswith("storm-"):
            report.untagged += 1
            continue
        report.upstream.setdefault(int(tag.removeprefix("storm-")), []).append(conn)
    return report


async def _storm(
    report: Report,
    options: Options,
    gw: Gateway,
    fake: FakeWlkServer,
    spool: Path,
    host: str,
    port: int,
    log: Any,
) -> None:
    # Warm-up: one complete stream per engine (the store's first write, the first sessions), so
    # that the baseline is the steady idle state.
    for i, engine in enumerate(ENGINES):
        warm = Plan(-1 - i, engine, "done", list(range(1, 9)), 1.0, 0.0, 0)
        outcome = Outcome(warm)
        await one_client(host, port, warm, outcome)
        if outcome.error:
            raise RuntimeError(f"warm-up on {engine}: {outcome.error}")

    def measure() -> Holdings:
        return Holdings.now(gw, fake, spool)

    def idle(h: Holdings) -> bool:
        return not (h.jobs or h.sessions or h.leases or h.queued or h.upstream or h.spool_files)

    # The baseline: idle, and the same tasks and descriptors over 5 measures in a row.
    history: list[Holdings] = []

    def steady(h: Holdings) -> bool:
        history.append(h)
        last = history[-5:]
        return (
            idle(h) and len(last) == 5 and all((x.fds, x.tasks) == (h.fds, h.tasks) for x in last)
        )

    base = await _settled(measure, steady, options.settle)
    report.fds_before, report.tasks_before = base.fds, sum(base.tasks.values())

    start = time.monotonic()
    pending = iter(range(options.clients))

    async def worker() -> None:
        for index in pending:
            p = plan(index, options)
            outcome = Outcome(p)
            report.outcomes.append(outcome)
            await one_client(host, port, p, outcome)
            if (index + 1) % 100 == 0:
                print(f"client {index + 1} of {options.clients} left", file=log)

    async def sample_peaks() -> None:
        while True:
            held = measure()
            for name in ("jobs", "sessions", "leases", "queued", "upstream", "spool_files", "fds"):
                report.peak[name] = max(report.peak.get(name, 0), getattr(held, name))
            report.peak["tasks"] = max(report.peak.get("tasks", 0), sum(held.tasks.values()))
            await trio.sleep(PEAK_INTERVAL)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sample_peaks)
        async with trio.open_nursery() as clients:
            for _ in range(min(options.concurrency, options.clients)):
                clients.start_soon(worker)
        nursery.cancel_scope.cancel()
    report.wall = time.monotonic() - start

    settle_start = time.monotonic()
    after = await _settled(
        measure,
        lambda h: idle(h) and h.fds <= base.fds and not (h.tasks - base.tasks),
        options.settle,
    )
    report.settled_in = time.monotonic() - settle_start
    report.leaks = after.over(base)
    report.fds_after, report.tasks_after = after.fds, sum(after.tasks.values())


# --- output -------------------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1000:.0f}"


def _rows(report: Report) -> Iterator[list[str]]:
    groups = report.by_point()
    for name, outcomes in [*groups.items(), ("all", [o for g in groups.values() for o in g])]:
        engines = Counter(o.plan.engine for o in outcomes)
        measured = [o for o in outcomes if report.close_latency(o) is not None]
        open_ = report.open_at_leave(outcomes)
        yield [
            name,
            str(len(outcomes)),
            f"{engines['scripted']} / {engines['wlk']}",
            str(len(measured)),
            str(len(open_)),
            ms(percentile(open_, 50)),
            ms(percentile(open_, 99)),
            ms(max(open_, default=math.nan)),
        ]


def print_report(report: Report) -> None:
    o = report.options
    print(
        markdown_table(
            f"Disconnect storm: {len(report.outcomes)} clients, {o.concurrency} at a time, "
            f"{o.sessions} sessions per engine (seed {o.seed}; {report.wall:.1f} s). Upstream "
            f"close latency: from the client leaving to the fake WhisperLiveKit server seeing its "
            f"session close, over the sessions still open when their client left (ms)",
            [
                "left",
                "clients",
                "scripted / wlk",
                "upstream sessions",
                "open at leave",
                "p50",
                "p99",
                "max",
            ],
            list(_rows(report)),
        )
    )
    leaks, peak = report.leaks, report.peak
    extra_tasks = ", ".join(f"{n} x{c}" for n, c in leaks.tasks.items()) or "none"
    print(
        markdown_table(
            f"Left behind, over the idle baseline after warm-up (settled in "
            f"{report.settled_in:.2f} s), and the most held at once during the storm",
            ["what", "leaked", "peak"],
            [
                ["jobs in flight", str(leaks.jobs), str(peak.get("jobs", 0))],
                [
                    "engine sessions / admission leases / queued jobs",
                    f"{leaks.sessions} / {leaks.leases} / {leaks.queued}",
                    f"{peak.get('sessions', 0)} / {peak.get('leases', 0)} / {peak.get('queued', 0)}",
                ],
                ["upstream connections", str(leaks.upstream), str(peak.get("upstream", 0))],
                ["spool files", str(leaks.spool_files), str(peak.get("spool_files", 0))],
                [
                    "descriptors (baseline -> after)",
                    f"{leaks.fds} ({report.fds_before} -> {report.fds_after})",
                    str(peak.get("fds", 0)),
                ],
                [
                    "trio tasks (baseline -> after)",
                    f"{sum(leaks.tasks.values())} ({report.tasks_before} -> {report.tasks_after})",
                    str(peak.get("tasks", 0)),
                ],
            ],
        )
    )
    if leaks.tasks:
        print(f"\nTasks left running: {extra_tasks}")
    if report.errors:
        print(f"\nUnexpected outcomes ({len(report.errors)}), the first ones:")
        for e in report.errors[:10]:
            print(f"- {e}")
    missed = report.missed()
    print(
        f"\nTargets (0 unexpected outcomes, 0 leaks, every upstream session closed within "
        f"{MAX_CLOSE_LATENCY:g} s of its client leaving): "
        + ("met" if not missed else "MISSED: " + "; ".join(missed))
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = Options()
    parser.add_argument("--clients", type=int, default=defaults.clients)
    parser.add_argument("--concurrency", type=int, default=defaults.concurrency)
    parser.add_argument("--sessions", type=int, default=defaults.sessions)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    args = parser.parse_args()
    options = Options(
        clients=args.clients, concurrency=args.concurrency, sessions=args.sessions, seed=args.seed
    )
    print(
        "Disconnect storm: the gateway and a fake WhisperLiveKit server in one process, 127.0.0.1"
    )
    print(machine())
    report = trio.run(run_storm, options)
    print_report(report)
    sys.exit(1 if report.missed() else 0)


if __name__ == "__main__":
    main()
