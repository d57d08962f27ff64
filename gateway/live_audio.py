"""Live audio: audio that arrives in pieces while it is being transcribed, decoded as it arrives.

A live source (:class:`gateway.sources.LiveSource`) hands its decoder a ``receive`` function
that returns the client's next piece of audio (``b""`` once the client is done) and a ``send``
function that takes 16 kHz mono s16le PCM towards the engine. Two decoders:

- :class:`PcmStream`: raw s16le mono PCM at any rate, resampled to 16 kHz by the streaming
  resampler the OpenAI Realtime engine uses (its filter state spans the pieces, so the cuts
  between a client's frames leave no clicks).
- :class:`EncodedStream`: a container stream (WebM/Opus from a browser's MediaRecorder, Ogg/Opus,
  anything FFmpeg can demux without seeking), decoded incrementally with PyAV.

Why a worker thread that pulls: FFmpeg reads its input through a blocking callback, and a
demuxer asks for as many bytes as it likes; it cannot be told "nothing yet, come back later"
(an empty read is the end of the stream). So the decoder runs a bounded step at a time on a
worker thread, and its read callback fetches the client's next piece from the event loop
(``anyio.from_thread.run``) only when FFmpeg needs more bytes. Nothing is buffered besides
that piece, backpressure needs no extra channel, and a cancelled job cancels the fetch (the
host task's cancellation reaches ``from_thread.run``), which ends the step. Each stream has a
limiter of its own, so a live decoder waiting for its client never holds one of the threads the
uploads' decoders share.
"""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import anyio
import av

from .audio import MAX_BAD_PACKETS_IN_A_ROW, PcmDecoder, decode_packet
from .engines._resample import PcmResampler
from .errors import DecodeError, InvalidOption

__all__ = [
    "FORMATS",
    "MAX_RATE",
    "MIN_RATE",
    "EncodedStream",
    "PcmStream",
    "Receive",
    "Send",
    "live_decoder",
]

#: Returns the client's next piece of audio, or b"" once the client is done.
Receive = Callable[[], Coroutine[Any, Any, bytes]]
#: Takes 16 kHz mono s16le PCM towards the engine; waits while the engine is behind.
Send = Callable[[bytes], Awaitable[None]]

RATE = PcmDecoder.RATE
# One decoder step produces at most 1 s of PCM before the event loop gets it.
STEP_BYTES = 2 * RATE
# How much of a stream FFmpeg may read to recognise its format (its default, 5 MB, would make a
# client send minutes of audio before the first word).
PROBE_BYTES = 32 * 1024


def _wav_header(rate: int) -> bytes:
    """A WAV header for s16le mono PCM of unknown length (both sizes at their maximum), which
    FFmpeg reads as "until the stream ends": for engines that decode for themselves."""
    size = struct.pack("<I", 0xFFFFFFFF)
    fmt = struct.pack("<HHIIHH", 1, 1, rate, 2 * rate, 2, 16)
    return b"".join((b"RIFF", size, b"WAVEfmt ", struct.pack("<I", len(fmt)), fmt, b"data", size))


class PcmStream:
    """Raw s16le mono PCM at ``rate`` Hz (an odd byte at a frame's end waits for the next)."""

    def __init__(self, rate: int = RATE) -> None:
        self.rate = rate
        self.errors = 0

    @property
    def content_type(self) -> str:
        return "audio/wav"

    def container_header(self) -> bytes:
        return _wav_header(self.rate)

    async def decode(self, receive: Receive, send: Send) -> float:
        resampler = PcmResampler(self.rate, RATE)
        produced = 0
        while chunk := await receive():
            if pcm := resampler.push(chunk):
                produced += len(pcm)
                await send(pcm)
        if pcm := resampler.flush():
            produced += len(pcm)
            await send(pcm)
        return produced / (2 * RATE)


class _Pull:
    """The file object FFmpeg reads: each read fetches the client's next piece from the event
    loop when the last one is used up. Only ever called on the decoder's worker thread."""

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._piece = b""
        self._ended = False

    def read(self, size: int = -1) -> bytes:
        while not self._piece:
            if self._ended:
                return b""
            self._piece = anyio.from_thread.run(self._receive)
            self._ended = not self._piece
        n = len(self._piece) if size < 0 else size
        out, self._piece = self._piece[:n], self._piece[n:]
        return out


class _Decoding:
    """One encoded stream's FFmpeg state, stepped on a worker thread."""

    def __init__(self, receive: Receive) -> None:
        self._input = _Pull(receive)
        self._container: Any = None
        self._packets: Any = iter(())
        self._resampler: Any = None
        self._pending = bytearray()
        self._eof = False
        self._bad_in_a_row = 0
        self.decoded = 0
        self.errors = 0

    def _open(self) -> None:
        try:
            self._container = av.open(
                self._input,
                mode="r",
                metadata_errors="ignore",
                container_options={"probesize": str(PROBE_BYTES)},
            )
        except (av.FFmpegError, UnicodeDecodeError, ValueError) as exc:
            raise DecodeError(f"not a readable audio stream ({type(exc).__name__})") from exc
        audio = self._container.streams.audio
        if not audio or audio[0].codec_context is None:
            raise DecodeError("the stream has no audio that can be decoded")
        self._packets = self._container.demux(audio[0])
        # One resampler for the stream: a live stream does not change its format midway (a
        # client that needs to starts a new session).
        self._resampler = av.AudioResampler(format="s16", layout="mono", rate=RATE)

    def _add(self, frames: list[Any]) -> None:
        for frame in frames:
            # A plane may be padded for alignment: only the real samples count.
            n = frame.samples * 2
            self._pending += memoryview(frame.planes[0])[:n]
            self.decoded += n

    def _pump(self) -> None:
        try:
            packet = next(self._packets)
        except (StopIteration, av.FFmpegError) as exc:
            # The end of the stream, or a container the demuxer cannot follow any further.
            if isinstance(exc, av.FFmpegError):
                self.errors += 1
            self._finish()
            return
        frames, self._bad_in_a_row = decode_packet(packet, self._bad_in_a_row)
        if self._bad_in_a_row:
            self.errors += 1
            if self._bad_in_a_row >= MAX_BAD_PACKETS_IN_A_ROW:
                self._finish()
            return
        for frame in frames:
            self._add(self._resampler.resample(frame))

    def _finish(self) -> None:
        self._eof = True
        self._add(self._resampler.resample(None))
        if not self.decoded:
            damaged = f"; {self.errors} damaged part(s) skipped" if self.errors else ""
            raise DecodeError(f"no audio could be decoded from the stream{damaged}")

    def step(self, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` of PCM (an even count); ``b""`` at the end of the stream."""
        if self._container is None:
            self._open()
        while len(self._pending) < max_bytes and not self._eof:
            self._pump()
        out = bytes(self._pending[:max_bytes])
        del self._pending[:max_bytes]
        return out

    def close(self) -> None:
        if self._container is not None:
            container, self._container = self._container, None
            self._packets = iter(())
            container.close()


class EncodedStream:
    """A container stream decoded as it arrives (see the module docstring)."""

    def __init__(self) -> None:
        self.errors = 0

    @property
    def content_type(self) -> str:
        return "application/octet-stream"

    def container_header(self) -> bytes:
        return b""

    async def decode(self, receive: Receive, send: Send) -> float:
        decoding = _Decoding(receive)
        limiter = anyio.CapacityLimiter(1)
        try:
            while pcm := await anyio.to_thread.run_sync(decoding.step, STEP_BYTES, limiter=limiter):
                await send(pcm)
        finally:
            self.errors = decoding.errors
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(decoding.close, limiter=limiter)
        return decoding.decoded / (2 * RATE)


#: The ``format`` query option of every live transport (the WebSocket, a live HTTP body).
FORMATS = ("pcm_s16le", "auto")
MIN_RATE, MAX_RATE = 8_000, 192_000


def live_decoder(fmt: str, rate_text: str) -> Callable[[], PcmStream | EncodedStream]:
    """The decoder the ``format`` and ``sample_rate`` query options ask for (InvalidOption when
    they make no sense): one reading of them for every live transport."""
    if fmt not in FORMATS:
        raise InvalidOption(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "auto":
        if rate_text:
            raise InvalidOption(
                "sample_rate is for format=pcm_s16le; an encoded stream has its own"
            )
        return EncodedStream
    if not rate_text:
        return PcmStream
    rate = int(rate_text) if rate_text.isdigit() else 0
    if not MIN_RATE <= rate <= MAX_RATE:
        raise InvalidOption(
            f"sample_rate must be an integer from {MIN_RATE} to {MAX_RATE}, got {rate_text!r}"
        )
    return lambda: PcmStream(rate)
