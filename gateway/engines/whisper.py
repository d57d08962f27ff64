"""The default embedded engine: Whisper through faster-whisper (CTranslate2), on worker threads.

How a session streams with batch accuracy
-----------------------------------------
Audio arrives through ``send_audio``. Every :data:`VAD_STEP_SECONDS` the Silero VAD marks where
the audio may be cut (pauses, see :mod:`.vad`). The session's reader, ``results()``, decodes
*chunks*: each time it is free, it takes the longest stretch from the end of the last chunk that
ends at a cut and fits in ``max_segment_seconds``, decodes it whole with beam search (prompted
with the end of the text before it, as faster-whisper conditions on previous text), and commits
the result. Stretches that hold no speech are skipped, so Whisper never hallucinates on silence.

Why "the longest stretch when free": Whisper's encoder always processes a 30 s window, so a
decode of 3 s costs nearly as much as one of 25 s. Audio that arrives faster than it can be
decoded (an upload) piles up while a chunk decodes, and the next chunk takes all of it: an upload
costs about one decode per 25 s, like a whole-file decode, after a short first chunk that makes
the first committed text appear early. Live audio arrives slower than the engine decodes, so each
pause is committed as soon as it is heard. Tentative partials of the open stretch (greedy, no
word timestamps) are decoded only when nothing is ready to commit and ``partial_interval`` has
passed in both wall and audio time: about one a second for live audio, and almost never for an
upload, whose decoder is always busy committing (the time budget: an upload's time to ``done``
stays near a direct whole-file decode).

Threads and sharing
-------------------
All sessions share one loaded model. Up to ``workers`` sessions (default: the CPU count) decode
at once; the rest queue with visible positions. CTranslate2 releases the GIL while decoding and
runs ``num_workers = workers`` decodes in parallel over weights it loads once, each with
``cpu_threads`` threads. A lone stream would want every core and many streams one core each;
measured on 2 cores with tiny.en (bench/embedded.py), one thread per decode serves both: a direct
whole-file decode takes the same time with 1 thread as with 2 (beam search over a small model is
bound by the decoder's step overhead, not by matrix maths that threads could share), while 2
threads per decode oversubscribe the cores as soon as two streams run (4 concurrent streams:
21.2 audio s per s with 2 threads, 25.3 with 1). So ``cpu_threads`` defaults to 1; raise it
for larger models (small and up) when few streams run at once.

A cancelled session (the client left) releases its admission slot at once: the worker thread is
abandoned and stops at its next segment boundary, so at most one window's decode finishes
unobserved.

This module imports faster-whisper and numpy; never the pipeline, the store or the fronts.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import numpy as np

from ..admission import Lease
from ..config import WhisperConfig
from ..errors import InvalidOption, UpstreamError, UpstreamUnavailable
from ..events import EngineUpdate, Segment, Word
from ._whisper_model import ModelUnavailable, load_model
from .base import PCM_SAMPLE_RATE, Engine, Session, SessionOptions
from .vad import WINDOW_SAMPLES, Segmenter, SileroVad, silero_session

__all__ = ["MAX_PENDING_CHUNKS", "VAD_STEP_SECONDS", "WhisperEngine"]

# Audio is passed through the VAD in steps of this many seconds (one ONNX call each).
VAD_STEP_SECONDS = 0.5
# send_audio blocks while more than this many chunks' worth of audio waits to be decoded: with
# the default 25 s chunks, 50 s of s16 PCM, 1.6 MB per session, whatever the length of the audio.
MAX_PENDING_CHUNKS = 2
# The prompt is the end of the committed text: Whisper keeps at most 223 prompt tokens anyway.
PROMPT_CHARS = 600
# A chunk's decode stops once its text reaches within this many seconds of the chunk's last
# speech window (see _decode_chunk).
TAIL_SLACK = 0.3
_SENTENCE_ENDS = (".", "?", "!", "\u3002", "\uff1f", "\uff01")  # and CJK full stops
_ABBREVIATIONS = frozenset(
    [
        "mr",
        "mrs",
        "ms",
        "dr",
        "st",
        "jr",
        "sr",
        "vs",
        "etc",
        "prof",
        "lt",
        "sgt",
        "capt",
        "rev",
        "fig",
        "approx",
        "inc",
        "ltd",
    ]
)
# Partials need this much audio in the open stretch to be worth a decode.
MIN_PARTIAL_SECONDS = 1.0
# Audio arriving this many times faster than real time is an upload, not a live speaker.
FAST_AUDIO = 2.0
# The longest aclose() waits for abandoned decodes to stop.
CLOSE_TIMEOUT = 30.0
_STEP_SAMPLES = int(VAD_STEP_SECONDS * PCM_SAMPLE_RATE) // WINDOW_SAMPLES * WINDOW_SAMPLES


class _Cancelled(Exception):
    pass


class _InFlight:
    """Decode threads still running, abandoned ones included: the engine waits for them when it
    closes, since a process that exits while CTranslate2 decodes is aborted (``terminate``)."""

    def __init__(self) -> None:
        self._count = 0
        self._idle = threading.Condition()

    def run(self, fn: Callable[[], _Decoded]) -> _Decoded:
        with self._idle:
            self._count += 1
        try:
            return fn()
        finally:
            with self._idle:
                self._count -= 1
                self._idle.notify_all()

    def wait(self, timeout: float) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: self._count == 0, timeout)


@dataclass(frozen=True)
class _Decoded:
    segments: tuple[Segment, ...]
    words: tuple[Word, ...]
    language: str


def _decode_chunk(
    model: Any,
    audio: np.ndarray,
    offset: float,
    *,
    language: str,
    prompt: str,
    beam_size: int,
    words: bool,
    speech_end: float,
    cancelled: threading.Event,
) -> _Decoded:
    """Decode one chunk (blocking); times are shifted by ``offset`` seconds.

    faster-whisper decodes 30 s windows lazily, as its segments are iterated. When the text of a
    window ends before the chunk does (no closing timestamp), it starts another window at the
    last word: with word timestamps that is usually a fraction of a second of trailing silence,
    which fails every quality check and runs all six fallback temperatures (4x the cost of the
    chunk, measured). The VAD knows there is no speech there (``speech_end``, chunk-relative),
    so iteration stops once the text has reached it.
    """
    segments, info = model.transcribe(
        audio,
        language=language or None,
        beam_size=beam_size,
        word_timestamps=words,
        initial_prompt=prompt or None,
        vad_filter=False,
    )
    out: list[Segment] = []
    found: list[Word] = []
    for s in segments:  # the decoding happens while iterating
        if cancelled.is_set():
            raise _Cancelled
        text = s.text.strip()
        if not text:
            continue
        if s.words:
            out.extend(_sentences(s.words, offset))
        else:
            start, end = round(offset + float(s.start), 3), round(offset + float(s.end), 3)
            out.append(Segment(start, end, text))
        for w in s.words or ():
            start, end = round(offset + float(w.start), 3), round(offset + float(w.end), 3)
            found.append(Word(start, end, w.word.strip()))
        if s.end + TAIL_SLACK >= speech_end:
            break
    return _Decoded(tuple(out), tuple(found), info.language)


def _ends_sentence(word: str) -> bool:
    word = word.strip()
    if not word.endswith(_SENTENCE_ENDS):
        return False
    stem = word.rstrip(".").lower()
    # "Mr." or "J." end no sentence.
    return not (word.endswith(".") and (len(stem) <= 1 or stem in _ABBREVIATIONS))


def _sentences(words: Any, offset: float) -> list[Segment]:
    """A Whisper segment split into sentences by its word timestamps.

    Prompted with the text before it, Whisper often emits one timestamp pair for a whole chunk:
    a 17 s segment, useless as a subtitle cue. Words that end a sentence end a segment.
    """
    out: list[Segment] = []
    pending: list[Any] = []
    for i, w in enumerate(words):
        pending.append(w)
        if _ends_sentence(w.word) or i == len(words) - 1:
            text = "".join(x.word for x in pending).strip()
            if text:
                start = round(offset + float(pending[0].start), 3)
                out.append(Segment(start, round(offset + float(w.end), 3), text))
            pending = []
    return out


class _WhisperSession(Session):
    def __init__(self, engine: WhisperEngine, model: Any, language: str) -> None:
        cfg = engine.config
        self._cfg = cfg
        self._model = model
        self._inflight = engine.inflight
        self._language = language
        self._vad = SileroVad(engine.vad_session)
        self._seg = Segmenter(
            threshold=cfg.vad_threshold,
            min_silence=max(1, round(cfg.min_silence * PCM_SAMPLE_RATE / WINDOW_SAMPLES)),
            pad=max(1, round(0.2 * PCM_SAMPLE_RATE / WINDOW_SAMPLES)),
        )
        self._max_windows = int(cfg.max_segment_seconds * PCM_SAMPLE_RATE) // WINDOW_SAMPLES
        self._max_pending = MAX_PENDING_CHUNKS * self._max_windows * WINDOW_SAMPLES
        # s16 PCM from sample self._base on; everything before it has been decoded.
        self._pcm = bytearray()
        self._base = 0
        self._received = 0  # samples received
        self._vad_done = 0  # samples the VAD has seen (whole windows, plus the padded tail)
        self._ended = False
        self._changed = anyio.Event()
        self._room = anyio.Event()
        self._committed: list[Segment] = []
        self._words: list[Word] = []
        self._tentative: tuple[Segment, ...] = ()
        self._processed = 0.0
        self._partial_audio = 0  # self._vad_done when the last partial was decoded
        self._partial_at = self._opened_at = anyio.current_time()
        self._contended = engine.contended

    # -- the writer side ---------------------------------------------------------------------

    def _samples(self, start: int, end: int) -> np.ndarray:
        raw = self._pcm[2 * (start - self._base) : 2 * (end - self._base)]
        return np.frombuffer(bytes(raw), dtype=np.int16).astype(np.float32) / 32768.0

    async def _run_vad(self, end: int, *, pad: bool) -> None:
        audio = self._samples(self._vad_done, end)
        if pad and len(audio) % WINDOW_SAMPLES:
            audio = np.pad(audio, (0, WINDOW_SAMPLES - len(audio) % WINDOW_SAMPLES))
        probs = await anyio.to_thread.run_sync(self._vad.probabilities, audio)
        self._seg.push(probs)
        self._vad_done = end if not pad else self._seg.windows * WINDOW_SAMPLES
        self._changed.set()

    async def send_audio(self, chunk: bytes) -> None:
        self._pcm += chunk
        self._received += len(chunk) // 2
        if self._received - self._vad_done >= _STEP_SAMPLES:
            whole = (
                self._vad_done
                + (self._received - self._vad_done) // WINDOW_SAMPLES * WINDOW_SAMPLES
            )
            await self._run_vad(whole, pad=False)
        while self._received - self._base > self._max_pending:
            self._room = anyio.Event()
            await self._room.wait()

    async def end_audio(self) -> None:
        if self._received > self._vad_done:
            await self._run_vad(self._received, pad=True)
        self._ended = True
        self._changed.set()

    # -- the reader side ---------------------------------------------------------------------

    def _update(self) -> EngineUpdate:
        return EngineUpdate(
            committed=tuple(self._committed),
            tentative=self._tentative,
            processed=round(self._processed, 3),
            words=tuple(self._words),
            language=self._language,
        )

    def _prompt(self) -> str:
        if not self._cfg.condition_on_previous_text:
            return ""
        text = " ".join(s.text for s in self._committed[-8:])
        return text[-PROMPT_CHARS:]

    async def _decode(self, start: int, end: int, *, beam_size: int, words: bool) -> _Decoded:
        audio = self._samples(start, end)
        last = self._seg.speech_end(start // WINDOW_SAMPLES, -(-end // WINDOW_SAMPLES))
        speech_end = math.inf if last is None else (last * WINDOW_SAMPLES - start) / PCM_SAMPLE_RATE
        prompt = self._prompt()
        cancelled = threading.Event()
        try:
            return await anyio.to_thread.run_sync(
                self._inflight.run,
                lambda: _decode_chunk(
                    self._model,
                    audio,
                    start / PCM_SAMPLE_RATE,
                    language=self._language,
                    prompt=prompt,
                    beam_size=beam_size,
                    words=words,
                    speech_end=speech_end,
                    cancelled=cancelled,
                ),
                abandon_on_cancel=True,
            )
        except anyio.get_cancelled_exc_class():
            cancelled.set()
            raise
        except (RuntimeError, ValueError, MemoryError) as exc:
            raise UpstreamError(f"whisper failed: {exc}") from exc

    async def _commit(self, end_window: int) -> None:
        start = self._base
        end = min(end_window * WINDOW_SAMPLES, self._received)
        if self._seg.has_speech(start // WINDOW_SAMPLES, end_window):
            decoded = await self._decode(
                start, end, beam_size=self._cfg.beam_size, words=self._cfg.word_timestamps
            )
            self._committed.extend(decoded.segments)
            self._words.extend(decoded.words)
            # A multilingual model detects the language on the first chunk with speech; the
            # rest of the session keeps it, so one stream is never transcribed in two languages.
            self._language = self._language or decoded.language
        self._tentative = ()
        self._processed = end / PCM_SAMPLE_RATE
        del self._pcm[: 2 * (end_window * WINDOW_SAMPLES - self._base)]
        self._base = end_window * WINDOW_SAMPLES
        self._seg.forget(end_window)
        self._room.set()

    def _partial_due(self) -> float:
        """When the next partial may be decoded (math.inf: not now, whatever the time)."""
        cfg = self._cfg
        start = self._base // WINDOW_SAMPLES
        open_samples = self._vad_done - self._base
        if (
            self._ended
            or open_samples < MIN_PARTIAL_SECONDS * PCM_SAMPLE_RATE
            or self._vad_done - self._partial_audio < cfg.partial_interval * PCM_SAMPLE_RATE
            or not self._seg.has_speech(start, self._seg.windows)
        ):
            return math.inf
        return self._partial_at + cfg.partial_interval

    async def _partial(self) -> None:
        start, end = self._base, self._vad_done
        self._partial_audio = end
        self._partial_at = anyio.current_time()
        decoded = await self._decode(start, end, beam_size=1, words=False)
        text = " ".join(s.text for s in decoded.segments)
        self._tentative = (
            (Segment(round(start / PCM_SAMPLE_RATE, 3), round(end / PCM_SAMPLE_RATE, 3), text),)
            if text
            else ()
        )
        self._processed = end / PCM_SAMPLE_RATE

    def _eager(self) -> bool:
        """Whether to decode up to the first pause heard, or to wait for a full chunk.

        A lone stream commits at each pause it can: the first text of an upload appears after
        one short decode. But every decode costs a whole encoder pass, so when other sessions
        compete for the cores and the audio arrives faster than real time (an upload, not a
        live speaker), only full chunks are decoded: throughput before latency.
        """
        elapsed = anyio.current_time() - self._opened_at
        if self._received < FAST_AUDIO * elapsed * PCM_SAMPLE_RATE:
            return True
        return not self._contended()

    async def results(self) -> AsyncIterator[EngineUpdate]:
        while True:
            final = self._ended
            end = self._seg.next_chunk(
                self._base // WINDOW_SAMPLES, self._max_windows, final=final, eager=self._eager()
            )
            if end is not None:
                await self._commit(end)
                yield self._update()
                continue
            if final:
                yield self._update()
                return
            due = self._partial_due()
            if due <= anyio.current_time():
                await self._partial()
                yield self._update()
                continue
            self._changed = anyio.Event()
            with anyio.move_on_at(due):
                await self._changed.wait()


class WhisperEngine(Engine):
    kind = "whisper"

    def __init__(self, name: str, config: WhisperConfig) -> None:
        cores = os.cpu_count() or 1
        self.workers = config.workers or cores
        super().__init__(name, config, sessions=self.workers)
        self.config = config
        self.threads = config.cpu_threads or cores
        self._model: Any = None
        self.vad_session: Any = None
        self._failure: str | None = "the model is not loaded yet"
        self._loading = anyio.Lock()
        self.inflight = _InFlight()
        self.multilingual = False

    def _load(self) -> tuple[Any, Any]:
        return load_model(self.config, threads=self.threads, workers=self.workers), silero_session()

    async def start(self) -> None:
        """Load the model and the VAD once; a failure leaves the engine unready, with the reason."""
        async with self._loading:
            if self._model is not None:
                return
            try:
                self._model, self.vad_session = await anyio.to_thread.run_sync(self._load)
            except (ModelUnavailable, OSError, RuntimeError, ImportError) as exc:
                self._failure = str(exc)
                return
            self.multilingual = bool(self._model.model.is_multilingual)
            self._failure = None

    async def readiness(self) -> str | None:
        return self._failure

    def resolve_language(self, language: str) -> str:
        language = language.strip().lower()
        if self._model is None:
            return language
        if not self.multilingual:
            if language not in ("", "en"):
                raise InvalidOption(
                    f"engine {self.name!r} runs the English-only model {self.config.model!r}:"
                    f' language {language!r} is not available (use "en" or leave it empty)'
                )
            return "en"
        if language and language not in self._model.supported_languages:
            raise InvalidOption(f"language {language!r} is not one Whisper knows")
        return language

    def contended(self) -> bool:
        """Whether other sessions run or wait besides the caller's."""
        stats = self.stats()
        return bool(stats["sessions"] > 1 or stats["queue_length"] > 0)

    @asynccontextmanager
    async def open_session(self, options: SessionOptions, lease: Lease) -> AsyncIterator[Session]:
        if self._model is None:
            raise UpstreamUnavailable(self._failure or "the model is not loaded")
        language = self.resolve_language(options.language)
        yield _WhisperSession(self, self._model, language)

    async def aclose(self) -> None:
        self._model = None
        with anyio.CancelScope(shield=True):
            # Abandoned decodes stop at their next segment: seconds at most.
            await anyio.to_thread.run_sync(self.inflight.wait, CLOSE_TIMEOUT)
