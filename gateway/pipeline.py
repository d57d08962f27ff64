"""One transcription request, end to end, as one task group.

::

    spool file ─► decoder ─(pcm channel)─► sender ─► engine session ─► receiver ─► Outbox ─► SSE writer
    (thread steps)          bounded          send_audio()              results()    conflating

The decoder and the sender are connected by a bounded memory object stream, so the decoder only
runs ahead of the engine by :data:`PCM_CHANNEL_CAPACITY` chunks. The receiver never waits for the
client: it hands each snapshot to an :class:`Outbox`, which keeps only the latest one, so a slow
SSE reader gets the newest transcript while the engine keeps being read. The first task to fail
cancels the rest; a client that leaves cancels the whole group, which closes the engine session.

Only a complete transcript (the engine's final update after all audio was sent) is stored.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import anyio

from . import metrics
from .admission import Ticket
from .audio import PcmDecoder, Upload
from .engines.base import PCM_BYTES_PER_SECOND, Engine, Session, SessionOptions
from .errors import GatewayError, ShuttingDown, Timeout, UpstreamError, collapse_groups
from .events import Done, EngineUpdate, Failed, Progress, Queued, StreamEvent, Transcript
from .store import Store, StoredTranscript

__all__ = [
    "CHUNK_BYTES",
    "PCM_CHANNEL_CAPACITY",
    "QUEUED_EXACT",
    "QUEUED_INTERVAL",
    "Job",
    "Outbox",
    "StopSignal",
    "cached_result",
    "keepalive",
    "run_job",
]

log = logging.getLogger("gateway.pipeline")

# The engine gets PCM in 200 ms chunks (6,400 bytes): inside WhisperLiveKit's 100-500 ms band.
CHUNK_BYTES = PCM_BYTES_PER_SECOND // 5
# Chunks decoded ahead of the engine: 8 x 6.4 KB = 51 KiB of PCM per stream, whatever the file.
PCM_CHANNEL_CAPACITY = 8
# One decoder step on a worker thread produces at most 1 s of audio, so cancellation waits < 1 step.
DECODE_STEP_BYTES = PCM_BYTES_PER_SECOND
# Encoded-mode engines get the original upload in pieces of this size.
RAW_CHUNK_BYTES = 16 * 1024


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


def cached_result(stored: StoredTranscript | None, engine: str, language: str) -> Done | None:
    """The ``done`` a stored transcript answers a request with, or None if it may not.

    A human-corrected transcript is served whatever engine made it; a machine one only to requests
    for the same engine and language, and never when it is empty.
    """
    if stored is None:
        return None
    if stored.corrected is None and (stored.engine != engine or stored.language != language):
        return None
    cached = stored.transcript(corrections=True)
    if not cached.text:
        return None
    return Done(cached, cached=True, corrected=stored.corrected is not None)


@dataclass(eq=False, kw_only=True)
class Job:
    """Everything one transcription needs, settled before the stream starts.

    A job answered from the cache has ``cached`` set and no decoder: it was found before the
    audio was probed, and it needs no engine session. Any other job holds a ``ticket``: its place
    at the engine's admission, reserved before the stream started.
    """

    upload: Upload
    decoder: PcmDecoder | None
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

    def snapshot(self, update: EngineUpdate) -> Transcript:
        segments = update.committed + update.tentative
        current = update.processed
        if self.total_time is not None:
            current = min(current, self.total_time)
        return Transcript(
            id=self.upload.id,
            segments=segments,
            committed=len(update.committed),
            current_time=round(current, 3),
            total_time=self.total_time,
            words=update.words,
            engine=self.engine.name,
            language=update.language or self.language,
        )

    async def aclose(self) -> None:
        """Release the admission ticket, the decoder and the spool file. Idempotent; safe when
        cancelled."""
        with anyio.CancelScope(shield=True):
            callbacks, self.on_close = self.on_close, []
            try:
                if self.ticket is not None:
                    await self.ticket.release()
                # Usually released already, at the end of the audio: no thread hand-off then.
                if self.decoder is not None and self.decoder.is_open:
                    await anyio.to_thread.run_sync(self.decoder.close)
                await self.upload.aclose()
            finally:
                for callback in callbacks:
                    callback()


async def _decode_pcm(job: Job, out: anyio.abc.ObjectSendStream[bytes]) -> None:
    assert job.decoder is not None
    async with out:
        while True:
            pcm = await anyio.to_thread.run_sync(job.decoder.read, DECODE_STEP_BYTES)
            if not pcm:
                # The length is what decoded, not what the container claimed (issue 13, 7.6).
                job.total_time = round(job.decoder.seconds, 3)
                return
            for i in range(0, len(pcm), CHUNK_BYTES):
                await out.send(pcm[i : i + CHUNK_BYTES])


async def _read_raw(job: Job, out: anyio.abc.ObjectSendStream[bytes]) -> None:
    async with out, await anyio.open_file(job.upload.path, "rb") as f:
        while chunk := await f.read(RAW_CHUNK_BYTES):
            await out.send(chunk)


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
    # A queued job may wait for minutes: it keeps its spooled file, not an open decoder. The
    # ticket reports only before it is granted, so no decode step is running.
    if job.decoder is not None:
        job.decoder.suspend()
    outbox.put(Queued(position))


async def _transcribe(job: Job, outbox: Outbox) -> Transcript:
    engine = job.engine
    options = SessionOptions(
        language=job.language,
        total_time=job.total_time,
        content_type=job.upload.content_type,
        filename=job.upload.filename,
    )
    if job.ticket is None:
        job.ticket = engine.admission.reserve()
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
                    producer = _read_raw if session.audio_format == "encoded" else _decode_pcm
                    tg.start_soon(producer, job, send)
                    tg.start_soon(_send, session, recv, state)
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
    """``_transcribe`` under the job's deadline, and stopped when the gateway shuts down."""
    transcript: Transcript | None = None
    with anyio.CancelScope(deadline=job.started_at + job.max_seconds) as scope:
        unregister = job.stop.register(scope) if job.stop is not None else None
        try:
            transcript = await _transcribe(job, outbox)
        finally:
            if unregister is not None:
                unregister()
    if transcript is not None:
        return transcript
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
        errors = job.decoder.errors if job.decoder is not None else 0
        outbox.put(Done(transcript, cached=False, audio_errors=errors))
        outcome = "OK"
    except GatewayError as exc:
        outcome = exc.code
        outbox.put(Failed(exc.code, exc.detail))
    except Exception:
        log.exception("transcription %s failed", job.upload.id)
        outcome = "INTERNAL_ERROR"
        outbox.put(Failed("INTERNAL_ERROR", "internal error"))
    finally:
        metrics.ACTIVE_STREAMS.labels(engine).dec()
        metrics.STREAM_OUTCOMES.labels(engine, outcome).inc()
        if job.on_outcome is not None:
            job.on_outcome(outcome)
