"""The keepalive rule in virtual time (trio's MockClock): a comment only after ``interval``
seconds with nothing sent, never while events flow.

The end-to-end check over a real socket is test_api.py::test_keepalive_over_a_real_socket: with
worker threads in play (decoder, store) MockClock's autojump spins instead of jumping.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from gateway.events import Done, Progress, Queued, Transcript
from gateway.pipeline import Outbox, keepalive


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, object]]:
    return ("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)})


@pytest.mark.anyio
async def test_outbox_keepalive_only_after_silence() -> None:
    outbox = Outbox()
    got: list[tuple[float, str]] = []
    with trio.fail_after(100):
        async with trio.open_nursery() as n:
            n.start_soon(keepalive, outbox, 10.0)

            async def writer() -> None:
                async for event in outbox:
                    got.append((trio.current_time(), type(event).__name__))
                    outbox.mark_sent()

            n.start_soon(writer)
            t0 = trio.current_time()
            snap = Transcript(id="x", segments=(), committed=0, current_time=0, total_time=None)
            for _ in range(5):  # activity every 4 s: never 10 s of silence
                await trio.sleep(4)
                outbox.put(Progress(snap))
            await trio.sleep(25)  # silence: keepalives at +10 and +20 after the last event
            outbox.put(Done(snap, cached=False))
            await trio.testing.wait_all_tasks_blocked()
            n.cancel_scope.cancel()
    kinds = [(round(t - t0), k) for t, k in got]
    assert kinds == [
        (4, "Progress"),
        (8, "Progress"),
        (12, "Progress"),
        (16, "Progress"),
        (20, "Progress"),
        (30, "_Keepalive"),
        (40, "_Keepalive"),
        (45, "Done"),
    ]


@pytest.mark.anyio
async def test_outbox_conflates_to_the_latest_snapshot_and_ends_once() -> None:
    outbox = Outbox()
    snaps = [
        Transcript(id="x", segments=(), committed=0, current_time=float(i), total_time=None)
        for i in range(5)
    ]
    for s in snaps:
        outbox.put(Progress(s))
    outbox.put(Done(snaps[-1], cached=False))
    outbox.put(Progress(snaps[0]))  # after the end: ignored
    got = [e async for e in outbox]
    assert [type(e).__name__ for e in got] == ["Progress", "Done"]
    assert got[0].transcript.current_time == 4.0  # type: ignore[union-attr]


@pytest.mark.anyio
async def test_positions_past_the_head_are_sent_at_most_once_per_interval() -> None:
    outbox = Outbox()
    got: list[tuple[float, object]] = []
    snap = Transcript(id="x", segments=(), committed=0, current_time=0, total_time=None)
    with trio.fail_after(100):
        async with trio.open_nursery() as n:

            async def writer() -> None:
                async for event in outbox:
                    label = event.position if isinstance(event, Queued) else type(event).__name__
                    got.append((trio.current_time(), label))
                    outbox.mark_sent()

            n.start_soon(writer)
            t0 = trio.current_time()
            # A long queue moving fast: 40 renumberings in 1.2 s reach the client as 2 frames.
            for position in range(50, 10, -1):
                outbox.put(Queued(position))
                await trio.sleep(0.03)
            # Near the head every position is sent at once.
            for position in range(10, 0, -1):
                outbox.put(Queued(position))
                await trio.sleep(0.01)
            await trio.testing.wait_all_tasks_blocked()
            # A position held back when the session starts is dropped: the snapshot goes first.
            outbox.put(Queued(30))
            outbox.put(Progress(snap))
            outbox.put(Done(snap, cached=False))
            await trio.testing.wait_all_tasks_blocked()
    frames = [(round(t - t0, 2), label) for t, label in got]
    assert frames[:3] == [(0.0, 50), (1.0, 17), (1.2, 10)]
    assert [label for _, label in frames[3:]] == [9, 8, 7, 6, 5, 4, 3, 2, 1, "Progress", "Done"]
