"""Pacing benchmark: N concurrent long sessions against a fake WhisperLiveKit of capacity 2.

For N = 1, 2, 4, 8 concurrent sessions of the same long audio it runs three client strategies
against a fresh fake server (tests/fakes/wlk_server.py) on 127.0.0.1:

- ``pacer``: this gateway's WhisperLiveKit engine (admission with max_sessions=2, report-driven
  pacing with lead_seconds=10, resume after drops);
- ``firehose``: connect at once, send all the audio as fast as the socket takes it;
- ``fixed-sleep``: connect at once, sleep one frame's duration after each 250 ms frame, i.e. a
  real-time feed with no feedback from the server (scheduled without drift).

The fake server models a GPU box: it processes at most ``capacity`` = 2 sessions' worth of audio
at real time (each session at most 1x real time; with more sessions they share), and, like the
overloaded servers in the AymurAI stress test, it kills a session with 1011 "keepalive ping
timeout" once that session's backlog exceeds ``--fail-backlog`` seconds (default 60).

Per run it prints the failed sessions, the makespan divided by the ideal (total audio / capacity,
which N = 1 cannot reach since one session uses one slot) and the peak server backlog (audio
received but not processed, summed over sessions, and the worst single session).

Time: the run uses trio's MockClock at ``--rate`` times real time over real loopback sockets, so
"seconds" below are the simulated server's seconds, and the default run (180 s of audio) takes
a couple of minutes of wall time.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import trio
import trio.testing
from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from fakes.wlk_server import FakeWlkServer, pcm_words  # noqa: E402

from gateway.config import WhisperLiveKitConfig  # noqa: E402
from gateway.engines.base import SessionOptions  # noqa: E402
from gateway.engines.whisperlivekit import FRAME_BYTES, WhisperLiveKitEngine  # noqa: E402
from gateway.errors import GatewayError  # noqa: E402

CAPACITY = 2
# The pipeline hands PCM to engines in 200 ms chunks.
PIPELINE_CHUNK = 6_400
FRAME_SECONDS = FRAME_BYTES / 32_000
LEAD_SECONDS = 10.0

Outcome = bool
Strategy = Callable[[str, bytes, int], Awaitable[list[Outcome]]]


@dataclass
class Row:
    strategy: str
    n: int
    failures: int
    makespan: float
    ideal: float
    peak_backlog: float
    peak_session_backlog: float


def _only(exc: BaseException, kinds: type[Exception] | tuple[type[Exception], ...]) -> bool:
    """``exc`` is one of ``kinds``, or a group of nothing else (Cancelled aside)."""
    if isinstance(exc, BaseExceptionGroup):
        rest = exc.split(kinds)[1]
        return rest is None or rest.split(trio.Cancelled)[1] is None
    return isinstance(exc, kinds)


async def _gather(n: int, client: Callable[[], Awaitable[Outcome]]) -> list[Outcome]:
    outcomes: list[Outcome] = []

    async def one() -> None:
        outcomes.append(await client())

    async with trio.open_nursery() as nursery:
        for _ in range(n):
            nursery.start_soon(one)
    return outcomes


async def pacer(url: str, audio: bytes, n: int) -> list[Outcome]:
    config = WhisperLiveKitConfig(
        urls=[url],
        max_sessions=CAPACITY,
        lead_seconds=LEAD_SECONDS,
        # Long audio: the eighth session waits three sessions' length for its turn.
        queue_timeout=3_600.0,
    )
    engine = WhisperLiveKitEngine("bench", config)

    async def client() -> Outcome:
        try:
            async with engine.session(SessionOptions()) as session:

                async def send() -> None:
                    for i in range(0, len(audio), PIPELINE_CHUNK):
                        await session.send_audio(audio[i : i + PIPELINE_CHUNK])
                    await session.end_audio()

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(send)
                    async for _ in session.results():
                        pass
            return True
        except BaseException as exc:
            if _only(exc, GatewayError):
                return False
            raise

    return await _gather(n, client)


async def _naive(url: str, audio: bytes, sleep: float) -> Outcome:
    """A client like those that fell over in the AymurAI stress test (it does keep reading)."""
    ready = False
    try:
        async with open_websocket_url(url + "?mode=full", max_message_size=16 * 2**20) as ws:
            await ws.get_message()  # config

            async def read() -> None:
                nonlocal ready
                while True:
                    message = await ws.get_message()
                    if isinstance(message, str) and '"ready_to_stop"' in message:
                        ready = True
                        return

            async def write() -> None:
                start = trio.current_time()
                for k, i in enumerate(range(0, len(audio), FRAME_BYTES)):
                    await ws.send_message(audio[i : i + FRAME_BYTES])
                    if sleep:
                        # A fixed sleep per frame, without drift: frame k leaves at k x sleep.
                        await trio.sleep_until(start + (k + 1) * sleep)
                await ws.send_message(b"")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(write)
                await read()
                nursery.cancel_scope.cancel()
    except BaseException as exc:
        if _only(exc, (ConnectionClosed, HandshakeError)):
            return False
        raise
    return ready


async def firehose(url: str, audio: bytes, n: int) -> list[Outcome]:
    return await _gather(n, lambda: _naive(url, audio, 0.0))


async def fixed_sleep(url: str, audio: bytes, n: int) -> list[Outcome]:
    return await _gather(n, lambda: _naive(url, audio, FRAME_SECONDS))


STRATEGIES: dict[str, Strategy] = {
    "pacer": pacer,
    "firehose": firehose,
    "fixed-sleep": fixed_sleep,
}


async def measure(name: str, n: int, audio: bytes, fail_backlog: float) -> Row:
    fake = FakeWlkServer(
        speed=1.0, capacity=CAPACITY, tick=0.1, words_per_line=8, fail_backlog=fail_backlog
    )
    seconds = len(audio) / 32_000
    async with trio.open_nursery() as nursery:
        url = await nursery.start(fake.serve_tcp)
        start = trio.current_time()
        outcomes = await STRATEGIES[name](url, audio, n)
        makespan = trio.current_time() - start
        nursery.cancel_scope.cancel()
    return Row(
        strategy=name,
        n=n,
        failures=outcomes.count(False),
        makespan=makespan,
        ideal=n * seconds / CAPACITY,
        peak_backlog=fake.peak_backlog,
        peak_session_backlog=fake.max_lead,
    )


def print_table(
    rows: list[Row], seconds: float, fail_backlog: float, rate: float, wall: float
) -> None:
    print(
        f"\nfake WhisperLiveKit: capacity {CAPACITY} sessions at real time, 1011 past "
        f"{fail_backlog:g} s of backlog in a session; {seconds:g} s of audio per session"
    )
    header = f"{'strategy':<12} {'N':>2}  {'failed':>6}  {'makespan':>9}  {'/ideal':>6}  "
    header += f"{'peak backlog (s)':>16}  {'per session':>11}"
    print(header)
    print("-" * len(header))
    for r in rows:
        ratio = f"{r.makespan / r.ideal:6.2f}"
        print(
            f"{r.strategy:<12} {r.n:>2}  {r.failures:>2} / {r.n:<2} {r.makespan:>8.1f}s  {ratio}  "
            f"{r.peak_backlog:>16.1f}  {r.peak_session_backlog:>11.1f}"
        )
    print(
        f"\nideal = N x audio / {CAPACITY}; makespan counts until the last session ended, "
        f"failed or not. Simulated time at {rate:g}x; wall time {wall:.0f} s."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--audio", type=float, default=180.0, help="seconds of audio per session")
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--fail-backlog", type=float, default=60.0)
    parser.add_argument("--rate", type=float, default=20.0, help="simulated seconds per second")
    args = parser.parse_args()

    # Distinct words (w1, w2, ...) so a lost or repeated stretch would show in a transcript.
    words = int(args.audio / 0.5)
    audio = pcm_words([1 + i % 30_000 for i in range(words)])
    rows: list[Row] = []

    async def run() -> None:
        for name in args.strategies:
            for n in args.sessions:
                row = await measure(name, n, audio, args.fail_backlog)
                rows.append(row)
                print(
                    f"{name:<12} N={n}: {row.failures} failed, makespan {row.makespan:.1f} s",
                    file=sys.stderr,
                )

    wall = time.monotonic()
    trio.run(run, clock=trio.testing.MockClock(rate=args.rate))
    print_table(rows, args.audio, args.fail_backlog, args.rate, time.monotonic() - wall)


if __name__ == "__main__":
    main()
