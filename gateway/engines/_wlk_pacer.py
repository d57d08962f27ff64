"""The WhisperLiveKit pacer: how much audio may go to one connection, from what the server reports.

A pure algorithm, fed with numbers (seconds sent, the server's reports, ping and pong times) and
asked for decisions; :mod:`gateway.engines.whisperlivekit` drives it from a connection's writer,
reader and pings. This module never imports the engine, the network (trio, trio-websocket) or
the clock: callers pass ``now``.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Final

__all__ = ["BACKLOG_ROUNDING", "REPORT_LATENCY", "Pacer"]

# WhisperLiveKit pushes a state change within 50 ms (its formatter polls at 20 Hz); a pong proves
# the server read our audio, and this long after it the reports are taken to reflect that audio.
REPORT_LATENCY: Final = 0.25
# remaining_time_transcription_processing is rounded to 0.1 s.
BACKLOG_ROUNDING: Final = 0.05


class Pacer:
    """How much audio may go to one connection: at most ``lead`` seconds the server has not processed.

    Why and how. WhisperLiveKit 0.2.26 has no backpressure: it reads whatever arrives, queues it
    without bound, and a server that falls behind ends up blocking its event loop and killing
    sessions with 1011. So the gateway keeps the *unprocessed* audio per session under a budget,
    using only what the server says (no wall-clock floor: a lagging server is fed less, not "at
    least real time").

    The server reports ``backlog`` = received - processed (``remaining_time_transcription_
    processing``), pushed within 50 ms of any change, and committed ``lines`` whose ends never
    exceed what it processed. What it cannot report is audio still in flight towards it, and a
    report may be older than our latest frames. So the lead (``sent - processed``) is bounded
    two ways and the smaller bound is used:

    - ``sent - committed_end``: always true, but loose (lines lag, and silence has no lines);
    - ``(sent - confirmed) + backlog``: ``confirmed`` is audio the server provably holds: a
      WebSocket pong comes back only after the server read every frame sent before the ping, and
      :data:`REPORT_LATENCY` after that pong its reports include that audio, so from then on the
      latest ``backlog`` covers it. Audio not yet confirmed that way counts in full.

    Before each frame the writer asks :meth:`may_send`: the frame goes out only if the estimate
    plus the frame stays within ``lead`` (so the server's true lead stays within it). When it may
    not and some sent audio is unconfirmed, the writer pings to confirm it; otherwise it waits for
    the next report or for a confirmation to settle. A server that stops reporting or answering
    pings therefore stops receiving audio (and the heartbeat then reconnects).
    """

    def __init__(self, lead: float) -> None:
        self.lead = lead
        #: Seconds sent on this connection.
        self.sent = 0.0
        #: End of the last line the server showed (processed audio, a lower bound).
        self.committed = 0.0
        #: The latest ``remaining_time_transcription_processing``.
        self.backlog = 0.0
        self._confirmed = 0.0
        self._asked = 0.0
        # Pongs waiting REPORT_LATENCY to settle: (settles_at, seconds sent before the ping).
        self._acks: deque[tuple[float, float]] = deque()

    def report(self, backlog: float, committed: float) -> None:
        self.backlog = backlog
        self.committed = max(self.committed, committed)

    def asked(self, sent: float) -> None:
        """A ping went out after ``sent`` seconds of audio."""
        self._asked = max(self._asked, sent)

    def acked(self, sent: float, now: float) -> None:
        """The pong for a ping sent after ``sent`` seconds of audio arrived at ``now``."""
        self._acks.append((now + REPORT_LATENCY, sent))

    def _settle(self, now: float) -> None:
        while self._acks and self._acks[0][0] <= now:
            self._confirmed = max(self._confirmed, self._acks.popleft()[1])

    def lead_estimate(self, now: float) -> float:
        self._settle(now)
        by_reports = self.sent - self._confirmed + self.backlog + BACKLOG_ROUNDING
        by_lines = self.sent - self.committed
        return max(0.0, min(by_reports, by_lines))

    def may_send(self, seconds: float, now: float) -> bool:
        lead = self.lead_estimate(now)
        return lead + seconds <= self.lead or lead <= BACKLOG_ROUNDING

    def unconfirmed(self) -> bool:
        """Some audio was sent after the last ping: a ping would confirm more."""
        return self.sent > self._asked

    def next_settle(self) -> float:
        return self._acks[0][0] if self._acks else math.inf

    def processed(self, now: float) -> float:
        """Seconds the server has processed, as far as can be told."""
        self._settle(now)
        return max(self.committed, self._confirmed - self.backlog, 0.0)
