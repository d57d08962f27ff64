"""The disconnect storm, reduced: bench/storm.py with 100 clients, 25 at a time (under 10 s).

The gateway (hypercorn on trio, in this process) with a scripted engine and a WhisperLiveKit
engine on the fake server, 3 sessions each, so that most clients queue. Every client leaves at a
random point: mid-upload, while queued, mid-stream, or right after ``done``. Afterwards nothing
may be over the idle baseline: no job, engine session, queued job, upstream connection, spool
file, descriptor or trio task; and every upstream session closed within 1 s of its client leaving.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from storm import LEAVE_POINTS, MAX_CLOSE_LATENCY, Leaks, Options, run_storm

pytestmark = pytest.mark.anyio


async def test_a_hundred_clients_leaving_at_random_points_leave_nothing_behind() -> None:
    # 30 s to settle, not the bench's 10: once, in a full CI run, one hypercorn connection handler
    # and its socket were still open 10 s after the storm (not seen again in a dozen runs). A true
    # leak never settles; a slow close on a loaded machine does.
    options = Options(clients=100, concurrency=25, sessions=3, seed=1, settle=30.0)
    with trio.fail_after(120):
        report = await run_storm(options)
    assert report.errors == []
    assert len(report.outcomes) == 100
    # Every leave point happened, on both engines, and the storm really held what it tests for.
    groups = report.by_point()
    assert all(len(groups[point]) >= 5 for point in LEAVE_POINTS), report.by_point()
    assert {o.plan.engine for o in report.outcomes} == {"scripted", "wlk"}
    assert report.peak["queued"] > 0 and report.peak["upstream"] > 0
    assert report.peak["spool_files"] > 0
    assert report.peak["tasks"] > report.tasks_before
    # Nothing left behind.
    assert report.leaks == Leaks()
    assert report.fds_after <= report.fds_before
    assert report.tasks_after == report.tasks_before
    # Every WhisperLiveKit client that got an upstream session is accounted for, and each
    # session still open when its client left closed within a second.
    assert report.untagged == 0
    wlk_streamed = [o for o in groups["stream"] + groups["done"] if o.plan.engine == "wlk"]
    assert wlk_streamed and all(report.close_latency(o) is not None for o in wlk_streamed)
    assert report.latencies and max(report.latencies) <= MAX_CLOSE_LATENCY
    assert report.missed() == []
