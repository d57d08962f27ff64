"""Test audio: the real recordings in tests/data, and PyAV-made variants of them."""

from __future__ import annotations

import io
import itertools
import struct
import wave
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np

DATA = Path(__file__).parent / "data"
GOFORWARD = DATA / "ps_goforward.wav"
LIBRIVOX = DATA / "ps_librivox_concat.wav"
SHORT = DATA / "ps_librivox_0880.wav"

# container format, codec, sample rate, file suffix
FORMATS = {
    "wav": ("wav", "pcm_s16le", 16000, ".wav"),
    "flac": ("flac", "flac", 44100, ".flac"),
    "mp3": ("mp3", "libmp3lame", 44100, ".mp3"),
    "ogg-vorbis": ("ogg", "vorbis", 44100, ".ogg"),
    "opus": ("ogg", "libopus", 48000, ".opus"),
    "m4a-aac": ("mp4", "aac", 44100, ".m4a"),
}


def pcm_of(path: Path) -> bytes:
    with wave.open(str(path)) as w:
        return w.readframes(w.getnframes())


def write_wav(path: Path, pcm: bytes, rate: int = 16000) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm)
    return path


def transcode(src: Path, dst: Path, fmt: str) -> Path:
    """Re-encode a 16 kHz mono WAV into another container/codec with PyAV."""
    container_fmt, codec, rate, _ = FORMATS[fmt]
    # FFmpeg's own Vorbis encoder only writes stereo.
    layout = "stereo" if codec == "vorbis" else "mono"
    with av.open(str(dst), "w", format=container_fmt) as out:
        _encode_into(out, src, codec, rate, layout)
    return dst


def encoded(src: Path, container_fmt: str, codec: str, rate: int, layout: str) -> bytes:
    """The bytes of ``src`` encoded with ``codec`` at ``rate``/``layout`` in ``container_fmt``."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container_fmt) as out:
        _encode_into(out, src, codec, rate, layout)
    return buffer.getvalue()


def _encode_into(out: Any, src: Path, codec: str, rate: int, layout: str) -> None:
    """Add an audio stream to ``out`` and encode all of ``src`` into it."""
    _encode(out, _audio_stream(out, codec, rate, layout), src)


def _audio_stream(out: Any, codec: str, rate: int, layout: str) -> Any:
    stream = out.add_stream(codec, rate=rate)
    if codec == "vorbis":
        stream.codec_context.options = {"strict": "experimental"}
    stream.layout = layout
    return stream


def _encode(out: Any, stream: Any, src: Path) -> None:
    rate = stream.rate
    resampler = av.AudioResampler(format=stream.format.name, layout=stream.layout, rate=rate)
    pts = 0
    with av.open(str(src)) as inp:
        # A final None flushes the resampler.
        for frame in itertools.chain(inp.decode(audio=0), [None]):
            for f in resampler.resample(frame):
                f.pts = pts
                f.time_base = Fraction(1, rate)
                pts += f.samples
                for packet in stream.encode(f):
                    out.mux(packet)
    for packet in stream.encode(None):
        out.mux(packet)


# --- Odd and damaged files (issue 13): made at test time, from the recordings above -------------


def patched_wav(src: Path, dst: Path, format_tag: int, bits: int) -> Path:
    """``src`` with its fmt chunk claiming another sample format (one FFmpeg cannot decode)."""
    data = bytearray(src.read_bytes())
    fmt = data.index(b"fmt ") + 8
    struct.pack_into("<H", data, fmt, format_tag)
    struct.pack_into("<H", data, fmt + 14, bits)
    dst.write_bytes(data)
    return dst


def with_video(src: Path, dst: Path, video_seconds: float, *, seekable: bool = True) -> Path:
    """A WebM of ``src`` as Opus plus a tiny VP8 track of ``video_seconds``; written to a pipe
    (``seekable=False``) the muxer leaves out the tracks' DURATION tags."""
    sink: Any = io.BytesIO() if seekable else _Pipe()
    with av.open(sink, "w", format="webm") as out:
        video = out.add_stream("vp8", rate=10)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        _encode_into(out, src, "libopus", 48000, "mono")
        black = np.zeros((48, 64, 3), dtype=np.uint8)
        for i in range(round(video_seconds * 10)):
            frame = av.VideoFrame.from_ndarray(black, format="rgb24").reformat(format="yuv420p")
            frame.pts, frame.time_base = i, Fraction(1, 10)
            for packet in video.encode(frame):
                out.mux(packet)
        for packet in video.encode(None):
            out.mux(packet)
    dst.write_bytes(sink.getvalue())
    return dst


class _Pipe:
    """A write-only, unseekable file object: what a muxer sees when it writes to a pipe."""

    def __init__(self) -> None:
        self._buffer = io.BytesIO()

    def write(self, data: bytes) -> int:
        return self._buffer.write(data)

    def getvalue(self) -> bytes:
        return self._buffer.getvalue()


def two_audio_streams(first: Path, second: Path, dst: Path) -> Path:
    """A Matroska file with ``first`` as its first audio stream and ``second`` as its second."""
    with av.open(str(dst), "w", format="matroska") as out:
        streams = [_audio_stream(out, "flac", 16000, "mono") for _ in range(2)]
        _encode(out, streams[0], first)
        _encode(out, streams[1], second)
    return dst


def chained_ogg(src: Path, dst: Path) -> Path:
    """A chained Ogg: ``src`` as Vorbis 44.1 kHz stereo, then again as Opus 48 kHz mono, then as
    Vorbis 22.05 kHz stereo. Each link changes the rate and or the layout."""
    dst.write_bytes(
        encoded(src, "ogg", "vorbis", 44100, "stereo")
        + encoded(src, "ogg", "libopus", 48000, "mono")
        + encoded(src, "ogg", "vorbis", 22050, "stereo")
    )
    return dst


def mixed_rate_mp3(src: Path, dst: Path) -> Path:
    """``src`` as MP3 at 44.1 kHz followed by ``src`` at 22.05 kHz, in one file."""
    dst.write_bytes(
        encoded(src, "mp3", "libmp3lame", 44100, "mono")
        + encoded(src, "mp3", "libmp3lame", 22050, "mono")
    )
    return dst


def truncated(src: Path, dst: Path, fmt: str, keep: float) -> Path:
    """``src`` transcoded to ``fmt`` and cut after ``keep`` of its bytes (mid-frame)."""
    data = transcode(src, dst, fmt).read_bytes()
    dst.write_bytes(data[: int(len(data) * keep)])
    return dst
