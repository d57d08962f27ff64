"""Streaming PCM16 resampling (16 kHz in, 24 kHz out for OpenAI Realtime) with PyAV.

Why stateful: a resampler is a low-pass FIR filter sliding over the signal. Resampling each chunk
on its own restarts that filter at every boundary, which both drops or duplicates fractional
samples and leaves a discontinuity (an audible click) at each chunk edge. libswresample keeps the
filter history and the fractional phase between calls, so feeding it chunk by chunk produces the
same samples as resampling the whole signal at once; ``flush`` drains the few samples the filter
still holds once the input has ended.
"""

from __future__ import annotations

import av

__all__ = ["PcmResampler"]

# Bytes per s16le mono sample.
SAMPLE_BYTES = 2


class PcmResampler:
    """Resample s16le mono PCM from ``in_rate`` to ``out_rate``, keeping state across chunks.

    ``push`` may return fewer (or more) bytes than the exact rate ratio for any single chunk;
    over the whole stream, ``push`` outputs plus ``flush`` give ``len * out_rate / in_rate``
    bytes give or take a sample. Odd trailing bytes are carried over to the next chunk.
    """

    def __init__(self, in_rate: int = 16_000, out_rate: int = 24_000) -> None:
        self.in_rate = in_rate
        self.out_rate = out_rate
        self._passthrough = in_rate == out_rate
        self._resampler = av.AudioResampler(format="s16", layout="mono", rate=out_rate)
        self._carry = b""
        self._flushed = False
        # libswresample cannot be flushed before it has seen a frame (PyAV issue #537).
        self._used = False

    def _frame(self, pcm: bytes) -> av.AudioFrame:
        frame = av.AudioFrame(format="s16", layout="mono", samples=len(pcm) // SAMPLE_BYTES)
        frame.planes[0].update(pcm)
        frame.sample_rate = self.in_rate
        return frame

    @staticmethod
    def _join(frames: list[av.AudioFrame]) -> bytes:
        # A plane's buffer may be padded for alignment: keep only the real samples.
        return b"".join(bytes(f.planes[0])[: f.samples * SAMPLE_BYTES] for f in frames)

    def push(self, pcm: bytes) -> bytes:
        if self._flushed:
            raise RuntimeError("push() after flush()")
        data = self._carry + pcm
        usable = len(data) - len(data) % SAMPLE_BYTES
        self._carry = data[usable:]
        if not usable:
            return b""
        if self._passthrough:
            return data[:usable]
        self._used = True
        return self._join(self._resampler.resample(self._frame(data[:usable])))

    def flush(self) -> bytes:
        """Return the samples still held by the filter; the resampler is finished afterwards."""
        if self._flushed:
            return b""
        self._flushed = True
        self._carry = b""
        if self._passthrough or not self._used:
            return b""
        return self._join(self._resampler.resample(None))
