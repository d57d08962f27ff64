"""The embedded engine: PocketSphinx (the wheel's en-US model) on worker threads.

Why two decodes: streaming small chunks through one decoder costs PocketSphinx a lot of accuracy
(its cepstral mean normalisation starts from defaults: 47.8 % WER against 29.7 % decoding whole
files), while decoding each speech segment whole keeps batch accuracy (30.2 %). So a session runs
a voice-activity endpointer over the audio; inside a speech segment it decodes live, only to show
tentative partials about every ``partial_interval`` seconds of audio; when the segment ends it
decodes the whole segment again with ``full_utt=True`` and commits that text.

Each session holds one decoder (about 90 MB) and one worker for its whole life, so at most
``workers`` decodes run at once; further sessions queue with visible positions. Decoders are
pooled (building one takes ~0.3 s), and a decoder goes back to the pool only after a reset to the
state it was built in, however its session ended (see :class:`_PooledDecoder`).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pocketsphinx

from ..admission import Lease
from ..config import PocketSphinxConfig
from ..errors import UpstreamError
from ..events import EngineUpdate, Segment, Word
from .base import PCM_BYTES_PER_SECOND, PCM_SAMPLE_RATE, Engine, Session, SessionOptions

__all__ = ["PocketSphinxEngine", "Recognizer"]

log = logging.getLogger("gateway.engines.embedded")

# Updates waiting for the pipeline's receiver. Each holds the transcript so far (a few KiB for an
# hour of speech), so a session buffers at most 4 snapshots.
RESULTS_CAPACITY = 4
FRAMES_PER_SECOND = 100  # PocketSphinx's default -frate
_ALTERNATE = re.compile(r"\(\d+\)$")
_FILLERS = {"<s>", "</s>", "<sil>"}


def _new_decoder() -> Any:
    return pocketsphinx.Decoder(loglevel="FATAL")


class _PooledDecoder:
    """A decoder and what :meth:`reset` needs to make it as good as new.

    Two things outlive an utterance in a PocketSphinx decoder. An utterance a session left open
    (a client that went away, audio that failed to decode) makes every later ``start_utt`` fail.
    And the live cepstral mean normalisation keeps adapting across utterances, so the next
    session's text would depend on the audio of the previous, unrelated ones. ``reset`` closes
    any open utterance and restores the CMN estimate the decoder was built with.
    """

    def __init__(self) -> None:
        self.decoder = _new_decoder()
        self._initial_cmn: str = self.decoder.get_cmn(False)

    def reset(self, in_utterance: bool) -> None:
        if in_utterance:
            self.decoder.end_utt()
        self.decoder.set_cmn(self._initial_cmn)


class Recognizer:
    """One session's synchronous state: endpointing, live partials and whole-segment decodes."""

    def __init__(self, decoder: Any, cfg: PocketSphinxConfig) -> None:
        self._decoder = decoder
        self._cfg = cfg
        self._ep = pocketsphinx.Endpointer(sample_rate=PCM_SAMPLE_RATE)
        self._frame_bytes: int = self._ep.frame_bytes
        self._frame_seconds: float = self._ep.frame_length
        self._buffer = bytearray()
        self._fed_frames = 0
        self._speech: list[bytes] = []
        self._speech_start = 0.0
        self._live = False
        self._next_partial = cfg.partial_interval
        self._committed: list[Segment] = []
        self._words: list[Word] = []
        self._tentative: tuple[Segment, ...] = ()

    @property
    def in_utterance(self) -> bool:
        """Whether the decoder has an utterance open (a session that ended mid-speech)."""
        return self._live

    @property
    def processed(self) -> float:
        return self._fed_frames * self._frame_seconds

    def _update(self) -> EngineUpdate:
        return EngineUpdate(
            committed=tuple(self._committed),
            tentative=self._tentative,
            processed=self.processed,
            words=tuple(self._words),
        )

    def _decode_whole(self, pcm: bytes, start: float) -> None:
        d = self._decoder
        if self._live:
            d.end_utt()
            self._live = False
        d.start_utt()
        d.process_raw(pcm, full_utt=True)
        d.end_utt()
        hyp = d.hyp()
        text = hyp.hypstr.strip() if hyp is not None else ""
        if not text:
            return
        end = start + len(pcm) / PCM_BYTES_PER_SECOND
        self._committed.append(Segment(round(start, 3), round(end, 3), text))
        for seg in d.seg():
            word = _ALTERNATE.sub("", seg.word)
            if word in _FILLERS or word.startswith("["):
                continue
            self._words.append(
                Word(
                    round(start + seg.start_frame / FRAMES_PER_SECOND, 3),
                    round(start + (seg.end_frame + 1) / FRAMES_PER_SECOND, 3),
                    word,
                )
            )

    def _close_segment(self) -> None:
        pcm = b"".join(self._speech)
        self._speech.clear()
        self._tentative = ()
        if pcm:
            self._decode_whole(pcm, self._speech_start)

    def _speech_frame(self, frame: bytes) -> bool:
        """Add a frame of speech; True when a partial is due."""
        if not self._speech:
            self._speech_start = self._ep.speech_start
        self._speech.append(frame)
        if not self._live:
            self._decoder.start_utt()
            self._live = True
        self._decoder.process_raw(frame, full_utt=False)
        seconds = len(self._speech) * self._frame_seconds
        if seconds >= self._cfg.max_segment_seconds:
            # A long stretch without a pause: cut it here so memory and decode time stay bounded.
            cut_at = self._speech_start + seconds
            self._close_segment()
            self._speech_start = cut_at
            return True
        return False

    def _step(self, frame: bytes, last: bool) -> bool:
        speech = self._ep.end_stream(frame) if last else self._ep.process(frame)
        self._fed_frames += 1
        due = False
        if speech is not None:
            due = self._speech_frame(speech)
            if not self._ep.in_speech:
                self._close_segment()
                due = True
        if self.processed >= self._next_partial:
            self._next_partial = self.processed + self._cfg.partial_interval
            if self._speech and self._live:
                hyp = self._decoder.hyp()
                text = hyp.hypstr.strip() if hyp is not None else ""
                self._tentative = (
                    (Segment(round(self._speech_start, 3), round(self.processed, 3), text),)
                    if text
                    else ()
                )
            due = True
        return due

    def feed(self, pcm: bytes) -> list[EngineUpdate]:
        """Consume PCM; return the updates it produced (at most one per partial interval)."""
        self._buffer += pcm
        fb = self._frame_bytes
        updates = []
        # Hold back the last whole frame: pocketsphinx's end_stream() must get a real frame, or
        # the final stretch of speech is lost when audio ends on a frame boundary.
        while len(self._buffer) >= 2 * fb:
            frame = bytes(self._buffer[:fb])
            del self._buffer[:fb]
            if self._step(frame, last=False):
                updates.append(self._update())
        return updates[-1:]

    def finish(self) -> EngineUpdate:
        fb = self._frame_bytes
        while len(self._buffer) > fb:
            frame = bytes(self._buffer[:fb])
            del self._buffer[:fb]
            self._step(frame, last=False)
        if self._buffer:
            self._step(bytes(self._buffer), last=True)
            self._buffer.clear()
        self._close_segment()
        if self._live:
            self._decoder.end_utt()
            self._live = False
        return self._update()


class _EmbeddedSession(Session):
    def __init__(self, recognizer: Recognizer) -> None:
        self.recognizer = recognizer
        self._send, self._recv = anyio.create_memory_object_stream[EngineUpdate](RESULTS_CAPACITY)
        # The decoder raised: its state is unknown, so it is dropped rather than pooled.
        self.failed = False

    async def _run(self, fn: Any, *args: Any) -> Any:
        try:
            # Not abandoned on cancel: the decoder must be idle before it goes back to the pool.
            return await anyio.to_thread.run_sync(fn, *args)
        except (RuntimeError, ValueError) as exc:
            self.failed = True
            raise UpstreamError(f"pocketsphinx failed: {exc}") from exc

    async def send_audio(self, chunk: bytes) -> None:
        for update in await self._run(self.recognizer.feed, chunk):
            await self._send.send(update)

    async def end_audio(self) -> None:
        final = await self._run(self.recognizer.finish)
        await self._send.send(final)
        await self._send.aclose()

    async def results(self) -> AsyncIterator[EngineUpdate]:
        async for update in self._recv:
            yield update

    async def aclose(self) -> None:
        await self._send.aclose()
        await self._recv.aclose()


class PocketSphinxEngine(Engine):
    kind = "pocketsphinx"

    def __init__(self, name: str, config: PocketSphinxConfig) -> None:
        self.workers = config.workers or os.cpu_count() or 1
        super().__init__(name, config, sessions=self.workers)
        self.config = config
        self._idle: list[_PooledDecoder] = []

    async def _release(self, pooled: _PooledDecoder, session: _EmbeddedSession) -> None:
        """Reset the decoder and pool it; one that failed or fails to reset is dropped."""
        if session.failed:
            return
        try:
            await anyio.to_thread.run_sync(pooled.reset, session.recognizer.in_utterance)
        except (RuntimeError, ValueError):
            log.warning("dropped a pocketsphinx decoder that failed to reset", exc_info=True)
            return
        self._idle.append(pooled)

    @asynccontextmanager
    async def open_session(self, options: SessionOptions, lease: Lease) -> AsyncIterator[Session]:
        # The lease caps sessions at ``workers``, so the pool never holds more decoders.
        pooled = self._idle.pop() if self._idle else None
        if pooled is None:
            pooled = await anyio.to_thread.run_sync(_PooledDecoder)
        session = _EmbeddedSession(Recognizer(pooled.decoder, self.config))
        try:
            yield session
        finally:
            with anyio.CancelScope(shield=True):
                await session.aclose()
                await self._release(pooled, session)

    async def aclose(self) -> None:
        self._idle.clear()
