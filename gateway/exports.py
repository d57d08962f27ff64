"""Transcript exports: plain text, SubRip, WebVTT and JSON, from segments. One module for all APIs."""

from __future__ import annotations

from collections.abc import Sequence

from .events import Segment, join_text

__all__ = ["FORMATS", "srt", "timestamp", "txt", "vtt"]

FORMATS = ("json", "txt", "srt", "vtt")


def timestamp(seconds: float, sep: str = ",") -> str:
    ms = max(0, round(seconds * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def _cues(segments: Sequence[Segment]) -> list[Segment]:
    return [s for s in segments if s.text.strip()]


def txt(segments: Sequence[Segment]) -> str:
    text = join_text(list(segments))
    return text + "\n" if text else ""


def srt(segments: Sequence[Segment]) -> str:
    return "".join(
        f"{i}\n{timestamp(s.start)} --> {timestamp(s.end)}\n{s.text.strip()}\n\n"
        for i, s in enumerate(_cues(segments), start=1)
    )


def vtt(segments: Sequence[Segment]) -> str:
    body = "".join(
        f"{i}\n{timestamp(s.start, '.')} --> {timestamp(s.end, '.')}\n{s.text.strip()}\n\n"
        for i, s in enumerate(_cues(segments), start=1)
    )
    return "WEBVTT\n\n" + body
