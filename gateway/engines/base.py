"""The engine seam: an :class:`Engine` opens a :class:`Session`.

A session accepts audio (``send_audio``), then the end of it (``end_audio``), and meanwhile yields
cumulative :class:`~gateway.events.EngineUpdate` results from ``results()``; the iterator ends after
the final update, which follows ``end_audio``. The pipeline drives a session from two tasks, a
sender and a receiver, so ``send_audio`` may block (that is how an engine applies backpressure or
pacing) while ``results`` keeps being read.

Failures are raised as :class:`~gateway.errors.EngineError` subclasses (or ``Timeout``) from any of
the methods. ``open_session`` is an async context manager: leaving it closes the session and frees
whatever upstream capacity it held, promptly, even when cancelled.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from ..events import EngineUpdate

__all__ = [
    "PCM_BYTES_PER_SECOND",
    "PCM_SAMPLE_RATE",
    "AudioFormat",
    "Engine",
    "Session",
    "SessionOptions",
]

PCM_SAMPLE_RATE = 16_000
# s16le mono at 16 kHz: the format every "pcm" session receives.
PCM_BYTES_PER_SECOND = PCM_SAMPLE_RATE * 2

# "pcm": decoded s16le 16 kHz mono. "encoded": the upload's original bytes, as one stream.
AudioFormat = Literal["pcm", "encoded"]


@dataclass(frozen=True, kw_only=True)
class SessionOptions:
    language: str = ""
    # Duration of the upload in seconds when the container tells it.
    total_time: float | None = None
    content_type: str = "application/octet-stream"
    filename: str = ""
    # Called with the 1-based queue position each time it changes while waiting for capacity.
    on_queued: Callable[[int], None] | None = None


class Session(abc.ABC):
    #: What ``send_audio`` expects; fixed once the session is open.
    audio_format: AudioFormat = "pcm"

    @abc.abstractmethod
    async def send_audio(self, chunk: bytes) -> None:
        """Send the next piece of audio; may block to pace the sender."""

    @abc.abstractmethod
    async def end_audio(self) -> None:
        """Declare that no more audio follows; the final update then ends ``results()``."""

    @abc.abstractmethod
    def results(self) -> AsyncIterator[EngineUpdate]:
        """Cumulative updates; the iterator ends after the final one."""


class Engine(abc.ABC):
    kind: ClassVar[str]

    def __init__(self, name: str) -> None:
        self.name = name

    @abc.abstractmethod
    def open_session(self, options: SessionOptions) -> AbstractAsyncContextManager[Session]:
        """Wait for capacity (reporting queue positions), connect, and yield a ready session."""

    async def start(self) -> None:  # noqa: B027 - a hook: most engines load nothing up front
        """Load engine-wide resources at start-up. Never raises: a failure makes ``readiness``
        report the reason."""

    def resolve_language(self, language: str) -> str:
        """The language a session will use for a requested one ("" = the engine decides);
        raises InvalidOption for one the engine cannot transcribe, before the stream starts."""
        return language

    def admit(self) -> None:  # noqa: B027 - a hook: engines without a queue accept everything
        """Raise CapacityExhausted if a session opened now would be refused; called before the
        stream starts, so the client gets a 503 with Retry-After instead of an error event."""

    async def readiness(self) -> str | None:
        """``None`` when the engine can take sessions, otherwise the reason it cannot."""
        return None

    def stats(self) -> dict[str, Any]:
        """Figures for /readyz and /metrics (sessions, queue length, upstream health...)."""
        return {}

    async def aclose(self) -> None:  # noqa: B027 - a hook: most engines hold nothing
        """Release engine-wide resources. Idempotent."""
