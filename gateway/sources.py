"""Where a job's audio comes from: the :class:`AudioSource` seam and its implementations, the
spooled upload and the live stream.

The pipeline runs one job the same way whatever feeds it: it asks its source to ``feed`` audio
into the bounded channel towards the engine session, as 16 kHz mono s16le PCM or, for an engine
that decodes for itself, as the original encoded bytes. A new kind of input (a live WebSocket
stream, a chunked HTTP body still arriving) is a new source here, not a new pipeline.

A :class:`LiveSource` is fed by whatever carries a live stream (the native WebSocket endpoint,
and the Realtime-compatible one after it): the transport hands it each piece of audio with
:meth:`LiveSource.push` and says :meth:`LiveSource.end`; the source decodes with a
:mod:`gateway.live_audio` decoder as the pieces arrive. It knows nothing of the transport, so any
transport reuses it; what the transport must do itself (an idle client, a malformed message) it
reports by failing the job.

This module knows audio and files only: it must never import the pipeline, the jobs, the
engines or the front APIs.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from typing import Protocol

import anyio

from .audio import PcmDecoder, Upload, open_decoder
from .live_audio import Receive

__all__ = [
    "DECODE_STEP_BYTES",
    "LIVE_CHANNEL_CAPACITY",
    "RAW_CHUNK_BYTES",
    "AudioSource",
    "LiveDecoder",
    "LiveSource",
    "Send",
    "SpooledUpload",
]

# One decoder step on a worker thread produces at most 1 s of 16 kHz s16le audio, so a cancelled
# job waits for less than one step.
DECODE_STEP_BYTES = 2 * PcmDecoder.RATE
# Encoded-mode engines get the original upload in pieces of this size.
RAW_CHUNK_BYTES = 16 * 1024
# A live client's pieces of audio held before the engine takes them; past it, push() waits and
# so the transport stops reading its socket (a client faster than real time is paced).
LIVE_CHANNEL_CAPACITY = 8

#: Hands one piece of audio to the pipeline; waits while the engine is behind (backpressure).
Send = Callable[[bytes], Awaitable[None]]


class AudioSource(Protocol):
    """The audio of one job, as the pipeline needs it.

    Before the stream starts the job is prepared with :meth:`open` (a source that cannot be
    read is a 4xx then, not an error event later). While the job waits in an engine's queue the
    pipeline calls :meth:`suspend`; once admitted it calls :meth:`feed` once; :meth:`aclose`
    always ends it, whatever happened.
    """

    @property
    def id(self) -> str:
        """The transcript's id: a content hash when the audio is known whole (so the cache can
        answer it), a random one for a live stream."""

    @property
    def content_type(self) -> str:
        """The media type the client declared, for engines that decode for themselves."""

    @property
    def filename(self) -> str:
        """The client's file name, or ""."""

    @property
    def duration(self) -> float | None:
        """The audio's length as known before it is fed (None: unknown, or live)."""

    @property
    def errors(self) -> int:
        """Damaged parts of the audio skipped so far (``audio_errors`` in ``done``)."""

    async def open(self) -> None:
        """Check that audio can be read from the source (DecodeError if none can)."""

    def suspend(self) -> None:
        """Release what can be made again while the job waits to be admitted."""

    async def feed(self, send: Send, *, encoded: bool) -> float | None:
        """Send all the audio, as PCM (or the encoded bytes when ``encoded``), then return its
        length in seconds as it turned out, or None when only the engine can tell."""

    async def aclose(self) -> None:
        """Release everything the source holds. Idempotent; runs even when cancelled."""


class SpooledUpload:
    """A finished upload spooled to disk: decoded on worker threads a bounded step at a time.

    The decoder made by :meth:`open` (the probe) is kept for the job; a queued job releases its
    FFmpeg state (:meth:`PcmDecoder.suspend`) and keeps only the spool file.
    """

    def __init__(self, upload: Upload) -> None:
        self.upload = upload
        self.decoder: PcmDecoder | None = None

    @property
    def id(self) -> str:
        return self.upload.id

    @property
    def content_type(self) -> str:
        return self.upload.content_type

    @property
    def filename(self) -> str:
        return self.upload.filename

    @property
    def duration(self) -> float | None:
        return self.decoder.duration if self.decoder is not None else None

    @property
    def errors(self) -> int:
        return self.decoder.errors if self.decoder is not None else 0

    async def open(self) -> None:
        self.decoder = await anyio.to_thread.run_sync(open_decoder, self.upload.path)

    def suspend(self) -> None:
        # Only ever before feed(): no decode step is running on a thread.
        if self.decoder is not None:
            self.decoder.suspend()

    async def feed(self, send: Send, *, encoded: bool) -> float | None:
        if encoded:
            async with await anyio.open_file(self.upload.path, "rb") as f:
                while chunk := await f.read(RAW_CHUNK_BYTES):
                    await send(chunk)
            return None
        decoder = self.decoder
        assert decoder is not None, "feed() before open()"
        while pcm := await anyio.to_thread.run_sync(decoder.read, DECODE_STEP_BYTES):
            await send(pcm)
        # The length is what decoded, not what the container claimed (issue 13, 7.6).
        return round(decoder.seconds, 3)

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            # Usually released already, at the end of the audio: no thread hand-off then.
            if self.decoder is not None and self.decoder.is_open:
                await anyio.to_thread.run_sync(self.decoder.close)
            await self.upload.aclose()


class LiveDecoder(Protocol):
    """Turns a live stream's pieces into PCM as they arrive (see :mod:`gateway.live_audio`)."""

    @property
    def content_type(self) -> str:
        """The media type of the bytes :meth:`container_header` and the pieces make together."""

    @property
    def errors(self) -> int:
        """Damaged parts skipped so far."""

    def container_header(self) -> bytes:
        """What must precede the pieces for an engine that decodes for itself (b"": nothing)."""

    async def decode(self, receive: Receive, send: Send) -> float:
        """Decode every piece ``receive`` gives into ``send``; returns the seconds of PCM sent."""


class LiveSource:
    """Audio that arrives while it is transcribed: a random id, no length known in advance.

    There is nothing to probe before the stream starts (the audio comes after the upgrade), and
    nothing to release while queued: the pieces wait in a bounded channel.
    """

    def __init__(self, decoder: LiveDecoder) -> None:
        self.decoder = decoder
        self._id = secrets.token_hex(16)
        self._in, self._out = anyio.create_memory_object_stream[bytes](LIVE_CHANNEL_CAPACITY)

    @property
    def id(self) -> str:
        return self._id

    @property
    def content_type(self) -> str:
        return self.decoder.content_type

    @property
    def filename(self) -> str:
        return ""

    @property
    def duration(self) -> float | None:
        return None

    @property
    def errors(self) -> int:
        return self.decoder.errors

    async def push(self, audio: bytes) -> None:
        """Hand over the next piece; waits while :data:`LIVE_CHANNEL_CAPACITY` pieces wait. A
        piece pushed after the job ended is dropped."""
        if not audio:
            return
        try:
            await self._in.send(audio)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass

    def end(self) -> None:
        """No more audio: the job ends once the engine has heard what was pushed."""
        self._in.close()

    async def _next(self) -> bytes:
        try:
            return await self._out.receive()
        except anyio.EndOfStream:
            return b""

    async def open(self) -> None:
        return None

    def suspend(self) -> None:
        return None

    async def feed(self, send: Send, *, encoded: bool) -> float | None:
        if encoded:
            if header := self.decoder.container_header():
                await send(header)
            while chunk := await self._next():
                await send(chunk)
            return None
        return round(await self.decoder.decode(self._next, send), 3)

    async def aclose(self) -> None:
        self._in.close()
        self._out.close()
