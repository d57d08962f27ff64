"""Where a job's audio comes from: the :class:`AudioSource` seam and its first implementation,
the spooled upload.

The pipeline runs one job the same way whatever feeds it: it asks its source to ``feed`` audio
into the bounded channel towards the engine session, as 16 kHz mono s16le PCM or, for an engine
that decodes for itself, as the original encoded bytes. A new kind of input (a live WebSocket
stream, a chunked HTTP body still arriving) is a new source here, not a new pipeline.

This module knows audio and files only: it must never import the pipeline, the jobs, the
engines or the front APIs.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

import anyio

from .audio import PcmDecoder, Upload, open_decoder

__all__ = ["DECODE_STEP_BYTES", "RAW_CHUNK_BYTES", "AudioSource", "Send", "SpooledUpload"]

# One decoder step on a worker thread produces at most 1 s of 16 kHz s16le audio, so a cancelled
# job waits for less than one step.
DECODE_STEP_BYTES = 2 * PcmDecoder.RATE
# Encoded-mode engines get the original upload in pieces of this size.
RAW_CHUNK_BYTES = 16 * 1024

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
