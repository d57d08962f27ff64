"""Streaming voice-activity detection for the whisper engine: where audio may be cut.

Two parts, kept apart so the algorithm is tested by feeding numbers:

- :class:`SileroVad` runs the Silero VAD network that faster-whisper's wheel ships
  (``faster_whisper/assets/silero_vad_v6.onnx``) over 32 ms windows, carrying the network's
  recurrent state from one call to the next, so audio can be fed as it arrives. It holds one
  stream's state; the ONNX session itself is shared by every stream (onnxruntime's ``run`` is
  thread-safe).
- :class:`Segmenter` turns per-window speech probabilities into *cut points*: places inside pauses
  where a chunk of audio may end without splitting a word, and tells where the next chunk to
  decode ends (:meth:`Segmenter.next_chunk`).

Why cut points rather than speech segments: Whisper transcribes best with context, and every
decode costs a whole 30 s encoder pass however short the audio. So the engine decodes the
*longest* stretch that ends in a pause and fits in ``max_windows``, not one sentence at a time.

This module imports numpy and onnxruntime, never the gateway's pipeline or fronts.
"""

from __future__ import annotations

import functools
import os
from array import array
from bisect import bisect_left, bisect_right
from typing import Any

import numpy as np

__all__ = ["WINDOW_SAMPLES", "Segmenter", "SileroVad", "silero_session"]

# Silero's window at 16 kHz: 512 samples (32 ms), with 64 samples of the previous window as context.
WINDOW_SAMPLES = 512
_CONTEXT_SAMPLES = 64
_STATE_SHAPE = (1, 1, 128)


@functools.cache
def silero_session() -> Any:
    """The Silero VAD network from faster-whisper's wheel, loaded once per process."""
    import onnxruntime
    from faster_whisper.utils import get_assets_path

    opts = onnxruntime.SessionOptions()
    # One thread: a VAD step is a few milliseconds, and the decoder wants the cores.
    opts.inter_op_num_threads = 1
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 4
    path = os.path.join(get_assets_path(), "silero_vad_v6.onnx")
    return onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"], sess_options=opts)


class SileroVad:
    """One stream's VAD state; :meth:`probabilities` takes whole windows of float32 audio."""

    def __init__(self, session: Any) -> None:
        self._session = session
        self._h = np.zeros(_STATE_SHAPE, dtype=np.float32)
        self._c = np.zeros(_STATE_SHAPE, dtype=np.float32)
        self._context = np.zeros(_CONTEXT_SAMPLES, dtype=np.float32)

    def probabilities(self, audio: np.ndarray) -> np.ndarray:
        """Speech probability of each 512-sample window of ``audio`` (its length a multiple of 512)."""
        if len(audio) == 0:
            return np.zeros(0, dtype=np.float32)
        windows = audio.reshape(-1, WINDOW_SAMPLES)
        # Each row: the previous window's last 64 samples, then the window itself.
        context = np.concatenate([self._context[None, :], windows[:-1, -_CONTEXT_SAMPLES:]])
        batch = np.ascontiguousarray(np.concatenate([context, windows], axis=1))
        probs, self._h, self._c = self._session.run(
            None, {"input": batch, "h": self._h, "c": self._c}
        )
        self._context = windows[-1, -_CONTEXT_SAMPLES:].copy()
        return np.asarray(probs, dtype=np.float32).reshape(-1)


class Segmenter:
    """Cut points from speech probabilities, one window at a time (all positions in windows).

    A *pause* is a run of windows below ``threshold - 0.15`` (Silero's usual hysteresis). Once a
    pause has lasted ``min_silence`` windows, its middle so far becomes a cut point; if it goes on
    long enough to hold a silent stretch, a second cut just before speech resumes lets that
    stretch be skipped instead of decoded. A window at or above ``threshold`` is speech.
    """

    def __init__(self, *, threshold: float, min_silence: int, pad: int) -> None:
        self._on = threshold
        self._off = max(threshold - 0.15, 0.01)
        self._min_silence = max(min_silence, 1)
        self._pad = pad
        self._probs = array("f")
        self._base = 0  # window index of self._probs[0]
        self._speech: list[int] = []  # indices of speech windows (sorted)
        self._pause_start: int | None = None
        self._pause_cut = False
        self.cuts: list[int] = []

    @property
    def windows(self) -> int:
        """How many windows have been pushed."""
        return self._base + len(self._probs)

    def push(self, probs: Any) -> None:
        for p in probs:
            i = self.windows
            self._probs.append(float(p))
            if p >= self._on:
                self._speech.append(i)
                if self._pause_start is not None and self._pause_cut:
                    # A long pause ends: cut again just before the speech, so the silence between
                    # the two cuts forms a chunk of its own that is skipped, never decoded.
                    late = i - self._pad
                    if not self.cuts or late > self.cuts[-1] + self._pad:
                        self.cuts.append(late)
                self._pause_start = None
                self._pause_cut = False
            elif p < self._off:
                if self._pause_start is None:
                    self._pause_start = i
                elif not self._pause_cut and i + 1 - self._pause_start >= self._min_silence:
                    self.cuts.append(self._pause_start + (i + 1 - self._pause_start) // 2)
                    self._pause_cut = True

    def has_speech(self, start: int, end: int) -> bool:
        """Whether any window in [start, end) is speech."""
        k = bisect_left(self._speech, start)
        return k < len(self._speech) and self._speech[k] < end

    def speech_end(self, start: int, end: int) -> int | None:
        """The end of the last speech window in [start, end), or None if there is none."""
        k = bisect_left(self._speech, end)
        if k == 0 or self._speech[k - 1] < start:
            return None
        return self._speech[k - 1] + 1

    def next_chunk(
        self, start: int, max_windows: int, *, final: bool, eager: bool = True
    ) -> int | None:
        """Where the next chunk from ``start`` ends, or None while it is better to wait.

        The longest chunk that ends at a cut and holds at most ``max_windows``; at the end of the
        audio, everything left if it fits. Unless ``eager``, a chunk is only taken once it is
        full (or the audio has ended): fewer, longer decodes, for throughput. With no cut in reach and ``max_windows`` of audio (or
        the end) already here, the chunk is forced to end at the least speech-like window of its
        last quarter: a word may be split, but memory and decode time stay bounded.
        """
        available = self.windows
        if start >= available:
            return None
        limit = start + max_windows
        if final and available <= limit:
            return available
        if not eager and not final and available < limit:
            return None
        k = bisect_right(self.cuts, min(limit, available))
        if k > 0 and self.cuts[k - 1] > start:
            return self.cuts[k - 1]
        if available < limit and not final:
            return None
        lo = max(start + 1, limit - max_windows // 4)
        hi = min(limit, available)
        segment = self._probs[lo - self._base : hi - self._base]
        return lo + min(range(len(segment)), key=segment.__getitem__)

    def forget(self, before: int) -> None:
        """Drop what is kept for windows before ``before`` (they were decoded)."""
        drop = min(before, self.windows) - self._base
        if drop > 0:
            del self._probs[:drop]
            self._base += drop
        del self._speech[: bisect_left(self._speech, before)]
        del self.cuts[: bisect_left(self.cuts, before)]
