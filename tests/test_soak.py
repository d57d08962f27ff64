"""The soak, short: bench/soak.py for 1 minute with 50 concurrent streams (about 75 s in all).

A real ``gateway serve`` subprocess on 127.0.0.1 with a scripted engine and a WhisperLiveKit engine
whose fake server (in this process) closes 20 % of its connections with 1011; 10 % of the streams
are abandoned by the client at a random moment. Every other stream must complete with the exact
transcript, and nothing may be left behind: no active stream, engine session, queued request,
upstream connection or extra descriptor once the load stops.

RSS drift bound. ``gateway serve`` caps glibc's malloc arenas at 2: with glibc's default (8 arenas
per core, taken by the decoding and store threads) RSS keeps creeping up for minutes through arena
fragmentation, not through live objects (tracemalloc shows the Python heap flat while RSS grows),
and that noise would hide what this test looks for. A 1-minute run is still the allocator's
warm-up: on the development machine (2 shared cores, ~18 streams/s) RSS under load rose from 95 to
97.5 MiB between the window after 20 s and the last 10 s (+2.7 %; +4.4 % with the default arenas),
and flattens later (the 4-minute soak: +0.2 %). So this test allows 10 %: about 9.5 MiB over the
roughly 700 streams between the windows, which catches anything that keeps ~14 KB or more per
stream (an upload or PCM buffer, a decoder, a task, a socket's buffers); the 5 % target belongs to
the full soak (``make bench``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from soak import Options, run_soak

pytestmark = [pytest.mark.anyio, pytest.mark.soak]

SHORT_RUN_MAX_DRIFT = 10.0


async def test_one_minute_of_fifty_streams_with_faults_leaves_nothing_behind() -> None:
    options = Options(minutes=1, streams=50, seed=1, warmup=20, window=10)
    with trio.fail_after(240):
        report = await run_soak(options)
    total = report.total
    assert total.errored == 0, report.errors
    assert report.missed(max_drift=SHORT_RUN_MAX_DRIFT) == []
    # Nothing left behind once the load stopped.
    assert report.active_streams_end == 0
    assert report.engine_sessions_end == 0 and report.engine_queue_end == 0
    assert report.wlk_open_end == 0
    assert report.fd_idle_after <= report.fd_idle_before
    # The faults really happened, and streams on both engines completed around them.
    assert total.disconnected > 0
    assert report.drops_injected > 0 and report.reconnects > 0
    assert report.tallies["scripted"].completed > 0 and report.tallies["wlk"].completed > 0
    assert report.outcomes.get("OK", 0) >= total.completed
    assert set(report.outcomes) <= {"OK", "DISCONNECTED"}
