"""Transcript exports: plain text, SubRip, WebVTT and JSON, from segments. One module for all APIs.

Subtitle cues are written the way players read them: in order of start time, each at least
1 ms long, and with no blank line inside a cue's text (a blank line ends a cue, so a player would
drop whatever follows it).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

from .events import MAX_SECONDS, Segment, join_text

__all__ = ["FORMATS", "ZERO_CUE_MS", "srt", "timestamp", "txt", "vtt"]

FORMATS = ("json", "txt", "srt", "vtt")

# A zero-length segment (a word without timing, a human correction with start == end) is shown
# for this long, or until the next cue starts if that comes sooner, and never for less than 1 ms.
ZERO_CUE_MS = 500


def _ms(seconds: float) -> int:
    # Rows stored before times were bounded may hold anything: clamp, so rendering cannot fail.
    if not seconds >= 0:  # negative or NaN
        return 0
    return round(min(seconds, MAX_SECONDS) * 1000)


def _clock(ms: int, sep: str) -> str:
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def timestamp(seconds: float, sep: str = ",") -> str:
    return _clock(_ms(seconds), sep)


@dataclass(frozen=True)
class _Cue:
    start: int  # ms
    end: int  # ms
    lines: tuple[str, ...]


def _cues(segments: Sequence[Segment]) -> list[_Cue]:
    timed = sorted(
        (
            (_ms(s.start), _ms(s.end), lines)
            for s in segments
            if (lines := tuple(line for raw in s.text.splitlines() if (line := raw.strip())))
        ),
        key=lambda cue: (cue[0], cue[1]),
    )
    starts = [start for start, _, _ in timed]
    cues = []
    for start, end, lines in timed:
        if end <= start:
            end = start + ZERO_CUE_MS
            # The first cue that starts later (the starts are sorted) cuts this one short.
            if (j := bisect.bisect_right(starts, start)) < len(starts):
                end = min(end, starts[j])
        cues.append(_Cue(start, end, lines))
    return cues


def txt(segments: Sequence[Segment]) -> str:
    text = join_text(list(segments))
    return text + "\n" if text else ""


def srt(segments: Sequence[Segment]) -> str:
    return "".join(
        f"{i}\n{_clock(c.start, ',')} --> {_clock(c.end, ',')}\n" + "\n".join(c.lines) + "\n\n"
        for i, c in enumerate(_cues(segments), start=1)
    )


def _vtt_text(line: str) -> str:
    # WebVTT cue text is markup: '<' opens a tag, '&' an entity, and "-->" may not appear at all.
    return line.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def vtt(segments: Sequence[Segment]) -> str:
    body = "".join(
        f"{i}\n{_clock(c.start, '.')} --> {_clock(c.end, '.')}\n"
        + "\n".join(map(_vtt_text, c.lines))
        + "\n\n"
        for i, c in enumerate(_cues(segments), start=1)
    )
    return "WEBVTT\n\n" + body
