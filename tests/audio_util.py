"""Test audio: the real recordings in tests/data, and PyAV-made variants of them."""

from __future__ import annotations

import itertools
import wave
from fractions import Fraction
from pathlib import Path

import av

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
    with av.open(str(src)) as inp, av.open(str(dst), "w", format=container_fmt) as out:
        stream = out.add_stream(codec, rate=rate)
        if codec == "vorbis":
            stream.codec_context.options = {"strict": "experimental"}
        # FFmpeg's own Vorbis encoder only writes stereo.
        layout = "stereo" if codec == "vorbis" else "mono"
        stream.layout = layout
        resampler = av.AudioResampler(format=stream.format.name, layout=layout, rate=rate)
        pts = 0
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
    return dst
