"""One transcription request, end to end, as one task group.

::

    audio source ─(pcm channel)─► sender ─► engine session ─► receiver ─► Outbox ─► SSE writer
    feed()          bounded        send_audio()              results()    conflating

The audio source (:mod:`gateway.sources`: the spooled upload, decoded a thread step at a time)
and the sender are connected by a bounded memory object stream, so the source only runs ahead of
the engine by :data:`PCM_CHANNEL_CAPACITY` chunks. The receiver never waits for the client: it
hands each snapshot to an :class:`Outbox`, which keeps only the latest one, so a slow SSE reader
gets the newest transcript while the engine keeps being read. The first task to fail cancels the
rest; a client that leaves cancels the whole group, which closes the engine session.

Only a complete transcript (the engine's final update after all audio was sent) is stored.

:func:`attend` is the request's one task group: the job, its keepalive and whoever consumes its
events (an SSE writer, or a client waiting for one answer).

This module must never import the jobs module (:mod:`gateway.jobs`), the app or a front API:
they call it, never the other way round.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial

import anyio

from . import metrics
from .admission import Lease, Ticket
from .engines.base import PCM_BYTES_PER_SECOND, Engine, Session, SessionOptions
from .errors import (
    GatewayError,
    ShuttingDown,
    Timeout,
    UpstreamError,
    UpstreamUnavailable,
    collapse_groups,
)
from .events import Done, EngineUpdate, Failed, Progress, Queued, StreamEvent, Transcript
from .sources import AudioSource
from .store import Store

__all__ = [
    "CHUNK_BYTES",
    "KEEPALIVE",
    "PCM_CHANNEL_CAPACITY",
    "QUEUED_EXACT",
    "QUEUED_INTERVAL",
    "Job",
    "Outbox",
    "StopSignal",
    "attend",
    "keepalive",
    "run_job",
]

log = logging.getLogger("gateway.pipeline")

# The engine gets PCM in 200 ms chunks (6,400 bytes): inside WhisperLiveKit's 100-500 ms band.
CHUNK_BYTES = PCM_BYTES_PER_SECOND // 5
# Chunks decoded ahead of the engine: 8 x 6.4 KB = 51 KiB of PCM per stream, whatever the file.
PCM_CHANNEL_CAPACITY = 8


# Queue positions up to this one are sent as soon as they change; later ones at most once per
# QUEUED_INTERVAL seconds per stream (the newest). Every admission or departure renumbers every
# waiter behind it, so with N streams queued each change would otherwise cost N SSE writes.
QUEUED_EXACT = 10
QUEUED_INTERVAL = 1.0


class _Keepalive:
    pass


KEEPALIVE = _Keepalive()


class Outbox:
    """The conflating channel from the pipeline to the SSE writer.

    It holds at most one pending queue position, one pending snapshot and one terminal event, so a
    client that reads slowly costs one snapshot of memory and receives the newest state. ``put``
    never blocks. The terminal event (``Done``/``Failed``) is delivered last and only once.
    Positions past :data:`QUEUED_EXACT` are delivered at most once per :data:`QUEUED_INTERVAL`.
    """

    def __init__(self) -> None:
        self._queued: Queued | None = None
        self._queued_due = -math.inf
        # True while the writer holds a position back until _queued_due: newer ones need no wake-up.
        self._holding = False
        self._progress: Progress | None = None
        self._final: Done | Failed | None = None
        self._keepalive = False
        # Created only while someone waits, so a busy stream allocates no events per frame.
        self._wakeup: anyio.Event | None = None
        self._sent: anyio.Event | None = None
        self.last_sent = anyio.current_time()
        self.finished = False

    def put(self, event: StreamEvent) -> None:
        if self._final is not None:
            return
        if isinstance(event, Queued):
            self._queued = event
            if self._holding and event.position > QUEUED_EXACT:
                return
        elif isinstance(event, Progress):
            self._queued = None
            self._holding = False
            self._progress = event
        else:
            self._final = event
        if self._wakeup is not None:
            self._wakeup.set()

    def request_keepalive(self) -> None:
        self._keepalive = True
        if self._wakeup is not None:
            self._wakeup.set()

    @property
    def final(self) -> Done | Failed | None:
        return self._final

    def mark_sent(self) -> None:
        self.last_sent = anyio.current_time()
        if self._sent is not None:
            self._sent.set()
            self._sent = None

    async def wait_sent(self) -> None:
        if self._sent is None:
            self._sent = anyio.Event()
        await self._sent.wait()

    def get_nowait(self) -> StreamEvent | _Keepalive | None:
        """The next event if one is ready, else None; never blocks."""
        if self._queued is not None:
            now = anyio.current_time()
            if self._queued.position <= QUEUED_EXACT or now >= self._queued_due:
                event: StreamEvent = self._queued
                self._queued = None
                self._holding = False
                self._queued_due = now + QUEUED_INTERVAL
                return event
            self._holding = True
        if self._progress is not None and not isinstance(self._final, Failed):
            event, self._progress = self._progress, None
            return event
        if self._final is not None:
            self.finished = True
            return self._final
        if self._keepalive:
            self._keepalive = False
            return KEEPALIVE
        return None

    async def get(self) -> StreamEvent | _Keepalive:
        while (event := self.get_nowait()) is None:
            self._wakeup = anyio.Event()
            if not self._holding:
                await self._wakeup.wait()
            else:
                # A held-back position is due at _queued_due, unless something else comes first.
                with anyio.move_on_at(self._queued_due):
                    await self._wakeup.wait()
            self._wakeup = None
        return event

    async def __aiter__(self) -> AsyncIterator[StreamEvent | _Keepalive]:
        while not self.finished:
            yield await self.get()


async def keepalive(outbox: Outbox, interval: float) -> None:
    """Ask for a keepalive comment whenever ``interval`` seconds pass with nothing sent."""
    while True:
        await anyio.sleep_until(outbox.last_sent + interval)
        if anyio.current_time() >= outbox.last_sent + interval:
            outbox.request_keepalive()
            await outbox.wait_sent()


@dataclass(eq=False, kw_only=True)
class Job:
    """Everything one transcription needs, settled before the stream starts.

    A job answered from the cache has ``cached`` set: it was found before its audio source was
    opened, and it needs no engine session. Any other job holds a ``ticket``: its place at the
    engine's admission, reserved before the stream started.
    """

    source: AudioSource
    engine: Engine
    store: Store
    cached: Done | None = None
    # Released by aclose() if the job ends before (or without) running its session.
    ticket: Ticket | None = None
    language: str = ""
    tenant: str = ""
    total_time: float | None = None
    started_at: float = field(default_factory=anyio.current_time)
    on_outcome: Callable[[str], None] | None = None
    # The longest the transcription may run, queueing included (then: TIMEOUT).
    max_seconds: float = math.inf
    # Cancels the job when the gateway is shutting down and its grace is over (SHUTTING_DOWN).
    stop: StopSignal | None = None
    # Called exactly once by aclose(): releases what admitting the job took (slots, counters).
    on_close: list[Callable[[], None]] = field(default_factory=list)
    # Set by fail(): the error the job ends with instead, and the scope fail() cancels.
    _failure: GatewayError | None = field(default=None, init=False, repr=False)
    _scope: anyio.CancelScope | None = field(default=None, init=False, repr=False)

    def fail(self, error: GatewayError) -> None:
        """End the job with ``error`` now, queued or running: for a source whose client broke its
        protocol (a live client silent for too long, a malformed control frame). The first
        failure wins; a job whose transcript is complete ignores it."""
        if self._failure is None:
            self._failure = error
            if self._scope is not None:
                self._scope.cancel()

    def snapshot(self, update: EngineUpdate) -> Transcript:
        segments = update.committed + update.tentative
        current = update.processed
        if self.total_time is not None:
            current = min(current, self.total_time)
        return Transcript(
            id=self.source.id,
            segments=segments,
            committed=len(update.committed),
            current_time=round(current, 3),
            total_time=self.total_time,
            words=update.words,
            engine=self.engine.name,
            language=update.language or self.language,
        )

    async def aclose(self) -> None:
        """Release the admission ticket and the audio source. Idempotent; safe when cancelled."""
        with anyio.CancelScope(shield=True):
            callbacks, self.on_close = self.on_close, []
            try:
                if self.ticket is not None:
                    await self.ticket.release()
                await self.source.aclose()
            finally:
                for callback in callbacks:
                    callback()


async def _feed(job: Job, out: anyio.abc.ObjectSendStream[bytes], *, encoded: bool) -> None:
    async def send_pcm(pcm: bytes) -> None:
        for i in range(0, len(pcm), CHUNK_BYTES):
            await out.send(pcm[i : i + CHUNK_BYTES])

    async with out:
        seconds = await job.source.feed(out.send if encoded else send_pcm, encoded=encoded)
        # Set before the channel closes: the final snapshot, sent after it, is clamped to it.
        if seconds is not None:
            job.total_time = seconds


async def _send(
    session: Session, source: anyio.abc.ObjectReceiveStream[bytes], state: _RunState
) -> None:
    async with source:
        async for chunk in source:
            await session.send_audio(chunk)
    # Set first: the final update may end the receiver, and the group, before end_audio returns.
    state.audio_ended = True
    await session.end_audio()


@dataclass
class _RunState:
    audio_ended: bool = False
    last: EngineUpdate | None = None
    first_event_at: float | None = None


async def _receive(job: Job, session: Session, outbox: Outbox, state: _RunState) -> None:
    async for update in session.results():
        state.last = update
        if state.first_event_at is None:
            state.first_event_at = anyio.current_time()
            metrics.TIME_TO_FIRST_EVENT.labels(job.engine.name).observe(
                state.first_event_at - job.started_at
            )
        outbox.put(Progress(job.snapshot(update)))


def _queued(job: Job, outbox: Outbox, position: int) -> None:
    # A queued job may wait for minutes: its source keeps only what it cannot make again (the
    # spooled file, not an open decoder). The ticket reports only before it is granted, so the
    # source is not feeding yet.
    job.source.suspend()
    outbox.put(Queued(position))


async def _hold(lease: Lease) -> None:
    # A shared admission revokes a lease it can no longer vouch for (its replica lost the
    # database for too long): the session ends rather than run past the cluster's cap.
    raise UpstreamUnavailable(await lease.wait_revoked())


async def _transcribe(job: Job, outbox: Outbox) -> Transcript:
    engine = job.engine
    options = SessionOptions(
        language=job.language,
        total_time=job.total_time,
        content_type=job.source.content_type,
        filename=job.source.filename,
    )
    if job.ticket is None:
        job.ticket = await engine.admission.admit()
    state = _RunState()
    async with (
        job.ticket.granted(lambda position: _queued(job, outbox, position)) as lease,
        engine.open_session(options, lease) as session,
    ):
        opened = anyio.current_time()
        try:
            with collapse_groups():
                async with anyio.create_task_group() as tg:
                    send, recv = anyio.create_memory_object_stream[bytes](PCM_CHANNEL_CAPACITY)
                    encoded = session.audio_format == "encoded"
                    tg.start_soon(partial(_feed, job, send, encoded=encoded))
                    tg.start_soon(_send, session, recv, state)
                    tg.start_soon(_hold, lease)
                    await _receive(job, session, outbox, state)
                    # The final update has arrived: whatever still runs is no longer needed.
                    tg.cancel_scope.cancel()
        finally:
            metrics.SESSION_DURATION.labels(engine.name).observe(anyio.current_time() - opened)
    if not state.audio_ended or state.last is None:
        raise UpstreamError("the engine ended the session before the end of the audio")
    final = state.last
    # The final transcript commits everything the engine still shows.
    return job.snapshot(
        EngineUpdate(
            committed=final.committed + final.tentative,
            processed=job.total_time if job.total_time is not None else final.processed,
            words=final.words,
            language=final.language,
        )
    )


class StopSignal:
    """Set once when the gateway stops its jobs; each running job registers its cancel scope, so
    a stop costs no task per job."""

    def __init__(self) -> None:
        self._scopes: set[anyio.CancelScope] = set()
        self._set = False

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        for scope in self._scopes:
            scope.cancel()

    def register(self, scope: anyio.CancelScope) -> Callable[[], None]:
        if self._set:
            scope.cancel()
        self._scopes.add(scope)
        return lambda: self._scopes.discard(scope)


async def _transcribe_bounded(job: Job, outbox: Outbox) -> Transcript:
    """``_transcribe`` under the job's deadline, stopped when the gateway shuts down or when
    :meth:`Job.fail` is called."""
    transcript: Transcript | None = None
    with anyio.CancelScope(deadline=job.started_at + job.max_seconds) as scope:
        unregister = job.stop.register(scope) if job.stop is not None else None
        job._scope = scope
        if job._failure is not None:
            scope.cancel()
        try:
            transcript = await _transcribe(job, outbox)
        finally:
            job._scope = None
            if unregister is not None:
                unregister()
    if transcript is not None:
        return transcript
    if job._failure is not None:
        raise job._failure
    if job.stop is not None and job.stop.is_set():
        raise ShuttingDown("the gateway is shutting down")
    raise Timeout(f"the transcription ran longer than {job.max_seconds:g} s")


async def run_job(job: Job, outbox: Outbox) -> None:
    """Run one transcription into ``outbox``; always ends it with exactly one Done or Failed."""
    engine = job.engine.name
    metrics.ACTIVE_STREAMS.labels(engine).inc()
    outcome = "DISCONNECTED"
    try:
        if job.cached is not None:
            outbox.put(job.cached)
            outcome = "CACHED"
            return
        transcript = await _transcribe_bounded(job, outbox)
        await job.store.save(transcript, job.tenant)
        duration = transcript.total_time or transcript.current_time
        if math.isfinite(duration):
            metrics.AUDIO_SECONDS.labels(engine).inc(duration)
        outbox.put(Done(transcript, cached=False, audio_errors=job.source.errors))
        outcome = "OK"
    except GatewayError as exc:
        outcome = exc.code
        outbox.put(Failed(exc.code, exc.detail))
    except Exception:
        log.exception("transcription %s failed", job.source.id)
        outcome = "INTERNAL_ERROR"
        outbox.put(Failed("INTERNAL_ERROR", "internal error"))
    finally:
        metrics.ACTIVE_STREAMS.labels(engine).dec()
        metrics.STREAM_OUTCOMES.labels(engine, outcome).inc()
        if job.on_outcome is not None:
            job.on_outcome(outcome)


async def attend(
    job: Job,
    consume: Callable[[Outbox], Awaitable[None]],
    *,
    keepalive_interval: float = 0.0,
    ends_with_job: bool = False,
) -> Done | Failed | None:
    """Run ``job`` while ``consume`` takes its events, in one task group that lives exactly as
    long as the request; always closes the job.

    The group ends when ``consume`` returns: an SSE writer after writing the final event, or as
    soon as its client leaves, which cancels the job and so closes its engine session. With
    ``ends_with_job`` the job's final event ends it too (a client waiting for one answer, whose
    ``consume`` only watches for its departure). Returns the final event, or None when the job
    was cancelled first.
    """
    outbox = Outbox()
    try:
        async with anyio.create_task_group() as tg:

            async def run() -> None:
                await run_job(job, outbox)
                if ends_with_job:
                    tg.cancel_scope.cancel()

            tg.start_soon(run)
            if keepalive_interval > 0:
                tg.start_soon(keepalive, outbox, keepalive_interval)
            await consume(outbox)
            tg.cancel_scope.cancel()
    finally:
        await job.aclose()
    return outbox.final
