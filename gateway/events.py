"""What flows through the gateway: engine updates, transcripts, and the pipeline's events.

Engines yield :class:`EngineUpdate` (cumulative: every update carries the whole transcript so far).
The pipeline turns them into :class:`Progress` snapshots and ends every stream with exactly one
:class:`Done` or :class:`Failed`. Front APIs translate these typed events into their own wire frames.
"""

from __future__ import annotations

import msgspec

__all__ = [
    "MAX_SECONDS",
    "Done",
    "EngineUpdate",
    "Failed",
    "Progress",
    "Queued",
    "Segment",
    "StreamEvent",
    "Transcript",
    "Word",
    "join_text",
]


# The latest time a stored segment may carry (about 31 years): every view renders it (SRT/VTT
# clocks, ISO-8601 durations, JSON). The store refuses corrections past it.
MAX_SECONDS = 1e9


class Word(msgspec.Struct, frozen=True, array_like=True):
    start: float
    end: float
    word: str


class Segment(msgspec.Struct, frozen=True, omit_defaults=True):
    """A stretch of transcript; ``speaker``/``speaker_name`` come from diarising engines or from
    human corrections, and are left out of the JSON when unknown."""

    start: float
    end: float
    text: str
    speaker: int | None = None
    speaker_name: str | None = None


class EngineUpdate(msgspec.Struct, frozen=True, kw_only=True):
    """A cumulative result from an engine session.

    ``committed`` segments will not change any more (append-only across updates); ``tentative``
    ones are the engine's current guess for the tail and may be revised. ``processed`` is how many
    seconds of audio the engine has consumed.
    """

    committed: tuple[Segment, ...] = ()
    tentative: tuple[Segment, ...] = ()
    processed: float = 0.0
    words: tuple[Word, ...] = ()
    # The language the engine transcribes in, when it knows ("" otherwise).
    language: str = ""


class Transcript(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of one transcription: all segments so far, committed ones first."""

    id: str
    segments: tuple[Segment, ...]
    committed: int
    current_time: float
    total_time: float | None
    words: tuple[Word, ...] = ()
    engine: str = ""
    language: str = ""

    @property
    def text(self) -> str:
        return join_text(self.segments)

    @property
    def committed_segments(self) -> tuple[Segment, ...]:
        return self.segments[: self.committed]


def join_text(segments: tuple[Segment, ...] | list[Segment]) -> str:
    return " ".join(t for s in segments if (t := s.text.strip()))


class Queued(msgspec.Struct, frozen=True):
    position: int


class Progress(msgspec.Struct, frozen=True):
    transcript: Transcript


class Done(msgspec.Struct, frozen=True):
    transcript: Transcript
    cached: bool
    # The transcript carries human corrections (only ever on a cache hit).
    corrected: bool = False
    # Damaged stretches of the audio that were skipped (corrupt packets, a chain link that could
    # not be read): the transcript covers the rest.
    audio_errors: int = 0


class Failed(msgspec.Struct, frozen=True):
    code: str
    detail: str


StreamEvent = Queued | Progress | Done | Failed
