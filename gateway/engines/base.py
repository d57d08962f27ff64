"""The engine seam: an :class:`Engine` opens a :class:`Session`.

A session accepts audio (``send_audio``), then the end of it (``end_audio``), and meanwhile yields
cumulative :class:`~gateway.events.EngineUpdate` results from ``results()``; the iterator ends after
the final update, which follows ``end_audio``. The pipeline drives a session from two tasks, a
sender and a receiver, so ``send_audio`` may block (that is how an engine applies backpressure or
pacing) while ``results`` keeps being read.

Failures are raised as :class:`~gateway.errors.EngineError` subclasses (or ``Timeout``) from any of
the methods. ``open_session`` is an async context manager: leaving it closes the session promptly,
even when cancelled.

Admission is not the engine's to remember: the base class gives every engine an
:class:`~gateway.admission.Admission` (``engine.admission``) built from the session caps and queue
limits its constructor passes up, unlimited by default. The pipeline reserves a place there before
the stream starts, waits for the grant, and hands the granted :class:`~gateway.admission.Lease` to
``open_session``; the engine only uses the lease (its key is the upstream to connect to, and an
upstream engine reports connection health through it).
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol

from ..admission import DEFAULT_MAX_QUEUE, DEFAULT_QUEUE_TIMEOUT, UNLIMITED, Admission, Lease
from ..events import EngineUpdate

__all__ = [
    "PCM_BYTES_PER_SECOND",
    "PCM_SAMPLE_RATE",
    "AudioFormat",
    "Engine",
    "QueueLimits",
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


class QueueLimits(Protocol):
    """What an engine's configuration says about waiting for a session."""

    @property
    def max_queue(self) -> int: ...

    @property
    def queue_timeout(self) -> float: ...


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
    #: Whether sessions run on servers other replicas use too (so that several replicas on one
    #: PostgreSQL share this engine's caps and queue), rather than on this replica's own cores.
    shares_upstream: ClassVar[bool] = False
    #: Who may open a session now; every session the pipeline opens holds a lease from it.
    admission: Admission

    def __init__(
        self,
        name: str,
        limits: QueueLimits | None = None,
        *,
        sessions: int | Mapping[str, int] = 0,
    ) -> None:
        """``sessions``: how many sessions may run at once (0: no cap), or the cap of each
        upstream key (a lease's key says which one a session runs on); ``limits``: the queue
        for the rest (``max_queue``, ``queue_timeout``), usually the engine's config."""
        self.name = name
        capacities = sessions if isinstance(sessions, Mapping) else {name: sessions or UNLIMITED}
        self.admission = Admission(
            capacities,
            max_queue=limits.max_queue if limits is not None else DEFAULT_MAX_QUEUE,
            queue_timeout=limits.queue_timeout if limits is not None else DEFAULT_QUEUE_TIMEOUT,
        )

    @abc.abstractmethod
    def open_session(
        self, options: SessionOptions, lease: Lease
    ) -> AbstractAsyncContextManager[Session]:
        """Connect on ``lease`` (granted by ``self.admission``) and yield a ready session."""

    @asynccontextmanager
    async def session(
        self, options: SessionOptions, on_queued: Callable[[int], None] | None = None
    ) -> AsyncIterator[Session]:
        """Admit, wait for a place (``on_queued`` gets the positions) and open a session, all in
        one step: for callers outside the pipeline (tests, benches)."""
        async with (
            self.admission.acquire(on_queued) as lease,
            self.open_session(options, lease) as session,
        ):
            yield session

    async def start(self) -> None:  # noqa: B027 - a hook: most engines load nothing up front
        """Load engine-wide resources at start-up. Never raises: a failure makes ``readiness``
        report the reason."""

    def resolve_language(self, language: str) -> str:
        """The language a session will use for a requested one ("" = the engine decides);
        raises InvalidOption for one the engine cannot transcribe, before the stream starts."""
        return language

    async def readiness(self) -> str | None:
        """``None`` when the engine can take sessions, otherwise the reason it cannot."""
        return None

    def stats(self) -> dict[str, Any]:
        """Figures for /readyz and /metrics (sessions, queue length, upstream health...); by
        default what admission knows. Names come from :data:`gateway.metrics.ENGINE_STATS`."""
        stats: dict[str, Any] = {
            "sessions": self.admission.active,
            "queue_length": self.admission.queue_length,
        }
        if self.admission.capacity < UNLIMITED:
            stats["capacity"] = self.admission.capacity
        return stats | self.admission.shared_figures()

    async def aclose(self) -> None:  # noqa: B027 - a hook: most engines hold nothing
        """Release engine-wide resources. Idempotent."""
